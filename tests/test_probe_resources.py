"""Probe resources and settings as the runtime handles them, through a real broker.

A registry of one test probe whose resource records when it closes: the bridge must close
it only after a cancelled job has finished cleaning up, and a resource that cannot open
stops the start with a configuration error naming the probe.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from bridge.agent.bridge import Bridge
from bridge.agent.config import Config, config_from_mapping
from bridge.agent.probe_contexts import validate_all_settings
from bridge.wire.client import EccClient, output_record
from bridge.wire.errors import ConfigError
from bridge.wire.records import OutputRecord
from probes import REGISTRY
from probes.contract import Job, NoSettings, ProbeContext, ProbeParams, ProbeSpec, parse_params
from tests.brokers import BrokerAddress
from tests.harness import make_config

TOPIC = "SlowCleanup"


class Params(ProbeParams):
    pass


@dataclass
class Resource:
    closed: bool = False
    seen_closed_in_cleanup: bool | None = None
    cleanups: int = 0


def build_params(record: OutputRecord, settings: NoSettings) -> Params:
    return parse_params(Params, record.payload)


async def run(job: Job[Params], ctx: ProbeContext) -> AsyncIterator[dict[str, Any]]:
    resource: Resource = ctx.resource
    try:
        await asyncio.sleep(30)
        yield {}
    finally:  # cancelled at the drain deadline: a cleanup that still uses the resource
        await asyncio.sleep(0.5)
        resource.seen_closed_in_cleanup = resource.closed
        resource.cleanups += 1


def registry_with(resource: Resource) -> dict[str, ProbeSpec]:
    @contextlib.asynccontextmanager
    async def open_resource(settings: Any, state_dir: Path | None) -> AsyncIterator[Resource]:
        try:
            yield resource
        finally:
            resource.closed = True

    spec = ProbeSpec(TOPIC, Params, run, build_params, resource=open_resource)
    return {**REGISTRY, TOPIC: spec}


async def test_resources_close_after_cancelled_jobs_end(
    broker: BrokerAddress, unique_agent: str, tmp_path: Path
) -> None:
    """A one-record job runs in its MQTT handler, which no task group waits for: at the
    drain deadline it is cancelled, and its cleanup must still find the resource open."""
    config = make_config(
        broker.host, broker.port, unique_agent, tmp_path, limits={"drain_timeout": 0.3}
    )
    resource = Resource()
    agent = f"mid.server.{unique_agent}"
    async with (
        EccClient(config.broker, agent=unique_agent) as client,
        Bridge(config, registry_with(resource)) as bridge,
    ):
        await client.send([output_record(TOPIC, agent=agent)])
        for _ in range(200):
            if bridge.scheduler.running:
                break
            await asyncio.sleep(0.02)
        assert bridge.scheduler.running, "the job never started"
    assert resource.cleanups == 1
    assert resource.seen_closed_in_cleanup is False
    assert resource.closed


async def test_a_resource_that_cannot_open_stops_the_start_naming_the_probe(
    broker: BrokerAddress, unique_agent: str, tmp_path: Path
) -> None:
    @contextlib.asynccontextmanager
    async def broken(settings: Any, state_dir: Path | None) -> AsyncIterator[None]:
        raise OSError("libfoo not usable")
        yield  # pragma: no cover

    spec = ProbeSpec(TOPIC, Params, run, build_params, resource=broken)
    config = make_config(broker.host, broker.port, unique_agent, tmp_path)
    with pytest.raises(ConfigError) as info:
        async with Bridge(config, {**REGISTRY, TOPIC: spec}):
            pass  # pragma: no cover
    assert info.value.field == f"probes.{TOPIC}"
    assert "libfoo not usable" in str(info.value)


def settings_config(**probes: Any) -> Config:
    return config_from_mapping({"probes": probes})


def test_a_disabled_probes_settings_stop_no_start() -> None:
    """As before typed settings: a table for a registered probe this bridge does not run
    is not read; a table for no probe at all is still refused."""
    config = settings_config(enabled=["Echo"], settings={"SNMP": {"max_in_flight": 0}})
    enabled = {"Echo": REGISTRY["Echo"]}
    assert set(validate_all_settings(config, REGISTRY, enabled)) == {"Echo"}
    with pytest.raises(ConfigError, match="no probe has this topic"):
        validate_all_settings(settings_config(settings={"Nope": {}}), REGISTRY, enabled)


def test_one_table_spelt_two_ways_is_refused() -> None:
    config = settings_config(settings={"restprobe": {"limit": 5}, "RestProbe": {"limit": 7}})
    with pytest.raises(ConfigError, match="spelt two ways"):
        validate_all_settings(config, REGISTRY)
