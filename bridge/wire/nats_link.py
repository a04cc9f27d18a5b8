"""One NATS connection (nats-py) shared by a process's sessions, and the JetStream objects.

:class:`NatsLink` connects to the servers of ``broker.nats.servers`` (or ``host:port``),
reconnects for ever after the first connect (a client of a cluster moves to another node
when its node goes away), logs in with ``broker.username``/``password`` and TLS as the
MQTT sessions do, and keeps an ``asyncio.Event`` that is set while connected. Several
sessions may share it: it connects when the first enters and closes when the last leaves.

It also makes the streams and consumers of docs/wire-contract.md (*NATS JetStream*) when
they are missing (``broker.nats.manage_streams``), and publishes to JetStream with the
broker's acknowledgement awaited (:meth:`publish`).
"""

from __future__ import annotations

import asyncio
import logging
import re
from collections.abc import Callable
from typing import Any

import nats
import nats.errors
import nats.js.errors
from nats.aio.client import Client
from nats.js import JetStreamContext
from nats.js.api import (
    AckPolicy,
    ConsumerConfig,
    DeliverPolicy,
    DiscardPolicy,
    RetentionPolicy,
    StorageType,
    StreamConfig,
)

from bridge.wire.acks import PublishLost, PublishRefused
from bridge.wire.broker import BrokerConfig
from bridge.wire.errors import (
    BrokerConnectionRefused,
    BrokerNotAuthorised,
    BrokerRefused,
    BrokerUnreachable,
)
from bridge.wire.nats_names import inputs_stream, jobs_stream, status_stream, subject_of
from bridge.wire.transport import ssl_context

log = logging.getLogger("midbridge.nats")

MSG_ID = "Nats-Msg-Id"
_API_TIMEOUT = 5.0
_RETRY_PAUSE = 1.0  # seconds before a publish JetStream refused fails (and is sent again)
INPUTS_MAX_AGE = 7 * 86_400.0  # seconds a result waits for a reader at most
_STREAM_IN_USE = 10058  # JetStream: a stream of that name exists with other settings
_FIRST_SYS_ID = re.compile(rb'^\[?\{"sys_id":"([A-Za-z0-9_.:\-]{1,64})"')
_REFUSAL_WORDS = ("authorization", "permissions", "not authorized")


def msg_id(payload: bytes) -> str | None:
    """The sys_id of the (first) record in an input message: its ``Nats-Msg-Id``.

    A message of the bridge's outbox holds the same records each time it is sent, and an
    input record's sys_id is in exactly one message, so the first record names the message.
    The bridge writes ``sys_id`` first; anything else is not given an id.
    """
    found = _FIRST_SYS_ID.match(payload[:100])
    return found.group(1).decode() if found else None


def jobs_config(cfg: BrokerConfig, prefix: str, agent: str) -> StreamConfig:
    """One MID's jobs: work-queue retention, a message leaves the stream when acknowledged."""
    base = f"{prefix}/{agent}/output"
    return StreamConfig(
        name=jobs_stream(prefix, agent),
        description=f"midbridge: jobs of MID {agent} (ECC output records)",
        subjects=[subject_of(base), subject_of(base + "/interactive")],
        retention=RetentionPolicy.WORK_QUEUE,
        storage=StorageType.FILE,
        num_replicas=cfg.nats.replicas,
        duplicate_window=cfg.nats.duplicate_window,
        discard=DiscardPolicy.NEW,
    )


def inputs_config(cfg: BrokerConfig, prefix: str) -> StreamConfig:
    """Every MID's results; ``Nats-Msg-Id`` drops republished copies.

    Interest retention: a record stays until every consumer of it (the connector's durable
    one, a client's own) has acknowledged it, so several platform-side readers may watch
    one MID; ``INPUTS_MAX_AGE`` bounds what a forgotten durable consumer keeps.
    """
    return StreamConfig(
        name=inputs_stream(prefix),
        description="midbridge: results of every MID (ECC input records)",
        subjects=[subject_of(f"{prefix}/+/input")],
        retention=RetentionPolicy.INTEREST,
        max_age=INPUTS_MAX_AGE,
        storage=StorageType.FILE,
        num_replicas=cfg.nats.replicas,
        duplicate_window=cfg.nats.duplicate_window,
        discard=DiscardPolicy.NEW,
    )


