"""The NATS JetStream transport: the sessions of :mod:`bridge.wire.session` on NATS.

Streams, subjects and names: :mod:`bridge.wire.nats_names`; the connection and the stream
and consumer settings: :mod:`bridge.wire.nats_link`; the contract: docs/wire-contract.md.

- :class:`NatsPull` takes a pull consumer's messages into a handler. It asks for at most
  ``window`` messages minus those its handlers hold (one pull request at a time, renewed
  every ``broker.nats.pull_expires`` seconds, when it is filled, and after a reconnect),
  so a process never holds more than its window whatever the stream's backlog. A message
  is acknowledged (``+ACK``) only when its handler returns True (its work is durable); a
  False (stopping, not stored) is a ``-NAK`` with a short delay, and it goes to whichever
  member of the cluster pulls next. While a handler runs longer than a third of
  ``ack_wait``, ``+WPI`` (in progress) keeps the message from being delivered again; a
  process that dies stops sending them, and its messages go again after ``ack_wait``.
  The delivery that ``max_deliver`` makes the last is marked ``final``: it is answered
  with an error record, not run (a job that kills its bridges must not kill them all).
- :class:`NatsIntake` is one of a bridge's intake sessions (bulk or interactive) on the
  MID's jobs stream: a durable consumer that every bridge of the MID shares.
- :class:`NatsPublisher` is the bridge's ``out`` session: results go to the inputs stream
  with ``Nats-Msg-Id`` = the sys_id of the message's (first) record, so a message the
  outbox publishes again within ``duplicate_window`` is dropped by the stream; the status
  record goes to the status stream (the last one per subject is kept, as a retained MQTT
  message is). NATS has no last will: see :class:`NatsPlatformSession`.
- :class:`NatsPlatformSession` is the platform's side (the connector, ``EccClient``):
  publishes output records (making a MID's jobs stream on first use), takes input records
  from a consumer of the inputs stream, and, for the connector, the status records. An
  agent whose status subject stays silent for ``broker.nats.status_timeout`` seconds is
  handed to the handler as its last status record with ``"status": "Down"``: what an
  MQTT broker does with the last will. Several bridges of one MID share the subject, so the
  MID is Down only when the last of them has gone quiet.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from typing import Self

import orjson
from nats.aio.msg import Msg
from nats.aio.subscription import Subscription
from nats.js.api import ConsumerConfig

from bridge.wire.acks import PublishLost
from bridge.wire.broker import BrokerConfig
from bridge.wire.nats_link import (
    MSG_ID,
    NatsLink,
    inputs_config,
    jobs_config,
    msg_id,
    pull_consumer,
    status_config,
)
from bridge.wire.nats_names import (
    agent_of,
    inputs_stream,
    jobs_stream,
    name_of,
    status_stream,
    subject_of,
    topic_of,
)
from bridge.wire.session import Delivery, MessageHandler

log = logging.getLogger("midbridge.nats")

_ACK_PREFIX = "$JS.ACK."
_NEXT = "$JS.API.CONSUMER.MSG.NEXT.{stream}.{consumer}"
_GRACE = 1.0  # seconds past a pull request's expiry before it counts as lost
_NAK_DELAY = 1.0  # seconds before a message refused by its handler goes again
_STOP_GRACE = 5.0  # seconds stopping waits for handlers to end (and acknowledge)


_topic_of = functools.lru_cache(maxsize=4096)(topic_of)  # a few subjects, many messages


def ack_facts(reply: str) -> tuple[int, float]:
    """(delivery count, epoch seconds the stream stored it) from a JetStream ack subject:
    ``$JS.ACK.<stream>.<consumer>.<delivered>.<sseq>.<dseq>.<ns>.<pending>``, or the form
    with a domain and an account hash before the stream (two tokens more, one after)."""
    tokens = reply.split(".")
    at = 4 if len(tokens) == 9 else 6
    return int(tokens[at]), int(tokens[at + 3]) / 1e9


@dataclass(slots=True)
class _Request:
    reply: str
    remaining: int
    deadline: float


class NatsPull:
    """One pull consumer's messages into ``on_message``, at most ``window`` held at once."""

    def __init__(
        self,
        link: NatsLink,
        *,
        stream: str,
        consumer: ConsumerConfig,
        on_message: MessageHandler,
        window: int,
        logger: logging.Logger | None = None,
    ) -> None:
        self.link = link
        self.stream = stream
        self.consumer = consumer
        self.window = max(1, window)
        self._min_batch = max(1, self.window // 8)
        self._on_message = on_message
        self._max_deliver = consumer.max_deliver or -1
        self._log = logger or log
        self.handling = 0  # messages handed to handlers, not yet acknowledged
        self._held: dict[str, tuple[Msg, float]] = {}  # ack subject → (message, since)
        self._request: _Request | None = None
        self._wake = asyncio.Event()
        self._tasks: set[asyncio.Task[None]] = set()
        self._name = consumer.durable_name or consumer.name or ""
        self._remake = False  # the consumer seems gone: make it again before pulling
        self._pause_until = 0.0
        self._inbox = ""
        self._sub: Subscription | None = None
        self._pump_task: asyncio.Task[None] | None = None
        self._alive_task: asyncio.Task[None] | None = None

    async def start(self) -> None:
        self._name = await self.link.ensure_consumer(self.stream, self.consumer)
        nc = self.link.nc
        self._inbox = nc.new_inbox()
        self._sub = await nc.subscribe(self._inbox + ".*", cb=self._on_msg)
        self.link.on_reconnect.append(self._reconnected)
        self._pump_task = asyncio.create_task(self._pump(), name=f"nats-pull-{self._name}")
        self._alive_task = asyncio.create_task(self._keep_alive(), name=f"nats-wpi-{self._name}")

    @property
    def started(self) -> bool:
        return self._pump_task is not None

    async def stop(self) -> None:
        """Pull no more; give running handlers a moment to acknowledge, cancel the rest."""
        for task in (self._pump_task, self._alive_task):
            if task is not None:
                task.cancel()
        with contextlib.suppress(ValueError):
            self.link.on_reconnect.remove(self._reconnected)
        if self._tasks:
            _done, pending = await asyncio.wait(set(self._tasks), timeout=_STOP_GRACE)
            for task in pending:
                task.cancel()
            await asyncio.gather(*pending, return_exceptions=True)
        sub = self._sub
        if sub is not None:
            self._sub = None
            with contextlib.suppress(Exception):
                await sub.unsubscribe()

    def _reconnected(self) -> None:
        self._request = None  # the server forgot it with the old connection
        self._wake.set()

    # --- pulling -------------------------------------------------------------------------

    async def _pump(self) -> None:
        loop = asyncio.get_running_loop()
        expires = self.link.cfg.nats.pull_expires
        seq = 0
        while True:
            self._wake.clear()  # before looking: a wake-up while we look is kept
            await self.link.connected.wait()
            now = loop.time()
            if now < self._pause_until:
                await asyncio.sleep(self._pause_until - now)
                continue
            if self._remake and not await self._make_again():
                continue
            request = self._request
            if request is not None and (request.remaining <= 0 or now >= request.deadline):
                request = self._request = None
            room = self.window - self.handling
            if request is None and room > 0 and (room >= self._min_batch or not self.handling):
                seq += 1
                request = _Request(f"{self._inbox}.{seq}", room, now + expires + _GRACE)
                self._request = request
                body = orjson.dumps({"batch": room, "expires": int(expires * 1e9)})
                subject = _NEXT.format(stream=self.stream, consumer=self._name)
                try:
                    await self.link.nc.publish(subject, body, reply=request.reply)
                except Exception as exc:
                    self._log.debug("pull request on %s failed: %s", self._name, exc)
                    self._request = None
                    self._pause_until = loop.time() + 0.2
                    continue
            wait = None if request is None else max(0.0, request.deadline - loop.time())
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(wait):
                    await self._wake.wait()

    async def _make_again(self) -> bool:
        try:
            self._name = await self.link.ensure_consumer(self.stream, self.consumer)
        except Exception as exc:
            self._log.warning("consumer %s on %s: %s; trying again", self._name, self.stream, exc)
            self._pause_until = asyncio.get_running_loop().time() + 1.0
            return False
        self._remake = False
        return True

    async def _on_msg(self, msg: Msg) -> None:
        """The subscription's callback: a job is handed to a task; a status ends a request."""
        if msg.reply and msg.reply.startswith(_ACK_PREFIX):
            request = self._request
            if request is not None:
                request.remaining -= 1
                if request.remaining <= 0:
                    self._wake.set()
            self.handling += 1
            task = asyncio.create_task(self._handle(msg))
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)
            return
        headers = msg.headers or {}
        status = headers.get("Status", "")
        if status == "100":  # an idle heartbeat
            return
        request = self._request
        if request is not None and msg.subject == request.reply:
            self._request = None
        if status in ("409", "503"):
            description = headers.get("Description", "")
            self._log.debug("pull on %s: %s %s", self._name, status, description)
            self._pause_until = asyncio.get_running_loop().time() + 0.5
            if status == "503" or "deleted" in description.lower():
                self._remake = True
        self._wake.set()

    async def _handle(self, msg: Msg) -> None:
        key = msg.reply
        self._held[key] = (msg, asyncio.get_running_loop().time())
        safe = False
        try:
            attempt, sent_at = ack_facts(key)
            delivery = Delivery(
                _topic_of(msg.subject),
                msg.data,
                attempt > 1,
                time.monotonic(),
                attempt=attempt,
                final=0 < self._max_deliver <= attempt,
                sent_at=sent_at,
            )
            safe = await self._on_message(delivery)
        except asyncio.CancelledError:
            safe = False  # the job was cancelled (a stop): it goes again
        except Exception:
            self._log.exception("message handler failed on %s", msg.subject)
        finally:
            self._held.pop(key, None)
            self.handling -= 1
            self._room_made()
        try:
            if safe:
                await msg.ack()
            else:
                await msg.nak(delay=_NAK_DELAY)
        except Exception as exc:  # the connection is gone: the server delivers it again
            self._log.debug("acknowledgement on %s not sent: %s", self._name, exc)

    def _room_made(self) -> None:
        """Wake the pump only when it would ask for more (not at every message)."""
        if self._request is None and (
            self.window - self.handling >= self._min_batch or not self.handling
        ):
            self._wake.set()

    async def _keep_alive(self) -> None:
        """``+WPI`` for every message held longer than a third of ``ack_wait``."""
        period = max(0.5, self.link.cfg.nats.ack_wait / 3)
        loop = asyncio.get_running_loop()
        while True:
            await asyncio.sleep(period)
            if not self.link.connected.is_set():
                continue
            now = loop.time()
            for msg, since in list(self._held.values()):
                if now - since >= period:
                    try:
                        await msg.in_progress()
                    except Exception:
                        break


