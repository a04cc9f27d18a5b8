"""Scheduling: priority lanes, a cap per target host, and the registry of running jobs.

- Four lanes (0 interactive, 1 expedited, 2 standard, 3 control), each with its own bound
  of running jobs, so a lane full of sweeps never delays interactive work, and heartbeats
  and SystemCommands have a lane of their own.
- A cap of concurrent jobs against one target host.
- The running jobs by ``sys_id``: duplicates attach to the running one, ``cancel`` stops one.
The global cap of jobs in flight is applied at intake (``Admission``).
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass, field

CONTROL_LANE = 3  # heartbeats and SystemCommands: never behind other work
CONTROL_WORKERS = 8
LANE_NAMES = ("interactive", "expedited", "standard", "control")


@dataclass(slots=True)
class RunningJob:
    sys_id: str
    lane: int
    done: asyncio.Future[None]  # resolved once the job's final record is durable
    task: asyncio.Task[None] | None = None
    cancel_requested: bool = False
    started: bool = False


class Admission:
    """The global cap of jobs in flight (accepted, result not yet durable)."""

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self._sem = asyncio.Semaphore(limit)
        self.in_flight = 0

    async def acquire(self) -> None:
        await self._sem.acquire()
        self.in_flight += 1

    def release(self) -> None:
        self.in_flight -= 1
        self._sem.release()


@dataclass(slots=True)
class _HostSlot:
    sem: asyncio.Semaphore
    users: int = 0


class _Slot:
    """``async with scheduler.slot(lane, host)``: a plain class, cheaper than a generator."""

    __slots__ = ("_host", "_host_slot", "_lane", "_sched")

    def __init__(self, sched: Scheduler, lane: int, host: str | None) -> None:
        self._sched = sched
        self._lane = lane
        self._host = host
        self._host_slot: _HostSlot | None = None

    async def __aenter__(self) -> None:
        self._host_slot = await self._sched._enter(self._lane, self._host)

    async def __aexit__(self, *exc: object) -> None:
        self._sched._leave(self._lane, self._host, self._host_slot)


@dataclass
class Scheduler:
    lane_workers: tuple[int, int, int]
    per_host: int
    running: dict[str, RunningJob] = field(default_factory=dict)
    lane_running: list[int] = field(default_factory=lambda: [0, 0, 0, 0])
    lane_waiting: list[int] = field(default_factory=lambda: [0, 0, 0, 0])

    def __post_init__(self) -> None:
        workers = (*self.lane_workers, CONTROL_WORKERS)
        self._lanes = [asyncio.Semaphore(n) for n in workers]
        self._hosts: dict[str, _HostSlot] = {}

    def slot(self, lane: int, host: str | None) -> _Slot:
        """Hold a worker of ``lane`` (and of ``host``) for the duration of a job."""
        return _Slot(self, lane, host)

    async def _enter(self, lane: int, host: str | None) -> _HostSlot | None:
        self.lane_waiting[lane] += 1
        try:
            await self._lanes[lane].acquire()
        finally:
            self.lane_waiting[lane] -= 1
        self.lane_running[lane] += 1
        if host is None:
            return None
        slot = self._hosts.get(host)
        if slot is None:
            slot = self._hosts[host] = _HostSlot(asyncio.Semaphore(self.per_host))
        slot.users += 1
        try:
            await slot.sem.acquire()
        except BaseException:
            self._leave(lane, host, slot, acquired=False)
            raise
        return slot

    def _leave(
        self, lane: int, host: str | None, slot: _HostSlot | None, *, acquired: bool = True
    ) -> None:
        if host is not None and slot is not None:
            if acquired:
                slot.sem.release()
            slot.users -= 1
            if slot.users == 0:
                del self._hosts[host]
        self.lane_running[lane] -= 1
        self._lanes[lane].release()

    def cancel(self, sys_id: str) -> bool:
        job = self.running.get(sys_id)
        if job is None or job.task is None:
            return False
        job.cancel_requested = True
        job.task.cancel()
        return True
