"""The instance's operations side: ``/metrics`` (prometheus_client's own parser reads it),
the request log line, ``/livez`` vs ``/readyz`` during a broker outage, and
``midbridge instance discovery run --wait`` against a real run (instance, connector,
broker, bridge, a web server to discover)."""

from __future__ import annotations

import asyncio
import base64
import io
import logging
import os
import sys
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from importlib import metadata
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from aiohttp import web
from prometheus_client import CONTENT_TYPE_LATEST
from prometheus_client.parser import text_string_to_metric_families
from prometheus_client.samples import Sample

from bridge.agent.bridge import Bridge
from bridge.instance import discovery
from bridge.instance import metrics as metrics_module
from bridge.instance.connector import Connector, ConnectorSettings, install, keys_for
from bridge.instance.discovery_follow import follow_run
from bridge.instance.server import Instance, InstanceConfig
from bridge.wire.broker import BrokerConfig
from probes import REGISTRY
from tests.brokers import MosquittoServer
from tests.harness import REPO, make_config

pytestmark = pytest.mark.timeout(90)

ADMIN_PW = "admin-pass-ops-123"


def basic(user: str = "admin", password: str = ADMIN_PW) -> str:
    return "Basic " + base64.b64encode(f"{user}:{password}".encode()).decode()


@pytest.fixture
async def inst(tmp_path: Path) -> AsyncIterator[Instance]:
    async with Instance(InstanceConfig(db=tmp_path / "i.db", admin_password=ADMIN_PW)) as i:
        yield i


async def scrape(url: str, headers: dict[str, str] | None = None) -> tuple[int, str, str]:
    async with (
        aiohttp.ClientSession() as http,
        http.get(url + "/metrics", headers=headers or {}) as resp,
    ):
        return resp.status, resp.headers.get("Content-Type", ""), await resp.text()


def samples(text: str) -> list[Sample]:
    return [s for family in text_string_to_metric_families(text) for s in family.samples]


def value(found: list[Sample], name: str, **labels: str) -> float | None:
    for sample in found:
        if sample.name == name and all(sample.labels.get(k) == v for k, v in labels.items()):
            return sample.value
    return None


async def until(what: str, check: Callable[[], Awaitable[bool]], timeout: float = 20.0) -> None:
    deadline = time.monotonic() + timeout
    while not await check():
        if time.monotonic() > deadline:
            raise AssertionError(f"{what}: not within {timeout:g} s")
        await asyncio.sleep(0.1)


# --- /metrics ----------------------------------------------------------------------------


