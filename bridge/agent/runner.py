"""Running one job: the caller's side of the probe contract.

The runner applies the deadline, times the probe, turns each chunk into an input record
(``sequence`` 0, 1, ...; the last one ``complete``), turns every failure into an error
record, and counts. Probes stay plain async generators.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable, Iterable
from dataclasses import dataclass, field
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Histogram

from bridge.agent.scheduler import CONTROL_LANE, LANE_NAMES, RunningJob, Scheduler
from bridge.wire.errors import BridgeError, Cancelled, Expired, ProbeTimeout
from bridge.wire.records import (
    InputRecord,
    OutputRecord,
    Rejected,
    answer,
    error_input,
    error_payload,
    new_sys_id,
)
from probes.contract import Job, ProbeContext, ProbeParams, ProbeSpec

log = logging.getLogger("midbridge.runner")
# One line per job: DEBUG when it succeeded (JOB_LOG_LEVEL), WARNING when it failed. At
# INFO a line per success cost 55 us a job (format and write), ~15 % of the roundtrip
# benchmark's whole budget per job; at DEBUG a disabled line costs nothing.
job_log = logging.getLogger("midbridge.jobs")
JOB_LOG_LEVEL = logging.DEBUG

# (records, done_id) → returns once durable
Submit = Callable[[list[dict[str, Any]], str | None], Awaitable[None]]


# Job durations, seconds: from a millisecond echo to a ten-minute sweep.
DURATION_BUCKETS = (
    0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0,
    60.0, 120.0, 300.0, 600.0, 1800.0,
)  # fmt: skip


@dataclass
class Counters:
    """The bridge's job counters, and its job metrics (a registry of the bridge's own)."""

    received: int = 0
    processed: int = 0
    failed: int = 0
    duplicates: int = 0
    rejected: int = 0
    by_kind: dict[str, int] = field(default_factory=dict)
    probe_seconds: dict[str, float] = field(default_factory=dict)
    registry: CollectorRegistry = field(default_factory=lambda: CollectorRegistry())

    def __post_init__(self) -> None:
        self.jobs_total = Counter(
            "midbridge_jobs",
            "Jobs answered, by topic and result (ok, or the error kind).",
            ["topic", "result"],
            registry=self.registry,
        )
        self.job_duration = Histogram(
            "midbridge_job_duration_seconds",
            "Time a job ran (from its worker slot to its answer; failed ones too), by topic.",
            ["topic"],
            buckets=DURATION_BUCKETS,
            registry=self.registry,
        )
        self._durations: dict[str, Any] = {}
        self._totals: dict[tuple[str, str], Any] = {}

    def topics(self, topics: Iterable[str]) -> None:
        """Start the series of these topics at zero (so that rates exist before a job)."""
        for topic in topics:
            self._duration(topic)
            self._total(topic, "ok")

    def _duration(self, topic: str) -> Any:
        child = self._durations.get(topic)
        if child is None:
            child = self._durations[topic] = self.job_duration.labels(topic)
        return child

    def _total(self, topic: str, result: str) -> Any:
        child = self._totals.get((topic, result))
        if child is None:
            child = self._totals[(topic, result)] = self.jobs_total.labels(topic, result)
        return child

    def failure(self, kind: str) -> None:
        self.failed += 1
        self.by_kind[kind] = self.by_kind.get(kind, 0) + 1

    def finished(
        self,
        record: OutputRecord | Rejected,
        lane: int | None,
        seconds: float | None,
        error: BridgeError | None = None,
    ) -> None:
        """One job answered: its metrics and its log line (WARNING when it failed)."""
        topic = record.topic or "?"
        result = "ok" if error is None else error.kind
        self._total(topic[:80], result).inc()
        if seconds is not None:
            self._duration(topic[:80]).observe(seconds)
        level = JOB_LOG_LEVEL if error is None else logging.WARNING
        if not job_log.isEnabledFor(level):
            return
        lane_name = LANE_NAMES[lane] if lane is not None and 0 <= lane < len(LANE_NAMES) else "-"
        duration_ms = round(seconds * 1000.0, 3) if seconds is not None else None
        fields: dict[str, Any] = {
            "topic": record.topic,
            "sys_id": record.sys_id,
            "agent_correlator": record.agent_correlator,
            "lane": lane_name,
            "duration_ms": duration_ms,
            "result": "ok" if error is None else "error",
        }
        if error is None:
            job_log.log(
                level,
                "job %s %s (correlator %s, lane %s): ok in %.1f ms",
                topic, record.sys_id, record.agent_correlator or "-", lane_name,
                duration_ms or 0.0, extra=fields,
            )  # fmt: skip
            return
        fields["error_kind"] = error.kind
        job_log.warning(
            "job %s %s (correlator %s, lane %s): %s after %s: %s",
            topic, record.sys_id, record.agent_correlator or "-", lane_name, error.kind,
            "-" if duration_ms is None else f"{duration_ms:.1f} ms", str(error)[:300],
            extra=fields,
        )  # fmt: skip


def chunk_record(
    record: OutputRecord,
    agent: str,
    sequence: int,
    payload: dict[str, Any],
    *,
    complete: bool,
    run: str,
    probe_time_ms: float | None = None,
) -> InputRecord:
    return answer(
        record,
        agent=agent,
        payload=payload,
        sequence=sequence,
        complete=complete,
        probe_time_ms=probe_time_ms,
        run=run,
    )


async def answer_rejected(
    item: OutputRecord | Rejected,
    error: BridgeError,
    agent: str,
    submit: Submit,
    counters: Counters,
) -> None:
    """One complete error record for a job that never ran.

    Its ``sys_id`` stays out of the dedupe ledger: a refused record proves nothing about
    the job of that id (a forged, unsigned one would otherwise make the bridge drop the
    real job as a duplicate). Only jobs that were admitted and ran are remembered.
    """
    counters.failure(error.kind)
    if isinstance(item, Rejected):
        counters.rejected += 1
    record = error_input(item, error, agent=agent)
    await submit([record.to_wire()], None)
    counters.finished(item, None, None, error)


async def run_job(
    record: OutputRecord,
    params: ProbeParams,
    spec: ProbeSpec,
    ctx: ProbeContext,
    *,
    scheduler: Scheduler,
    entry: RunningJob,
    default_timeout: float,
    submit: Submit,
    counters: Counters,
) -> None:
    """Run ``record`` to one complete answer (or none at all if the bridge shuts down)."""
    agent = ctx.agent
    sequence = 0
    held: dict[str, Any] | None = None
    started = time.perf_counter()
    run = new_sys_id()  # this execution; a rerun after a crash gets another

    async def fail(error: BridgeError) -> None:
        nonlocal sequence, held
        counters.failure(error.kind)
        if held is not None:  # keep the partial result: long sweeps are never all-or-nothing
            partial = chunk_record(record, agent, sequence, held, complete=False, run=run)
            held = None
            await submit([partial.to_wire()], None)
            sequence += 1
        elapsed = (time.perf_counter() - started) * 1000.0
        rec = chunk_record(
            record,
            agent,
            sequence,
            error_payload(error),
            complete=True,
            run=run,
            probe_time_ms=elapsed,
        )
        rec.error_string = f"{error.kind}: {error}"
        await submit([rec.to_wire()], record.sys_id)
        counters.finished(record, lane, elapsed / 1000.0, error)

    lane = CONTROL_LANE if spec.control else record.priority
    if record.expires_at is not None and time.time() > record.expires_at:
        await fail(Expired("the job expired before it started"))
        return
    try:
        async with scheduler.slot(lane, spec.target_host(params)):
            if record.expires_at is not None and time.time() > record.expires_at:
                raise Expired("the job expired while waiting for a worker")
            entry.started = True
            started = time.perf_counter()
            timeout = record.timeout or default_timeout
            try:
                async with asyncio.timeout(timeout):
                    agen = spec.run(Job(record, params), ctx)
                    try:
                        async for chunk in agen:
                            if held is not None:
                                rec = chunk_record(
                                    record, agent, sequence, held, complete=False, run=run
                                )
                                await submit([rec.to_wire()], None)
                                sequence += 1
                            held = chunk
                    finally:
                        aclose = getattr(agen, "aclose", None)
                        if aclose is not None:
                            await aclose()
            except TimeoutError:
                raise ProbeTimeout(f"the job did not finish within {timeout:g} s") from None
        elapsed = (time.perf_counter() - started) * 1000.0
        counters.probe_seconds[record.topic] = (
            counters.probe_seconds.get(record.topic, 0.0) + elapsed / 1000.0
        )
        final = chunk_record(
            record,
            agent,
            sequence,
            held if held is not None else {},
            complete=True,
            run=run,
            probe_time_ms=elapsed,
        )
        await submit([final.to_wire()], record.sys_id)
        counters.processed += 1
        counters.finished(record, lane, elapsed / 1000.0)
    except BridgeError as exc:
        await asyncio.shield(fail(exc))
    except asyncio.CancelledError:
        if entry.cancel_requested:
            # Cancelled on request: answer it, then end normally.
            task = asyncio.current_task()
            if task is not None:
                task.uncancel()
            await asyncio.shield(fail(Cancelled("the job was cancelled")))
            return
        raise  # the bridge is shutting down: no answer; the broker redelivers the job
    except Exception as exc:  # a probe bug: answer it, log it, never crash the bridge
        log.exception("probe %s failed on %s", record.topic, record.sys_id)
        await asyncio.shield(fail(BridgeError(f"internal error in probe: {type(exc).__name__}")))
