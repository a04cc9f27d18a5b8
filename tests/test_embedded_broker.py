"""The demo's embedded broker: amqtt (MQTT 3.1.1) and mosquitto (MQTT 5) paths."""

from __future__ import annotations

import asyncio
import os
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any

import gmqtt
import pytest
from gmqtt.mqtt.constants import MQTTv50, MQTTv311

from bridge.demo.broker import (
    BrokerEndpoint,
    embedded_broker,
    find_mosquitto,
    mosquitto_config,
    parse_address,
)
from bridge.wire.acks import AckTrackingStorage, PublishRefused
from tests.brokers import (
    BrokerAddress,
    MosquittoNotFound,
    MosquittoServer,
    ThreadedEmbeddedBroker,
    port_accepts,
    session_broker,
)

TIMEOUT = 10.0


async def qos1_round_trip(endpoint: BrokerEndpoint, count: int = 20) -> list[bytes]:
    """Subscribe at QoS 1, publish ``count`` QoS 1 messages, return the payloads received."""
    version = MQTTv50 if endpoint.protocol == "5" else MQTTv311
    topic = f"t/{uuid.uuid4().hex}/x"
    received: list[bytes] = []
    all_in = asyncio.Event()
    subscribed = asyncio.Event()

    def on_message(client: Any, t: str, payload: bytes, qos: int, props: Any) -> int:
        assert qos == 1
        received.append(payload)
        if len(received) >= count:
            all_in.set()
        return 0

    def on_subscribe(client: Any, mid: int, qos: Any, props: Any) -> None:
        assert all(code == 1 for code in qos), qos
        subscribed.set()

    sub = gmqtt.Client(f"sub-{uuid.uuid4().hex[:8]}")
    sub.on_message = on_message
    sub.on_subscribe = on_subscribe
    pub = gmqtt.Client(f"pub-{uuid.uuid4().hex[:8]}")
    await sub.connect(endpoint.host, endpoint.port, version=version)
    await pub.connect(endpoint.host, endpoint.port, version=version)
    try:
        sub.subscribe(topic, qos=1)
        await asyncio.wait_for(subscribed.wait(), TIMEOUT)
        for i in range(count):
            pub.publish(topic, f"m{i}".encode(), qos=1)
        await asyncio.wait_for(all_in.wait(), TIMEOUT)
        # every publish acknowledged by the broker
        async with asyncio.timeout(TIMEOUT):
            while not pub._persistent_storage.is_empty:
                await asyncio.sleep(0.01)
    finally:
        await pub.disconnect()
        await sub.disconnect()
    return received


async def test_amqtt_path_round_trip() -> None:
    async with embedded_broker(force="amqtt") as endpoint:
        assert endpoint.kind == "amqtt"
        assert endpoint.protocol == "3.1.1"
        assert endpoint.host == "127.0.0.1"
        received = await qos1_round_trip(endpoint)
        assert sorted(received) == sorted(f"m{i}".encode() for i in range(20))
    assert not port_accepts(endpoint.host, endpoint.port), "amqtt still listening after exit"


@pytest.mark.skipif(find_mosquitto() is None, reason="needs the mosquitto binary")
async def test_mosquitto_path_round_trip() -> None:
    async with embedded_broker(force="mosquitto") as endpoint:
        assert endpoint.kind == "mosquitto"
        assert endpoint.protocol == "5"
        received = await qos1_round_trip(endpoint, count=200)
        assert sorted(received) == sorted(f"m{i}".encode() for i in range(200))
    assert not port_accepts(endpoint.host, endpoint.port), "mosquitto still listening after exit"


async def test_auto_prefers_mosquitto_then_amqtt() -> None:
    async with embedded_broker() as endpoint:
        expected = "mosquitto" if find_mosquitto() is not None else "amqtt"
        assert endpoint.kind == expected
        assert port_accepts(endpoint.host, endpoint.port)


async def test_preferred_broker_is_used_as_given() -> None:
    async with embedded_broker("mqtt://broker.example:1884") as endpoint:
        assert endpoint == BrokerEndpoint("broker.example", 1884, "external", "5")
        assert endpoint.url == "mqtt://broker.example:1884"
    async with embedded_broker(("10.0.0.5", 1883)) as endpoint:
        assert endpoint.address == ("10.0.0.5", 1883)


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("host:1", ("host", 1)),
        ("host", ("host", 1883)),
        ("mqtt://h:2/", ("h", 2)),
        ("[::1]:1885", ("::1", 1885)),
        ("tcp://10.1.2.3", ("10.1.2.3", 1883)),
    ],
)
def test_parse_address(text: str, expected: tuple[str, int]) -> None:
    assert parse_address(text) == expected


