"""The built-in instance's broker connector, agents and credentials, end to end.

Real HTTP to the built-in instance on loopback, a real Mosquitto, a real bridge (in this
process, or a child process that is killed or stopped): outputs inserted through the
Table API reach the bridge at once and their answers come back into ``ecc_queue``; leases
hand out again the work of a bridge that died; repeated chunks are stored once and an
interrupted run's chunks change nothing; heartbeats mark a silent agent Down; admin
actions; credentials only ever sealed to a validated agent, never on the wire or on disk
in clear.
"""

from __future__ import annotations

import asyncio
import base64
import os
import secrets
import signal
import statistics
import time
import uuid
from collections.abc import AsyncIterator, Callable, Iterator
from contextlib import AsyncExitStack, asynccontextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp
import orjson
import pytest

from bridge.agent.bridge import Bridge
from bridge.agent.config import Config
from bridge.instance import auth
from bridge.instance.connector import Connector, ConnectorSettings, install, keys_for
from bridge.instance.platform_credentials import PlatformKeys
from bridge.instance.server import Instance, InstanceConfig
from bridge.instance.store import Change
from bridge.wire.broker import BrokerConfig
from bridge.wire.transport import Delivery, MqttSession
from probes import REGISTRY
from tests.brokers import BrokerAddress, MosquittoServer
from tests.harness import BridgeProcess, make_config
from tests.sshd import SshdUnavailable, SshServer, ensure_users, generate_key, remove_users

ADMIN_PASSWORD = "admin-" + secrets.token_urlsafe(12)
MID_PASSWORD = "mid-" + secrets.token_urlsafe(12)


def basic(user: str, password: str) -> str:
    return "Basic " + base64.b64encode(f"{user}:{password}".encode()).decode()


@dataclass
class Platform:
    """The built-in instance with its connector, and an admin's HTTP client."""

    inst: Instance
    keys: PlatformKeys
    connector: Connector
    http: aiohttp.ClientSession
    prefix: str
    db: Path

    @property
    def url(self) -> str:
        return self.inst.url

    async def call(
        self, method: str, path: str, body: Any = None, *, user: tuple[str, str] | None = None
    ) -> tuple[int, Any]:
        headers = {"Authorization": basic(*(user or ("admin", ADMIN_PASSWORD)))}
        if body is None and method == "POST":
            body = {}  # the action endpoints take JSON only (CSRF)
        if body is not None:
            headers["Content-Type"] = "application/json"
        async with self.http.request(
            method, self.url + path, data=None if body is None else orjson.dumps(body),
            headers=headers,
        ) as response:  # fmt: skip
            raw = await response.read()
            return response.status, orjson.loads(raw) if raw else None

    async def insert_output(self, agent: str, topic: str, **fields: Any) -> dict[str, Any]:
        body = {"agent": f"mid.server.{agent}", "topic": topic, "queue": "output", **fields}
        status, data = await self.call("POST", "/api/now/table/ecc_queue", body)
        assert status == 201, data
        result: dict[str, Any] = data["result"]
        return result

    async def record(self, table: str, sys_id: str) -> dict[str, Any]:
        status, data = await self.call("GET", f"/api/now/table/{table}/{sys_id}")
        assert status == 200, data
        result: dict[str, Any] = data["result"]
        return result

    async def query(self, table: str, query: str) -> list[dict[str, Any]]:
        status, data = await self.call(
            "GET", f"/api/now/table/{table}?sysparm_query={query}&sysparm_limit=10000"
        )
        assert status == 200, data
        result: list[dict[str, Any]] = data["result"]
        return result

    async def agent(self, name: str) -> dict[str, Any] | None:
        rows = await self.query("ecc_agent", f"name={name}")
        return rows[0] if rows else None

    async def wait_agent(
        self, name: str, check: Callable[[dict[str, Any]], bool], timeout: float = 15.0
    ) -> dict[str, Any]:
        deadline = time.monotonic() + timeout
        row = None
        while time.monotonic() < deadline:
            row = await self.agent(name)
            if row is not None and check(row):
                return row
            await asyncio.sleep(0.05)
        raise AssertionError(f"agent {name} never got there: {row}")

    async def wait_done(self, sys_ids: list[str], timeout: float = 20.0) -> list[dict[str, Any]]:
        deadline = time.monotonic() + timeout
        while True:
            rows = [await self.record("ecc_queue", s) for s in sys_ids]
            if all(r["state"] in ("processed", "error") for r in rows):
                return rows
            if time.monotonic() > deadline:
                raise AssertionError(f"not finished: {[(r['sys_id'], r['state']) for r in rows]}")
            await asyncio.sleep(0.05)

    async def inputs(self, sys_id: str) -> list[dict[str, Any]]:
        return await self.query("ecc_queue", f"queue=input^response_to={sys_id}^ORDERBYsequence")


