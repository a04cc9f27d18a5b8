"""HeartbeatProbe: answers at once with the bridge's runtime statistics (a lane of its own)."""

from __future__ import annotations

from collections.abc import AsyncIterator, Mapping
from typing import Any, cast

from bridge.wire.errors import Refused
from bridge.wire.records import OutputRecord
from probes.contract import (
    CONTROL_RESOURCE,
    Control,
    Job,
    ProbeContext,
    ProbeParams,
    ProbeSpec,
    parse_params,
)

TOPIC = "HeartbeatProbe"


class HeartbeatParams(ProbeParams):
    pass


def build_params(record: OutputRecord, settings: Mapping[str, Any]) -> HeartbeatParams:
    return parse_params(HeartbeatParams, record.payload)


async def run(job: Job[HeartbeatParams], ctx: ProbeContext) -> AsyncIterator[dict[str, Any]]:
    control = ctx.resources.get(CONTROL_RESOURCE)
    if control is None:
        raise Refused("this bridge runs no control service")
    control = cast(Control, control)
    await control.heartbeat()
    yield {"status": control.status_record(), "stats": control.stats()}


SPEC = ProbeSpec(
    topic=TOPIC, params=HeartbeatParams, run=run, build_params=build_params, control=True
)
