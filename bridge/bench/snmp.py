"""``midbridge bench snmp-get``: SNMP GETs across 200 agents, through the bridge vs gufo-snmp.

Workload: :data:`GETS` GET requests (sysDescr.0 and sysName.0 in one request, SNMP v2c)
spread round-robin over :data:`AGENTS` agents: net-snmp ``snmpd``, :data:`PROCESSES`
processes each listening on :data:`AGENTS` / :data:`PROCESSES` loopback addresses
(127.0.161.1 - 127.0.161.200, one UDP port), as in ANCHORS.md.

- peer: a bare loop of the library the SNMP probe uses, gufo-snmp (``python -m bridge.bench.snmp
  peer ...``, a child process on uvloop): one session per agent made before the clock
  starts and kept, :data:`IN_FLIGHT` worker tasks taking the next GET in turn, one request
  at a time per session (a lock per agent), the same timeout and one retry as the probe's
  defaults.
- ours (``snmp-get``): SNMP jobs that each poll every agent once (``hosts``: the
  :data:`AGENTS` addresses, ``oid_spec_list: "get 1.3.6.1.2.1.1.1.0 1.3.6.1.2.1.1.5.0"``, a
  ``snmp_community`` credential from the bridge's credentials file), :data:`GETS` /
  :data:`AGENTS` jobs, :data:`HOSTS_BATCH` records a message, timed from the first publish
  to the last complete answer. The bridge queries at most :data:`IN_FLIGHT` agents at once
  (``probes.settings.SNMP.max_in_flight``), as the peer does.
- ours (``snmp-get-1``, no goal): the same GETs as :data:`GETS` jobs of one agent each,
  :data:`BATCH` records a message: what the ECC pipeline costs per job. Concurrency is
  bounded by the bridge's lanes: the standard lane's 100 workers
  (``limits.lane_workers``), ``limits.per_host`` 8 per agent address.

The benchmark ``snmp-walk`` (:mod:`bridge.bench.snmp_walk`) shares this module's pieces.
"""

from __future__ import annotations

import asyncio
import contextlib
import shutil
import sys
import tempfile
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import orjson

from bridge.agent.config import LimitsConfig
from bridge.bench.common import (
    BRIDGE_COMMAND,
    Result,
    bench_broker,
    broker_facts,
    first_line,
    log_problems,
    random_tag,
    tool_versions,
)
from bridge.bench.peers import pass_result, run_peer, timed
from bridge.bench.rounds import bench_config, count_answers, cpu_table, jobs_beside_peer
from bridge.bench.targets import SNMP_COMMUNITY, SNMPD, SnmpEndpoint, snmp_agents
from bridge.wire.client import JobResult, output_record

SYS_DESCR = "1.3.6.1.2.1.1.1.0"
SYS_NAME = "1.3.6.1.2.1.1.5.0"
AGENTS = 200
PROCESSES = 10
GETS = 20_000
IN_FLIGHT = 100
BATCH = 100  # output records in one MQTT message (snmp-get-1)
HOSTS_BATCH = 10  # hosts jobs in one MQTT message (snmp-get)
TIMEOUT = 2.0  # seconds per try, the SNMP probe's default
RETRIES = 1  # the SNMP probe's default
CREDENTIAL_ID = "bench-community"
LANE_WORKERS = (20, 50, 100)  # interactive / expedited / standard (the defaults)
PER_HOST = 8  # the default
GET_SPEC = f"get {SYS_DESCR} {SYS_NAME}"


def agent_addresses(count: int, processes: int) -> list[list[str]]:
    """``count`` loopback addresses 127.0.161.1 ..., in ``processes`` groups."""
    addresses = [f"127.0.161.{i}" for i in range(1, count + 1)]
    per = count // processes
    return [addresses[i * per : (i + 1) * per] for i in range(processes)]


def credentials_text() -> str:
    return (
        "[[credential]]\n"
        f'id = "{CREDENTIAL_ID}"\n'
        'type = "snmp_community"\n'
        f'community = "{SNMP_COMMUNITY}"\n'
    )


def snmp_versions() -> dict[str, Any]:
    versions = tool_versions("gufo_snmp")
    versions["snmpd"] = first_line([SNMPD, "-v"]) if shutil.which(SNMPD) else None
    bulkwalk = shutil.which("snmpbulkwalk")
    versions["snmpbulkwalk"] = first_line([bulkwalk, "-V"]) if bulkwalk else None
    return versions


# --- the peer: a bare gufo-snmp loop (child process) -------------------------------------------