def _max_ack_pending(cfg: BrokerConfig, window: int) -> int:
    return cfg.nats.max_ack_pending or window * 8


class NatsIntake:
    """A bridge's intake on NATS: the bulk or the interactive jobs of its MID."""

    def __init__(
        self,
        link: NatsLink,
        *,
        prefix: str,
        agent: str,
        express: bool,
        on_message: MessageHandler,
        window: int,
        logger: logging.Logger | None = None,
    ) -> None:
        self.link = link
        self.prefix = prefix
        self.agent = agent
        topic = f"{prefix}/{agent}/output" + ("/interactive" if express else "")
        cfg = link.cfg
        self.topic = topic
        self.pull = NatsPull(
            link,
            stream=jobs_stream(prefix, agent),
            consumer=pull_consumer(
                cfg,
                topic,
                durable="express" if express else "bulk",
                max_ack_pending=_max_ack_pending(cfg, window),
                max_deliver=cfg.nats.max_deliver,
            ),
            on_message=on_message,
            window=window,
            logger=logger,
        )

    @property
    def connected(self) -> asyncio.Event:
        return self.link.connected

    async def __aenter__(self) -> Self:
        await self.link.open()
        try:
            await self.link.ensure_stream(jobs_config(self.link.cfg, self.prefix, self.agent))
            await self.pull.start()
        except BaseException:
            await self.link.close()
            raise
        return self

    async def __aexit__(self, *exc: object) -> None:
        try:
            await self.pull.stop()
        finally:
            await self.link.close()


