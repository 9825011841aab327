"""Connection limits of the HTTP server that uvicorn does not have: a client must send a request's
headers within HEADER_TIMEOUT_S of connecting (or of its previous response), else the connection is
closed. uvicorn's keep-alive timeout covers an idle kept-alive connection but not a new one that
sends nothing or sends its headers slowly; the body's deadline is the app's (app.BODY_TIMEOUT_S).
"""

from __future__ import annotations

import asyncio

from uvicorn.protocols.http.h11_impl import H11Protocol

HEADER_TIMEOUT_S = 10.0
KEEP_ALIVE_S = 5  # idle kept-alive connections (uvicorn's own timer)


class ReapingH11Protocol(H11Protocol):
    """uvicorn's h11 protocol plus a header deadline; never closes a connection with a request in flight."""

    header_timeout_s = HEADER_TIMEOUT_S

    def connection_made(self, transport: asyncio.Transport) -> None:  # pyright: ignore[reportIncompatibleMethodOverride]
        super().connection_made(transport)
        self._reaper: asyncio.TimerHandle | None = None
        self._arm()

    def on_response_complete(self) -> None:
        self._arm()  # before super(): a pipelined next request starts there and disarms it
        super().on_response_complete()

    def handle_events(self) -> None:
        super().handle_events()
        if self.cycle is not self._armed_for and self._reaper is not None:  # a request's headers arrived
            self._reaper.cancel()
            self._reaper = None

    def connection_lost(self, exc: Exception | None) -> None:
        if self._reaper is not None:
            self._reaper.cancel()
        super().connection_lost(exc)

    def _arm(self) -> None:
        if self._reaper is not None:
            self._reaper.cancel()
        self._armed_for = self.cycle
        self._reaper = self.loop.call_later(self.header_timeout_s, self._reap)

    def _reap(self) -> None:
        self._reaper = None
        idle = self.cycle is None or self.cycle.response_complete
        if self.cycle is self._armed_for and idle and not self.transport.is_closing():
            self.transport.close()
