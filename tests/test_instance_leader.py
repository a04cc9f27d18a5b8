"""Two ``midbridge instance --db postgresql://...`` processes on one PostgreSQL: both serve
the API, exactly one (the advisory-lock leader) runs the connector; SIGKILL the leader in
the middle of Echo jobs running through a real bridge and a real Mosquitto, and the other
takes over within seconds: every job gets exactly one answer. Instances that start at
the same moment on a new database make one admin between them."""

from __future__ import annotations

import asyncio
import base64
import os
import re
import signal
import subprocess
import sys
import time
import uuid
from collections import Counter
from contextlib import AsyncExitStack
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from bridge.bench.natsd import NatsCluster
from bridge.cli_errors import CommandError
from bridge.instance import auth
from bridge.instance.leader import FOLLOWER, Leadership
from bridge.instance.pg_store import PGStore
from bridge.instance.platform_credentials import PlatformKeys
from bridge.instance.server import Instance, InstanceConfig
from bridge.nats_url import nats_broker
from tests.brokers import MosquittoServer
from tests.harness import REPO, BridgeProcess, make_config
from tests.test_connector import basic

pytest_plugins = ("tests.nats_cluster",)

ADMIN_PASSWORD = "Admin-pass-for-leader-test-1"
JOBS = 300


class InstanceProcess:
    """``midbridge instance`` as a child process, its stdout in a file."""

    def __init__(self, name: str, args: list[str], workdir: Path) -> None:
        self.name = name
        self.args = args
        self.out = workdir / f"{name}.out"
        self.err = workdir / f"{name}.err"
        self.proc: subprocess.Popen[bytes] | None = None
        self.url = ""

    def start(self) -> None:
        env = {**os.environ, "MIDBRIDGE_ADMIN_PASSWORD": ADMIN_PASSWORD}
        with self.out.open("wb") as out, self.err.open("wb") as err:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "bridge", "instance", *self.args],
                stdout=out,
                stderr=err,
                cwd=REPO,
                env=env,
            )

    def text(self) -> str:
        return self.out.read_text(errors="replace") if self.out.exists() else ""

    async def wait_for(self, pattern: str, timeout: float = 20.0) -> re.Match[str]:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            found = re.search(pattern, self.text())
            if found is not None:
                return found
            if self.proc is not None and self.proc.poll() is not None:
                break
            await asyncio.sleep(0.05)
        raise AssertionError(
            f"{self.name}: no {pattern!r} within {timeout} s\n{self.text()}\n"
            + self.err.read_text(errors="replace")[-3000:]
        )

    def kill(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGKILL)
            self.proc.wait(timeout=10)

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(timeout=5)


AUTH = {"Authorization": "Basic " + base64.b64encode(f"admin:{ADMIN_PASSWORD}".encode()).decode()}


async def get(http: aiohttp.ClientSession, url: str) -> tuple[int, Any]:
    async with http.get(url, headers=AUTH) as resp:
        return resp.status, await resp.json(content_type=None)


async def post(http: aiohttp.ClientSession, url: str) -> tuple[int, Any]:
    async with http.post(url, headers=AUTH, json={}) as resp:
        return resp.status, await resp.json(content_type=None)