async def test_metrics_parse_with_histograms_queue_depth_agents_runs_and_process(
    inst: Instance, caplog: pytest.LogCaptureFixture
) -> None:
    store = inst.store
    await store.insert_many(
        "ecc_queue",
        [
            {"agent": "mid.server.dc1", "queue": "output", "topic": "Shazzam", "state": "ready"},
            {"agent": "mid.server.dc1", "queue": "output", "topic": "Shazzam", "state": "ready"},
            {"agent": "mid.server.dc1", "queue": "output", "topic": "SSH", "state": "processing"},
            {"agent": "mid.server.dc2", "queue": "output", "topic": "SNMP", "state": "ready"},
            {"agent": "mid.server.dc2", "queue": "output", "topic": "SNMP", "state": "processed"},
            {"agent": "mid.server.dc2", "queue": "input", "topic": "SNMP", "state": "ready",
             "response_to": "x"},
        ],
    )  # fmt: skip
    await store.insert_many(
        "ecc_agent",
        [{"name": "dc1", "status": "Up"}, {"name": "dc2", "status": "Up"},
         {"name": "dc3", "status": "Down"}],
    )  # fmt: skip
    run = await store.insert("discovery_status", {"name": "lab", "state": "Scanning"})
    await store.update("discovery_status", run["sys_id"], {"state": "Error"})
    await store.insert("discovery_status", {"name": "lab2", "state": "Scanning"})
    caplog.set_level(logging.INFO, logger="midbridge.instance.http")
    async with aiohttp.ClientSession() as http:
        url = f"{inst.url}/api/now/table/ecc_agent/{'a' * 32}"
        async with http.get(url, headers={"Authorization": basic()}) as resp:
            assert resp.status == 404
        async with http.get(
            inst.url + "/api/now/table/ecc_agent?sysparm_query=name=dc1",
            headers={"Authorization": basic()},
        ) as resp:
            assert resp.status == 200
        async with http.get(
            inst.url + "/api/now/table/sys_user", headers={"Authorization": basic("admin", "no")}
        ) as resp:
            assert resp.status == 401
    status, content_type, text = await scrape(inst.url)
    assert status == 200
    assert content_type == CONTENT_TYPE_LATEST  # text/plain; version=0.0.4; charset=utf-8
    found = samples(text)

    # Requests by route template (no sys_id in a label), status class, and a histogram.
    one = "/api/now/table/{table}/{sys_id}"
    assert value(found, "midbridge_instance_http_requests_total", route=one, status="4xx") == 1
    listing = "/api/now/table/{table}"
    assert value(found, "midbridge_instance_http_requests_total", route=listing, status="2xx") == 1
    assert value(found, "midbridge_instance_http_requests_total", route=listing, status="4xx") == 1
    buckets = [
        s
        for s in found
        if s.name == "midbridge_instance_http_request_duration_seconds_bucket"
        and s.labels["route"] == listing
    ]
    assert {b.labels["le"] for b in buckets} >= {"0.005", "0.1", "1.0", "+Inf"}
    assert value(found, "midbridge_instance_http_request_duration_seconds_count",
                 route=listing, method="GET") == 2  # fmt: skip
    assert not any("a" * 32 in str(s.labels) for s in found)

    # ECC depth: outputs not yet answered, by state and agent (processed and inputs left out).
    depth = "midbridge_instance_ecc_queue_depth"
    assert value(found, depth, state="ready", agent="mid.server.dc1") == 2
    assert value(found, depth, state="processing", agent="mid.server.dc1") == 1
    assert value(found, depth, state="ready", agent="mid.server.dc2") == 1
    assert value(found, depth, state="processed") is None
    assert value(found, "midbridge_instance_agents", status="Up") == 2
    assert value(found, "midbridge_instance_agents", status="Down") == 1
    runs = "midbridge_instance_discovery_runs_total"
    assert value(found, runs, event="started") == 2
    assert value(found, runs, event="failed") == 1
    assert value(found, runs, event="completed") == 0
    assert value(found, "midbridge_instance_discovery_runs_active") == 1
    assert value(found, "midbridge_instance_build_info", version=metadata.version("midbridge")) == 1
    assert value(found, "process_resident_memory_bytes") is not None
    assert value(found, "python_info") is not None
    # No placeholder series: every label value is real.
    assert not [s for s in found if "none" in s.labels.values()]

    # One log line per request, the refusal at WARNING, no secret, no query string.
    lines = [r for r in caplog.records if r.name == "midbridge.instance.http"]
    messages = [r.getMessage() for r in lines]
    assert any(m.startswith("GET /api/now/table/ecc_agent 200 ") for m in messages), messages
    [refused] = [r for r in lines if " 401 " in r.getMessage()]
    assert refused.levelno == logging.WARNING
    assert refused.getMessage().endswith("(refused)")
    assert not any("sysparm_query" in m or "name=dc1" in m for m in messages)
    assert not any(basic() in m or ADMIN_PW in m for m in messages)
    # /metrics itself at DEBUG only.
    assert not any(m.startswith("GET /metrics") for m in messages)

    # Scrape-time gauges follow the store (series that went away go away).
    await store.update_query("ecc_queue", "queue=output^agent=mid.server.dc2", {"state": "error"})
    found = samples((await scrape(inst.url))[2])
    assert value(found, depth, agent="mid.server.dc2") is None
    assert value(found, depth, state="ready", agent="mid.server.dc1") == 2


