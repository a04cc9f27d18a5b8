"""The bridge through a real Mosquitto: results, bad input, dedupe, lanes, deadlines."""

from __future__ import annotations

import asyncio
import socket
import time
from collections.abc import AsyncIterator
from pathlib import Path

import orjson
import pytest

from bridge.wire.client import EccClient, output_record
from tests.brokers import BrokerAddress
from tests.harness import bridge_and_client, make_config


@pytest.fixture
async def listeners() -> AsyncIterator[list[int]]:
    """Three open ports on 127.0.0.1 (answering nothing) for sweeps."""
    servers = []

    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        writer.close()

    for _ in range(3):
        servers.append(await asyncio.start_server(handle, "127.0.0.1", 0))
    yield [s.sockets[0].getsockname()[1] for s in servers]
    for server in servers:
        server.close()
        await server.wait_closed()


def closed_port() -> int:
    """A port that was free a moment ago: connecting to it is refused."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
    return port


def agent_of(unique_agent: str) -> str:
    return f"mid.server.{unique_agent}"


async def test_echo_jobs_get_exactly_one_complete_result(
    broker: BrokerAddress, unique_agent: str, tmp_path: Path
) -> None:
    config = make_config(broker.host, broker.port, unique_agent, tmp_path)
    async with bridge_and_client(config) as (bridge, client):
        singles = [
            output_record("Echo", agent=agent_of(unique_agent), payload={"message": f"m{i}"})
            for i in range(100)
        ]
        batched = [
            output_record("Echo", agent=agent_of(unique_agent), payload={"message": f"b{i}"})
            for i in range(300)
        ]
        await client.send(singles)
        await client.send(batched, batch=50)
        results = await client.wait([r["sys_id"] for r in singles + batched], timeout=30)
        for record, result in zip(singles + batched, results, strict=True):
            assert result.complete_at == 0
            assert result.final["payload"]["message"] == record["payload"]["message"]
            assert result.final["response_to"] == record["sys_id"]
            assert result.final["queue"] == "input"
            assert result.final["error_string"] == ""
        assert bridge.counters.processed == 400
        assert not client.stray


async def test_chunked_results_have_contiguous_sequences(
    broker: BrokerAddress, unique_agent: str, tmp_path: Path
) -> None:
    config = make_config(broker.host, broker.port, unique_agent, tmp_path)
    async with bridge_and_client(config) as (_bridge, client):
        records = [
            output_record("Echo", agent=agent_of(unique_agent), payload={"chunks": 40})
            for _ in range(5)
        ]
        await client.send(records)
        for result in await client.wait([r["sys_id"] for r in records], timeout=30):
            assert sorted(result.chunks) == list(range(40))
            assert result.complete_at == 39
            assert [r["complete"] for r in result.records].count(True) == 1
            assert [r["payload"]["chunk"] for r in result.records] == list(range(40))


async def test_sweep_reports_open_and_refused_ports(
    broker: BrokerAddress, unique_agent: str, tmp_path: Path, listeners: list[int]
) -> None:
    config = make_config(broker.host, broker.port, unique_agent, tmp_path)
    refused = closed_port()
    async with bridge_and_client(config) as (_bridge, client):
        record = output_record(
            "Shazzam",
            agent=agent_of(unique_agent),
            payload={"targets": "127.0.0.1", "ports": [*listeners, refused], "chunk_hosts": 1},
        )
        await client.send([record])
        [result] = await client.wait([record["sys_id"]], timeout=30)
    assert result.error_string == ""
    hosts = [h for rec in result.records for h in rec["payload"].get("hosts", [])]
    assert len(hosts) == 1
    host = hosts[0]
    assert host["ip"] == "127.0.0.1"
    assert host["alive"] is True
    assert sorted(p["port"] for p in host["open"]) == sorted(listeners)
    assert host["closed"] == [refused]
    totals = result.final["payload"]["totals"]
    assert totals["addresses"] == 1
    assert totals["open_ports"] == 3


def bad_records(agent: str) -> list[tuple[bytes, str | None, str]]:
    """(raw MQTT payload, sys_id the error must answer or None, words in error_string)."""

    def rec(**over: object) -> bytes:
        base = output_record("Shazzam", agent=agent, payload={"targets": "127.0.0.1", "ports": [1]})
        base.update(over)
        return orjson.dumps(base)

    return [
        (b'{"sys_id": "x1", "topic": ', None, "malformed JSON"),
        (orjson.dumps({"topic": "Echo"}), None, "sys_id: is missing"),
        (rec(sys_id="bad-prio", priority="urgent"), "bad-prio", "priority"),
        (rec(sys_id="bad-topic", topic="NoSuchProbe"), "bad-topic", "unknown_topic"),
        (
            rec(sys_id="too-big", payload={"targets": "127.0.0.1", "pad": "x" * 70_000}),
            None,
            "over the limit",
        ),
        (rec(sys_id="bad-cidr", payload={"targets": "10.0.0.0/33"}), "bad-cidr", "targets"),
        (rec(sys_id="port-0", payload={"targets": "127.0.0.1", "ports": [0]}), "port-0", "ports"),
        (
            rec(sys_id="port-70000", payload={"targets": "127.0.0.1", "ports": "70000"}),
            "port-70000",
            "ports",
        ),
        (rec(sys_id="too-wide", payload={"targets": "10.0.0.0/8"}), "too-wide", "refused"),
        (rec(sys_id="other-agent", agent="mid.server.someone-else"), "other-agent", "agent"),
        (
            rec(sys_id="bad-param", payload={"targets": "127.0.0.1", "frobnicate": 1}),
            "bad-param",
            "frobnicate",
        ),
    ]


async def test_bad_input_gets_error_records_and_good_work_continues(
    broker: BrokerAddress, unique_agent: str, tmp_path: Path
) -> None:
    config = make_config(
        broker.host, broker.port, unique_agent, tmp_path, limits={"max_message_bytes": 65_536}
    )
    cases = bad_records(agent_of(unique_agent))
    async with bridge_and_client(config) as (bridge, client):
        client.expect(sys_id for _raw, sys_id, _words in cases if sys_id)
        for raw, _sys_id, _words in cases:
            await client.send_raw(raw)
        good = output_record(
            "Echo", agent=agent_of(unique_agent), payload={"message": "still here"}
        )
        await client.send([good])
        [result] = await client.wait([good["sys_id"]], timeout=20)
        assert result.final["payload"]["message"] == "still here"
        # Answers to records without a readable sys_id arrive as stray records.
        deadline = time.monotonic() + 10
        expected_stray = sum(1 for _raw, sys_id, _w in cases if sys_id is None)
        while len(client.stray) < expected_stray and time.monotonic() < deadline:
            await asyncio.sleep(0.05)
        for raw, sys_id, words in cases:
            if sys_id is None:
                matches = [r for r in client.stray if words in r["error_string"]]
                assert matches, f"no error record mentioning {words!r}"
                assert matches[0]["complete"] is True
                continue
            [answer] = await client.wait([sys_id], timeout=10)
            assert answer.complete_at == 0
            assert words in answer.error_string, (raw[:80], answer.error_string)
            assert answer.final["payload"]["error"]["message"]
        assert bridge.counters.failed == len(cases)


async def test_duplicates_by_sys_id_run_once(
    broker: BrokerAddress, unique_agent: str, tmp_path: Path
) -> None:
    config = make_config(broker.host, broker.port, unique_agent, tmp_path)
    async with bridge_and_client(config) as (bridge, client):
        slow = output_record("Echo", agent=agent_of(unique_agent), payload={"delay": 0.3})
        await client.send([slow, slow])  # the second arrives while the first runs
        await client.wait([slow["sys_id"]], timeout=10)
        await client.send([slow])  # after it finished
        await asyncio.sleep(0.5)
        assert bridge.counters.processed == 1
        assert bridge.counters.duplicates == 2
        assert client.results[slow["sys_id"]].duplicates == 0


async def test_expired_and_timed_out_jobs_get_error_records(
    broker: BrokerAddress, unique_agent: str, tmp_path: Path
) -> None:
    config = make_config(broker.host, broker.port, unique_agent, tmp_path)
    async with bridge_and_client(config) as (_bridge, client):
        expired = output_record("Echo", agent=agent_of(unique_agent), expires_at=time.time() - 5)
        slow = output_record(
            "Echo", agent=agent_of(unique_agent), payload={"delay": 30}, timeout=0.3
        )
        await client.send([expired, slow])
        exp, tmo = await client.wait([expired["sys_id"], slow["sys_id"]], timeout=10)
        assert exp.error_string.startswith("expired:")
        assert tmo.error_string.startswith("timeout:")
        assert tmo.final["probe_time"] >= 250


async def test_interactive_lane_answers_while_standard_lane_is_full(
    broker: BrokerAddress, unique_agent: str, tmp_path: Path
) -> None:
    config = make_config(
        broker.host,
        broker.port,
        unique_agent,
        tmp_path,
        limits={"lane_workers": [2, 2, 4], "max_in_flight": 50},
    )
    async with bridge_and_client(config) as (bridge, client):
        hogs = [
            output_record("Echo", agent=agent_of(unique_agent), payload={"delay": 3})
            for _ in range(200)
        ]
        await client.send(hogs, batch=10)
        deadline = time.monotonic() + 5
        while bridge.scheduler.lane_running[2] < 4 and time.monotonic() < deadline:
            await asyncio.sleep(0.02)
        assert bridge.scheduler.lane_running[2] == 4
        urgent = output_record(
            "Echo", agent=agent_of(unique_agent), priority=0, payload={"message": "now"}
        )
        started = time.perf_counter()
        await client.send([urgent], express=True)
        await client.wait([urgent["sys_id"]], timeout=5)
        assert time.perf_counter() - started < 1.0
        for sys_id in [h["sys_id"] for h in hogs]:
            bridge.cancel(sys_id)


async def test_cancel_running_job(broker: BrokerAddress, unique_agent: str, tmp_path: Path) -> None:
    config = make_config(broker.host, broker.port, unique_agent, tmp_path)
    async with bridge_and_client(config) as (bridge, client):
        slow = output_record("Echo", agent=agent_of(unique_agent), payload={"delay": 30})
        await client.send([slow])
        deadline = time.monotonic() + 5
        while slow["sys_id"] not in bridge.scheduler.running and time.monotonic() < deadline:
            await asyncio.sleep(0.02)
        assert bridge.cancel(slow["sys_id"])
        [result] = await client.wait([slow["sys_id"]], timeout=5)
        assert result.error_string.startswith("cancelled:")


async def test_stop_without_answers_leaves_jobs_for_redelivery(
    broker: BrokerAddress, unique_agent: str, tmp_path: Path
) -> None:
    """A bridge that stops mid-job does not acknowledge it: the next start runs it."""
    config = make_config(
        broker.host, broker.port, unique_agent, tmp_path, limits={"drain_timeout": 0.2}
    )
    slow = output_record("Echo", agent=agent_of(unique_agent), payload={"delay": 1.5})
    async with EccClient(config.broker, agent=unique_agent) as client:
        async with bridge_and_client(config) as (bridge, _c):
            await client.send([slow])
            deadline = time.monotonic() + 5
            while slow["sys_id"] not in bridge.scheduler.running and time.monotonic() < deadline:
                await asyncio.sleep(0.02)
        assert not client.results[slow["sys_id"]].chunks
        async with bridge_and_client(config) as (bridge2, _c):
            [result] = await client.wait([slow["sys_id"]], timeout=20)
            assert result.complete_at == 0
            assert bridge2.counters.processed == 1
