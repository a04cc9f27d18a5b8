"""The bridge: intake → scheduler → probes → egress, as one async context manager.

Two intake sessions carry the ECC queue in:
- *bulk*: ``<prefix>/<agent>/output`` (optionally through ``$share/<group>/``), with a
  receive window of ``limits.max_in_flight`` messages;
- *express*: ``<prefix>/<agent>/output/interactive``, its own small window, for
  interactive work, heartbeats and SystemCommands, which therefore never queue at the
  broker behind a deep backlog of sweeps.
Input records go out on ``<prefix>/<agent>/input`` through the durable outbox.

``broker.kind`` picks the transport: three MQTT 5 sessions (the default), or, on NATS
JetStream, one connection with two pull consumers of the MID's jobs stream (durable and
shared by every bridge of the MID) and the results publisher (``bridge.wire.nats_transport``).

Shutdown: stop intake, let running jobs finish within ``drain_timeout``, cancel the rest
(they get no answer and are redelivered by the broker), then disconnect.
"""

from __future__ import annotations

import asyncio
import logging
import os
import time
from collections.abc import Coroutine, Mapping
from contextlib import AsyncExitStack
from typing import Any

from bridge.agent.config import Config
from bridge.agent.control import BridgeControl
from bridge.agent.credentials import LocalCredentials, NoCredentials
from bridge.agent.egress import Egress
from bridge.agent.gate import CredentialGate
from bridge.agent.identity import Identity
from bridge.agent.intake import Intake
from bridge.agent.probe_contexts import ProbeContexts
from bridge.agent.status import StatusReporter
from bridge.agent.store import StateStore
from bridge.wire.acks import PublishRefused
from bridge.wire.broker import BrokerConfig
from bridge.wire.errors import INSECURE_DEFAULT, INSECURE_DEFAULT_NOTE, BrokerRefused
from bridge.wire.sealing import SignatureCheck
from bridge.wire.session import MessageHandler, Publisher, Session
from bridge.wire.topics import Topics
from bridge.wire.transport import MqttSession
from probes.contract import CredentialResolver, ProbeSpec
from probes.kit.ratelimit import RateLimiter

log = logging.getLogger("midbridge.bridge")

_CANCEL_GRACE = 2.0  # seconds cancelled jobs get to end before the probes' resources close


