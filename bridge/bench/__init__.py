"""Benchmarks run by ``midbridge bench NAME``: each measures a peer and midbridge side by side.

``midbridge bench list`` names them; ``--json`` prints one JSON object (name, unit, peer,
peer_rate, ours_rate, ratio, every round, the machine); ``--broker HOST:PORT`` uses that
broker instead of a private mosquitto (or nats-server); ``--rounds N`` alternating rounds,
median kept; ``--transport nats`` runs a benchmark that offers it on NATS JetStream.
See docs/benchmarks.md and docs/scaling.md.
"""

from __future__ import annotations

import importlib
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import orjson

from bridge.cli_errors import EXIT_FAILED, CommandError, fail

if TYPE_CHECKING:
    from bridge.bench.common import Result


@dataclass(frozen=True, slots=True)
class Benchmark:
    name: str
    summary: str
    module: str  # holds ``async def run(broker, rounds, **options) -> Result``
    options: dict[str, Any] = field(default_factory=dict)
    transports: tuple[str, ...] = ("mqtt",)  # the first is the default


BENCHMARKS: dict[str, Benchmark] = {
    b.name: b
    for b in (
        Benchmark(
            "sweep",
            "Shazzam over 127.0.0.1-254 × 100 ports through the bridge vs nmap -sT -T5 (probes/s)",
            "bridge.bench.sweep",
        ),
        Benchmark(
            "roundtrip",
            "trivial Echo jobs through the bridge vs a gmqtt echo responder (jobs/s, latency); "
            "--transport nats: vs a nats-py JetStream echo responder",
            "bridge.bench.roundtrip",
            transports=("mqtt", "nats"),
        ),
        Benchmark(
            "cluster",
            "Echo jobs with a fixed delay through 3 bridges of one MID vs 1 bridge, on a "
            "private 3-node NATS JetStream cluster (jobs/s; goal: 3 bridges >= 2.5 x 1)",
            "bridge.bench.cluster",
            transports=("nats",),
        ),
        Benchmark(
            "snmp-walk",
            "walk of snmpd's MIB-2 through the bridge vs snmpbulkwalk -Cr10 (varbinds/s)",
            "bridge.bench.snmp_walk",
        ),
        Benchmark(
            "snmp-get",
            "GETs across 200 snmpd agents, jobs of 200 agents, through the bridge vs a "
            "gufo-snmp loop (GETs/s)",
            "bridge.bench.snmp",
        ),
        Benchmark(
            "snmp-get-1",
            "snmp-get with one GET a job: the per-job cost (GETs/s, no goal)",
            "bridge.bench.snmp",
            {"many": False},
        ),
        Benchmark(
            "ssh",
            "echo hi over SSH on 4 sshd addresses through the bridge vs asyncssh (commands/s)",
            "bridge.bench.ssh",
        ),
        Benchmark(
            "http",
            "GETs of a small body, jobs of 100 URLs, through the bridge (RESTProbe) vs an "
            "aiohttp loop (req/s)",
            "bridge.bench.http",
        ),
        Benchmark(
            "http-1",
            "http with one request a job: the per-job cost (req/s, no goal)",
            "bridge.bench.http",
            {"many": False},
        ),
    )
}

Runner = Callable[..., Awaitable["Result"]]  # run(broker, rounds, **options)


def run_bench(
    name: str,
    *,
    as_json: bool,
    broker: tuple[str, int] | None,
    rounds: int,
    transport: str | None = None,
) -> int:
    if name == "list":
        if as_json:
            listing = [{"name": b.name, "summary": b.summary} for b in BENCHMARKS.values()]
            print(orjson.dumps(listing, option=orjson.OPT_INDENT_2).decode())
        else:
            width = max(len(n) for n in BENCHMARKS)
            for bench in BENCHMARKS.values():
                print(f"{bench.name.ljust(width)}  {bench.summary}")
        return 0
    chosen = BENCHMARKS.get(name)
    if chosen is None:
        known = ", ".join(sorted(BENCHMARKS))
        return fail("bench", f"no benchmark named {name!r} (known: {known})")
    if rounds < 1:
        return fail("bench", "--rounds must be at least 1")
    if transport is not None and transport not in chosen.transports:
        offered = ", ".join(chosen.transports)
        return fail("bench", f"{name} runs on {offered}, not --transport {transport}")
    options = dict(chosen.options)
    if len(chosen.transports) > 1 and transport is not None:
        options["transport"] = transport

    from bridge.bench.common import (
        loadavg,
        machine_info,
        raise_nofile_limit,
        render,
        run_uvloop,
        to_json,
    )

    raise_nofile_limit()
    # The bench process decodes every answer and keeps it for the checks: with CPython's
    # default collector thresholds it spent most of its CPU re-walking them.
    from bridge.agent.runtime import tune_gc

    tune_gc()
    machine = machine_info()
    module = importlib.import_module(chosen.module)
    run: Runner = module.run
    try:
        result = run_uvloop(lambda: run(broker, rounds, **options))
    except BenchError as exc:
        return fail(f"bench {name}", exc)
    machine["loadavg_after"] = loadavg()
    result.machine = {**machine, **result.machine}
    print(to_json(result) if as_json else render(result))
    return 0


class BenchError(CommandError):
    """A benchmark could not run (a tool missing, a child that did not start): exit 1."""

    def __init__(self, message: str) -> None:
        super().__init__(message, status=EXIT_FAILED)
