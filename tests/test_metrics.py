"""/metrics, /livez, /readyz and /healthz over real HTTP from a bridge on a real broker."""

from __future__ import annotations

from pathlib import Path

import aiohttp
from prometheus_client import CONTENT_TYPE_LATEST
from prometheus_client.parser import text_string_to_metric_families

from bridge.agent.metrics import BridgeSlot, serve_metrics
from bridge.wire.client import output_record
from tests.brokers import BrokerAddress
from tests.harness import bridge_and_client, make_config


async def test_endpoints_and_metrics(
    broker: BrokerAddress, unique_agent: str, tmp_path: Path
) -> None:
    config = make_config(broker.host, broker.port, unique_agent, tmp_path)
    async with bridge_and_client(config) as (bridge, client):
        job = output_record("Echo", agent=f"mid.server.{unique_agent}", payload={"message": "x"})
        bad = output_record("NoSuchProbe", agent=f"mid.server.{unique_agent}")
        await client.send([job, bad])
        await client.wait([job["sys_id"], bad["sys_id"]], timeout=10)
        async with serve_metrics(bridge, "127.0.0.1", 0) as port, aiohttp.ClientSession() as http:
            base = f"http://127.0.0.1:{port}"
            async with http.get(f"{base}/healthz") as resp:
                assert resp.status == 200
                health = await resp.json()
            async with http.get(f"{base}/livez") as resp:
                assert resp.status == 200
            async with http.get(f"{base}/readyz") as resp:
                assert resp.status == 200
                assert (await resp.json())["status"] == "ok"
            async with http.get(f"{base}/metrics") as resp:
                assert resp.status == 200
                assert resp.headers["Content-Type"] == CONTENT_TYPE_LATEST
                text = await resp.text()
    assert health["status"] == "ok"
    assert health["agent"] == f"mid.server.{unique_agent}"
    assert health["processed"] == 1
    families = {f.name: f for f in text_string_to_metric_families(text)}
    assert families["midbridge_job_duration_seconds"].type == "histogram"
    assert families["midbridge_jobs"].type == "counter"
    values = {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for family in families.values()
        for s in family.samples
    }
    assert values[("midbridge_jobs_total", (("result", "ok"), ("topic", "Echo")))] == 1
    key = ("midbridge_jobs_total", (("result", "unknown_topic"), ("topic", "NoSuchProbe")))
    assert values[key] == 1
    assert values[("midbridge_job_duration_seconds_count", (("topic", "Echo"),))] == 1
    assert values[("midbridge_broker_connected", (("session", "bulk"),))] == 1
    assert values[("midbridge_records_received_total", ())] == 2
    assert values[("midbridge_lane_running", (("lane", "interactive"),))] == 0
    # The placeholders of the hand-written exposition are gone.
    assert 'kind="none"' not in text
    assert 'topic="none"' not in text
    assert "probe_duration_seconds_total" not in text


async def test_before_the_bridge_is_up_alive_not_ready() -> None:
    slot = BridgeSlot()
    slot.waiting = "broker: refused: nothing listens"
    async with serve_metrics(slot, "127.0.0.1", 0) as port, aiohttp.ClientSession() as http:
        base = f"http://127.0.0.1:{port}"
        async with http.get(f"{base}/livez") as resp:
            assert resp.status == 200
        async with http.get(f"{base}/readyz") as resp:
            assert resp.status == 503
            assert (await resp.json())["problems"] == ["broker: refused: nothing listens"]
        async with http.get(f"{base}/metrics") as resp:
            text = await resp.text()
    names = {f.name for f in text_string_to_metric_families(text)}
    assert {"midbridge_ready", "midbridge_build_info", "process_cpu_seconds"} <= names
    assert "midbridge_ready 0.0" in text
