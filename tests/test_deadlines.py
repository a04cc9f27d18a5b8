"""probes.kit.deadlines: one timer for the timeouts of many operations in flight."""

from __future__ import annotations

import asyncio
import contextlib
import time

import pytest

from probes.kit.deadlines import Deadlines, Expiry


async def _sleep_with_deadline(
    deadlines: Deadlines, timeout: float, sleep: float, started: list[Expiry] | None = None
) -> str:
    expiry = deadlines.start(timeout)
    if started is not None:
        started.append(expiry)
    try:
        await asyncio.sleep(sleep)
    except asyncio.CancelledError:
        if not expiry.timed_out():
            raise
        return "timed out"
    finally:
        deadlines.end(expiry)
    return "done"


async def test_an_operation_past_its_deadline_is_cancelled_not_before() -> None:
    deadlines = Deadlines(step=0.01)
    started = time.monotonic()
    assert await _sleep_with_deadline(deadlines, 0.1, 5) == "timed out"
    took = time.monotonic() - started
    assert 0.1 <= took < 1.0
    assert len(deadlines) == 0


async def test_an_operation_within_its_deadline_finishes_and_leaves_nothing_behind() -> None:
    deadlines = Deadlines(step=0.01)
    results = await asyncio.gather(*(_sleep_with_deadline(deadlines, 1.0, 0.02) for _ in range(50)))
    assert results == ["done"] * 50
    assert len(deadlines) == 0
    await asyncio.sleep(0.05)
    assert deadlines._timer is None  # no timer runs while nothing is in flight


async def test_mixed_timeouts_expire_each_at_its_own_deadline() -> None:
    deadlines = Deadlines(step=0.01)
    results = await asyncio.gather(
        _sleep_with_deadline(deadlines, 2.0, 0.3),  # long timeout first in time
        _sleep_with_deadline(deadlines, 0.1, 5),
        _sleep_with_deadline(deadlines, 2.0, 5),
    )
    assert list(results) == ["done", "timed out", "timed out"]


async def test_the_task_goes_on_uncancelled_after_a_timeout() -> None:
    deadlines = Deadlines(step=0.01)

    async def two_in_turn() -> list[str]:
        first = await _sleep_with_deadline(deadlines, 0.05, 5)
        second = await _sleep_with_deadline(deadlines, 1.0, 0.05)  # not hit by the first
        await asyncio.sleep(0.05)
        return [first, second]

    assert await two_in_turn() == ["timed out", "done"]


async def test_a_cancel_from_outside_wins_over_a_deadline() -> None:
    deadlines = Deadlines(step=0.01)
    task = asyncio.create_task(_sleep_with_deadline(deadlines, 5.0, 5))
    await asyncio.sleep(0.02)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    assert len(deadlines) == 0


async def test_outside_cancel_and_deadline_together_still_cancel() -> None:
    deadlines = Deadlines(step=0.01)
    started: list[Expiry] = []
    task = asyncio.create_task(_sleep_with_deadline(deadlines, 5.0, 5, started))
    await asyncio.sleep(0)
    started[0].expire()  # the deadline and a cancel from outside land on the same await
    task.cancel()
    await asyncio.sleep(0.05)
    assert task.cancelled()
    assert len(deadlines) == 0


def test_start_outside_a_task_is_refused() -> None:
    with pytest.raises(RuntimeError):  # no running loop, so no task
        Deadlines().start(1.0)
    with pytest.raises(ValueError, match="step"):
        Deadlines(step=0)


async def test_a_swallowed_cancel_is_sent_again_and_taken_back_at_the_end() -> None:
    deadlines = Deadlines(step=0.01)

    async def swallows_once() -> tuple[str, int]:
        expiry = deadlines.start(0.02)
        try:
            with contextlib.suppress(asyncio.CancelledError):
                await asyncio.sleep(5)  # a library that eats the first cancel
            await asyncio.sleep(5)  # the next check cancels again
        except asyncio.CancelledError:
            if not expiry.timed_out():
                raise
            return "timed out", asyncio.current_task().cancelling()  # type: ignore[union-attr]
        finally:
            deadlines.end(expiry)
        return "done", 0

    started = time.monotonic()
    assert await asyncio.wait_for(swallows_once(), 2) == ("timed out", 0)
    assert time.monotonic() - started < 1.0
    assert len(deadlines) == 0


async def test_a_swallowed_cancel_does_not_stay_on_the_task() -> None:
    deadlines = Deadlines(step=0.01)

    async def swallows_and_finishes() -> int:
        expiry = deadlines.start(0.02)
        try:
            with contextlib.suppress(asyncio.CancelledError):
                await asyncio.sleep(5)
        finally:
            deadlines.end(expiry)
        task = asyncio.current_task()
        assert task is not None
        await asyncio.sleep(0.05)  # not cancelled again once ended
        return task.cancelling()

    assert await swallows_and_finishes() == 0
    assert len(deadlines) == 0
