"""``midbridge bench cluster``: one MID's work through three bridges vs one, on NATS JetStream.

The jobs are ``Echo`` jobs that wait ``DELAY`` seconds each: the work is bound by how many
jobs run at once (``WORKERS`` standard-lane workers a bridge), not by CPU, so a second
and a third bridge should add as much again even on a 2-core machine. What is measured is
how well the members of a MID cluster share one stream: the durable pull consumer they
all read, each member holding at most its window (``limits.max_in_flight`` = ``WINDOW``).

- peer: one bridge (``midbridge run``, agent ``bench-one-<tag>``);
- ours: three bridges of one MID (agent ``bench-three-<tag>``, members m1..m3).

All four are child processes on a private 3-node NATS cluster (``bridge.bench.natsd``),
streams with 3 replicas, started before the rounds. One driver in this process publishes
``JOBS`` jobs (one record per message, all at once) and times the first publish to the
last answer. ``ratio`` = ours / peer = 3-bridge throughput / 1-bridge throughput; the goal
is 2.5, the ceiling 3.
"""

from __future__ import annotations

import contextlib
import tempfile
import uuid
from pathlib import Path
from typing import Any

import aiohttp

from bridge.agent.config import Config
from bridge.bench import BenchError
from bridge.bench.common import (
    BRIDGE_COMMAND,
    CpuMeters,
    Result,
    Round,
    Side,
    Table,
    bridge_process,
    log_problems,
    median,
    plain_config_for,
    progress,
)
from bridge.bench.nats_peer import nats_servers
from bridge.bench.roundtrip import Driver, Stalled
from bridge.demo.broker import free_port
from bridge.wire.broker import BrokerConfig

JOBS = 3_000
DELAY = 0.2  # seconds each Echo job waits
WORKERS = 50  # standard-lane workers of each bridge: at most this many jobs run at once
WINDOW = 2 * WORKERS  # limits.max_in_flight: what one member takes from the stream at once
WARMUP_JOBS = 300
MEMBERS = 3
MAX_ATTEMPTS = 3


def member_config(broker: BrokerConfig, agent: str, workdir: Path, member: str) -> Config:
    config = plain_config_for(
        broker,
        agent,
        workdir / member,
        max_in_flight=WINDOW,
        lane_workers=(4, 4, WORKERS),
    )
    config.bridge.instance = member
    config.metrics_port = free_port()
    return config


async def processed(config: Config) -> int | None:
    """The member's processed count from its ``/healthz`` (None if it does not answer)."""
    url = f"http://{config.metrics_host}:{config.metrics_port}/healthz"
    try:
        async with aiohttp.ClientSession() as http, http.get(url) as response:
            body = await response.json()
    except (aiohttp.ClientError, OSError, ValueError):
        return None
    return int(body.get("processed", 0))


async def flood(driver: Driver, meter: CpuMeters, nodes: CpuMeters, who: str) -> Side:
    for _ in range(MAX_ATTEMPTS):
        meter.start()
        nodes.start()
        try:
            side = await driver.flood(JOBS, JOBS)
        except Stalled as exc:
            progress(f"{who} stalled ({exc}); measuring it again")
            continue
        side.cpu_s = meter.stop()
        broker_cpu = nodes.stop()
        if broker_cpu is not None:
            side.extra["nats_cpu_us_per_job"] = round(broker_cpu / side.count * 1e6, 1)
        return side
    raise BenchError(f"{who} stalled {MAX_ATTEMPTS} times in a row")