@asynccontextmanager
async def platform(
    host: str, port: int, tmp_path: Path, **settings: Any
) -> AsyncIterator[Platform]:
    prefix = "t" + uuid.uuid4().hex[:12]
    db = tmp_path / "instance" / "instance.sqlite3"
    keys = keys_for(db)
    inst = Instance(InstanceConfig(db=db, admin_password=ADMIN_PASSWORD))
    install(inst, keys)
    broker = BrokerConfig(host=host, port=port, reconnect_min=0.1, reconnect_max=1.0)
    options = {"sweep_interval": 0.5, "lease_check_interval": 0.2, **settings}
    connector = Connector(
        inst.store,
        broker,
        settings=ConnectorSettings(prefix=prefix, client_id=f"inst-{prefix}", **options),
        keys=keys,
    )
    async with inst, connector, aiohttp.ClientSession() as http:
        await auth.create_user(
            inst.store, "mid.user", MID_PASSWORD, roles=["mid_server"], web_service_access_only=True
        )
        yield Platform(inst, keys, connector, http, prefix, db)


def bridge_config(
    broker: BrokerAddress | MosquittoServer,
    agent: str,
    state_dir: Path,
    plat: Platform,
    **security: Any,
) -> Config:
    config = make_config(
        broker.host,
        broker.port,
        agent,
        state_dir,
        security={"require_signatures": True, "platform_key": plat.keys.public_key_b64,
                  **security},
    )  # fmt: skip
    config.bridge.topic_prefix = plat.prefix
    return config


@dataclass
class Tap:
    """A plain subscriber: what the broker carried, and when."""

    messages: list[tuple[str, bytes, float]] = field(default_factory=list)
    arrived: dict[str, float] = field(default_factory=dict)  # output sys_id → first arrival
    event: asyncio.Event = field(default_factory=asyncio.Event)

    async def on_message(self, delivery: Delivery) -> bool:
        now = time.perf_counter()
        self.messages.append((delivery.topic, delivery.payload, now))
        if "/output" in delivery.topic:
            data = orjson.loads(delivery.payload)
            for record in data if isinstance(data, list) else [data]:
                self.arrived.setdefault(record["sys_id"], now)
        self.event.set()
        return True

    def outputs(self, sys_id: str) -> list[dict[str, Any]]:
        found = []
        for topic, payload, _ in self.messages:
            if "/output" not in topic:
                continue
            data = orjson.loads(payload)
            records = data if isinstance(data, list) else [data]
            found += [r for r in records if r["sys_id"] == sys_id]
        return found

    async def wait_arrival(self, sys_id: str, timeout: float = 5.0) -> float:
        async with asyncio.timeout(timeout):
            while sys_id not in self.arrived:
                self.event.clear()
                await self.event.wait()
        return self.arrived[sys_id]


@asynccontextmanager
async def tap(host: str, port: int, *topics: str) -> AsyncIterator[Tap]:
    seen = Tap()
    session = MqttSession(
        BrokerConfig(host=host, port=port),
        client_id="tap-" + uuid.uuid4().hex[:12],
        subscriptions=list(topics),
        on_message=seen.on_message,
        clean_start=True,
        receive_maximum=65535,
    )
    async with session:
        yield seen


# --- pushing and answers ------------------------------------------------------------------


