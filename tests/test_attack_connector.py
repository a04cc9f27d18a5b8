"""Attacks on the platform's trust boundary at the connector and discovery (issue 12).

Everything is real: a private Mosquitto, the built-in instance on loopback with its
connector and discovery engine, real bridges, raw MQTT clients playing a hostile agent,
and real HTTP to the Table API. Each test says in its docstring what the attacker tries;
each fails on the code before the fix.
"""

from __future__ import annotations

import asyncio
import logging
import random
import secrets
import time
import uuid
from collections.abc import AsyncIterator
from contextlib import AsyncExitStack, asynccontextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp
import orjson
import pytest

from bridge.agent.bridge import Bridge
from bridge.agent.config import Config
from bridge.instance import auth, discovery
from bridge.instance.agents import control_output
from bridge.instance.connector import Connector, ConnectorSettings, install, keys_for
from bridge.instance.platform_credentials import PlatformKeys, add_credential
from bridge.instance.server import Instance, InstanceConfig
from bridge.wire.broker import BrokerConfig
from bridge.wire.outputs import SYSTEM_COMMAND
from bridge.wire.transport import Delivery, MqttSession
from probes import REGISTRY
from tests.brokers import BrokerAddress, MosquittoServer
from tests.harness import make_config
from tests.test_discovery import basic, free_port

ADMIN_PASSWORD = "admin-" + secrets.token_urlsafe(12)
MID_PASSWORD = "mid-" + secrets.token_urlsafe(12)
SSH_SECRET = "ssh-" + secrets.token_urlsafe(12)
FINAL = ("Completed", "Error", "Cancelled")


# --- the platform, with a connector that can be restarted ---------------------------------


@dataclass
class Platform:
    inst: Instance
    keys: PlatformKeys
    http: aiohttp.ClientSession
    prefix: str
    broker: BrokerConfig
    connector: Connector | None = None
    engine: discovery.DiscoveryEngine | None = None

    async def call(
        self, method: str, path: str, body: Any = None, *, user: tuple[str, str] | None = None
    ) -> tuple[int, Any]:
        headers = {"Authorization": basic(*(user or ("admin", ADMIN_PASSWORD)))}
        if body is not None:
            headers["Content-Type"] = "application/json"
        data = None if body is None else orjson.dumps(body)
        async with self.http.request(
            method, self.inst.url + path, data=data, headers=headers
        ) as response:
            raw = await response.read()
            return response.status, orjson.loads(raw) if raw else None

    async def rows(
        self, table: str, query: str = "", *, user: tuple[str, str] | None = None
    ) -> list[dict[str, Any]]:
        status, data = await self.call(
            "GET", f"/api/now/table/{table}?sysparm_query={query}&sysparm_limit=10000", user=user
        )
        assert status == 200, data
        result: list[dict[str, Any]] = data["result"]
        return result

    async def until(self, what: str, check: Any, timeout: float = 15.0) -> Any:
        """Poll ``check()`` (async) until truthy, at most ``timeout`` seconds."""
        deadline = time.monotonic() + timeout
        while True:
            value = await check()
            if value:
                return value
            if time.monotonic() > deadline:
                raise AssertionError(f"{what}: not within {timeout} s")
            await asyncio.sleep(0.05)

    async def agent(self, name: str) -> dict[str, Any]:
        rows = await self.rows("ecc_agent", f"name={name}")
        return rows[0] if rows else {}

    async def wait_agent(self, name: str, key: str, value: str, timeout: float = 15.0) -> None:
        async def check() -> bool:
            return (await self.agent(name)).get(key) == value

        await self.until(f"agent {name} {key}={value}", check, timeout)

    async def output(self, agent: str, topic: str, **fields: Any) -> str:
        body = {"agent": f"mid.server.{agent}", "topic": topic, "queue": "output", **fields}
        status, data = await self.call("POST", "/api/now/table/ecc_queue", body)
        assert status == 201, data
        sys_id: str = data["result"]["sys_id"]
        return sys_id

    async def wait_done(self, sys_id: str, timeout: float = 10.0) -> dict[str, Any]:
        async def check() -> dict[str, Any] | None:
            row = await self.inst.store.get("ecc_queue", sys_id)
            return row if row and row["state"] in ("processed", "error") else None

        done: dict[str, Any] = await self.until(f"output {sys_id} answered", check, timeout)
        return done

    @asynccontextmanager
    async def connected(self, **settings: Any) -> AsyncIterator[Connector]:
        """The connector (same client id and prefix every time: a restart resumes)."""
        options = {"sweep_interval": 0.5, "lease_check_interval": 0.2, **settings}
        connector = Connector(
            self.inst.store,
            self.broker,
            settings=ConnectorSettings(
                prefix=self.prefix, client_id=f"inst-{self.prefix}", **options
            ),
            keys=self.keys,
        )
        async with connector:
            self.connector = connector
            yield connector
        self.connector = None


