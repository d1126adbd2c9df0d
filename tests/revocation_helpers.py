"""Helpers of the revocation tests: a TLS 1.2 handshake that reports the alert a server sent, an
asyncio TLS server in a thread that uses a given context the way uvicorn's loop does
(`wrap_bio` per connection), and a CRL made by hand (to forge the ones stctl would never make)."""
from __future__ import annotations

import asyncio
import socket
import ssl
import threading
import time
from datetime import datetime, timedelta, timezone
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.serialization import Encoding

REFUSED = "refused"  # what `handshake` says when the server ended the handshake (asyncio sends no alert)
REVOKED = "certificate revoked"  # the server's reason for refusing a revoked client certificate


def handshake(port: int, ca: Path, cert: Path | None = None, key: Path | None = None) -> str:
    """"ok", or why the TLS 1.2 handshake with 127.0.0.1:`port` failed: `REFUSED` when the server
    closed it (with TLS 1.2 the server judges the client certificate during the handshake; an
    asyncio server, uvicorn's too, drops the connection without sending an alert)."""
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.load_verify_locations(cafile=str(ca))
    ctx.check_hostname = False
    ctx.maximum_version = ssl.TLSVersion.TLSv1_2
    if cert is not None:
        ctx.load_cert_chain(cert, key)
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=30) as raw, ctx.wrap_socket(raw):
            return "ok"
    except (ssl.SSLEOFError, ConnectionResetError):
        return REFUSED
    except ssl.SSLError as e:
        return e.reason or str(e)


class TlsServer:
    """Accepts TLS connections with `ctx` on 127.0.0.1 and answers any request `200 ok`; records
    why it refused each handshake it refused (the loop runs in debug mode, which reports them)."""

    def __init__(self, ctx: ssl.SSLContext):
        self.loop = asyncio.new_event_loop()
        self.refusals: list[str] = []
        started = threading.Event()

        def record(loop, context) -> None:
            exc = context.get("exception")
            if isinstance(exc, ssl.SSLError):
                self.refusals.append(getattr(exc, "verify_message", None) or exc.reason or str(exc))

        def run() -> None:
            asyncio.set_event_loop(self.loop)
            self.loop.set_debug(True)
            self.loop.slow_callback_duration = 3600  # debug mode for the handshake reports only
            self.loop.set_exception_handler(record)
            self.server = self.loop.run_until_complete(asyncio.start_server(self._answer, "127.0.0.1", 0, ssl=ctx))
            started.set()
            self.loop.run_forever()

        self.thread = threading.Thread(target=run, name="tls-server", daemon=True)
        self.thread.start()
        assert started.wait(30), "the TLS server did not start"
        self.port = self.server.sockets[0].getsockname()[1]

    def handshake(self, ca: Path, cert: Path | None = None, key: Path | None = None) -> str:
        """"ok", or the server's reason for refusing this handshake."""
        before = len(self.refusals)
        outcome = handshake(self.port, ca, cert, key)
        if outcome == "ok":
            return outcome
        deadline = time.monotonic() + 10
        while len(self.refusals) == before and time.monotonic() < deadline:
            time.sleep(0.01)
        return self.refusals[-1] if len(self.refusals) > before else outcome

    @staticmethod
    async def _answer(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 30)
            writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\nConnection: close\r\n\r\nok")
            await writer.drain()
        except (asyncio.IncompleteReadError, asyncio.LimitOverrunError, TimeoutError, OSError):
            pass
        finally:
            writer.close()

    async def _shutdown(self) -> None:
        self.server.close()
        tasks = [t for t in asyncio.all_tasks() if t is not asyncio.current_task()]
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)

    def close(self) -> None:
        asyncio.run_coroutine_threadsafe(self._shutdown(), self.loop).result(30)
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(30)
        self.loop.close()

    def __enter__(self) -> TlsServer:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def make_crl(key, issuer: x509.Name, number: int, serials: list[int] = (), last_update: datetime | None = None,
             next_update: datetime | None = None) -> bytes:
    """A CRL PEM signed by `key` in the name of `issuer`, exactly as asked."""
    now = datetime.now(timezone.utc)
    builder = (x509.CertificateRevocationListBuilder().issuer_name(issuer)
               .last_update(last_update or now - timedelta(hours=1))
               .next_update(next_update or now + timedelta(days=3650))
               .add_extension(x509.CRLNumber(number), critical=False))
    for serial in serials:
        builder = builder.add_revoked_certificate(
            x509.RevokedCertificateBuilder().serial_number(serial).revocation_date(now - timedelta(hours=1)).build())
    return builder.sign(key, hashes.SHA256()).public_bytes(Encoding.PEM)
