"""Shazzam: the TCP connect sweep of discovery's Scanning phase.

Which addresses answer, and which of the given TCP ports are open on them. Reference:
``docs/probes/Shazzam.md``. The engine is :mod:`probes.tcp_sweep` (epoll in a worker
thread, or worker processes for a big unpaced sweep); this module validates the job,
runs the engine and turns finished hosts into result chunks.
"""

from __future__ import annotations

import resource
import time
from collections.abc import AsyncIterator, Mapping
from typing import Any

from pydantic import Field, ValidationError, field_validator
from pydantic_core import PydanticCustomError

from bridge.config import ShazzamConfig
from bridge.errors import BadParameter, BridgeError, ConfigError, Refused
from bridge.jobs import Job, ProbeContext, ProbeParams, ProbeSpec, parse_params
from bridge.records import OutputRecord
from probes.services import service_name
from probes.targets import TargetSet, parse_ports, parse_targets
from probes.tcp_sweep import Sweep, SweepError, SweepOptions

TOPIC = "Shazzam"

# The TCP ports discovery's classifiers look at: remote shells and file transfer, web,
# Windows (WMI/RPC, NetBIOS, SMB, WinRM, RDP), mail, and the common databases.
DEFAULT_PORTS: tuple[int, ...] = (
    21, 22, 23, 25, 80, 135, 139, 443, 445, 1433, 1521, 3306, 3389, 5432, 5985, 5986,
    8080, 8443,
)  # fmt: skip

# Engines beyond the first are worker processes (threads would share the GIL), each worth
# starting only past this many probes. Measured on 2 idle cores, loopback, 100 ports, one
# engine thread vs two worker processes: 25,400 probes ~128k vs ~128k probes/s (process
# start-up eats the gain), 51,000 probes ~132k vs ~179k, 204,600 probes ~131k vs ~228k
# (1.74 ×). With the cores busy elsewhere, two processes gained nothing: hence
# ``engines`` stays 1 unless configured.
PROBES_PER_EXTRA_ENGINE = 25_000
_FD_RESERVE = 256  # file descriptors left to the rest of the bridge


def _clean_error(exc: ValueError) -> PydanticCustomError:
    """A parse error as pydantic reports it, without the ``Value error,`` prefix."""
    return PydanticCustomError("value_error", str(exc))


class ShazzamParams(ProbeParams):
    """A sweep. ``targets`` holds the canonical, merged form (``first-last`` intervals)."""

    targets: tuple[str, ...]
    ports: tuple[int, ...] = DEFAULT_PORTS
    connect_timeout: float = Field(1.0, gt=0, le=60)  # seconds before a port is filtered
    banner: bool = False  # read what an open port says first
    banner_timeout: float = Field(0.5, gt=0, le=10)  # seconds to wait for it
    chunk_hosts: int = Field(256, ge=1, le=65_536)  # hosts in one result chunk

    @field_validator("targets", mode="before")
    @classmethod
    def _parse_targets(cls, value: Any) -> tuple[str, ...]:
        try:
            return parse_targets(value).texts()
        except ValueError as exc:
            raise _clean_error(exc) from None

    @field_validator("ports", mode="before")
    @classmethod
    def _parse_ports(cls, value: Any) -> tuple[int, ...]:
        try:
            return parse_ports(value)
        except ValueError as exc:
            raise _clean_error(exc) from None

    def target_set(self) -> TargetSet:
        return parse_targets(list(self.targets))


def _config(settings: Mapping[str, Any]) -> ShazzamConfig:
    known = {k: v for k, v in settings.items() if k in ShazzamConfig.model_fields}
    try:
        return ShazzamConfig.model_validate(known)
    except ValidationError as exc:
        first = exc.errors()[0]
        loc = ".".join(str(part) for part in first.get("loc", ()))
        raise ConfigError(str(first.get("msg", "invalid")), field=f"probes.shazzam.{loc}") from None