def status_config(cfg: BrokerConfig, prefix: str) -> StreamConfig:
    """Every MID's status record, the last one per subject (MQTT's retained message)."""
    return StreamConfig(
        name=status_stream(prefix),
        description="midbridge: the status record of every MID (the last one each)",
        subjects=[subject_of(f"{prefix}/+/status")],
        retention=RetentionPolicy.LIMITS,
        storage=StorageType.FILE,
        num_replicas=cfg.nats.replicas,
        max_msgs_per_subject=1,
    )


def pull_consumer(
    cfg: BrokerConfig,
    filter_topic: str,
    *,
    durable: str | None = None,
    name: str | None = None,
    max_ack_pending: int,
    max_deliver: int = -1,
    last_per_subject: bool = False,
    new_only: bool = False,
) -> ConsumerConfig:
    """A pull consumer: durable (shared by every process that names it) or ephemeral.

    ``last_per_subject``: start with the last message of every subject (a retained MQTT
    message at subscribe); ``new_only``: only what is published from now on.
    """
    policy = None
    if last_per_subject:
        policy = DeliverPolicy.LAST_PER_SUBJECT
    elif new_only:
        policy = DeliverPolicy.NEW
    return ConsumerConfig(
        durable_name=durable,
        name=name,
        filter_subject=subject_of(filter_topic),
        ack_policy=AckPolicy.EXPLICIT,
        ack_wait=cfg.nats.ack_wait,
        max_deliver=max_deliver,
        max_ack_pending=max_ack_pending,
        deliver_policy=policy,
        inactive_threshold=None if durable else max(60.0, cfg.nats.ack_wait * 2),
    )


