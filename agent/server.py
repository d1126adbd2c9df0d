"""`st-agent serve`: the device API on uvicorn over TLS with optional client certificates.

Rules: the TLS context presents the device certificate and verifies any client certificate
against the fleet CA only (`CERT_OPTIONAL`: a handshake without a certificate succeeds, so
`/healthz` and completions work; a certificate of another CA fails the handshake); TLS 1.2 or
newer. The verified peer certificate of each connection is handed to the app through the ASGI
TLS extension (`scope["extensions"]["tls"]["client_cert_chain"]`, PEM), which the API's
management endpoints check for the operator role. SIGTERM/SIGINT shut down gracefully:
no new connections, in-flight requests get `shutdown_grace_s`, then the lifespan ends.
Idle and slow connections are bounded by `agent.connections` (handshake and request timeouts,
idle caps per client and in all); there is no server-wide connection limit that a flood of idle
connections could fill.

Revocation: the context also refuses, at the handshake, a client certificate that the device's
CRL (`tls/crl.pem`, kept by `agent.revocation`) revokes, device and operator alike; requests
without a certificate are unaffected. Before each new connection's handshake (`wrap_bio`) the
context notices a replaced CRL file (its inode, size or mtime changed), checks it (a fleet CRL
of the CA, usable now) and adds it to the live context; OpenSSL enforces the newest of the CRLs
loaded. The CRL check is switched on only once a CRL is loaded (with it and no CRL, OpenSSL
refuses every client certificate); a file that fails the check is logged and ignored, the
CRLs loaded before stay. The daemon refreshes the CRL from the repository every
`crl_refresh_s` while it serves (`agent.revocation.CrlRefresher`).
"""
from __future__ import annotations

import asyncio
import logging
import os
import ssl
import sys
from datetime import datetime, timezone

import h11
import uvicorn
from uvicorn.config import STARTUP_FAILURE
from uvicorn.protocols.http.h11_impl import H11Protocol

from agent.api import create_app
from agent.config import DeviceConfig, Limits, parse_listen
from agent.connections import IdleConnections
from agent.errors import AgentError
from agent.revocation import CrlRefresher, RevocationError, crl_file, load_ca, read_crl_file
from common.http import with_peer_certificate
from manifests.crl import enforce_crl

log = logging.getLogger("st-agent.server")


class RevokingContext(ssl.SSLContext):
    """The server's TLS context: picks up a replaced CRL file before each new connection's handshake."""

    def watch_crl(self, config: DeviceConfig) -> None:
        self._crl_path, self._ca = crl_file(config), load_ca(config)
        self._crl_seen: tuple | None = None
        self.load_new_crl()

    def wrap_bio(self, *args, **kwargs):
        self.load_new_crl()
        return super().wrap_bio(*args, **kwargs)

    def load_new_crl(self) -> None:
        """Add the CRL file's CRL if the file changed since the last look (never raises)."""
        try:
            st = os.stat(self._crl_path)
        except OSError:
            return
        seen = (st.st_ino, st.st_size, st.st_mtime_ns)
        if seen == self._crl_seen:
            return
        self._crl_seen = seen
        try:
            crl = read_crl_file(self._crl_path, self._ca)
            if crl is None:
                return
            if not crl.usable_at(datetime.now(timezone.utc)):
                raise RevocationError(f"CRL {crl.number} is not valid on this device's clock now "
                                      f"({crl.last_update} to {crl.next_update})")
            enforce_crl(self, crl)
        except (RevocationError, OSError, ssl.SSLError) as e:
            log.warning("CRL not loaded (the CRLs loaded before stay): %s", e)
            return
        log.info("CRL %d enforced: %d certificate(s) revoked", crl.number, len(crl.revoked))


def tls_context(config: DeviceConfig) -> RevokingContext:
    ctx = RevokingContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    ctx.load_cert_chain(config.device_cert, config.device_key)
    ctx.load_verify_locations(cafile=str(config.ca_cert))
    ctx.verify_mode = ssl.CERT_OPTIONAL
    ctx.watch_crl(config)
    return ctx


class DeviceProtocol(H11Protocol):
    """h11 connections whose app sees the peer certificate (the handshake is done when this runs)
    and whose idle time is bounded by `IdleConnections`."""

    def __init__(self, *args, idle: IdleConnections, **kwargs):
        super().__init__(*args, **kwargs)
        self._idle = idle

    def connection_made(self, transport: asyncio.Transport) -> None:
        super().connection_made(transport)
        self.app = with_peer_certificate(self.app, transport.get_extra_info("ssl_object"))
        self._track()

    def data_received(self, data: bytes) -> None:
        super().data_received(data)
        self._track()

    def on_response_complete(self) -> None:
        super().on_response_complete()
        self._track()

    def connection_lost(self, exc: Exception | None) -> None:
        self._idle.busy(self)
        super().connection_lost(exc)

    def _track(self) -> None:
        waiting = self.cycle is not None and not self.cycle.response_complete and self.conn.their_state is h11.DONE
        if waiting or self.transport.is_closing():
            self._idle.busy(self)
        else:
            self._idle.idle(self, self.client[0] if self.client else "", self.loop)

    def close_idle(self) -> None:
        if not self.transport.is_closing():
            self.transport.close()


class DeviceServer(uvicorn.Server):
    """uvicorn's server, listening itself: uvicorn has no setting for the TLS handshake timeout."""

    def __init__(self, config: uvicorn.Config, tls: ssl.SSLContext, limits: Limits):
        super().__init__(config)
        self.tls, self.limits = tls, limits
        self.idle = IdleConnections(limits)

    async def startup(self, sockets=None) -> None:
        await self.lifespan.startup()
        if self.lifespan.should_exit:
            sys.exit(STARTUP_FAILURE)

        def protocol() -> DeviceProtocol:
            return DeviceProtocol(config=self.config, server_state=self.server_state, app_state=self.lifespan.state,
                                  idle=self.idle)

        try:
            server = await asyncio.get_running_loop().create_server(
                protocol, host=self.config.host, port=self.config.port, ssl=self.tls, backlog=self.config.backlog,
                ssl_handshake_timeout=self.limits.handshake_timeout_s)
        except OSError as e:
            log.error("cannot listen on %s:%s: %s", self.config.host, self.config.port, e)
            await self.lifespan.shutdown()
            sys.exit(STARTUP_FAILURE)
        self.servers = [server]
        self.started = True


def serve(config: DeviceConfig, listen: str) -> None:
    """Run the daemon until SIGTERM/SIGINT (AgentError if it could not start)."""
    host, port = parse_listen(listen)
    app = create_app(config, on_fatal=lambda: setattr(server, "should_exit", True))
    server = DeviceServer(uvicorn.Config(
        app, host=host, port=port, ws="none", lifespan="on", log_level="warning", access_log=False,
        timeout_graceful_shutdown=int(config.limits.shutdown_grace_s),
    ), tls_context(config), config.limits)
    crl_refresher = CrlRefresher(config)
    crl_refresher.start()
    try:
        server.run()
    finally:
        crl_refresher.stop(config.limits.shutdown_grace_s)
    if app.state.boot_error is not None:
        raise AgentError(f"could not start: {app.state.boot_error}")
