"""A job the instance runs every so many seconds (ServiceNow's scheduled jobs): the MID
Server Monitor (``mid_monitor.py``), the table cleaner (``table_cleaner.py``).

:class:`Periodic` runs ``work()`` at once, then every ``interval`` seconds measured from
each start, until stopped; a run that fails is logged and the next one goes as planned.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Awaitable, Callable
from typing import Any


class Periodic:
    """``start()`` / ``await stop()``: ``work`` every ``interval`` seconds, in one task."""

    def __init__(
        self,
        work: Callable[[], Awaitable[Any]],
        interval: Callable[[], float],
        *,
        name: str,
        logger: logging.Logger,
    ) -> None:
        self._work = work
        self._interval = interval  # read at each run: the settings may change meanwhile
        self._name = name
        self._log = logger
        self._task: asyncio.Task[None] | None = None

    def start(self) -> None:
        if self._task is None:
            self._task = asyncio.get_running_loop().create_task(self._run(), name=self._name)

    async def stop(self) -> None:
        task, self._task = self._task, None
        if task is not None:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task

    async def _run(self) -> None:
        while True:
            started = time.monotonic()
            try:
                await self._work()
            except asyncio.CancelledError:
                raise
            except Exception:
                self._log.exception("%s: a run failed", self._name)
            await asyncio.sleep(max(0.0, self._interval() - (time.monotonic() - started)))