class NatsLink:
    """One nats-py connection, reference-counted across the sessions that use it."""

    def __init__(
        self, cfg: BrokerConfig, *, name: str, logger: logging.Logger | None = None
    ) -> None:
        self.cfg = cfg
        self.name = name
        self._log = logger or log
        self.nc = Client()
        self.connected = asyncio.Event()
        self.on_reconnect: list[Callable[[], None]] = []  # called after every reconnect
        self._users = 0
        self._lock = asyncio.Lock()
        self._made: set[str] = set()  # streams known to exist
        self._closing = False
        self._js: JetStreamContext | None = None
        self._denied: list[str] = []  # the server's last permission violations (text)
        self._auth_refused: str | None = None  # the server refused our login
        self._last_error: Exception | None = None  # the cause of a failed connect

    @property
    def js(self) -> JetStreamContext:
        if self._js is None:
            self._js = self.nc.jetstream(timeout=_API_TIMEOUT)
        return self._js

    # --- lifecycle ----------------------------------------------------------------------

    async def open(self) -> None:
        async with self._lock:
            self._users += 1
            if self._users == 1:
                try:
                    await self._connect()
                except BaseException:
                    self._users -= 1
                    raise

    async def close(self) -> None:
        async with self._lock:
            self._users -= 1
            if self._users > 0:
                return
            self._closing = True
            self.connected.clear()
            try:
                await asyncio.wait_for(self.nc.close(), timeout=5.0)
            except Exception:
                self._log.debug("NATS close did not complete cleanly", exc_info=True)

    async def _connect(self) -> None:
        cfg = self.cfg
        servers = cfg.nats_servers
        options: dict[str, Any] = {
            "servers": servers,
            "name": self.name,
            "allow_reconnect": True,
            # Each server twice at the first connect: a wrong address fails the start.
            "max_reconnect_attempts": 1,
            "reconnect_time_wait": cfg.reconnect_min,
            "connect_timeout": cfg.nats.connect_timeout,
            "ping_interval": cfg.keepalive,
            "max_outstanding_pings": 2,
            "error_cb": self._on_error,
            "disconnected_cb": self._on_disconnected,
            "reconnected_cb": self._on_reconnected,
            "closed_cb": self._on_closed,
        }
        if cfg.username is not None:
            options["user"] = cfg.username
            options["password"] = cfg.password or ""
        tls = ssl_context(cfg)
        if not isinstance(tls, bool):
            options["tls"] = tls
        try:
            await self.nc.connect(**options)
        except Exception as exc:
            text = self._auth_refused or str(exc) or type(exc).__name__
            refused = any(word in text.lower() for word in _REFUSAL_WORDS)
            where = ", ".join(servers)
            cause = self._last_error or exc
            if refused:
                raise BrokerNotAuthorised(
                    f"NATS: not authorised: {text[:300]}", field="broker"
                ) from None
            if isinstance(cause, ConnectionRefusedError):
                raise BrokerConnectionRefused(
                    f"NATS: {where} refused the TCP connection (nothing listens there?)",
                    field="broker",
                ) from None
            detail = str(cause or text)[:300] or "no answer"
            raise BrokerUnreachable(
                f"NATS: cannot reach {where}: {detail}", field="broker"
            ) from None
        # From now on, reconnect for ever (to any node of the cluster).
        self.nc.options["max_reconnect_attempts"] = -1
        self.connected.set()
        self._log.info("connected to NATS %s as %s", self._url(), self.name)

    def _url(self) -> str:
        url = self.nc.connected_url
        return url.netloc if url is not None else "?"

    async def _on_error(self, exc: Exception) -> None:
        if self._closing:
            return
        text = str(exc) or type(exc).__name__
        self._last_error = exc
        if "permissions violation" in text.lower():
            self._denied = [*self._denied[-7:], text]
        if "authorization violation" in text.lower():
            self._auth_refused = text
        if isinstance(exc, OSError | nats.errors.StaleConnectionError | EOFError):
            self._log.debug("NATS connection error: %s", text)
        else:
            self._log.warning("NATS: %s", text[:300])

    async def _on_disconnected(self) -> None:
        if self.connected.is_set() and not self._closing:
            self._log.warning("disconnected from NATS; reconnecting")
        self.connected.clear()

    async def _on_reconnected(self) -> None:
        self._log.info("reconnected to NATS %s", self._url())
        self.connected.set()
        for callback in list(self.on_reconnect):
            callback()

    async def _on_closed(self) -> None:
        self.connected.clear()

    # --- JetStream objects --------------------------------------------------------------

    async def ensure_stream(self, config: StreamConfig) -> None:
        """Make the stream if it is missing (once per link; never changes an existing one)."""
        name = str(config.name)
        if name in self._made or not self.cfg.nats.manage_streams:
            return
        try:
            await self.js.add_stream(config)
        except nats.js.errors.APIError as exc:
            if exc.err_code != _STREAM_IN_USE:
                raise BrokerRefused(
                    f"NATS: cannot make stream {name}: {exc.description}", field="broker.nats"
                ) from None
            self._log.info("stream %s exists with other settings: used as it is", name)
        self._made.add(name)

    async def ensure_consumer(self, stream: str, config: ConsumerConfig) -> str:
        """Make (or update) the consumer, or check that an operator made it; its name."""
        durable = config.durable_name
        problem = "manage_streams is off: an operator makes them (docs/wire-contract.md)"
        if self.cfg.nats.manage_streams or not durable:
            try:
                info = await self.js.add_consumer(stream, config)
            except nats.js.errors.APIError as exc:
                if not durable:
                    raise BrokerRefused(
                        f"NATS: cannot make a consumer on {stream}: {exc.description}",
                        field="broker.nats",
                    ) from None
                problem = str(exc.description)
            else:
                return str(info.name)
        try:
            await self.js.consumer_info(stream, str(durable))
        except nats.js.errors.NotFoundError:
            raise BrokerRefused(
                f"NATS: no consumer {durable} on stream {stream} ({problem})",
                field="broker.nats",
            ) from None
        if self.cfg.nats.manage_streams:
            self._log.warning("consumer %s on %s not updated (%s): used as it is",
                              durable, stream, problem)  # fmt: skip
        return str(durable)

    # --- publishing ---------------------------------------------------------------------

    async def publish(self, subject: str, payload: bytes, headers: dict[str, str] | None) -> None:
        """Publish to JetStream and wait for its acknowledgement (the message is stored).

        Fails with ``PublishLost`` (not stored: the caller sends it again) or
        ``PublishRefused`` (no permission to publish there).
        """
        try:
            await self.js.publish(subject, payload, timeout=_API_TIMEOUT, headers=headers)
        except (nats.errors.Error, TimeoutError, OSError) as exc:
            text = str(exc) or type(exc).__name__
            if isinstance(exc, nats.js.errors.APIError):
                text = str(exc.description)
            # A publish the server's permissions deny gets no answer, only an error on the
            # connection (-ERR 'Permissions Violation for Publish to "<subject>"').
            denied = any(f'"{subject}"' in line for line in self._denied)
            if denied or any(word in text.lower() for word in _REFUSAL_WORDS):
                raise PublishRefused(0, 0x87) from None
            if not isinstance(exc, TimeoutError):
                # Refused at once (a full stream, no stream for the subject): the caller
                # sends it again, so not at once.
                await asyncio.sleep(_RETRY_PAUSE)
            raise PublishLost(f"not stored by NATS ({subject}): {text[:200]}") from None
