"""``midbridge bench http``: GETs of a small body, through the bridge (RESTProbe) vs aiohttp.

Workload: :data:`REQUESTS` ``GET /`` of a 3-byte body (``ok\\n``) from an aiohttp server on
127.0.0.1 that runs in a process of its own (``python -m bridge.bench.targets http-server``, on
uvloop, no access log), so it shares neither the bridge's nor the driver's event loop.

- peer: a bare aiohttp loop (``python -m bridge.bench.http peer URL ...``, a child process on
  uvloop): one ``ClientSession`` with ``TCPConnector(limit=100)``, :data:`IN_FLIGHT`
  worker tasks each doing ``async with session.get(url) as r: await r.read()`` in turn.
- ours (``http``): RESTProbe jobs of :data:`URLS_PER_JOB` requests each (``{"urls":
  [URL, ...], "response_headers": false}``: the peer reads status and body, not
  headers), :data:`URLS_BATCH` records a message, timed from the first publish to the
  last complete answer. The probe's shared ``ClientSession`` has ``limit`` 100 and
  ``limit_per_host`` = ``limits.per_host``, set to 100 here (the default, 8, would cap
  one target at 8 connections); its urls jobs have 100 requests in flight at most
  (``max_in_flight`` = ``limit``), like the peer.
- ours (``http-1``, no goal): :data:`REQUESTS` RESTProbe jobs of one request each
  (``{"url": URL}``), :data:`BATCH` records a message; the standard lane's 100 workers
  give 100 requests in flight: what the ECC pipeline costs per job.
"""

from __future__ import annotations

import asyncio
import contextlib
import sys
import tempfile
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

from bridge.agent.config import LimitsConfig
from bridge.bench.common import (
    BRIDGE_COMMAND,
    Result,
    bench_broker,
    broker_facts,
    log_problems,
    random_tag,
    tool_versions,
)
from bridge.bench.peers import pass_result, run_peer, timed
from bridge.bench.rounds import bench_config, count_answers, cpu_table, jobs_beside_peer
from bridge.bench.targets import HTTP_BODY, http_server
from bridge.wire.client import JobResult, output_record

REQUESTS = 10_000
IN_FLIGHT = 100
LIMIT = 100  # connections in the pool, both sides (RESTProbe's default)
BATCH = 100  # one-request jobs in one MQTT message (http-1)
URLS_PER_JOB = 100  # requests in one urls job (http)
URLS_BATCH = 10  # urls jobs in one MQTT message
LANE_WORKERS = (20, 50, 100)  # the defaults: the standard lane runs 100 jobs at a time
PER_HOST = 100  # one target here: let it have the whole lane, like the peer's 100 in flight


# --- the peer: a bare aiohttp loop (child process) ---------------------------------------------


async def _peer_setup(
    stack: contextlib.AsyncExitStack, url: str, requests: int
) -> Callable[[], Awaitable[dict[str, Any]]]:
    import aiohttp

    session = await stack.enter_async_context(
        aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=LIMIT))
    )

    async def one_pass() -> dict[str, Any]:
        jobs = iter(range(requests))
        ok = failed = 0
        example: list[str] = []

        async def worker() -> None:
            nonlocal ok, failed
            for _ in jobs:
                try:
                    async with session.get(url) as resp:
                        body = await resp.read()
                except (aiohttp.ClientError, OSError) as exc:
                    failed += 1
                    example[:] = [f"{type(exc).__name__}: {exc}"[:200]]
                    continue
                if resp.status == 200 and body == HTTP_BODY:
                    ok += 1
                else:
                    failed += 1

        seconds, cpu = await timed(asyncio.gather(*(worker() for _ in range(IN_FLIGHT))))
        return pass_result(ok, seconds, failed, failures=example, own_cpu_s=round(cpu, 3))

    return one_pass


def peer_main(argv: list[str]) -> int:
    url, requests = argv[0], int(argv[1])
    return run_peer(lambda stack: _peer_setup(stack, url, requests))


def peer_command(url: str) -> list[str]:
    return [sys.executable, "-m", "bridge.bench.http", "peer", url, str(REQUESTS)]


# --- ours -------------------------------------------------------------------------------------


def http_jobs(agent_id: str, url: str, requests: int) -> list[dict[str, Any]]:
    return [
        output_record("RESTProbe", agent=agent_id, payload={"url": url}) for _ in range(requests)
    ]


