"""The instance's Prometheus metrics (``GET /metrics``) and its request log line.

Everything goes through ``prometheus_client`` in a registry of the instance's own (two
instances in one process never share series):

- ``midbridge_instance_http_requests_total{method,route,status}``: requests answered, by
  route *template* (``/api/now/table/{table}``, never a sys_id) and status class (``2xx``);
  ``midbridge_instance_http_request_duration_seconds{method,route}``: a histogram.
- ``midbridge_instance_ecc_queue_depth{state,agent}``: output records not yet answered
  (``ready``, ``processing``), counted at scrape time with one grouped count over the
  ``ecc_queue`` index; at most :data:`MAX_AGENT_SERIES` agents, the rest summed as
  ``agent="_other"``.
- ``midbridge_instance_agents{status}``: ``ecc_agent`` rows by status (counted at scrape).
- ``midbridge_instance_discovery_runs_total{event}``: runs ``started``, ``completed``,
  ``failed`` (ended in Error), ``cancelled``, since the process started;
  ``midbridge_instance_discovery_runs_active``: runs not finished (at scrape).
- ``midbridge_instance_connector_records_total{event}``: the connector's counters
  (``pushed``, ``inputs``, ``refused_inputs``, ``dead_letters`` ...; docs/operations.md);
  ``midbridge_instance_connector_connected``: 1 while its broker session is up.
- ``midbridge_instance_table_cleaner_deleted_total{table}``: records the table cleaner
  deleted (``bridge.instance.table_cleaner``), since the process started.
- ``midbridge_instance_build_info{version}`` and the process collector's
  ``process_*`` series (CPU, memory, open files) and ``python_info``.

The exposition is ``text/plain; version=0.0.4`` (prometheus_client's own
``CONTENT_TYPE_LATEST``). ``/metrics`` is open, as Prometheus scrapes expect; with a
token (``midbridge instance --metrics-token`` / ``$MIDBRIDGE_INSTANCE_METRICS_TOKEN``) it
needs ``Authorization: Bearer <token>`` (Prometheus' ``authorization`` scrape setting).
"""

from __future__ import annotations

import asyncio
import hmac
import logging
import time
from collections.abc import Awaitable, Callable, Iterator, Mapping
from typing import Protocol

from aiohttp import web
from prometheus_client import (
    CONTENT_TYPE_LATEST,
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    PlatformCollector,
    ProcessCollector,
    generate_latest,
)
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from bridge import __version__
from bridge.instance.store import Change, Store

log = logging.getLogger("midbridge.instance.http")

METRICS_ROUTE = "/metrics"
METRICS_TOKEN_ENV = "MIDBRIDGE_INSTANCE_METRICS_TOKEN"
MAX_AGENT_SERIES = 200  # agents with a series of their own in the ECC depth gauge
SCRAPE_QUERY_TIMEOUT = 5.0  # seconds the store may take for the scrape-time counts
LIVE_STATES = ("ready", "processing")  # an output not yet answered
METHODS = frozenset({"GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS"})
# Requests logged at DEBUG only: probes and scrapes every few seconds would drown the log.
QUIET_ROUTES = frozenset(
    {"/livez", "/readyz", METRICS_ROUTE, "/static/{name}", "/discovery/runs.json"}
)
REFUSED = frozenset({401, 403, 429})
LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)
DISCOVERY_STATES = {"Completed": "completed", "Error": "failed", "Cancelled": "cancelled"}


def version() -> str:
    """The installed distribution's version (pyproject.toml's, the one version source)."""
    return __version__


class _Stats(Protocol):
    def as_dict(self) -> dict[str, int]: ...


class _Session(Protocol):
    @property
    def connected(self) -> asyncio.Event: ...


class ConnectorView(Protocol):
    """What the metrics and readiness read of a ``Connector`` (bridge/instance/connector.py)."""

    @property
    def stats(self) -> _Stats: ...

    @property
    def session(self) -> _Session: ...

    @property
    def running(self) -> bool: ...