async def test_metrics_agent_series_are_bounded(
    inst: Instance, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(metrics_module, "MAX_AGENT_SERIES", 3)
    rows = [
        {"agent": f"mid.server.a{i}", "queue": "output", "topic": "Shazzam", "state": "ready"}
        for i in range(8)
        for _ in range(i + 1)  # a7 has the most: the busiest keep their own series
    ]
    await inst.store.insert_many("ecc_queue", rows)
    found = samples((await scrape(inst.url))[2])
    series = {
        s.labels["agent"]: s.value for s in found if s.name == "midbridge_instance_ecc_queue_depth"
    }
    assert series == {"mid.server.a7": 8, "mid.server.a6": 7, "mid.server.a5": 6, "_other": 15}


async def test_metrics_token_needs_a_bearer_header(tmp_path: Path) -> None:
    token = "tok-" + uuid.uuid4().hex
    config = InstanceConfig(db=tmp_path / "i.db", admin_password=ADMIN_PW, metrics_token=token)
    async with Instance(config) as inst:
        assert (await scrape(inst.url))[0] == 401
        assert (await scrape(inst.url, {"Authorization": basic()}))[0] == 401
        assert (await scrape(inst.url, {"Authorization": "Bearer wrong"}))[0] == 401
        status, _, text = await scrape(inst.url, {"Authorization": f"Bearer {token}"})
        assert status == 200
        assert "midbridge_instance_build_info" in text
        # The health endpoints stay open.
        async with aiohttp.ClientSession() as http, http.get(inst.url + "/livez") as resp:
            assert resp.status == 200


# --- /livez and /readyz ------------------------------------------------------------------


async def health(url: str) -> tuple[int, int, dict[str, Any]]:
    async with aiohttp.ClientSession() as http:
        async with http.get(url + "/livez") as live:
            live_status = live.status
        async with http.get(url + "/readyz") as ready:
            return live_status, ready.status, await ready.json()


async def test_livez_stays_up_while_readyz_follows_the_broker(
    inst: Instance, private_broker: MosquittoServer
) -> None:
    prefix = "t" + uuid.uuid4().hex[:10]
    assert await health(inst.url) == (200, 200, {"status": "ready", "checks": {"store": "ok"}})
    connector = Connector(
        inst.store,
        BrokerConfig(
            host=private_broker.host, port=private_broker.port, reconnect_min=0.1,
            reconnect_max=0.5,
        ),
        settings=ConnectorSettings(prefix=prefix, client_id=f"inst-{prefix}"),
    )  # fmt: skip
    inst.attach_connector(connector)
    live, ready, body = await health(inst.url)
    assert (live, ready) == (200, 503)  # attached, not yet connected
    assert body["checks"]["connector"] == "not connected to the broker"
    async with connector:

        async def ready_is(code: int) -> bool:
            return (await health(inst.url))[1] == code

        await until("ready with the broker", lambda: ready_is(200))
        found = samples((await scrape(inst.url))[2])
        assert value(found, "midbridge_instance_connector_connected") == 1
        private_broker.stop()
        await until("not ready without the broker", lambda: ready_is(503))
        live, _, body = await health(inst.url)
        assert live == 200  # a broker outage never fails liveness
        assert body == {
            "status": "not ready",
            "checks": {"store": "ok", "connector": "not connected to the broker"},
        }
        found = samples((await scrape(inst.url))[2])
        assert value(found, "midbridge_instance_connector_connected") == 0
        private_broker.start()
        await until("ready again", lambda: ready_is(200))


async def test_readyz_fails_when_the_store_does_not_answer(tmp_path: Path) -> None:
    async with Instance(InstanceConfig(db=tmp_path / "i.db", admin_password=ADMIN_PW)) as inst:
        await inst.store.close()  # the database gone from under the running API
        live, ready, body = await health(inst.url)
        assert (live, ready) == (200, 503)
        assert body["checks"]["store"].startswith("error: ")


# --- instance discovery run --wait -------------------------------------------------------


async def lab_web_server() -> tuple[web.AppRunner, int]:
    async def home(request: web.Request) -> web.Response:
        return web.Response(
            text="<html><head><title>Ops lab</title></head><body>hi</body></html>",
            content_type="text/html",
        )

    app = web.Application()
    app.router.add_get("/", home)
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    await web.TCPSite(runner, "127.0.0.1", 0).start()
    return runner, int(runner.addresses[0][1])


async def run_cli(*argv: str, env: dict[str, str]) -> tuple[int, str, str]:
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "bridge", *argv, cwd=REPO, env=env,
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
    )  # fmt: skip
    async with asyncio.timeout(60):
        out, err = await proc.communicate()
    assert proc.returncode is not None
    return proc.returncode, out.decode(), err.decode()


