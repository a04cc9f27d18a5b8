"""Shared pieces of the benchmarks: results and their printing, machine facts, child processes.

A benchmark measures a *peer* (a named reference tool) and *ours* (midbridge) side by side in
one run: ``rounds`` rounds, each measuring both (the order alternates from round to round so
neither side always runs on a warmer machine), and the median of each side is kept. The
headline ratio is ``median(ours) / median(peer)``.
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime
import importlib.metadata
import os
import platform
import resource
import secrets
import shutil
import statistics
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

import orjson

from bridge.agent.config import BridgeSection, Config, LimitsConfig, config_env
from bridge.bench import BenchError
from bridge.demo.broker import BrokerEndpoint, embedded_broker, find_mosquitto, stop_process
from bridge.wire.broker import BrokerConfig
from bridge.wire.errors import INSECURE_DEFAULT_NOTE

REPO = Path(__file__).resolve().parent.parent
_CLOCK_TICKS = os.sysconf("SC_CLK_TCK")
T = TypeVar("T")


# --- results ----------------------------------------------------------------------------------


@dataclass
class Side:
    """One measurement of one side: ``count`` units of work in ``seconds``."""

    count: int
    seconds: float
    cpu_s: float | None = None  # CPU the measured process used meanwhile (all its threads)
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def rate(self) -> float:
        return self.count / self.seconds if self.seconds > 0 else 0.0

    def as_dict(self) -> dict[str, Any]:
        data: dict[str, Any] = {
            "rate": round(self.rate, 1),
            "count": self.count,
            "seconds": round(self.seconds, 6),
        }
        if self.cpu_s is not None:
            data["cpu_s"] = round(self.cpu_s, 3)
            data["cpu_us_per_unit"] = round(self.cpu_s / self.count * 1e6, 2) if self.count else 0
        data.update(self.extra)
        return data


@dataclass
class Round:
    index: int
    order: tuple[str, str]
    peer: Side
    ours: Side

    @property
    def ratio(self) -> float:
        return self.ours.rate / self.peer.rate if self.peer.rate else 0.0

    def as_dict(self) -> dict[str, Any]:
        return {
            "round": self.index,
            "order": list(self.order),
            "peer": self.peer.as_dict(),
            "ours": self.ours.as_dict(),
            "ratio": round(self.ratio, 3),
        }


@dataclass
class Table:
    title: str
    headers: list[str]
    rows: list[list[str]]
    left: int = 1  # columns aligned left; the rest are numbers, aligned right


@dataclass
class Result:
    name: str
    unit: str
    goal: float | None  # the ratio ours / peer aimed at; None: a measurement without a goal
    peer: str  # what the peer is, in words
    ours: str
    peer_command: list[str]
    ours_command: list[str]
    workload: str
    rounds: list[Round] = field(default_factory=list)
    details: dict[str, Any] = field(default_factory=dict)
    tables: list[Table] = field(default_factory=list)  # printed after the rounds
    warnings: list[str] = field(default_factory=list)
    machine: dict[str, Any] = field(default_factory=dict)
    broker: dict[str, Any] = field(default_factory=dict)
    date: str = field(default_factory=lambda: datetime.datetime.now(datetime.UTC).isoformat())

    @property
    def peer_rate(self) -> float:
        return median([r.peer.rate for r in self.rounds])

    @property
    def ours_rate(self) -> float:
        return median([r.ours.rate for r in self.rounds])

    @property
    def ratio(self) -> float:
        return self.ours_rate / self.peer_rate if self.peer_rate else 0.0

    @property
    def cpu_ratio(self) -> float | None:
        """Peer's CPU per unit / ours (median over rounds): the rate ratio if each measured
        process had a core to itself and CPU were all that limited it."""
        peer = [r.peer.cpu_s / r.peer.count for r in self.rounds if r.peer.cpu_s and r.peer.count]
        ours = [r.ours.cpu_s / r.ours.count for r in self.rounds if r.ours.cpu_s and r.ours.count]
        if not peer or not ours:
            return None
        return median(peer) / median(ours)

    def as_dict(self) -> dict[str, Any]:
        cpu_ratio = self.cpu_ratio
        return {
            "name": self.name,
            "unit": self.unit,
            "peer": self.peer,
            "ours": self.ours,
            "peer_rate": round(self.peer_rate, 1),
            "ours_rate": round(self.ours_rate, 1),
            "ratio": round(self.ratio, 3),
            "goal": self.goal,
            "goal_met": self.ratio >= self.goal if self.goal is not None else None,
            "median_of_round_ratios": round(median([r.ratio for r in self.rounds]), 3),
            "cpu_ratio": round(cpu_ratio, 3) if cpu_ratio is not None else None,
            "workload": self.workload,
            "peer_command": self.peer_command,
            "ours_command": self.ours_command,
            "rounds": [r.as_dict() for r in self.rounds],
            "details": self.details,
            "warnings": self.warnings,
            "broker": self.broker,
            "machine": self.machine,
            "date": self.date,
        }


def median(values: Sequence[float]) -> float:
    return float(statistics.median(values)) if values else 0.0


def percentile(values: Sequence[float], q: float) -> float:
    """The ``q`` quantile (0..1) by the nearest-rank method."""
    if not values:
        return 0.0
    ordered = sorted(values)
    rank = max(1, min(len(ordered), round(q * len(ordered) + 0.5)))
    return float(ordered[rank - 1])


def fmt_rate(value: float) -> str:
    return f"{value:,.0f}"


def render_table(table: Table) -> str:
    widths = [len(h) for h in table.headers]
    for row in table.rows:
        widths = [max(w, len(cell)) for w, cell in zip(widths, row, strict=True)]

    def line(cells: Sequence[str]) -> str:
        parts = [
            cell.ljust(width) if i < table.left else cell.rjust(width)
            for i, (cell, width) in enumerate(zip(cells, widths, strict=True))
        ]
        return "  ".join(parts).rstrip()

    out = [table.title, line(table.headers), line(["-" * w for w in widths])]
    out += [line(row) for row in table.rows]
    return "\n".join(out)


def render(result: Result) -> str:
    unit = result.unit
    rows = [
        [
            str(r.index),
            "→".join(r.order),
            fmt_rate(r.peer.rate),
            fmt_rate(r.ours.rate),
            f"{r.ratio:.2f}",
        ]
        for r in result.rounds
    ]
    rows.append(
        [
            "median",
            "",
            fmt_rate(result.peer_rate),
            fmt_rate(result.ours_rate),
            f"{result.ratio:.2f}",
        ]
    )
    main = Table(
        f"{result.name}: {result.workload}",
        ["round", "order", f"peer {unit}", f"ours {unit}", "ratio"],
        rows,
        left=2,
    )
    if result.goal is None:
        summary = f"ratio ours/peer {result.ratio:.2f} (no goal: a measurement to compare with)"
    else:
        verdict = "met" if result.ratio >= result.goal else "NOT met"
        summary = f"ratio ours/peer {result.ratio:.2f} (goal ≥ {result.goal:g}: {verdict})"
    cpu_ratio = result.cpu_ratio
    if cpu_ratio is not None:
        summary += (
            f"; CPU per unit, peer/ours: {cpu_ratio:.2f} (the ratio if each measured process "
            "had a core of its own)"
        )
    parts = [
        render_table(main),
        f"peer: {result.peer}\n  $ {' '.join(result.peer_command)}",
        f"ours: {result.ours}\n  $ {' '.join(result.ours_command)}",
        summary,
    ]
    parts += [render_table(t) for t in result.tables]
    m = result.machine
    parts.append(
        f"machine: {m.get('cores')} cores ({m.get('cpu_model')}), python {m.get('python')}, "
        f"gmqtt {m.get('gmqtt')}, uvloop {m.get('uvloop')}, {m.get('mosquitto')}, "
        f"{m.get('nmap')}; broker {result.broker.get('kind')} "
        f"{result.broker.get('host')}:{result.broker.get('port')}; load "
        f"{m.get('loadavg_before')} → {m.get('loadavg_after')}"
    )
    parts += [f"WARNING: {w}" for w in result.warnings]
    return "\n\n".join(parts)


def to_json(result: Result) -> str:
    return orjson.dumps(result.as_dict(), option=orjson.OPT_INDENT_2).decode()


def progress(message: str) -> None:
    """A progress line on stderr (stdout stays clean for ``--json``)."""
    print(f"bench: {message}", file=sys.stderr, flush=True)


# --- the machine --------------------------------------------------------------------------------


def first_line(command: Sequence[str]) -> str | None:
    try:
        done = subprocess.run(command, capture_output=True, text=True, timeout=10, check=False)
    except (OSError, subprocess.TimeoutExpired):
        return None
    text = (done.stdout or done.stderr).strip()
    return text.splitlines()[0] if text else None


def _version(dist: str) -> str | None:
    try:
        return importlib.metadata.version(dist)
    except importlib.metadata.PackageNotFoundError:
        return None


def tool_versions(*dists: str) -> dict[str, Any]:
    """The installed version of each distribution (None: not installed)."""
    return {dist: _version(dist) for dist in dists}


def random_tag() -> str:
    """A short random tag that keeps one run's agent names apart from another's."""
    return secrets.token_hex(4)


def _cpu_model() -> str | None:
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    return platform.processor() or None


def _memory_gib() -> float | None:
    with contextlib.suppress(OSError, ValueError, IndexError):
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemTotal:"):
                return round(int(line.split()[1]) / 1024 / 1024, 1)
    return None


def loadavg() -> list[float]:
    with contextlib.suppress(OSError, ValueError):
        return [float(x) for x in Path("/proc/loadavg").read_text().split()[:3]]
    return []


def _git_revision() -> str | None:
    rev = first_line(["git", "-C", str(REPO), "rev-parse", "--short", "HEAD"])
    if rev is None:
        return None
    dirty = first_line(["git", "-C", str(REPO), "status", "--porcelain"])
    return rev + ("+dirty" if dirty else "")


def machine_info() -> dict[str, Any]:
    mosquitto = find_mosquitto()
    nmap = shutil.which("nmap")
    return {
        "cores": os.cpu_count(),
        "cores_usable": len(os.sched_getaffinity(0)),
        "cpu_model": _cpu_model(),
        "memory_gib": _memory_gib(),
        "kernel": platform.release(),
        "python": platform.python_version(),
        "midbridge": _version("midbridge"),
        "git": _git_revision(),
        "gmqtt": _version("gmqtt"),
        "uvloop": _version("uvloop"),
        "orjson": _version("orjson"),
        "mosquitto": first_line([mosquitto, "-h"]) if mosquitto else None,
        "nmap": first_line([nmap, "--version"]) if nmap else None,
        "nofile_limit": resource.getrlimit(resource.RLIMIT_NOFILE)[0],
        "loadavg_before": loadavg(),
    }


def raise_nofile_limit() -> None:
    """Soft file-descriptor limit up to the hard one; children (nmap, the bridge) inherit it."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard == resource.RLIM_INFINITY:
        hard = max(soft, 1_048_576)
    if soft != resource.RLIM_INFINITY and soft < hard:
        with contextlib.suppress(ValueError, OSError):
            resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))


