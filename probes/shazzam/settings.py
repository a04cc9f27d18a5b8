"""``[probes.shazzam]``: the sweep's limits and engine settings (``ProbeSpec.settings``)."""

from __future__ import annotations

from pydantic import Field

from probes.contract import ProbeSettings


class ShazzamSettings(ProbeSettings):
    max_addresses: int = Field(65_536, ge=1)  # a larger sweep is refused
    max_probes: int = Field(10_000_000, ge=1)  # addresses × ports
    chunk_hosts: int = Field(256, ge=1)  # hosts a result chunk holds
    connect_timeout: float = Field(1.0, gt=0, le=60)
    concurrency: int = Field(2048, ge=1, le=65_536)  # connects in flight per engine
    engines: int = Field(1, ge=1, le=64)  # parallel engine threads/processes per big sweep
