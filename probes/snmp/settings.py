"""``[probes.settings.SNMP]``: the probe's settings model (``ProbeSpec.settings``)."""

from __future__ import annotations

from pydantic import Field

from probes.contract import ProbeSettings

TOPIC = "SNMP"


class SnmpSettings(ProbeSettings):
    """``[probes.settings.SNMP]``: defaults of the parameters and limits of the pool."""

    timeout: float = Field(2.0, gt=0, le=60)
    retries: int = Field(1, ge=0, le=10)
    max_repetitions: int = Field(10, ge=1, le=100)
    max_varbinds: int = Field(10_000, ge=1, le=10_000_000)  # default and ceiling per job
    chunk_varbinds: int = Field(1000, ge=1, le=100_000)
    sessions_per_target: int = Field(2, ge=1, le=64)  # concurrent leases per agent+credential
    max_sessions: int = Field(1024, ge=1, le=65_536)  # idle sessions kept across agents
    idle_seconds: float = Field(300.0, gt=0)  # an idle session older than this is dropped
    concurrency: int = Field(100, ge=1, le=10_000)  # default agents at once in a hosts job
    max_hosts: int = Field(10_000, ge=1, le=1_000_000)  # agents one job may name
    max_in_flight: int = Field(256, ge=1, le=65_536)  # agents queried at once, all hosts jobs
