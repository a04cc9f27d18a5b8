"""The relay end to end against the built-in instance in ServiceNow-compatibility mode.

Real processes: ``midbridge instance --servicenow-compat`` (its MID Server Monitor every
second), ``midbridge run`` (the bridge), ``midbridge relay`` (the MID), a real broker. The
MID registers, the monitor's HeartbeatProbes keep it Up, killed it goes Down within the
monitor's documented bound (two intervals), and ECC records are stored as ServiceNow
stores them. In-process: the compatibility rules one by one, and two relays of one MID
against compatibility mode running every job once.
"""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
import time
from collections import Counter
from collections.abc import AsyncIterator
from contextlib import AsyncExitStack, asynccontextmanager
from pathlib import Path
from typing import Any
from xml.etree import ElementTree

import aiohttp
import orjson
import pytest

from bridge.instance import tls
from bridge.instance.mid_monitor import HEARTBEAT
from bridge.instance.server import Instance, InstanceConfig
from bridge.relay.http import InstanceClient
from bridge.relay.service import Relay
from bridge.relay.settings import RelayError
from tests.brokers import BrokerAddress
from tests.harness import REPO, BridgeProcess
from tests.test_connector import ADMIN_PASSWORD, MID_PASSWORD, basic
from tests.test_relay import (
    ECHO_XML,
    FakeBridge,
    Snow,
    broker_config,
    new_prefix,
    relay_settings,
    signed_bridge_config,
    snow,
)

INTERVAL = 1.0  # the MID Server Monitor's interval here (ServiceNow's: 300 s)


class Proc:
    """A child process with its output in a file."""

    def __init__(self, args: list[str], log: Path, env: dict[str, str], stdin: str = "") -> None:
        self.log = log
        with log.open("ab") as out:
            self.proc = subprocess.Popen(
                args, stdin=subprocess.PIPE, stdout=out, stderr=out, cwd=REPO, env=env
            )
        assert self.proc.stdin is not None
        self.proc.stdin.write(stdin.encode())
        self.proc.stdin.close()

    def text(self) -> str:
        return self.log.read_text(errors="replace")

    def stop(self, sig: int = signal.SIGTERM) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(sig)
        try:
            return self.proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            return self.proc.wait(timeout=10)


def _env() -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("MIDBRIDGE_")}
    env["MIDBRIDGE_ADMIN_PASSWORD"] = ADMIN_PASSWORD
    return env


async def _until(what: str, check: Any, timeout: float = 20.0) -> Any:
    deadline = time.monotonic() + timeout
    while True:
        value = await check()
        if value:
            return value
        assert time.monotonic() < deadline, f"not within {timeout} s: {what}"
        await asyncio.sleep(0.05)


@asynccontextmanager
async def served_instance(tmp_path: Path, agent: str) -> AsyncIterator[tuple[str, Proc]]:
    db = tmp_path / "snow.sqlite3"
    env = _env()
    made = await asyncio.to_thread(
        subprocess.run,
        [sys.executable, "-m", "bridge", "instance", "user", "create", "mid.user", "--db",
         str(db), "--role", "mid_server", "--web-service-only", "--agent", agent,
         "--password-stdin"],
        input=MID_PASSWORD + "\n", capture_output=True, text=True, cwd=REPO, env=env, timeout=60,
    )  # fmt: skip
    assert made.returncode == 0, made.stderr
    proc = Proc(
        [sys.executable, "-m", "bridge", "instance", "--port", "0", "--db", str(db),
         "--servicenow-compat", "--mid-monitor-interval", str(INTERVAL)],
        tmp_path / "instance.log", env,
    )  # fmt: skip
    try:
        deadline = time.monotonic() + 30
        url = ""
        while not url:
            assert proc.proc.poll() is None, proc.text()
            assert time.monotonic() < deadline, proc.text()
            for line in proc.text().splitlines():
                if line.startswith("midbridge instance on "):
                    url = line.split()[3]
            await asyncio.sleep(0.05)
        yield url, proc
    finally:
        code = await asyncio.to_thread(proc.stop)
        assert code == 0, proc.text()
        assert "Traceback" not in proc.text()