@pytest.mark.slow
async def test_discovery_run_wait_follows_to_the_end_and_lists_the_cis(
    private_broker: MosquittoServer, unique_agent: str, tmp_path: Path
) -> None:
    prefix = "t" + uuid.uuid4().hex[:12]
    db = tmp_path / "instance" / "instance.db"
    keys = keys_for(db)
    inst = Instance(InstanceConfig(db=db, admin_password=ADMIN_PW))
    install(inst, keys)
    engine = discovery.install(inst)
    connector = Connector(
        inst.store,
        BrokerConfig(host=private_broker.host, port=private_broker.port, reconnect_min=0.1),
        settings=ConnectorSettings(
            prefix=prefix, client_id=f"inst-{prefix}", sweep_interval=0.5,
            lease_check_interval=0.2,
        ),
        keys=keys,
    )  # fmt: skip
    inst.attach_connector(connector)
    web_runner, web_port = await lab_web_server()
    config = make_config(
        private_broker.host, private_broker.port, unique_agent, tmp_path / "bridge",
        security={"require_signatures": True, "platform_key": keys.public_key_b64},
    )  # fmt: skip
    config.bridge.topic_prefix = prefix
    env = {k: v for k, v in os.environ.items() if not k.startswith("MIDBRIDGE_")}
    env["MIDBRIDGE_ADMIN_PASSWORD"] = ADMIN_PW
    try:
        async with inst, connector, Bridge(config, REGISTRY):
            await inst.store.insert_many(
                "discovery_schedule",
                [{"name": "lab", "ranges": "127.0.0.1", "agent": unique_agent,
                  "ports": str(web_port), "http_ports": str(web_port), "https_ports": "",
                  "ssh_ports": ""},
                 {"name": "nobody", "ranges": "127.0.0.1", "agent": "t-nobody-" + prefix,
                  "ports": str(web_port)}],
            )  # fmt: skip
            code, out, err = await run_cli(
                "instance", "discovery", "run", "lab", "--wait", "--url", inst.url, env=env
            )
            assert (code, err) == (0, ""), (out, err)
            lines = out.splitlines()
            assert lines[0].startswith("discovery run ")
            assert lines[0].endswith("addresses)")
            # Not a terminal: plain progress lines, the last one Completed, then the CIs.
            progress = [ln for ln in lines if ln.startswith("discovery ") and "%: " in ln]
            assert progress, out
            assert progress[-1].startswith("discovery Completed 100%: scanned 1/1"), out
            [summary] = [ln for ln in lines if ln.startswith("run ")]
            assert summary.endswith(": 1 CI"), out
            [ci] = [ln for ln in lines if ln.startswith("  web_server ")]
            assert "127.0.0.1" in ci
            assert "\x1b[" not in out  # no terminal codes in a pipe

            # A run that ends in Error or is cancelled: exit status 1, its log shown.
            waiting = asyncio.create_task(
                run_cli(
                    "instance", "discovery", "run", "nobody", "--wait", "--url", inst.url,
                    env=env,
                )
            )  # fmt: skip

            async def started() -> bool:
                return bool(await inst.store.count("discovery_status", "name=nobody"))

            await until("the second run started", started)
            [row] = await inst.store.query("discovery_status", "name=nobody")
            await engine.cancel_run(row["sys_id"])
            code, out, err = await waiting
            assert code == 1, (out, err)
            assert "Traceback" not in err
            assert " Cancelled" in out
            assert ": 0 CIs" in out
            assert "  log: " in out

            # The progress bar on a terminal, and Error: exit status 1.
            status = await inst.store.insert(
                "discovery_status", {"name": "bar", "state": "Scanning", "progress": 40.0,
                                     "addresses": 10, "scanned": 4},
            )  # fmt: skip

            async def fail_later() -> None:
                await asyncio.sleep(0.5)
                await inst.store.update(
                    "discovery_status", status["sys_id"],
                    {"state": "Error", "log": "the store refused"},
                )  # fmt: skip

            screen = io.StringIO()
            failing = asyncio.create_task(fail_later())
            async with aiohttp.ClientSession(headers={"Authorization": basic()}) as http:
                code = await follow_run(
                    http, inst.url, status["sys_id"], timeout=20, interval=0.1, out=screen,
                    tty=True,
                )  # fmt: skip
            await failing
            assert code == 1
            shown = screen.getvalue()
            assert "\x1b[" in shown
            assert "discovery" in shown
            assert "run " + status["sys_id"] + " Error" in shown
            assert ": 0 CIs" in shown
            assert "log: the store refused" in shown
    finally:
        await web_runner.cleanup()


async def test_discovery_run_wait_errors_are_one_line(inst: Instance) -> None:
    env = {k: v for k, v in os.environ.items() if not k.startswith("MIDBRIDGE_")}
    env["MIDBRIDGE_ADMIN_PASSWORD"] = ADMIN_PW
    code, out, err = await run_cli(
        "instance", "discovery", "run", "x", "--wait", "--timeout", "0", "--url", inst.url,
        env=env,
    )  # fmt: skip
    # The instance has no discovery engine: a one-line error, exit 2, no traceback.
    assert code == 2, (out, err)
    assert "Traceback" not in err
    assert len(err.strip().splitlines()) == 1, err
