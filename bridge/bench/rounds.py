"""The bridge's side of the probe benchmarks, and the rounds beside the peer.

The bridge side goes through :class:`JobDriver`: output records built and encoded before
the clock starts, published ``batch`` to a message, timed from the first publish to the
last complete answer. :func:`side_by_side` alternates the two sides, round after round.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import time
from collections.abc import Awaitable, Callable, Sequence
from pathlib import Path
from typing import Any

import orjson

from bridge.agent.config import BridgeSection, Config, LimitsConfig, ProbesConfig, SecurityConfig
from bridge.bench import BenchError
from bridge.bench.common import (
    CpuMeter,
    Result,
    Round,
    Side,
    Table,
    bridge_process,
    broker_section,
    progress,
)
from bridge.bench.peers import PeerProcess
from bridge.bench.targets import TreeMeter
from bridge.demo.broker import BrokerEndpoint
from bridge.wire.client import EccClient, JobResult


def write_credentials(path: Path, text: str) -> Path:
    """The credentials TOML, owner-only from the start (the bridge refuses anything else)."""
    path.unlink(missing_ok=True)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "w", encoding="utf-8") as out:
        out.write(text)
    return path


def bench_config(
    endpoint: BrokerEndpoint,
    agent: str,
    workdir: Path,
    *,
    credentials: str | None,
    limits: LimitsConfig,
    probe_settings: dict[str, dict[str, Any]] | None = None,
) -> Config:
    """The bridge's config: a credentials file (chmod 600), validation not required."""
    cred_file = (
        write_credentials(workdir / "credentials.toml", credentials) if credentials else None
    )
    return Config(
        broker=broker_section(endpoint),
        bridge=BridgeSection(agent=agent, state_dir=workdir / "state", credentials_file=cred_file),
        limits=limits,
        probes=ProbesConfig(settings=probe_settings or {}),
        security=SecurityConfig(require_validation=False),
        log_level="info",
    )


class JobDriver:
    """Publishes output records ``batch`` to a message and waits for every complete answer."""

    def __init__(self, client: EccClient, *, answer_within: float = 120.0) -> None:
        self.client = client
        self.answer_within = answer_within

    async def run(self, records: list[dict[str, Any]], batch: int) -> tuple[float, list[JobResult]]:
        """Wall seconds from the first publish to the last complete answer, and the answers."""
        client = self.client
        sys_ids = [str(r["sys_id"]) for r in records]
        bodies = [
            orjson.dumps(records[i]) if batch == 1 else orjson.dumps(records[i : i + batch])
            for i in range(0, len(records), batch)
        ]
        client.expect(sys_ids)
        session = client.session
        topic = client.topics.output
        started = time.perf_counter()
        pubacks = [await session.publish_start(topic, body) for body in bodies]
        try:
            results = await client.wait(sys_ids, self.answer_within)
        except TimeoutError:
            answered = sum(1 for s in sys_ids if client.results[s].done)
            for s in sys_ids:
                client.results.pop(s, None)
            raise BenchError(
                f"{answered:,} of {len(sys_ids):,} jobs answered within {self.answer_within:g} s"
            ) from None
        seconds = time.perf_counter() - started
        await asyncio.gather(*pubacks)
        for s in sys_ids:
            client.results.pop(s, None)
        return seconds, results


# --- rounds -------------------------------------------------------------------------------------


async def measure_peer(peer: PeerProcess, targets: TreeMeter | None = None) -> Side:
    """One pass of the peer child: its own count and wall time, its CPU from /proc."""
    meter = CpuMeter(peer.pid)
    meter.start()
    if targets is not None:
        targets.start()
    data = await peer.measure()
    cpu = meter.stop()
    extra: dict[str, Any] = {k: v for k, v in data.items() if k not in ("count", "seconds")}
    side = Side(int(data["count"]), float(data["seconds"]), cpu, extra)
    if targets is not None:
        side.extra["target_cpu_s"] = round(targets.stop(), 3)
    return side


async def measure_ours(
    driver: JobDriver,
    records: list[dict[str, Any]],
    batch: int,
    bridge_pid: int,
    check: Callable[[list[JobResult]], tuple[int, list[str]]],
    targets: TreeMeter | None = None,
) -> Side:
    """One pass through the bridge: ``check`` turns the answers into (units done, failures)."""
    meter = CpuMeter(bridge_pid)
    meter.start()
    if targets is not None:
        targets.start()
    driver_cpu = time.process_time()
    seconds, results = await driver.run(records, batch)
    driver_cpu = time.process_time() - driver_cpu
    cpu = meter.stop()
    count, failed = check(results)
    side = Side(count, seconds, cpu, {"failed": len(failed)})
    if failed:
        side.extra["failures"] = failed[:3]
    side.extra["driver_cpu_s"] = round(driver_cpu, 3)
    if targets is not None:
        side.extra["target_cpu_s"] = round(targets.stop(), 3)
    return side