async def test_outputs_reach_the_bridge_at_once_and_answers_come_back(
    broker: BrokerAddress, unique_agent: str, tmp_path: Path
) -> None:
    async with AsyncExitStack() as stack:
        plat = await stack.enter_async_context(platform(broker.host, broker.port, tmp_path))
        seen = await stack.enter_async_context(
            tap(broker.host, broker.port, f"{plat.prefix}/{unique_agent}/output/#")
        )
        stored: dict[str, float] = {}

        def on_input(change: Change) -> None:
            record = change.record
            if record["queue"] == "input" and record["complete"]:
                stored.setdefault(record["response_to"], time.perf_counter())

        plat.inst.on_insert("ecc_queue", on_input)
        config = bridge_config(broker, unique_agent, tmp_path / "bridge", plat)
        await stack.enter_async_context(Bridge(config, REGISTRY))
        await plat.wait_agent(unique_agent, lambda a: a["status"] == "Up" and a["last_heartbeat"])

        # ~50 round trips, one at a time: Table API insert → the bridge's topic
        to_bridge: list[float] = []
        round_trip: list[float] = []
        ids = []
        for i in range(50):
            started = time.perf_counter()
            out = await plat.insert_output(unique_agent, "Echo", payload={"message": f"m{i}"})
            arrived = await seen.wait_arrival(out["sys_id"])
            to_bridge.append((arrived - started) * 1000)
            async with asyncio.timeout(5):
                while out["sys_id"] not in stored:
                    await asyncio.sleep(0.001)
            round_trip.append((stored[out["sys_id"]] - started) * 1000)
            ids.append(out["sys_id"])
        p50 = statistics.median(to_bridge)
        p90 = statistics.quantiles(to_bridge, n=10)[-1]
        print(
            f"\ninsert → bridge p50 {p50:.1f} ms, p90 {p90:.1f} ms; "
            f"insert → answer stored p50 {statistics.median(round_trip):.1f} ms"
        )
        assert p50 < 50, to_bridge

        rows = await plat.wait_done(ids)
        assert {r["state"] for r in rows} == {"processed"}
        assert all(r["attempts"] == "1" and r["processed"] for r in rows)
        answer = await plat.inputs(ids[7])
        assert len(answer) == 1
        assert answer[0]["state"] == "ready"
        assert answer[0]["complete"] == "true"
        assert answer[0]["agent"] == f"mid.server.{unique_agent}"
        assert orjson.loads(answer[0]["payload"]) == {"message": "m7", "chunk": 0}

        # chunks, an error, and the interactive topic
        chunked = await plat.insert_output(
            unique_agent, "Echo", payload={"message": "c", "chunks": 3}
        )
        bad = await plat.insert_output(unique_agent, "NoSuchProbe", payload={})
        urgent = await plat.insert_output(
            unique_agent, "Echo", priority=0, payload={"message": "now"}
        )
        done = await plat.wait_done([chunked["sys_id"], bad["sys_id"], urgent["sys_id"]])
        assert [r["state"] for r in done] == ["processed", "error", "processed"]
        assert done[1]["error_string"].startswith("unknown_topic: topic:")
        chunks = await plat.inputs(chunked["sys_id"])
        assert [(c["sequence"], c["complete"]) for c in chunks] == [
            ("0", "false"), ("1", "false"), ("2", "true"),
        ]  # fmt: skip
        urgent_topics = [t for t, p, _ in seen.messages if urgent["sys_id"].encode() in p]
        assert urgent_topics == [f"{plat.prefix}/{unique_agent}/output/interactive"]

        # many inserted at once go out batched
        before = len(seen.messages)
        rows = await plat.inst.store.insert_many(
            "ecc_queue",
            [
                {"agent": f"mid.server.{unique_agent}", "topic": "Echo", "queue": "output",
                 "payload": {"message": str(i)}}
                for i in range(300)
            ],
        )  # fmt: skip
        await plat.wait_done([r["sys_id"] for r in rows], timeout=30)
        messages = len(seen.messages) - before
        print(f"300 outputs inserted at once: {messages} MQTT message(s)")
        assert messages <= 10, messages  # 300 records, in a few JSON arrays
        assert plat.connector.stats.repushed == 0