def urls_jobs(agent_id: str, url: str, requests: int) -> list[dict[str, Any]]:
    """``requests`` GETs of ``url`` as jobs of :data:`URLS_PER_JOB` requests each."""
    return [
        output_record(
            "RESTProbe",
            agent=agent_id,
            payload={"urls": [url] * URLS_PER_JOB, "response_headers": False},
        )
        for _ in range(max(1, requests // URLS_PER_JOB))
    ]


def _right(entry: dict[str, Any]) -> bool:
    return bool(entry.get("status") == 200 and entry.get("body") == HTTP_BODY.decode())


def check_urls(results: list[JobResult]) -> tuple[int, list[str]]:
    """http: a request counts when its response entry has status 200 and the body."""
    return count_answers(
        results,
        lambda r: [
            (str(entry.get("url")), entry)
            for record in r.records
            for entry in (record.get("payload") or {}).get("responses") or []
        ],
        _right,
    )


def check_requests(results: list[JobResult]) -> tuple[int, list[str]]:
    """http-1: the job's one answer has status 200 and the body."""
    return count_answers(results, lambda r: [("job", r.final.get("payload") or {})], _right)


# --- the benchmark ------------------------------------------------------------------------------


async def run(broker: tuple[str, int] | None, rounds: int, *, many: bool = True) -> Result:
    """http: jobs of 100 URLs each (the goal: ≥ 0.7 of the bare loop); ``many=False``,
    http-1: one request a job (no goal: what the pipeline costs per job)."""
    agent = f"bench-http-{random_tag()}"
    result = Result(
        name="http" if many else "http-1",
        unit="req/s",
        goal=0.7 if many else None,
        peer=f"bare aiohttp loop: one ClientSession, limit {LIMIT}, {IN_FLIGHT} in flight "
        "(child process, uvloop)",
        ours=(
            f"RESTProbe jobs of {URLS_PER_JOB} URLs each through the bridge (child process), "
            f"{URLS_BATCH} records a message, per_host {PER_HOST}, {LIMIT} requests in flight"
            if many
            else f"RESTProbe jobs of one request each through the bridge (child process), "
            f"{BATCH} records a message, lane_workers {list(LANE_WORKERS)}, per_host {PER_HOST}"
        ),
        peer_command=[],
        ours_command=BRIDGE_COMMAND,
        workload=f"{REQUESTS:,} GET / of a {len(HTTP_BODY)}-byte body from an aiohttp server "
        "in its own process on 127.0.0.1, keep-alive",
    )
    result.machine.update(tool_versions("aiohttp"))
    with tempfile.TemporaryDirectory(prefix="midbridge-bench-") as tmp:
        workdir = Path(tmp)
        log_path = workdir / "bridge.log"
        async with contextlib.AsyncExitStack() as stack:
            server = await stack.enter_async_context(http_server())
            endpoint = await stack.enter_async_context(bench_broker(broker))
            result.broker = broker_facts(endpoint)
            limits = LimitsConfig(drain_timeout=2.0, lane_workers=LANE_WORKERS, per_host=PER_HOST)
            config = bench_config(endpoint, agent, workdir, credentials=None, limits=limits)
            command = peer_command(server.url)
            result.peer_command = command
            await jobs_beside_peer(
                stack,
                result,
                rounds,
                peer_command=command,
                config=config,
                log_path=log_path,
                target_pids=server.pids,
                jobs=lambda agent_id: (urls_jobs if many else http_jobs)(
                    agent_id, server.url, REQUESTS
                ),
                batch=URLS_BATCH if many else BATCH,
                check=check_urls if many else check_requests,
            )
        result.warnings += [f"bridge log: {line}" for line in log_problems(log_path)]
    result.details["bridge_config"] = {
        "limits": config.limits.model_dump(mode="json"),
        "security.require_validation": False,
        "probes.settings.RESTProbe": "defaults (limit 100, limit_per_host = per_host)",
    }
    result.details["requests"] = REQUESTS
    result.details["in_flight_peer"] = IN_FLIGHT
    result.details["batch"] = URLS_BATCH if many else BATCH
    result.details["requests_per_job"] = URLS_PER_JOB if many else 1
    result.details["choices"] = [
        "the server runs in its own process (aiohttp + uvloop, no access log), the same for "
        "both sides",
        "both sides are child processes started before the rounds; one untimed warm-up pass "
        "per side (the connection pools are warm when timing starts)",
        "rounds alternate the order (peer first in odd rounds, ours first in even)",
        "peer: time from its first request to its last answer, measured in the child; ours: "
        "from the first publish to the last complete input record, in the bench",
        "cpu_s: /proc/PID/stat of the measured process over the pass; target_cpu_s: the server's",
    ]
    result.tables.append(cpu_table(result, "server"))
    return result


if __name__ == "__main__" and sys.argv[1:2] == ["peer"]:
    sys.exit(peer_main(sys.argv[2:]))