async def side_by_side(
    result: Result,
    rounds: int,
    peer: Callable[[], Awaitable[Side]],
    ours: Callable[[], Awaitable[Side]],
) -> None:
    """One untimed warm-up of each side, then ``rounds`` alternating rounds into ``result``."""
    progress("warm-up: one untimed pass of each side")
    await peer()
    await ours()
    for index in range(1, rounds + 1):
        order = ("peer", "ours") if index % 2 else ("ours", "peer")
        sides: dict[str, Side] = {}
        for who in order:
            sides[who] = await (peer() if who == "peer" else ours())
        rnd = Round(index, order, sides["peer"], sides["ours"])
        result.rounds.append(rnd)
        progress(
            f"round {index}/{rounds}: peer {rnd.peer.rate:,.0f} {result.unit} "
            f"({rnd.peer.count:,} in {rnd.peer.seconds:.3f} s), ours {rnd.ours.rate:,.0f} "
            f"{result.unit} ({rnd.ours.count:,} in {rnd.ours.seconds:.3f} s), "
            f"ratio {rnd.ratio:.2f}"
        )
        for who, side in (("peer", rnd.peer), ("ours", rnd.ours)):
            if side.extra.get("failed"):
                result.warnings.append(
                    f"round {index}: {who}: {side.extra['failed']} unit(s) failed, e.g. "
                    f"{side.extra.get('failures', [])[:1]}"
                )


async def jobs_beside_peer(
    stack: contextlib.AsyncExitStack,
    result: Result,
    rounds: int,
    *,
    peer_command: list[str],
    config: Config,
    log_path: Path,
    target_pids: Sequence[int],
    jobs: Callable[[str], list[dict[str, Any]]],
    batch: int,
    check: Callable[[list[JobResult]], tuple[int, list[str]]],
) -> None:
    """The peer process's passes beside the same work sent as jobs through a bridge process.

    ``jobs(agent_id)`` makes one pass's output records; both sides' CPU is metered together
    with the targets' (``target_pids``).
    """
    peer = await stack.enter_async_context(PeerProcess(peer_command))
    bridge = await stack.enter_async_context(bridge_process(config, log_path))
    client = await stack.enter_async_context(
        EccClient(config.broker, agent=config.bridge.agent, prefix=config.bridge.topic_prefix)
    )
    driver = JobDriver(client)
    meter = TreeMeter(target_pids)
    agent_id = config.bridge.agent_id

    async def peer_side() -> Side:
        return await measure_peer(peer, meter)

    async def ours_side() -> Side:
        return await measure_ours(driver, jobs(agent_id), batch, bridge.pid, check, meter)

    await side_by_side(result, rounds, peer_side, ours_side)


def count_answers(
    results: list[JobResult],
    answers: Callable[[JobResult], list[tuple[str, Any]]],
    right: Callable[[Any], bool],
) -> tuple[int, list[str]]:
    """Units answered right, and what went wrong: ``answers(result)`` gives (who, answer)
    for each unit of a job; a job's error string counts as one failure."""
    ok = 0
    bad: list[str] = []
    for result in results:
        if result.error_string:
            bad.append(result.error_string)
            continue
        for who, answer in answers(result):
            if right(answer):
                ok += 1
            else:
                bad.append(f"{who}: unexpected answer {orjson.dumps(answer)[:200]!r}")
    return ok, bad


def cpu_table(result: Result, target: str) -> Table:
    """CPU per unit of each side, of the targets meanwhile and of the bench's driver."""

    def per_unit(side: Side, seconds: float | None) -> str:
        if seconds is None or not side.count:
            return "-"
        return f"{seconds / side.count * 1e6:.1f}"

    return Table(
        f"CPU per unit, µs: the measured process; {target} meanwhile; the bench's MQTT driver",
        ["round", "peer", "bridge", f"{target}: peer/ours", "driver (ours)"],
        [
            [
                str(r.index),
                per_unit(r.peer, r.peer.cpu_s),
                per_unit(r.ours, r.ours.cpu_s),
                f"{per_unit(r.peer, r.peer.extra.get('target_cpu_s'))}/"
                f"{per_unit(r.ours, r.ours.extra.get('target_cpu_s'))}",
                per_unit(r.ours, r.ours.extra.get("driver_cpu_s")),
            ]
            for r in result.rounds
        ],
    )