async def test_bridge_killed_mid_job_gets_it_again_after_the_lease(
    private_broker: MosquittoServer, unique_agent: str, tmp_path: Path
) -> None:
    host, port = private_broker.host, private_broker.port
    async with AsyncExitStack() as stack:
        plat = await stack.enter_async_context(platform(host, port, tmp_path, lease=1.5))
        seen = await stack.enter_async_context(
            tap(host, port, f"{plat.prefix}/{unique_agent}/output/#")
        )
        config = bridge_config(private_broker, unique_agent, tmp_path / "bridge", plat)
        # No broker session to keep the unacknowledged job: only the lease brings it back.
        config.broker.session_expiry = 0
        proc = BridgeProcess(config, tmp_path / "bridge.log")
        stack.callback(proc.stop)
        proc.start()
        await plat.wait_agent(unique_agent, lambda a: a["status"] == "Up")

        out = await plat.insert_output(
            unique_agent, "Echo", payload={"message": "slow", "delay": 3, "chunks": 2}
        )
        await seen.wait_arrival(out["sys_id"])
        await asyncio.sleep(0.5)  # the bridge has started it
        proc.kill()
        await plat.wait_agent(unique_agent, lambda a: a["status"] == "Down")  # its last will
        await asyncio.sleep(2.0)  # the lease has run out meanwhile
        row = await plat.record("ecc_queue", out["sys_id"])
        assert row["state"] == "processing"
        assert await plat.inputs(out["sys_id"]) == []

        proc.start()
        [done] = await plat.wait_done([out["sys_id"]], timeout=30)
        assert done["state"] == "processed", done
        assert int(done["attempts"]) >= 2
        assert len(seen.outputs(out["sys_id"])) >= 2  # pushed again
        assert plat.connector.stats.repushed >= 1
        answers = await plat.inputs(out["sys_id"])
        complete = [a for a in answers if a["complete"] == "true"]
        assert len(complete) == 1, answers
        assert [a["sequence"] for a in answers if a["run"] == complete[0]["run"]] == ["0", "1"]


async def test_repeated_chunks_are_stored_once_and_other_runs_change_nothing(
    broker: BrokerAddress, unique_agent: str, tmp_path: Path
) -> None:
    async with platform(broker.host, broker.port, tmp_path) as plat:
        # No bridge: this test plays the bridge's part on the input topic.
        out = await plat.insert_output(unique_agent, "Echo", payload={"message": "x"})
        other = await plat.insert_output("someone-else", "Echo", payload={})
        sys_id = out["sys_id"]

        def chunk(run: str, seq: int, complete: bool, **extra: Any) -> dict[str, Any]:
            return {
                "sys_id": uuid.uuid4().hex, "agent": f"mid.server.{unique_agent}",
                "topic": "Echo", "queue": "input", "state": "ready", "response_to": sys_id,
                "sequence": seq, "complete": complete, "run": run, "error_string": "",
                "payload": {"run": run, "seq": seq}, **extra,
            }  # fmt: skip

        session = MqttSession(
            BrokerConfig(host=broker.host, port=broker.port),
            client_id="fake-bridge-" + uuid.uuid4().hex[:8],
            clean_start=True,
        )
        topic = f"{plat.prefix}/{unique_agent}/input"

        async def send(*records: dict[str, Any]) -> None:
            await session.publish(topic, orjson.dumps(list(records)))

        async def settle() -> None:
            await asyncio.sleep(0.3)

        async with session:
            # Answers count only for an output that was sent: the fake bridge reports Up.
            await session.publish(f"{plat.prefix}/{unique_agent}/status", b'{"status": "Up"}')
            deadline = time.monotonic() + 5
            while (await plat.record("ecc_queue", sys_id))["state"] != "processing":
                assert time.monotonic() < deadline, "the output was never sent"
                await asyncio.sleep(0.05)
            a0 = chunk("run-a", 0, False)
            await send(a0, a0, chunk("run-a", 2, True))  # run a: a chunk repeated, one missing
            await send(a0)
            await settle()
            assert (await plat.record("ecc_queue", sys_id))["state"] != "processed"
            b1 = chunk("run-b", 1, True, error_string="timeout: within 1 s")
            await send(b1)  # run b: complete, but sequence 0 not yet there
            await settle()
            assert (await plat.record("ecc_queue", sys_id))["state"] != "error"
            await send(chunk("run-b", 0, False), b1)
            [done] = await plat.wait_done([sys_id], timeout=5)
            assert done["state"] == "error"
            assert done["error_string"] == "timeout: within 1 s"
            await send(chunk("run-a", 1, False))  # run a completes later: refused, not awaited
            await send({**chunk("run-x", 0, True), "response_to": other["sys_id"]})
            await settle()

        rows = await plat.inputs(sys_id)
        keys = sorted((r["run"], r["sequence"]) for r in rows)
        assert keys == [("run-a", "0"), ("run-a", "2"), ("run-b", "0"), ("run-b", "1")]
        assert (await plat.record("ecc_queue", sys_id))["state"] == "error"
        assert await plat.inputs(other["sys_id"]) == []  # another agent's output
        stats = plat.connector.stats
        assert stats.duplicates >= 3
        assert stats.refused_inputs == 2  # the late chunk, and another agent's output
        letters = await plat.query("ecc_dead_letter", f"agent={unique_agent}")
        assert {d["reason"] for d in letters} == {
            f"output {other['sys_id']} was sent to another agent",
            f"output {sys_id} is not awaiting an answer (state error)",
        }


