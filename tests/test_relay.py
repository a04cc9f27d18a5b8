"""The relay against the built-in instance: Table API → broker → bridge → broker → Table API.

The built-in instance stands in for ServiceNow (no connector of its own runs here: the
relay is the only one taking its ECC queue), polled as ``mid.user`` (role mid_server).
"""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
import time
import uuid
from collections.abc import AsyncIterator
from contextlib import AsyncExitStack, asynccontextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from xml.etree import ElementTree

import aiohttp
import orjson

from bridge.agent.bridge import Bridge
from bridge.instance import auth
from bridge.instance.server import Instance, InstanceConfig
from bridge.relay.service import Relay, RelaySettings, results_envelope
from bridge.wire.broker import BrokerConfig
from probes import REGISTRY
from tests.brokers import BrokerAddress
from tests.harness import REPO, make_config
from tests.test_connector import ADMIN_PASSWORD, MID_PASSWORD, basic

ECHO_XML = (
    '<parameters><parameter name="message" value="a &lt;b&gt; &amp; c"/>'
    '<parameter name="chunks" value="2"/></parameters>'
)


@dataclass
class Snow:
    """The built-in instance as the relay's ServiceNow, with an admin's HTTP client."""

    inst: Instance
    http: aiohttp.ClientSession

    async def call(self, method: str, path: str, body: Any = None) -> Any:
        headers = {"Authorization": basic("admin", ADMIN_PASSWORD)}
        if body is not None:
            headers["Content-Type"] = "application/json"
        data = None if body is None else orjson.dumps(body)
        async with self.http.request(
            method, self.inst.url + path, data=data, headers=headers
        ) as response:
            assert response.status < 300, await response.text()
            return orjson.loads(await response.read())["result"]

    async def output(self, agent: str, topic: str, payload: Any, **fields: Any) -> str:
        record = await self.call(
            "POST",
            "/api/now/table/ecc_queue",
            {"agent": f"mid.server.{agent}", "topic": topic, "queue": "output",
             "state": "ready", "payload": payload, **fields},
        )  # fmt: skip
        return str(record["sys_id"])

    async def wait_done(self, sys_ids: list[str], timeout: float = 20.0) -> list[dict[str, Any]]:
        deadline = time.monotonic() + timeout
        while True:
            rows = [await self.call("GET", f"/api/now/table/ecc_queue/{s}") for s in sys_ids]
            if all(r["state"] in ("processed", "error") for r in rows):
                return rows
            if time.monotonic() > deadline:
                raise AssertionError(f"not finished: {[(r['sys_id'], r['state']) for r in rows]}")
            await asyncio.sleep(0.05)

    async def inputs(self, sys_id: str) -> list[dict[str, Any]]:
        result: list[dict[str, Any]] = await self.call(
            "GET",
            f"/api/now/table/ecc_queue?sysparm_query=queue=input^response_to={sys_id}"
            "^ORDERBYsequence",
        )
        return result


@asynccontextmanager
async def snow(tmp_path: Path, agent: str) -> AsyncIterator[Snow]:
    """The instance, with ``mid.user`` (role mid_server) acting for ``agent``."""
    inst = Instance(InstanceConfig(db=tmp_path / "snow.sqlite3", admin_password=ADMIN_PASSWORD))
    async with inst, aiohttp.ClientSession() as http:
        await auth.create_user(
            inst.store, "mid.user", MID_PASSWORD, roles=["mid_server"],
            web_service_access_only=True, mid_agents=[agent],
        )  # fmt: skip
        yield Snow(inst, http)


def relay_settings(url: str, agent: str, prefix: str, **over: Any) -> RelaySettings:
    options: dict[str, Any] = {"poll_interval": 0.1, "client_id": f"relay-{prefix}", **over}
    return RelaySettings(
        instance=url, user="mid.user", password=MID_PASSWORD, agent=agent, prefix=prefix,
        **options,
    )  # fmt: skip


