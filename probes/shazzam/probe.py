"""Shazzam: the TCP connect sweep of discovery's Scanning phase.

Which addresses answer, and which of the given TCP ports are open on them. Reference:
``docs/probes/Shazzam.md``. The engine is :mod:`probes.shazzam.engine` (epoll in a worker
thread, or worker processes for a big unpaced sweep); :mod:`probes.shazzam.params`
validates the job; this module runs the engine and turns finished hosts into result
chunks.

With ``snmp: true`` the sweep also taps UDP ``snmp_port`` (161) of every address with
the job's ``snmp_community`` credentials (:mod:`probes.shazzam.snmp_tap`: a GET of
sysDescr / sysObjectID / sysName, two taps a short interval apart), on the event loop
while the TCP engine runs in its thread. :class:`probes.shazzam.snmp_scan.SnmpJoin` pairs
the two halves: a host is reported once its TCP ports and its tap are both done.
"""

from __future__ import annotations

import contextlib
import resource
import time
from collections.abc import AsyncGenerator, AsyncIterator
from typing import Any

from bridge.wire.errors import BridgeError
from probes.contract import Job, ProbeContext, ProbeSpec
from probes.shazzam.engine import HostResult, Sweep, SweepError, SweepOptions, iter_hosts
from probes.shazzam.params import TOPIC, ShazzamParams, build_params
from probes.shazzam.services import service_name
from probes.shazzam.settings import ShazzamSettings
from probes.shazzam.snmp_scan import FD_RESERVE, SnmpJoin, snmp_credentials, snmp_in_flight

# Engines beyond the first are worker processes (threads would share the GIL), each worth
# starting only past this many probes. Measured on 2 idle cores, loopback, 100 ports, one
# engine thread vs two worker processes: 25,400 probes ~128k vs ~128k probes/s (process
# start-up eats the gain), 51,000 probes ~132k vs ~179k, 204,600 probes ~131k vs ~228k
# (1.74 ×). With the cores busy elsewhere, two processes gained nothing: hence
# ``engines`` stays 1 unless configured.
PROBES_PER_EXTRA_ENGINE = 25_000


def _concurrency(configured: int) -> int:
    """Connects in flight, kept well inside the process's file descriptor limit."""
    soft, _hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft == resource.RLIM_INFINITY:
        return configured
    return max(16, min(configured, (soft - FD_RESERVE) // 2))


def _host(raw: dict[str, Any]) -> dict[str, Any]:
    """Name the service on each open port (the engine reports numbers only)."""
    raw["open"] = [
        {"port": entry["port"], "service": service_name(entry["port"]), **entry}
        for entry in raw["open"]
    ]
    return raw


async def _tcp_only(sweep: Sweep) -> AsyncGenerator[list[HostResult], None]:
    async for batch in sweep:
        yield batch


async def run(job: Job[ShazzamParams], ctx: ProbeContext) -> AsyncIterator[dict[str, Any]]:
    params = job.params
    cfg = ctx.settings
    if not isinstance(cfg, ShazzamSettings):
        raise TypeError(
            f"the Shazzam probe's settings are {type(cfg).__name__}, not the ShazzamSettings "
            "the runtime validates from [probes.shazzam]"
        )
    targets = params.target_set()
    total = targets.count
    chunk = params.chunk_hosts
    # Before any packet: a sweep that cannot tap SNMP fails at once.
    credentials = await snmp_credentials(job, ctx) if params.snmp else []
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
    reported = done = alive = open_ports = snmp_answered = 0
    pending: list[dict[str, Any]] = []
    started = time.monotonic()
    window = max(4096, 2 * chunk)
    sweep = Sweep(intervals, options, rate=ctx.rate, engines=engines, window=window)
    if params.snmp:
        batches = SnmpJoin(
            sweep,
            (ip for _version, ip in iter_hosts(intervals)),
            total,
            credentials,
            port=params.snmp_port,
            timeout=params.snmp_timeout,
            rate=ctx.rate,
            in_flight=snmp_in_flight(len(credentials)),
            window=window,
        ).batches()
    else:
        batches = _tcp_only(sweep)
    try:
        async with sweep, contextlib.aclosing(batches):
            async for batch in batches:
                for host in batch:
                    pending.append(_host(host))
                    alive += host["alive"]
                    open_ports += len(host["open"])
                    snmp_answered += host.get("snmp") is not None
                done += len(batch)
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
    totals: dict[str, Any] = {
        "addresses": total,
        "alive": alive,
        "open_ports": open_ports,
        "probes": probes,
        "duration_s": round(duration, 3),
        "probes_per_s": round(probes / duration) if duration > 0 else 0,
    }
    if params.snmp:
        totals["snmp_answered"] = snmp_answered
    yield {
        "hosts": pending,
        "chunk_hosts": len(pending),
        "progress": {"done": total, "total": total},
        "totals": totals,
    }


SPEC = ProbeSpec(TOPIC, ShazzamParams, run, build_params, settings=ShazzamSettings)
