"""Running one job: the caller's side of the probe contract.

The runner applies the deadline, times the probe, turns each chunk into an input record
(``sequence`` 0, 1, ...; the last one ``complete``), turns every failure into an error
record, and counts. Probes stay plain async generators.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

from bridge.agent.scheduler import CONTROL_LANE, RunningJob, Scheduler
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

# (records, done_id) → returns once durable
Submit = Callable[[list[dict[str, Any]], str | None], Awaitable[None]]


@dataclass
class Counters:
    received: int = 0
    processed: int = 0
    failed: int = 0
    duplicates: int = 0
    rejected: int = 0
    by_kind: dict[str, int] = field(default_factory=dict)
    probe_seconds: dict[str, float] = field(default_factory=dict)

    def failure(self, kind: str) -> None:
        self.failed += 1
        self.by_kind[kind] = self.by_kind.get(kind, 0) + 1


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

    if record.expires_at is not None and time.time() > record.expires_at:
        await fail(Expired("the job expired before it started"))
        return
    try:
        lane = CONTROL_LANE if spec.control else record.priority
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
