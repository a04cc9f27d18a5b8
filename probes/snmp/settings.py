"""``[probes.settings.SNMP]``: the probe's settings model (``ProbeSpec.settings``)."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from pydantic import Field

from probes.contract import ProbeSettings, parse_settings

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


def snmp_settings(settings: SnmpSettings | Mapping[str, Any]) -> SnmpSettings:
    """The probe's settings as the model.

    Transitional: the runtime still hands probes the raw ``[probes.settings.SNMP]`` table;
    once it validates ``ProbeSpec.settings`` at start and passes the instance, the table
    branch (and its cache) goes and callers use the instance as it is.
    """
    if isinstance(settings, SnmpSettings):
        return settings
    try:
        key = tuple(sorted(settings.items()))
        cached = _VALIDATED.get(key)
    except TypeError:  # an unhashable value: validation will name it
        key, cached = None, None
    if cached is not None:
        return cached
    model = parse_settings(SnmpSettings, settings, TOPIC)
    if key is not None:
        if len(_VALIDATED) > 64:
            _VALIDATED.clear()
        _VALIDATED[key] = model
    return model


# Transitional (see snmp_settings): validated tables, so jobs do not validate each time.
_VALIDATED: dict[tuple[tuple[str, Any], ...], SnmpSettings] = {}