async def _peer_setup(
    stack: contextlib.AsyncExitStack, endpoints: list[SnmpEndpoint], gets: int, in_flight: int
) -> Callable[[], Awaitable[dict[str, Any]]]:
    """One session per agent (gufo-snmp sessions have nothing to close: ``stack`` unused)."""
    from gufo.snmp import SnmpVersion
    from gufo.snmp.aio.client import SnmpSession

    sessions = [
        SnmpSession(
            addr=e.address,
            port=e.port,
            community=SNMP_COMMUNITY,
            version=SnmpVersion.v2c,
            timeout=TIMEOUT,
        )
        for e in endpoints
    ]
    locks = [asyncio.Lock() for _ in sessions]
    oids = [SYS_DESCR, SYS_NAME]
    count = len(sessions)

    async def one_pass() -> dict[str, Any]:
        jobs = iter(range(gets))
        ok = failed = timeouts = 0
        example: list[str] = []

        async def worker() -> None:
            nonlocal ok, failed, timeouts
            for i in jobs:
                k = i % count
                values: dict[str, Any] | None = None
                async with locks[k]:
                    for _try in range(RETRIES + 1):
                        try:
                            values = await sessions[k].get_many(oids)
                            break
                        except TimeoutError:
                            timeouts += 1
                        except Exception as exc:
                            example[:] = [f"{type(exc).__name__}: {exc}"[:200]]
                            break
                name = values.get(SYS_NAME) if values else None
                if isinstance(name, bytes) and name.startswith(b"bench-snmpd-"):
                    ok += 1
                else:
                    failed += 1

        seconds, cpu = await timed(asyncio.gather(*(worker() for _ in range(in_flight))))
        return pass_result(
            ok, seconds, failed, timeouts=timeouts, failures=example, own_cpu_s=round(cpu, 3)
        )

    await one_pass()  # every session has sent and received once before the first timing
    return one_pass


def peer_main(argv: list[str]) -> int:
    spec, gets, in_flight = orjson.loads(argv[0]), int(argv[1]), int(argv[2])
    endpoints = [SnmpEndpoint(address, int(port)) for address, port in spec]
    return run_peer(lambda stack: _peer_setup(stack, endpoints, gets, in_flight))


def peer_command(endpoints: list[SnmpEndpoint]) -> list[str]:
    spec = orjson.dumps([[e.address, e.port] for e in endpoints]).decode()
    return [sys.executable, "-m", "bridge.bench.snmp", "peer", spec, str(GETS), str(IN_FLIGHT)]


# --- ours -------------------------------------------------------------------------------------


def get_jobs(agent_id: str, endpoints: list[SnmpEndpoint], gets: int) -> list[dict[str, Any]]:
    """``gets`` jobs of one agent each (snmp-get-1)."""
    return [
        output_record(
            "SNMP",
            agent=agent_id,
            source=endpoints[i % len(endpoints)].address,
            payload={
                "port": endpoints[i % len(endpoints)].port,
                "version": "2c",
                "credential_id": CREDENTIAL_ID,
                "oid_spec_list": GET_SPEC,
            },
        )
        for i in range(gets)
    ]


