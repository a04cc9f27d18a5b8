"""An SNMP job's parameters: the model, its host checks, and ``build_params``."""

from __future__ import annotations

import functools
import ipaddress
import re
from typing import Any

from pydantic import Field, field_validator
from pydantic_core import PydanticCustomError

from bridge.wire.errors import BadParameter, Refused
from bridge.wire.records import OutputRecord
from probes.contract import ProbeParams, parse_params
from probes.snmp.settings import TOPIC, SnmpSettings
from probes.snmp.spec import DEFAULT_SPEC, OidSpec, parse_spec_list
from probes.snmp.versions import Version, normalize_version


def _clean_error(exc: ValueError) -> PydanticCustomError:
    return PydanticCustomError("value_error", str(exc))


class SnmpParams(ProbeParams):
    """A job. ``oid_spec_list`` holds the canonical lines (numeric OIDs, column numbers)."""

    host: str | None = Field(None, min_length=1, max_length=253)
    hosts: tuple[str, ...] | None = None  # many agents in one job (see ``run_many``)
    port: int = Field(161, ge=1, le=65535)
    version: Version | None = None  # None: from the credential (community → 2c, snmpv3 → 3)
    credential_id: str | None = Field(None, min_length=1, max_length=200)
    oid_spec_list: tuple[str, ...] = DEFAULT_SPEC
    max_repetitions: int = Field(10, ge=1, le=100)
    timeout: float = Field(2.0, gt=0, le=60)  # seconds per try of one request
    retries: int = Field(1, ge=0, le=10)  # more tries after a timeout
    max_varbinds: int = Field(10_000, ge=1)
    chunk_varbinds: int = Field(1000, ge=1, le=100_000)  # varbinds in one result chunk
    concurrency: int = Field(100, ge=1, le=10_000)  # agents of a ``hosts`` job at once
    chunk_agents: int = Field(100, ge=1, le=100_000)  # agents in one result chunk

    @field_validator("version", mode="before")
    @classmethod
    def _version(cls, value: Any) -> Version | None:
        try:
            return normalize_version(value)
        except ValueError as exc:
            raise _clean_error(exc) from None

    @field_validator("host", mode="before")
    @classmethod
    def _host(cls, value: Any) -> Any:
        if isinstance(value, str):
            try:
                return _check_host(value)
            except ValueError as exc:
                raise _clean_error(exc) from None
        return value

    @field_validator("hosts", mode="before")
    @classmethod
    def _hosts(cls, value: Any) -> Any:
        if value is None:
            return None
        if isinstance(value, str):  # XML parameters are text: one list, spaces or commas
            value = value.replace(",", " ").split()
        if not isinstance(value, list | tuple):
            return value  # pydantic reports the type
        for n, one in enumerate(value):
            if not isinstance(one, str):
                raise _clean_error(ValueError(f"entry {n}: is not text"))
        try:
            return _check_hosts(tuple(value))
        except ValueError as exc:
            raise _clean_error(exc) from None

    @field_validator("oid_spec_list", mode="before")
    @classmethod
    def _spec(cls, value: Any) -> tuple[str, ...]:
        try:
            return tuple(spec.text() for spec in parse_spec_list(value))
        except ValueError as exc:
            raise _clean_error(exc) from None

    def specs(self) -> tuple[OidSpec, ...]:
        return _canonical_specs(self.oid_spec_list)


@functools.lru_cache(maxsize=1024)
def _canonical_specs(lines: tuple[str, ...]) -> tuple[OidSpec, ...]:
    return parse_spec_list(list(lines))


def _check_host(value: str) -> str:
    value = value.strip()
    if value.startswith("[") and value.endswith("]"):
        value = value[1:-1]
    if value and not _is_ip(value) and not _HOST_RE.match(value):
        raise ValueError(f"{value[:80]!r} is not an IP address or host name")
    return value


@functools.lru_cache(maxsize=16)  # a poller's few lists; up to 10,000 hosts each
def _check_hosts(values: tuple[str, ...]) -> tuple[str, ...]:
    """A host list, each checked (cached: a poller sends the same list again and again)."""
    if not values:
        raise ValueError("is empty: name at least one agent")
    checked: list[str] = []
    for n, value in enumerate(values):
        if not value.strip():
            raise ValueError(f"entry {n} is empty")
        try:
            checked.append(_check_host(value))
        except ValueError as exc:
            raise ValueError(f"entry {n}: {exc}") from None
    return tuple(checked)


_HOST_RE = re.compile(r"^(?=.{1,253}$)[A-Za-z0-9]([A-Za-z0-9-]{0,62})(\.[A-Za-z0-9-]{1,63})*\.?$")


def _is_ip(text: str) -> bool:
    return ip_literal(text) is not None


@functools.lru_cache(maxsize=4096)
def ip_literal(text: str) -> str | None:
    """The canonical text of an IP literal, ``None`` for anything else."""
    try:
        return str(ipaddress.ip_address(text))
    except ValueError:
        return None


def build_params(record: OutputRecord, cfg: SnmpSettings) -> SnmpParams:
    """Parameters from the payload; ``host`` defaults to the record's ``source``.

    ``cfg``: the probe's settings, validated by the runtime at start.
    """
    data = {k: v for k, v in record.payload.items() if v is not None}
    if "hosts" in data:
        if "host" in data:
            raise BadParameter("give either host or hosts, not both", field="hosts")
    elif "host" not in data:
        if not record.source.strip():
            raise BadParameter("no host: give payload 'host' or the record's source", field="host")
        data["host"] = record.source
    for key in ("timeout", "retries", "max_repetitions", "max_varbinds", "chunk_varbinds"):
        data.setdefault(key, getattr(cfg, key))
    data.setdefault("concurrency", cfg.concurrency)
    params = parse_params(SnmpParams, data)
    if params.hosts is not None and len(params.hosts) > cfg.max_hosts:
        raise _over_limit(f"{len(params.hosts)} hosts", cfg.max_hosts, "max_hosts", "hosts")
    if params.max_varbinds > cfg.max_varbinds:
        raise _over_limit(
            f"max_varbinds {params.max_varbinds}", cfg.max_varbinds, "max_varbinds", "max_varbinds"
        )
    return params


def _over_limit(what: str, limit: int, setting: str, field: str) -> Refused:
    return Refused(
        f"{what} is over the limit of {limit} (probes.settings.{TOPIC}.{setting})", field=field
    )
