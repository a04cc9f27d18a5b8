"""The instance's health endpoints, without authentication (they say nothing secret):

- ``GET /livez``: 200 ``ok`` while the process answers HTTP at all. A liveness probe: it
  never looks at the database or the broker, so an outage of either never gets the
  instance restarted (a restart would not mend them).
- ``GET /readyz``: 200 when the instance can do its work: the store answers a count
  within :data:`READY_TIMEOUT` seconds, and, when a broker is configured, the connector's
  session is connected. Else 503. The body is JSON, one entry per check
  (``{"status": "ready", "checks": {"store": "ok", "connector": "connected"}}``).
  A readiness probe (Kubernetes takes the pod out of its Service meanwhile) and compose's
  health check.
"""

from __future__ import annotations

import asyncio

import orjson
from aiohttp import web

from bridge.instance.metrics import ConnectorView
from bridge.instance.store import Store

LIVE_ROUTE = "/livez"
READY_ROUTE = "/readyz"
READY_TIMEOUT = 2.0


class Health:
    """``/livez`` and ``/readyz`` of one instance; :meth:`expect_connector` when a broker
    is configured (readiness then waits for its session)."""

    def __init__(self, store: Store) -> None:
        self.store = store
        self.connector: ConnectorView | None = None
        self.broker_configured = False

    def expect_connector(self, connector: ConnectorView) -> None:
        self.broker_configured = True
        self.connector = connector

    def add_routes(self, app: web.Application) -> None:
        app.router.add_get(LIVE_ROUTE, self.livez)
        app.router.add_get(READY_ROUTE, self.readyz)

    async def livez(self, request: web.Request) -> web.Response:
        return web.Response(text="ok\n", headers={"Cache-Control": "no-store"})

    async def checks(self) -> dict[str, str]:
        found: dict[str, str] = {}
        try:
            async with asyncio.timeout(READY_TIMEOUT):
                await self.store.count("sys_user")
            found["store"] = "ok"
        except TimeoutError:
            found["store"] = f"no answer within {READY_TIMEOUT:g} s"
        except Exception as exc:
            found["store"] = f"error: {type(exc).__name__}"
        if self.broker_configured:
            connector = self.connector
            up = (
                connector is not None and connector.running and connector.session.connected.is_set()
            )
            found["connector"] = "connected" if up else "not connected to the broker"
        return found

    async def readyz(self, request: web.Request) -> web.Response:
        found = await self.checks()
        ready = all(v in ("ok", "connected") for v in found.values())
        body = {"status": "ready" if ready else "not ready", "checks": found}
        return web.Response(
            body=orjson.dumps(body),
            status=200 if ready else 503,
            content_type="application/json",
            headers={"Cache-Control": "no-store"},
        )


__all__ = ["LIVE_ROUTE", "READY_ROUTE", "Health"]
