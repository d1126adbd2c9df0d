"""Connection floods against one real `st-agent serve` process over TLS on 127.0.0.1: idle TLS
connections, headers sent a byte at a time, handshakes that never start. The operator and
`/healthz` keep answering while they are held, and the agent closes them on its own deadlines.

(Before: 64 idle TLS connections made every request 503 for as long as they were held.)"""
from __future__ import annotations

import shutil
import socket
import ssl
import threading
import time

import pytest

from agent_helpers import Agent, set_limits

pytest_plugins = ["release_fixtures", "agent_fixtures"]

pytestmark = pytest.mark.slow

REQUEST_TIMEOUT_S = 3.0
HANDSHAKE_TIMEOUT_S = 2.0
IDLE_PER_CLIENT = 16
ANSWER_WITHIN_S = 2.0


@pytest.fixture(scope="module")
def agent(fleet, v1_template, tmp_path_factory):
    data_dir = tmp_path_factory.mktemp("flooded") / "device"
    shutil.copytree(v1_template, data_dir)
    set_limits(data_dir, request_timeout_s=REQUEST_TIMEOUT_S, handshake_timeout_s=HANDSHAKE_TIMEOUT_S,
               max_idle_per_client=IDLE_PER_CLIENT, max_tokens=8)
    agent = Agent(data_dir, fleet).start()
    yield agent
    agent.stop()


def tls_connection(agent: Agent) -> ssl.SSLSocket:
    """A TLS connection without a client certificate, handshake done, nothing sent."""
    context = ssl.create_default_context(cafile=str(agent.fleet.pki / "ca.crt"))
    raw = socket.create_connection(("127.0.0.1", agent.port), timeout=10)
    return context.wrap_socket(raw, server_hostname="127.0.0.1")


def closed_by_server(sock: socket.socket, within: float) -> bool:
    """True when the server closes `sock` within `within` seconds (EOF or reset)."""
    sock.settimeout(within)
    try:
        return sock.recv(1) == b""
    except (ssl.SSLError, ConnectionError):
        return True
    except TimeoutError:
        return False


def is_open(sock: socket.socket) -> bool:
    return not closed_by_server(sock, 0.05)


def operator_and_healthz_answer(agent: Agent) -> None:
    """A new operator connection and a new anonymous one are answered at once. (New ones: an idle
    pooled connection may have been closed by the flood, and a client then has to reconnect.)"""
    started = time.monotonic()
    with agent.client(agent.fleet.pki / "operator.crt", agent.fleet.pki / "operator.key") as operator:
        status = operator.get(agent.url("/v1/status"), timeout=ANSWER_WITHIN_S)
    assert status.status_code == 200 and status.json()["active"]["version"] == "1.0.0"
    with agent.client() as plain:
        assert plain.get(agent.url("/healthz"), timeout=ANSWER_WITHIN_S).text == "ok"
    assert time.monotonic() - started < 2 * ANSWER_WITHIN_S


@pytest.mark.parametrize("flood", [64, 256])
def test_idle_tls_connections_do_not_lock_out_the_operator(agent, flood):
    held = [tls_connection(agent) for _ in range(flood)]
    try:
        operator_and_healthz_answer(agent)
        assert agent.complete()["system_fingerprint"] == "st-demo@1.0.0"
        # the agent keeps only the newest idle connections of one address
        assert sum(is_open(s) for s in held) <= IDLE_PER_CLIENT
        # and closes those left on their deadline, though the client never hung up
        survivors = [s for s in held if is_open(s)]
        assert all(closed_by_server(s, REQUEST_TIMEOUT_S + 3) for s in survivors)
    finally:
        for s in held:
            s.close()
    operator_and_healthz_answer(agent)


def test_headers_sent_a_byte_at_a_time_are_cut_at_the_request_timeout(agent):
    sock = tls_connection(agent)
    cut, started = threading.Event(), time.monotonic()

    def trickle():
        try:
            for byte in b"GET /healthz HTTP/1.1\r\nHost: 127.0.0.1\r\nX-Slow: " + b"a" * 1000:
                sock.send(bytes([byte]))
                time.sleep(0.2)
        except OSError:
            cut.set()

    sender = threading.Thread(target=trickle, daemon=True)
    sender.start()
    try:
        while time.monotonic() - started < REQUEST_TIMEOUT_S + 5 and not cut.is_set():
            operator_and_healthz_answer(agent)  # the server stays usable while the trickle goes on
            time.sleep(0.5)
        assert cut.is_set(), "a connection trickling header bytes was kept past the request timeout"
        assert time.monotonic() - started >= REQUEST_TIMEOUT_S - 0.5  # and not cut before it
    finally:
        sock.close()


def test_a_handshake_that_never_starts_is_dropped(agent):
    silent = [socket.create_connection(("127.0.0.1", agent.port), timeout=10) for _ in range(32)]
    try:
        operator_and_healthz_answer(agent)
        assert all(closed_by_server(s, HANDSHAKE_TIMEOUT_S + 3) for s in silent)
    finally:
        for s in silent:
            s.close()


def test_a_request_in_progress_is_never_evicted(agent):
    """A flood of idle connections from the same address closes idle ones only: a streaming
    completion that is being answered finishes whole."""
    with agent.client() as app:
        response = app.post(agent.url("/v1/completions"), stream=True, timeout=60,
                            json={"prompt": "Line 4 torque check:", "max_tokens": 8, "stream": True})
        held = [tls_connection(agent) for _ in range(IDLE_PER_CLIENT * 4)]
        try:
            text, fingerprint, finish = Agent._read_stream(response)
        finally:
            for s in held:
                s.close()
    assert fingerprint == "st-demo@1.0.0" and finish in ("length", "stop")
