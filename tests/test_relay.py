"""The relay against the built-in instance: Table API → broker → bridge → broker → Table API.

The built-in instance stands in for ServiceNow (no connector of its own runs here: the
relay is the only one taking its ECC queue), polled as ``mid.user`` (role mid_server).
The helpers here (the instance as ServiceNow, a scripted bridge) serve the other
``tests/test_relay_*.py`` modules too.
"""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
import time
import uuid
from collections.abc import AsyncIterator, Sequence
from contextlib import AsyncExitStack, asynccontextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from xml.etree import ElementTree

import aiohttp
import orjson

from bridge.agent.bridge import Bridge
from bridge.agent.config import Config
from bridge.instance import auth
from bridge.instance.server import Instance, InstanceConfig
from bridge.relay.core import SIGNING_KEY_FILE
from bridge.relay.service import Relay, RelaySettings, results_envelope
from bridge.wire.broker import BrokerConfig
from bridge.wire.keyfiles import public_key_b64, signing_key_file
from bridge.wire.records import new_sys_id
from bridge.wire.topics import Topics
from bridge.wire.transport import Delivery, MqttSession
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

    async def system_command(self, agent: str, command: str, **fields: Any) -> str:
        """A SystemCommand output as ServiceNow's MIDServerManage makes it (source = the
        command, priority 0). The built-in instance's Table API refuses these (its own go
        through agent actions), so it is stored directly."""
        record = await self.inst.store.insert(
            "ecc_queue",
            {"agent": f"mid.server.{agent}", "topic": "SystemCommand", "queue": "output",
             "state": "ready", "source": command, "priority": 0,
             "payload": "<parameters/>", **fields},
        )  # fmt: skip
        return str(record["sys_id"])

    async def attached(self, sys_id: str) -> list[tuple[str, str, bytes]]:
        """(file name, content type, content) of each attachment on an ecc_queue record,
        read through the instance's Attachment API as admin."""
        rows = await self.call(
            "GET", f"/api/now/attachment?sysparm_query=table_name=ecc_queue^table_sys_id={sys_id}"
        )
        found = []
        headers = {"Authorization": basic("admin", ADMIN_PASSWORD)}
        for row in rows:
            async with self.http.get(row["download_link"], headers=headers) as response:
                assert response.status == 200, await response.text()
                found.append((row["file_name"], row["content_type"], await response.read()))
        return found

    async def record(self, sys_id: str) -> dict[str, Any]:
        result: dict[str, Any] = await self.call("GET", f"/api/now/table/ecc_queue/{sys_id}")
        return result

    async def wait_done(self, sys_ids: list[str], timeout: float = 20.0) -> list[dict[str, Any]]:
        deadline = time.monotonic() + timeout
        while True:
            rows = [await self.record(s) for s in sys_ids]
            if all(r["state"] in ("processed", "error") for r in rows):
                return rows
            if time.monotonic() > deadline:
                raise AssertionError(f"not finished: {[(r['sys_id'], r['state']) for r in rows]}")
            await asyncio.sleep(0.05)

    async def wait_state(self, sys_id: str, state: str, timeout: float = 10.0) -> dict[str, Any]:
        deadline = time.monotonic() + timeout
        while (row := await self.record(sys_id))["state"] != state:
            assert time.monotonic() < deadline, f"{sys_id}: {row['state']}, not {state}"
            await asyncio.sleep(0.05)
        return row

    async def inputs(self, sys_id: str) -> list[dict[str, Any]]:
        result: list[dict[str, Any]] = await self.call(
            "GET",
            f"/api/now/table/ecc_queue?sysparm_query=queue=input^response_to={sys_id}"
            "^ORDERBYsys_created_on",
        )
        return result

    async def agent(self, name: str) -> dict[str, Any]:
        [row] = await self.call("GET", f"/api/now/table/ecc_agent?sysparm_query=name={name}")
        result: dict[str, Any] = row
        return result