class Bridge:
    """The MID runtime, assembled: intake, probes, status and control over three sessions."""

    def __init__(self, config: Config, registry: Mapping[str, ProbeSpec]) -> None:
        self.config = config
        enabled = config.probes.enabled
        self.registry = {
            topic: spec for topic, spec in registry.items() if enabled is None or topic in enabled
        }
        self.topics = Topics.for_agent(config.bridge.topic_prefix, config.bridge.agent)
        self.agent_id = config.bridge.agent_id
        self.rate = RateLimiter(config.limits.probe_rate)
        self._stack = AsyncExitStack()
        self._tasks: asyncio.TaskGroup | None = None
        self._closed = asyncio.Event()
        self.store: StateStore
        self.egress: Egress
        self._bulk: Session
        self.express: Session
        self.out: Publisher
        local: CredentialResolver = NoCredentials()
        if config.bridge.credentials_file is not None:
            local = LocalCredentials.from_file(config.bridge.credentials_file)
        self.credentials = local
        self.identity = Identity(config.bridge.state_dir)
        self.gate = CredentialGate(
            self.identity, local, require_validation=config.security.require_validation
        )
        security = config.security
        signatures = (
            SignatureCheck(
                security.platform_key,
                clock_skew=security.clock_skew,
                max_age=config.signature_max_age,
            )
            if security.require_signatures and security.platform_key
            else None
        )
        self.probes = ProbeContexts(config, registry, enabled=self.registry, rate=self.rate)
        self.intake = Intake(
            agent_id=self.agent_id,
            registry=self.registry,
            limits=config.limits,
            probes=self.probes,
            gate=self.gate,
            verify=signatures.verify if signatures else None,
        )
        self.reporter = StatusReporter(config, self.topics, self.identity, self.intake)
        self.counters = self.intake.counters
        self.counters.topics(self.registry)  # each enabled topic's series, from zero
        self.scheduler = self.intake.scheduler
        self.admission = self.intake.admission
        self.control = BridgeControl(self.intake, self.reporter, self.identity, self._service)
        self.probes.connect(credentials=self.gate, control=self.control)
        self._connected_sessions: list[Session] = []
        self.warn_insecure = True  # off for the second and later tries of one start
        self._service_tasks: list[asyncio.Task[None]] = []

    # --- what tests, metrics and the CLI read -------------------------------------------

    @property
    def status(self) -> str:
        return self.reporter.status

    def stats(self) -> dict[str, Any]:
        return self.reporter.stats()

    def status_record(self, status: str | None = None) -> dict[str, Any]:
        return self.reporter.status_record(status)

    def cancel(self, sys_id: str) -> bool:
        return self.control.cancel(sys_id)

    @property
    def bulk(self) -> MqttSession:
        """The bulk intake's MQTT session (tests look into it); a TypeError on NATS."""
        if not isinstance(self._bulk, MqttSession):
            raise TypeError("the bulk intake is not an MQTT session (broker.kind is nats)")
        return self._bulk

    def sessions(self) -> dict[str, Session]:
        return {
            name: s
            for name, s in (
                ("bulk", getattr(self, "_bulk", None)),
                ("express", getattr(self, "express", None)),
                ("out", getattr(self, "out", None)),
            )
            if s is not None
        }

    async def serve_forever(self) -> None:
        await self._closed.wait()

    # --- lifecycle --------------------------------------------------------------------

    async def __aenter__(self) -> Bridge:
        cfg = self.config
        limits = cfg.limits
        self.probes.load_settings()  # a bad [probes.settings.*] fails before the broker
        if self.warn_insecure:
            self._warn_insecure_settings()
        try:
            state_dir = cfg.bridge.state_dir
            state_dir.mkdir(parents=True, exist_ok=True)
            os.chmod(state_dir, 0o700)
            self.store = await self._stack.enter_async_context(
                StateStore(
                    state_dir / "state.sqlite3",
                    dedupe_window=limits.dedupe_window,
                    dedupe_memory=limits.dedupe_memory,
                )
            )
            await self.store.prune()
            self.reporter.store = self.store  # the last will (made next) counts the outbox
            self._make_sessions()
            self.egress = Egress(
                self.store,
                self.out.publish_start,
                self.out.connected,
                linger_ms=limits.egress_linger_ms,
                batch_records=limits.egress_batch,
                max_records=limits.outbox_max_records,
            )
            self.reporter.store, self.reporter.egress = self.store, self.egress
            self._tasks = await self._stack.enter_async_context(asyncio.TaskGroup())
            self._service_tasks = [
                self._tasks.create_task(self.egress.run_writer(), name="egress-writer"),
                self._tasks.create_task(self.egress.run_publisher(), name="egress-publisher"),
            ]
            self._stack.push_async_callback(self._disconnect_sessions)
            await self.probes.open(self._stack)  # closed after the drain, before disconnecting
            jobs = await self._stack.enter_async_context(asyncio.TaskGroup())
            self.intake.start(self.store, self._submit, jobs)
            self._stack.push_async_callback(self._drain)
            # Redelivered jobs may arrive the moment a session connects: all is ready now.
            for session in (self.out, self._bulk, self.express):
                await session.__aenter__()
                self._connected_sessions.append(session)
            await self._first_status()
            self.out.on_reconnect.append(self.reporter.republisher(self._spawn))
            self._service(self.reporter.run_loop(), "status")
        except BaseException:
            await self._stack.aclose()
            raise
        log.info(
            "bridge %s up: %s, probes %s",
            self.agent_id,
            self.topics.output,
            ", ".join(sorted(self.registry)),
        )
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self._stack.aclose()

    def _make_sessions(self) -> None:
        """The bulk and express intake sessions and the ``out`` session results leave on."""
        cfg = self.config
        if cfg.broker.kind == "nats":
            self._make_nats_sessions()
            return
        limits = cfg.limits
        client_base = f"midbridge-{cfg.bridge.agent}"
        output_topic = self.topics.output
        if cfg.bridge.shared_group:
            # A stable id per member, so a restarted member resumes its own session.
            output_topic = f"$share/{cfg.bridge.shared_group}/{output_topic}"
            client_base = f"{client_base}-{cfg.bridge.instance or self.reporter.host}"
        self._bulk = self._intake_session(
            client_base, "bulk", output_topic, self.intake.on_bulk, limits.max_in_flight
        )
        self.express = self._intake_session(
            client_base,
            "express",
            self.topics.express,
            self.intake.on_express,
            limits.express_in_flight,
        )
        # Results go out on a session of their own, so that pausing intake (flow
        # control) never holds back the PUBACKs egress waits for.
        broker, client_id = self._session_login(client_base, "out")
        self.out = MqttSession(
            broker,
            client_id=client_id,
            receive_maximum=limits.express_in_flight,
            will=self.reporter.last_will(),
        )
        self.reporter.out = self.out

    def _make_nats_sessions(self) -> None:
        """On NATS: one connection; every bridge of the MID shares its two consumers."""
        # Imported here: an MQTT bridge does not pay for loading nats-py.
        from bridge.wire.nats_link import NatsLink
        from bridge.wire.nats_transport import NatsIntake, NatsPublisher

        cfg = self.config
        limits = cfg.limits
        member = cfg.bridge.instance or self.reporter.host
        link = NatsLink(cfg.broker, name=f"midbridge-{cfg.bridge.agent}-{member}")
        prefix, agent = cfg.bridge.topic_prefix, cfg.bridge.agent
        self._bulk, self.express = (
            NatsIntake(link, prefix=prefix, agent=agent, express=express, on_message=handler,
                       window=window)
            for express, handler, window in (
                (False, self.intake.on_bulk, limits.max_in_flight),
                (True, self.intake.on_express, limits.express_in_flight),
            )
        )  # fmt: skip
        self.out = NatsPublisher(link, prefix=prefix)
        self.reporter.out = self.out

    def _intake_session(
        self,
        client_base: str,
        name: str,
        topic: str,
        on_message: MessageHandler,
        receive_maximum: int,
    ) -> MqttSession:
        """An intake session (bulk or express): its subscription, handler and window."""
        broker, client_id = self._session_login(client_base, name)
        return MqttSession(
            broker,
            client_id=client_id,
            subscriptions=[topic],
            subscription_record=self.config.bridge.state_dir / f"subscriptions-{name}.json",
            on_message=on_message,
            receive_maximum=receive_maximum,
        )

    async def _first_status(self) -> None:
        try:
            await self.reporter.publish()
        except PublishRefused as exc:
            # Mosquitto grants any SUBSCRIBE and only filters deliveries, so the first
            # refusal we can see is a publish the ACL denies.
            self.reporter.refused = True
            raise BrokerRefused(
                f"the broker refused our status record on {self.topics.status} "
                f"(reason 0x{exc.reason_code:02x}: not authorised): this broker user may "
                f"not act as agent {self.config.bridge.agent!r}",
                field="broker.username",
            ) from None

    def _spawn(self, coro: Coroutine[Any, Any, None], name: str) -> None:
        """A task in the bridge's task group (dropped if the bridge is not running)."""
        if self._tasks is None:
            coro.close()
            return
        self._tasks.create_task(coro, name=name)

    def _service(self, coro: Coroutine[Any, Any, None], name: str) -> None:
        """A task that runs until the bridge stops (cancelled when the sessions close)."""
        assert self._tasks is not None
        self._service_tasks.append(self._tasks.create_task(coro, name=name))

    async def _submit(self, records: list[dict[str, Any]], done_id: str | None) -> None:
        await self.egress.submit(self.topics.input, records, done_id=done_id)

    def _session_login(self, client_base: str, session: str) -> tuple[BrokerConfig, str]:
        """The broker login and client id of one session (bulk, express or out).

        With ``broker.session_users`` each session logs in as ``<username>.<session>`` and
        uses that name as its client id, as a broker with ``use_username_as_clientid``
        does: a client id then belongs to one user, and no other can take it over.
        """
        broker = self.config.broker
        if not broker.session_users:
            return broker, f"{client_base}-{session}"
        session_user = f"{broker.username}.{session}"
        return broker.model_copy(update={"username": session_user}), session_user

    def _warn_insecure_settings(self) -> None:
        """Say it once at start when the broker or the jobs are not authenticated."""
        if not self.config.broker.username:
            log.warning(
                INSECURE_DEFAULT_NOTE
                + " broker.username is not set: the bridge connects anonymously, so the broker "
                "cannot tell it from any other client (see docs/security.md)",
                extra={INSECURE_DEFAULT: True},
            )
        if not self.config.security.require_signatures:
            log.warning(
                INSECURE_DEFAULT_NOTE
                + " security.require_signatures is off: whoever may publish to %s can command "
                "this bridge (see docs/security.md, signed jobs)",
                self.topics.output,
                extra={INSECURE_DEFAULT: True},
            )

    async def _drain(self) -> None:
        """Stop intake, wait for running jobs up to the deadline, then cancel the rest."""
        self.intake.accepting = False
        try:
            async with asyncio.timeout(self.config.limits.drain_timeout):
                while self.scheduler.running:
                    await self.intake.wait_job_ended()
        except TimeoutError:
            pass
        cancelled = 0
        for job in list(self.scheduler.running.values()):
            if job.task is not None:
                job.task.cancel()
                cancelled += 1
        if cancelled:
            log.warning(
                "drain deadline passed: %d job(s) cancelled, left for redelivery", cancelled
            )
        # A cancelled job may still be cleaning up (a one-record job runs in its MQTT
        # handler, which no task group waits for): the probes' resources close after it.
        try:
            async with asyncio.timeout(_CANCEL_GRACE):
                while self.scheduler.running:
                    await self.intake.wait_job_ended()
        except TimeoutError:
            log.warning("%d cancelled job(s) still running", len(self.scheduler.running))
        # Give the publisher a moment to send what is durable; the rest waits on disk.
        flush_deadline = time.monotonic() + 2.0
        while self.store.outbox_records and time.monotonic() < flush_deadline:
            if not self.out.connected.is_set():
                break
            await asyncio.sleep(0.02)

    async def _disconnect_sessions(self) -> None:
        if self.out in self._connected_sessions:
            await self.reporter.publish_down()
        for session in reversed(self._connected_sessions):
            await session.__aexit__(None, None, None)
        self._closed.set()
        for task in self._service_tasks:
            task.cancel()
