"""Intake: decode a delivery, check and dedupe its records, admit them, run their jobs.

A delivery is acknowledged (its handler returns True) once every record in it is answered
durably. A record for another agent, of an unknown topic, with bad parameters, or needing
credentials on a MID not yet validated is answered with an error and never runs. Nor does
a job on the last delivery the broker will make (NATS ``max_deliver``) that is not already
answered: it is answered ``refused`` (its earlier deliveries never ended with an answer,
so it may be what kills its bridges).
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Mapping
from typing import Any

from bridge.agent.config import LimitsConfig
from bridge.agent.gate import CredentialGate
from bridge.agent.probe_contexts import ProbeContexts
from bridge.agent.runner import Counters, Submit, answer_rejected, run_job
from bridge.agent.scheduler import CONTROL_LANE, Admission, RunningJob, Scheduler
from bridge.agent.store import StateStore
from bridge.wire.errors import BridgeError, Refused, UnknownTopic
from bridge.wire.records import OutputRecord, Rejected, Verifier, decode_outputs
from bridge.wire.session import Delivery
from probes.contract import ProbeSpec

log = logging.getLogger("midbridge.bridge")


class Stopping(Exception):
    """Intake met a stopping bridge: leave the message unacknowledged."""


class Intake:
    """From MQTT deliveries to running jobs; tracks the jobs until they end."""

    def __init__(
        self,
        *,
        agent_id: str,
        registry: Mapping[str, ProbeSpec],
        limits: LimitsConfig,
        probes: ProbeContexts,
        gate: CredentialGate,
        verify: Verifier | None,
    ) -> None:
        self.agent_id = agent_id
        self.registry = registry
        self.limits = limits
        self.probes = probes
        self.gate = gate
        self.verify = verify
        self.counters = Counters()
        self.scheduler = Scheduler(limits.lane_workers, limits.per_host)
        self.admission = Admission(limits.max_in_flight)
        self.express_admission = Admission(limits.express_in_flight)
        self.accepting = True
        self.open = asyncio.Event()  # cleared: paused or drained (control jobs still run)
        self.open.set()
        self.job_ended = asyncio.Event()
        self.store: StateStore
        self.submit: Submit
        self.jobs: asyncio.TaskGroup | None = None

    def start(self, store: StateStore, submit: Submit, jobs: asyncio.TaskGroup) -> None:
        """Where answers are remembered and sent, and the task group jobs run in."""
        self.store = store
        self.submit = submit
        self.jobs = jobs

    @property
    def in_flight(self) -> int:
        return self.admission.in_flight + self.express_admission.in_flight

    async def on_bulk(self, delivery: Delivery) -> bool:
        return await self.handle(delivery, self.admission)

    async def on_express(self, delivery: Delivery) -> bool:
        return await self.handle(delivery, self.express_admission)

    async def wait_job_ended(self) -> None:
        self.job_ended.clear()
        await self.job_ended.wait()

    async def handle(self, delivery: Delivery, admission: Admission) -> bool:
        """Handle one MQTT message; True once every record in it is answered durably.

        True lets the transport acknowledge the message. False (the bridge is stopping,
        or a result could not be stored) leaves it unacknowledged for redelivery.
        """
        if not self.accepting:
            return False
        limits = self.limits
        items = decode_outputs(
            delivery.payload,
            max_bytes=limits.max_message_bytes,
            max_batch=limits.max_batch,
            verify=self.verify,
        )
        waits: list[asyncio.Future[None]] = []
        try:
            last = delivery.attempt if delivery.final else None
            if len(items) == 1:
                self.counters.received += 1
                done = await self._accept(items[0], admission, inline=True, last=last)
                return done is None or (
                    done.done() and not done.cancelled() and done.exception() is None
                )
            for item in items:
                self.counters.received += 1
                fut = await self._accept(item, admission, last=last)
                if fut is not None:
                    waits.append(fut)
            if waits:
                await asyncio.gather(*waits)
        except (asyncio.CancelledError, Exception):
            return False
        return True

    async def _reject(self, item: OutputRecord | Rejected, error: BridgeError) -> None:
        await answer_rejected(item, error, self.agent_id, self.submit, self.counters)

    async def _accept(
        self,
        item: OutputRecord | Rejected,
        admission: Admission,
        *,
        inline: bool = False,
        last: int | None = None,
    ) -> asyncio.Future[None] | None:
        """Start one record; return what to wait for (None: it is answered already).

        ``inline``: run the job in the calling task (a message of one record: no second
        task, no gather) and return its finished future. ``last``: this is the broker's
        last delivery (its number): a job not answered yet is refused, not run.
        """
        if not self.accepting:
            raise Stopping
        if isinstance(item, Rejected):
            await self._reject(item, item.error)
            return None
        running = self.scheduler.running.get(item.sys_id)
        if running is not None:
            self.counters.duplicates += 1
            return running.done
        if await self.store.is_done(item.sys_id):
            self.counters.duplicates += 1
            return None
        if last is not None:
            log.warning("job %s: delivery %d is the last; answered, not run", item.sys_id, last)
            await self._reject(item, Refused(
                f"delivered {last} times without an answer; not run again",
                field="max_deliver",
            ))  # fmt: skip
            return None
        try:
            spec = self._check(item)
            params = spec.build_params(item, self.probes.settings(spec.topic))
            if (spec.needs_credentials or item.credentials) and not self.gate.open():
                raise self.gate.refusal()
        except BridgeError as exc:
            await self._reject(item, exc)
            return None
        except Exception as exc:  # a parser bug: answer it, log it, spoil nothing else
            log.exception("parameters of %s (%s) could not be checked", item.sys_id, item.topic)
            await self._reject(
                item, BridgeError(f"internal error checking parameters: {type(exc).__name__}")
            )
            return None
        if not spec.control:
            await self.open.wait()  # paused or drained: the message waits unacked
            if not self.accepting:
                raise Stopping
        await admission.acquire()
        if not self.accepting:  # the bridge began to stop while this record waited
            admission.release()
            raise Stopping
        loop = asyncio.get_running_loop()
        lane = CONTROL_LANE if spec.control else item.priority
        entry = RunningJob(item.sys_id, lane, loop.create_future())
        self.scheduler.running[item.sys_id] = entry
        if inline:
            entry.task = asyncio.current_task()
            await self._run(item, params, spec, entry, admission)
            return entry.done
        assert self.jobs is not None
        entry.task = self.jobs.create_task(
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
                self.probes.context(spec.topic),
                scheduler=self.scheduler,
                entry=entry,
                default_timeout=self.limits.default_timeout,
                submit=self.submit,
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
            self.job_ended.set()