@asynccontextmanager
async def snow(tmp_path: Path, *agents: str, compat: bool = False) -> AsyncIterator[Snow]:
    """The instance, with ``mid.user`` (role mid_server) acting for ``agents``;
    ``compat``: in ServiceNow-compatibility mode (``docs/compat-mode.md``)."""
    config = InstanceConfig(
        db=tmp_path / "snow.sqlite3", admin_password=ADMIN_PASSWORD, servicenow_compat=compat
    )
    inst = Instance(config)
    async with aiohttp.ClientSession() as http:
        sn = Snow(inst, http)
        async with inst:
            await auth.create_user(
                inst.store, "mid.user", MID_PASSWORD, roles=["mid_server"],
                web_service_access_only=True, mid_agents=list(agents),
            )  # fmt: skip
            yield sn


def relay_settings(url: str, agent: str, prefix: str, **over: Any) -> RelaySettings:
    options: dict[str, Any] = {
        "poll_interval": 0.1, "client_id": f"relay-{prefix}", "claim_window": 0.2,
        "refresh_interval": 0.5, **over,
    }  # fmt: skip
    return RelaySettings(
        instance=url, user="mid.user", password=MID_PASSWORD, agent=agent, prefix=prefix,
        **options,
    )  # fmt: skip


def signed_bridge_config(
    host: str, port: int, agent: str, tmp_path: Path, prefix: str, state: Path, **options: Any
) -> Config:
    """A bridge behind the relay whose state directory is ``state``: it runs only the jobs
    that relay signed (the relay's key is made here first; the relay then uses it)."""
    key = public_key_b64(signing_key_file(state / SIGNING_KEY_FILE))
    config = make_config(
        host, port, agent, tmp_path / "bridge",
        security={"require_signatures": True, "platform_key": key}, **options,
    )  # fmt: skip
    config.bridge.topic_prefix = prefix
    return config


def broker_config(broker: BrokerAddress) -> BrokerConfig:
    return BrokerConfig(host=broker.host, port=broker.port, reconnect_min=0.1, reconnect_max=1.0)


def new_prefix() -> str:
    return "r" + uuid.uuid4().hex[:12]


class FakeBridge:
    """A scripted bridge on the real broker: records the jobs the relay publishes and
    answers them with the chunks a test gives (as the bridge's input records)."""

    def __init__(self, broker: BrokerAddress, prefix: str, agent: str) -> None:
        self.topics = Topics.for_agent(prefix, agent)
        self.agent = agent
        self.jobs: list[dict[str, Any]] = []  # every record received, repeats included
        self.arrived = asyncio.Event()
        self.session = MqttSession(
            broker_config(broker),
            client_id=f"fake-bridge-{prefix}",
            subscriptions=[self.topics.output, self.topics.express],
            on_message=self._on_message,
            clean_start=True,
        )

    async def _on_message(self, delivery: Delivery) -> bool:
        data = orjson.loads(delivery.payload)
        self.jobs.extend(data if isinstance(data, list) else [data])
        self.arrived.set()
        return True

    async def __aenter__(self) -> FakeBridge:
        await self.session.__aenter__()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.session.__aexit__(None, None, None)

    async def job(self, sys_id: str, timeout: float = 10.0) -> dict[str, Any]:
        deadline = time.monotonic() + timeout
        while True:
            for record in self.jobs:
                if record.get("sys_id") == sys_id:
                    return record
            assert time.monotonic() < deadline, f"job {sys_id} never arrived"
            self.arrived.clear()
            try:
                async with asyncio.timeout(0.2):
                    await self.arrived.wait()
            except TimeoutError:
                pass

    async def echo_each(self, count: int, timeout: float = 60.0) -> None:
        """Answer each Echo job once, as it arrives, until ``count`` distinct jobs came."""
        answered: set[str] = set()
        deadline = time.monotonic() + timeout
        while len(answered) < count:
            assert time.monotonic() < deadline, f"{len(answered)} of {count} jobs published"
            for job in list(self.jobs):
                if job["sys_id"] not in answered:
                    answered.add(job["sys_id"])
                    await self.answer(job, [{"message": job["payload"]["message"]}])
            await asyncio.sleep(0.05)

    async def answer(
        self,
        job: dict[str, Any],
        payloads: Sequence[Any],
        *,
        error_string: str = "",
        probe_time: float = 12.5,
        run: str | None = None,
    ) -> None:
        """The chunks as input records of one run, the last one complete, in one message."""
        run = run or new_sys_id()
        records = []
        for seq, payload in enumerate(payloads):
            last = seq == len(payloads) - 1
            records.append({
                "sys_id": new_sys_id(), "agent": job["agent"], "topic": job["topic"],
                "name": job["name"], "source": job["source"], "queue": "input",
                "state": "ready", "response_to": job["sys_id"], "agent_correlator":
                job.get("agent_correlator", ""), "priority": job.get("priority", 2),
                "error_string": error_string if last else "", "payload": payload,
                "sequence": seq, "complete": last, "run": run,
                "result_code": 1 if error_string and last else 0,
                **({"probe_time": probe_time} if last else {}),
            })  # fmt: skip
        await self.session.publish(self.topics.input, orjson.dumps(records))