@pytest.mark.parametrize("transport", ["mqtt", "nats"])
async def test_the_follower_takes_over_when_the_leader_is_killed(
    transport: str,
    request: pytest.FixtureRequest,
    pg_url: str,
    unique_agent: str,
    tmp_path: Path,
) -> None:
    prefix = "t" + uuid.uuid4().hex[:12]
    stem = tmp_path / "keys" / "instance"
    keys = PlatformKeys.load_or_create(stem)  # the files both instances load (--keys)
    broker: dict[str, Any] = {}
    if transport == "mqtt":
        mosquitto: MosquittoServer = request.getfixturevalue("private_broker")
        host, port = mosquitto.host, mosquitto.port
        where = f"{host}:{port}"
    else:
        node: NatsCluster = request.getfixturevalue("nats_node")
        broker = node.broker_settings()
        host, port = broker.pop("host"), broker.pop("port")
        where = f"nats://{host}:{port}"
    args = ["--db", pg_url, "--port", "0", "--broker", where,
            "--topic-prefix", prefix, "--keys", str(stem)]  # fmt: skip
    if transport == "nats":
        # Answers the killed leader took and never acknowledged come again after ack_wait:
        # 5 s instead of the default 30 keeps the test short.
        args += ["--nats-ack-wait", "5"]
    first = InstanceProcess("first", args, tmp_path)
    second = InstanceProcess("second", args, tmp_path)
    config = make_config(
        host, port, unique_agent, tmp_path / "bridge", broker=broker,
        security={"require_signatures": True, "platform_key": keys.public_key_b64},
    )  # fmt: skip
    config.bridge.topic_prefix = prefix
    bridge = BridgeProcess(config, tmp_path / "bridge.log")
    agent = f"mid.server.{unique_agent}"
    async with AsyncExitStack() as stack:
        for proc in (first, second):
            stack.callback(proc.stop)
        stack.callback(bridge.stop)
        http = await stack.enter_async_context(aiohttp.ClientSession())
        store = await stack.enter_async_context(PGStore(pg_url))

        first.start()
        await first.wait_for(rf"leader: connector: ECC queue on {transport}://")
        first.url = (await first.wait_for(r"midbridge instance on (http://\S+)")).group(1)
        second.start()
        await second.wait_for(r"follower: another instance leads")
        second.url = (await second.wait_for(r"midbridge instance on (http://\S+)")).group(1)
        assert "password" not in second.text()  # the database URL is shown without one
        # both serve the API; discovery answers only on the leader
        for proc in (first, second):
            status, _ = await get(http, f"{proc.url}/api/now/table/ecc_queue?sysparm_limit=1")
            assert status == 200
        status, body = await post(http, f"{second.url}/api/midbridge/discovery/none/run")
        assert (status, body["error"]["message"]) == (503, FOLLOWER)
        status, _ = await post(http, f"{first.url}/api/midbridge/discovery/none/run")
        assert status == 404  # the leader runs it: there is no such schedule

        bridge.start()
        for _ in range(400):
            rows = await store.query("ecc_agent", f"name={unique_agent}^status=Up")
            if rows:
                break
            await asyncio.sleep(0.05)
        else:
            raise AssertionError("the bridge never came up at the leader")

        outputs = await store.insert_many(
            "ecc_queue",
            [{"agent": agent, "topic": "Echo", "queue": "output",
              "payload": {"message": f"m{i}", "delay": 0.3}} for i in range(JOBS)],
        )  # fmt: skip
        ids = [o["sys_id"] for o in outputs]
        for _ in range(600):  # kill the leader mid-run: some answered, most not
            done = await store.count("ecc_queue", "queue=output^topic=Echo^state=processed")
            if done >= 30:
                break
            await asyncio.sleep(0.02)
        assert done < JOBS // 2, "the run was over before the leader was killed"
        first.kill()
        killed = time.monotonic()
        await second.wait_for(r"leader: this instance runs the connector", timeout=15)
        takeover = time.monotonic() - killed
        await second.wait_for(rf"leader: connector: ECC queue on {transport}://", timeout=15)

        deadline = time.monotonic() + 90
        while time.monotonic() < deadline:
            if await store.count("ecc_queue", "queue=output^topic=Echo^state=processed") == JOBS:
                break
            await asyncio.sleep(0.2)
        rows = await store.query("ecc_queue", "queue=output^topic=Echo")
        states = Counter(r["state"] for r in rows)
        stuck = [r for r in rows if r["state"] != "processed"]
        answered = [
            len(await store.query("ecc_queue", f"queue=input^response_to={r['sys_id']}"))
            for r in stuck[:20]
        ]
        assert states == {"processed": JOBS}, (states, answered, stuck[:2])
        wanted = set(ids)  # (the heartbeats the connector sent have their answers too)
        inputs = [
            r for r in await store.query("ecc_queue", "queue=input") if r["response_to"] in wanted
        ]
        complete = Counter(r["response_to"] for r in inputs if r["complete"])
        assert set(complete) == set(ids)
        assert set(complete.values()) == {1}  # exactly one complete answer each
        assert len(inputs) == JOBS, Counter(r["response_to"] for r in inputs).most_common(3)
        status, _ = await get(http, f"{second.url}/api/now/table/ecc_queue?sysparm_limit=1")
        assert status == 200
        assert takeover < 10.0
        print(
            f"{transport}: takeover in {takeover:.2f} s; the old leader had {done} of {JOBS} "
            f"answered; all answered {time.monotonic() - killed:.1f} s after the kill"
        )