# --- agents -------------------------------------------------------------------------------


async def test_heartbeats_mark_a_silent_agent_down_and_up_again(
    broker: BrokerAddress, unique_agent: str, tmp_path: Path
) -> None:
    async with AsyncExitStack() as stack:
        plat = await stack.enter_async_context(
            platform(
                broker.host, broker.port, tmp_path, heartbeat_interval=0.5, heartbeat_timeout=1.0
            )
        )
        config = bridge_config(broker, unique_agent, tmp_path / "bridge", plat, status_interval=0.3)
        proc = BridgeProcess(config, tmp_path / "bridge.log")
        stack.callback(proc.stop)
        proc.start()
        first = await plat.wait_agent(
            unique_agent, lambda a: a["status"] == "Up" and a["last_heartbeat"]
        )
        assert first["host"]
        assert first["version"]
        assert "Echo" in first["capabilities"]
        assert len(first["fingerprint"]) == 64
        assert first["validated"] == "false"

        os.kill(proc.pid, signal.SIGSTOP)  # alive for the broker, deaf to heartbeats
        try:
            await plat.wait_agent(unique_agent, lambda a: a["status"] == "Down", timeout=10)
            missed = await plat.query("ecc_queue", "topic=HeartbeatProbe^queue=output^state=error")
            assert missed
            assert missed[0]["error_string"].startswith("timeout: no answer to the heartbeat")
        finally:
            os.kill(proc.pid, signal.SIGCONT)
        await plat.wait_agent(unique_agent, lambda a: a["status"] == "Up", timeout=10)
        assert plat.connector.agents.heartbeats_missed >= 1


