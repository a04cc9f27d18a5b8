"""What the bridge relies on in gmqtt 0.8 (MQTT 5), checked against a private mosquitto.

- Late acknowledgement: with ``optimistic_acknowledgement=False`` a QoS 1 message is
  acknowledged only when the async ``on_message`` returns a reason code (an int); a message
  whose handler is still running, returned None or raised is redelivered to the next
  connection of the same persistent session, with its original packet id and DUP set.
- ``receive_maximum`` in the CONNECT properties bounds the un-acknowledged messages the
  broker pushes.
- PUBACK notification through :class:`bridge.wire.acks.AckTrackingStorage`, across broker
  pauses, restarts and crashes; lost sessions and refused publishes are reported.
- gmqtt does not resubscribe after a reconnect: subscriptions survive only in the broker's
  session.
"""

from __future__ import annotations

import asyncio
import logging
import uuid
from collections.abc import Callable
from typing import Any

import gmqtt
import pytest
from gmqtt.mqtt.constants import MQTTv50

from bridge.wire.acks import AckTrackingStorage, PublishLost, PublishRefused
from tests.brokers import MosquittoServer

TIMEOUT = 10.0
SETTLE = 0.4  # time for messages that should NOT arrive to show up anyway


def new_topic() -> str:
    return f"t/{uuid.uuid4().hex}/jobs"


async def wait_until(predicate: Callable[[], bool], what: str, within: float = TIMEOUT) -> None:
    loop = asyncio.get_running_loop()
    deadline = loop.time() + within
    while not predicate():
        if loop.time() > deadline:
            raise AssertionError(f"timed out after {within:.0f} s waiting for {what}")
        await asyncio.sleep(0.01)


def collect_into(received: list[bytes]) -> Callable[..., int]:
    """A synchronous on_message that records the payload and acknowledges (returns 0)."""

    def on_message(client: Any, topic: str, payload: bytes, qos: int, props: Any) -> int:
        received.append(payload)
        return 0

    return on_message


async def connect(
    server: MosquittoServer, client_id: str, *, clean: bool = False, **kwargs: Any
) -> gmqtt.Client:
    kwargs.setdefault("session_expiry_interval", 300)
    client = gmqtt.Client(client_id, clean_session=clean, **kwargs)
    client.set_config({"reconnect_delay": 0.1})
    await asyncio.wait_for(client.connect(server.host, server.port, version=MQTTv50), TIMEOUT)
    return client


async def subscribe(client: gmqtt.Client, topic: str) -> None:
    granted: list[Any] = []
    client.on_subscribe = lambda c, mid, qos, props: granted.append(qos)
    client.subscribe(topic, qos=1)
    await wait_until(lambda: bool(granted), "SUBACK")
    assert tuple(granted[0]) == (1,), granted


async def publish_all(server: MosquittoServer, topic: str, payloads: list[bytes]) -> None:
    """Publish QoS 1 from a throwaway client and wait for every PUBACK."""
    acks = AckTrackingStorage()
    pub = await connect(server, f"pub-{uuid.uuid4().hex[:8]}", clean=True, persistent_storage=acks)
    try:
        futures = [acks.publish(pub, topic, p, qos=1) for p in payloads]
        await asyncio.wait_for(asyncio.gather(*futures), TIMEOUT)
    finally:
        await pub.disconnect()


def record_packet_ids(client: gmqtt.Client, into: dict[bytes, list[tuple[int, int]]]) -> None:
    """Record (packet id, dup) per payload of inbound QoS 1 messages (gmqtt hides the id)."""
    handler = client._package_handler
    original = handler._handle_qos_1_publish_packet

    def spy(mid: int, packet: bytes, topic: str, properties: dict[str, Any]) -> None:
        into.setdefault(bytes(packet), []).append((mid, int(properties["dup"])))
        original(mid, packet, topic, properties)

    handler._handle_qos_1_publish_packet = spy


async def drop_connection(client: gmqtt.Client) -> None:
    """Close the TCP connection without an MQTT DISCONNECT (as a crashed process's kernel
    would), and keep gmqtt from reconnecting. A FIN rather than a RST: the broker reads every
    PUBACK written before it."""
    client._connection._transport.close()
    await client.disconnect()  # stops gmqtt's reconnect; its DISCONNECT goes nowhere


# --- a. late acknowledgement and redelivery --------------------------------------------


