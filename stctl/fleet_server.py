"""`stctl server serve`: the fleet server devices call home to (FastAPI on uvicorn over TLS).

Endpoints:
- `POST /v1/call-home/poll` (device certificate): a `manifests.call_home.PollReport` in, a
  `PollAnswer` out (`stctl.call_home_store` checks and stores it);
- `GET /v1/assignments`, `PUT /v1/assignments/{device}`, `DELETE /v1/assignments/{device}`
  (operator certificate; `stctl.assignments`);
- `GET /healthz` (no certificate): `{"status": "ok"}`, nothing more.

Rules:
- TLS with the server certificate of the workspace (`stctl.server_cert`, issued by the fleet CA
  on first start); a client certificate is verified against the fleet CA at the handshake
  (another CA's fails it) but is optional there, so the app can answer 401 without one; the
  verified certificate reaches the app as the ASGI TLS extension (`client_cert_chain`);
- the certificate's role marker (`manifests.enrollment.certificate_role`) decides: only `device`
  may poll, only `operator` may manage assignments (403 otherwise); a device's name is its
  certificate's common name; a certificate fleet.db marks revoked is refused (403) at every
  request, so a revocation takes effect at once, with no CRL to reload;
- every body is read up to a cap (`ServerConfig`: reports `MAX_REPORT_BYTES`, operator bodies
  `max_body_bytes`; 413 beyond); bad JSON, an unknown key or a wrong value is 400; every error
  is the envelope `{"error": {"message", "type", "param", "code"}}`, rendered as ASCII JSON;
- a refused report is recorded (`call_home_refusals`) whatever the reason, nothing of it stored;
- each request opens fleet.db for itself (SQLite in WAL mode; writers wait for each other);
- SIGTERM/SIGINT end it gracefully: no new connections, requests in flight get
  `shutdown_grace_s`;
- `serve` also drives the workspace's rollouts (`stctl.rollout_driver`, a thread looking every
  `rollout_interval_s`), unless told not to: a rollout needs no operator process.
"""
from __future__ import annotations

import json
import socket
import ssl
from collections.abc import Callable
from dataclasses import dataclass

import uvicorn
from cryptography import x509
from cryptography.hazmat.primitives.serialization import Encoding
from cryptography.x509.oid import NameOID
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException
from uvicorn.protocols.http.h11_impl import H11Protocol

from common.http import ApiError, AsciiJSONResponse, error, peer_chain, with_peer_certificate
from manifests import ManifestError
from manifests.call_home import MAX_POLL_S, MAX_REPORT_BYTES, MIN_POLL_S, PollReport
from manifests.enrollment import ROLE_DEVICE, ROLE_OPERATOR, certificate_role
from stctl.assignments import AssignmentError, UnknownDeviceError, delete_assignment, list_assignments, put_assignment
from stctl.call_home_store import ReportRefused, accept_report, record_refusal, revoked
from stctl.errors import StctlError
from stctl.fleetdb import open_fleet_db
from stctl.server_cert import ensure_server_cert
from stctl.workspace import Workspace


class ServerError(StctlError):
    """The fleet server cannot start (bad --listen, port taken, bad settings)."""


@dataclass(frozen=True)
class ServerConfig:
    poll_after_s: float = 60.0  # what the answer tells a device; the device adds its own jitter
    max_report_bytes: int = MAX_REPORT_BYTES
    max_body_bytes: int = 64 * 1024  # an operator's request
    max_refusals: int = 10_000  # refusals kept in fleet.db (the newest)
    shutdown_grace_s: float = 10.0
    rollout_interval_s: float = 2.0  # how often `serve` looks for a rollout to drive

    def __post_init__(self) -> None:
        if not MIN_POLL_S <= self.poll_after_s <= MAX_POLL_S:
            raise ServerError(f"poll interval {self.poll_after_s:g} s: expected {MIN_POLL_S:g} .. {MAX_POLL_S:g}")
        if not 0 <= self.shutdown_grace_s <= 3600:
            raise ServerError(f"shutdown grace {self.shutdown_grace_s:g} s: expected 0 .. 3600")
        if not 0.1 <= self.rollout_interval_s <= 3600:
            raise ServerError(f"rollout interval {self.rollout_interval_s:g} s: expected 0.1 .. 3600")


@dataclass(frozen=True)
class Peer:
    """The verified client certificate of a request."""
    name: str
    role: str | None
    der: bytes
    serial: str  # hex, as fleet.db `certificates` keeps it


