"""A MID cluster loses a member mid-run: nothing is lost, every job has one answer.

Real processes: ``midbridge run`` children (``tests/harness.py``) sharing one MID's work,
the platform's side as an ``EccClient`` in the test.

- NATS JetStream: a 3-node cluster (``tests/nats_cluster.py``), streams with 3 replicas,
  three bridges sharing the MID's durable consumers. Mid-run one bridge is SIGKILLed and
  the NATS node leading the jobs stream is stopped; the killed bridge comes back (as a
  supervisor would restart it: its outbox holds answers it may not have sent).
- MQTT: a private Mosquitto, two bridges on ``$share/<group>/...``, one SIGKILLed and
  restarted.

Every job ends with exactly one accepted complete answer (the complete record of one run
and every chunk before it, as ``EccClient`` and the built-in instance take it). A job runs
to completion twice only when the member that ran it died (or lost its broker node)
before its acknowledgement reached the broker: those are at most the jobs that member
held, and the platform keeps the first complete run (docs/wire-contract.md). Republished
copies of a record are dropped by the NATS inputs stream (``Nats-Msg-Id``).
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import aiohttp

from bridge.bench.natsd import NatsCluster
from bridge.demo.broker import free_port
from bridge.wire.client import EccClient, JobResult, output_record
from bridge.wire.nats_names import jobs_stream
from bridge.wire.nats_transport import NatsPlatformSession
from tests.brokers import MosquittoServer
from tests.harness import BridgeProcess, make_config

pytest_plugins = ("tests.nats_cluster",)

JOBS = 2000
DELAY = 0.3  # seconds each Echo job takes: the run lasts a few seconds
WINDOW = 100  # limits.max_in_flight of each member: what a dead member may hold
WORKERS = 50  # standard-lane workers of each member


def member_config(
    host: str, port: int, agent: str, workdir: Path, member: str, broker: dict[str, Any]
) -> Any:
    config = make_config(
        host,
        port,
        agent,
        workdir / member,
        limits={"max_in_flight": WINDOW, "lane_workers": [4, 4, WORKERS]},
        broker=broker,
    )
    config.bridge.instance = member
    config.metrics_port = free_port()
    return config


async def processed(member: BridgeProcess) -> int:
    port = member.config.metrics_port
    async with (
        aiohttp.ClientSession() as http,
        http.get(f"http://127.0.0.1:{port}/healthz") as response,
    ):
        body = await response.json()
    return int(body["processed"])


def echo_jobs(agent: str) -> list[dict[str, Any]]:
    return [
        output_record(
            "Echo", agent=f"mid.server.{agent}", payload={"message": f"m{i}", "delay": DELAY}
        )
        for i in range(JOBS)
    ]


async def kill_mid_run(
    client: EccClient,
    jobs: list[dict[str, Any]],
    victim: BridgeProcess,
    also: Callable[[], None] | None = None,
) -> tuple[list[JobResult], float]:
    """Send the jobs; at a quarter done SIGKILL ``victim`` (and run ``also``); restart it
    two seconds later; every answer, and the seconds it all took."""
    ids = [job["sys_id"] for job in jobs]
    started = time.monotonic()
    await client.send(jobs)
    deadline = time.monotonic() + 30
    while sum(client.results[i].done for i in ids) < JOBS // 4:
        assert time.monotonic() < deadline, "the cluster did not get going"
        await asyncio.sleep(0.01)
    done_at_kill = sum(client.results[i].done for i in ids)
    assert done_at_kill < JOBS * 3 // 4, "the kill must land mid-run"
    victim.kill()
    if also is not None:
        await asyncio.to_thread(also)
    await asyncio.sleep(2.0)
    await asyncio.to_thread(victim.start)
    results = await client.wait(ids, timeout=45)
    return results, time.monotonic() - started


def check_answers(jobs: list[dict[str, Any]], results: list[JobResult], reruns_max: int) -> int:
    """Every job answered once, correctly; the number that ran twice to completion."""
    for job, result in zip(jobs, results, strict=True):
        assert result.done, job["sys_id"]
        assert result.complete_at == 0
        assert result.error_string == "", result.final
        assert result.final["payload"]["message"] == job["payload"]["message"]
        assert result.final["response_to"] == job["sys_id"]
    reruns = sum(len(r.complete_ids) > 1 for r in results)
    assert reruns <= reruns_max, f"{reruns} jobs ran twice to completion"
    return reruns


async def test_nats_cluster_loses_a_bridge_and_a_node_and_nothing_else(
    nats_cluster: NatsCluster, unique_agent: str, tmp_path: Path
) -> None:
    broker = nats_cluster.broker_settings(ack_wait=4.0)
    host, port = broker.pop("host"), broker.pop("port")
    members = [
        BridgeProcess(
            member_config(host, port, unique_agent, tmp_path, f"m{i}", broker),
            tmp_path / f"m{i}.log",
        )
        for i in range(3)
    ]
    try:
        for member in members:
            member.start()
        jobs = echo_jobs(unique_agent)
        async with EccClient(members[0].config.broker, agent=unique_agent) as client:
            session = client.session
            assert isinstance(session, NatsPlatformSession)
            info = await session.link.js.stream_info(jobs_stream("ecc", unique_agent))
            assert info.config.num_replicas == 3
            assert info.cluster is not None
            leader = [n.name for n in nats_cluster.nodes].index(str(info.cluster.leader))

            def stop_leader() -> None:
                nats_cluster.stop_node(leader)

            results, seconds = await kill_mid_run(client, jobs, members[1], also=stop_leader)
            # The other two members did most of the work and are still counting.
            counts = [await processed(members[i]) for i in (0, 2)]
        assert all(count > 0 for count in counts), counts
        # A job runs twice only if the killed member held it, or if its acknowledgement
        # went to the stopped node: each member holds at most WINDOW jobs.
        reruns = check_answers(jobs, results, reruns_max=3 * WINDOW)
        copies = sum(r.duplicates for r in results)
        print(
            f"NATS: {JOBS} jobs in {seconds:.1f} s; members m0/m2 processed {counts}; "
            f"{reruns} ran twice (platform kept the first); {copies} copies delivered twice"
        )
        assert copies <= 3 * WINDOW
    finally:
        for member in members:
            member.stop()


async def test_mosquitto_share_loses_a_bridge_and_nothing_else(
    private_broker: MosquittoServer, unique_agent: str, tmp_path: Path
) -> None:
    broker = {"session_expiry": 300}
    host, port = private_broker.host, private_broker.port
    members = []
    for i in range(2):
        config = member_config(host, port, unique_agent, tmp_path, f"m{i}", broker)
        config.bridge.shared_group = "cluster"
        members.append(BridgeProcess(config, tmp_path / f"m{i}.log"))
    try:
        for member in members:
            member.start()
        jobs = echo_jobs(unique_agent)
        async with EccClient(members[0].config.broker, agent=unique_agent) as client:
            results, seconds = await kill_mid_run(client, jobs, members[1])
            survivor = await processed(members[0])
        assert survivor > 0
        # The broker keeps what the killed member held for its session and hands it back
        # when it returns; its ledger knows what it finished.
        reruns = check_answers(jobs, results, reruns_max=WINDOW)
        print(
            f"MQTT $share: {JOBS} jobs in {seconds:.1f} s; m0 processed {survivor}; "
            f"{reruns} ran twice"
        )
    finally:
        for member in members:
            member.stop()
