"""The broker's users and ACLs (docs/security.md), against a real Mosquitto 2.0.

Every broker here reads the password file and the ACL that ``compose/make-mid-user.sh``
renders from ``compose/mosquitto/*.acl.template``: the platform user ``platform`` and the MID
users ``mid.user.dc1`` (agent dc1) and ``mid.user.dc2`` (agent dc2).

What Mosquitto 2.0.11 does with its ``acl_file`` (the tests below pin it):
- a wrong password or an unknown user: CONNACK 0x87 *not authorised* (never 0x86);
- a subscription the ACL does not allow: SUBACK *granted* (0x01), then no delivery: the
  read check runs when a message is delivered, against the topic it was published to (so
  the same line covers ``$share/<group>/...``);
- a publish the ACL does not allow: PUBACK 0x87, and the message goes nowhere;
- a will on a topic the user may not write: the CONNECT is accepted and the will is dropped.
"""

from __future__ import annotations

import asyncio
import os
import re
import signal
import subprocess
import sys
import time
import uuid
from collections.abc import AsyncIterator, Callable, Iterator, Sequence
from contextlib import asynccontextmanager, contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import gmqtt
import orjson
import pytest
from gmqtt.mqtt.constants import MQTTv50

from bridge.agent.bridge import Bridge
from bridge.agent.config import Config, config_env
from bridge.demo.broker import LOOPBACK, find_mosquitto, free_port
from bridge.wire.acks import PublishRefused
from bridge.wire.broker import BrokerConfig
from bridge.wire.client import EccClient, output_record
from bridge.wire.errors import BrokerRefused
from bridge.wire.transport import Delivery, MqttSession
from probes import REGISTRY
from tests.brokers import MosquittoServer, port_accepts
from tests.harness import REPO, BridgeProcess, make_config

COMPOSE = REPO / "compose"
SCRIPT = COMPOSE / "make-mid-user.sh"
TIMEOUT = 10.0
NOT_AUTHORISED = 0x87
PASSWORDS = {"platform": "platform-pw", "mid.user.dc1": "dc1-pw", "mid.user.dc2": "dc2-pw"}
STATUS_FIELDS = {
    "name",
    "host",
    "version",
    "status",
    "validated",
    "capabilities",
    "fingerprint",
    "started_at",
    "last_heartbeat",
    "processed",
    "failed",
}


# --- helpers ------------------------------------------------------------------------------


def make_user(
    auth_dir: Path, *args: str, password: str = "pw", prefix: str | None = None
) -> subprocess.CompletedProcess[str]:
    """Run compose/make-mid-user.sh with its files in ``auth_dir``."""
    env = {**os.environ, "MOSQUITTO_AUTH_DIR": str(auth_dir), "MID_PASSWORD": password}
    env.pop("TOPIC_PREFIX", None)
    if prefix is not None:
        env["TOPIC_PREFIX"] = prefix
    return subprocess.run(
        ["sh", str(SCRIPT), *args], env=env, capture_output=True, text=True, timeout=30
    )


@dataclass(frozen=True, slots=True)
class SecureBroker:
    server: MosquittoServer
    auth_dir: Path

    def login(self, user: str, password: str | None = None, **extra: Any) -> BrokerConfig:
        if password is None:
            password = PASSWORDS[user]
        return BrokerConfig(
            host=self.server.host,
            port=self.server.port,
            username=user,
            password=password,
            reconnect_min=0.1,
            reconnect_max=1.0,
            **extra,
        )

    def bridge_config(
        self, agent: str, user: str, state_dir: Path, password: str | None = None, **broker: Any
    ) -> Config:
        return make_config(
            self.server.host,
            self.server.port,
            agent,
            state_dir,
            broker={"username": user, "password": password or PASSWORDS[user], **broker},
        )