@asynccontextmanager
async def platform(
    broker: BrokerAddress | MosquittoServer, tmp_path: Path, *, with_discovery: bool = False
) -> AsyncIterator[Platform]:
    prefix = "a" + uuid.uuid4().hex[:12]
    db = tmp_path / "instance" / "instance.sqlite3"
    keys = keys_for(db)
    inst = Instance(InstanceConfig(db=db, admin_password=ADMIN_PASSWORD))
    install(inst, keys)
    engine = discovery.install(inst) if with_discovery else None
    config = BrokerConfig(host=broker.host, port=broker.port, reconnect_min=0.1, reconnect_max=1.0)
    async with inst, aiohttp.ClientSession() as http:
        await auth.create_user(
            inst.store, "mid.user", MID_PASSWORD, roles=["mid_server"], web_service_access_only=True
        )
        yield Platform(inst, keys, http, prefix, config, engine=engine)


def bridge_config(
    broker: BrokerAddress | MosquittoServer, plat: Platform, agent: str, state: Path
) -> Config:
    config = make_config(
        broker.host,
        broker.port,
        agent,
        state,
        security={"require_signatures": True, "platform_key": plat.keys.public_key_b64,
                  "require_validation": True},
    )  # fmt: skip
    config.bridge.topic_prefix = plat.prefix
    config.probes.settings = {"SSHCommand": {"known_hosts": str(state / "known_hosts")}}
    return config


@asynccontextmanager
async def hostile(broker: BrokerAddress | MosquittoServer, *topics: str) -> AsyncIterator[Hostile]:
    """A raw MQTT client: publishes what it likes where the broker lets it."""
    seen = Hostile()
    session = MqttSession(
        BrokerConfig(host=broker.host, port=broker.port),
        client_id="hostile-" + uuid.uuid4().hex[:10],
        subscriptions=list(topics),
        on_message=seen.on_message,
        clean_start=True,
        receive_maximum=1000,
    )
    async with session:
        seen.session = session
        yield seen


@dataclass
class Hostile:
    session: MqttSession | None = None
    jobs: list[dict[str, Any]] = field(default_factory=list)
    arrived: asyncio.Event = field(default_factory=asyncio.Event)

    async def on_message(self, delivery: Delivery) -> bool:
        data = orjson.loads(delivery.payload)
        self.jobs += data if isinstance(data, list) else [data]
        self.arrived.set()
        return True

    async def send(self, topic: str, bodies: list[bytes]) -> None:
        assert self.session is not None
        futures = [await self.session.publish_start(topic, body) for body in bodies]
        await asyncio.gather(*futures)

    async def job(self, topic: str, timeout: float = 10.0) -> dict[str, Any]:
        async with asyncio.timeout(timeout):
            while True:
                for job in self.jobs:
                    if job.get("topic") == topic:
                        return job
                self.arrived.clear()
                await self.arrived.wait()


@dataclass
class FakeSshd:
    """A TCP listener that only records who connected (the credential would come next)."""

    connections: int = 0

    async def handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.connections += 1
        writer.close()


def nested(depth: int) -> bytes:
    """JSON text of a list ``depth`` deep (orjson reads 1,024 levels, writes about 254)."""
    return b"[" * depth + b'"deep"' + b"]" * depth


def deep_input(depth: int, response_to: str) -> bytes:
    head = orjson.dumps({"sys_id": uuid.uuid4().hex, "topic": "Echo", "queue": "input",
                         "sequence": 0, "complete": True, "response_to": response_to})  # fmt: skip
    return head[:-1] + b',"payload":' + nested(depth) + b"}"


# --- F1: forged discovery results ------------------------------------------------------------