class Admin:
    def __init__(self, http: aiohttp.ClientSession, url: str) -> None:
        self.http, self.url = http, url

    async def call(self, method: str, path: str, body: Any = None) -> Any:
        headers = {"Authorization": basic("admin", ADMIN_PASSWORD), "Accept": "application/json"}
        data = None
        if body is not None:
            headers["Content-Type"] = "application/json"
            data = orjson.dumps(body)
        async with self.http.request(method, self.url + path, data=data, headers=headers) as r:
            assert r.status < 300, await r.text()
            return orjson.loads(await r.read())["result"]

    async def rows(self, table: str, query: str) -> list[dict[str, Any]]:
        result: list[dict[str, Any]] = await self.call(
            "GET", f"/api/now/table/{table}?sysparm_query={query}&sysparm_limit=1000"
        )
        return result

    async def agent(self, name: str) -> dict[str, Any]:
        rows = await self.rows("ecc_agent", f"name={name}")
        return rows[0] if rows else {}


def relay_process(url: str, agent: str, broker: BrokerAddress, prefix: str, tmp: Path) -> Proc:
    return Proc(
        [sys.executable, "-m", "bridge", "relay", "--instance", url, "--user", "mid.user",
         "--password-stdin", "--agent", agent, "--broker", f"{broker.host}:{broker.port}",
         "--prefix", prefix, "--poll-interval", "0.1", "--client-id", f"relay-{prefix}",
         "--state-dir", str(tmp / "relay-state"), "--claim-window", "0.2",
         "--refresh-interval", "30"],
        tmp / "relay.log", _env(), stdin=MID_PASSWORD + "\n",
    )  # fmt: skip


async def test_a_relay_process_is_a_mid_of_an_instance_in_compatibility_mode(
    broker: BrokerAddress, unique_agent: str, tmp_path: Path
) -> None:
    prefix = new_prefix()
    # The bridge runs only what the relay signed (relay_process uses this state directory).
    config = signed_bridge_config(
        broker.host, broker.port, unique_agent, tmp_path, prefix, tmp_path / "relay-state"
    )
    bridge = BridgeProcess(config, tmp_path / "bridge.log")
    async with AsyncExitStack() as stack:
        url, _instance = await stack.enter_async_context(served_instance(tmp_path, unique_agent))
        http = await stack.enter_async_context(aiohttp.ClientSession())
        admin = Admin(http, url)
        await asyncio.to_thread(bridge.start)
        stack.callback(bridge.stop)
        relay = relay_process(url, unique_agent, broker, prefix, tmp_path)
        stack.callback(relay.stop)

        # Registration: visible on the instance, with ServiceNow's fields.
        async def up() -> dict[str, Any]:
            row = await admin.agent(unique_agent)
            return row if row.get("status") == "Up" else {}

        record = await _until("the MID registered Up", up)
        assert record["host_name"]
        assert record["ip_address"]
        assert record["started"]
        assert record["url"] == url
        assert record["validated"] == "false"

        # Heartbeats: the monitor sends one a cycle; with --refresh-interval 30 the relay's
        # own refreshes cannot keep the MID Up here: only the answers to the heartbeats.
        started = time.monotonic()

        async def beats() -> list[dict[str, Any]]:
            rows = await admin.rows(
                "ecc_queue", f"topic={HEARTBEAT}^queue=output^agent=mid.server.{unique_agent}"
                "^state=processed",
            )  # fmt: skip
            return rows if len(rows) >= 4 else []

        answered = await _until("four heartbeats answered", beats, timeout=30)
        assert time.monotonic() - started >= 2 * INTERVAL
        assert (await admin.agent(unique_agent))["status"] == "Up"
        inputs = await admin.rows("ecc_queue", f"queue=input^response_to={answered[0]['sys_id']}")
        assert len(inputs) == 1
        [beat] = inputs
        # Stored as ServiceNow would: the instance's sequence, XML, no JSON-wire fields.
        assert isinstance(beat["sequence"], str)
        assert int(beat["sequence"]) > 0
        assert (beat["complete"], beat["run"], beat["lease_until"]) == ("false", "", "")
        root = ElementTree.fromstring(beat["payload"])
        heartbeat = root.find("result/heartbeat")
        assert heartbeat is not None
        assert heartbeat.get("name") == unique_agent
        assert (await admin.agent(unique_agent))["last_refreshed"] >= record["last_refreshed"]

        # A job in ServiceNow's shape through the whole path.
        job = await admin.call(
            "POST", "/api/now/table/ecc_queue",
            {"agent": f"mid.server.{unique_agent}", "topic": "Echo", "queue": "output",
             "state": "ready", "payload": ECHO_XML},
        )  # fmt: skip

        async def echoed() -> list[dict[str, Any]]:
            return await admin.rows("ecc_queue", f"queue=input^response_to={job['sys_id']}")

        [answer] = await _until("the Echo answered", echoed)
        assert ElementTree.fromstring(answer["payload"]).tag == "results"
        [output] = await admin.rows("ecc_queue", f"sys_id={job['sys_id']}")
        assert output["state"] == "processed"

        # Killed (no clean stop: it cannot say Down itself): the monitor marks it Down
        # within two intervals of the heartbeat it missed.
        relay.stop(signal.SIGKILL)
        killed = time.monotonic()

        async def down() -> bool:
            return (await admin.agent(unique_agent)).get("status") == "Down"

        await _until("the MID marked Down", down, timeout=10)
        took = time.monotonic() - killed
        print(f"MID Down {took:.2f} s after SIGKILL (monitor interval {INTERVAL} s)")
        assert took <= 2 * INTERVAL + 1.0, f"Down after {took:.2f} s"
        assert (await admin.agent(unique_agent))["stopped"] == ""  # not its own doing
        # Heartbeats it did not take are closed at the next cycle (killOldRequests).
        await asyncio.sleep(2 * INTERVAL)
        stale = await admin.rows(
            "ecc_queue",
            f"topic={HEARTBEAT}^queue=output^agent=mid.server.{unique_agent}^state=ready",
        )
        assert len(stale) <= 1

        # Started again: Up again, and a heartbeat answered keeps it so.
        relay2 = relay_process(url, unique_agent, broker, prefix, tmp_path)
        stack.callback(relay2.stop)
        await _until("the MID Up again", up)
        await asyncio.sleep(3 * INTERVAL)
        assert (await admin.agent(unique_agent))["status"] == "Up"
        assert "Traceback" not in relay.text()