# --- CPU accounting -------------------------------------------------------------------------------


def process_cpu(pid: int) -> float | None:
    """CPU seconds (user + system, all threads) a live process has used so far."""
    try:
        text = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    fields = text[text.rindex(")") + 2 :].split()
    return (int(fields[11]) + int(fields[12])) / _CLOCK_TICKS


def own_cpu() -> float:
    """CPU seconds of this process so far (all threads)."""
    cpu = process_cpu(os.getpid())
    return cpu if cpu is not None else time.process_time()


def reaped_children_cpu() -> float:
    """CPU seconds used by the children this process has waited for (nmap runs)."""
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


def proc_stats() -> Iterator[tuple[int, str, int]]:
    """(pid, command name, parent pid) of every live process, from /proc."""
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            text = (entry / "stat").read_text()
        except OSError:
            continue
        comm = text[text.index("(") + 1 : text.rindex(")")]
        ppid = int(text[text.rindex(")") + 2 :].split()[1])
        yield int(entry.name), comm, ppid


def child_pid(name: str) -> int | None:
    """The pid of one of this process's children whose command name is ``name``."""
    me = os.getpid()
    for pid, comm, ppid in proc_stats():
        if ppid == me and comm == name:
            return pid
    return None


class CpuMeter:
    """CPU used by a live process between ``start()`` and ``stop()``."""

    def __init__(self, pid: int | None) -> None:
        self.pid = pid
        self._start: float | None = None

    def start(self) -> None:
        self._start = process_cpu(self.pid) if self.pid else None

    def stop(self) -> float | None:
        if self.pid is None or self._start is None:
            return None
        end = process_cpu(self.pid)
        return None if end is None else end - self._start


