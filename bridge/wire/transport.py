"""One MQTT 5 session (gmqtt): connect, subscribe, receive with late acknowledgement, publish.

The MQTT side of the transport interface (``bridge.wire.session``; NATS JetStream:
``bridge.wire.nats_transport``).

Inbound QoS 1 messages are acknowledged only when the message handler says the work they
carry is safe (``optimistic_acknowledgement=False``). Three guards make that hold with
gmqtt 0.8 and Mosquitto 2.0 as they behave (tests/test_mqtt_client.py shows each):

- **No stale acknowledgements.** A PUBACK belongs to the connection its PUBLISH came on.
  A handler that finishes after a reconnect does not acknowledge (the broker redelivers
  that message and its new copy is acknowledged by its own handler): otherwise the old
  packet id could acknowledge a different message the broker has since sent with it.
  gmqtt sends whatever reason code the handler returns; we return ``_NO_ACK`` and drop
  that PUBACK before it is written.
- **Bounded intake whatever the broker does.** ``receive_maximum`` asks the broker for at
  most N unacknowledged messages, but Mosquitto 2.0.11 overshoots it when messages arrive
  quickly (measured: 15,000 handlers pending with a window of 1,000). When N handlers are
  pending we stop reading the socket until they drop below 90 %: TCP
  flow control holds the backlog in the broker, and our memory stays bounded.
- **Shutdown stops reconnects** even during a reconnect back-off.
- **Never deaf.** Every connect subscribes to the current topics, whether the broker
  resumed the session or not: a session resumed by a process started with another topic
  prefix or shared group would otherwise keep only the old subscriptions. MQTT cannot
  list a session's subscriptions, so with ``subscription_record`` (a file in the state
  directory) the client id and the topics subscribed last time are remembered: those no
  longer wanted are unsubscribed (they would deliver jobs meant for others, or
  duplicates), and the session of a client id no longer used is dropped.

``publish`` returns once the broker's PUBACK arrives (``AckTrackingStorage``); messages in
flight when the connection drops are resent by gmqtt. Persistent session (clean start
off, a session expiry), exponential reconnect back-off, username/password and TLS.
"""

from __future__ import annotations

import asyncio
import logging
import os
import ssl
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import gmqtt
import orjson
from gmqtt.mqtt.constants import MQTTv50, MQTTv311

from bridge.wire.acks import AckTrackingStorage
from bridge.wire.broker import BrokerConfig
from bridge.wire.errors import (
    BrokerConnectionRefused,
    BrokerNotAuthorised,
    BrokerRefused,
    BrokerUnreachable,
)
from bridge.wire.session import Delivery, MessageHandler

__all__ = ["Delivery", "MessageHandler", "MqttSession", "connect_error", "ssl_context"]

log = logging.getLogger("midbridge.transport")

# CONNACK / SUBACK reason codes that no retry will cure.
_REFUSALS = {
    4: "bad user name or password",
    5: "not authorised",
    0x86: "bad user name or password",
    0x87: "not authorised",
    0x8C: "bad authentication method",
}
CONNECT_TIMEOUT = 10.0  # seconds for TCP, TLS and CONNACK at a first connect
# A reason code gmqtt accepts from a handler; our hook never sends a PUBACK carrying it.
_NO_ACK = 0x80