async def test_unacknowledged_messages_are_redelivered_to_the_next_connection(
    private_broker: MosquittoServer, caplog: pytest.LogCaptureFixture
) -> None:
    topic = new_topic()
    client_id = f"sub-{uuid.uuid4().hex[:8]}"
    # index % 4: 0 returns 0 (acked), 1 still running, 2 returns None, 3 raises
    payloads = [f"m{i}".encode() for i in range(16)]
    expect_redelivered = {p for i, p in enumerate(payloads) if i % 4 != 0}
    release = asyncio.Event()
    first: list[bytes] = []
    first_ids: dict[bytes, list[tuple[int, int]]] = {}

    async def on_message_first(
        client: Any, t: str, payload: bytes, qos: int, props: Any
    ) -> int | None:
        first.append(payload)
        kind = int(payload[1:]) % 4
        if kind == 1:
            await release.wait()
        elif kind == 2:
            return None
        elif kind == 3:
            raise RuntimeError("handler failed")
        return 0

    sub = await connect(private_broker, client_id, optimistic_acknowledgement=False)
    record_packet_ids(sub, first_ids)
    sub.on_message = on_message_first
    second: list[bytes] = []
    second_ids: dict[bytes, list[tuple[int, int]]] = {}
    sub2: gmqtt.Client | None = None
    try:
        await subscribe(sub, topic)
        await publish_all(private_broker, topic, payloads)
        await wait_until(lambda: len(first) == len(payloads), "first deliveries")
        await asyncio.sleep(SETTLE)  # the PUBACKs that were sent reach the broker
        await drop_connection(sub)

        # Handlers finishing after the connection is gone: gmqtt writes their PUBACK to
        # the dead socket, logs a warning, and does not keep it for the next connection.
        caplog.clear()
        with caplog.at_level(logging.WARNING, logger="gmqtt"):
            release.set()
            await asyncio.sleep(0.05)
        assert "TRYING WRITE TO CLOSED SOCKET" in caplog.text

        flags: list[int] = []

        async def on_message_second(
            client: Any, t: str, payload: bytes, qos: int, props: Any
        ) -> int:
            second.append(payload)
            return 0

        sub2 = gmqtt.Client(
            client_id,
            clean_session=False,
            optimistic_acknowledgement=False,
            session_expiry_interval=300,
        )
        record_packet_ids(sub2, second_ids)
        sub2.on_message = on_message_second
        sub2.on_connect = lambda c, f, rc, p: flags.append(f)
        # no subscribe: the subscription lives in the broker's session
        await asyncio.wait_for(
            sub2.connect(private_broker.host, private_broker.port, version=MQTTv50), TIMEOUT
        )
        assert flags == [1], "session not present"
        await wait_until(lambda: len(second) >= len(expect_redelivered), "redeliveries")
        await asyncio.sleep(SETTLE)
        assert sorted(second) == sorted(expect_redelivered)
        for payload in expect_redelivered:
            ((old_id, old_dup),) = first_ids[payload]
            ((new_id, new_dup),) = second_ids[payload]
            assert (old_dup, new_dup) == (0, 1), payload
            assert new_id == old_id, f"{payload!r}: packet id {old_id} -> {new_id}"
    finally:
        release.set()
        await sub.disconnect()
        if sub2 is not None:
            await sub2.disconnect()

    # everything was acknowledged by the second connection: a third gets nothing
    third: list[bytes] = []
    sub3 = await connect(private_broker, client_id)
    sub3.on_message = collect_into(third)
    await asyncio.sleep(SETTLE)
    await sub3.disconnect()
    assert third == []


async def test_receive_maximum_bounds_unacknowledged_deliveries(
    private_broker: MosquittoServer,
) -> None:
    topic = new_topic()
    limit, total = 10, 500
    release = asyncio.Event()
    received: list[bytes] = []
    running = 0
    most_running = 0

    async def on_message(client: Any, t: str, payload: bytes, qos: int, props: Any) -> int:
        nonlocal running, most_running
        received.append(payload)
        running += 1
        most_running = max(most_running, running)
        try:
            await release.wait()
        finally:
            running -= 1
        return 0

    sub = await connect(
        private_broker,
        f"sub-{uuid.uuid4().hex[:8]}",
        clean=True,
        optimistic_acknowledgement=False,
        receive_maximum=limit,
    )
    sub.on_message = on_message
    try:
        await subscribe(sub, topic)
        await publish_all(private_broker, topic, [f"m{i}".encode() for i in range(total)])
        await wait_until(lambda: len(received) >= limit, f"{limit} deliveries")
        await asyncio.sleep(SETTLE)
        assert len(received) == limit, "broker pushed past receive_maximum"
        release.set()
        await wait_until(lambda: len(received) >= total, "all deliveries")
        await asyncio.sleep(0.1)
        assert sorted(received) == sorted(f"m{i}".encode() for i in range(total))
        assert most_running == limit
    finally:
        release.set()
        await sub.disconnect()


