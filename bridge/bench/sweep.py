"""``midbridge bench sweep``: a Shazzam job through the bridge vs ``nmap -sT -T5``.

Workload: 127.0.0.1-127.0.0.254 × ports 20000-20099 (25,400 TCP connects), with 50
listeners open on a few of those addresses. The listeners live in a child process of their
own (a plain ``selectors`` accept loop) so that accepting never competes with the measured
process's event loop.

- peer: ``nmap -sT -T5 -n -Pn -p20000-20099 127.0.0.1-254 -oG -``, timed from spawn to exit.
- ours: the bridge as a child process (``python -m bridge run``, configured through
  MIDBRIDGE_* variables, started once before the rounds, default limits); a platform-side
  ``EccClient`` in this process publishes one Shazzam output record per round, and the time
  runs from the publish to the arrival of the job's complete input record.

Both must report the same open ports (and those must be the listeners); a difference is a
warning in the output.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import re
import selectors
import shutil
import socket
import sys
import tempfile
import time
import uuid
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import orjson

from bridge.bench import BenchError
from bridge.bench.common import (
    BRIDGE_COMMAND,
    CpuMeter,
    Result,
    Round,
    Side,
    Table,
    bench_broker,
    bridge_process,
    broker_facts,
    log_problems,
    median,
    plain_config,
    progress,
    ready_child,
    reaped_children_cpu,
)
from bridge.sweep_cli import sweep_hosts
from bridge.wire.client import EccClient, output_record

FIRST_PORT, LAST_PORT = 20000, 20099
PORTS = f"{FIRST_PORT}-{LAST_PORT}"
NMAP_TARGETS = "127.0.0.1-254"
TARGETS = "127.0.0.1-127.0.0.254"
ADDRESSES = 254
PROBES = ADDRESSES * (LAST_PORT - FIRST_PORT + 1)
NMAP_ARGS = ["-sT", "-T5", "-n", "-Pn", f"-p{PORTS}", NMAP_TARGETS, "-oG", "-"]
JOB_TIMEOUT = 300.0  # the job's own deadline
ANSWER_WITHIN = 60.0  # no complete answer by then: fail the benchmark

# 50 listeners: most on 127.0.0.1, a few on other addresses, first/last ports included.
LISTENERS: tuple[tuple[str, int], ...] = (
    *(("127.0.0.1", port) for port in range(FIRST_PORT, FIRST_PORT + 40)),
    *(("127.0.0.2", port) for port in range(FIRST_PORT, FIRST_PORT + 5)),
    ("127.0.0.77", 20010),
    ("127.0.0.77", 20050),
    ("127.0.0.77", LAST_PORT),
    ("127.0.0.254", FIRST_PORT),
    ("127.0.0.254", LAST_PORT),
)

OpenPorts = set[tuple[str, int]]


# --- the listeners (child process) ----------------------------------------------------------------


def listen_main(spec: str) -> int:
    """Open the listeners in ``spec`` (JSON ``[[host, port], ...]``), accept and close until
    stdin reaches EOF. Prints ``ready <JSON of the listeners opened>`` once bound."""
    selector = selectors.DefaultSelector()
    opened: list[tuple[str, int]] = []
    for host, port in orjson.loads(spec):
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind((host, int(port)))
        except OSError:
            sock.close()
            continue
        sock.listen(4096)
        sock.setblocking(False)
        selector.register(sock, selectors.EVENT_READ)
        opened.append((host, int(port)))
    stdin = sys.stdin.fileno()
    selector.register(stdin, selectors.EVENT_READ)
    print("ready " + orjson.dumps(opened).decode(), flush=True)
    while True:
        for key, _mask in selector.select():
            if key.fileobj == stdin:
                if not os.read(stdin, 4096):
                    return 0
                continue
            listener: socket.socket = key.fileobj  # type: ignore[assignment]
            while True:
                try:
                    conn, _addr = listener.accept()
                except (BlockingIOError, InterruptedError):
                    break
                except OSError:
                    break
                conn.close()


@contextlib.asynccontextmanager
async def listeners() -> AsyncIterator[OpenPorts]:
    spec = orjson.dumps(LISTENERS).decode()
    command = (sys.executable, "-m", "bridge.bench.sweep", "listen", spec)
    async with ready_child("the listener process", *command) as (_proc, opened):
        yield {(host, int(port)) for host, port in orjson.loads(opened)}


def busy_before(ports: OpenPorts) -> OpenPorts:
    """Listeners this bench did not open that the sweep will find anyway (they skew nothing,
    but both sides must see them)."""
    found: OpenPorts = set()
    with contextlib.suppress(OSError):
        for line in Path("/proc/net/tcp").read_text().splitlines()[1:]:
            parts = line.split()
            local, state = parts[1], parts[3]
            if state != "0A":  # LISTEN
                continue
            addr_hex, port_hex = local.split(":")
            port = int(port_hex, 16)
            ip = socket.inet_ntoa(bytes.fromhex(addr_hex)[::-1])
            if not FIRST_PORT <= port <= LAST_PORT:
                continue
            if ip == "0.0.0.0":  # every address answers for it
                found |= {(f"127.0.0.{i}", port) for i in range(1, ADDRESSES + 1)}
            elif ip.startswith("127."):
                found.add((ip, port))
    found -= ports
    return found


# --- the peer: nmap -------------------------------------------------------------------------------

_NMAP_DONE = re.compile(r"scanned in ([0-9.]+) seconds")


def parse_grepable(text: str) -> tuple[OpenPorts, float | None]:
    """Open (address, port) pairs from nmap's ``-oG`` output, and nmap's own elapsed time."""
    found: OpenPorts = set()
    elapsed: float | None = None
    for line in text.splitlines():
        if line.startswith("Host: ") and "Ports: " in line:
            ip = line.split()[1]
            ports_part = line.split("Ports: ", 1)[1].split("\t", 1)[0]
            for entry in ports_part.split(", "):
                fields = entry.strip().split("/")
                if len(fields) > 2 and fields[1] == "open":
                    found.add((ip, int(fields[0])))
        match = _NMAP_DONE.search(line)
        if match:
            elapsed = float(match.group(1))
    return found, elapsed


async def run_nmap(command: list[str]) -> tuple[Side, OpenPorts]:
    cpu_before = reaped_children_cpu()
    started = time.perf_counter()
    proc = await asyncio.create_subprocess_exec(
        *command, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE
    )
    out, err = await proc.communicate()
    seconds = time.perf_counter() - started
    cpu = reaped_children_cpu() - cpu_before
    if proc.returncode != 0:
        raise BenchError(f"nmap exited {proc.returncode}: {err.decode(errors='replace')[-500:]}")
    found, own_elapsed = parse_grepable(out.decode(errors="replace"))
    extra: dict[str, Any] = {"open_ports": len(found)}
    if own_elapsed is not None:
        extra["nmap_reported_s"] = own_elapsed
    return Side(PROBES, seconds, cpu, extra), found


# --- ours: the bridge -----------------------------------------------------------------------------


async def run_ours(client: EccClient, agent_id: str, meter: CpuMeter) -> tuple[Side, OpenPorts]:
    record = output_record(
        "Shazzam",
        agent=agent_id,
        payload={"targets": TARGETS, "ports": PORTS},
        source=TARGETS,
        timeout=JOB_TIMEOUT,
    )
    meter.start()
    started = time.perf_counter()
    await client.send([record])
    try:
        [result] = await client.wait([record["sys_id"]], timeout=ANSWER_WITHIN)
    except TimeoutError:
        raise BenchError(
            f"the Shazzam job was not answered within {ANSWER_WITHIN:g} s (a sweep takes well "
            "under a second here): the bridge stalled"
        ) from None
    seconds = time.perf_counter() - started
    cpu = meter.stop()
    if result.error_string:
        raise BenchError(f"the Shazzam job failed: {result.error_string}")
    found: OpenPorts = set()
    for host in sweep_hosts(result):
        for entry in host.get("open") or []:
            found.add((str(host.get("ip")), int(entry["port"])))
    totals = (result.final.get("payload") or {}).get("totals") or {}
    probes = int(totals.get("probes", 0))
    if probes != PROBES:
        raise BenchError(f"the sweep reported {probes} probes, expected {PROBES}")
    extra = {
        "open_ports": len(found),
        "input_records": len(result.chunks),
        "engine_s": totals.get("duration_s"),
        "engine_probes_per_s": totals.get("probes_per_s"),
    }
    return Side(PROBES, seconds, cpu, extra), found


def _describe(found: OpenPorts, wanted: OpenPorts) -> str:
    missing = sorted(wanted - found)
    extra = sorted(found - wanted)
    parts = []
    if missing:
        parts.append(f"missing {len(missing)} (e.g. {missing[:3]})")
    if extra:
        parts.append(f"unexpected {len(extra)} (e.g. {extra[:3]})")
    return "; ".join(parts)


# --- the benchmark --------------------------------------------------------------------------------


async def run(broker: tuple[str, int] | None, rounds: int) -> Result:
    nmap = shutil.which("nmap")
    if nmap is None:
        raise BenchError("nmap is not installed (apt-get install nmap)")
    peer_command = [nmap, *NMAP_ARGS]
    agent = f"bench-sweep-{uuid.uuid4().hex[:8]}"
    result = Result(
        name="sweep",
        unit="probes/s",
        goal=1.0,
        peer="nmap -sT -T5 (TCP connect scan), timed from spawn to exit",
        ours="Shazzam job through the bridge (child process), publish → complete input record",
        peer_command=peer_command,
        ours_command=BRIDGE_COMMAND,
        workload=f"{ADDRESSES} addresses × 100 ports = {PROBES:,} TCP connects on loopback, "
        f"{len(LISTENERS)} listeners",
    )
    with tempfile.TemporaryDirectory(prefix="midbridge-bench-") as tmp:
        workdir = Path(tmp)
        async with contextlib.AsyncExitStack() as stack:
            endpoint = await stack.enter_async_context(bench_broker(broker))
            result.broker = broker_facts(endpoint)
            opened = await stack.enter_async_context(listeners())
            wanted = opened | busy_before(opened)
            if len(opened) != len(LISTENERS):
                result.warnings.append(
                    f"only {len(opened)} of {len(LISTENERS)} listeners could be opened"
                )
            config = plain_config(endpoint, agent, workdir)
            log_path = workdir / "bridge.log"
            bridge = await stack.enter_async_context(bridge_process(config, log_path))
            client = await stack.enter_async_context(
                EccClient(config.broker, agent=agent, prefix=config.bridge.topic_prefix)
            )
            meter = CpuMeter(bridge.pid)
            agent_id = config.bridge.agent_id
            result.details["bridge_config"] = {
                "limits": config.limits.model_dump(mode="json"),
                "shazzam": config.probes.shazzam.model_dump(mode="json"),
                "env": "MIDBRIDGE_* variables (every setting at its default but agent, "
                "state_dir, broker)",
            }

            progress("warm-up: one untimed run of each side")
            await run_nmap(peer_command)
            await run_ours(client, agent_id, meter)

            peer_found: OpenPorts = set()
            ours_found: OpenPorts = set()
            for index in range(1, rounds + 1):
                order = ("peer", "ours") if index % 2 else ("ours", "peer")
                sides: dict[str, Side] = {}
                for side in order:
                    if side == "peer":
                        sides[side], peer_found = await run_nmap(peer_command)
                    else:
                        sides[side], ours_found = await run_ours(client, agent_id, meter)
                rnd = Round(index, order, sides["peer"], sides["ours"])
                result.rounds.append(rnd)
                progress(
                    f"round {index}/{rounds}: nmap {rnd.peer.rate:,.0f} probes/s, "
                    f"bridge {rnd.ours.rate:,.0f} probes/s, ratio {rnd.ratio:.2f}"
                )
                if peer_found != ours_found:
                    result.warnings.append(
                        f"round {index}: nmap and the bridge found different open ports: "
                        f"bridge vs nmap: {_describe(ours_found, peer_found)}"
                    )
                for who, found in (("nmap", peer_found), ("the bridge", ours_found)):
                    if found != wanted:
                        result.warnings.append(
                            f"round {index}: {who} vs the listeners: {_describe(found, wanted)}"
                        )
            result.details["open_ports_expected"] = len(wanted)
            result.details["open_ports_agree"] = peer_found == ours_found == wanted
            result.details["engine_probes_per_s_median"] = median(
                [float(r.ours.extra.get("engine_probes_per_s") or 0) for r in result.rounds]
            )
            result.details["choices"] = [
                "bridge in a child process (its own core, as deployed), started once before "
                "the rounds; its start-up is not timed",
                "one untimed warm-up run of each side before round 1",
                "rounds alternate the order (peer first in odd rounds, ours first in even)",
                "listeners in a separate process (selectors accept loop), open for both sides",
                "cpu_s: nmap's from getrusage(RUSAGE_CHILDREN); the bridge's from "
                "/proc/PID/stat over the timed window (all threads)",
                "the soft RLIMIT_NOFILE is raised to the hard limit before anything starts",
            ]
        result.warnings += [f"bridge log: {line}" for line in log_problems(log_path)]
    result.tables.append(
        Table(
            "per round: wall seconds as timed here (and as the tool itself reports), CPU "
            "seconds of the measured process",
            [
                "round",
                "nmap s",
                "(nmap's own)",
                "nmap cpu",
                "bridge s",
                "(engine)",
                "bridge cpu",
                "engine probes/s",
            ],
            [
                [
                    str(r.index),
                    f"{r.peer.seconds:.3f}",
                    f"{r.peer.extra.get('nmap_reported_s', '-')}",
                    f"{r.peer.cpu_s or 0:.3f}",
                    f"{r.ours.seconds:.3f}",
                    f"{r.ours.extra.get('engine_s', '-')}",
                    f"{r.ours.cpu_s or 0:.3f}",
                    f"{r.ours.extra.get('engine_probes_per_s') or 0:,}",
                ]
                for r in result.rounds
            ],
        )
    )
    return result


if __name__ == "__main__" and sys.argv[1:2] == ["listen"]:
    sys.exit(listen_main(sys.argv[2]))
