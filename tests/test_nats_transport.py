"""The NATS JetStream transport: subjects, acknowledgement, keep-alives, dead letters, dedupe.

A private ``nats-server`` with JetStream (``tests/nats_cluster.py``); the bridge in this
process with ``broker.kind = "nats"``, the platform's side as an ``EccClient``.
"""

from __future__ import annotations

import asyncio
import time
from pathlib import Path
from typing import Any

import orjson
import pytest

from bridge.agent.bridge import Bridge
from bridge.agent.config import Config
from bridge.bench.natsd import NatsCluster
from bridge.wire.client import EccClient, output_record
from bridge.wire.errors import BrokerRefused
from bridge.wire.nats_link import NatsLink, msg_id
from bridge.wire.nats_names import jobs_stream, name_of, subject_of, topic_of
from bridge.wire.nats_transport import NatsPublisher, ack_facts, down_record
from bridge.wire.records import new_sys_id
from bridge.wire.session import Delivery
from bridge.wire.sessions import platform_session
from probes import REGISTRY
from tests.harness import bridge_and_client, make_config

pytest_plugins = ("tests.nats_cluster",)


def nats_config(node: NatsCluster, agent: str, state: Path, **options: Any) -> Config:
    limits = options.pop("limits", None)
    broker = node.broker_settings(**options)
    host, port = broker.pop("host"), broker.pop("port")
    return make_config(host, port, agent, state, limits=limits, broker=broker)


def agent_id(agent: str) -> str:
    return f"mid.server.{agent}"


def test_topics_and_subjects_map_both_ways() -> None:
    for topic in ("ecc/dc1/output", "ecc/dc.1/output/interactive", "a/b/x*y>z/input", "p/%/s"):
        subject = subject_of(topic)
        assert "*" not in subject
        assert ">" not in subject
        assert topic_of(subject) == topic
    assert subject_of("ecc/dc.1/input") == "ecc.dc%2E1.input"
    assert subject_of("ecc/+/status") == "ecc.*.status"
    assert jobs_stream("ecc", "dc.1_a") == "ecc_jobs_dc_2E1_5Fa"
    assert name_of("a_b") != name_of("a.b")


def test_msg_id_is_the_first_records_sys_id() -> None:
    one = orjson.dumps({"sys_id": "abc", "x": 1})
    many = orjson.dumps([{"sys_id": "first"}, {"sys_id": "second"}])
    assert msg_id(one) == "abc"
    assert msg_id(many) == "first"
    assert msg_id(b'{"x": 1, "sys_id": "late"}') is None
    assert down_record(b'{"status": "Up", "name": "dc1"}') is not None
    assert down_record(b"[]") is None
    assert ack_facts("$JS.ACK.S.c.3.10.9.1700000000500000000.0") == (3, 1700000000.5)
    assert ack_facts("$JS.ACK.dom.acc.S.c.2.10.9.1700000000000000000.0.r")[0] == 2


async def test_echo_jobs_get_one_complete_result_and_repeats_run_once(
    nats_node: NatsCluster, unique_agent: str, tmp_path: Path
) -> None:
    config = nats_config(nats_node, unique_agent, tmp_path)
    async with bridge_and_client(config) as (bridge, client):
        singles = [
            output_record("Echo", agent=agent_id(unique_agent), payload={"message": f"m{i}"})
            for i in range(200)
        ]
        batched = [
            output_record("Echo", agent=agent_id(unique_agent), payload={"message": f"b{i}"})
            for i in range(300)
        ]
        await client.send(singles)
        await client.send(batched, batch=50)
        await client.send(singles[:10])  # repeats: dropped by the bridge's ledger
        results = await client.wait([r["sys_id"] for r in singles + batched], timeout=30)
        for record, result in zip(singles + batched, results, strict=True):
            assert result.complete_at == 0
            assert result.final["payload"]["message"] == record["payload"]["message"]
            assert result.final["response_to"] == record["sys_id"]
        deadline = time.monotonic() + 5
        while bridge.counters.duplicates < 10 and time.monotonic() < deadline:
            await asyncio.sleep(0.02)
        assert bridge.counters.processed == 500
        assert bridge.counters.duplicates == 10
        assert not client.stray
        assert all(r.duplicates == 0 for r in results)


