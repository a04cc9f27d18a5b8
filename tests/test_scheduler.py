"""Scheduler unit tests with fake jobs: lanes, per-host cap, cancellation, rate budget."""

from __future__ import annotations

import asyncio
import time

from bridge.agent.scheduler import Admission, RunningJob, Scheduler
from probes.kit.ratelimit import RateLimiter


async def test_interactive_lane_is_not_blocked_by_a_full_standard_lane() -> None:
    sched = Scheduler((2, 2, 3), per_host=10)
    release = asyncio.Event()
    holders = []

    async def sweep() -> None:
        async with sched.slot(2, None):
            await release.wait()

    holders = [asyncio.create_task(sweep()) for _ in range(10)]
    await asyncio.sleep(0.01)
    assert sched.lane_running[2] == 3
    assert sched.lane_waiting[2] == 7
    started = time.perf_counter()
    async with asyncio.timeout(1):
        async with sched.slot(0, None):
            waited = time.perf_counter() - started
    assert waited < 0.05
    release.set()
    await asyncio.gather(*holders)
    assert sched.lane_running == [0, 0, 0, 0]


async def test_per_host_cap() -> None:
    sched = Scheduler((50, 50, 50), per_host=3)
    peak = 0
    now = 0

    async def job(host: str) -> None:
        nonlocal peak, now
        async with sched.slot(2, host):
            now += 1
            peak = max(peak, now)
            await asyncio.sleep(0.01)
            now -= 1

    await asyncio.gather(*(job("10.0.0.1") for _ in range(20)))
    assert peak == 3
    assert not sched._hosts  # slots of idle hosts are dropped
    peak = 0
    await asyncio.gather(*(job(f"10.0.0.{i % 5}") for i in range(20)))
    assert peak > 3  # different hosts run side by side


async def test_cancel_by_sys_id() -> None:
    sched = Scheduler((1, 1, 1), per_host=1)
    loop = asyncio.get_running_loop()
    entry = RunningJob("job-1", 2, loop.create_future())
    entry.task = asyncio.create_task(asyncio.sleep(30))
    sched.running["job-1"] = entry
    assert sched.cancel("job-1")
    assert entry.cancel_requested
    assert not sched.cancel("nope")
    await asyncio.sleep(0)
    assert entry.task.cancelled()


async def test_admission_bounds_jobs_in_flight() -> None:
    adm = Admission(2)
    await adm.acquire()
    await adm.acquire()
    third = asyncio.create_task(adm.acquire())
    await asyncio.sleep(0.01)
    assert not third.done()
    adm.release()
    await asyncio.wait_for(third, 1)
    assert adm.in_flight == 2


async def test_rate_limiter_paces_and_unlimited_does_not() -> None:
    unlimited = RateLimiter(0)
    assert unlimited.take(10_000) == (10_000, 0.0)
    limiter = RateLimiter(1000, burst=10)
    started = time.perf_counter()
    granted = 0
    async with asyncio.timeout(5):
        while granted < 300:
            granted += await limiter.acquire(10)
    elapsed = time.perf_counter() - started
    assert 0.2 < elapsed < 2.0  # ~0.29 s for 290 tokens past the burst at 1000/s
