"""One job, many targets: run a step per target, a few at a time, and stream what finished.

A job that names many targets (an SNMP job over a host list, a RESTProbe job over a URL
list) pays the ECC pipeline once (decode, admission, lane, outbox, publish) and shares it
among its targets. :func:`fan_out` is the loop inside such a probe:

* up to ``limit`` workers per job take the targets in order. A worker is made only once it
  has won a slot of ``budget``, a semaphore shared by all jobs of the probe (the bridge's
  requests in flight for that protocol), and holds it while its job has targets left: a
  hundred jobs of a hundred targets do not start ten thousand requests (or keep ten
  thousand tasks waiting), and jobs are served in the order they came. Workers, not a
  task per target (a task costs about 10 µs, as much as an SNMP GET), and a slot per
  worker, not per step (handing the slot to another job's worker after every step cost
  as much again);
* finished steps come back in completion order, in lists of at most ``chunk``, as soon as
  ``chunk`` of them are ready (and the rest at the end): the probe yields each list as a
  result chunk while the other steps go on.

``step`` turns its target's own failures into a result (an error entry): what it raises
is a bug or a cancellation, which stops the job's other steps and propagates. Closing the
generator (the job's deadline, a cancel, the bridge stopping) cancels the steps still
running and waits for them.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncGenerator, Callable, Coroutine, Iterator, Sequence
from typing import Any, TypeVar

T = TypeVar("T")
R = TypeVar("R")


async def fan_out(
    targets: Sequence[T],
    step: Callable[[T], Coroutine[Any, Any, R]],
    *,
    limit: int,
    budget: asyncio.Semaphore,
    chunk: int,
) -> AsyncGenerator[list[R], None]:
    """``step(target)`` for every target: ``limit`` workers, each step holding a ``budget`` slot."""
    if limit < 1 or chunk < 1:
        raise ValueError("limit and chunk must be at least 1")
    done: list[R] = []
    failures: list[BaseException] = []
    ready = asyncio.Event()
    pending: Iterator[T] = iter(targets)
    left = len(targets)  # targets no worker has taken yet
    loop = asyncio.get_running_loop()
    running: set[asyncio.Task[None]] = set()

    async def worker() -> None:
        nonlocal left
        # It holds its budget slot while the job has targets: jobs are served in turn.
        for target in pending:
            left -= 1
            done.append(await step(target))
            if len(done) >= chunk:  # wake the consumer for a whole chunk, not each step
                ready.set()

    def ended(task: asyncio.Task[None]) -> None:
        running.discard(task)
        if not task.cancelled() and task.exception() is not None:
            failures.append(task.exception())  # type: ignore[arg-type]
        ready.set()

    def worker_ended(task: asyncio.Task[None]) -> None:
        budget.release()  # here, not in the worker: a task cancelled unstarted runs no code
        ended(task)

    async def spawn() -> None:
        """A worker for each budget slot won, up to ``limit``: no worker waits for a slot."""
        for _ in range(min(limit, len(targets))):  # a worker per target at most
            await budget.acquire()
            if left <= 0 or failures:
                budget.release()
                return
            task = loop.create_task(worker())
            running.add(task)
            task.add_done_callback(worker_ended)

    spawner = loop.create_task(spawn())
    running.add(spawner)
    spawner.add_done_callback(ended)
    try:
        while True:
            if failures:
                raise failures[0]
            # Over when every target was taken and no worker runs: the spawner may still
            # wait for a budget slot it no longer needs (it is cancelled below).
            over = not (running - {spawner}) and (left <= 0 or spawner.done())
            if len(done) >= chunk or (done and over):
                batch = done[:chunk]
                del done[:chunk]
                yield batch
                continue
            if over:
                return
            ready.clear()
            await ready.wait()
    finally:
        for task in list(running):
            task.cancel()
        if running:
            await asyncio.gather(*running, return_exceptions=True)


async def result_chunks(
    batches: AsyncGenerator[list[dict[str, Any]], None],
    *,
    header: dict[str, Any],
    key: str,
    count: Callable[[dict[str, Any]], None],
    summary: Callable[[], dict[str, Any]],
) -> AsyncGenerator[dict[str, Any], None]:
    """A many-target job's result chunks, ``{**header, key: entries}``, from :func:`fan_out`'s
    batches. ``count`` sees every entry; one batch is held back, so the last chunk carries
    entries as well as ``summary()``."""
    held: list[dict[str, Any]] | None = None
    async with contextlib.aclosing(batches):
        async for batch in batches:
            for entry in batch:
                count(entry)
            if held is not None:
                yield {**header, key: held}
            held = batch
    yield {**header, key: held or [], "summary": summary()}
