"""probes/kit/fanout.py: ``fan_out`` with plain asyncio steps (sleeps, events, counters)."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncGenerator, Callable, Coroutine
from dataclasses import dataclass, field
from typing import Any

import pytest

from probes.kit.fanout import fan_out

Step = Callable[[int], Coroutine[Any, Any, int]]


@dataclass
class Tracker:
    """Steps that sleep ``delay(target)`` s and record how many ran at once."""

    delay: Callable[[int], float] = lambda _target: 0.005
    running: int = 0
    peak: int = 0
    started: list[int] = field(default_factory=list)
    finished: list[int] = field(default_factory=list)
    cancelled: list[int] = field(default_factory=list)

    async def step(self, target: int) -> int:
        self.started.append(target)
        self.running += 1
        self.peak = max(self.peak, self.running)
        try:
            await asyncio.sleep(self.delay(target))
        except asyncio.CancelledError:
            self.cancelled.append(target)
            raise
        finally:
            self.running -= 1
        self.finished.append(target)
        return target * 10


async def collect(stream: AsyncGenerator[list[int], None]) -> list[list[int]]:
    batches: list[list[int]] = []
    async with asyncio.timeout(5), contextlib.aclosing(stream) as items:
        async for batch in items:
            batches.append(batch)
    return batches


def other_tasks() -> set[asyncio.Task[Any]]:
    return {t for t in asyncio.all_tasks() if t is not asyncio.current_task()}


async def test_one_worker_keeps_the_order_of_the_targets_in_chunks() -> None:
    budget = asyncio.Semaphore(4)
    tracker = Tracker()
    batches = await collect(fan_out(range(7), tracker.step, limit=1, budget=budget, chunk=3))
    assert batches == [[0, 10, 20], [30, 40, 50], [60]]
    assert tracker.peak == 1
    assert budget._value == 4
    assert other_tasks() == set()


async def test_results_come_in_completion_order() -> None:
    tracker = Tracker(delay=lambda target: 0.01 * (6 - target))  # the last target ends first
    budget = asyncio.Semaphore(10)
    batches = await collect(fan_out(range(6), tracker.step, limit=6, budget=budget, chunk=4))
    assert batches == [[50, 40, 30, 20], [10, 0]]
    assert tracker.started == [0, 1, 2, 3, 4, 5]  # the targets are taken in order
    assert budget._value == 10


async def test_a_chunk_is_yielded_as_soon_as_it_is_full() -> None:
    gate = asyncio.Event()

    async def step(target: int) -> int:
        if target >= 2:
            await gate.wait()  # held until the first chunk was seen
        return target

    budget = asyncio.Semaphore(4)
    stream = fan_out(range(4), step, limit=4, budget=budget, chunk=2)
    async with asyncio.timeout(5), contextlib.aclosing(stream):
        assert sorted(await anext(stream)) == [0, 1]
        gate.set()
        assert sorted(await anext(stream)) == [2, 3]
        with pytest.raises(StopAsyncIteration):
            await anext(stream)
    assert budget._value == 4


async def test_the_limit_bounds_the_steps_at_once() -> None:
    tracker = Tracker()
    budget = asyncio.Semaphore(100)
    batches = await collect(fan_out(range(20), tracker.step, limit=3, budget=budget, chunk=5))
    assert tracker.peak == 3
    assert sorted(x for batch in batches for x in batch) == [t * 10 for t in range(20)]
    assert [len(batch) for batch in batches] == [5, 5, 5, 5]
    assert budget._value == 100
    assert other_tasks() == set()


async def test_two_fan_outs_share_the_budget() -> None:
    budget = asyncio.Semaphore(3)
    total = Tracker()

    def tracked() -> tuple[Tracker, Step]:
        own = Tracker()

        async def step(target: int) -> int:
            total.running += 1
            total.peak = max(total.peak, total.running)
            try:
                return await own.step(target)
            finally:
                total.running -= 1

        return own, step

    first, first_step = tracked()
    second, second_step = tracked()
    results = await asyncio.gather(
        collect(fan_out(range(10), first_step, limit=3, budget=budget, chunk=4)),
        collect(fan_out(range(10), second_step, limit=3, budget=budget, chunk=4)),
    )
    assert total.peak == 3  # never more than the budget, both jobs together
    assert first.peak + second.peak >= 3
    for batches in results:
        assert sorted(x for batch in batches for x in batch) == [t * 10 for t in range(10)]
    assert budget._value == 3
    assert other_tasks() == set()


async def test_with_a_budget_of_one_jobs_are_served_in_turn() -> None:
    """A worker keeps its slot while its job has targets: the second job waits."""
    budget = asyncio.Semaphore(1)
    order: list[str] = []

    def step_of(name: str) -> Step:
        async def step(target: int) -> int:
            order.append(f"{name}{target}")
            await asyncio.sleep(0.002)
            return target

        return step

    await asyncio.gather(
        collect(fan_out(range(3), step_of("a"), limit=2, budget=budget, chunk=10)),
        collect(fan_out(range(3), step_of("b"), limit=2, budget=budget, chunk=10)),
    )
    assert order == ["a0", "a1", "a2", "b0", "b1", "b2"]
    assert budget._value == 1


async def test_closing_midway_cancels_the_steps_and_frees_the_budget() -> None:
    tracker = Tracker(delay=lambda target: 0.001 if target == 0 else 10.0)
    budget = asyncio.Semaphore(5)
    stream = fan_out(range(8), tracker.step, limit=4, budget=budget, chunk=1)
    async with asyncio.timeout(5):
        assert await anext(stream) == [0]
        assert budget._value == 1  # four workers, four slots
        await stream.aclose()
    assert sorted(tracker.cancelled) == [1, 2, 3, 4]  # the ones under way; 5-7 never started
    assert tracker.finished == [0]
    assert tracker.running == 0
    assert budget._value == 5
    assert other_tasks() == set()


async def test_cancelling_consumers_while_a_job_waits_for_the_budget() -> None:
    budget = asyncio.Semaphore(2)
    tracker = Tracker(delay=lambda _target: 10.0)
    hog = fan_out(range(2), tracker.step, limit=2, budget=budget, chunk=1)
    starved = fan_out(range(2), tracker.step, limit=2, budget=budget, chunk=1)
    async with asyncio.timeout(5):
        hogging = asyncio.ensure_future(anext(hog))
        waiting = asyncio.ensure_future(anext(starved))
        await asyncio.sleep(0.02)
        assert budget._value == 0
        assert tracker.started == [0, 1]  # the starved job has no worker
        waiting.cancel()
        hogging.cancel()
        await asyncio.gather(hogging, waiting, return_exceptions=True)
        await starved.aclose()
        await hog.aclose()
    assert budget._value == 2
    assert tracker.running == 0
    assert other_tasks() == set()


class Boom(Exception):
    pass


async def test_a_step_raising_propagates_and_cancels_the_others() -> None:
    tracker = Tracker(delay=lambda _target: 10.0)
    budget = asyncio.Semaphore(6)

    async def step(target: int) -> int:
        if target == 3:
            await asyncio.sleep(0.01)
            raise Boom("step 3")
        return await tracker.step(target)

    stream = fan_out(range(10), step, limit=4, budget=budget, chunk=2)
    with pytest.raises(Boom, match="step 3"):
        await collect(stream)
    assert sorted(tracker.cancelled) == [0, 1, 2]
    assert tracker.finished == []
    assert tracker.running == 0
    assert budget._value == 6
    assert other_tasks() == set()


async def test_a_step_raising_after_chunks_were_taken() -> None:
    budget = asyncio.Semaphore(2)

    async def step(target: int) -> int:
        await asyncio.sleep(0.001)
        if target == 5:
            raise Boom("late")
        return target

    seen: list[list[int]] = []

    async def drain() -> None:
        stream = fan_out(range(10), step, limit=1, budget=budget, chunk=2)
        async with asyncio.timeout(5), contextlib.aclosing(stream):
            async for batch in stream:
                seen.append(batch)

    with pytest.raises(Boom, match="late"):
        await drain()
    assert seen == [[0, 1], [2, 3]]  # results before the failure were delivered
    assert budget._value == 2
    assert other_tasks() == set()


async def test_no_targets_and_bad_arguments() -> None:
    budget = asyncio.Semaphore(2)
    tracker = Tracker()
    assert await collect(fan_out([], tracker.step, limit=3, budget=budget, chunk=2)) == []
    assert budget._value == 2
    for limit, chunk in ((0, 1), (1, 0)):
        with pytest.raises(ValueError, match="at least 1"):
            await collect(fan_out([1], tracker.step, limit=limit, budget=budget, chunk=chunk))
    assert tracker.started == []


async def test_a_job_holds_no_more_budget_than_it_has_targets() -> None:
    budget = asyncio.Semaphore(100)
    free: list[int] = []

    async def step(target: int) -> int:
        free.append(budget._value)
        await asyncio.sleep(0.001)
        return target

    batches = await collect(fan_out(range(2), step, limit=50, budget=budget, chunk=10))
    assert [sorted(batch) for batch in batches] == [[0, 1]]
    assert free == [98, 98]  # two targets: two workers, two slots (not fifty)
    assert budget._value == 100


async def test_a_finished_job_ends_without_waiting_for_a_slot_it_does_not_need() -> None:
    """Its spawner may wait for a second slot it would not use; the job ends anyway, as
    soon as its own worker is done (not when another job frees a slot)."""
    budget = asyncio.Semaphore(2)

    async def nap(seconds: float) -> float:
        await asyncio.sleep(seconds)
        return seconds

    async def run(targets: list[float], limit: int) -> list[float]:
        got: list[float] = []
        async for batch in fan_out(targets, nap, limit=limit, budget=budget, chunk=100):
            got += batch
        return got

    loop = asyncio.get_running_loop()
    started = loop.time()
    slow = asyncio.create_task(run([0.3], 1))  # holds a slot for the whole test
    other = asyncio.create_task(run([0.05], 1))  # holds the other, then frees it
    await asyncio.sleep(0.01)
    waiting = asyncio.create_task(run([3.0], 1))  # takes the slot the other frees
    await asyncio.sleep(0.01)
    small = asyncio.create_task(run([0.01, 0.01], 2))  # one slot when slow ends, asks two
    async with asyncio.timeout(5):
        assert await small == [0.01, 0.01]
        took = loop.time() - started
        assert await slow == [0.3]
        assert await other == [0.05]
    assert took < 1.0  # not when ``waiting`` frees its slot, 3 s in
    waiting.cancel()
    with contextlib.suppress(asyncio.CancelledError):
        await waiting
    assert budget._value == 2
