"""``/healthz`` and Prometheus ``/metrics`` for a running bridge (aiohttp)."""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import TYPE_CHECKING, Any

from aiohttp import web

if TYPE_CHECKING:
    from bridge.agent.bridge import Bridge


def prometheus_text(bridge: Bridge) -> str:
    """The bridge's counters in the Prometheus text exposition format."""
    stats = bridge.stats()

    def one(key: str) -> list[tuple[str, Any]]:
        return [("", stats[key])]

    def per_lane(key: str) -> list[tuple[str, Any]]:
        return [(f'{{lane="{i}"}}', n) for i, n in enumerate(stats[key])]

    metrics: list[tuple[str, str, str, list[tuple[str, Any]]]] = [
        ("records_received_total", "counter", "Output records received.", one("received")),
        ("jobs_processed_total", "counter", "Jobs answered with a result.", one("processed")),
        (
            "jobs_failed_total",
            "counter",
            "Jobs answered with an error record, by kind.",
            [(f'{{kind="{k}"}}', v) for k, v in sorted(stats["errors_by_kind"].items())]
            or [('{kind="none"}', 0)],
        ),
        (
            "duplicates_total",
            "counter",
            "Output records dropped as duplicates by sys_id.",
            one("duplicates"),
        ),
        (
            "jobs_in_flight",
            "gauge",
            "Jobs accepted and not yet answered durably.",
            one("in_flight"),
        ),
        ("lane_running", "gauge", "Jobs running per priority lane.", per_lane("lanes_running")),
        (
            "lane_waiting",
            "gauge",
            "Jobs waiting for a worker per priority lane.",
            per_lane("lanes_waiting"),
        ),
        (
            "outbox_records",
            "gauge",
            "Input records on disk waiting to be published.",
            one("outbox_records"),
        ),
        (
            "records_published_total",
            "counter",
            "Input records the broker acknowledged.",
            one("published_records"),
        ),
        (
            "probe_duration_seconds_total",
            "counter",
            "Time spent in probes, by topic.",
            [
                (f'{{topic="{t}"}}', round(v, 6))
                for t, v in sorted(bridge.counters.probe_seconds.items())
            ]
            or [('{topic="none"}', 0)],
        ),
        (
            "broker_connected",
            "gauge",
            "1 while the session is connected.",
            [
                (f'{{session="{name}"}}', int(s.connected.is_set()))
                for name, s in bridge.sessions().items()
            ],
        ),
    ]
    lines: list[str] = []
    for name, kind, help_text, samples in metrics:
        lines.append(f"# HELP midbridge_{name} {help_text}")
        lines.append(f"# TYPE midbridge_{name} {kind}")
        lines.extend(f"midbridge_{name}{labels} {value}" for labels, value in samples)
    return "\n".join(lines) + "\n"


@asynccontextmanager
async def serve_metrics(bridge: Bridge, host: str, port: int) -> AsyncIterator[int]:
    """Serve the endpoints for the life of the context; yields the bound port."""

    async def healthz(_request: web.Request) -> web.Response:
        connected = all(s.connected.is_set() for s in bridge.sessions().values())
        body = {
            "status": "ok" if connected else "degraded",
            "agent": bridge.agent_id,
            "connected": connected,
            **bridge.stats(),
        }
        return web.json_response(body, status=200 if connected else 503)

    async def metrics(_request: web.Request) -> web.Response:
        return web.Response(
            text=prometheus_text(bridge),
            content_type="text/plain",
            charset="utf-8",
            headers={"X-Content-Type-Options": "nosniff"},
        )

    app = web.Application()
    app.router.add_get("/healthz", healthz)
    app.router.add_get("/metrics", metrics)
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    site = web.TCPSite(runner, host, port)
    await site.start()
    bound = port
    for address in runner.addresses:  # the real port when 0 was asked for
        bound = int(address[1])
        break
    try:
        yield bound
    finally:
        await runner.cleanup()
