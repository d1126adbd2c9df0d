"""`st-agent serve`: the device API on uvicorn over TLS with optional client certificates.

Rules: the TLS context presents the device certificate and verifies any client certificate
against the fleet CA only (`CERT_OPTIONAL`: a handshake without a certificate succeeds, so
`/healthz` and completions work; a certificate of another CA fails the handshake); TLS 1.2 or
newer. The verified peer certificate of each connection is handed to the app through the ASGI
TLS extension (`scope["extensions"]["tls"]["client_cert_chain"]`, PEM), which the API's
management endpoints check for the operator role. SIGTERM/SIGINT shut down gracefully:
no new connections, in-flight requests get `shutdown_grace_s`, then the lifespan ends.
"""
from __future__ import annotations

import asyncio
import ssl

import uvicorn
from uvicorn.protocols.http.h11_impl import H11Protocol

from agent.api import create_app
from agent.config import DeviceConfig, parse_listen


def tls_context(config: DeviceConfig) -> ssl.SSLContext:
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    ctx.load_cert_chain(config.device_cert, config.device_key)
    ctx.load_verify_locations(cafile=str(config.ca_cert))
    ctx.verify_mode = ssl.CERT_OPTIONAL
    return ctx


class _WithPeerCert:
    """ASGI wrapper adding the connection's verified client certificate as the TLS extension."""

    def __init__(self, app, chain: list[str]):
        self.app, self.chain = app, chain

    async def __call__(self, scope, receive, send):
        if scope["type"] == "http":
            scope = {**scope, "extensions": {**scope.get("extensions", {}), "tls": {"client_cert_chain": self.chain}}}
        return await self.app(scope, receive, send)


class MutualTLSProtocol(H11Protocol):
    """h11 connections whose app sees the peer certificate (the handshake is done when this runs)."""

    def connection_made(self, transport: asyncio.Transport) -> None:
        super().connection_made(transport)
        ssl_object = transport.get_extra_info("ssl_object")
        der = ssl_object.getpeercert(binary_form=True) if ssl_object is not None else None
        self.app = _WithPeerCert(self.app, [ssl.DER_cert_to_PEM_cert(der)] if der else [])


def serve(config: DeviceConfig, listen: str) -> None:
    """Run the daemon until SIGTERM/SIGINT."""
    host, port = parse_listen(listen)
    context = tls_context(config)
    server = uvicorn.Server(uvicorn.Config(
        create_app(config), host=host, port=port, http=MutualTLSProtocol, ws="none", lifespan="on",
        ssl_context_factory=lambda _config, _default: context, log_level="warning", access_log=False,
        timeout_graceful_shutdown=int(config.limits.shutdown_grace_s), limit_concurrency=64,
    ))
    server.run()
