"""The MID Server Monitor, as ServiceNow documents it (compatibility mode only).

"ServiceNow instances send a synthetic transaction via the Heartbeat probe to every MID
Server every 5 minutes ... If the instance does not detect a response from a MID Server,
the instance marks that MID Server as Down" (MID Server heartbeat). Each cycle does what
the ``MonitorMIDServer`` script include's ``monitor()`` does, in its order:

1. ``killOldRequests``: HeartbeatProbe outputs of earlier cycles still ``ready`` are
   closed (``error``), so they do not pile up while a MID is down;
2. ``markDowners``: a MID that is Up and neither answered the previous cycle's heartbeat
   nor refreshed its record (``last_refreshed``) since it was sent is marked Down;
3. ``sendHeartbeatRequests``: a HeartbeatProbe output (priority 0, interactive) to every
   MID that is Up or Paused, and the time noted.

So a MID that stops without saying so goes Down at most two intervals after its last
sign of life. The interval is a setting (``MonitorSettings.interval``, 300 s by default
as ServiceNow's scheduled job) so tests run in seconds.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any

from bridge.instance.auth import AGENT_PREFIX
from bridge.instance.periodic import Periodic
from bridge.instance.query import escape
from bridge.instance.store import Store
from bridge.wire.records import new_sys_id, now_text

log = logging.getLogger("midbridge.instance.mid_monitor")

HEARTBEAT = "HeartbeatProbe"
HEARTBEAT_PAYLOAD = '<parameters><parameter name="skip_sensor" value="true"/></parameters>'
MONITORED = ("Up", "Paused")


@dataclass(frozen=True, slots=True)
class MonitorSettings:
    interval: float = 300.0  # ServiceNow's "MID Server Monitor" scheduled job: 5 minutes

    def __post_init__(self) -> None:
        if not self.interval > 0:
            raise ValueError(f"mid monitor interval: expected seconds > 0, not {self.interval!r}")


class MidMonitor:
    def __init__(self, store: Store, settings: MonitorSettings | None = None) -> None:
        self.store = store
        self.settings = settings or MonitorSettings()
        self.sent: dict[str, tuple[str, str]] = {}  # agent name → (output sys_id, sent at)
        self.cycles = 0
        self._loop = Periodic(
            self.cycle, lambda: self.settings.interval, name="MID Server Monitor", logger=log
        )

    def start(self) -> None:
        self._loop.start()

    async def stop(self) -> None:
        await self._loop.stop()

    async def cycle(self) -> None:
        """One monitor cycle: kill old requests, mark downers, send heartbeats."""
        await self.kill_old_requests()
        await self.mark_downers()
        await self.send_heartbeats()
        self.cycles += 1

    async def kill_old_requests(self) -> None:
        await self.store.update_query(
            "ecc_queue",
            f"queue=output^topic={HEARTBEAT}^state=ready",
            {"state": "error", "error_string": "cancelled: no answer before the next heartbeat",
             "processed": now_text()},
        )  # fmt: skip

    async def mark_downers(self) -> None:
        for row in await self.store.query("ecc_agent", "status=Up"):
            name = str(row.get("name") or "")
            sent = self.sent.get(name)
            if sent is None:
                continue
            output, at = sent
            if str(row.get("last_refreshed") or "") >= at:
                continue
            answers = await self.store.count(
                "ecc_queue", f"queue=input^response_to={escape(output)}"
            )
            if answers:
                continue
            marked = await self.store.update_query(
                "ecc_agent", f"sys_id={escape(row['sys_id'])}^status=Up", {"status": "Down"}
            )
            if marked:
                log.warning("MID Server %s did not answer the heartbeat sent at %s: Down",
                            name, at)  # fmt: skip

    async def send_heartbeats(self) -> None:
        rows = await self.store.query("ecc_agent", "statusIN" + ",".join(MONITORED))
        outputs: list[dict[str, Any]] = []
        at = now_text()
        for row in rows:
            name = str(row.get("name") or "")
            sys_id = new_sys_id()
            outputs.append(
                {"sys_id": sys_id, "agent": AGENT_PREFIX + name, "topic": HEARTBEAT,
                 "name": HEARTBEAT, "source": "MonitorMIDServer", "queue": "output",
                 "state": "ready", "priority": 0, "payload": HEARTBEAT_PAYLOAD}
            )  # fmt: skip
            self.sent[name] = (sys_id, at)
        if outputs:
            await self.store.insert_many("ecc_queue", outputs)