async def test_admin_actions_and_validation_belong_to_the_platform(
    broker: BrokerAddress, unique_agent: str, tmp_path: Path
) -> None:
    async with AsyncExitStack() as stack:
        plat = await stack.enter_async_context(platform(broker.host, broker.port, tmp_path))
        config = bridge_config(broker, unique_agent, tmp_path / "bridge", plat)
        bridge = await stack.enter_async_context(Bridge(config, REGISTRY))
        await plat.wait_agent(unique_agent, lambda a: a["status"] == "Up")
        base = f"/api/midbridge/agents/{unique_agent}"

        status, data = await plat.call("POST", f"{base}/pause")
        assert status == 201, data
        assert data["result"]["topic"] == "SystemCommand"
        assert data["result"]["name"] == "pause"
        assert data["result"]["priority"] == "0"
        await plat.wait_done([data["result"]["sys_id"]])
        await plat.wait_agent(unique_agent, lambda a: a["status"] == "Paused")
        assert bridge.status == "Paused"
        status, data = await plat.call("POST", f"{base}/resume")
        assert status == 201
        await plat.wait_agent(unique_agent, lambda a: a["status"] == "Up")

        assert (await plat.call("POST", f"{base}/pause", user=("mid.user", MID_PASSWORD)))[0] == 403
        assert (await plat.call("POST", f"{base}/explode"))[0] == 400
        assert (await plat.call("POST", "/api/midbridge/agents/nobody/pause"))[0] == 404
        status, data = await plat.call("GET", "/api/midbridge/platform_key")
        assert status == 200
        assert data["result"]["public_key"] == plat.keys.public_key_b64

        # A status record cannot make an agent validated; only the validate action can.
        fake = "fake-" + uuid.uuid4().hex[:8]
        raw = os.urandom(32)
        claim = {
            "status": "Up", "validated": True, "host": "evil",
            "public_key": base64.b64encode(raw).decode(),
            "fingerprint": __import__("hashlib").sha256(raw).hexdigest(),
        }  # fmt: skip
        async with MqttSession(
            BrokerConfig(host=broker.host, port=broker.port),
            client_id="fake-" + uuid.uuid4().hex[:8],
            clean_start=True,
        ) as session:
            await session.publish(f"{plat.prefix}/{fake}/status", orjson.dumps(claim))
        row = await plat.wait_agent(fake, lambda a: a["status"] == "Up")
        assert row["validated"] == "false"

        status, data = await plat.call("POST", f"{base}/validate")
        assert status == 201
        assert orjson.loads(data["result"]["payload"])["fingerprint"] == bridge.identity.fingerprint
        await plat.wait_agent(unique_agent, lambda a: a["validated"] == "true")
        assert bridge.identity.validated
        status, data = await plat.call("POST", f"{base}/invalidate")
        assert status == 201
        assert (await plat.agent(unique_agent) or {})["validated"] == "false"  # at once
        await plat.wait_done([data["result"]["sys_id"]])
        row = await plat.wait_agent(
            unique_agent, lambda a: a["fingerprint"] == bridge.identity.fingerprint
        )
        assert row["validated"] == "false"
        assert not bridge.identity.validated


# --- credentials --------------------------------------------------------------------------


@pytest.fixture(scope="module")
def key_user() -> Iterator[str]:
    """The sshd test account with public-key login (tests/sshd.py), made if missing.

    Only key logins are used here, so the session-wide password of ``mbpass`` (which
    ``ensure_users`` resets) is never touched when the accounts already exist.
    """
    import pwd

    try:
        pwd.getpwnam("mbkey")
        made = None
    except KeyError:
        try:
            made = ensure_users()
        except SshdUnavailable as exc:
            pytest.fail(str(exc), pytrace=False)
    yield "mbkey"
    if made is not None:
        remove_users(made)


@pytest.fixture
def ssh_key(tmp_path: Path) -> Path:
    return generate_key(tmp_path / "id_platform")


@pytest.fixture
def ssh_key_text(ssh_key: Path) -> str:
    return ssh_key.read_text()


@pytest.fixture
def sshd(tmp_path: Path, key_user: str, ssh_key: Path) -> Iterator[SshServer]:
    public = ssh_key.with_name(ssh_key.name + ".pub")
    server = SshServer(tmp_path / "sshd", authorized_keys={key_user: [public]})
    try:
        server.start()
    except SshdUnavailable as exc:
        pytest.fail(str(exc), pytrace=False)
    yield server
    server.close()


