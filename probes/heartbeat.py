"""HeartbeatProbe: answers at once with the bridge's runtime statistics (a lane of its own)."""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Any

from bridge.wire.errors import Refused
from bridge.wire.records import OutputRecord
from probes.contract import Job, NoSettings, ProbeContext, ProbeParams, ProbeSpec, parse_params

TOPIC = "HeartbeatProbe"


class HeartbeatParams(ProbeParams):
    pass


def build_params(record: OutputRecord, settings: NoSettings) -> HeartbeatParams:
    return parse_params(HeartbeatParams, record.payload)


async def run(job: Job[HeartbeatParams], ctx: ProbeContext) -> AsyncIterator[dict[str, Any]]:
    control = ctx.control
    if control is None:
        raise Refused("this bridge runs no control service")
    await control.heartbeat()
    yield {"status": control.status_record(), "stats": control.stats()}


SPEC = ProbeSpec(TOPIC, HeartbeatParams, run, build_params, settings=NoSettings, control=True)
