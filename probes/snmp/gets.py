"""Hosts jobs of GETs, driven from the event loop's callbacks: no task, no future a request.

A poller's job names many agents and a few OIDs (``hosts`` and ``get`` lines only, one
credential). :func:`probes.snmp.probe.run_many` hands such a job here. Each of up to
``concurrency`` *lanes* holds a slot of the pool's budget and works through the agents
one after the other, without a coroutine in between:

* take a pooled session at once (:meth:`SnmpPool.enter_now`), send the GET, and register
  the request with the session's lasting reader and the pool's deadline buckets;
* on readable: read the answer in the callback, build the agent's entry, give the session
  back, and send the next agent's GET;
* on a deadline: send again while tries are left, else an error entry (``timeout``).

An agent whose sessions are all busy (another job is asking it) is put off until the
lane has started the others. Whatever would wait (a host name to resolve, an agent still
busy then, a new v3 session, an agent that lacks one of the OIDs, a full send buffer)
goes to the coroutine step instead
(``fallback``, :func:`probes.snmp.probe._gets_step`), which the lane waits for. Both give
the same entry (:func:`probes.snmp.operations.gets_entry`).

Measured against 200 snmpd agents (callgrind, the SNMP probe alone): the coroutine step
costs ~100k instructions a GET, the bare gufo-snmp loop ~76k; see docs/benchmarks.md.
"""

from __future__ import annotations

import asyncio
import collections
from collections.abc import AsyncGenerator, Callable, Coroutine, Iterator, Sequence
from typing import Any

from gufo.snmp import SnmpDecodeError

from bridge.wire.credentials import Credential
from bridge.wire.errors import BridgeError, ProtocolError
from probes.snmp.client import Policy, silence
from probes.snmp.credentials import fingerprint
from probes.snmp.errors import refused, sound, translate
from probes.snmp.operations import failed_entry, gets_entry
from probes.snmp.params import ip_literal
from probes.snmp.pool import Group, Pooled, SnmpPool
from probes.snmp.versions import Version

Item = tuple[int, str]  # (index in hosts, host)
Entry = dict[str, Any]


class _Attempt:
    """One sending of a lane's GET: what its reader and its deadline call back."""

    __slots__ = ("lane",)

    def __init__(self, lane: _Lane) -> None:
        self.lane: _Lane | None = lane

    def wake(self) -> None:
        lane = self.lane
        if lane is not None:
            try:
                lane.readable()
            except BaseException as exc:
                lane.sweep.fail(exc)

    def expire(self) -> None:
        lane = self.lane
        if lane is not None:
            lane.guarded(lane.timed_out)


