"""Building and running the built-in instance: store + Table API + hooks, one object.

::

    async with Instance(InstanceConfig(db=path, port=0)) as inst:
        inst.url                   # "http://127.0.0.1:<port>"
        inst.store                 # the Store (SQLiteStore): tables, queries, claims
        inst.on_insert("ecc_queue", on_ecc_insert)   # told at once of every committed insert
        inst.before_write("discovery_credentials", encrypt_secret)  # API writes only

Listeners (``on_change``/``on_insert``/``on_update``/``on_delete``) see every committed
write through the store, whoever made it (the Table API, the connector, discovery), on
the event loop, in commit order; they must not block (set an event, put to a queue, start
a task). They may be added before ``async with`` (then nothing is missed) or at any time.
``inst.app`` (aiohttp) may get more routes before ``async with`` only.
"""

from __future__ import annotations

import os
import ssl
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

from aiohttp import web

from bridge.instance import attachments, auth, compat
from bridge.instance.api import TABLE_API, ApiSettings, BeforeWrite, Hooks, make_app
from bridge.instance.dashboard import Dashboard, DashboardSettings
from bridge.instance.health import Health
from bridge.instance.metrics import ConnectorView, InstanceMetrics
from bridge.instance.mid_monitor import MonitorSettings
from bridge.instance.pg_store import store_for
from bridge.instance.store import Change, UnknownTable

ADMIN_PASSWORD_ENV = "MIDBRIDGE_ADMIN_PASSWORD"

Op = Literal["insert", "update", "delete"]
ChangeCallback = Callable[[Change], object]


@dataclass(frozen=True, slots=True)
class InstanceConfig:
    host: str = "127.0.0.1"
    port: int = 0  # 0: a free port (read it from Instance.url / .port)
    # a file path, ":memory:" for a throwaway instance, or a postgresql:// URL (pg_store.py)
    db: Path | str = ":memory:"
    admin_password: str | None = None  # first start only; else $MIDBRIDGE_ADMIN_PASSWORD
    api: ApiSettings = field(default_factory=ApiSettings)
    dashboard: DashboardSettings | None = field(default_factory=DashboardSettings)  # None: no UI
    ssl_context: ssl.SSLContext | None = None  # serve HTTPS (bridge/instance/tls.py); None: HTTP
    # ServiceNow-compatibility mode (bridge/instance/compat.py, docs/compat-mode.md): ECC
    # stored as ServiceNow would, its business rules, the MID Server Monitor every
    # ``mid_monitor_interval`` seconds (ServiceNow's scheduled job: 300).
    servicenow_compat: bool = False
    mid_monitor_interval: float = 300.0
    metrics_token: str | None = None  # /metrics needs Bearer <token>; None: open (metrics.py)


class Instance:
    """The built-in instance; an async context manager that serves while entered."""

    def __init__(self, config: InstanceConfig | None = None) -> None:
        self.config = config or InstanceConfig()
        self.store = store_for(self.config.db)  # SQLiteStore, or PGStore for postgresql://
        self.hooks = Hooks()
        dashboard = self.config.dashboard
        self.app = make_app(self.store, self.config.api, self.hooks, root_page=dashboard is None)
        # /metrics, the request log line (bridge/instance/metrics.py), /livez and /readyz.
        self.metrics = InstanceMetrics(self.store, token=self.config.metrics_token)
        self.app.middlewares.insert(0, self.metrics.middleware)
        self.metrics.add_routes(self.app)
        self.metrics.follow(self.store)
        self.health = Health(self.store)
        self.health.add_routes(self.app)
        # The web UI (bridge/instance/dashboard.py); None when InstanceConfig.dashboard is None.
        self.dashboard: Dashboard | None = None
        if dashboard is not None:
            self.dashboard = Dashboard(
                self.store, settings=dashboard, basic_page=self.app[TABLE_API].home_page
            )
            self.dashboard.add_routes(self.app)
        attachments.add_routes(self.app, self.store)  # ServiceNow's Attachment API
        if self.config.servicenow_compat:
            compat.install(
                self, compat.CompatSettings(MonitorSettings(self.config.mid_monitor_interval))
            )
        self.port = 0
        self.url = ""
        # The admin password generated on first start (None if given or not first start).
        self.generated_admin_password: str | None = None
        self._runner: web.AppRunner | None = None

    async def __aenter__(self) -> Instance:
        await self.store.__aenter__()
        try:
            password = self.config.admin_password or os.environ.get(ADMIN_PASSWORD_ENV) or None
            self.generated_admin_password = await auth.ensure_admin(self.store, password)
            runner = web.AppRunner(self.app, access_log=None)
            await runner.setup()
            self._runner = runner
            site = web.TCPSite(
                runner, self.config.host, self.config.port, ssl_context=self.config.ssl_context
            )
            await site.start()
        except BaseException:
            await self._stop()
            raise
        self.port = self.config.port
        for address in self._runner.addresses:  # the real port when 0 was asked for
            self.port = int(address[1])
            break
        host = self.config.host
        shown = f"[{host}]" if ":" in host else host
        scheme = "http" if self.config.ssl_context is None else "https"
        self.url = f"{scheme}://{shown}:{self.port}"
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self._stop()

    async def _stop(self) -> None:
        if self._runner is not None:
            await self._runner.cleanup()
            self._runner = None
        await self.store.close()

    def attach_connector(self, connector: ConnectorView) -> None:
        """The broker connector of this instance: its counters in /metrics, its session in
        /readyz (not ready while it is not connected)."""
        self.metrics.connector = connector
        self.health.expect_connector(connector)

    # --- hooks ------------------------------------------------------------------------------

    def on_change(
        self, callback: ChangeCallback, *, table: str | None = None, op: Op | None = None
    ) -> Callable[[], None]:
        """Call ``callback(change)`` for each committed write (of ``table``, of kind ``op``,
        when given). Returns a function that removes it."""
        if table is not None and table not in self.store.schema:  # built-in before open
            raise UnknownTable(table)

        def listener(change: Change) -> None:
            if (table is None or change.table == table) and (op is None or change.op == op):
                callback(change)

        return self.store.add_listener(listener)

    def on_insert(self, table: str, callback: ChangeCallback) -> Callable[[], None]:
        return self.on_change(callback, table=table, op="insert")

    def on_update(self, table: str, callback: ChangeCallback) -> Callable[[], None]:
        return self.on_change(callback, table=table, op="update")

    def on_delete(self, table: str, callback: ChangeCallback) -> Callable[[], None]:
        return self.on_change(callback, table=table, op="delete")

    def before_write(self, table: str, hook: BeforeWrite) -> Callable[[], None]:
        """Run ``hook`` on every Table API insert/update of ``table`` before it is stored
        (after access checks): it may change ``write.fields`` or refuse the write."""
        return self.hooks.add_before_write(table, hook)
