"""Validation, sealed credentials, signed jobs and SystemCommand through the real broker."""

from __future__ import annotations

import asyncio
import base64
import logging
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
from aiohttp import web
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from bridge.agent.bridge import Bridge
from bridge.wire.client import EccClient, JobResult, output_record
from bridge.wire.sealing import encrypt_credential, sign_record
from tests.brokers import BrokerAddress
from tests.harness import bridge_and_client, make_config

TOKEN = "tok-5f1c9e0a-very-secret"


@pytest.fixture
async def api() -> AsyncIterator[str]:
    """An HTTP API that answers 200 only to the bearer token."""

    async def handle(request: web.Request) -> web.Response:
        if request.headers.get("Authorization") == f"Bearer {TOKEN}":
            return web.json_response({"ok": True})
        return web.json_response({"ok": False}, status=401)

    app = web.Application()
    app.router.add_get("/api", handle)
    runner = web.AppRunner(app)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    port = runner.addresses[0][1]
    yield f"http://127.0.0.1:{port}/api"
    await runner.cleanup()


def rest_job(agent: str, url: str, bridge: Bridge, *, sys_id: str | None = None) -> dict[str, Any]:
    record = output_record(
        "RESTProbe", agent=agent, payload={"url": url, "credential_id": "api"}, sys_id=sys_id
    )
    record["credentials"] = [
        encrypt_credential(
            bridge.identity.keys.public_raw,
            {"id": "api", "type": "http_bearer", "token": TOKEN},
            sys_id=record["sys_id"],
        )
    ]
    return record


async def command(client: EccClient, agent: str, name: str, **payload: Any) -> JobResult:
    record = output_record("SystemCommand", agent=agent, name=name, payload=payload, priority=0)
    await client.send([record], express=True)
    [result] = await client.wait([record["sys_id"]], timeout=10)
    return result


def all_text(client: EccClient) -> str:
    return repr([r.runs for r in client.results.values()]) + repr(client.stray)


async def test_validation_gates_sealed_credentials(
    broker: BrokerAddress,
    unique_agent: str,
    tmp_path: Path,
    api: str,
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.DEBUG)
    agent = f"mid.server.{unique_agent}"
    config = make_config(
        broker.host, broker.port, unique_agent, tmp_path, security={"require_validation": True}
    )
    async with bridge_and_client(config) as (bridge, client):
        before = rest_job(agent, api, bridge)
        await client.send([before])
        [refused] = await client.wait([before["sys_id"]], timeout=10)
        assert refused.error_string.startswith("refused: credentials: this MID is not validated")

        sweep = output_record("Echo", agent=agent, payload={"message": "no credential needed"})
        await client.send([sweep])
        [ran] = await client.wait([sweep["sys_id"]], timeout=10)
        assert ran.error_string == ""

        wrong = await command(client, agent, "validate", fingerprint="f" * 64)
        assert wrong.error_string.startswith("credential_error: fingerprint:")
        ok = await command(client, agent, "validate", fingerprint=bridge.identity.fingerprint)
        assert ok.error_string == ""
        assert ok.final["payload"]["status"]["validated"] is True

        after = rest_job(agent, api, bridge)
        await client.send([after])
        [answer] = await client.wait([after["sys_id"]], timeout=10)
        assert answer.error_string == ""
        assert answer.final["payload"]["status"] == 200

        replayed = output_record(
            "RESTProbe", agent=agent, payload={"url": api, "credential_id": "api"}
        )
        replayed["credentials"] = after["credentials"]  # copied into another job
        await client.send([replayed])
        [copy] = await client.wait([replayed["sys_id"]], timeout=10)
        assert copy.error_string.startswith("credential_error: credentials:")
        assert "does not open" in copy.error_string

        old = rest_job(agent, api, bridge)
        inval = await command(client, agent, "invalidate")
        assert inval.final["payload"]["status"]["validated"] is False
        assert inval.final["payload"]["status"]["fingerprint"] == bridge.identity.fingerprint
        await client.send([old])  # sealed to the dropped key
        [stale] = await client.wait([old["sys_id"]], timeout=10)
        assert stale.error_string.startswith("refused: credentials: this MID is not validated")
        await command(client, agent, "validate", fingerprint=bridge.identity.fingerprint)
        stale_again = {**old, "sys_id": old["sys_id"] + "b"}
        await client.send([stale_again])
        [dead] = await client.wait([stale_again["sys_id"]], timeout=10)
        assert dead.error_string.startswith("credential_error: credentials:")
    assert TOKEN not in all_text(client)
    assert TOKEN not in caplog.text


def platform_keys() -> tuple[Ed25519PrivateKey, str]:
    private = Ed25519PrivateKey.generate()
    raw = private.public_key().public_bytes(
        serialization.Encoding.Raw, serialization.PublicFormat.Raw
    )
    return private, base64.b64encode(raw).decode()


async def test_signed_jobs_required(
    broker: BrokerAddress, unique_agent: str, tmp_path: Path
) -> None:
    private, public_b64 = platform_keys()
    agent = f"mid.server.{unique_agent}"
    config = make_config(
        broker.host,
        broker.port,
        unique_agent,
        tmp_path,
        security={"require_signatures": True, "platform_key": public_b64},
    )
    async with bridge_and_client(config) as (bridge, client):
        unsigned = output_record("Echo", agent=agent, payload={"message": "a"})
        good = sign_record(private, output_record("Echo", agent=agent, payload={"message": "b"}))
        tampered = dict(
            sign_record(private, output_record("Echo", agent=agent, payload={"message": "c"}))
        )
        tampered["payload"] = {"message": "changed"}
        await client.send([unsigned, good, tampered])
        r_unsigned, r_good, r_tampered = await client.wait(
            [unsigned["sys_id"], good["sys_id"], tampered["sys_id"]], timeout=10
        )
    assert (
        r_unsigned.error_string
        == "bad_record: signature: the record is not signed and signatures are required"
    )
    assert r_good.error_string == ""
    assert r_good.final["payload"]["message"] == "b"
    assert r_tampered.error_string.startswith("bad_record: signature: does not verify")
    assert bridge.counters.processed == 1


