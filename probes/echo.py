"""Echo: answers with its own parameters. The trivial job for round-trip tests and benchmarks."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from typing import Any

from pydantic import Field

from bridge.wire.records import OutputRecord
from probes.contract import Job, NoSettings, ProbeContext, ProbeParams, ProbeSpec, parse_params

TOPIC = "Echo"


class EchoParams(ProbeParams):
    message: str = Field("", max_length=65_536)
    delay: float = Field(0.0, ge=0, le=3600)  # seconds to wait before answering
    chunks: int = Field(1, ge=1, le=10_000)  # how many result chunks to stream


def build_params(record: OutputRecord, settings: NoSettings) -> EchoParams:
    data = dict(record.payload)
    if "message" not in data and record.name:
        data["message"] = record.name
    return parse_params(EchoParams, data)


async def run(job: Job[EchoParams], ctx: ProbeContext) -> AsyncIterator[dict[str, Any]]:
    params = job.params
    if params.delay:
        await asyncio.sleep(params.delay)
    for index in range(params.chunks):
        yield {"message": params.message, "chunk": index}


SPEC = ProbeSpec(TOPIC, EchoParams, run, build_params, settings=NoSettings)
