"""/healthz and /metrics over real HTTP from a bridge on a real broker."""

from __future__ import annotations

from pathlib import Path

import aiohttp

from bridge.agent.metrics import serve_metrics
from bridge.wire.client import output_record
from tests.brokers import BrokerAddress
from tests.harness import bridge_and_client, make_config


async def test_healthz_and_metrics(
    broker: BrokerAddress, unique_agent: str, tmp_path: Path
) -> None:
    config = make_config(broker.host, broker.port, unique_agent, tmp_path)
    async with bridge_and_client(config) as (bridge, client):
        job = output_record("Echo", agent=f"mid.server.{unique_agent}", payload={"message": "x"})
        bad = output_record("NoSuchProbe", agent=f"mid.server.{unique_agent}")
        await client.send([job, bad])
        await client.wait([job["sys_id"], bad["sys_id"]], timeout=10)
        async with serve_metrics(bridge, "127.0.0.1", 0) as port, aiohttp.ClientSession() as http:
            async with http.get(f"http://127.0.0.1:{port}/healthz") as resp:
                assert resp.status == 200
                health = await resp.json()
            async with http.get(f"http://127.0.0.1:{port}/metrics") as resp:
                assert resp.status == 200
                text = await resp.text()
    assert health["status"] == "ok"
    assert health["agent"] == f"mid.server.{unique_agent}"
    assert health["processed"] == 1
    assert "midbridge_jobs_processed_total 1" in text
    assert 'midbridge_jobs_failed_total{kind="unknown_topic"} 1' in text
    assert 'midbridge_broker_connected{session="bulk"} 1' in text
    assert 'midbridge_probe_duration_seconds_total{topic="Echo"}' in text