async def test_interactive_jobs_do_not_wait_behind_bulk_work(
    nats_node: NatsCluster, unique_agent: str, tmp_path: Path
) -> None:
    config = nats_config(
        nats_node,
        unique_agent,
        tmp_path,
        limits={"lane_workers": [2, 2, 4], "max_in_flight": 50},
    )
    async with bridge_and_client(config) as (bridge, client):
        hogs = [
            output_record("Echo", agent=agent_id(unique_agent), payload={"delay": 3})
            for _ in range(300)
        ]
        await client.send(hogs, batch=10)
        deadline = time.monotonic() + 5
        while bridge.scheduler.lane_running[2] < 4 and time.monotonic() < deadline:
            await asyncio.sleep(0.02)
        assert bridge.scheduler.lane_running[2] == 4
        assert bridge.intake.admission.in_flight <= 50  # the pull never exceeds the window
        urgent = output_record(
            "Echo", agent=agent_id(unique_agent), priority=0, payload={"message": "now"}
        )
        started = time.perf_counter()
        await client.send([urgent], express=True)
        await client.wait([urgent["sys_id"]], timeout=5)
        assert time.perf_counter() - started < 1.0
        for sys_id in [h["sys_id"] for h in hogs]:
            bridge.cancel(sys_id)


async def test_a_long_job_is_kept_alive_and_never_delivered_again(
    nats_node: NatsCluster, unique_agent: str, tmp_path: Path
) -> None:
    config = nats_config(nats_node, unique_agent, tmp_path, ack_wait=1.0)
    async with bridge_and_client(config) as (bridge, client):
        slow = output_record("Echo", agent=agent_id(unique_agent), payload={"delay": 3.5})
        await client.send([slow])
        [result] = await client.wait([slow["sys_id"]], timeout=15)
        await asyncio.sleep(1.5)  # a redelivery, had there been one, would show now
        assert result.complete_at == 0
        assert bridge.counters.received == 1
        assert bridge.counters.duplicates == 0


async def test_the_last_delivery_is_answered_with_an_error_not_run(
    nats_node: NatsCluster, unique_agent: str, tmp_path: Path
) -> None:
    """max_deliver: a job whose deliveries never ended in an answer gets a dead-letter
    answer on the last one (here: the bridge stopped mid-job, then came back)."""
    config = nats_config(
        nats_node, unique_agent, tmp_path, max_deliver=2, limits={"drain_timeout": 0.2}
    )
    slow = output_record("Echo", agent=agent_id(unique_agent), payload={"delay": 30})
    async with EccClient(config.broker, agent=unique_agent) as client:
        async with bridge_and_client(config) as (bridge, _c):
            await client.send([slow])
            deadline = time.monotonic() + 5
            while slow["sys_id"] not in bridge.scheduler.running and time.monotonic() < deadline:
                await asyncio.sleep(0.02)
            assert slow["sys_id"] in bridge.scheduler.running
        async with bridge_and_client(config) as (bridge2, _c):
            [result] = await client.wait([slow["sys_id"]], timeout=20)
            assert result.error_string.startswith("refused: max_deliver: delivered 2 times")
            assert result.final["payload"]["error"]["kind"] == "refused"
            assert bridge2.counters.processed == 0