class _LinkSession:
    """What a publishing session on a :class:`NatsLink` shows (``session.Publisher``)."""

    def __init__(self, link: NatsLink, *, prefix: str) -> None:
        self.link = link
        self.prefix = prefix

    @property
    def cfg(self) -> BrokerConfig:
        return self.link.cfg

    @property
    def connected(self) -> asyncio.Event:
        return self.link.connected

    @property
    def on_reconnect(self) -> list[Callable[[], None]]:
        return self.link.on_reconnect

    async def publish_start(
        self, topic: str, payload: bytes, *, qos: int = 1, retain: bool = False
    ) -> asyncio.Future[None]:
        raise NotImplementedError

    async def publish(
        self, topic: str, payload: bytes, *, qos: int = 1, retain: bool = False
    ) -> None:
        await (await self.publish_start(topic, payload, qos=qos, retain=retain))


class NatsPublisher(_LinkSession):
    """A bridge's ``out`` session on NATS: results and the status record."""

    async def __aenter__(self) -> Self:
        await self.link.open()
        try:
            await self.link.ensure_stream(inputs_config(self.link.cfg, self.prefix))
            await self.link.ensure_stream(status_config(self.link.cfg, self.prefix))
        except BaseException:
            await self.link.close()
            raise
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.link.close()

    async def publish_start(
        self, topic: str, payload: bytes, *, qos: int = 1, retain: bool = False
    ) -> asyncio.Future[None]:
        """Sent at once; the future resolves on JetStream's acknowledgement (``retain`` and
        ``qos`` have no meaning here: the status stream keeps the last record anyway)."""
        headers = None
        if topic.endswith("/input"):
            found = msg_id(payload)
            headers = {MSG_ID: found} if found else None
        return asyncio.ensure_future(self.link.publish(subject_of(topic), payload, headers))


