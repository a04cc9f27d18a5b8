"""``midbridge bench snmp-walk``: a walk of snmpd's MIB-2 through the bridge vs ``snmpbulkwalk``.

Workload: one net-snmp ``snmpd`` on 127.0.0.1 (its own config, every MIB-2 module it
implements, no MIB files loaded); :data:`WALKS` walks of ``1.3.6.1.2.1`` one after the
other, SNMP v2c, GETBULK with max-repetitions 10, per measurement. The community's view
hides the tables of :data:`VOLATILE` (the machine's processes and sockets, which change
while the bench runs), so every walk returns the same varbinds (~5,150 here, most of them
hrSWInstalled: the installed packages).

- peer: ``snmpbulkwalk -v2c -c COMMUNITY -Cr10 -On 127.0.0.1:PORT 1.3.6.1.2.1``, each run
  timed from spawn to exit; varbinds are its output lines that start with an OID
  (``-On``: numeric OIDs with a leading dot; a multi-line value's continuation lines do
  not count).
- ours: one SNMP job a time (``oid_spec_list: "walk 1.3.6.1.2.1"``, ``version 2c``,
  ``max_repetitions`` 10, a ``snmp_community`` credential), timed from its publish to the
  arrival of its complete record (the walk comes back in chunks of 1,000 varbinds);
  varbinds are counted in the answers.

Both sides must walk the same number of varbinds; a difference is a warning.
"""

from __future__ import annotations

import asyncio
import contextlib
import shutil
import tempfile
import time
from pathlib import Path
from typing import Any

from bridge.agent.config import LimitsConfig
from bridge.bench import BenchError
from bridge.bench.common import (
    BRIDGE_COMMAND,
    CpuMeter,
    Result,
    Side,
    bench_broker,
    bridge_process,
    broker_facts,
    log_problems,
    median,
    random_tag,
    reaped_children_cpu,
)
from bridge.bench.rounds import JobDriver, bench_config, cpu_table, side_by_side
from bridge.bench.snmp import CREDENTIAL_ID, credentials_text, snmp_versions
from bridge.bench.targets import SNMP_COMMUNITY, SnmpEndpoint, TreeMeter, snmp_agents, tool_env
from bridge.wire.client import EccClient, JobResult, output_record

ROOT = "1.3.6.1.2.1"
MAX_REPETITIONS = 10
WALKS = 10  # walks per measurement, one after the other
MAX_VARBINDS = 10_000  # the SNMP probe's default ceiling; the walk here is ~5,150
# Tables that change while the bench runs (the machine's processes and sockets): hidden
# from the community, so that every walk returns the same varbinds and a difference between
# the two sides means a fault, not a process that came or went.
VOLATILE = (
    "1.3.6.1.2.1.25.4",  # hrSWRun: running processes
    "1.3.6.1.2.1.25.5",  # hrSWRunPerf: their CPU and memory
    "1.3.6.1.2.1.6.13",  # tcpConnTable
    "1.3.6.1.2.1.6.19",  # tcpConnectionTable
    "1.3.6.1.2.1.6.20",  # tcpListenerTable
    "1.3.6.1.2.1.7.5",  # udpTable
    "1.3.6.1.2.1.7.7",  # udpEndpointTable
)
JOB_TIMEOUT = 60.0


# --- the peer: snmpbulkwalk ---------------------------------------------------------------------


def bulkwalk_command(tool: str, endpoint: SnmpEndpoint) -> list[str]:
    return [
        tool,
        "-v2c",
        "-c",
        SNMP_COMMUNITY,
        f"-Cr{MAX_REPETITIONS}",
        "-On",
        endpoint.text,
        ROOT,
    ]


async def bulkwalk_once(command: list[str]) -> tuple[int, float]:
    """(varbinds, seconds from spawn to exit) of one snmpbulkwalk run."""
    started = time.perf_counter()
    proc = await asyncio.create_subprocess_exec(
        *command,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
        env=tool_env(),
    )
    out, err = await proc.communicate()
    seconds = time.perf_counter() - started
    if proc.returncode != 0:
        raise BenchError(
            f"snmpbulkwalk exited {proc.returncode}: {err.decode(errors='replace')[-300:]}"
        )
    varbinds = sum(1 for line in out.splitlines() if line.startswith(b"."))
    return varbinds, seconds


async def walk_peer(command: list[str], meter: TreeMeter) -> Side:
    cpu = reaped_children_cpu()
    meter.start()
    counts: list[int] = []
    seconds = 0.0
    for _ in range(WALKS):
        varbinds, took = await bulkwalk_once(command)
        counts.append(varbinds)
        seconds += took
    side = Side(sum(counts), seconds, reaped_children_cpu() - cpu)
    side.extra["varbinds_per_walk"] = sorted(set(counts))
    side.extra["target_cpu_s"] = round(meter.stop(), 3)
    return side


# --- ours ---------------------------------------------------------------------------------------


def walk_job(agent_id: str, endpoint: SnmpEndpoint) -> dict[str, Any]:
    return output_record(
        "SNMP",
        agent=agent_id,
        source=endpoint.address,
        payload={
            "port": endpoint.port,
            "version": "2c",
            "credential_id": CREDENTIAL_ID,
            "oid_spec_list": f"walk {ROOT}",
            "max_repetitions": MAX_REPETITIONS,
            "max_varbinds": MAX_VARBINDS,
        },
        timeout=JOB_TIMEOUT,
    )


def walked(result: JobResult) -> tuple[int, bool]:
    """(varbinds in every chunk of the answer, whether the walk was truncated)."""
    if result.error_string:
        raise BenchError(f"the walk failed: {result.error_string}")
    count = 0
    for record in result.records:
        for entry in (record.get("payload") or {}).get("results") or []:
            count += len(entry.get("varbinds") or [])
    summary = (result.final.get("payload") or {}).get("summary") or {}
    if summary.get("varbinds") != count:
        raise BenchError(f"the walk reported {summary.get('varbinds')} varbinds, sent {count}")
    return count, bool(summary.get("truncated"))