def broker_config(broker: BrokerAddress) -> BrokerConfig:
    return BrokerConfig(host=broker.host, port=broker.port, reconnect_min=0.1, reconnect_max=1.0)


async def test_records_round_trip_through_relay_and_bridge_xml_in_the_results_envelope(
    broker: BrokerAddress, unique_agent: str, tmp_path: Path
) -> None:
    prefix = "r" + uuid.uuid4().hex[:12]
    async with AsyncExitStack() as stack:
        sn = await stack.enter_async_context(snow(tmp_path, unique_agent))
        config = make_config(broker.host, broker.port, unique_agent, tmp_path / "bridge")
        config.bridge.topic_prefix = prefix
        await stack.enter_async_context(Bridge(config, REGISTRY))
        relay = await stack.enter_async_context(
            Relay(relay_settings(sn.inst.url, unique_agent, prefix), broker_config(broker))
        )
        xml_job = await sn.output(unique_agent, "Echo", ECHO_XML)
        json_job = await sn.output(unique_agent, "Echo", {"message": "json"}, priority=0)
        bad_xml = await sn.output(
            unique_agent,
            "Echo",
            '<parameters><parameter name="chunks" value="0"/></parameters>',
        )
        other = await sn.output("another-mid", "Echo", {"message": "not ours"})
        done = await sn.wait_done([xml_job, json_job, bad_xml])
        assert [r["state"] for r in done] == ["processed", "processed", "error"]
        assert done[2]["error_string"].startswith("bad_parameter: chunks:")

        chunks = await sn.inputs(xml_job)
        assert [(c["sequence"], c["complete"]) for c in chunks] == [("0", "false"), ("1", "true")]
        for chunk in chunks:
            assert chunk["agent"] == f"mid.server.{unique_agent}"
            assert chunk["topic"] == "Echo"
            assert chunk["queue"] == "input"
            root = ElementTree.fromstring(chunk["payload"])
            assert root.tag == "results"
            assert root.get("result_code") == "0"
            assert root.get("error") is None
            assert root.get("probe_time") is not None
            assert root.findtext("result/message") == "a <b> & c"
            assert root.findtext("result/chunk") == chunk["sequence"]
            params = {p.get("name"): p.get("value") for p in root.iterfind("parameters/parameter")}
            assert params == {"message": "a <b> & c", "chunks": "2"}

        [json_answer] = await sn.inputs(json_job)
        assert orjson.loads(json_answer["payload"]) == {"message": "json", "chunk": 0}

        [error] = await sn.inputs(bad_xml)
        root = ElementTree.fromstring(error["payload"])
        assert root.get("result_code") == "1"
        assert (root.get("error") or "").startswith("bad_parameter: chunks:")
        assert root.findtext("result/error/kind") == "bad_parameter"
        assert error["error_string"] == root.get("error")

        untouched = await sn.call("GET", f"/api/now/table/ecc_queue/{other}")
        assert untouched["state"] == "ready"  # another MID's work is not ours to take
        assert relay.stats["claimed"] == 3
        assert relay.stats["closed"] == 3


async def test_relay_publishes_again_what_was_not_answered_within_the_lease(
    broker: BrokerAddress, unique_agent: str, tmp_path: Path
) -> None:
    prefix = "r" + uuid.uuid4().hex[:12]
    async with AsyncExitStack() as stack:
        sn = await stack.enter_async_context(snow(tmp_path, unique_agent))
        relay = await stack.enter_async_context(
            Relay(
                relay_settings(sn.inst.url, unique_agent, prefix, lease=1.0),
                broker_config(broker),
            )
        )
        job = await sn.output(unique_agent, "Echo", {"message": "late", "chunks": 3})
        deadline = time.monotonic() + 10
        while (await sn.call("GET", f"/api/now/table/ecc_queue/{job}"))["state"] != "processing":
            assert time.monotonic() < deadline
            await asyncio.sleep(0.05)
        # Published to nobody: no bridge has ever subscribed. The lease brings it back.
        config = make_config(broker.host, broker.port, unique_agent, tmp_path / "bridge")
        config.bridge.topic_prefix = prefix
        await stack.enter_async_context(Bridge(config, REGISTRY))
        [done] = await sn.wait_done([job])
        assert done["state"] == "processed"
        assert relay.stats["republished"] >= 1
        chunks = await sn.inputs(job)
        assert [c["sequence"] for c in chunks] == ["0", "1", "2"]  # each once


