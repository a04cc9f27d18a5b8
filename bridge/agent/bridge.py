"""The bridge: intake → scheduler → probes → egress, as one async context manager.

Two MQTT sessions carry the ECC queue in:
- *bulk*: ``<prefix>/<agent>/output`` (optionally through ``$share/<group>/``), with a
  receive window of ``limits.max_in_flight`` messages;
- *express*: ``<prefix>/<agent>/output/interactive``, its own small window, for
  interactive work, heartbeats and SystemCommands, which therefore never queue at the
  broker behind a deep backlog of sweeps.
Input records go out on ``<prefix>/<agent>/input`` through the durable outbox.

Shutdown: stop intake, let running jobs finish within ``drain_timeout``, cancel the rest
(they get no answer and are redelivered by the broker), then disconnect.
"""

from __future__ import annotations

import asyncio
import logging
import os
import socket
import time
from collections.abc import Mapping
from contextlib import AsyncExitStack
from typing import Any

import orjson

from bridge import __version__
from bridge.agent.config import Config
from bridge.agent.credentials import LocalCredentials, NoCredentials
from bridge.agent.egress import Egress
from bridge.agent.identity import Identity
from bridge.agent.runner import Counters, answer_rejected, run_job
from bridge.agent.scheduler import CONTROL_LANE, LANE_NAMES, Admission, RunningJob, Scheduler
from bridge.agent.store import StateStore
from bridge.wire.acks import PublishFailed, PublishRefused
from bridge.wire.broker import BrokerConfig
from bridge.wire.credentials import Credential, of_types
from bridge.wire.errors import BridgeError, BrokerRefused, CredentialError, Refused, UnknownTopic
from bridge.wire.records import OutputRecord, Rejected, decode_outputs
from bridge.wire.sealing import SignatureCheck
from bridge.wire.topics import Topics
from bridge.wire.transport import Delivery, MqttSession
from probes.contract import CONTROL_RESOURCE, CredentialResolver, ProbeContext, ProbeSpec
from probes.kit.ratelimit import RateLimiter

log = logging.getLogger("midbridge.bridge")


def probe_settings(config: Config, topic: str) -> dict[str, Any]:
    """The settings a probe's ``build_params`` and ``run`` get for ``topic``."""
    if topic == "Shazzam":
        return config.probes.shazzam.model_dump()
    return dict(config.probes.settings.get(topic, {}))


class _GatedCredentials:
    """A job's credentials: sealed in its record for this bridge, then the local file.

    Nothing is handed out until the MID is validated (unless the configuration says
    validation is not required). Decrypted secrets live only in the returned objects.
    """

    def __init__(self, bridge: Bridge) -> None:
        self.bridge = bridge

    async def resolve(
        self, record: OutputRecord, *, credential_id: str | None, types: tuple[str, ...]
    ) -> list[Credential]:
        bridge = self.bridge
        if not bridge._may_use_credentials():
            raise Refused(bridge._not_validated_message(), field="credentials")
        sealed = [
            bridge.identity.decrypt_credential(item, sys_id=record.sys_id)
            for item in record.credentials
        ]
        if credential_id is not None:
            for cred in sealed:
                if cred.id == credential_id:
                    return [of_types(cred, credential_id, types)]
            return await bridge.credentials.resolve(
                record, credential_id=credential_id, types=types
            )
        found = [cred for cred in sealed if cred.type in types]
        try:
            found += await bridge.credentials.resolve(record, credential_id=None, types=types)
        except CredentialError:
            if not found:
                raise
        return found


class _Stopping(Exception):
    """Intake met a stopping bridge: leave the message unacknowledged."""