@pytest.fixture
def secure(mosquitto_factory: Callable[..., MosquittoServer], tmp_path: Path) -> SecureBroker:
    auth_dir = tmp_path / "auth"
    for args, user in (
        (["--platform"], "platform"),
        (["dc1"], "mid.user.dc1"),
        (["dc2"], "mid.user.dc2"),
    ):
        done = make_user(auth_dir, *args, password=PASSWORDS[user])
        assert done.returncode == 0, done.stderr
    server = mosquitto_factory(
        allow_anonymous=False,
        persistence=False,
        extra_config=[f"password_file {auth_dir / 'passwords'}", f"acl_file {auth_dir / 'acl'}"],
    )
    return SecureBroker(server, auth_dir)


async def wait_until(predicate: Callable[[], bool], what: str, within: float = TIMEOUT) -> float:
    """Poll until ``predicate()``; return the seconds it took (AssertionError past ``within``)."""
    start = time.monotonic()
    while not predicate():
        if time.monotonic() - start > within:
            raise AssertionError(f"timed out after {within:.1f} s waiting for {what}")
        await asyncio.sleep(0.01)
    return time.monotonic() - start


@asynccontextmanager
async def listening(
    cfg: BrokerConfig, topics: Sequence[str], into: list[Delivery]
) -> AsyncIterator[MqttSession]:
    """A clean session subscribed to ``topics`` that appends what it receives to ``into``."""

    async def keep(delivery: Delivery) -> bool:
        into.append(delivery)
        return True

    session = MqttSession(
        cfg,
        client_id=f"sec-{uuid.uuid4().hex[:10]}",
        subscriptions=list(topics),
        on_message=keep,
        clean_start=True,
    )
    async with session:
        yield session


def run_cli(config: Config, within: float = 20.0) -> tuple[int, str, float]:
    """``python -m bridge run`` to its end: (exit code, stderr, seconds)."""
    start = time.monotonic()
    done = subprocess.run(
        [sys.executable, "-m", "bridge", "run"],
        env=config_env(config),
        cwd=REPO,
        capture_output=True,
        timeout=within,
        check=False,
    )
    return done.returncode, done.stderr.decode(errors="replace"), time.monotonic() - start


# --- the script and its files -------------------------------------------------------------


def test_script_renders_one_block_per_user_and_refuses_bad_names(tmp_path: Path) -> None:
    auth = tmp_path / "auth"
    assert make_user(auth, "--platform").returncode == 0
    assert make_user(auth, "dc1", password="first").returncode == 0
    acl = (auth / "acl").read_text()
    lines = [ln for ln in acl.splitlines() if ln and not ln.startswith("#")]
    assert lines == [
        "user platform",
        "topic write ecc/+/output",
        "topic write ecc/+/output/interactive",
        "topic read ecc/+/input",
        "topic read ecc/+/status",
        "user mid.user.dc1",
        "topic read ecc/dc1/output",
        "topic read ecc/dc1/output/interactive",
        "topic write ecc/dc1/input",
        "topic write ecc/dc1/status",
        # The bridge's sessions with broker.session_users, each with what it does.
        "user mid.user.dc1.bulk",
        "topic read ecc/dc1/output",
        "user mid.user.dc1.express",
        "topic read ecc/dc1/output/interactive",
        "user mid.user.dc1.out",
        "topic write ecc/dc1/input",
        "topic write ecc/dc1/status",
    ]
    assert oct((auth / "acl").stat().st_mode & 0o777) == "0o600"
    assert oct((auth / "passwords").stat().st_mode & 0o777) == "0o600"
    hashes = (auth / "passwords").read_text()
    assert "first" not in hashes
    # Again for the same user: a new password, the same ACL.
    again = make_user(auth, "dc1", password="second")
    assert again.returncode == 0, again.stderr
    assert (auth / "acl").read_text() == acl
    assert (auth / "passwords").read_text() != hashes
    # A user that serves dc1 may not serve dc2 as well; its password stays as it was.
    hashes = (auth / "passwords").read_text()
    taken = make_user(auth, "dc2", "mid.user.dc1", password="third")
    assert taken.returncode == 2
    assert "already has an ACL block" in taken.stderr
    assert (auth / "passwords").read_text() == hashes
    # Nor may another agent's user be one of dc1's session users, or have one that is.
    clash = make_user(auth, "dc2", "mid.user.dc1.bulk", password="fourth")
    assert clash.returncode == 2
    assert "already has an ACL block" in clash.stderr
    assert (auth / "passwords").read_text() == hashes
    other = tmp_path / "other"
    assert make_user(other, "dc3", "shared.out").returncode == 0
    clash = make_user(other, "dc4", "shared", password="fourth")
    assert clash.returncode == 2
    assert "user shared.out already has an ACL block" in clash.stderr
    # Names that would widen an ACL line or break a file are refused, nothing written.
    for args in (
        ["dc/2"],
        ["dc+"],
        ["#"],
        [""],
        ["x" * 65],
        ["dc 2"],
        ["dc2", "u:x"],
        ["dc2", "u v"],
    ):
        refused = make_user(auth, *args)
        assert refused.returncode == 2, args
        assert refused.stderr.startswith("make-mid-user: "), refused.stderr
    assert make_user(auth, "dc2", prefix="ecc/#").returncode == 2
    assert (auth / "acl").read_text() == acl
    assert (auth / "passwords").read_text() == hashes