async def test_records_round_trip_through_relay_and_bridge_xml_in_the_results_envelope(
    broker: BrokerAddress, unique_agent: str, tmp_path: Path
) -> None:
    prefix = new_prefix()
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
        assert done[0]["error_string"] == ""  # the claim token is gone

        # One input per output, whatever the chunks; no sequence written by the relay.
        [answer] = await sn.inputs(xml_job)
        assert answer["agent"] == f"mid.server.{unique_agent}"
        assert answer["topic"] == "Echo"
        assert answer["queue"] == "input"
        assert answer["sequence"] in ("", None)
        assert answer["run"] == ""
        root = ElementTree.fromstring(answer["payload"])
        assert root.tag == "results"
        assert root.get("result_code") == "0"
        assert root.get("error") is None
        assert float(root.get("probe_time") or "nan") >= 0
        results = root.findall("result")
        assert [r.findtext("message") for r in results] == ["a <b> & c", "a <b> & c"]
        assert [r.findtext("chunk") for r in results] == ["0", "1"]
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

        untouched = await sn.record(other)
        assert untouched["state"] == "ready"  # another MID's work is not ours to take
        assert relay.stats["claimed"] == 3
        assert relay.stats["closed"] == 3


async def test_relay_publishes_again_what_was_not_answered_within_the_lease(
    broker: BrokerAddress, unique_agent: str, tmp_path: Path
) -> None:
    prefix = new_prefix()
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
        while relay.stats["published"] < 1:
            assert time.monotonic() < deadline
            await asyncio.sleep(0.05)
        # Published to nobody: no bridge has ever subscribed. The lease brings it back.
        config = make_config(broker.host, broker.port, unique_agent, tmp_path / "bridge")
        config.bridge.topic_prefix = prefix
        await stack.enter_async_context(Bridge(config, REGISTRY))
        [done] = await sn.wait_done([job])
        assert done["state"] == "processed"
        assert relay.stats["republished"] >= 1
        [answer] = await sn.inputs(job)  # one input; the three chunks as one JSON array
        assert [c["chunk"] for c in orjson.loads(answer["payload"])] == [0, 1, 2]


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
    prefix = new_prefix()
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
            "--state-dir", str(tmp_path / "relay-state"), "--claim-window", "0.2",
            "--property", "threads.max=5",
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
            [answer] = await sn.inputs(job)
            assert ElementTree.fromstring(answer["payload"]).tag == "results"
            assert (await sn.agent(unique_agent))["status"] == "Up"
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
        assert "batch 35" in text  # threads 10 + 20 + 5 (--property threads.max=5)
        assert (await sn.agent(unique_agent))["status"] == "Down"  # stopped cleanly