async def run(broker: tuple[str, int] | None, rounds: int) -> Result:
    if broker is not None:
        raise BenchError("bench cluster starts its own 3-node NATS cluster: no --broker")
    tag = uuid.uuid4().hex[:8]
    agents = {"peer": f"bench-one-{tag}", "ours": f"bench-three-{tag}"}
    payload: dict[str, Any] = {"message": "ping", "delay": DELAY}
    with tempfile.TemporaryDirectory(prefix="midbridge-bench-") as tmp:
        workdir = Path(tmp)
        async with contextlib.AsyncExitStack() as stack:
            servers = await stack.enter_async_context(nats_servers(None, size=MEMBERS))
            cfg = servers.broker
            configs = {
                "peer": [member_config(cfg, agents["peer"], workdir / "one", "m1")],
                "ours": [
                    member_config(cfg, agents["ours"], workdir / "three", f"m{i + 1}")
                    for i in range(MEMBERS)
                ],
            }
            logs: list[Path] = []
            pids: dict[str, list[int | None]] = {"peer": [], "ours": []}
            for who, members in configs.items():
                for config in members:
                    log_path = workdir / f"{who}-{config.bridge.instance}.log"
                    logs.append(log_path)
                    proc = await stack.enter_async_context(bridge_process(config, log_path))
                    pids[who].append(proc.pid)
            drivers = {
                who: await stack.enter_async_context(Driver(cfg, agents[who], payload=payload))
                for who in ("peer", "ours")
            }
            meters = {who: CpuMeters(pids[who]) for who in ("peer", "ours")}
            result = Result(
                name="cluster",
                unit="jobs/s",
                goal=2.5,
                peer="one bridge of a MID",
                ours=f"{MEMBERS} bridges of one MID sharing its durable consumer",
                peer_command=BRIDGE_COMMAND,
                ours_command=[*BRIDGE_COMMAND, f"(x{MEMBERS}, bridge.instance m1..m{MEMBERS})"],
                workload=f"{JOBS:,} Echo jobs of {DELAY:g} s, one record per message, all "
                f"published at once; each bridge runs {WORKERS} at a time and holds at most "
                f"{WINDOW}; a private {MEMBERS}-node NATS cluster, streams with "
                f"{cfg.nats.replicas} replicas",
            )
            result.broker = servers.facts()
            progress(f"warm-up: {WARMUP_JOBS} untimed jobs through each side")
            for who in ("peer", "ours"):
                await drivers[who].flood(WARMUP_JOBS, WARMUP_JOBS)
            before = [await processed(c) for c in configs["ours"]]
            for index in range(1, rounds + 1):
                order = ("peer", "ours") if index % 2 else ("ours", "peer")
                sides = {
                    who: await flood(drivers[who], meters[who], servers.meter, who) for who in order
                }
                rnd = Round(index, order, sides["peer"], sides["ours"])
                result.rounds.append(rnd)
                progress(
                    f"round {index}/{rounds}: 1 bridge {rnd.peer.rate:,.0f} jobs/s, "
                    f"{MEMBERS} bridges {rnd.ours.rate:,.0f} jobs/s, ratio {rnd.ratio:.2f}"
                )
            after = [await processed(c) for c in configs["ours"]]
        for log_path in logs:
            result.warnings += [f"{log_path.name}: {line}" for line in log_problems(log_path)]
    shares = [
        (a - b) if a is not None and b is not None else None
        for a, b in zip(after, before, strict=True)
    ]
    ideal = WORKERS / DELAY
    result.details.update(
        {
            "jobs": JOBS,
            "delay_s": DELAY,
            "workers_per_bridge": WORKERS,
            "window_per_bridge": WINDOW,
            "ideal_jobs_per_s": {"peer": ideal, "ours": ideal * MEMBERS},
            "jobs_per_member": shares,
            "choices": [
                "the four bridges and the three NATS nodes are child processes started before "
                "the rounds; one driver (EccClient on NATS) in the bench process",
                "rounds alternate the order; the median of each side is kept",
                "cpu_s: the bridges' CPU over the flood (all members); nats_cpu_us_per_job: "
                "the three nats-server nodes' CPU over the flood divided by the jobs",
            ],
        }
    )
    result.tables.append(
        Table(
            "CPU per job, µs (bridges together; the three NATS nodes together)",
            ["round", "1 bridge", f"{MEMBERS} bridges", "nats: 1/3"],
            [
                [
                    str(r.index),
                    f"{(r.peer.cpu_s or 0) / r.peer.count * 1e6:.1f}",
                    f"{(r.ours.cpu_s or 0) / r.ours.count * 1e6:.1f}",
                    f"{r.peer.extra.get('nats_cpu_us_per_job', '-')}/"
                    f"{r.ours.extra.get('nats_cpu_us_per_job', '-')}",
                ]
                for r in result.rounds
            ],
        )
    )
    shares_text = ", ".join("?" if s is None else f"{s:,}" for s in shares)
    result.tables.append(
        Table(
            "jobs each of the three members ran (all rounds)",
            ["members", "jobs"],
            [[" ".join(f"m{i + 1}" for i in range(MEMBERS)), shares_text]],
        )
    )
    result.details["median_seconds"] = {
        "peer": round(median([r.peer.seconds for r in result.rounds]), 3),
        "ours": round(median([r.ours.seconds for r in result.rounds]), 3),
    }
    return result