# --- right and wrong credentials ----------------------------------------------------------


@pytest.mark.parametrize("group", [None, "dc"], ids=["single", "shared-subscription"])
async def test_mid_and_platform_users_run_an_echo_job(
    secure: SecureBroker, tmp_path: Path, group: str | None
) -> None:
    config = secure.bridge_config("dc1", "mid.user.dc1", tmp_path / "state")
    config.bridge.shared_group = group
    async with (
        Bridge(config, REGISTRY) as bridge,
        EccClient(secure.login("platform"), agent="dc1") as platform,
    ):
        shared = f"$share/{group}/ecc/dc1/output"
        assert bridge.bulk.subscriptions == [shared if group else "ecc/dc1/output"]
        bulk = output_record("Echo", agent="mid.server.dc1", payload={"message": "ping"})
        express = output_record(
            "Echo", agent="mid.server.dc1", priority=0, payload={"message": "now"}
        )
        await platform.send([bulk])
        await platform.send([express], express=True)
        results = await platform.wait([bulk["sys_id"], express["sys_id"]], timeout=TIMEOUT)
    assert [r.final["payload"]["message"] for r in results] == ["ping", "now"]
    assert [r.error_string for r in results] == ["", ""]


@pytest.mark.parametrize(
    ("user", "password"),
    [("mid.user.dc1", "wrong"), ("nobody", "dc1-pw")],
    ids=["password", "user"],
)
def test_bad_credentials_stop_the_bridge_at_once_with_the_cause(
    secure: SecureBroker, tmp_path: Path, user: str, password: str
) -> None:
    code, stderr, seconds = run_cli(
        secure.bridge_config("dc1", user, tmp_path / "state", password=password)
    )
    assert code == 2, stderr
    assert seconds < 8.0, f"took {seconds:.1f} s: a retry loop?"
    last = stderr.strip().splitlines()[-1]
    # Mosquitto 2.0.11 answers both with CONNACK 0x87, "not authorised".
    assert re.search(r"not authori[sz]ed|bad user name or password", last), stderr
    assert "Traceback" not in stderr


# --- one MID may not touch another's topics -----------------------------------------------


