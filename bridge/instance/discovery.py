"""Discovery on the built-in instance, its entry points: :func:`start_run`,
:func:`cancel_run` (code), ``POST /api/midbridge/discovery/<schedule>/run`` and
``.../<status>/cancel`` (:func:`add_routes`; :func:`install` adds them and ties the engine
to the instance's life).

The run engine is ``bridge/instance/discovery_engine.py``, the planning (a schedule cut
into batches, a host's classify jobs) ``bridge/instance/discovery_plan.py``;
``docs/discovery.md`` is the reference.
"""

from __future__ import annotations

from collections.abc import Awaitable
from typing import TYPE_CHECKING, Any

import orjson
from aiohttp import web

from bridge.instance.api import (
    ApiError,
    authenticate,
    authenticator_of,
    json_object_body,
    to_wire,
)
from bridge.instance.app_keys import START_RUN
from bridge.instance.auth import AuthError
from bridge.instance.discovery_engine import (
    STATUSES,
    DiscoveryEngine,
    DiscoverySettings,
    EngineFactory,
    engine_for,
)
from bridge.instance.discovery_plan import (
    Attempt,
    DiscoveryError,
    Plan,
    attempts_for,
    cut_batches,
    make_plan,
    subtract,
)
from bridge.instance.discovery_xml import XmlDiscoveryEngine
from bridge.instance.store import TABLES, Record, Store

if TYPE_CHECKING:
    from bridge.instance.server import Instance

RUN_ROUTE = "/api/midbridge/discovery/{schedule}/run"
CANCEL_ROUTE = "/api/midbridge/discovery/{status}/cancel"


def _store_of(target: Instance | Store) -> Store:
    from bridge.instance.server import Instance

    return target.store if isinstance(target, Instance) else target


async def start_run(target: Instance | Store, schedule_sys_id: str) -> str:
    """Start a run of a ``discovery_schedule`` (sys_id, or name) on an instance or a store;
    returns the ``discovery_status`` sys_id. ``DiscoveryError`` if it cannot start."""
    return await engine_for(_store_of(target)).start_run(schedule_sys_id)


async def cancel_run(target: Instance | Store, status_sys_id: str) -> Record:
    """Cancel a run; returns its ``discovery_status`` record."""
    return await engine_for(_store_of(target)).cancel_run(status_sys_id)


# --- HTTP --------------------------------------------------------------------------------------


def add_routes(app: web.Application, engine: DiscoveryEngine) -> None:
    """``POST /api/midbridge/discovery/<schedule sys_id or name>/run`` → 201 with the new
    ``discovery_status``; ``POST /api/midbridge/discovery/<status sys_id>/cancel`` → 200.
    Role ``discovery_admin`` (or ``admin``); Basic authentication; a JSON body (``{}``), so
    that no cross-site form can start or stop a run (and a foreign ``Origin`` is refused by
    ``bridge.instance.api.origin_middleware``)."""
    authenticator = authenticator_of(app, engine.store)
    status_table = TABLES[STATUSES]

    def dumps(data: Any) -> str:
        return orjson.dumps(data).decode()

    async def allowed(request: web.Request, what: str) -> None:
        who = await authenticate(request, authenticator)
        if not who.has_any("discovery_admin"):
            raise AuthError(403, f"{what} requires role discovery_admin or admin")
        await json_object_body(request)

    async def answer(act: Awaitable[Record], status: int = 200) -> web.Response:
        try:
            row = await act
        except DiscoveryError as exc:
            raise ApiError(exc.status, exc.message) from None
        return web.json_response({"result": to_wire(status_table, row)}, status=status, dumps=dumps)

    async def started(schedule: str) -> Record:
        status_id = await engine.start_run(schedule)
        row = await engine.store.get(STATUSES, status_id)
        assert row is not None
        return row

    async def run(request: web.Request) -> web.Response:
        await allowed(request, "starting discovery")
        return await answer(started(request.match_info["schedule"]), 201)

    async def cancel(request: web.Request) -> web.Response:
        await allowed(request, "cancelling discovery")
        return await answer(engine.cancel_run(request.match_info["status"]))

    async def start(schedule_sys_id: str) -> str:
        try:
            return await start_run(engine.store, schedule_sys_id)
        except DiscoveryError as exc:
            raise ValueError(exc.message) from None

    app.router.add_post(RUN_ROUTE, run)
    app.router.add_post(CANCEL_ROUTE, cancel)
    app[START_RUN] = start  # the dashboard's Run button


def engine_factory(instance: Instance) -> EngineFactory | None:
    """The engine class for ``instance``'s mode: ServiceNow's ECC XML in compatibility mode
    (``bridge.instance.discovery_xml``), else midbridge's JSON wire (None: the default)."""
    return XmlDiscoveryEngine if instance.config.servicenow_compat else None


def install(instance: Instance, settings: DiscoverySettings | None = None) -> DiscoveryEngine:
    """Before ``async with instance``: the discovery routes, closing runs a previous process
    left unfinished (at start-up), and stopping the engine with the instance. In
    ServiceNow-compatibility mode (``InstanceConfig.servicenow_compat``) the engine speaks
    ServiceNow's ECC XML (``bridge.instance.discovery_xml``)."""
    engine = engine_for(instance.store, settings, engine_factory(instance))
    add_routes(instance.app, engine)

    async def on_startup(app: web.Application) -> None:
        await engine.recover()

    async def on_cleanup(app: web.Application) -> None:
        await engine.aclose()

    instance.app.on_startup.append(on_startup)
    instance.app.on_cleanup.append(on_cleanup)
    return engine


__all__ = [
    "CANCEL_ROUTE",
    "RUN_ROUTE",
    "Attempt",
    "DiscoveryEngine",
    "DiscoveryError",
    "DiscoverySettings",
    "Plan",
    "add_routes",
    "attempts_for",
    "cancel_run",
    "cut_batches",
    "engine_factory",
    "engine_for",
    "install",
    "make_plan",
    "start_run",
    "subtract",
]
