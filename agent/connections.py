"""Connection hygiene of the device API: no host can hold the server with idle or slow connections.

Rules:
- a TLS handshake finishes within `handshake_timeout_s`, or asyncio closes the socket;
- a connection is *idle* while it has no whole request waiting for its response: just after the
  handshake, after each response, and while a request's head or body is still arriving;
- every request arrives whole (request line, headers and body) within `request_timeout_s` of the
  connection becoming idle; bytes trickling in do not extend it (slowloris), so an idle connection
  lives at most that long;
- each client address keeps at most `max_idle_per_client` idle connections and the server at most
  `max_idle_connections`: a connection becoming idle over either cap closes the oldest idle one
  (of that address first), never a request in progress. A flood of idle connections therefore
  cannot refuse a newcomer that sends its request at once (operator, `/healthz`, an application):
  it only shortens how long the flood's own connections live;
- requests in progress are bounded elsewhere: completions by the admission queue (429), the rest
  need an operator certificate.
"""
from __future__ import annotations

import asyncio
from collections import OrderedDict
from typing import Protocol

from agent.config import Limits


class Closable(Protocol):
    def close_idle(self) -> None: ...


class IdleConnections:
    """The idle connections of one server, oldest first, per client address and in all."""

    def __init__(self, limits: Limits):
        self.limits = limits
        self._all: OrderedDict[Closable, str] = OrderedDict()
        self._by_client: dict[str, OrderedDict[Closable, None]] = {}
        self._timers: dict[Closable, asyncio.TimerHandle] = {}

    def idle(self, connection: Closable, client: str, loop: asyncio.AbstractEventLoop) -> None:
        """`connection` now waits for a request: its deadline starts, and the caps apply."""
        if connection in self._all:
            return
        self._all[connection] = client
        self._by_client.setdefault(client, OrderedDict())[connection] = None
        self._timers[connection] = loop.call_later(self.limits.request_timeout_s, self._expire, connection)
        mine = self._by_client[client]
        while len(mine) > self.limits.max_idle_per_client:
            self._expire(next(iter(mine)))
        while len(self._all) > self.limits.max_idle_connections:
            self._expire(next(iter(self._all)))

    def busy(self, connection: Closable) -> None:
        """`connection` has a whole request in progress (or is gone): no deadline, no cap."""
        client = self._all.pop(connection, None)
        if client is None:
            return
        self._timers.pop(connection).cancel()
        mine = self._by_client[client]
        del mine[connection]
        if not mine:
            del self._by_client[client]

    def _expire(self, connection: Closable) -> None:
        self.busy(connection)
        connection.close_idle()