# --- c. PUBACK notification through AckTrackingStorage ----------------------------------


async def test_publish_future_resolves_only_after_puback(private_broker: MosquittoServer) -> None:
    acks = AckTrackingStorage()
    pub = await connect(private_broker, f"pub-{uuid.uuid4().hex[:8]}", persistent_storage=acks)
    acks.attach(pub)
    topic = new_topic()
    try:
        await asyncio.wait_for(acks.publish(pub, topic, b"first"), TIMEOUT)
        assert acks.pending == 0

        private_broker.pause()  # no PUBACK while stopped
        futures = [acks.publish(pub, topic, f"p{i}".encode()) for i in range(5)]
        pub.publish(topic, b"via client", qos=1)
        futures.append(acks.last_future())
        assert len(set(map(id, futures))) == 6
        await asyncio.sleep(SETTLE)
        assert not any(f.done() for f in futures)
        assert acks.pending == 6
        with pytest.raises(TimeoutError):
            await asyncio.wait_for(acks.wait_below(1), 0.1)

        private_broker.resume()
        await asyncio.wait_for(asyncio.gather(*futures), TIMEOUT)
        await asyncio.wait_for(acks.wait_below(1), TIMEOUT)
        assert acks.pending == 0
        assert acks.publish(pub, topic, b"qos0", qos=0).done()
    finally:
        private_broker.resume()
        await pub.disconnect()


async def _persistent_subscriber(server: MosquittoServer, topic: str) -> str:
    """Create a persistent session subscribed to ``topic`` and leave it offline."""
    client_id = f"sub-{uuid.uuid4().hex[:8]}"
    sub = await connect(server, client_id)
    await subscribe(sub, topic)
    await sub.disconnect()
    return client_id


async def _drain_session(server: MosquittoServer, client_id: str, expected: int) -> list[bytes]:
    received: list[bytes] = []
    sub = gmqtt.Client(client_id, clean_session=False, session_expiry_interval=300)
    sub.on_message = collect_into(received)
    await asyncio.wait_for(sub.connect(server.host, server.port, version=MQTTv50), TIMEOUT)
    try:
        await wait_until(lambda: len(received) >= expected, f"{expected} queued messages")
        await asyncio.sleep(0.1)
    finally:
        await sub.disconnect()
    return received


async def test_publishes_made_while_broker_down_are_resent_after_restart(
    private_broker: MosquittoServer,
) -> None:
    topic = new_topic()
    sub_id = await _persistent_subscriber(private_broker, topic)
    acks = AckTrackingStorage()
    flags: list[int] = []
    pub = await connect(private_broker, f"pub-{uuid.uuid4().hex[:8]}", persistent_storage=acks)
    acks.attach(pub)
    pub.on_connect = lambda c, f, rc, p: flags.append(f)
    before = [f"before{i}".encode() for i in range(10)]
    during = [f"during{i}".encode() for i in range(10)]
    try:
        await asyncio.wait_for(asyncio.gather(*(acks.publish(pub, topic, p) for p in before)), 5)

        private_broker.stop()  # clean exit: sessions and queued messages saved
        await wait_until(lambda: not pub.is_connected, "client to see the broker gone")
        futures = [acks.publish(pub, topic, p) for p in during]
        await asyncio.sleep(SETTLE)
        assert not any(f.done() for f in futures)

        private_broker.start()
        await asyncio.wait_for(asyncio.gather(*futures), TIMEOUT)
        assert flags == [1], "gmqtt reconnected without its session"
    finally:
        await pub.disconnect()
    received = await _drain_session(private_broker, sub_id, len(before) + len(during))
    assert set(received) == set(before) | set(during)