def hosts_jobs(agent_id: str, endpoints: list[SnmpEndpoint], gets: int) -> list[dict[str, Any]]:
    """Jobs that each GET from every agent once (snmp-get): ``gets`` GETs in all."""
    by_port: dict[int, list[str]] = {}
    for e in endpoints:
        by_port.setdefault(e.port, []).append(e.address)
    polls = [
        {
            "hosts": addresses,
            "port": port,
            "version": "2c",
            "credential_id": CREDENTIAL_ID,
            "oid_spec_list": GET_SPEC,
        }
        for port, addresses in by_port.items()
    ]
    jobs: list[dict[str, Any]] = []
    for _round in range(max(1, gets // len(endpoints))):
        jobs.extend(output_record("SNMP", agent=agent_id, payload=poll) for poll in polls)
    return jobs


def _answered(entries: list[dict[str, Any]]) -> bool:
    names = [
        vb.get("value")
        for entry in entries
        for vb in entry.get("varbinds", [])
        if vb.get("oid") == SYS_NAME
    ]
    return len(entries) == 2 and bool(names) and str(names[0]).startswith("bench-snmpd-")


def check_gets(results: list[JobResult]) -> tuple[int, list[str]]:
    """snmp-get-1: one GET a job, its entries in the final record."""
    return count_answers(
        results,
        lambda r: [("job", (r.final.get("payload") or {}).get("results") or [])],
        _answered,
    )


def check_hosts(results: list[JobResult]) -> tuple[int, list[str]]:
    """snmp-get: an agent's compact entry holds one varbind per OID, in the spec's order."""

    def answers(result: JobResult) -> list[tuple[str, list[Any]]]:
        return [
            (str(agent.get("host")), [{"varbinds": [vb]} for vb in agent.get("varbinds") or []])
            for record in result.records
            for agent in (record.get("payload") or {}).get("agents") or []
        ]

    return count_answers(results, answers, _answered)


# --- the benchmark ------------------------------------------------------------------------------


async def run(broker: tuple[str, int] | None, rounds: int, *, many: bool = True) -> Result:
    """snmp-get: jobs that each poll all the agents (the goal: ≥ 0.7 of the bare loop);
    ``many=False``, snmp-get-1: one GET a job (no goal: what the pipeline costs per job)."""
    agent = f"bench-snmp-{random_tag()}"
    groups = agent_addresses(AGENTS, PROCESSES)
    result = Result(
        name="snmp-get" if many else "snmp-get-1",
        unit="GETs/s",
        goal=0.7 if many else None,
        peer=f"bare gufo-snmp loop, {IN_FLIGHT} in flight, one session kept per agent "
        "(child process, uvloop)",
        ours=(
            f"SNMP jobs of {AGENTS} agents each (hosts) through the bridge (child process), "
            f"{HOSTS_BATCH} records a message, max_in_flight {IN_FLIGHT} agents"
            if many
            else f"SNMP jobs of one GET each through the bridge (child process), {BATCH} "
            f"records a message, lane_workers {list(LANE_WORKERS)}, per_host {PER_HOST}"
        ),
        peer_command=[],
        ours_command=BRIDGE_COMMAND,
        workload=f"{GETS:,} GETs (sysDescr.0 + sysName.0, v2c) round-robin over {AGENTS} "
        f"agents ({PROCESSES} snmpd processes × {AGENTS // PROCESSES} addresses)",
    )
    result.machine.update(snmp_versions())
    with tempfile.TemporaryDirectory(prefix="midbridge-bench-") as tmp:
        workdir = Path(tmp)
        log_path = workdir / "bridge.log"
        async with contextlib.AsyncExitStack() as stack:
            targets = await stack.enter_async_context(snmp_agents(workdir / "snmpd", groups))
            endpoints = targets.endpoints
            endpoint = await stack.enter_async_context(bench_broker(broker))
            result.broker = broker_facts(endpoint)
            limits = LimitsConfig(drain_timeout=2.0, lane_workers=LANE_WORKERS, per_host=PER_HOST)
            config = bench_config(
                endpoint,
                agent,
                workdir,
                credentials=credentials_text(),
                limits=limits,
                probe_settings={"SNMP": {"max_in_flight": IN_FLIGHT}},
            )
            command = peer_command(endpoints)
            result.peer_command = [*command[:4], f"<{len(endpoints)} endpoints>", *command[5:]]
            await jobs_beside_peer(
                stack,
                result,
                rounds,
                peer_command=command,
                config=config,
                log_path=log_path,
                target_pids=targets.pids,
                jobs=lambda agent_id: (hosts_jobs if many else get_jobs)(agent_id, endpoints, GETS),
                batch=HOSTS_BATCH if many else BATCH,
                check=check_hosts if many else check_gets,
            )
        result.warnings += [f"bridge log: {line}" for line in log_problems(log_path)]
    result.details["bridge_config"] = {
        "limits": config.limits.model_dump(mode="json"),
        "security.require_validation": False,
        "credentials_file": "one snmp_community credential (chmod 600)",
        "probes.settings.SNMP": f"max_in_flight {IN_FLIGHT}; the rest defaults (timeout 2 s, "
        "retries 1, sessions_per_target 2, concurrency 100)",
    }
    result.details["gets"] = GETS
    result.details["agents"] = AGENTS
    result.details["in_flight_peer"] = IN_FLIGHT
    result.details["batch"] = HOSTS_BATCH if many else BATCH
    result.details["agents_per_job"] = AGENTS if many else 1
    result.details["choices"] = [
        "every agent has an address of its own (127.0.161.1-200), so per_host applies per "
        "agent as it would on a network; the standard lane's 100 workers bound the bridge "
        "like the peer's 100 workers",
        "both sides are child processes started before the rounds (the peer makes its "
        "sessions and sends one untimed pass first); one untimed warm-up pass per side",
        "rounds alternate the order (peer first in odd rounds, ours first in even)",
        "peer: time from its first request to its last answer, measured in the child; "
        "ours: from the first publish to the last complete input record, in the bench",
        "cpu_s: /proc/PID/stat of the measured process over the pass; target_cpu_s: the "
        "snmpd processes'; driver_cpu_s: the bench process's (publishing, parsing answers)",
    ]
    result.tables.append(cpu_table(result, "snmpd"))
    return result


if __name__ == "__main__" and sys.argv[1:2] == ["peer"]:
    sys.exit(peer_main(sys.argv[2:]))