async def test_republished_results_are_dropped_by_the_stream(
    nats_node: NatsCluster, unique_agent: str
) -> None:
    """Nats-Msg-Id = the record's sys_id: the outbox sending a message again (after a
    lost acknowledgement, or a restart) does not deliver it twice."""
    broker = nats_node.broker_config()
    job = output_record("Echo", agent=agent_id(unique_agent))
    answer = {"sys_id": new_sys_id(), "response_to": job["sys_id"], "sequence": 0,
              "complete": True, "run": "r1", "payload": {}}  # fmt: skip
    body = orjson.dumps(answer)
    async with EccClient(broker, agent=unique_agent) as client:
        client.expect([job["sys_id"]])
        async with NatsPublisher(NatsLink(broker, name="test-out"), prefix="ecc") as out:
            for _ in range(3):
                await out.publish(f"ecc/{unique_agent}/input", body)
            other = dict(answer, sys_id=new_sys_id(), run="r2")
            await out.publish(f"ecc/{unique_agent}/input", orjson.dumps(other))
        deadline = time.monotonic() + 5
        while client.received_records < 2 and time.monotonic() < deadline:
            await asyncio.sleep(0.02)
        await asyncio.sleep(0.3)
        assert client.received_records == 2  # the two copies of the first were dropped


async def test_a_silent_agent_is_reported_down_as_a_last_will_would(
    nats_node: NatsCluster, unique_agent: str
) -> None:
    broker = nats_node.broker_config(status_timeout=1.0)
    seen: list[Delivery] = []

    async def on_message(delivery: Delivery) -> bool:
        seen.append(delivery)
        return True

    status_topic = f"ecc/{unique_agent}/status"
    record = {"name": unique_agent, "status": "Up", "host": "h1"}
    async with NatsPublisher(NatsLink(broker, name="test-agent"), prefix="ecc") as out:
        await out.publish(status_topic, orjson.dumps(record), retain=True)
    # The platform connects later: it gets the last record (retained), then, the agent
    # being silent, a Down record made from it.
    session = platform_session(
        broker, client_id=f"test-platform-{unique_agent}", prefix="ecc",
        status=True, durable=False, on_message=on_message,
    )  # fmt: skip
    async with session:
        deadline = time.monotonic() + 10
        while len(seen) < 2 and time.monotonic() < deadline:
            await asyncio.sleep(0.05)
    mine = [orjson.loads(d.payload) for d in seen if d.topic == status_topic]
    assert [m["status"] for m in mine] == ["Up", "Down"]
    assert mine[1]["host"] == "h1"


async def test_a_refused_login_or_status_subject_fails_the_start(
    unique_agent: str, tmp_path: Path
) -> None:
    """Wrong password: the start fails naming NATS; a user whose permissions deny the
    status subject: the start fails naming broker.username, as on MQTT."""
    auth = [
        "authorization {",
        "  users = [",
        '    {user: "mid", password: "pw", permissions: {publish: {deny: ["ecc.*.status"]}}}',
        '    {user: "ok", password: "pw"}',
        "  ]",
        "}",
    ]
    with NatsCluster(1, workdir=tmp_path / "nats", extra_config=auth) as node:
        wrong = nats_config(node, unique_agent, tmp_path / "a")
        wrong.broker.username, wrong.broker.password = "ok", "nope"
        with pytest.raises(BrokerRefused, match="NATS: not authorised"):
            async with Bridge(wrong, REGISTRY):
                pass
        denied = nats_config(node, unique_agent, tmp_path / "b")
        denied.broker.username, denied.broker.password = "mid", "pw"
        with pytest.raises(BrokerRefused, match="refused our status record") as refused:
            async with Bridge(denied, REGISTRY):
                pass
        assert refused.value.field == "broker.username"


async def test_without_stream_management_a_missing_consumer_fails_the_start(
    nats_node: NatsCluster, unique_agent: str, tmp_path: Path
) -> None:
    config = nats_config(nats_node, unique_agent, tmp_path, manage_streams=False)
    with pytest.raises(BrokerRefused, match="no consumer bulk on stream ecc_jobs_"):
        async with Bridge(config, REGISTRY):
            pass