async def test_in_flight_publishes_are_resent_after_broker_crash(
    private_broker: MosquittoServer,
) -> None:
    topic = new_topic()
    sub_id = await _persistent_subscriber(private_broker, topic)
    acks = AckTrackingStorage()
    pub = await connect(private_broker, f"pub-{uuid.uuid4().hex[:8]}", persistent_storage=acks)
    acks.attach(pub)
    payloads = [f"inflight{i}".encode() for i in range(10)]
    try:
        private_broker.checkpoint()  # both sessions are on disk
        private_broker.pause()
        futures = [acks.publish(pub, topic, p) for p in payloads]
        await asyncio.sleep(SETTLE)
        assert not any(f.done() for f in futures)
        private_broker.kill()  # the PUBLISHes die unread in the broker's socket
        private_broker.start()
        await asyncio.wait_for(asyncio.gather(*futures), TIMEOUT)
    finally:
        await pub.disconnect()
    received = await _drain_session(private_broker, sub_id, len(payloads))
    assert set(received) == set(payloads)


async def test_lost_session_fails_futures_and_frees_packet_ids(
    mosquitto_factory: Callable[..., MosquittoServer],
) -> None:
    server = mosquitto_factory(persistence=False)  # a restart forgets every session
    topic = new_topic()
    attached, plain = AckTrackingStorage(), AckTrackingStorage()
    pub_a = await connect(server, f"pub-{uuid.uuid4().hex[:8]}", persistent_storage=attached)
    attached.attach(pub_a)
    pub_b = await connect(server, f"pub-{uuid.uuid4().hex[:8]}", persistent_storage=plain)
    try:
        server.stop()
        await wait_until(
            lambda: not pub_a.is_connected and not pub_b.is_connected, "clients to see it gone"
        )
        lost_a = [attached.publish(pub_a, topic, b"x") for _ in range(5)]
        lost_b = [plain.publish(pub_b, topic, b"x") for _ in range(5)]
        ids_b = set(pub_b._package_handler.id_generator._used_ids)
        assert len(ids_b) == 5
        server.start()
        for future in lost_a + lost_b:
            with pytest.raises(PublishLost):
                await asyncio.wait_for(future, TIMEOUT)
        # gmqtt dropped the packets unsent; without attach() it also keeps their ids busy
        assert pub_a._package_handler.id_generator._used_ids == set()
        assert pub_b._package_handler.id_generator._used_ids == ids_b
        await wait_until(lambda: pub_a.is_connected, "reconnect")
        await asyncio.wait_for(attached.publish(pub_a, topic, b"after"), TIMEOUT)
    finally:
        await pub_a.disconnect()
        await pub_b.disconnect()


async def test_refused_publish_fails_with_reason_code(
    mosquitto_factory: Callable[..., MosquittoServer],
) -> None:
    server = mosquitto_factory(acl="topic readwrite allowed/#\n")
    attached, plain = AckTrackingStorage(), AckTrackingStorage()
    pub_a = await connect(server, f"pub-{uuid.uuid4().hex[:8]}", persistent_storage=attached)
    attached.attach(pub_a)
    pub_b = await connect(server, f"pub-{uuid.uuid4().hex[:8]}", persistent_storage=plain)
    try:
        await asyncio.wait_for(attached.publish(pub_a, "allowed/x", b"ok"), TIMEOUT)
        with pytest.raises(PublishRefused) as refused:
            await asyncio.wait_for(attached.publish(pub_a, "denied/x", b"no"), TIMEOUT)
        assert refused.value.reason_code == 0x87  # not authorised
        # gmqtt alone reports the refused publish as acknowledged
        await asyncio.wait_for(plain.publish(pub_b, "denied/x", b"no"), TIMEOUT)
    finally:
        await pub_a.disconnect()
        await pub_b.disconnect()


# --- subscriptions across reconnects ----------------------------------------------------


@pytest.mark.parametrize("persistence", [True, False], ids=["session-kept", "session-lost"])
async def test_gmqtt_does_not_resubscribe_after_reconnect(
    mosquitto_factory: Callable[..., MosquittoServer], persistence: bool
) -> None:
    server = mosquitto_factory(persistence=persistence)
    topic = new_topic()
    flags: list[int] = []
    received: list[bytes] = []
    sub = await connect(server, f"sub-{uuid.uuid4().hex[:8]}")
    sub.on_connect = lambda c, f, rc, p: flags.append(f)
    sub.on_message = collect_into(received)
    try:
        await subscribe(sub, topic)
        server.restart()
        await wait_until(lambda: bool(flags), "reconnect")
        assert flags == [1 if persistence else 0]
        assert [s.topic for s in sub.subscriptions] == [topic]  # remembered, not resent
        await publish_all(server, topic, [b"after restart"])
        if persistence:
            await wait_until(lambda: bool(received), "delivery through the kept session")
        else:
            await asyncio.sleep(SETTLE)
        assert received == ([b"after restart"] if persistence else [])
    finally:
        await sub.disconnect()