def connect_error(exc: Exception, host: str, port: int) -> BrokerRefused:
    """A failed first connect, named: unreachable, refused (TCP reset), not authorised."""
    where = f"{host}:{port}"
    if isinstance(exc, ConnectionRefusedError):
        return BrokerConnectionRefused(
            f"the broker at {where} refused the TCP connection (nothing listens there?)",
            field="broker",
        )
    if isinstance(exc, TimeoutError):
        return BrokerUnreachable(
            f"cannot reach the broker at {where}: no answer within {CONNECT_TIMEOUT:g} s",
            field="broker",
        )
    if isinstance(exc, ssl.SSLError):
        return BrokerRefused(f"TLS with the broker at {where} failed: {exc}", field="broker")
    if isinstance(exc, OSError):
        cause = exc.strerror or str(exc) or type(exc).__name__
        return BrokerUnreachable(f"cannot reach the broker at {where}: {cause}", field="broker")
    code = getattr(exc, "_code", None)  # gmqtt's MQTTConnectError carries the CONNACK code
    if isinstance(code, int):
        reason = _REFUSALS.get(code, f"reason 0x{code:02x}")
        return BrokerNotAuthorised(
            f"the broker at {where} refused the connection: {reason}", field="broker"
        )
    return BrokerRefused(f"the broker at {where} refused the connection: {exc}", field="broker")


def ssl_context(cfg: BrokerConfig) -> ssl.SSLContext | bool:
    if not cfg.tls:
        return False
    ctx = ssl.create_default_context(cafile=str(cfg.ca_file) if cfg.ca_file else None)
    if cfg.cert_file:
        ctx.load_cert_chain(str(cfg.cert_file), str(cfg.key_file) if cfg.key_file else None)
    if cfg.tls_insecure:
        ctx.check_hostname = False
    return ctx


def _read_record(path: Path | None) -> tuple[str | None, list[str]]:
    """(client id, topics) of a subscription record; (None, []) when there is none or it
    is unreadable. A record of an older version is a bare list of topics."""
    if path is None:
        return None, []
    try:
        data = orjson.loads(path.read_bytes())
    except FileNotFoundError:
        return None, []
    except (OSError, orjson.JSONDecodeError) as exc:
        log.warning("ignoring unreadable subscription record %s: %s", path, exc)
        return None, []
    client_id = data.get("client_id") if isinstance(data, dict) else None
    topics = data.get("topics") if isinstance(data, dict) else data
    if not isinstance(topics, list) or not all(isinstance(t, str) for t in topics):
        log.warning("ignoring subscription record %s: not a list of topics", path)
        return None, []
    return (client_id if isinstance(client_id, str) and client_id else None), topics


def _write_record(path: Path, client_id: str, topics: Sequence[str]) -> None:
    """Replace the record atomically (a crash leaves the old one or the new one)."""
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_bytes(orjson.dumps({"client_id": client_id, "topics": sorted(set(topics))}))
    os.replace(tmp, path)


class _Client(gmqtt.Client):  # type: ignore[misc]
    """gmqtt's client, with a reconnect that honours ``disconnect()`` during its back-off."""

    async def reconnect(self, delay: bool = False) -> None:
        # gmqtt runs this as a fire-and-forget future and logs it if it ends cancelled.
        try:
            if delay:
                await asyncio.sleep(self._connection_state.config["reconnect_delay"])
            if not self._is_active:
                return
            await super().reconnect(delay=False)
        except asyncio.CancelledError:
            return


