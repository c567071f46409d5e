"""uvicorn, configured from the serve config: connection limits and timeouts.

uvicorn closes idle keep-alive connections (``keep_alive_s``) and answers 503 past
``limit_concurrency`` (``max_connections``), but a connection that never completes a
request head -- opened and left idle, or a head sent a byte at a time -- is held
forever. ``HeadTimeoutProtocol`` closes such a connection ``header_timeout_s`` after it
opened or after its previous response. The body's own deadline is
``serve.guards.RequestGuard``'s.
"""

from __future__ import annotations

import asyncio

import uvicorn
from uvicorn.protocols.http.h11_impl import H11Protocol

from serve.limits import ServiceLimits


class HeadTimeoutProtocol(H11Protocol):
    """uvicorn's h11 protocol with a deadline for each request head."""

    header_timeout_s: float = ServiceLimits.header_timeout_s

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        self._head_cycle = None
        self._head_timer: asyncio.TimerHandle | None = None
        self._arm_head_timer()

    def data_received(self, data: bytes) -> None:
        super().data_received(data)
        self._note_head()

    def on_response_complete(self) -> None:
        super().on_response_complete()
        if not self.transport.is_closing() and not self._note_head():
            self._arm_head_timer()  # waiting for the next request's head

    def connection_lost(self, exc: Exception | None) -> None:
        self._cancel_head_timer()
        super().connection_lost(exc)

    def _note_head(self) -> bool:
        """True (and the timer stopped) when a new request's head has been parsed."""
        if self.cycle is not None and self.cycle is not self._head_cycle:
            self._head_cycle = self.cycle
            self._cancel_head_timer()
            return True
        return False

    def _arm_head_timer(self) -> None:
        self._cancel_head_timer()
        self._head_timer = self.loop.call_later(self.header_timeout_s, self._head_timed_out)

    def _cancel_head_timer(self) -> None:
        if self._head_timer is not None:
            self._head_timer.cancel()
            self._head_timer = None

    def _head_timed_out(self) -> None:
        self._head_timer = None
        if not self.transport.is_closing():
            self.transport.close()


def uvicorn_config(app, limits: ServiceLimits, host: str, port: int, **options) -> uvicorn.Config:
    """A ``uvicorn.Config`` for ``app`` with the limits and timeouts of ``limits``."""
    protocol = type(
        "HeadTimeoutProtocol", (HeadTimeoutProtocol,), {"header_timeout_s": limits.header_timeout_s}
    )
    return uvicorn.Config(
        app,
        host=host,
        port=port,
        http=protocol,
        limit_concurrency=limits.max_connections,
        timeout_keep_alive=limits.keep_alive_s,
        **options,
    )