def build_params(record: OutputRecord, settings: Mapping[str, Any]) -> ShazzamParams:
    """Parameters from the payload (targets default to the record's ``source``).

    Raises ``BadParameter`` naming the field, or ``Refused`` for a sweep over the limits.
    """
    cfg = _config(settings)
    data = {k: v for k, v in record.payload.items() if v is not None}
    if "targets" not in data:
        if not record.source.strip():
            raise BadParameter(
                "no targets: give payload 'targets' or the record's source", field="targets"
            )
        data["targets"] = record.source
    data.setdefault("connect_timeout", cfg.connect_timeout)
    data.setdefault("chunk_hosts", cfg.chunk_hosts)
    params = parse_params(ShazzamParams, data)
    addresses = params.target_set().count
    if addresses > cfg.max_addresses:
        raise Refused(
            f"the sweep covers {addresses} addresses, over the limit of {cfg.max_addresses}"
            " (probes.shazzam.max_addresses): split it into smaller jobs",
            field="targets",
        )
    probes = addresses * len(params.ports)
    if probes > cfg.max_probes:
        raise Refused(
            f"{addresses} addresses × {len(params.ports)} ports = {probes} probes, over the"
            f" limit of {cfg.max_probes} (probes.shazzam.max_probes): split it into smaller jobs"
        )
    return params


def _concurrency(configured: int) -> int:
    """Connects in flight, kept well inside the process's file descriptor limit."""
    soft, _hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft == resource.RLIM_INFINITY:
        return configured
    return max(16, min(configured, (soft - _FD_RESERVE) // 2))


def _host(raw: dict[str, Any]) -> dict[str, Any]:
    """Name the service on each open port (the engine reports numbers only)."""
    raw["open"] = [
        {"port": entry["port"], "service": service_name(entry["port"]), **entry}
        for entry in raw["open"]
    ]
    return raw


async def run(job: Job[ShazzamParams], ctx: ProbeContext) -> AsyncIterator[dict[str, Any]]:
    params = job.params
    cfg = _config(ctx.settings)
    targets = params.target_set()
    total = targets.count
    chunk = params.chunk_hosts
    options = SweepOptions(
        ports=params.ports,
        timeout=params.connect_timeout,
        concurrency=_concurrency(cfg.concurrency),
        per_host=max(1, ctx.per_host_limit),
        banner=params.banner,
        banner_timeout=params.banner_timeout,
    )
    engines = min(cfg.engines, max(1, total * len(params.ports) // PROBES_PER_EXTRA_ENGINE))
    intervals = [(i.version, i.first, i.last) for i in targets.intervals]
    reported = alive = open_ports = 0
    pending: list[dict[str, Any]] = []
    started = time.monotonic()
    sweep = Sweep(intervals, options, rate=ctx.rate, engines=engines, window=max(4096, 2 * chunk))
    try:
        async with sweep:
            async for batch in sweep:
                for host in batch:
                    pending.append(_host(host))
                    alive += host["alive"]
                    open_ports += len(host["open"])
                done = sweep.stats.hosts
                # Hold back the last full chunk until more hosts come: the last chunk
                # always carries hosts as well as the totals.
                while len(pending) > chunk or (len(pending) == chunk and done < total):
                    reported += chunk
                    yield {
                        "hosts": pending[:chunk],
                        "chunk_hosts": chunk,
                        "progress": {"done": reported, "total": total},
                    }
                    del pending[:chunk]
    except SweepError as exc:
        raise BridgeError(str(exc)) from None
    duration = time.monotonic() - started
    if reported + len(pending) != total:
        raise BridgeError(
            f"the sweep engine stopped after {reported + len(pending)} of {total} addresses"
        )
    probes = sweep.stats.probes
    yield {
        "hosts": pending,
        "chunk_hosts": len(pending),
        "progress": {"done": total, "total": total},
        "totals": {
            "addresses": total,
            "alive": alive,
            "open_ports": open_ports,
            "probes": probes,
            "duration_s": round(duration, 3),
            "probes_per_s": round(probes / duration) if duration > 0 else 0,
        },
    }


SPEC = ProbeSpec(topic=TOPIC, params=ShazzamParams, run=run, build_params=build_params, sweep=True)