def test_results_envelope_escapes_and_names() -> None:
    record = {
        "payload": {"out": "x\x00y", "9 bad key": [1, True, None], "nested": {"a": {"b": 2}}},
        "error_string": "",
        "probe_time": 12.5,
        "result_code": 0,
    }
    text = results_envelope(record, {"command": "ls <dir>"})
    root = ElementTree.fromstring(text)
    assert root.findtext("result/out") == "x\ufffdy"
    entry = root.find("result/entry")
    assert entry is not None
    assert entry.get("name") == "9 bad key"
    assert [i.text for i in entry.iterfind("item")] == ["1", "true", None]
    assert root.findtext("result/nested/a/b") == "2"
    assert root.find("parameters/parameter").get("value") == "ls <dir>"  # type: ignore[union-attr]


async def test_relay_command_line(broker: BrokerAddress, unique_agent: str, tmp_path: Path) -> None:
    prefix = "r" + uuid.uuid4().hex[:12]
    async with AsyncExitStack() as stack:
        sn = await stack.enter_async_context(snow(tmp_path, unique_agent))
        config = make_config(broker.host, broker.port, unique_agent, tmp_path / "bridge")
        config.bridge.topic_prefix = prefix
        await stack.enter_async_context(Bridge(config, REGISTRY))
        args = [
            sys.executable, "-m", "bridge", "relay", "--instance", sn.inst.url,
            "--user", "mid.user", "--password-stdin", "--agent", unique_agent,
            "--broker", f"{broker.host}:{broker.port}", "--prefix", prefix,
            "--poll-interval", "0.1", "--client-id", f"relay-cli-{prefix}",
        ]  # fmt: skip
        env = {k: v for k, v in os.environ.items() if not k.startswith("MIDBRIDGE_")}

        wrong = await asyncio.to_thread(
            subprocess.run, args, input="not-the-password\n", capture_output=True, text=True,
            cwd=REPO, env=env, timeout=30,
        )  # fmt: skip
        assert wrong.returncode == 2
        assert "HTTP 401" in wrong.stderr
        assert "not-the-password" not in wrong.stderr

        log_path = tmp_path / "relay.log"
        log = await asyncio.to_thread(log_path.open, "wb")
        stack.callback(log.close)
        proc = await asyncio.create_subprocess_exec(
            *args, stdin=subprocess.PIPE, stdout=log, stderr=log, cwd=REPO, env=env
        )
        try:
            assert proc.stdin is not None
            proc.stdin.write(f"{MID_PASSWORD}\n".encode())
            await proc.stdin.drain()
            proc.stdin.close()
            job = await sn.output(unique_agent, "Echo", ECHO_XML)
            [done] = await sn.wait_done([job], timeout=30)
            assert done["state"] == "processed"
            [last] = [c for c in await sn.inputs(job) if c["complete"] == "true"]
            assert ElementTree.fromstring(last["payload"]).tag == "results"
        finally:
            if proc.returncode is None:
                proc.send_signal(signal.SIGTERM)
            try:
                async with asyncio.timeout(20):
                    code = await proc.wait()
            except TimeoutError:
                proc.kill()
                await proc.wait()
                raise
        text = await asyncio.to_thread(log_path.read_text)
        assert code == 0, text
        assert MID_PASSWORD not in text
