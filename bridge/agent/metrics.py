"""The bridge's HTTP side port: Prometheus ``/metrics``, ``/livez``, ``/readyz``, ``/healthz``.

- ``/livez``: the process is alive and its event loop answers (the handler runs on it).
  A broker outage never fails it: a liveness probe must not restart a bridge that is
  waiting for its broker.
- ``/readyz``: 200 when every broker session is connected and subscribed and the outbox
  takes writes (the last write succeeded, the outbox is below ``outbox_max_records``);
  503 otherwise, with the reasons. Before the bridge is up (waiting for the broker) 503.
- ``/healthz``: the counters as JSON, 200 or 503 as ``/readyz`` (kept from earlier
  versions).
- ``/metrics``: prometheus_client's exposition (``text/plain; version=0.0.4``): job
  counters and duration histograms per topic, lane gauges by lane name, the outbox, the
  broker sessions, ``midbridge_build_info`` and the process collectors.

The port is bound before the bridge connects (``BridgeSlot``): a port in use stops the
start at once, and ``/livez`` answers while the bridge waits for its broker.
"""

from __future__ import annotations

import time
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager
from typing import TYPE_CHECKING, Any

from aiohttp import web
from prometheus_client import (
    CONTENT_TYPE_LATEST,
    GC_COLLECTOR,
    PLATFORM_COLLECTOR,
    PROCESS_COLLECTOR,
    CollectorRegistry,
    Info,
    generate_latest,
)
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from bridge import __version__
from bridge.agent.scheduler import CONTROL_WORKERS, LANE_NAMES

if TYPE_CHECKING:
    from bridge.agent.bridge import Bridge


class BridgeSlot:
    """The bridge the endpoints describe: None until it is up; why it is not, meanwhile."""

    def __init__(self, bridge: Bridge | None = None) -> None:
        self.bridge = bridge
        self.waiting = "starting"  # what the bridge waits for while ``bridge`` is None
        self.started = time.monotonic()


def readiness(slot: BridgeSlot) -> list[str]:
    """Why the bridge is not ready (empty: ready)."""
    bridge = slot.bridge
    if bridge is None:
        return [slot.waiting]
    problems: list[str] = []
    for name, session in bridge.sessions().items():
        if not session.connected.is_set():
            problems.append(f"broker session {name}: not connected")
        elif not getattr(session, "subscribed", True):
            problems.append(f"broker session {name}: subscriptions not acknowledged")
    egress = getattr(bridge, "egress", None)
    if egress is None:
        problems.append("outbox: not open")
    else:
        if egress.write_error is not None:
            problems.append(f"outbox: last write failed: {egress.write_error}")
        if bridge.store.outbox_records >= egress.max_records:
            problems.append("outbox: full (limits.outbox_max_records)")
    if bridge.intake.accepting is False:
        problems.append("stopping")
    return problems