class CpuMeters:
    """Several :class:`CpuMeter` read as one (the nodes of a NATS cluster)."""

    def __init__(self, pids: Sequence[int | None]) -> None:
        self.meters = [CpuMeter(pid) for pid in pids]

    def start(self) -> None:
        for meter in self.meters:
            meter.start()

    def stop(self) -> float | None:
        """CPU seconds they used together (None if any is unknown)."""
        used = [meter.stop() for meter in self.meters]
        if not used or any(u is None for u in used):
            return None
        return sum(u for u in used if u is not None)


def echo_answer(job: dict[str, Any], agent_id: str, new_id: str, created: str) -> dict[str, Any]:
    """The one input record the benchmarks' bare echo responders answer a job with (the
    same fields as the bridge's Echo answer)."""
    params = job.get("payload") or {}
    return {
        "sys_id": new_id,
        "agent": job.get("agent") or agent_id,
        "topic": job.get("topic", ""),
        "name": job.get("name", ""),
        "source": job.get("source", ""),
        "queue": "input",
        "state": "ready",
        "response_to": job["sys_id"],
        "agent_correlator": job.get("agent_correlator", ""),
        "priority": job.get("priority", 2),
        "error_string": "",
        "payload": {"message": params.get("message", ""), "chunk": 0},
        "sys_created_on": created,
        "sequence": 0,
        "complete": True,
        "result_code": 0,
        "probe_time": 0.0,
    }