@dataclass(slots=True)
class _Seen:
    """The last status record of one agent, and when it was sent."""

    body: bytes
    at: float
    down: bool  # it says Down, or Down was reported for it already


def _is_down(body: bytes) -> bool:
    try:
        data = orjson.loads(body)
    except orjson.JSONDecodeError:
        return True  # nothing to report Down with
    return not isinstance(data, dict) or data.get("status") == "Down"


def down_record(body: bytes) -> bytes | None:
    """The status record ``body`` saying Down (None if it is not a JSON object)."""
    try:
        data = orjson.loads(body)
    except orjson.JSONDecodeError:
        return None
    if not isinstance(data, dict):
        return None
    return orjson.dumps({**data, "status": "Down", "updated_at": time.time()})


class NatsPlatformSession(_LinkSession):
    """The platform's session on NATS: outputs out, inputs (and status records) in."""

    def __init__(
        self,
        cfg: BrokerConfig,
        *,
        client_id: str,
        prefix: str,
        on_message: MessageHandler,
        agent: str | None = None,
        status: bool = False,
        durable: bool = True,
        receive_maximum: int = 1000,
        logger: logging.Logger | None = None,
    ) -> None:
        super().__init__(NatsLink(cfg, name=client_id, logger=logger), prefix=prefix)
        self._log = logger or log
        self._on_message = on_message
        name = name_of(client_id)
        if not durable:
            name = f"{name}-{uuid.uuid4().hex[:8]}"
        self.inputs = NatsPull(
            self.link,
            stream=inputs_stream(prefix),
            consumer=pull_consumer(
                cfg,
                f"{prefix}/{agent or '+'}/input",
                durable=name if durable else None,
                name=None if durable else name,
                max_ack_pending=receive_maximum * 2,
                new_only=not durable,
            ),
            on_message=on_message,
            window=receive_maximum,
            logger=logger,
        )
        self.status: NatsPull | None = None
        if status:
            self.status = NatsPull(
                self.link,
                stream=status_stream(prefix),
                consumer=pull_consumer(
                    cfg,
                    f"{prefix}/{agent or '+'}/status",
                    name=f"{name}-status-{uuid.uuid4().hex[:8]}",
                    max_ack_pending=receive_maximum,
                    last_per_subject=True,
                ),
                on_message=self._on_status,
                window=min(receive_maximum, 256),
                logger=logger,
            )
        self._seen: dict[str, _Seen] = {}
        self._watch_task: asyncio.Task[None] | None = None
        self._jobs_made: set[str] = set()

    async def __aenter__(self) -> Self:
        link = self.link
        await link.open()
        try:
            await link.ensure_stream(inputs_config(link.cfg, self.prefix))
            await self.inputs.start()
            if self.status is not None:
                await link.ensure_stream(status_config(link.cfg, self.prefix))
                await self.status.start()
                self._watch_task = asyncio.create_task(self._watch(), name="nats-status-watch")
        except BaseException:
            await self._stop()
            raise
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self._stop()

    async def _stop(self) -> None:
        if self._watch_task is not None:
            self._watch_task.cancel()
        try:
            for pull in (self.status, self.inputs):
                if pull is not None and pull.started:
                    await pull.stop()
        finally:
            await self.link.close()

    # --- outputs ------------------------------------------------------------------------

    async def publish_start(
        self, topic: str, payload: bytes, *, qos: int = 1, retain: bool = False
    ) -> asyncio.Future[None]:
        agent = agent_of(self.prefix, topic)
        if agent is not None and agent not in self._jobs_made and "/output" in topic:
            try:
                await self.link.ensure_stream(jobs_config(self.link.cfg, self.prefix, agent))
            except Exception as exc:
                failed: asyncio.Future[None] = asyncio.get_running_loop().create_future()
                failed.set_exception(PublishLost(f"no jobs stream for {agent}: {exc}"))
                return failed
            self._jobs_made.add(agent)
        return asyncio.ensure_future(self.link.publish(subject_of(topic), payload, None))

    # --- status: the last will NATS does not have ---------------------------------------

    async def _on_status(self, delivery: Delivery) -> bool:
        at = delivery.sent_at if delivery.sent_at is not None else time.time()
        seen = self._seen.get(delivery.topic)
        if seen is None or at >= seen.at:
            self._seen[delivery.topic] = _Seen(delivery.payload, at, _is_down(delivery.payload))
        return await self._on_message(delivery)

    async def _watch(self) -> None:
        timeout = self.link.cfg.nats.status_timeout
        while True:
            await asyncio.sleep(min(5.0, timeout / 4))
            now = time.time()
            for topic, seen in list(self._seen.items()):
                if seen.down or now - seen.at < timeout:
                    continue
                seen.down = True
                body = down_record(seen.body)
                if body is None:
                    continue
                self._log.warning(
                    "no status record on %s for %.0f s: reported Down (the last will)",
                    topic,
                    now - seen.at,
                )
                try:
                    await self._on_message(Delivery(topic, body, False, time.monotonic()))
                except Exception:
                    self._log.exception("handling the Down status of %s failed", topic)