async def test_credentials_go_only_to_a_validated_agent_sealed_to_its_key(
    private_broker: MosquittoServer,
    unique_agent: str,
    tmp_path: Path,
    sshd: SshServer,
    key_user: str,
    ssh_key_text: str,
) -> None:
    host, port = private_broker.host, private_broker.port
    key_text = ssh_key_text
    key_secret = key_text.splitlines()[2]  # a line of the key's base64 body
    decoy = "decoy-" + secrets.token_urlsafe(16)
    async with AsyncExitStack() as stack:
        plat = await stack.enter_async_context(platform(host, port, tmp_path))
        wire = await stack.enter_async_context(tap(host, port, "#"))  # everything on the broker
        status, data = await plat.call(
            "POST",
            "/api/now/table/discovery_credentials",
            {"name": "linux-key", "type": "ssh_private_key", "order": 20,
             "secret": orjson.dumps({"user": key_user, "private_key": key_text}).decode()},
        )  # fmt: skip
        assert status == 201, data
        assert "secret" not in data["result"]
        status, data = await plat.call(
            "POST",
            "/api/now/table/discovery_credentials",
            {"name": "decoy", "type": "ssh_password", "order": 10,
             "secret": orjson.dumps({"user": key_user, "password": decoy}).decode()},
        )  # fmt: skip
        assert status == 201, data
        status, data = await plat.call(
            "POST",
            "/api/now/table/discovery_credentials",
            {"name": "broken", "type": "ssh_password", "secret": '{"user": "x"}'},
        )
        assert status == 400
        assert "password: missing" in str(data)

        state = tmp_path / "bridge"
        config = bridge_config(private_broker, unique_agent, state, plat, require_validation=True)
        config.probes.settings = {"SSHCommand": {"known_hosts": str(state / "known_hosts")}}
        bridge = await stack.enter_async_context(Bridge(config, REGISTRY))
        await plat.wait_agent(unique_agent, lambda a: a["status"] == "Up")

        async def ssh_job(**params: Any) -> tuple[dict[str, Any], dict[str, Any]]:
            out = await plat.insert_output(
                unique_agent, "SSHCommand", source=sshd.host, name="id -un",
                payload={"port": sshd.port, **params},
            )  # fmt: skip
            [done] = await plat.wait_done([out["sys_id"]], timeout=30)
            [answer] = [a for a in await plat.inputs(out["sys_id"]) if a["complete"] == "true"]
            return done, answer

        refused, _ = await ssh_job(credential_id="linux-key")
        assert refused["state"] == "error"
        assert refused["error_string"].startswith("refused: credentials: this MID is not validated")
        assert all("credentials" not in r for r in wire.outputs(refused["sys_id"]))

        status, _ = await plat.call("POST", f"/api/midbridge/agents/{unique_agent}/validate")
        assert status == 201
        await plat.wait_agent(unique_agent, lambda a: a["validated"] == "true")

        by_id, answer = await ssh_job(credential_id="linux-key")
        assert by_id["state"] == "processed", by_id
        payload = orjson.loads(answer["payload"])
        assert payload["stdout"] == f"{key_user}\n"
        [sent] = wire.outputs(by_id["sys_id"])[:1]
        assert len(sent["credentials"]) == 1
        assert sent["credentials"][0]["recipient"] == bridge.identity.fingerprint

        by_type, answer = await ssh_job()  # every ssh credential, in order: decoy first
        assert by_type["state"] == "processed", by_type
        assert orjson.loads(answer["payload"])["credential_id"] == "linux-key"
        assert len(wire.outputs(by_type["sys_id"])[0]["credentials"]) == 2

        status, _ = await plat.call("POST", f"/api/midbridge/agents/{unique_agent}/invalidate")
        assert status == 201
        after, _ = await ssh_job(credential_id="linux-key")
        assert after["state"] == "error"
        assert all("credentials" not in r for r in wire.outputs(after["sys_id"]))

        status, data = await plat.call("GET", "/api/now/table/discovery_credentials")
        assert status == 200
        listed = orjson.dumps(data).decode()

    assert wire.messages
    everything = b"".join(topic.encode() + payload for topic, payload, _ in wire.messages)
    on_disk = b"".join(p.read_bytes() for p in (tmp_path / "instance").iterdir() if p.is_file())
    for secret in (key_secret, decoy):
        assert secret.encode() not in everything
        assert secret.encode() not in on_disk
        assert secret not in listed
    assert b"v1." in on_disk  # the sealed secrets are there


def test_instance_keys_are_owner_only_and_stable(tmp_path: Path) -> None:
    db = tmp_path / "i.sqlite3"
    keys = keys_for(db)
    for path in tmp_path.iterdir():
        assert path.stat().st_mode & 0o077 == 0, path
    assert keys_for(db).public_key_b64 == keys.public_key_b64
    sealed = keys.seal_secret({"token": "t0k3n"})
    assert "t0k3n" not in sealed
    assert keys_for(db).open_secret(sealed) == {"token": "t0k3n"}
    assert "t0k3n" not in repr(keys)
    (tmp_path / "i.sqlite3.secret.key").chmod(0o644)
    with pytest.raises(Exception, match="chmod 600"):
        keys_for(db)