class _ConnectorCollector(Collector):
    def __init__(self, owner: InstanceMetrics) -> None:
        self.owner = owner

    def collect(self) -> Iterator[Metric]:
        connector = self.owner.connector
        if connector is None:
            return
        counters = CounterMetricFamily(
            "midbridge_instance_connector_records",
            "ECC records the connector handled, by event (pushed, inputs, refused_inputs ...)",
            labels=["event"],
        )
        for event, value in sorted(connector.stats.as_dict().items()):
            counters.add_metric([event], value)
        yield counters
        connected = connector.running and connector.session.connected.is_set()
        yield GaugeMetricFamily(
            "midbridge_instance_connector_connected",
            "1 while the connector's broker session is up",
            value=1.0 if connected else 0.0,
        )


class InstanceMetrics:
    """The instance's registry, its request middleware and the ``/metrics`` handler."""

    def __init__(self, store: Store, *, token: str | None = None) -> None:
        self.store = store
        self.token = token or None
        self.connector: ConnectorView | None = None
        self.registry = CollectorRegistry(auto_describe=True)
        ProcessCollector(registry=self.registry)
        PlatformCollector(registry=self.registry)
        reg = self.registry
        self.requests = Counter(
            "midbridge_instance_http_requests",
            "HTTP requests answered, by method, route template and status class",
            ["method", "route", "status"],
            registry=reg,
        )
        self.latency = Histogram(
            "midbridge_instance_http_request_duration_seconds",
            "Time to answer an HTTP request, by method and route template",
            ["method", "route"],
            buckets=LATENCY_BUCKETS,
            registry=reg,
        )
        self.ecc_depth = Gauge(
            "midbridge_instance_ecc_queue_depth",
            "ECC output records not yet answered, by state and agent (counted at scrape)",
            ["state", "agent"],
            registry=reg,
        )
        self.agents = Gauge(
            "midbridge_instance_agents",
            "MID agents (ecc_agent rows) by status (counted at scrape)",
            ["status"],
            registry=reg,
        )
        self.discovery_runs = Counter(
            "midbridge_instance_discovery_runs",
            "Discovery runs started, completed, failed (Error) and cancelled",
            ["event"],
            registry=reg,
        )
        for event in ("started", *DISCOVERY_STATES.values()):
            self.discovery_runs.labels(event)  # present at 0 from the start
        self.discovery_active = Gauge(
            "midbridge_instance_discovery_runs_active",
            "Discovery runs not finished (counted at scrape)",
            registry=reg,
        )
        self.table_cleaner_deleted = Counter(
            "midbridge_instance_table_cleaner_deleted",
            "Records the table cleaner deleted (sys_auto_flush rules), by table",
            ["table"],
            registry=reg,
        )
        build = Gauge(
            "midbridge_instance_build_info",
            "The running midbridge version (always 1)",
            ["version"],
            registry=reg,
        )
        build.labels(version()).set(1)
        reg.register(_ConnectorCollector(self))
        self._scrape_lock = asyncio.Lock()

    # --- wiring -------------------------------------------------------------------------

    def add_routes(self, app: web.Application) -> None:
        app.router.add_get(METRICS_ROUTE, self.handle)

    def follow(self, store: Store) -> Callable[[], None]:
        """Count discovery runs from the store's committed writes."""
        return store.add_listener(self._on_change)

    def table_cleaned(self, table: str, count: int) -> None:
        """The table cleaner's ``on_deleted`` (bridge/instance/table_cleaner.py)."""
        self.table_cleaner_deleted.labels(table).inc(count)

    def _on_change(self, change: Change) -> None:
        if change.table != "discovery_status":
            return
        if change.op == "insert":
            self.discovery_runs.labels("started").inc()
        state = str(change.record.get("state") or "")
        before = str((change.previous or {}).get("state") or "")
        if state in DISCOVERY_STATES and state != before and change.op != "delete":
            self.discovery_runs.labels(DISCOVERY_STATES[state]).inc()

    # --- the request middleware: a counter, a histogram and one log line ------------------

    @web.middleware
    async def middleware(
        self, request: web.Request, handler: Callable[[web.Request], Awaitable[web.StreamResponse]]
    ) -> web.StreamResponse:
        started = time.perf_counter()
        status = 500
        try:
            response = await handler(request)
            status = response.status
            return response
        except web.HTTPException as exc:
            status = exc.status
            raise
        finally:
            self._observe(request, status, time.perf_counter() - started)

    def _observe(self, request: web.Request, status: int, seconds: float) -> None:
        route = route_template(request)
        method = request.method if request.method in METHODS else "other"
        self.requests.labels(method, route, f"{status // 100}xx").inc()
        self.latency.labels(method, route).observe(seconds)
        if status in REFUSED:
            level = logging.WARNING
        elif route in QUIET_ROUTES:
            level = logging.DEBUG
        else:
            level = logging.INFO
        if log.isEnabledFor(level):
            # The path only: no query string (filters, values), no body, no header.
            log.log(
                level,
                "%s %s %d %.1f ms from %s%s",
                method,
                request.rel_url.path[:200],
                status,
                seconds * 1000,
                request.remote or "-",
                " (refused)" if status in REFUSED else "",
            )

    # --- /metrics -----------------------------------------------------------------------

    async def handle(self, request: web.Request) -> web.Response:
        if self.token is not None:
            given = request.headers.get("Authorization", "")
            scheme, _, value = given.partition(" ")
            if scheme.lower() != "bearer" or not hmac.compare_digest(
                value.strip().encode(), self.token.encode()
            ):
                return web.Response(
                    status=401,
                    text="/metrics needs Authorization: Bearer <the metrics token>\n",
                    headers={"WWW-Authenticate": 'Bearer realm="metrics"'},
                )
        async with self._scrape_lock:  # one scrape's counts at a time
            try:
                async with asyncio.timeout(SCRAPE_QUERY_TIMEOUT):
                    await self._count()
            except Exception as exc:  # the counts go stale; the rest is still served
                log.warning("metrics: counting from the store failed: %s: %s",
                            type(exc).__name__, str(exc)[:200])  # fmt: skip
            body = generate_latest(self.registry)
        return web.Response(body=body, headers={"Content-Type": CONTENT_TYPE_LATEST})

    async def _count(self) -> None:
        live = "queue=output^stateIN" + ",".join(LIVE_STATES)
        groups = await self.store.aggregate("ecc_queue", live, group_by=["state", "agent"])
        depth: dict[tuple[str, ...], float] = {}
        ranked = sorted(groups, key=lambda g: -(g.count or 0))
        agents_seen: set[str] = set()
        for group in ranked:
            agent = str(group.group.get("agent") or "")
            if agent not in agents_seen and len(agents_seen) >= MAX_AGENT_SERIES:
                agent = "_other"
            else:
                agents_seen.add(agent)
            key = (str(group.group.get("state") or ""), agent)
            depth[key] = depth.get(key, 0.0) + float(group.count or 0)
        _replace(self.ecc_depth, depth)
        statuses = await self.store.aggregate("ecc_agent", group_by=["status"])
        _replace(
            self.agents,
            {(str(g.group.get("status") or "Down"),): float(g.count or 0) for g in statuses},
        )
        active = await self.store.count(
            "discovery_status", "stateNOT IN" + ",".join(DISCOVERY_STATES)
        )
        self.discovery_active.set(active)


def _replace(gauge: Gauge, values: Mapping[tuple[str, ...], float]) -> None:
    """Set a labelled gauge to exactly ``values`` (series no longer present go away)."""
    gauge.clear()
    for labels, value in values.items():
        gauge.labels(*labels).set(value)


def route_template(request: web.Request) -> str:
    """The matched route's template (bounded label values), ``"unmatched"`` for a 404."""
    info = request.match_info
    route = getattr(info, "route", None)
    resource = getattr(route, "resource", None)
    if resource is None:
        return "unmatched"
    canonical = str(resource.canonical)
    return canonical if canonical else "unmatched"


__all__ = [
    "MAX_AGENT_SERIES",
    "METRICS_ROUTE",
    "METRICS_TOKEN_ENV",
    "ConnectorView",
    "InstanceMetrics",
    "route_template",
    "version",
]