# --- the event loop ---------------------------------------------------------------------------


def run_uvloop(main: Callable[[], Awaitable[T]]) -> T:
    """``main()`` on uvloop, like the bridge (asyncio's own loop where uvloop is missing)."""

    async def wrapped() -> T:
        return await main()

    try:
        import uvloop
    except ImportError:  # pragma: no cover - platforms without uvloop
        return asyncio.run(wrapped())
    return uvloop.run(wrapped())


# --- the broker ---------------------------------------------------------------------------------


@contextlib.asynccontextmanager
async def bench_broker(broker: tuple[str, int] | None) -> AsyncIterator[BrokerEndpoint]:
    """The broker given, else a private mosquitto (raised limits, ``set_tcp_nodelay``)."""
    if broker is not None:
        async with embedded_broker(broker) as endpoint:
            yield endpoint
    else:
        async with embedded_broker(force="mosquitto") as endpoint:
            yield endpoint


def broker_facts(endpoint: BrokerEndpoint) -> dict[str, Any]:
    facts: dict[str, Any] = {
        "kind": endpoint.kind,
        "host": endpoint.host,
        "port": endpoint.port,
        "protocol": endpoint.protocol,
    }
    if endpoint.kind == "mosquitto":
        facts["config"] = "bridge.demo.broker.mosquitto_config (set_tcp_nodelay, raised limits)"
    return facts