def peer_of(request: Request) -> Peer | None:
    chain = peer_chain(request.scope)
    if not chain:
        return None
    cert = x509.load_pem_x509_certificate(chain[0].encode())
    names = cert.subject.get_attributes_for_oid(NameOID.COMMON_NAME)
    return Peer(name=str(names[0].value) if names else "", role=certificate_role(chain[0].encode()),
                der=cert.public_bytes(Encoding.DER), serial=f"{cert.serial_number:x}")


async def read_body(request: Request, limit: int) -> bytes:
    """The request body, at most `limit` bytes (413 beyond, whether declared or streamed)."""
    declared = request.headers.get("content-length")
    if declared is not None and (not declared.isdigit() or int(declared) > limit):
        raise ApiError(413, f"request body larger than {limit} bytes", "too_large")
    body = bytearray()
    async for chunk in request.stream():
        body += chunk
        if len(body) > limit:
            raise ApiError(413, f"request body larger than {limit} bytes", "too_large")
    return bytes(body)


def parse_json(body: bytes):
    """JSON whose text is valid Unicode throughout (a lone surrogate would not fit in SQLite), else 400."""
    try:
        data = json.loads(body)
        json.dumps(data, ensure_ascii=False).encode("utf-8")
    except ValueError as e:  # JSONDecodeError, UnicodeDecodeError, UnicodeEncodeError
        raise ApiError(400, f"the body is not valid JSON ({str(e)[:200]})", "invalid_request") from None
    return data


def create_app(workspace: Workspace, config: ServerConfig = ServerConfig()) -> FastAPI:
    """The fleet server's app on `workspace`'s fleet.db (see the module's rules)."""
    app = FastAPI(title="SmallThinker fleet server", docs_url=None, redoc_url=None, openapi_url=None,
                  default_response_class=AsciiJSONResponse)

    def db():
        return open_fleet_db(workspace.fleet_db)

    def operator(request: Request) -> Peer:
        peer = peer_of(request)
        if peer is None:
            raise ApiError(401, "this endpoint needs a client certificate of the fleet CA (operator role)",
                           "unauthorized")
        if peer.role != ROLE_OPERATOR:
            raise ApiError(403, "this certificate does not carry the operator role", "forbidden")
        conn = db()
        try:
            if revoked(conn, peer.serial):
                raise ApiError(403, "this operator certificate is revoked", "forbidden")
        finally:
            conn.close()
        return peer

    @app.exception_handler(ApiError)
    async def _api_error(request: Request, e: ApiError):
        return error(e.status, str(e), e.kind, e.param)

    @app.exception_handler(AssignmentError)
    async def _assignment_error(request: Request, e: AssignmentError):
        return error(404 if isinstance(e, UnknownDeviceError) else 400, str(e),
                     "not_found" if isinstance(e, UnknownDeviceError) else "invalid_request", e.param)

    @app.exception_handler(HTTPException)
    async def _http_error(request: Request, e: HTTPException):
        return error(e.status_code, str(e.detail), {404: "not_found", 405: "method_not_allowed"}.get(e.status_code,
                                                                                                     "invalid_request"))

    @app.exception_handler(RequestValidationError)
    async def _schema_error(request: Request, e: RequestValidationError):
        return error(400, "the request does not match its schema", "invalid_request")

    @app.exception_handler(Exception)
    async def _internal_error(request: Request, e: Exception):
        return error(500, f"internal error ({type(e).__name__}); the server's log has the details", "internal_error")

    @app.get("/healthz")
    async def healthz():
        return {"status": "ok"}

    def refuse(peer: Peer | None, device: str | None, e: ApiError) -> None:
        conn = db()
        try:
            record_refusal(conn, peer.name if peer else None, device, e.status, str(e), config.max_refusals)
        finally:
            conn.close()

    def accept(peer: Peer, report: PollReport) -> dict:
        conn = db()
        try:
            return accept_report(conn, peer.name, peer.der, peer.serial, report, config.poll_after_s).to_dict()
        except ReportRefused as e:
            raise ApiError(e.status, str(e), e.kind) from None
        finally:
            conn.close()

    @app.post("/v1/call-home/poll")
    async def poll(request: Request):
        peer, report = peer_of(request), None
        try:
            if peer is None:
                raise ApiError(401, "calling home needs the device's certificate of the fleet CA", "unauthorized")
            if peer.role != ROLE_DEVICE:
                raise ApiError(403, "only a device certificate may call home", "forbidden")
            data = parse_json(await read_body(request, config.max_report_bytes))
            try:
                report = PollReport.parse(data)
            except ManifestError as e:
                head = str(e).split(":", 1)[0]
                raise ApiError(400, str(e), "invalid_request", head.removeprefix("report.")) from None
            return AsciiJSONResponse(await run_in_threadpool(accept, peer, report))
        except ApiError as e:
            await run_in_threadpool(refuse, peer, report.device if report else None, e)
            raise

    @app.get("/v1/assignments")
    async def get_assignments(request: Request):
        await run_in_threadpool(operator, request)

        def read() -> list[dict]:
            conn = db()
            try:
                return list_assignments(conn)
            finally:
                conn.close()

        return AsciiJSONResponse({"assignments": await run_in_threadpool(read)})

    @app.put("/v1/assignments/{device}")
    async def put(device: str, request: Request):
        await run_in_threadpool(operator, request)
        fields = parse_json(await read_body(request, config.max_body_bytes))

        def write() -> dict:
            conn = db()
            try:
                return {"device": device, **put_assignment(conn, device, fields).to_dict()}
            finally:
                conn.close()

        return AsciiJSONResponse(await run_in_threadpool(write))

    @app.delete("/v1/assignments/{device}")
    async def delete(device: str, request: Request):
        await run_in_threadpool(operator, request)

        def remove() -> dict:
            conn = db()
            try:
                return {"device": device, **delete_assignment(conn, device).to_dict()}
            finally:
                conn.close()

        return AsciiJSONResponse(await run_in_threadpool(remove))

    return app