async def test_compatibility_rules_store_ecc_as_servicenow(
    tmp_path: Path, unique_agent: str
) -> None:
    async with snow(tmp_path, unique_agent, compat=True) as sn:
        # A JSON payload is midbridge's wire: refused; JSON-wire fields are dropped.
        async with sn.http.post(
            sn.inst.url + "/api/now/table/ecc_queue",
            json={"agent": f"mid.server.{unique_agent}", "topic": "Echo", "queue": "output",
                  "payload": {"message": "json"}},
            headers={"Authorization": basic("admin", ADMIN_PASSWORD)},
        ) as response:  # fmt: skip
            assert response.status == 400
            assert "payload" in (await response.json())["error"]["message"]
        out = await sn.output(unique_agent, "Echo", "<parameters/>", complete=True, run="r1",
                              sequence=99, timeout=5, attempts=3)  # fmt: skip
        row = await sn.record(out)
        assert (row["complete"], row["run"], row["sequence"]) == ("false", "", "")
        assert (row["timeout"], row["attempts"]) == ("", "0")

        # An input answering it closes it (the "mark outputs processed" rule), numbered.
        async def post_input(payload: str) -> dict[str, Any]:
            async with sn.http.post(
                sn.inst.url + "/api/now/table/ecc_queue",
                json={"agent": f"mid.server.{unique_agent}", "topic": "Echo",
                      "queue": "input", "response_to": out, "payload": payload,
                      "sequence": 7, "run": "x"},
                headers={"Authorization": basic("mid.user", MID_PASSWORD)},
            ) as response:  # fmt: skip
                assert response.status == 201, await response.text()
                result: dict[str, Any] = (await response.json())["result"]
                return result

        answer = await post_input("<results><result/></results>")
        done = await sn.wait_state(out, "processed")
        assert done["processed"]
        assert done["sys_updated_by"] == "system"  # the instance's rule

        async def numbered() -> dict[str, Any]:
            row = await sn.record(answer["sys_id"])
            return row if row["sequence"] else {}

        row = await _until("the input numbered", numbered, timeout=5)
        assert int(row["sequence"]) >= 1
        assert row["run"] == ""

        # <see_attachment/>: the output stays open until the attachment comes.
        out2 = await sn.output(unique_agent, "Echo", "<parameters/>")
        await sn.call("PATCH", f"/api/now/table/ecc_queue/{out2}", {"state": "processing"})
        answer2 = await post_input_for(sn, unique_agent, out2, "<see_attachment/>")
        await asyncio.sleep(0.3)
        assert (await sn.record(out2))["state"] == "processing"
        async with sn.http.post(
            sn.inst.url + "/api/now/attachment/file",
            params={"table_name": "ecc_queue", "table_sys_id": answer2,
                    "file_name": "payload.xml"},
            data=b"<results><result/></results>",
            headers={"Authorization": basic("mid.user", MID_PASSWORD),
                     "Content-Type": "application/xml"},
        ) as response:  # fmt: skip
            assert response.status == 201, await response.text()
        await sn.wait_state(out2, "processed", timeout=5)


