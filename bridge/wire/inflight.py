"""Counting the message handlers that are running, so that a stop can wait for them."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Iterator


class InFlight:
    """Handlers running now: ``with inflight.track():`` around each one; ``await
    inflight.drain(timeout)`` waits (at most ``timeout`` seconds) until none is."""

    def __init__(self) -> None:
        self._running = 0
        self._idle = asyncio.Event()

    @property
    def running(self) -> int:
        return self._running

    @contextlib.contextmanager
    def track(self) -> Iterator[None]:
        self._running += 1
        self._idle.clear()
        try:
            yield
        finally:
            self._running -= 1
            if not self._running:
                self._idle.set()

    async def drain(self, timeout: float) -> None:
        if self._running:
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(timeout):
                    await self._idle.wait()