@pytest.mark.parametrize("text", ["", ":1883", "host:x", "host:0", "http://h:1", "h:70000"])
def test_parse_address_rejects(text: str) -> None:
    with pytest.raises(ValueError, match="broker"):
        parse_address(text)


def test_mosquitto_config_raises_limits(tmp_path: Path) -> None:
    conf = mosquitto_config(1999, persistence_dir=tmp_path, extra=["# extra line"])
    lines = conf.splitlines()
    assert "listener 1999 127.0.0.1" in lines
    assert "max_queued_messages 1000000" in lines
    assert "max_inflight_messages 0" in lines
    assert "set_tcp_nodelay true" in lines
    assert "persistence true" in lines
    assert f"persistence_location {tmp_path}/" in lines
    assert lines[-1] == "# extra line"
    assert "persistence false" in mosquitto_config(1999).splitlines()


async def test_threaded_amqtt_broker_serves_other_loops() -> None:
    """The session fallback: amqtt on its own loop in a thread, usable from this loop."""
    threaded = ThreadedEmbeddedBroker("amqtt")
    address = await asyncio.to_thread(threaded.start)
    try:
        assert (address.kind, address.protocol) == ("amqtt", "3.1.1")
        endpoint = BrokerEndpoint(address.host, address.port, "amqtt", "3.1.1")
        assert len(await qos1_round_trip(endpoint, count=5)) == 5
    finally:
        await asyncio.to_thread(threaded.stop)
    assert not port_accepts(address.host, address.port)


def test_session_broker_honours_env(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("MIDBRIDGE_TEST_BROKER", "192.0.2.7:2883")
    with session_broker(tmp_path) as address:
        assert address == BrokerAddress("192.0.2.7", 2883, "external", "5")
    monkeypatch.setenv("MIDBRIDGE_TEST_BROKER", "no-port")
    with pytest.raises(ValueError, match="host:port"), session_broker(tmp_path):
        pass


@pytest.mark.skipif(find_mosquitto() is None, reason="needs the mosquitto binary")
def test_session_broker_prefers_private_mosquitto(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    monkeypatch.delenv("MIDBRIDGE_TEST_BROKER", raising=False)
    with session_broker(tmp_path) as address:
        assert address.kind == "mosquitto"
        assert address.port != 1883
        assert port_accepts(address.host, address.port)
        assert "max_queued_messages 1000000" in (tmp_path / "mosquitto.conf").read_text()
    assert not port_accepts(address.host, address.port)


@pytest.mark.skipif(find_mosquitto() is None, reason="needs the mosquitto binary")
async def test_private_mosquitto_with_users_and_acl(
    mosquitto_factory: Callable[..., MosquittoServer],
) -> None:
    server = mosquitto_factory(
        users={"mid.user": "s3cret"}, acl="user mid.user\ntopic readwrite ecc/#\n"
    )
    assert "allow_anonymous false" in server.config_path.read_text()
    acks = AckTrackingStorage()
    client = gmqtt.Client(f"auth-{uuid.uuid4().hex[:8]}", persistent_storage=acks)
    acks.attach(client)
    client.set_auth_credentials("mid.user", "s3cret")
    await asyncio.wait_for(client.connect(server.host, server.port), TIMEOUT)
    try:
        await asyncio.wait_for(acks.publish(client, "ecc/a/input", b"ok"), TIMEOUT)
        with pytest.raises(PublishRefused):
            await asyncio.wait_for(acks.publish(client, "other/a/input", b"no"), TIMEOUT)
    finally:
        await client.disconnect()
    for user, password, ok in [("mid.user", "s3cret", True), ("mid.user", "wrong", False)]:
        client = gmqtt.Client(f"auth-{uuid.uuid4().hex[:8]}")
        client.set_auth_credentials(user, password)
        if ok:
            await asyncio.wait_for(client.connect(server.host, server.port), TIMEOUT)
            await client.disconnect()
        else:
            # mosquitto 2.0.11 answers a wrong password with 0x87 (not authorised), not 0x86
            with pytest.raises(gmqtt.MQTTConnectError, match=r"code 13[45]"):
                await asyncio.wait_for(client.connect(server.host, server.port), TIMEOUT)
            await client.disconnect()


def test_missing_mosquitto_is_a_clear_error(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    monkeypatch.setattr("tests.brokers.find_mosquitto", lambda: None)
    with pytest.raises(MosquittoNotFound, match=r"install.*mosquitto"):
        MosquittoServer(tmp_path)


async def test_async_tests_run_on_the_configured_loop() -> None:
    loop_module = type(asyncio.get_running_loop()).__module__
    if os.environ.get("MIDBRIDGE_TEST_LOOP", "uvloop").lower() == "uvloop":
        assert loop_module.startswith("uvloop"), loop_module
    else:
        assert loop_module.startswith("asyncio"), loop_module