class PeerCertProtocol(H11Protocol):
    """uvicorn's h11 protocol, handing each request the connection's verified client certificate
    (the handshake is over when `connection_made` runs) as the ASGI TLS extension."""

    def connection_made(self, transport) -> None:
        super().connection_made(transport)
        self.app = with_peer_certificate(self.app, transport.get_extra_info("ssl_object"))


def parse_listen(text: str) -> tuple[str, int]:
    """`HOST:PORT` -> (host, port)."""
    host, sep, port = text.rpartition(":")
    if not sep or not host or not port.isdigit() or not 0 <= int(port) < 65536:
        raise ServerError(f"--listen {text!r}: expected HOST:PORT, e.g. 0.0.0.0:8444")
    return host.strip("[]"), int(port)


def server_hosts(host: str, names: list[str]) -> list[str]:
    """The names the server certificate must carry: `names`, else the listen host (for a wildcard
    address, this machine's host name and the loopback address)."""
    if names:
        return list(names)
    return [socket.gethostname(), "127.0.0.1"] if host in ("0.0.0.0", "::", "") else [host]


def build_server(workspace: Workspace, host: str, names: list[str] = (),
                 config: ServerConfig = ServerConfig()) -> uvicorn.Server:
    """A uvicorn server of the app over TLS (run it with `server.run(sockets=[bind(...)])`)."""
    cert, key = ensure_server_cert(workspace, server_hosts(host, list(names)))
    return uvicorn.Server(uvicorn.Config(
        create_app(workspace, config), http=PeerCertProtocol, ws="none", lifespan="off", log_level="warning",
        access_log=False, ssl_certfile=str(cert), ssl_keyfile=str(key), ssl_ca_certs=str(workspace.pki_dir / "ca.crt"),
        ssl_cert_reqs=ssl.CERT_OPTIONAL, timeout_graceful_shutdown=config.shutdown_grace_s))


def bind(host: str, port: int) -> socket.socket:
    """A listening socket (port 0: a free one)."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind((host, port))
        sock.listen(128)
    except OSError as e:
        sock.close()
        raise ServerError(f"cannot listen on {host}:{port}: {e.strerror or e}") from None
    sock.set_inheritable(True)
    return sock


def serve(workspace: Workspace, listen: str, names: list[str] = (), config: ServerConfig = ServerConfig(),
          announce: Callable[[str], None] = lambda url: None, drive_rollouts: bool = True,
          say: Callable[[str], None] = lambda _m: None) -> None:
    """Run the fleet server until SIGTERM/SIGINT; `announce(url)` once it listens. With
    `drive_rollouts` it drives the workspace's rollouts meanwhile (`say`: their progress)."""
    from stctl.rollout_driver import RolloutDriver

    host, port = parse_listen(listen)
    server = build_server(workspace, host, names, config)
    sock = bind(host, port)
    driver = RolloutDriver(workspace, interval_s=config.rollout_interval_s, say=say) if drive_rollouts else None
    try:
        announce(f"https://{listen}")
        if driver is not None:
            driver.start()
        server.run(sockets=[sock])
    finally:
        if driver is not None:
            driver.stop()
        sock.close()

