"""The transport interface: what the runtime and the connector use of a broker session.

Two transports implement it: MQTT 5 (:class:`bridge.wire.transport.MqttSession`, the
default) and NATS JetStream (:mod:`bridge.wire.nats_transport`). Whatever the transport,
addresses are the wire contract's topics (``<prefix>/<agent>/output``, ...): the NATS
sessions map them to subjects and back, so handlers, egress and status see one form.

- A message comes in as a :class:`Delivery`; its handler returns True once the work it
  carries is durable, and only then is the message acknowledged (an MQTT PUBACK, a
  JetStream ``+ACK``). False leaves it for redelivery.
- ``publish_start`` returns once the message is on its way, with a future that resolves
  when the broker has it (PUBACK, JetStream PubAck) or fails with
  :class:`bridge.wire.acks.PublishFailed` (then the caller sends it again).
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Protocol, Self

from bridge.wire.broker import BrokerConfig


@dataclass(frozen=True, slots=True)
class Delivery:
    topic: str
    payload: bytes
    dup: bool
    received_at: float
    # The broker's count of deliveries of this message (1: the first; MQTT does not count,
    # it says 2 for a redelivery), and whether it is the last the broker will make
    # (NATS ``max_deliver``): a last delivery is answered with an error, not run again.
    attempt: int = 1
    final: bool = False
    sent_at: float | None = None  # epoch seconds the broker stored it (NATS; MQTT: None)


# Returns True when the message may be acknowledged (its work is durable).
MessageHandler = Callable[[Delivery], Awaitable[bool]]


class Session(Protocol):
    """A connection to the broker with a life (``async with``) and a connected state."""

    @property
    def connected(self) -> asyncio.Event: ...

    async def __aenter__(self) -> Self: ...

    async def __aexit__(self, *exc: object) -> None: ...


class Publisher(Session, Protocol):
    """A session that publishes (results, status, output records)."""

    @property
    def cfg(self) -> BrokerConfig: ...

    @property
    def on_reconnect(self) -> list[Callable[[], None]]: ...

    async def publish_start(
        self, topic: str, payload: bytes, *, qos: int = 1, retain: bool = False
    ) -> asyncio.Future[None]: ...

    async def publish(
        self, topic: str, payload: bytes, *, qos: int = 1, retain: bool = False
    ) -> None: ...