async def test_one_leader_at_a_time_and_a_lost_connection_ends_the_term(pg_url: str) -> None:
    """In-process: two candidates, one term at a time; the leader's lock connection
    killed from the server side ends its term and the other takes the lead."""
    events: list[str] = []
    running: set[str] = set()

    def lead_of(name: str) -> Any:
        from contextlib import asynccontextmanager

        @asynccontextmanager
        async def lead() -> Any:
            assert not running, f"{name} leads while {running} does"
            running.add(name)
            events.append(f"{name} in")
            try:
                yield
            finally:
                running.discard(name)
                events.append(f"{name} out")

        return lead

    one = Leadership(pg_url, lead_of("one"), retry=0.1, identity="one")
    two = Leadership(pg_url, lead_of("two"), retry=0.1, identity="two")
    async with one:
        for _ in range(100):
            if one.is_leader:
                break
            await asyncio.sleep(0.05)
        async with two:
            await asyncio.sleep(0.5)
            assert (one.is_leader, two.is_leader) == (True, False)
            async with PGStore(pg_url) as store:  # any connection: end the leader's session
                assert store._pool is not None
                async with store._pool.acquire() as conn:
                    await conn.execute(
                        "SELECT pg_terminate_backend(pid) FROM pg_stat_activity "
                        "WHERE application_name = $1",
                        f"midbridge {one.identity}",
                    )
            for _ in range(100):
                if two.is_leader:
                    break
                await asyncio.sleep(0.05)
            assert two.is_leader
            assert events[:3] == ["one in", "one out", "two in"]
    assert running == set()


def test_nats_broker_urls() -> None:
    cfg = nats_broker("nats://127.0.0.1:4222,nats://127.0.0.1:4223", "u", "p")
    assert (cfg.kind, cfg.host, cfg.port, cfg.nats_servers) == (
        "nats", "127.0.0.1", 4222, ["nats://127.0.0.1:4222", "nats://127.0.0.1:4223"]
    )  # fmt: skip
    with pytest.raises(CommandError, match="--broker: expected nats://HOST:PORT"):
        nats_broker("nats://127.0.0.1:4222,mqtt://x:1", None, None)
    with pytest.raises(CommandError, match="--broker"):
        nats_broker("nats://127.0.0.1:notaport", None, None)
    assert nats_broker("nats://127.0.0.1:4222", None, None, ack_wait=5).nats.ack_wait == 5
    with pytest.raises(CommandError, match="--nats-ack-wait: "):
        nats_broker("nats://127.0.0.1:4222", None, None, ack_wait=0)


async def test_instances_starting_at_once_on_a_new_database_make_one_admin(pg_url: str) -> None:
    """Four instances reach the first-start step (roles, admin) on one new PostgreSQL
    database at the same moment: none fails, one admin and one set of roles exist, and
    the one generated password shown is the one that logs in."""
    async with AsyncExitStack() as stack:
        stores = [await stack.enter_async_context(PGStore(pg_url)) for _ in range(4)]
        shown = await asyncio.gather(*(auth.ensure_admin(store, None) for store in stores))
        passwords = [p for p in shown if p]
        assert len(passwords) == 1
        assert len(await stores[0].query("sys_user", "user_name=admin")) == 1
        for role in auth.ROLES:
            assert len(await stores[0].query("sys_user_role", f"name={role}")) == 1
        inst = await stack.enter_async_context(Instance(InstanceConfig(db=pg_url, port=0)))
        assert inst.generated_admin_password is None  # made already: never shown twice
        async with aiohttp.ClientSession() as http:
            url = f"{inst.url}/api/now/table/sys_user?sysparm_query=user_name=admin"
            login = {"Authorization": basic("admin", passwords[0])}
            async with http.get(url, headers=login) as resp:
                assert resp.status == 200, await resp.text()
                assert [u["user_name"] for u in (await resp.json())["result"]] == ["admin"]
