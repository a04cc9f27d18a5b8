"""How every long-running midbridge command treats signals: one place, one behaviour.

SIGTERM and SIGINT ask for a clean stop: intake stops, work in flight drains within the
deadline, then the rest is cancelled. SIGHUP is ignored with a log line: midbridge does
not reload its configuration in place (a half-applied config would be worse than none),
and a hang-up must never end a bridge without its drain, as Python's default does.
"""

from __future__ import annotations

import asyncio
import logging
import signal

STOP_SIGNALS = (signal.SIGTERM, signal.SIGINT)

log = logging.getLogger("midbridge.signals")


class StopSignals:
    """``with StopSignals() as stop: await stop.wait()``: set on SIGTERM/SIGINT."""

    def __init__(self, logger: logging.Logger | None = None) -> None:
        self._log = logger or log
        self._event = asyncio.Event()
        self._loop: asyncio.AbstractEventLoop | None = None

    def _hang_up(self) -> None:
        self._log.warning(
            "SIGHUP ignored: midbridge does not reload its configuration; "
            "restart it (SIGTERM drains work in flight) to apply a change"
        )

    def __enter__(self) -> asyncio.Event:
        self._loop = asyncio.get_running_loop()
        for sig in STOP_SIGNALS:
            self._loop.add_signal_handler(sig, self._event.set)
        self._loop.add_signal_handler(signal.SIGHUP, self._hang_up)
        return self._event

    def __exit__(self, *exc: object) -> None:
        if self._loop is None or self._loop.is_closed():
            return
        for sig in (*STOP_SIGNALS, signal.SIGHUP):
            self._loop.remove_signal_handler(sig)
        self._loop = None