async def test_a_denied_subscription_is_granted_and_delivers_nothing(
    secure: SecureBroker,
) -> None:
    """Mosquitto's acl_file does not refuse a SUBSCRIBE: it filters deliveries."""
    granted: list[tuple[int, ...]] = []
    received: list[str] = []
    client = gmqtt.Client(f"sec-{uuid.uuid4().hex[:10]}", clean_session=True)
    client.set_auth_credentials("mid.user.dc1", PASSWORDS["mid.user.dc1"])
    client.on_subscribe = lambda c, mid, qos, props: granted.append(tuple(qos))

    def on_message(c: Any, topic: str, payload: bytes, qos: int, props: Any) -> int:
        received.append(topic)
        return 0

    client.on_message = on_message
    await asyncio.wait_for(
        client.connect(secure.server.host, secure.server.port, version=MQTTv50), TIMEOUT
    )
    foreign = [
        "ecc/dc2/output",
        "ecc/dc2/output/interactive",
        "$share/dc/ecc/dc2/output",
        "ecc/+/output",
        "ecc/#",
    ]
    try:
        client.subscribe([gmqtt.Subscription(topic, qos=1) for topic in foreign])
        await wait_until(lambda: bool(granted), "SUBACK")
        # One SUBACK, every subscription granted at QoS 1.
        assert granted == [(1,) * len(foreign)], "Mosquitto refuses these now: see docs/security.md"
        async with EccClient(secure.login("platform"), agent="dc2") as platform:
            await platform.send_raw(b'{"sys_id": "secret-bulk"}')
            await platform.send_raw(b'{"sys_id": "secret-express"}', express=True)
        async with EccClient(secure.login("platform"), agent="dc1") as platform:
            await platform.send_raw(b'{"sys_id": "mine"}')
        # Same publisher, one broker: dc2's messages were routed before dc1's arrived.
        await wait_until(lambda: bool(received), "dc1's own job")
        await asyncio.sleep(0.2)
        assert set(received) == {"ecc/dc1/output"}
    finally:
        await client.disconnect()


def test_a_bridge_logged_in_as_another_agents_user_stops_naming_the_refused_topic(
    secure: SecureBroker, tmp_path: Path
) -> None:
    """Agent dc2's bridge with dc1's user: it must stop (2), naming what was refused.

    Its subscriptions are granted (see above), so the first refusal it can see is the PUBACK
    0x87 of its status record on ecc/dc2/status. Today that PublishRefused escapes
    ``Bridge.__aenter__`` as a traceback with exit code 1.
    """
    code, stderr, seconds = run_cli(secure.bridge_config("dc2", "mid.user.dc1", tmp_path / "state"))
    assert "Traceback" not in stderr, stderr
    assert code == 2, stderr
    assert seconds < 8.0
    last = stderr.strip().splitlines()[-1]
    assert "ecc/dc2/status" in last, last
    assert re.search(r"not authori[sz]ed|0x87", last), last


async def test_a_mid_may_not_publish_to_another_agent_nor_queue_jobs(
    secure: SecureBroker,
) -> None:
    inputs: list[Delivery] = []
    dc2_jobs: list[Delivery] = []
    dc1 = MqttSession(secure.login("mid.user.dc1"), client_id="sec-dc1", clean_start=True)
    platform = MqttSession(secure.login("platform"), client_id="sec-platform", clean_start=True)
    async with (
        listening(secure.login("platform"), ["ecc/+/input", "ecc/+/status"], inputs),
        listening(secure.login("mid.user.dc2"), ["ecc/dc2/output"], dc2_jobs),
        dc1,
        platform,
    ):
        forged = [
            "ecc/dc2/input",
            "ecc/dc2/status",
            "ecc/dc2/output",
            "ecc/dc1/output",
            "ecc/dc1/output/interactive",
        ]
        for topic in forged:
            with pytest.raises(PublishRefused) as refused:
                await asyncio.wait_for(dc1.publish(topic, b"forged"), TIMEOUT)
            assert refused.value.reason_code == NOT_AUTHORISED, topic
        # The platform may queue jobs, not forge results.
        with pytest.raises(PublishRefused):
            await asyncio.wait_for(platform.publish("ecc/dc1/input", b"forged"), TIMEOUT)
        await asyncio.wait_for(dc1.publish("ecc/dc1/input", b"result"), TIMEOUT)
        await asyncio.wait_for(platform.publish("ecc/dc2/output", b"job"), TIMEOUT)
        await wait_until(lambda: bool(inputs) and bool(dc2_jobs), "the allowed messages")
        await asyncio.sleep(0.2)
    assert [(d.topic, d.payload) for d in inputs] == [("ecc/dc1/input", b"result")]
    assert [(d.topic, d.payload) for d in dc2_jobs] == [("ecc/dc2/output", b"job")]


# --- the status record and the last will --------------------------------------------------