# --- hazards the transport must guard against (these tests fail if gmqtt changes) -------


async def test_late_puback_after_session_loss_acknowledges_another_message(
    mosquitto_factory: Callable[..., MosquittoServer],
) -> None:
    """A handler that finishes after gmqtt reconnected to a *fresh* session sends its PUBACK,
    with the old packet id, on the new connection: the broker takes it as the ack of
    whichever new message now has that id, so a crash before that message is handled loses
    it. (With the session present the id still names the same message: harmless.)"""
    server = mosquitto_factory(persistence=False)  # the restart loses the session
    topic = new_topic()
    client_id = f"sub-{uuid.uuid4().hex[:8]}"
    release = {b"old": asyncio.Event(), b"new": asyncio.Event()}
    ids: dict[bytes, list[tuple[int, int]]] = {}
    flags: list[int] = []
    received: list[bytes] = []

    async def on_message(client: Any, t: str, payload: bytes, qos: int, props: Any) -> int:
        received.append(payload)
        await release[payload].wait()
        return 0

    def on_connect(client: Any, session_present: int, rc: int, props: Any) -> None:
        flags.append(session_present)
        if not session_present:
            client.subscribe(topic, qos=1)

    sub = gmqtt.Client(
        client_id,
        clean_session=False,
        optimistic_acknowledgement=False,
        session_expiry_interval=300,
    )
    sub.set_config({"reconnect_delay": 0.1})
    record_packet_ids(sub, ids)
    sub.on_message = on_message
    sub.on_connect = on_connect
    await asyncio.wait_for(sub.connect(server.host, server.port, version=MQTTv50), TIMEOUT)
    try:
        await wait_until(
            lambda: bool(sub.subscriptions) and sub.subscriptions[0].acknowledged, "SUBACK"
        )
        await publish_all(server, topic, [b"old"])
        await wait_until(lambda: received == [b"old"], "old message")
        server.restart()
        await wait_until(lambda: len(flags) == 2, "reconnect")
        assert flags == [0, 0]
        # gmqtt appends the repeated subscription to its list rather than replacing it
        await wait_until(
            lambda: len(sub.subscriptions) == 2 and sub.subscriptions[1].acknowledged,
            "new SUBACK",
        )
        await publish_all(server, topic, [b"new"])
        await wait_until(lambda: received == [b"old", b"new"], "new message")
        assert ids[b"old"][0][0] == ids[b"new"][0][0], "ids differ: no collision to show"
        release[b"old"].set()  # the stale PUBACK goes out now
        await asyncio.sleep(SETTLE)
        await drop_connection(sub)  # "crash" while b"new" is still being handled
    finally:
        for event in release.values():
            event.set()
        await sub.disconnect()
    after: list[bytes] = []
    sub2 = await connect(server, client_id)
    sub2.on_message = collect_into(after)
    await asyncio.sleep(SETTLE)
    await sub2.disconnect()
    assert after == [], "b'new' was redelivered: stale PUBACKs no longer mis-acknowledge"


async def test_disconnect_during_reconnect_backoff_leaves_a_connected_client(
    private_broker: MosquittoServer,
) -> None:
    """gmqtt's reconnect checks "still wanted?" before its backoff sleep, not after: a
    ``disconnect()`` during the sleep is undone by a reconnect moments later."""
    client = await connect(private_broker, f"zombie-{uuid.uuid4().hex[:8]}")
    client.set_config({"reconnect_delay": 0.5})
    try:
        private_broker.stop()
        await wait_until(lambda: not client.is_connected, "client to see the broker gone")
        private_broker.start()
        await client.disconnect()
        await wait_until(lambda: client.is_connected, "the zombie reconnect", within=5.0)
    finally:
        await client.disconnect()  # now no reconnect is pending: this one sticks
    await asyncio.sleep(0.8)
    assert not client.is_connected
