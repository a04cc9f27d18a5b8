"""The bridge's status: the retained status record, its statistics, and when they go out.

The record (shaped like ``ecc_agent``) is published retained on ``<prefix>/<agent>/status``
at start, every ``security.status_interval`` seconds, on every control verb, after a
reconnect (the last will may have turned it Down) and, as ``Down``, at stop.
"""

from __future__ import annotations

import asyncio
import logging
import socket
import time
from collections.abc import Callable, Coroutine
from typing import Any

import orjson

from bridge import __version__
from bridge.agent.config import Config
from bridge.agent.egress import Egress
from bridge.agent.identity import Identity
from bridge.agent.intake import Intake
from bridge.agent.scheduler import LANE_NAMES
from bridge.agent.store import StateStore
from bridge.wire.acks import PublishFailed
from bridge.wire.session import Publisher
from bridge.wire.topics import Topics

log = logging.getLogger("midbridge.bridge")

Spawn = Callable[[Coroutine[Any, Any, None], str], None]


class StatusReporter:
    """What the status record says, and publishing it on the ``out`` session."""

    def __init__(self, config: Config, topics: Topics, identity: Identity, intake: Intake) -> None:
        self.config = config
        self.topics = topics
        self.identity = identity
        self.intake = intake
        self.capabilities = sorted(intake.registry)  # the topics this bridge runs
        self.host = socket.gethostname()
        self.started_at = time.time()
        self.status = "Up"
        self.last_heartbeat: float | None = None
        self.refused = False  # the broker refused our status: publish no Down either
        self.store: StateStore | None = None
        self.egress: Egress | None = None
        self.out: Publisher | None = None

    def stats(self) -> dict[str, Any]:
        c = self.intake.counters
        scheduler = self.intake.scheduler
        return {
            "received": c.received,
            "processed": c.processed,
            "failed": c.failed,
            "duplicates": c.duplicates,
            "rejected": c.rejected,
            "errors_by_kind": dict(c.by_kind),
            "in_flight": self.intake.in_flight,
            "lanes_running": list(scheduler.lane_running),
            "lanes_waiting": list(scheduler.lane_waiting),
            "outbox_records": self.store.outbox_records if self.store is not None else 0,
            "published_records": self.egress.published_records if self.egress else 0,
            "uptime_s": round(time.time() - self.started_at, 3),
        }

    def status_record(self, status: str | None = None) -> dict[str, Any]:
        """The retained record on ``<prefix>/<agent>/status``, shaped like ``ecc_agent``."""
        stats = self.stats()
        return {
            "name": self.config.bridge.agent,
            "agent": self.config.bridge.agent_id,
            "host": self.host,
            "version": __version__,
            "status": status or self.status,
            "validated": self.identity.validated,
            "capabilities": self.capabilities,
            "public_key": self.identity.keys.public_b64,
            "fingerprint": self.identity.fingerprint,
            "started_at": self.started_at,
            "last_heartbeat": self.last_heartbeat,
            "updated_at": time.time(),
            "in_flight": stats["in_flight"],
            "lanes_running": dict(zip(LANE_NAMES, stats["lanes_running"], strict=True)),
            "lanes_waiting": dict(zip(LANE_NAMES, stats["lanes_waiting"], strict=True)),
            "outbox_records": stats["outbox_records"],
            "processed": stats["processed"],
            "failed": stats["failed"],
        }

    def last_will(self) -> tuple[str, bytes]:
        """What the broker publishes if we die: the retained status turns Down."""
        return self.topics.status, orjson.dumps(self.status_record(status="Down"))

    async def publish(self, status: str | None = None) -> None:
        assert self.out is not None
        body = orjson.dumps(self.status_record(status))
        await self.out.publish(self.topics.status, body, retain=True)

    async def run_loop(self) -> None:
        while True:
            await asyncio.sleep(self.config.security.status_interval)
            try:
                await self.publish()
            except Exception:
                log.warning("status publish failed", exc_info=True)

    def republisher(self, spawn: Spawn) -> Callable[[], None]:
        """After a reconnect (our will may have turned the status Down): say we are back."""

        def republish_after_reconnect() -> None:
            async def republish() -> None:
                try:
                    await self.publish()
                except PublishFailed as exc:
                    log.warning("status publish after reconnect failed: %s", exc)

            spawn(republish(), "status-after-reconnect")

        return republish_after_reconnect

    async def publish_down(self) -> None:
        if self.out is not None and self.out.connected.is_set() and not self.refused:
            try:
                async with asyncio.timeout(2.0):
                    await self.publish("Down")
            except (TimeoutError, PublishFailed) as exc:
                log.warning("could not publish the Down status: %s", exc)