# --- the bridge's config -------------------------------------------------------------------


def broker_section(endpoint: BrokerEndpoint) -> BrokerConfig:
    """The bridge's ``[broker]`` for ``endpoint``: a session that outlives a reconnect."""
    return BrokerConfig(
        host=endpoint.host, port=endpoint.port, protocol=endpoint.protocol, session_expiry=300
    )


def plain_config(endpoint: BrokerEndpoint, agent: str, workdir: Path) -> Config:
    """The bridge's defaults, a short drain, its state in ``workdir``."""
    return Config(
        broker=broker_section(endpoint),
        bridge=BridgeSection(agent=agent, state_dir=workdir / "state"),
        limits=LimitsConfig(drain_timeout=2.0),
        log_level="info",
    )


def plain_config_for(broker: BrokerConfig, agent: str, workdir: Path, **limits: Any) -> Config:
    """:func:`plain_config` for a broker given as a ``BrokerConfig`` (NATS), ``limits``
    changed where given."""
    return Config(
        broker=broker,
        bridge=BridgeSection(agent=agent, state_dir=workdir / "state"),
        limits=LimitsConfig(**{"drain_timeout": 2.0, **limits}),
        log_level="info",
    )


# --- child processes ------------------------------------------------------------------------------


BRIDGE_COMMAND = [sys.executable, "-m", "bridge", "--log-level", "info", "run"]


@contextlib.asynccontextmanager
async def bridge_process(
    config: Config, log_path: Path, *, ready_timeout: float = 30.0
) -> AsyncIterator[asyncio.subprocess.Process]:
    """``python -m bridge run`` configured through MIDBRIDGE_* variables, up and subscribed."""
    with log_path.open("ab") as log_file:
        proc = await asyncio.create_subprocess_exec(
            *BRIDGE_COMMAND,
            env=config_env(config),
            cwd=REPO,
            stdin=asyncio.subprocess.DEVNULL,
            stdout=log_file,
            stderr=log_file,
        )
    try:
        deadline = time.monotonic() + ready_timeout
        while True:
            text = _read_log(log_path)
            if " up: " in text:
                break
            if proc.returncode is not None or time.monotonic() > deadline:
                raise RuntimeError(f"the bridge did not come up; its log:\n{text[-3000:]}")
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(proc.wait(), 0.05)
        yield proc
    finally:
        await stop_process(proc)


def _read_log(path: Path) -> str:
    return path.read_bytes().decode(errors="replace")


def log_problems(log_path: Path) -> list[str]:
    """WARNING/ERROR lines a child wrote to its log (they would cast doubt on a result).

    Not the bridge's start-up notes on insecure defaults: the benchmarks run it on an
    anonymous broker without signatures on purpose, and that changes no number."""
    try:
        lines = log_path.read_text(errors="replace").splitlines()
    except OSError:
        return []
    problems = [line for line in lines if " WARNING " in line or " ERROR " in line]
    return [line for line in problems if INSECURE_DEFAULT_NOTE not in line][:10]


@contextlib.asynccontextmanager
async def ready_child(
    what: str, *argv: str
) -> AsyncIterator[tuple[asyncio.subprocess.Process, str]]:
    """A child that prints ``ready ...`` once it serves and stops at EOF on its stdin: the
    process and the rest of that line. ``what`` names it in the error if it does not start."""
    proc = await asyncio.create_subprocess_exec(
        *argv, stdin=asyncio.subprocess.PIPE, stdout=asyncio.subprocess.PIPE
    )
    assert proc.stdout is not None
    assert proc.stdin is not None
    try:
        line = (await asyncio.wait_for(proc.stdout.readline(), 30)).decode()
        if not line.startswith("ready "):
            raise BenchError(f"{what} did not start: {line!r}")
        yield proc, line[6:]
    finally:
        proc.stdin.close()
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(proc.wait(), 5)
        await stop_process(proc, 2)