class _BridgeCollector(Collector):
    """Reads the bridge's state at scrape time (gauges and the counters it keeps)."""

    def __init__(self, slot: BridgeSlot) -> None:
        self.slot = slot

    def collect(self) -> Iterator[Metric]:
        bridge = self.slot.bridge
        ready = GaugeMetricFamily(
            "midbridge_ready", "1 when /readyz would answer 200 (connected, outbox writable)."
        )
        ready.add_metric([], 0.0 if readiness(self.slot) else 1.0)
        yield ready
        if bridge is None:
            return
        yield from bridge.counters.registry.collect()
        stats = bridge.stats()
        for name, help_text, key in (
            ("midbridge_records_received", "Output records received.", "received"),
            ("midbridge_duplicates", "Output records dropped as duplicates.", "duplicates"),
            ("midbridge_records_rejected", "Output records refused unread.", "rejected"),
            ("midbridge_records_published", "Input records the broker took.", "published_records"),
        ):
            counter = CounterMetricFamily(name, help_text)
            counter.add_metric([], float(stats[key]))
            yield counter
        in_flight = GaugeMetricFamily(
            "midbridge_jobs_in_flight", "Jobs accepted and not yet answered durably."
        )
        in_flight.add_metric([], float(stats["in_flight"]))
        yield in_flight
        workers = (*bridge.config.limits.lane_workers, CONTROL_WORKERS)
        for name, help_text, values in (
            ("midbridge_lane_running", "Jobs running, per lane.", stats["lanes_running"]),
            ("midbridge_lane_waiting", "Jobs waiting for a worker, per lane.",
             stats["lanes_waiting"]),
            ("midbridge_lane_workers", "Workers (the most jobs running at once), per lane.",
             workers),
        ):  # fmt: skip
            gauge = GaugeMetricFamily(name, help_text, labels=["lane"])
            for lane, value in zip(LANE_NAMES, values, strict=True):
                gauge.add_metric([lane], float(value))
            yield gauge
        outbox = GaugeMetricFamily(
            "midbridge_outbox_records", "Input records on disk waiting for the broker."
        )
        outbox.add_metric([], float(stats["outbox_records"]))
        yield outbox
        age = GaugeMetricFamily(
            "midbridge_outbox_oldest_age_seconds",
            "Age of the oldest record waiting in the outbox (0 when empty; records left "
            "by an earlier process count from this one's start).",
        )
        age.add_metric([], bridge.store.oldest_age())
        yield age
        connected = GaugeMetricFamily(
            "midbridge_broker_connected", "1 while the broker session is connected.",
            labels=["session"],
        )  # fmt: skip
        for name, session in bridge.sessions().items():
            connected.add_metric([name], 1.0 if session.connected.is_set() else 0.0)
        yield connected


def metrics_registry(slot: BridgeSlot) -> CollectorRegistry:
    """A registry of this bridge's own: its collector, build info, process collectors."""
    registry = CollectorRegistry(auto_describe=False)
    registry.register(_BridgeCollector(slot))
    Info("midbridge_build", "The midbridge version running.", registry=registry).info(
        {"version": __version__}
    )
    for collector in (PROCESS_COLLECTOR, PLATFORM_COLLECTOR, GC_COLLECTOR):
        registry.register(collector)
    return registry


def _health_body(slot: BridgeSlot, problems: list[str]) -> dict[str, Any]:
    bridge = slot.bridge
    body: dict[str, Any] = {"status": "ok" if not problems else "unavailable"}
    if problems:
        body["problems"] = problems
    if bridge is not None:
        body["agent"] = bridge.agent_id
        body["connected"] = all(s.connected.is_set() for s in bridge.sessions().values())
    return body


@asynccontextmanager
async def serve_metrics(target: Bridge | BridgeSlot, host: str, port: int) -> AsyncIterator[int]:
    """Serve the endpoints for the life of the context; yields the bound port.

    An ``OSError`` (the port in use, an address not on this host) comes out of entering.
    """
    slot = target if isinstance(target, BridgeSlot) else BridgeSlot(target)
    registry = metrics_registry(slot)

    async def livez(_request: web.Request) -> web.Response:
        return web.json_response(
            {"status": "ok", "uptime_s": round(time.monotonic() - slot.started, 3)}
        )

    async def readyz(_request: web.Request) -> web.Response:
        problems = readiness(slot)
        return web.json_response(_health_body(slot, problems), status=503 if problems else 200)

    async def healthz(_request: web.Request) -> web.Response:
        problems = readiness(slot)
        body = _health_body(slot, problems)
        if slot.bridge is not None:
            body.update(slot.bridge.stats())
        return web.json_response(body, status=503 if problems else 200)

    async def metrics(_request: web.Request) -> web.Response:
        return web.Response(
            body=generate_latest(registry),
            headers={"Content-Type": CONTENT_TYPE_LATEST, "X-Content-Type-Options": "nosniff"},
        )

    app = web.Application()
    app.router.add_get("/livez", livez)
    app.router.add_get("/readyz", readyz)
    app.router.add_get("/healthz", healthz)
    app.router.add_get("/metrics", metrics)
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    try:
        site = web.TCPSite(runner, host, port)
        await site.start()
    except BaseException:
        await runner.cleanup()
        raise
    bound = port
    for address in runner.addresses:  # the real port when 0 was asked for
        bound = int(address[1])
        break
    try:
        yield bound
    finally:
        await runner.cleanup()
