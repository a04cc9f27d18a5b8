"""A global probe-rate budget (probes per second) shared by every sweep.

A token bucket guarded by a lock, so the sweep engine may take tokens from its own thread
(``take``) as well as coroutines (``acquire``). A rate of 0 means unlimited.
"""

from __future__ import annotations

import asyncio
import threading
import time


class RateLimiter:
    def __init__(self, rate_per_s: float, *, burst: float | None = None) -> None:
        if rate_per_s < 0:
            raise ValueError("rate must be >= 0")
        self.rate = float(rate_per_s)
        self.burst = float(burst) if burst is not None else max(1.0, self.rate / 20.0)
        self._tokens = self.burst
        self._stamp = time.monotonic()
        self._lock = threading.Lock()

    @property
    def unlimited(self) -> bool:
        return self.rate == 0

    def take(self, wanted: int) -> tuple[int, float]:
        """Take up to ``wanted`` tokens now: (granted, seconds until the next token)."""
        if self.rate == 0:
            return wanted, 0.0
        with self._lock:
            now = time.monotonic()
            self._tokens = min(self.burst, self._tokens + (now - self._stamp) * self.rate)
            self._stamp = now
            granted = min(wanted, int(self._tokens))
            self._tokens -= granted
            wait = 0.0 if granted else (1.0 - self._tokens) / self.rate
            return granted, wait

    def refund(self, unused: int) -> None:
        """Give back tokens taken but not spent (never past the burst)."""
        if self.rate == 0 or unused <= 0:
            return
        with self._lock:
            self._tokens = min(self.burst, self._tokens + unused)

    def take_blocking(self, wanted: int) -> int:
        """For a worker thread: wait until at least one token is granted."""
        while True:
            granted, wait = self.take(wanted)
            if granted:
                return granted
            time.sleep(min(wait, 0.05))

    async def acquire(self, wanted: int = 1) -> int:
        """For a coroutine: wait until at least one token is granted; returns how many."""
        while True:
            granted, wait = self.take(wanted)
            if granted:
                return granted
            await asyncio.sleep(min(wait, 0.05))