class MqttSession:
    """An async context manager around one gmqtt client."""

    def __init__(
        self,
        cfg: BrokerConfig,
        *,
        client_id: str,
        subscriptions: Sequence[str] = (),
        on_message: MessageHandler | None = None,
        receive_maximum: int = 1000,
        clean_start: bool = False,
        will: tuple[str, bytes] | None = None,
        subscription_record: Path | None = None,
        logger: logging.Logger | None = None,
    ) -> None:
        self.cfg = cfg
        self.client_id = client_id
        self.subscriptions = list(subscriptions)
        self._record = subscription_record
        recorded_id, recorded = _read_record(subscription_record)
        # A session made under another client id (the shared group, the instance name or
        # the broker user changed): it is dropped at connect, or it would keep its share.
        self._old_client_id = recorded_id if recorded_id not in (None, client_id) else None
        self._stale = [] if self._old_client_id else sorted(set(recorded) - set(subscriptions))
        self._unsubscribe_refused = False
        self._on_message = on_message
        self._log = logger or log
        self._acks = AckTrackingStorage()
        self.connected = asyncio.Event()
        self._failure: BrokerRefused | None = None
        self._backoff = cfg.reconnect_min
        self._subacks_seen = 0
        self._unsubacks_seen = 0
        self._suback_event = asyncio.Event()
        self._closing = False
        self._session_present = False
        self.generation = 0  # connections made so far; a PUBACK belongs to one of them
        self.on_reconnect: list[Callable[[], None]] = []  # called after every reconnect
        self.pending = 0  # handlers running
        self._pause_at = receive_maximum
        self._resume_at = max(1, receive_maximum * 9 // 10)
        self._room = asyncio.Event()  # set while intake has room: gmqtt may read
        self._room.set()
        self._keepalive_timer: asyncio.TimerHandle | None = None
        props: dict[str, Any] = {"receive_maximum": receive_maximum}
        if cfg.protocol == "5":
            props["session_expiry_interval"] = cfg.session_expiry
        will_message = None
        if will is not None:
            will_message = gmqtt.Message(will[0], will[1], qos=1, retain=True)
        self._client = _Client(
            client_id,
            clean_session=clean_start,
            optimistic_acknowledgement=False,
            will_message=will_message,
            persistent_storage=self._acks,
            logger=logging.getLogger("midbridge.gmqtt"),
            **props,
        )
        self._acks.attach(self._client)
        self._hook_puback()
        if cfg.username is not None:
            self._client.set_auth_credentials(cfg.username, cfg.password)
        self._client.set_config({"reconnect_retries": -1, "reconnect_delay": cfg.reconnect_min})
        self._client.on_connect = self._handle_connect
        self._client.on_disconnect = self._handle_disconnect
        self._client.on_message = self._handle_message
        self._client.on_subscribe = self._handle_subscribe
        self._client.on_unsubscribe = self._handle_unsubscribe

    def _hook_puback(self) -> None:
        """Drop the PUBACKs our handlers mark ``_NO_ACK`` (gmqtt 0.8 internals)."""
        handler = self._client._package_handler
        send_puback = handler._send_puback

        def guarded(mid: int, reason_code: int = 0) -> None:
            if reason_code != _NO_ACK:
                send_puback(mid, reason_code)

        handler._send_puback = guarded

    # --- gmqtt callbacks --------------------------------------------------------------

    def _handle_connect(self, client: Any, flags: int, rc: int, properties: Any) -> None:
        self.generation += 1
        self._gate_reads()
        if not self._room.is_set():
            self._schedule_keepalive()
        self._backoff = self.cfg.reconnect_min
        self._client.set_config({"reconnect_delay": self._backoff})
        self._session_present = bool(flags & 0x01)
        self.connected.set()
        self._log.info(
            "connected to %s:%s as %s (session %s)",
            self.cfg.host,
            self.cfg.port,
            self.client_id,
            "resumed" if self._session_present else "new",
        )
        # Subscribe on every connect, resumed session or not (gmqtt never resubscribes):
        # the session may be one an earlier process made with other topics.
        self._subacks_seen = 0
        self._unsubacks_seen = 0
        for topic in self.subscriptions:
            client.subscribe(topic, qos=1)
        for topic in self._stale:
            self._log.info("unsubscribing from %s (no longer configured)", topic)
            client.unsubscribe(topic)
        if self.generation > 1:
            for callback in self.on_reconnect:
                callback()

    def _handle_disconnect(self, client: Any, packet: Any, exc: Any = None) -> None:
        if self.connected.is_set() and not self._closing:
            self._log.warning("disconnected from broker; reconnecting")
        self.connected.clear()
        self._stop_keepalive_timer()
        self._backoff = min(self._backoff * 2, self.cfg.reconnect_max)
        self._client.set_config({"reconnect_delay": self._backoff})

    def _handle_subscribe(self, client: Any, mid: int, qos: Sequence[int], properties: Any) -> None:
        self._subacks_seen += 1
        self._suback_event.set()
        for code in qos:
            if code >= 0x80:
                self._failure = BrokerRefused(
                    f"subscription refused by the broker (reason 0x{code:02x}: "
                    f"{_REFUSALS.get(code, 'not authorised or invalid topic')})",
                    field="subscribe",
                )
                self._log.error("%s", self._failure)

    def _handle_unsubscribe(self, client: Any, mid: int, *args: Any) -> None:
        self._unsubacks_seen += 1
        codes = args[0] if args and isinstance(args[0], list | tuple) else ()
        if any(isinstance(code, int) and code >= 0x80 for code in codes):
            self._unsubscribe_refused = True
        self._suback_event.set()

    async def _handle_message(
        self, client: Any, topic: str, payload: bytes, qos: int, properties: dict[str, Any]
    ) -> int:
        if self._on_message is None:
            return 0
        generation = self.generation
        self.pending += 1
        if self.pending >= self._pause_at:
            self._pause_reading()
        try:
            delivery = Delivery(topic, payload, bool(properties.get("dup")), time.monotonic())
            safe = await self._on_message(delivery)
        except Exception:
            self._log.exception("message handler failed on %s", topic)
            safe = False
        finally:
            self.pending -= 1
            if self.pending <= self._resume_at:
                self._resume_reading()
        if not safe or generation != self.generation:
            return _NO_ACK
        return 0

    # --- flow control -----------------------------------------------------------------

    def _pause_reading(self) -> None:
        if not self._room.is_set():
            return
        self._room.clear()
        self._log.debug("intake full (%d pending): reading paused", self.pending)
        self._schedule_keepalive()

    def _resume_reading(self) -> None:
        if self._room.is_set():
            return
        self._room.set()
        self._stop_keepalive_timer()

    def _gate_reads(self) -> None:
        """Make gmqtt's read loop wait while intake is full (gmqtt 0.8 internals).

        gmqtt reads 64 KiB at a time from a StreamReader in its own loop. Holding that
        loop lets the reader's buffer fill, and the reader then pauses the socket itself:
        the backlog stays in the broker, never in our memory.
        """
        connection = self._client._connection
        protocol = getattr(connection, "_protocol", None)
        if protocol is None or getattr(protocol, "_midbridge_gated", False):
            return
        read = protocol.read
        room = self._room

        async def gated_read(n: int = -1) -> bytes:
            await room.wait()
            data: bytes = await read(n)
            return data

        protocol.read = gated_read
        protocol._midbridge_gated = True

    def _schedule_keepalive(self) -> None:
        # While we do not read, gmqtt would take the silence for a dead link after two
        # keep-alive periods; the link is alive, we chose not to read it.
        self._keepalive_timer = asyncio.get_running_loop().call_later(
            self.cfg.keepalive / 4, self._keepalive_tick
        )

    def _keepalive_tick(self) -> None:
        connection = self._client._connection
        if self._room.is_set() or connection is None:
            return
        connection._last_data_in = time.monotonic()
        self._schedule_keepalive()

    def _stop_keepalive_timer(self) -> None:
        if self._keepalive_timer is not None:
            self._keepalive_timer.cancel()
            self._keepalive_timer = None

    # --- lifecycle --------------------------------------------------------------------

    async def __aenter__(self) -> MqttSession:
        if self._old_client_id is not None:
            await self._drop_session(self._old_client_id)
        version = MQTTv50 if self.cfg.protocol == "5" else MQTTv311
        try:
            async with asyncio.timeout(CONNECT_TIMEOUT):
                await self._client.connect(
                    self.cfg.host,
                    self.cfg.port,
                    ssl=ssl_context(self.cfg),
                    keepalive=self.cfg.keepalive,
                    version=version,
                )
        except BaseException as exc:
            await self._abandon()
            if isinstance(exc, Exception):
                raise connect_error(exc, self.cfg.host, self.cfg.port) from None
            raise
        if self.subscriptions or self._stale:
            await self.check_subscriptions()
        return self

    async def _abandon(self) -> None:
        """After a failed first connect: no reconnect loop, no half-open socket left."""
        self._closing = True
        self._client._is_active = False
        try:
            await asyncio.wait_for(self._client.disconnect(), timeout=1.0)
        except Exception:
            self._log.debug("disconnect after a failed connect", exc_info=True)

    async def _drop_session(self, old_id: str) -> None:
        """Connect once as ``old_id`` with a clean start and no session expiry: the broker
        discards that session (its subscriptions and queue) and keeps none after it."""
        self._log.info("dropping the broker session of %s (now %s)", old_id, self.client_id)
        once = self.cfg.model_copy(update={"session_expiry": 0})
        try:
            async with MqttSession(once, client_id=old_id, clean_start=True, logger=self._log):
                pass
        except BrokerRefused as exc:
            self._log.warning(
                "could not drop the earlier session %s: %s; it keeps its subscriptions until "
                "the broker expires it (broker.session_expiry)",
                old_id,
                exc,
            )

    async def check_subscriptions(self, wait: float = 5.0) -> None:
        """Wait for every SUBACK and UNSUBACK; a refused subscription is fatal and named.

        Then the subscription record holds exactly the current topics.
        """

        def answered() -> bool:
            return (
                self._subacks_seen >= len(self.subscriptions)
                and self._unsubacks_seen >= len(self._stale)
            ) or self._failure is not None

        try:
            async with asyncio.timeout(wait):
                while not answered():
                    await self._suback_event.wait()
                    self._suback_event.clear()
        except TimeoutError:
            raise BrokerRefused(
                f"no SUBACK from the broker within {wait:.0f} s", field="subscribe"
            ) from None
        if self._failure is not None:
            raise self._failure
        if self._record is not None:
            kept = self._stale if self._unsubscribe_refused else []
            if kept:
                self._log.warning("the broker refused to unsubscribe %s; tried again at the "
                                  "next start", ", ".join(kept))  # fmt: skip
            _write_record(self._record, self.client_id, [*self.subscriptions, *kept])
        self._stale = []

    @property
    def subscribed(self) -> bool:
        """Connected, and every subscription of this connection acknowledged."""
        return (
            self.connected.is_set()
            and self._failure is None
            and self._subacks_seen >= len(self.subscriptions)
        )

    @property
    def failure(self) -> BrokerRefused | None:
        return self._failure

    async def __aexit__(self, *exc: object) -> None:
        self._closing = True
        self._stop_keepalive_timer()
        try:
            await asyncio.wait_for(self._client.disconnect(), timeout=2.0)
        except Exception:
            self._log.debug("disconnect did not complete cleanly", exc_info=True)

    # --- publishing -------------------------------------------------------------------

    def _publish_window(self) -> int:
        """Un-acknowledged publishes gmqtt allows before it raises OverflowError.

        gmqtt hands out at most ``max - 1`` packet ids, ``max`` being the broker's receive
        maximum from CONNACK (Mosquitto's default is 20); keep one spare for SUBSCRIBE.
        """
        id_max = int(self._client._package_handler.id_generator._max)
        return max(1, id_max - 2)

    async def publish_start(
        self, topic: str, payload: bytes, *, qos: int = 1, retain: bool = False
    ) -> asyncio.Future[None]:
        """Send as soon as the broker's window has room; the future resolves on PUBACK.

        It fails with ``PublishLost`` if gmqtt dropped the message (the broker had no
        session for us after a reconnect) or ``PublishRefused`` (an ACL said no).
        """
        await self._acks.wait_below(self._publish_window())
        return self._acks.publish(self._client, topic, payload, qos=qos, retain=retain)

    async def publish(
        self, topic: str, payload: bytes, *, qos: int = 1, retain: bool = False
    ) -> None:
        await (await self.publish_start(topic, payload, qos=qos, retain=retain))