class StatusWatch:
    def __init__(self) -> None:
        self.deliveries: list[Delivery] = []

    @property
    def records(self) -> list[dict[str, Any]]:
        return [orjson.loads(d.payload) for d in self.deliveries]

    async def next(self, status: str, after: int, within: float) -> tuple[dict[str, Any], float]:
        """The first record with ``status`` past index ``after``, and how long it took."""

        def found() -> bool:
            return any(r["status"] == status for r in self.records[after:])

        took = await wait_until(found, f"status {status}", within)
        return next(r for r in self.records[after:] if r["status"] == status), took


async def test_a_killed_bridge_turns_down_through_its_will_and_up_on_restart(
    secure: SecureBroker, tmp_path: Path
) -> None:
    keepalive = 5
    config = secure.bridge_config("dc1", "mid.user.dc1", tmp_path / "state", keepalive=keepalive)
    bridge = BridgeProcess(config, tmp_path / "bridge.log")
    watch = StatusWatch()
    async with listening(secure.login("platform"), ["ecc/dc1/status"], watch.deliveries):
        try:
            await asyncio.to_thread(bridge.start)
            up, _ = await watch.next("Up", 0, TIMEOUT)
            assert set(up) >= STATUS_FIELDS, STATUS_FIELDS - set(up)
            assert up["name"] == "dc1"
            assert up["validated"] is False
            assert "Echo" in up["capabilities"]
            seen = len(watch.records)
            bridge.kill()
            down, _ = await watch.next("Down", seen, keepalive * 1.5)
            assert set(down) >= STATUS_FIELDS
            assert down["fingerprint"] == up["fingerprint"]
            # Retained: a platform that connects now reads Down.
            late: list[Delivery] = []
            async with listening(secure.login("platform"), ["ecc/dc1/status"], late):
                await wait_until(lambda: bool(late), "the retained status")
            assert orjson.loads(late[0].payload)["status"] == "Down"
            seen = len(watch.records)
            await asyncio.to_thread(bridge.start)
            again, _ = await watch.next("Up", seen, TIMEOUT)
            assert again["started_at"] > up["started_at"]
            assert again["fingerprint"] == up["fingerprint"]  # same key pair, same state_dir
            seen = len(watch.records)
            assert await asyncio.to_thread(bridge.stop) == 0
            await watch.next("Down", seen, TIMEOUT)
        finally:
            bridge.kill()


async def test_a_frozen_bridge_turns_down_after_keepalive_and_up_when_it_resumes(
    secure: SecureBroker, tmp_path: Path
) -> None:
    """SIGSTOP keeps the TCP connection open: only the keep-alive timeout finds it dead.

    Mosquitto 2.0.11 drops a silent client about 2 x keepalive after its last packet
    (measured 10-11 s for keepalive 5, not the 1.5 x of the MQTT spec) and publishes its
    will (Down). When the bridge resumes it reconnects and resumes its sessions; its status
    must read Up again at once, not only at the next ``security.status_interval``.
    """
    keepalive = 5
    config = secure.bridge_config("dc1", "mid.user.dc1", tmp_path / "state", keepalive=keepalive)
    bridge = BridgeProcess(config, tmp_path / "bridge.log")
    watch = StatusWatch()
    async with listening(secure.login("platform"), ["ecc/dc1/status"], watch.deliveries):
        try:
            await asyncio.to_thread(bridge.start)
            await watch.next("Up", 0, TIMEOUT)
            seen = len(watch.records)
            os.kill(bridge.pid, signal.SIGSTOP)
            # Frozen just after its status publish: the broker's clock starts about now.
            _, took = await watch.next("Down", seen, keepalive * 2 + 2.5)
            assert took >= keepalive, f"Down after {took:.1f} s, before the keep-alive ran out"
            seen = len(watch.records)
            os.kill(bridge.pid, signal.SIGCONT)
            await watch.next("Up", seen, 5.0)
        finally:
            if bridge.proc is not None and bridge.proc.poll() is None:
                os.kill(bridge.pid, signal.SIGCONT)
            bridge.kill()


# --- operations: adding a MID, the compose config -----------------------------------------