async def post_input_for(sn: Snow, agent: str, output: str, payload: str) -> str:
    async with sn.http.post(
        sn.inst.url + "/api/now/table/ecc_queue",
        json={"agent": f"mid.server.{agent}", "topic": "Echo", "queue": "input",
              "response_to": output, "payload": payload},
        headers={"Authorization": basic("mid.user", MID_PASSWORD)},
    ) as response:  # fmt: skip
        assert response.status == 201, await response.text()
        return str((await response.json())["result"]["sys_id"])


async def test_two_relays_of_one_mid_in_compatibility_mode_run_every_job_once(
    broker: BrokerAddress, unique_agent: str, tmp_path: Path
) -> None:
    jobs = 30
    prefix = new_prefix()
    async with AsyncExitStack() as stack:
        sn = await stack.enter_async_context(snow(tmp_path, unique_agent, compat=True))
        bridge = await stack.enter_async_context(FakeBridge(broker, prefix, unique_agent))
        outputs = [await sn.output(unique_agent, "Echo", ECHO_XML) for _ in range(jobs)]
        relays = [
            relay_settings(
                sn.inst.url, unique_agent, prefix, client_id=f"relay-{name}-{prefix}",
                state_dir=tmp_path / name, poll_interval=0.05, batch=8, claim_window=1.0,
                lease=5.0,
            )
            for name in ("a", "b")
        ]  # fmt: skip
        a, b = await asyncio.gather(
            *(stack.enter_async_context(Relay(s, broker_config(broker))) for s in relays)
        )
        await bridge.echo_each(jobs)
        done = await sn.wait_done(outputs, timeout=30)
        assert {row["state"] for row in done} == {"processed"}
        published = Counter(job["sys_id"] for job in bridge.jobs)
        assert set(published) == set(outputs)
        assert max(published.values()) == 1, "a job was taken by both relays"
        for sys_id in outputs:
            [answer] = await sn.inputs(sys_id)
            assert ElementTree.fromstring(answer["payload"]).tag == "results"
            assert answer["run"] == ""
            assert answer["complete"] == "false"
        assert a.stats["claimed"] + b.stats["claimed"] == jobs

        async def numbered() -> bool:
            rows = [await sn.inputs(s) for s in outputs]
            return all(r[0]["sequence"] for r in rows)

        await _until("every input numbered", numbered, timeout=5)
        numbers = [int((await sn.inputs(s))[0]["sequence"]) for s in outputs]
        assert len(set(numbers)) == jobs  # the instance's own, one each


async def test_relay_verifies_the_instance_with_its_ca_file(tmp_path: Path) -> None:
    cert = tls.self_signed(tmp_path / "snow.sqlite3", tls.DEFAULT_NAMES)
    config = InstanceConfig(
        db=tmp_path / "snow.sqlite3", admin_password=ADMIN_PASSWORD,
        ssl_context=tls.server_context(cert.cert, cert.key),
    )  # fmt: skip
    async with Instance(config) as inst:
        trusted = InstanceClient(inst.url, "admin", ADMIN_PASSWORD, ca_file=str(cert.cert))
        untrusted = InstanceClient(inst.url, "admin", ADMIN_PASSWORD, retries=1)
        for client in (trusted, untrusted):
            await client.open()
        try:
            assert await trusted.query("ecc_agent", "", limit=1) == []
            with pytest.raises(RelayError, match=r"[Cc]ertificate"):
                await untrusted.query("ecc_agent", "", limit=1)
        finally:
            for client in (trusted, untrusted):
                await client.close()
    with pytest.raises(RelayError, match="ca-file"):
        InstanceClient("https://127.0.0.1:1", "u", "p", ca_file=str(tmp_path / "none.pem"))
    garbage = tmp_path / "garbage.pem"
    garbage.write_text("not a certificate\n")
    with pytest.raises(RelayError, match="ca-file"):
        InstanceClient("https://127.0.0.1:1", "u", "p", ca_file=str(garbage))
