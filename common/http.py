"""What both HTTPS services (the device API, the fleet server) share at their edge.

Rules:
- every error is OpenAI's envelope `{"error": {"message", "type", "param", "code"}}`; a route
  raises `ApiError(status, message, kind, param)` for an error of its own making;
- answers are ASCII JSON with NaN refused (`AsciiJSONResponse`), so text from a request (a lone
  surrogate) always serialises and nothing non-standard goes out;
- the verified client certificate of a TLS connection reaches the app as the ASGI TLS extension
  (`client_cert_chain`, PEM), set per connection by `with_peer_certificate` once the handshake is
  over; an app reads it with `peer_chain(scope)`.
"""
from __future__ import annotations

import json
import ssl

from starlette.responses import JSONResponse


class ApiError(Exception):
    """An error a route answers with `status` and the envelope's `type` = `kind`."""

    def __init__(self, status: int, message: str, kind: str, param: str | None = None):
        super().__init__(message)
        self.status, self.kind, self.param = status, kind, param


class AsciiJSONResponse(JSONResponse):
    def render(self, content) -> bytes:
        return json.dumps(content, ensure_ascii=True, allow_nan=False, separators=(",", ":")).encode("ascii")


def envelope(message: str, kind: str, param: str | None = None, code: str | None = None) -> dict:
    return {"error": {"message": message, "type": kind, "param": param, "code": code}}


def error(status: int, message: str, kind: str, param: str | None = None, code: str | None = None,
          headers: dict | None = None) -> JSONResponse:
    return AsciiJSONResponse(envelope(message, kind, param, code), status_code=status, headers=headers)


def with_peer_certificate(app, ssl_object: ssl.SSLObject | None):
    """`app` (ASGI) seeing the connection's verified client certificate, if any, as its TLS extension."""
    der = ssl_object.getpeercert(binary_form=True) if ssl_object is not None else None
    chain = [ssl.DER_cert_to_PEM_cert(der)] if der else []

    async def app_with_certificate(scope, receive, send):
        if scope["type"] == "http":
            scope = {**scope, "extensions": {**scope.get("extensions", {}), "tls": {"client_cert_chain": chain}}}
        return await app(scope, receive, send)

    return app_with_certificate


def peer_chain(scope) -> list[str]:
    """The verified client certificate chain (PEM) of a request, empty without one."""
    return scope.get("extensions", {}).get("tls", {}).get("client_cert_chain") or []