async def test_forged_scan_results_bring_no_ssh_credential_to_an_address_outside_the_run(
    private_broker: MosquittoServer, unique_agent: str, tmp_path: Path
) -> None:
    """A ``mid_server`` account (Table API) and another agent of the run (MQTT) forge
    Shazzam results naming an address outside the schedule's range with its SSH port open,
    hoping discovery sends SSHCommand jobs with every SSH credential there: the validated
    bridge would log in to the attacker's fake sshd with the password."""
    net = f"127.44.{random.randint(0, 255)}"
    outside = f"127.45.{random.randint(0, 255)}.9"
    port = free_port()
    fake = FakeSshd()
    sshd = await asyncio.start_server(fake.handle, outside, port)
    evil = "evil-" + uuid.uuid4().hex[:8]
    async with AsyncExitStack() as stack:
        stack.push_async_callback(sshd.wait_closed)
        stack.callback(sshd.close)
        plat = await stack.enter_async_context(
            platform(private_broker, tmp_path, with_discovery=True)
        )
        await stack.enter_async_context(plat.connected())
        store = plat.inst.store
        await add_credential(store, plat.keys, name="lab-ssh", type="ssh_password",
                             fields={"user": "root", "password": SSH_SECRET})  # fmt: skip
        config = bridge_config(private_broker, plat, unique_agent, tmp_path / "bridge")
        # validated once; then it goes Down while the run starts
        async with Bridge(config, REGISTRY):
            await plat.wait_agent(unique_agent, "status", "Up")
            status, data = await plat.call(
                "POST", f"/api/midbridge/agents/{unique_agent}/validate", {}
            )
            assert status == 201, data
            await plat.wait_agent(unique_agent, "validated", "true")
        await plat.wait_agent(unique_agent, "status", "Down")

        raider = await stack.enter_async_context(
            hostile(private_broker, f"{plat.prefix}/{evil}/output/#")
        )
        await raider.send(f"{plat.prefix}/{evil}/status", [orjson.dumps({"status": "Up"})])
        await plat.wait_agent(evil, "status", "Up")
        schedule = {
            "name": "attack", "ranges": f"{net}.1-{net}.4", "agent": f"{unique_agent},{evil}",
            "ports": str(port), "ssh_ports": str(port), "credentials": "lab-ssh",
            "batch_size": 2, "parallel_batches": 2,
        }  # fmt: skip
        status, data = await plat.call("POST", "/api/now/table/discovery_schedule", schedule)
        assert status == 201, data
        run_id = await discovery.start_run(plat.inst, data["result"]["sys_id"])
        scans = await store.query("ecc_queue", f"agent_correlator={run_id}^topic=Shazzam")
        mine = next(r for r in scans if r["agent"] == f"mid.server.{unique_agent}")
        assert mine["state"] == "ready"  # held: its agent is Down

        def forged(response_to: str, agent: str) -> dict[str, Any]:
            hosts = [{"ip": outside, "alive": True, "open": [{"port": port}]}]
            payload = orjson.dumps({"hosts": hosts}).decode()
            return {"queue": "input", "topic": "Shazzam", "agent": f"mid.server.{agent}",
                    "response_to": response_to, "sequence": 0, "complete": False,
                    "run": "forged", "payload": payload}  # fmt: skip

        # 1. Through the Table API: the victim agent's own mid_server account (it may write
        # its agent's inputs), and an account of no agent (refused at the API, or here).
        await auth.create_user(store, "mid.victim", MID_PASSWORD, roles=["mid_server"],
                               web_service_access_only=True, mid_agents=[unique_agent])  # fmt: skip
        for account in ("mid.victim", "mid.user"):
            status, data = await plat.call(
                "POST", "/api/now/table/ecc_queue", forged(mine["sys_id"], unique_agent),
                user=(account, MID_PASSWORD),
            )  # fmt: skip
            assert status in (201, 403), data
            assert status == 201 or account == "mid.user", data
        # 2. Over MQTT, as another agent of the run: its own job, and the victim's.
        job = await raider.job("Shazzam")
        answer = {**forged(job["sys_id"], evil), "sys_id": uuid.uuid4().hex, "complete": True}
        answer["payload"] = orjson.loads(answer["payload"])
        steal = {**answer, "sys_id": uuid.uuid4().hex, "response_to": mine["sys_id"]}
        await raider.send(f"{plat.prefix}/{evil}/input", [orjson.dumps([answer, steal])])

        async with Bridge(config, REGISTRY):  # the victim is back: its held work goes out
            await plat.wait_agent(unique_agent, "status", "Up")
            await plat.until("both batches scanned", lambda: _scanned(plat, run_id), 30)
            await asyncio.sleep(3.0)  # a forged host's SSH job would have been tried by now
            ssh_jobs = await plat.rows("ecc_queue", "topic=SSHCommand^queue=output")
            row = await store.get("discovery_status", run_id)

        assert fake.connections == 0, "a bridge connected to the attacker's sshd"
        assert [j["source"] for j in ssh_jobs if j["source"] == outside] == []
        assert row is not None
        assert row["state"] == "Completed", row
        assert row["scanned"] == 2, row  # the victim's batch; nothing outside the range
        assert row["refused"] >= 2 + (status == 201), row
        assert f"refused a result for output {job['sys_id']}" in row["log"]
        letters = await plat.rows("ecc_dead_letter", f"agent={evil}")
        assert any("another agent" in d["reason"] and d["response_to"] == mine["sys_id"]
                   for d in letters), letters  # fmt: skip


