"""The peer side of the probe benchmarks: a plain loop of the probe's library in a child.

The child (:func:`run_peer`) has its own interpreter and event loop, like the bridge. It
sets up once (sessions, connections: not timed, as the bridge's pools are warm after the
warm-up), prints ``ready``, and then makes one measured pass for every ``run`` line it
reads on stdin, answering with one JSON line (:func:`serve_passes`). The parent's end is
:class:`PeerProcess`.
"""

from __future__ import annotations

import asyncio
import contextlib
import sys
import time
from collections.abc import Awaitable, Callable
from typing import Any

import orjson

from bridge.bench import BenchError
from bridge.bench.common import (
    own_cpu,
    run_uvloop,
)
from bridge.demo.broker import stop_process

PeerSetup = Callable[
    [contextlib.AsyncExitStack], Awaitable[Callable[[], Awaitable[dict[str, Any]]]]
]


def run_peer(setup: PeerSetup) -> int:
    """A peer child's main: ``setup(stack)`` (not timed; it registers its clean-up on
    ``stack``) returns the measured pass; then :func:`serve_passes`. Runs on uvloop, like
    the bridge."""

    async def main() -> None:
        async with contextlib.AsyncExitStack() as stack:
            one_pass = await setup(stack)
            await serve_passes(one_pass)

    run_uvloop(main)
    return 0


async def serve_passes(one_pass: Callable[[], Awaitable[dict[str, Any]]]) -> None:
    """Print ``ready``; for each line on stdin run ``one_pass`` and print its JSON; EOF ends."""
    print("ready", flush=True)
    loop = asyncio.get_running_loop()
    while True:
        line = await loop.run_in_executor(None, sys.stdin.readline)
        if not line:
            return
        print(orjson.dumps(await one_pass()).decode(), flush=True)


class PeerProcess:
    """The parent's end of a peer child: ``measure()`` runs one pass and returns its JSON."""

    def __init__(self, command: list[str], *, pass_timeout: float = 300.0) -> None:
        self.command = command
        self.pass_timeout = pass_timeout
        self.proc: asyncio.subprocess.Process | None = None

    @property
    def pid(self) -> int:
        assert self.proc is not None
        return self.proc.pid

    async def __aenter__(self) -> PeerProcess:
        self.proc = await asyncio.create_subprocess_exec(
            *self.command, stdin=asyncio.subprocess.PIPE, stdout=asyncio.subprocess.PIPE
        )
        try:
            line = await self._line(120.0)
            if line.strip() != b"ready":
                raise BenchError(f"the peer did not start: {line!r}")
        except BaseException:
            await self.__aexit__()
            raise
        return self

    async def __aexit__(self, *exc: object) -> None:
        if self.proc is None:
            return
        if self.proc.stdin is not None:
            self.proc.stdin.close()
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self.proc.wait(), 10)
        await stop_process(self.proc, 2)

    async def _line(self, timeout: float) -> bytes:
        assert self.proc is not None
        assert self.proc.stdout is not None
        try:
            return await asyncio.wait_for(self.proc.stdout.readline(), timeout)
        except TimeoutError:
            raise BenchError(f"the peer gave no answer within {timeout:g} s") from None

    async def measure(self) -> dict[str, Any]:
        assert self.proc is not None
        assert self.proc.stdin is not None
        self.proc.stdin.write(b"run\n")
        await self.proc.stdin.drain()
        line = await self._line(self.pass_timeout)
        if not line:
            raise BenchError(f"the peer exited ({self.proc.returncode}) during a pass")
        data: dict[str, Any] = orjson.loads(line)
        return data


async def timed(work: Awaitable[Any]) -> tuple[float, float]:
    """Await ``work``: (wall seconds, CPU seconds of this process meanwhile)."""
    cpu = own_cpu()
    started = time.perf_counter()
    await work
    return time.perf_counter() - started, own_cpu() - cpu


def pass_result(count: int, seconds: float, failed: int, **extra: Any) -> dict[str, Any]:
    """What a peer's pass reports: units done, wall seconds, failures, its own CPU."""
    return {"count": count, "seconds": seconds, "failed": failed, **extra}