async def test_pause_resume_keep_heartbeats(
    broker: BrokerAddress, unique_agent: str, tmp_path: Path
) -> None:
    agent = f"mid.server.{unique_agent}"
    config = make_config(broker.host, broker.port, unique_agent, tmp_path)
    async with bridge_and_client(config) as (bridge, client):
        paused = await command(client, agent, "pause")
        assert paused.final["payload"]["status"]["status"] == "Paused"
        job = output_record("Echo", agent=agent, payload={"message": "later"})
        await client.send([job])
        await asyncio.sleep(0.5)
        assert not client.results[job["sys_id"]].runs  # not taken while paused
        beat = output_record("HeartbeatProbe", agent=agent, priority=0)
        await client.send([beat], express=True)
        [hb] = await client.wait([beat["sys_id"]], timeout=5)
        assert hb.final["payload"]["status"]["status"] == "Paused"
        resumed = await command(client, agent, "resume")
        assert resumed.final["payload"]["status"]["status"] == "Up"
        [done] = await client.wait([job["sys_id"]], timeout=10)
        assert done.final["payload"]["message"] == "later"
        assert bridge.status == "Up"


async def test_drain_finishes_work_in_flight_then_reports_drained(
    broker: BrokerAddress, unique_agent: str, tmp_path: Path
) -> None:
    agent = f"mid.server.{unique_agent}"
    config = make_config(broker.host, broker.port, unique_agent, tmp_path)
    async with bridge_and_client(config) as (bridge, client):
        running = output_record("Echo", agent=agent, payload={"delay": 1.0})
        await client.send([running])
        deadline = time.monotonic() + 5
        while running["sys_id"] not in bridge.scheduler.running and time.monotonic() < deadline:
            await asyncio.sleep(0.02)
        drain = await command(client, agent, "drain")
        assert drain.final["payload"]["status"]["status"] == "Draining"
        new = output_record("Echo", agent=agent, payload={"message": "not now"})
        await client.send([new])
        [finished] = await client.wait([running["sys_id"]], timeout=10)
        assert finished.error_string == ""
        deadline = time.monotonic() + 5
        while bridge.status != "Drained" and time.monotonic() < deadline:
            await asyncio.sleep(0.02)
        assert bridge.status == "Drained"
        await asyncio.sleep(0.3)
        assert not client.results[new["sys_id"]].runs  # nothing new taken
        stats = await command(client, agent, "stats")
        assert stats.final["payload"]["status"]["status"] == "Drained"
        assert stats.final["payload"]["stats"]["processed"] >= 1


async def test_cancel_by_system_command(
    broker: BrokerAddress, unique_agent: str, tmp_path: Path
) -> None:
    agent = f"mid.server.{unique_agent}"
    config = make_config(broker.host, broker.port, unique_agent, tmp_path)
    async with bridge_and_client(config) as (bridge, client):
        slow = output_record("Echo", agent=agent, payload={"delay": 30})
        await client.send([slow])
        deadline = time.monotonic() + 5
        while slow["sys_id"] not in bridge.scheduler.running and time.monotonic() < deadline:
            await asyncio.sleep(0.02)
        result = await command(client, agent, "cancel", sys_id=slow["sys_id"])
        assert result.final["payload"]["cancelled"] is True
        [cancelled] = await client.wait([slow["sys_id"]], timeout=5)
        assert cancelled.error_string == "cancelled: the job was cancelled"
        missing = await command(client, agent, "cancel", sys_id="no-such-job")
        assert missing.error_string.startswith("bad_parameter: sys_id:")
        bad = await command(client, agent, "reboot")
        assert bad.error_string.startswith("bad_parameter: command:")


async def test_heartbeat_answered_within_a_second_while_sweeps_saturate(
    broker: BrokerAddress, unique_agent: str, tmp_path: Path
) -> None:
    agent = f"mid.server.{unique_agent}"
    config = make_config(
        broker.host,
        broker.port,
        unique_agent,
        tmp_path,
        limits={"probe_rate": 5000, "lane_workers": [4, 4, 16]},
    )
    async with bridge_and_client(config) as (bridge, client):
        sweeps = [
            output_record(
                "Shazzam",
                agent=agent,
                payload={"targets": "127.0.0.1-127.0.0.254", "ports": "20000-20019"},
            )
            for _ in range(1000)
        ]
        await client.send(sweeps, batch=50)
        deadline = time.monotonic() + 10
        while (
            bridge.scheduler.lane_running[2] < 16 or bridge.admission.in_flight < 1000
        ) and time.monotonic() < deadline:
            await asyncio.sleep(0.02)
        assert bridge.scheduler.lane_running[2] == 16
        assert bridge.admission.in_flight == 1000
        latencies = []
        for _ in range(5):
            beat = output_record("HeartbeatProbe", agent=agent, priority=0)
            started = time.perf_counter()
            await client.send([beat], express=True)
            [hb] = await client.wait([beat["sys_id"]], timeout=5)
            latencies.append(time.perf_counter() - started)
            assert hb.final["payload"]["stats"]["in_flight"] >= 1000
            await asyncio.sleep(0.1)
        assert max(latencies) < 1.0, latencies
        for sweep in sweeps:
            bridge.cancel(sweep["sys_id"])