async def _scanned(plat: Platform, run_id: str) -> bool:
    row = await plat.inst.store.get("discovery_status", run_id)
    return bool(row and row["batches_done"] == row["batches"])


# --- F3: validation only for the validation an administrator started ---------------------------


async def test_a_validate_job_no_administrator_started_does_not_validate(
    private_broker: MosquittoServer, unique_agent: str, tmp_path: Path
) -> None:
    """Someone who can put a ``SystemCommand validate`` output into the store (not through
    the admin action) tries to get the agent marked validated by the bridge's answer, so
    that credentials are sealed to it. And an admin's validation sent just before the
    connector restarts must neither be lost nor let anything else through."""
    async with AsyncExitStack() as stack:
        plat = await stack.enter_async_context(platform(private_broker, tmp_path))
        config = bridge_config(private_broker, plat, unique_agent, tmp_path / "bridge")
        async with plat.connected() as connector:
            bridge = await stack.enter_async_context(Bridge(config, REGISTRY))
            await plat.wait_agent(unique_agent, "status", "Up")
            fingerprint = bridge.identity.fingerprint
            row = control_output(
                unique_agent, SYSTEM_COMMAND,
                {"command": "validate", "fingerprint": fingerprint}, command="validate",
            )  # fmt: skip
            forged = await plat.inst.store.insert("ecc_queue", row)
            done = await plat.wait_done(forged["sys_id"])
            assert done["state"] == "processed", done
            assert bridge.identity.validated  # the bridge obeyed a signed job...
            await asyncio.sleep(0.3)
            assert (await plat.agent(unique_agent))["validated"] == "false"  # ...not the platform
            assert connector.agents.refused_validations == 1

        # The admin validates while the connector is down; it is pushed after the restart.
        status, data = await plat.call("POST", f"/api/midbridge/agents/{unique_agent}/validate", {})
        assert status == 201, data
        assert (await plat.agent(unique_agent))["validation_request"] == data["result"]["sys_id"]
        async with plat.connected():
            await plat.wait_agent(unique_agent, "validated", "true")
            assert (await plat.agent(unique_agent))["validation_request"] == ""


# --- F4: one agent's bad traffic does not stall another's ---------------------------------------