async def test_a_new_mid_user_works_after_sighup_without_a_restart(secure: SecureBroker) -> None:
    done = make_user(secure.auth_dir, "dc3", password="dc3-pw")
    assert done.returncode == 0, done.stderr
    with pytest.raises(BrokerRefused, match="not authorised"):
        async with MqttSession(secure.login("mid.user.dc3", "dc3-pw"), client_id="sec-dc3"):
            pass
    assert secure.server.pid is not None
    os.kill(secure.server.pid, signal.SIGHUP)
    deadline = time.monotonic() + TIMEOUT
    while True:
        try:
            session = MqttSession(
                secure.login("mid.user.dc3", "dc3-pw"), client_id="sec-dc3", clean_start=True
            )
            async with session:
                await asyncio.wait_for(session.publish("ecc/dc3/input", b"ok"), TIMEOUT)
                with pytest.raises(PublishRefused):
                    await asyncio.wait_for(session.publish("ecc/dc1/input", b"no"), TIMEOUT)
            break
        except BrokerRefused:
            if time.monotonic() > deadline:
                raise
            await asyncio.sleep(0.1)


@contextmanager
def secure_compose_broker(tmp_path: Path, auth_dir: Path) -> Iterator[tuple[int, int]]:
    """compose/mosquitto-secure.conf with its container paths and ports made local."""
    binary = find_mosquitto()
    if binary is None:
        pytest.fail("mosquitto binary not found", pytrace=False)
    mqtt, health = free_port(), free_port()
    text = (COMPOSE / "mosquitto-secure.conf").read_text()
    text = text.replace("/mosquitto/config/auth/", f"{auth_dir}/")
    text = text.replace("/mosquitto/config/health.acl", str(COMPOSE / "mosquitto" / "health.acl"))
    text = text.replace("/mosquitto/data/", f"{tmp_path}/")
    text = re.sub(r"^listener 1883 0\.0\.0\.0$", f"listener {mqtt} {LOOPBACK}", text, flags=re.M)
    text = re.sub(
        r"^listener 1880 127\.0\.0\.1$", f"listener {health} {LOOPBACK}", text, flags=re.M
    )
    assert f"listener {mqtt} " in text, "the MQTT listener moved?"
    assert f"listener {health} " in text, "the health listener moved?"
    if os.geteuid() == 0:
        text += "user root\n"  # else mosquitto drops to a user that cannot read tmp_path
    conf = tmp_path / "mosquitto.conf"
    conf.write_text(text)
    log = tmp_path / "mosquitto.log"
    with log.open("wb") as out:
        proc = subprocess.Popen([binary, "-c", str(conf)], stdout=out, stderr=subprocess.STDOUT)
    try:
        deadline = time.monotonic() + TIMEOUT
        while not (port_accepts(LOOPBACK, mqtt) and port_accepts(LOOPBACK, health)):
            assert proc.poll() is None, log.read_text()
            assert time.monotonic() < deadline, log.read_text()
            time.sleep(0.02)
        yield mqtt, health
    finally:
        proc.terminate()
        proc.wait(10)


async def test_the_compose_secure_config_refuses_anonymous_clients(tmp_path: Path) -> None:
    auth = tmp_path / "auth"
    assert make_user(auth, "--platform", password="pp").returncode == 0
    assert make_user(auth, "compose", password="cp").returncode == 0
    with secure_compose_broker(tmp_path, auth) as (mqtt, health):
        with pytest.raises(BrokerRefused, match="not authorised"):
            async with MqttSession(BrokerConfig(port=mqtt), client_id="sec-anon"):
                pass
        broker = BrokerConfig(port=mqtt, username="mid.user.compose", password="cp")
        async with MqttSession(broker, client_id="sec-mid", clean_start=True) as mid:
            await asyncio.wait_for(mid.publish("ecc/compose/status", b"{}"), TIMEOUT)
        # The health listener: anonymous, may read the uptime, may not queue a job.
        uptime: list[Delivery] = []
        probe = BrokerConfig(port=health)
        async with listening(probe, ["$SYS/broker/uptime"], uptime) as session:
            await wait_until(lambda: bool(uptime), "$SYS/broker/uptime")
            with pytest.raises(PublishRefused):
                await asyncio.wait_for(session.publish("ecc/compose/output", b"{}"), TIMEOUT)