class Bridge:
    def __init__(self, config: Config, *, registry: Mapping[str, ProbeSpec] | None = None) -> None:
        if registry is None:
            from probes import REGISTRY

            registry = REGISTRY
        self.config = config
        enabled = config.probes.enabled
        self.registry = {
            topic: spec for topic, spec in registry.items() if enabled is None or topic in enabled
        }
        self.topics = Topics.for_agent(config.bridge.topic_prefix, config.bridge.agent)
        self.agent_id = config.bridge.agent_id
        limits = config.limits
        self.counters = Counters()
        self.scheduler = Scheduler(limits.lane_workers, limits.per_host)
        self.admission = Admission(limits.max_in_flight)
        self.express_admission = Admission(limits.express_in_flight)
        self.rate = RateLimiter(limits.probe_rate)
        self.accepting = True
        self.started_at = time.time()
        self._closed = asyncio.Event()
        self._job_ended = asyncio.Event()
        self._stack = AsyncExitStack()
        self._tasks: asyncio.TaskGroup | None = None
        self._jobs: asyncio.TaskGroup | None = None
        self.store: StateStore
        self.egress: Egress
        self.bulk: MqttSession
        self.express: MqttSession
        self.out: MqttSession
        self._contexts: dict[str, ProbeContext] = {}
        self._settings_cache: dict[str, dict[str, Any]] = {}
        self.credentials: CredentialResolver = NoCredentials()
        if config.bridge.credentials_file is not None:
            self.credentials = LocalCredentials.from_file(config.bridge.credentials_file)
        self.resources: dict[str, Any] = {CONTROL_RESOURCE: self}  # shared clients probes open
        self.identity = Identity(config.bridge.state_dir)
        self.signatures = (
            SignatureCheck(
                config.security.platform_key,
                clock_skew=config.security.clock_skew,
                max_age=config.signature_max_age,
            )
            if config.security.require_signatures and config.security.platform_key
            else None
        )
        self.status = "Up"
        self.last_heartbeat: float | None = None
        self._status_refused = False
        self._intake_open = asyncio.Event()
        self._intake_open.set()
        self.host = socket.gethostname()
        self._connected_sessions: list[MqttSession] = []
        self._service_tasks: list[asyncio.Task[None]] = []

    # --- lifecycle --------------------------------------------------------------------

    async def __aenter__(self) -> Bridge:
        cfg = self.config
        limits = cfg.limits
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
            client_base = f"midbridge-{cfg.bridge.agent}"
            output_topic = self.topics.output
            if cfg.bridge.shared_group:
                # A stable id per member, so a restarted member resumes its own session.
                output_topic = f"$share/{cfg.bridge.shared_group}/{output_topic}"
                client_base = f"{client_base}-{cfg.bridge.instance or self.host}"
            # The publishing session is the bulk one; the egress waits on its connection.
            broker, client_id = self._session_login(client_base, "bulk")
            self.bulk = MqttSession(
                broker,
                client_id=client_id,
                subscriptions=[output_topic],
                subscription_record=state_dir / "subscriptions-bulk.json",
                on_message=self._on_bulk,
                receive_maximum=limits.max_in_flight,
            )
            broker, client_id = self._session_login(client_base, "express")
            self.express = MqttSession(
                broker,
                client_id=client_id,
                subscriptions=[self.topics.express],
                subscription_record=state_dir / "subscriptions-express.json",
                on_message=self._on_express,
                receive_maximum=limits.express_in_flight,
            )
            # Results go out on a session of their own, so that pausing intake (flow
            # control) never holds back the PUBACKs egress waits for.
            broker, client_id = self._session_login(client_base, "out")
            self.out = MqttSession(
                broker,
                client_id=client_id,
                receive_maximum=limits.express_in_flight,
                # The broker publishes this if we die: the retained status turns Down.
                will=(self.topics.status, orjson.dumps(self.status_record(status="Down"))),
            )
            self.egress = Egress(
                self.store,
                self.out.publish_start,
                self.out.connected,
                linger_ms=limits.egress_linger_ms,
                batch_records=limits.egress_batch,
                max_records=limits.outbox_max_records,
            )
            self._tasks = await self._stack.enter_async_context(asyncio.TaskGroup())
            self._service_tasks = [
                self._tasks.create_task(self.egress.run_writer(), name="egress-writer"),
                self._tasks.create_task(self.egress.run_publisher(), name="egress-publisher"),
            ]
            self._stack.push_async_callback(self._disconnect_sessions)
            self._stack.push_async_callback(self._close_resources)
            self._jobs = await self._stack.enter_async_context(asyncio.TaskGroup())
            self._stack.push_async_callback(self._drain)
            # Redelivered jobs may arrive the moment a session connects: all is ready now.
            await self.out.__aenter__()
            self._connected_sessions.append(self.out)
            await self.bulk.__aenter__()
            self._connected_sessions.append(self.bulk)
            await self.express.__aenter__()
            self._connected_sessions.append(self.express)
            try:
                await self.publish_status()
            except PublishRefused as exc:
                # Mosquitto grants any SUBSCRIBE and only filters deliveries, so the first
                # refusal we can see is a publish the ACL denies.
                self._status_refused = True
                raise BrokerRefused(
                    f"the broker refused our status record on {self.topics.status} "
                    f"(reason 0x{exc.reason_code:02x}: not authorised): this broker user may "
                    f"not act as agent {cfg.bridge.agent!r}",
                    field="broker.username",
                ) from None
            self.out.on_reconnect.append(self._republish_status)
            self._service_tasks.append(self._tasks.create_task(self._status_loop(), name="status"))
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
                "broker.username is not set: the bridge connects anonymously, so the broker "
                "cannot tell it from any other client (see docs/security.md)"
            )
        if not self.config.security.require_signatures:
            log.warning(
                "security.require_signatures is off: whoever may publish to %s can command "
                "this bridge (see docs/security.md, signed jobs)",
                self.topics.output,
            )

    async def _drain(self) -> None:
        """Stop intake, wait for running jobs up to the deadline, then cancel the rest."""
        self.accepting = False
        try:
            async with asyncio.timeout(self.config.limits.drain_timeout):
                while self.scheduler.running:
                    self._job_ended.clear()
                    await self._job_ended.wait()
        except TimeoutError:
            pass
        for job in list(self.scheduler.running.values()):
            if job.task is not None:
                job.task.cancel()
        if self.scheduler.running:
            log.warning(
                "drain deadline passed: %d job(s) cancelled, left for redelivery",
                len(self.scheduler.running),
            )
        # Give the publisher a moment to send what is durable; the rest waits on disk.
        flush_deadline = time.monotonic() + 2.0
        while self.store.outbox_records and time.monotonic() < flush_deadline:
            if not self.out.connected.is_set():
                break
            await asyncio.sleep(0.02)

    async def _close_resources(self) -> None:
        """Close the shared clients probes opened (``aclose()`` or ``close()``)."""
        for name, resource in list(self.resources.items()):
            try:
                closer = getattr(resource, "aclose", None) or getattr(resource, "close", None)
                if closer is not None:
                    result = closer()
                    if asyncio.iscoroutine(result):
                        await result
            except Exception:
                log.warning("closing %s failed", name, exc_info=True)
        self.resources.clear()

    async def _publish_down(self) -> None:
        if self.out.connected.is_set() and not self._status_refused:
            try:
                async with asyncio.timeout(2.0):
                    await self.publish_status("Down")
            except (TimeoutError, PublishFailed) as exc:
                log.warning("could not publish the Down status: %s", exc)

    def _republish_status(self) -> None:
        """After a reconnect (our will may have turned the status Down): say we are back."""
        if self._tasks is None:
            return

        async def republish() -> None:
            try:
                await self.publish_status()
            except PublishFailed as exc:
                log.warning("status publish after reconnect failed: %s", exc)

        self._tasks.create_task(republish(), name="status-after-reconnect")

    async def _disconnect_sessions(self) -> None:
        if self.out in self._connected_sessions:
            await self._publish_down()
        for session in reversed(self._connected_sessions):
            await session.__aexit__(None, None, None)
        self._closed.set()
        for task in self._service_tasks:
            task.cancel()

    # --- intake -----------------------------------------------------------------------

    async def _on_bulk(self, delivery: Delivery) -> bool:
        return await self._intake(delivery, self.admission)

    async def _on_express(self, delivery: Delivery) -> bool:
        return await self._intake(delivery, self.express_admission)

    async def _submit(self, records: list[dict[str, Any]], done_id: str | None) -> None:
        await self.egress.submit(self.topics.input, records, done_id=done_id)

    async def _intake(self, delivery: Delivery, admission: Admission) -> bool:
        """Handle one MQTT message; True once every record in it is answered durably.

        True lets the transport acknowledge the message. False (the bridge is stopping,
        or a result could not be stored) leaves it unacknowledged for redelivery.
        """
        if not self.accepting:
            return False
        limits = self.config.limits
        items = decode_outputs(
            delivery.payload,
            max_bytes=limits.max_message_bytes,
            max_batch=limits.max_batch,
            verify=self.signatures.verify if self.signatures else None,
        )
        waits: list[asyncio.Future[None]] = []
        try:
            if len(items) == 1:
                self.counters.received += 1
                done = await self._accept(items[0], admission, inline=True)
                return done is None or (
                    done.done() and not done.cancelled() and done.exception() is None
                )
            for item in items:
                self.counters.received += 1
                fut = await self._accept(item, admission)
                if fut is not None:
                    waits.append(fut)
            if waits:
                await asyncio.gather(*waits)
        except (asyncio.CancelledError, Exception):
            return False
        return True

    async def _accept(
        self, item: OutputRecord | Rejected, admission: Admission, *, inline: bool = False
    ) -> asyncio.Future[None] | None:
        """Start one record; return what to wait for (None: it is answered already).

        ``inline``: run the job in the calling task (a message of one record: no second
        task, no gather) and return its finished future.
        """
        if not self.accepting:
            raise _Stopping
        if isinstance(item, Rejected):
            await answer_rejected(item, item.error, self.agent_id, self._submit, self.counters)
            return None
        running = self.scheduler.running.get(item.sys_id)
        if running is not None:
            self.counters.duplicates += 1
            return running.done
        if await self.store.is_done(item.sys_id):
            self.counters.duplicates += 1
            return None
        try:
            spec = self._check(item)
            params = spec.build_params(item, self._settings(spec.topic))
            if (spec.needs_credentials or item.credentials) and not self._may_use_credentials():
                raise Refused(self._not_validated_message(), field="credentials")
        except BridgeError as exc:
            await answer_rejected(item, exc, self.agent_id, self._submit, self.counters)
            return None
        except Exception as exc:  # a parser bug: answer it, log it, spoil nothing else
            log.exception("parameters of %s (%s) could not be checked", item.sys_id, item.topic)
            error = BridgeError(f"internal error checking parameters: {type(exc).__name__}")
            await answer_rejected(item, error, self.agent_id, self._submit, self.counters)
            return None
        if not spec.control:
            await self._intake_open.wait()  # paused or drained: the message waits unacked
            if not self.accepting:
                raise _Stopping
        await admission.acquire()
        if not self.accepting:  # the bridge began to stop while this record waited
            admission.release()
            raise _Stopping
        loop = asyncio.get_running_loop()
        lane = CONTROL_LANE if spec.control else item.priority
        entry = RunningJob(item.sys_id, lane, loop.create_future())
        self.scheduler.running[item.sys_id] = entry
        if inline:
            entry.task = asyncio.current_task()
            await self._run(item, params, spec, entry, admission)
            return entry.done
        assert self._jobs is not None
        entry.task = self._jobs.create_task(
            self._run(item, params, spec, entry, admission), name=f"job-{item.sys_id}"
        )
        return entry.done

    def _check(self, record: OutputRecord) -> ProbeSpec:
        if record.agent and record.agent != self.agent_id:
            raise Refused(
                f"record is for agent {record.agent[:80]!r}, this is {self.agent_id!r}",
                field="agent",
            )
        spec = self.registry.get(record.topic)
        if spec is None:
            enabled = ", ".join(sorted(self.registry))
            raise UnknownTopic(
                f"no probe for topic {record.topic[:80]!r} (enabled: {enabled})",
                field="topic",
            )
        return spec

    def _settings(self, topic: str) -> dict[str, Any]:
        """A probe's settings (read-only; computed once per topic)."""
        cached = self._settings_cache.get(topic)
        if cached is None:
            cached = self._settings_cache[topic] = probe_settings(self.config, topic)
        return cached

    def context_for(self, spec: ProbeSpec) -> ProbeContext:
        ctx = self._contexts.get(spec.topic)
        if ctx is None:
            ctx = ProbeContext(
                agent=self.agent_id,
                rate=self.rate,
                per_host_limit=self.config.limits.per_host,
                settings=self._settings(spec.topic),
                credentials=_GatedCredentials(self),
                resources=self.resources,
                state_dir=self.config.bridge.state_dir,
            )
            self._contexts[spec.topic] = ctx
        return ctx

    def _may_use_credentials(self) -> bool:
        return not self.config.security.require_validation or self.identity.validated

    def _not_validated_message(self) -> str:
        return (
            "this MID is not validated: jobs that need credentials are refused until an "
            f"administrator validates key {self.identity.fingerprint[:16]}..."
        )

    async def _run(
        self,
        record: OutputRecord,
        params: Any,
        spec: ProbeSpec,
        entry: RunningJob,
        admission: Admission,
    ) -> None:
        try:
            await run_job(
                record,
                params,
                spec,
                self.context_for(spec),
                scheduler=self.scheduler,
                entry=entry,
                default_timeout=self.config.limits.default_timeout,
                submit=self._submit,
                counters=self.counters,
            )
            if not entry.done.done():
                entry.done.set_result(None)
        except asyncio.CancelledError:
            if not entry.done.done():
                entry.done.cancel()
        except Exception as exc:  # result could not be made durable: leave it unacknowledged
            log.error("job %s: result not stored: %s", record.sys_id, exc)
            if not entry.done.done():
                entry.done.set_exception(exc)
        finally:
            self.scheduler.running.pop(record.sys_id, None)
            admission.release()
            self._job_ended.set()

    # --- control ----------------------------------------------------------------------

    def sessions(self) -> dict[str, MqttSession]:
        return {
            name: s
            for name, s in (
                ("bulk", getattr(self, "bulk", None)),
                ("express", getattr(self, "express", None)),
                ("out", getattr(self, "out", None)),
            )
            if s is not None
        }

    def cancel(self, sys_id: str) -> bool:
        return self.scheduler.cancel(sys_id)

    # --- control (HeartbeatProbe, SystemCommand) and status ----------------------------

    async def pause(self) -> None:
        self._intake_open.clear()
        self.status = "Paused"
        await self.publish_status()

    async def resume(self) -> None:
        self._intake_open.set()
        self.status = "Up"
        await self.publish_status()

    async def drain(self) -> None:
        """Take nothing new; report Drained once the work in flight is done."""
        self._intake_open.clear()
        self.status = "Draining"
        await self.publish_status()
        assert self._tasks is not None
        self._service_tasks.append(self._tasks.create_task(self._finish_drain(), name="drain"))

    async def _finish_drain(self) -> None:
        while any(not self._is_control(job) for job in self.scheduler.running.values()):
            self._job_ended.clear()
            await self._job_ended.wait()
        if self.status == "Draining":
            self.status = "Drained"
            await self.publish_status()

    def _is_control(self, job: RunningJob) -> bool:
        return job.lane == CONTROL_LANE

    async def validate(self, fingerprint: str) -> None:
        self.identity.validate(fingerprint)
        log.info("key %s validated", fingerprint[:16])
        await self.publish_status()

    async def invalidate(self) -> None:
        self.identity.invalidate()
        log.warning(
            "key pair dropped and remade; not validated (new key %s)",
            self.identity.fingerprint[:16],
        )
        await self.publish_status()

    async def heartbeat(self) -> None:
        self.last_heartbeat = time.time()
        await self.publish_status()

    def status_record(self, status: str | None = None) -> dict[str, Any]:
        """The retained record on ``<prefix>/<agent>/status``, shaped like ``ecc_agent``."""
        stats = self.stats()
        return {
            "name": self.config.bridge.agent,
            "agent": self.agent_id,
            "host": self.host,
            "version": __version__,
            "status": status or self.status,
            "validated": self.identity.validated,
            "capabilities": sorted(self.registry),
            "public_key": self.identity.keys.public_b64,
            "fingerprint": self.identity.fingerprint,
            "started_at": self.started_at,
            "last_heartbeat": self.last_heartbeat,
            "updated_at": time.time(),
            "in_flight": stats["in_flight"],
            "lanes_running": dict(zip(LANE_NAMES, stats["lanes_running"], strict=True)),
            "lanes_waiting": dict(zip(LANE_NAMES, stats["lanes_waiting"], strict=True)),
            "outbox_records": stats["outbox_records"],
            "processed": stats["processed"],
            "failed": stats["failed"],
        }

    async def publish_status(self, status: str | None = None) -> None:
        body = orjson.dumps(self.status_record(status))
        await self.out.publish(self.topics.status, body, retain=True)

    async def _status_loop(self) -> None:
        while True:
            await asyncio.sleep(self.config.security.status_interval)
            try:
                await self.publish_status()
            except Exception:
                log.warning("status publish failed", exc_info=True)

    def stats(self) -> dict[str, Any]:
        c = self.counters
        store: StateStore | None = getattr(self, "store", None)
        egress: Egress | None = getattr(self, "egress", None)
        return {
            "received": c.received,
            "processed": c.processed,
            "failed": c.failed,
            "duplicates": c.duplicates,
            "rejected": c.rejected,
            "errors_by_kind": dict(c.by_kind),
            "in_flight": self.admission.in_flight + self.express_admission.in_flight,
            "lanes_running": list(self.scheduler.lane_running),
            "lanes_waiting": list(self.scheduler.lane_waiting),
            "outbox_records": store.outbox_records if store is not None else 0,
            "published_records": egress.published_records if egress is not None else 0,
            "uptime_s": round(time.time() - self.started_at, 3),
        }

    async def serve_forever(self) -> None:
        await self._closed.wait()
