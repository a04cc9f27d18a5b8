"""What the instance's parts leave for each other on its aiohttp app (``app[KEY]``), so that
none of them has to import another: discovery leaves its ``start_run``, the dashboard
takes it at start-up for its Run button."""

from __future__ import annotations

from collections.abc import Awaitable, Callable

from aiohttp import web

StartRun = Callable[[str], Awaitable[str]]
"""``await start_run(schedule_sys_id)`` → the new ``discovery_status`` sys_id; raises
``ValueError`` / ``LookupError`` (its text is shown to the admin) to refuse."""

START_RUN: web.AppKey[StartRun] = web.AppKey("midbridge_start_run")
"""Set by ``bridge.instance.discovery.add_routes``: start a run of a schedule."""