async def walk_ours(
    driver: JobDriver, agent_id: str, endpoint: SnmpEndpoint, bridge_pid: int, meter: TreeMeter
) -> Side:
    cpu = CpuMeter(bridge_pid)
    cpu.start()
    meter.start()
    driver_cpu = time.process_time()
    counts: list[int] = []
    chunks: list[int] = []
    resumed: list[int] = []
    seconds = 0.0
    for _ in range(WALKS):
        took, [result] = await driver.run([walk_job(agent_id, endpoint)], 1)
        count, truncated = walked(result)
        if truncated:
            raise BenchError(f"the walk was truncated at {count} varbinds (max_varbinds)")
        counts.append(count)
        chunks.append(len(result.chunks))
        resumed.append(int((result.final["payload"].get("summary") or {}).get("bulk_resumed", 0)))
        seconds += took
    side = Side(sum(counts), seconds, cpu.stop())
    side.extra["varbinds_per_walk"] = sorted(set(counts))
    side.extra["input_records_per_walk"] = sorted(set(chunks))
    side.extra["bulk_resumed"] = sum(resumed)
    side.extra["driver_cpu_s"] = round(time.process_time() - driver_cpu, 3)
    side.extra["target_cpu_s"] = round(meter.stop(), 3)
    return side


# --- the benchmark ------------------------------------------------------------------------------


async def run(broker: tuple[str, int] | None, rounds: int) -> Result:
    tool = shutil.which("snmpbulkwalk")
    if tool is None:
        raise BenchError("snmpbulkwalk is not installed (apt-get install snmp)")
    agent = f"bench-walk-{random_tag()}"
    result = Result(
        name="snmp-walk",
        unit="varbinds/s",
        goal=0.9,
        peer=f"net-snmp snmpbulkwalk -Cr{MAX_REPETITIONS}, timed from spawn to exit",
        ours="an SNMP walk job through the bridge (child process), publish → complete record",
        peer_command=[],
        ours_command=BRIDGE_COMMAND,
        workload=f"{WALKS} walks of MIB-2 ({ROOT}, without the process and socket tables) "
        f"per measurement, one at a time, v2c, max-repetitions {MAX_REPETITIONS}, one snmpd "
        "on 127.0.0.1",
    )
    result.machine.update(snmp_versions())
    with tempfile.TemporaryDirectory(prefix="midbridge-bench-") as tmp:
        workdir = Path(tmp)
        log_path = workdir / "bridge.log"
        async with contextlib.AsyncExitStack() as stack:
            targets = await stack.enter_async_context(
                snmp_agents(workdir / "snmpd", [["127.0.0.1"]], excluded=VOLATILE)
            )
            [endpoint] = targets.endpoints
            broker_endpoint = await stack.enter_async_context(bench_broker(broker))
            result.broker = broker_facts(broker_endpoint)
            config = bench_config(
                broker_endpoint,
                agent,
                workdir,
                credentials=credentials_text(),
                limits=LimitsConfig(drain_timeout=2.0),
            )
            command = bulkwalk_command(tool, endpoint)
            result.peer_command = command
            bridge = await stack.enter_async_context(bridge_process(config, log_path))
            client = await stack.enter_async_context(
                EccClient(config.broker, agent=agent, prefix=config.bridge.topic_prefix)
            )
            driver = JobDriver(client, answer_within=JOB_TIMEOUT)
            meter = TreeMeter(targets.pids)
            agent_id = config.bridge.agent_id

            async def peer_side() -> Side:
                return await walk_peer(command, meter)

            async def ours_side() -> Side:
                return await walk_ours(driver, agent_id, endpoint, bridge.pid, meter)

            await side_by_side(result, rounds, peer_side, ours_side)
        result.warnings += [f"bridge log: {line}" for line in log_problems(log_path)]
    for rnd in result.rounds:
        peer_counts = rnd.peer.extra["varbinds_per_walk"]
        ours_counts = rnd.ours.extra["varbinds_per_walk"]
        if peer_counts != ours_counts:
            result.warnings.append(
                f"round {rnd.index}: the two sides walked different numbers of varbinds: "
                f"snmpbulkwalk {peer_counts}, bridge {ours_counts}"
            )
    result.details["varbinds_per_walk"] = median(
        [float(v) for r in result.rounds for v in r.ours.extra["varbinds_per_walk"]]
    )
    result.details["walks_per_measurement"] = WALKS
    result.details["bridge_config"] = {
        "limits": config.limits.model_dump(mode="json"),
        "security.require_validation": False,
        "credentials_file": "one snmp_community credential (chmod 600)",
        "job": {"max_repetitions": MAX_REPETITIONS, "max_varbinds": MAX_VARBINDS},
        "probes.settings.SNMP": "defaults (chunk_varbinds 1000, timeout 2 s, retries 1)",
    }
    result.details["choices"] = [
        "the same agent for both sides; one untimed warm-up of each side",
        "rounds alternate the order (peer first in odd rounds, ours first in even)",
        f"{WALKS} walks one after the other per measurement; rate = all varbinds / the sum "
        "of the walks' times",
        "peer: spawn to exit of each snmpbulkwalk (its start-up included, as a user sees "
        "it); ours: publish of the job to the arrival of its complete record",
        "cpu_s: snmpbulkwalk's from getrusage(RUSAGE_CHILDREN); the bridge's from "
        "/proc/PID/stat; target_cpu_s: snmpd's",
    ]
    result.tables.append(cpu_table(result, "snmpd"))
    return result