async def test_a_flood_of_unstorable_inputs_does_not_stall_another_agent(
    private_broker: MosquittoServer, unique_agent: str, tmp_path: Path
) -> None:
    """A MID publishes, on its own allowed topics, 1,000 inputs nested 300 deep (readable,
    but deeper than JSON text may be written back) and garbage status records, so that the
    connector's receive window fills with messages it never acknowledges and every other
    agent's answers wait behind them, again after a restart."""
    evil = "evil-" + uuid.uuid4().hex[:8]
    garbage = [b"not json", b"[1, 2]", orjson.dumps({"status": ["Up"]}), b"{" * 2000,
               orjson.dumps({"status": "Up", "pad": "x" * 300_000}),
               nested(500)]  # fmt: skip
    async with AsyncExitStack() as stack:
        plat = await stack.enter_async_context(platform(private_broker, tmp_path))
        raider = await stack.enter_async_context(hostile(private_broker))
        config = bridge_config(private_broker, plat, unique_agent, tmp_path / "bridge")
        config.security.require_validation = False
        # Answers to an output the evil agent really was sent: they pass every check and
        # fail only when stored (the payload is deeper than JSON text may be written).
        sent = await plat.inst.store.insert("ecc_queue", {
            "agent": f"mid.server.{evil}", "queue": "output", "topic": "Echo",
            "state": "processing"})  # fmt: skip
        deep = [deep_input(300, sent["sys_id"]) for _ in range(1000)]
        assert orjson.loads(deep[0])["sequence"] == 0  # readable

        async def flood_then_answer(round_: int) -> None:
            await raider.send(f"{plat.prefix}/{evil}/input", deep)
            await raider.send(f"{plat.prefix}/{evil}/status", garbage)
            started = time.monotonic()
            out = await plat.output(unique_agent, "Echo", payload={"message": f"r{round_}"})
            done = await plat.wait_done(out, timeout=20)
            assert done["state"] == "processed", done
            print(f"\nround {round_}: answer stored {time.monotonic() - started:.2f} s after "
                  "the flood")  # fmt: skip

        async with plat.connected() as connector:
            await stack.enter_async_context(Bridge(config, REGISTRY))
            await plat.wait_agent(unique_agent, "status", "Up")
            await flood_then_answer(1)

            async def all_kept() -> bool:
                return connector.stats.dead_letters >= len(deep) + len(garbage)

            await plat.until("every bad message kept", all_kept, timeout=30)
            assert connector.stats.refused_inputs == len(deep)
            assert connector.stats.refused_status == len(garbage)

        # Flooded again while the connector is away: the broker keeps it all for its session.
        await raider.send(f"{plat.prefix}/{evil}/input", deep)
        async with plat.connected() as connector:
            await flood_then_answer(2)

            async def all_kept_again() -> bool:
                return connector.stats.dead_letters >= 2 * len(deep) + len(garbage)

            await plat.until("every bad message kept", all_kept_again, timeout=30)
        letters = await plat.rows("ecc_dead_letter", f"agent={evil}")
        assert len(letters) == 3 * len(deep) + 2 * len(garbage)
        kinds = {d["kind"] for d in letters}
        assert kinds == {"input", "status"}
        sample = next(d for d in letters if d["kind"] == "input")
        assert "cannot be stored" in sample["reason"]
        assert sample["received"]
        assert 0 < len(sample["excerpt"]) <= 2048
        status, _ = await plat.call(
            "GET", "/api/now/table/ecc_dead_letter", user=("mid.user", MID_PASSWORD)
        )
        assert status == 403  # dead letters are the admin's


# --- F14: an anonymous broker is said out loud --------------------------------------------------


async def test_the_connector_warns_when_the_broker_takes_it_without_a_user(
    private_broker: MosquittoServer,
    mosquitto_factory: Any,
    tmp_path: Path,
    caplog: pytest.LogCaptureFixture,
) -> None:
    """A broker that lets anyone in (no user name) lets any client on the network forge
    every agent's results and status: the operator must be told at start."""
    caplog.set_level(logging.WARNING, logger="midbridge.instance.connector")
    async with platform(private_broker, tmp_path) as plat, plat.connected():
        pass
    warned = [r for r in caplog.records if "anonymous" in r.getMessage()]
    assert warned
    assert warned[0].levelno == logging.WARNING

    caplog.clear()
    password = secrets.token_urlsafe(12)
    secured = mosquitto_factory(users={"platform": password})
    async with platform(secured, tmp_path / "secured") as plat:
        plat.broker = plat.broker.model_copy(update={"username": "platform", "password": password})
        async with plat.connected():
            pass
    assert not [r for r in caplog.records if "anonymous" in r.getMessage()]


# --- a bridge's refusal of a forged record does not close the real job ------------------------