class _Lane:
    """One budget slot working through the job's agents, one GET at a time."""

    __slots__ = (
        "address",
        "attempt",
        "carried",
        "group",
        "item",
        "pooled",
        "requests",
        "sweep",
        "task",
        "tries",
    )

    def __init__(self, sweep: GetSweep) -> None:
        self.sweep = sweep
        self.item: Item = (0, "")
        self.address = ""
        self.group: Group | None = None
        self.pooled: Pooled | None = None
        self.attempt: _Attempt | None = None
        self.task: asyncio.Task[Entry] | None = None
        self.tries = 0
        self.requests = 0
        self.carried = 0  # requests sent before a hand-over to the coroutine step

    def guarded(self, action: Callable[[], None]) -> None:
        """Run a callback's work; a bug ends the job instead of stalling the lane."""
        try:
            action()
        except BaseException as exc:
            self.sweep.fail(exc)

    def run_next(self) -> None:
        """Start the next agent; the lane ends when there is none."""
        sweep = self.sweep
        while not sweep.closed:
            item = next(sweep.pending, None)
            if item is not None:
                sweep.left -= 1
                last_try = False
            elif sweep.deferred:
                item = sweep.deferred.popleft()
                last_try = True
            else:
                break
            if self.begin(item, last_try=last_try):
                return  # waiting for an answer or for the coroutine step
        sweep.lane_ended(self)

    def begin(self, item: Item, *, last_try: bool = True) -> bool:
        """``True``: a request (or a fallback) is under way; ``False``: the entry is made,
        or the agent is busy and was put off until the others are started."""
        sweep = self.sweep
        self.item = item
        self.requests = 0
        address = ip_literal(item[1])
        if address is None:
            return self.delegate(item)
        pool = sweep.pool
        try:
            group = pool.group_of(address, sweep.port, sweep.version, sweep.fingerprint)
            pooled = pool.enter_now(group, address, sweep.port, sweep.version, sweep.cred)
        except BridgeError as exc:
            sweep.add(failed_entry(item[0], item[1], exc, 0))
            return False
        if pooled is None:
            if not last_try and sweep.version != "3":  # busy (another job?): come back to it
                sweep.deferred.append(item)
                return False
            return self.delegate(item)
        self.address = address
        self.group = group
        self.pooled = pooled
        self.tries = sweep.policy.tries
        self.requests = 0
        return self.send()

    def send(self) -> bool:
        pooled = self.pooled
        assert pooled is not None
        assert pooled.reader is not None
        self.tries -= 1
        try:
            pooled.session._sock.send_get_many(self.sweep.ask)
        except BlockingIOError:  # the send buffer is full: the coroutine step waits for it
            self.release(keep=True)
            return self.delegate(self.item)
        except BaseException as exc:
            error = translate(exc)
            if not isinstance(error, BridgeError):
                raise
            self.finish_error(error)
            return False
        self.requests += 1
        attempt = self.attempt = _Attempt(self)
        pooled.reader.waiter = attempt
        self.sweep.pool.deadlines.add(attempt, self.sweep.policy.timeout)
        return True

    def end_attempt(self) -> None:
        if self.attempt is not None:
            self.attempt.lane = None
            self.attempt = None
        if self.pooled is not None and self.pooled.reader is not None:
            self.pooled.reader.waiter = None

    def readable(self) -> None:
        pooled = self.pooled
        assert pooled is not None
        error: BridgeError | None = None
        values: dict[str, Any] = {}
        try:
            values = pooled.session._sock.recv_get_many()
        except BlockingIOError:
            return  # an answer to an earlier request (the library checks ids): wait on
        except (SnmpDecodeError, StopAsyncIteration):
            error = ProtocolError("the agent's answer did not decode")
        except TimeoutError:  # gufo-snmp reports ICMP port unreachable so
            error = refused()
        except BaseException as exc:
            translated = translate(exc)
            if not isinstance(translated, BridgeError):
                raise
            error = translated
        self.end_attempt()
        if error is not None:
            self.finish_error(error)
        elif len(values) < len(ask := self.sweep.ask) or any(o not in values for o in ask):
            # An OID the agent lacks (or answered with another OID): the coroutine step
            # asks again and tells which kind.
            self.release(keep=True)
            if self.delegate(self.item):
                return
        else:
            sweep = self.sweep
            index, host = self.item
            entry = gets_entry(index, host, self.address, sweep.oids, values, self.requests)
            self.release(keep=True)
            sweep.add(entry)
        self.run_next()

    def timed_out(self) -> None:
        self.end_attempt()
        if self.tries > 0:
            if self.send():
                return
        else:
            self.finish_error(silence(self.sweep.policy, self.sweep.version))
        self.run_next()

    def release(self, *, keep: bool) -> None:
        if self.group is not None:
            self.sweep.pool.leave(self.group, self.pooled, keep)
        self.group = None
        self.pooled = None

    def finish_error(self, error: BridgeError) -> None:
        self.release(keep=sound(error))
        index, host = self.item
        self.sweep.add(failed_entry(index, host, error, self.requests))

    def delegate(self, item: Item) -> bool:
        """Hand the agent to the coroutine step; the lane goes on when it is done. The
        requests this lane already sent the agent are added to its entry."""
        self.carried = self.requests if self.item is item else 0
        task = self.sweep.loop.create_task(self.sweep.fallback(item))
        self.task = task
        task.add_done_callback(self.delegated)
        return True

    def delegated(self, task: asyncio.Task[Entry]) -> None:
        self.task = None
        if task.cancelled():
            return
        exc = task.exception()
        if exc is not None:
            self.sweep.fail(exc)
            return
        entry = task.result()
        if self.carried:
            entry["requests"] = entry.get("requests", 0) + self.carried
        self.sweep.add(entry)
        self.guarded(self.run_next)

    def abort(self) -> None:
        """The job is over: give the session back (a late answer is dropped by its reader)."""
        self.end_attempt()
        self.release(keep=True)
        if self.task is not None:
            self.task.cancel()


