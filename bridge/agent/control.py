"""The control handle: what HeartbeatProbe and SystemCommand may ask of the bridge.

Implements ``probes.contract.Control``: pause, resume and drain intake, cancel a job,
validate or invalidate this MID's key, record a heartbeat, and report stats and status.
"""

from __future__ import annotations

import logging
import time
from typing import Any

from bridge.agent.identity import Identity
from bridge.agent.intake import Intake
from bridge.agent.scheduler import CONTROL_LANE
from bridge.agent.status import Spawn, StatusReporter

log = logging.getLogger("midbridge.bridge")


class BridgeControl:
    """The bridge's control verbs; each one publishes the status it leads to."""

    def __init__(
        self, intake: Intake, status: StatusReporter, identity: Identity, spawn: Spawn
    ) -> None:
        self.intake = intake
        self.reporter = status
        self.identity = identity
        self.spawn = spawn  # runs a service task until the bridge stops

    def status_record(self) -> dict[str, Any]:
        return self.reporter.status_record()

    def stats(self) -> dict[str, Any]:
        return self.reporter.stats()

    async def _set_status(self, status: str) -> None:
        self.reporter.status = status
        await self.reporter.publish()

    async def pause(self) -> None:
        self.intake.open.clear()
        await self._set_status("Paused")

    async def resume(self) -> None:
        self.intake.open.set()
        await self._set_status("Up")

    async def drain(self) -> None:
        """Take nothing new; report Drained once the work in flight is done."""
        self.intake.open.clear()
        await self._set_status("Draining")
        self.spawn(self._finish_drain(), "drain")

    async def _finish_drain(self) -> None:
        running = self.intake.scheduler.running
        while any(job.lane != CONTROL_LANE for job in running.values()):
            await self.intake.wait_job_ended()
        if self.reporter.status == "Draining":
            await self._set_status("Drained")

    def cancel(self, sys_id: str) -> bool:
        return self.intake.scheduler.cancel(sys_id)

    async def validate(self, fingerprint: str) -> None:
        self.identity.validate(fingerprint)
        log.info("key %s validated", fingerprint[:16])
        await self.reporter.publish()

    async def invalidate(self) -> None:
        self.identity.invalidate()
        log.warning(
            "key pair dropped and remade; not validated (new key %s)",
            self.identity.fingerprint[:16],
        )
        await self.reporter.publish()

    async def heartbeat(self) -> None:
        self.reporter.last_heartbeat = time.time()
        await self.reporter.publish()