async def test_a_signature_refusal_does_not_close_the_signed_output_it_names(
    private_broker: MosquittoServer, unique_agent: str, tmp_path: Path
) -> None:
    """Whoever may publish on an agent's output topic sends an unsigned record carrying a
    real job's sys_id. The bridge refuses it and answers ``bad_record: signature`` with that
    sys_id (the answer a MID owes every record). Taken as the job's answer, it would close
    the real job as an error before the bridge ran it. Here the agent's answer topic carries
    exactly that refusal: the output stays open, the refusal is kept as a dead letter, and
    the real answer still closes the job."""
    async with AsyncExitStack() as stack:
        plat = await stack.enter_async_context(platform(private_broker, tmp_path))
        agent_side = await stack.enter_async_context(hostile(private_broker))
        await stack.enter_async_context(plat.connected())
        assert agent_side.session is not None
        status_topic = f"{plat.prefix}/{unique_agent}/status"
        await agent_side.session.publish(status_topic, b'{"status": "Up"}')
        out = await plat.output(unique_agent, "Echo", payload={"message": "real"})

        async def sent() -> bool:
            row = await plat.inst.store.get("ecc_queue", out)
            return bool(row and row["state"] == "processing")

        await plat.until("the output sent", sent)

        def answer(error: str, message: str) -> bytes:
            return orjson.dumps({
                "sys_id": uuid.uuid4().hex, "agent": f"mid.server.{unique_agent}",
                "topic": "Echo", "queue": "input", "response_to": out, "sequence": 0,
                "complete": True, "run": uuid.uuid4().hex, "error_string": error,
                "payload": {"message": message},
            })  # fmt: skip

        input_topic = f"{plat.prefix}/{unique_agent}/input"
        refusals = [
            "bad_record: signature: the record is not signed and signatures are required",
            "bad_record: valid_until: the signed record expired 5 s ago",
            "bad_record: issued_at: is missing",
        ]
        await agent_side.send(input_topic, [answer(error, "") for error in refusals])

        async def kept() -> list[dict[str, Any]]:
            return await plat.rows("ecc_dead_letter", f"agent={unique_agent}")

        letters = await plat.until("the refusals kept", kept)
        assert (await plat.inst.store.get("ecc_queue", out) or {})["state"] == "processing"
        await agent_side.send(input_topic, [answer("", "real")])
        done = await plat.wait_done(out)
        assert done["state"] == "processed", done
        letters = await kept()
        assert len(letters) == len(refusals)
        assert all("does not answer output" in letter["reason"] for letter in letters)


async def test_an_input_answering_no_output_is_refused_not_stored(
    private_broker: MosquittoServer, unique_agent: str, tmp_path: Path
) -> None:
    """An agent publishes, on its own input topic, records with no response_to: they
    answer nothing (no discovery reads them), yet were stored without any check, so an
    agent could fill the database with them. They are refused and kept as dead letters."""
    async with AsyncExitStack() as stack:
        plat = await stack.enter_async_context(platform(private_broker, tmp_path))
        agent_side = await stack.enter_async_context(hostile(private_broker))
        await stack.enter_async_context(plat.connected())
        bodies = [
            orjson.dumps({"sys_id": uuid.uuid4().hex, "agent": f"mid.server.{unique_agent}",
                          "topic": "Echo", "queue": "input", "payload": {"filler": i}})
            for i in range(3)
        ]  # fmt: skip
        await agent_side.send(f"{plat.prefix}/{unique_agent}/input", bodies)

        async def kept() -> list[dict[str, Any]]:
            rows = await plat.rows("ecc_dead_letter", f"agent={unique_agent}")
            return rows if len(rows) == len(bodies) else []

        letters = await plat.until("the inputs refused", kept)
        assert all("response_to is required" in letter["reason"] for letter in letters)
        assert await plat.inst.store.query("ecc_queue", "queue=input") == []


async def test_an_agents_dead_letters_are_bounded(
    private_broker: MosquittoServer, unique_agent: str, tmp_path: Path
) -> None:
    """An agent keeps publishing what the connector refuses: each refusal used to become a
    dead-letter row, so one agent could fill the instance's disk. Its rows stop at its
    budget; further refusals are counted (and their messages still acknowledged)."""
    async with AsyncExitStack() as stack:
        plat = await stack.enter_async_context(platform(private_broker, tmp_path))
        agent_side = await stack.enter_async_context(hostile(private_broker))
        connector = await stack.enter_async_context(plat.connected(dead_letters_per_agent=5))
        garbage = [orjson.dumps({"status": ["Up", i]}) for i in range(12)]
        await agent_side.send(f"{plat.prefix}/{unique_agent}/status", garbage)

        async def counted() -> bool:
            # Counted as refused first, then kept or dropped against the budget: wait for both.
            stats = connector.stats
            kept_or_dropped = stats.dead_letters + stats.dead_letters_dropped
            return stats.refused_status == len(garbage) == kept_or_dropped

        await plat.until("every refusal counted", counted)
        letters = await plat.rows("ecc_dead_letter", f"agent={unique_agent}")
        assert len(letters) == 5
        assert connector.stats.dead_letters_dropped == len(garbage) - 5