class GetSweep:
    """The shared state of one job's lanes."""

    def __init__(
        self,
        targets: Sequence[Item],
        *,
        oids: list[str],
        ask: list[str],
        cred: Credential,
        pool: SnmpPool,
        port: int,
        version: Version,
        policy: Policy,
        chunk: int,
        fallback: Callable[[Item], Coroutine[Any, Any, Entry]],
    ) -> None:
        self.pending: Iterator[Item] = iter(targets)
        self.left = len(targets)  # not yet taken from pending
        self.deferred: collections.deque[Item] = collections.deque()  # busy when first tried
        self.oids = oids  # every OID of the get lines, in order: the entry's varbinds
        self.ask = ask  # the distinct ones: the request
        self.cred = cred
        self.fingerprint = fingerprint(cred)
        self.pool = pool
        self.port = port
        self.version: Version = version
        self.policy = policy
        self.chunk = chunk
        self.fallback = fallback
        self.loop = asyncio.get_running_loop()
        self.done: list[Entry] = []
        self.failures: list[BaseException] = []
        self.lanes: set[_Lane] = set()
        self.ready = asyncio.Event()
        self.closed = False

    def add(self, entry: Entry) -> None:
        self.done.append(entry)
        if len(self.done) >= self.chunk:
            self.ready.set()

    def fail(self, exc: BaseException) -> None:
        self.failures.append(exc)
        self.ready.set()

    def lane_ended(self, lane: _Lane) -> None:
        if lane in self.lanes:
            self.lanes.discard(lane)
            self.pool.budget.release()
        self.ready.set()

    async def spawn(self, limit: int) -> None:
        """A lane for each budget slot won, up to ``limit``, while agents are left."""
        for _ in range(min(limit, self.left)):
            await self.pool.budget.acquire()
            if (self.left <= 0 and not self.deferred) or self.failures or self.closed:
                self.pool.budget.release()
                return
            lane = _Lane(self)
            self.lanes.add(lane)
            lane.guarded(lane.run_next)

    def close(self) -> None:
        self.closed = True
        for lane in list(self.lanes):
            lane.abort()
            self.lane_ended(lane)


async def sweep_gets(sweep: GetSweep, *, limit: int) -> AsyncGenerator[list[Entry], None]:
    """The agents' entries in completion order, in lists of at most ``sweep.chunk``;
    ``limit`` lanes at most."""
    chunk = sweep.chunk
    spawner = sweep.loop.create_task(sweep.spawn(limit))
    spawner.add_done_callback(lambda _task: sweep.ready.set())
    try:
        while True:
            if sweep.failures:
                raise sweep.failures[0]
            if spawner.done() and spawner.exception() is not None:
                raise spawner.exception()  # type: ignore[misc]
            # Over when every agent was taken and no lane runs (the spawner may still wait
            # for a budget slot it no longer needs: it is cancelled below).
            over = not sweep.lanes and (spawner.done() or (sweep.left <= 0 and not sweep.deferred))
            done = sweep.done
            if over or len(done) >= chunk:
                if not done:
                    return  # over, and every entry was handed over
                batch = done[:chunk]
                del done[:chunk]
                yield batch
                continue
            sweep.ready.clear()
            await sweep.ready.wait()
    finally:
        spawner.cancel()
        tasks = [lane.task for lane in sweep.lanes if lane.task is not None]
        sweep.close()
        await asyncio.gather(spawner, *tasks, return_exceptions=True)
