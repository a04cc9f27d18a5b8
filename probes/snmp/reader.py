"""A pooled session's socket: one lasting event-loop registration, the waits of its
requests, and their deadlines gathered in buckets."""

from __future__ import annotations

import asyncio
import contextlib
import os
from collections.abc import Callable
from types import SimpleNamespace
from typing import Any, Protocol

_DEADLINE_STEP = 0.02  # s: request deadlines are rounded up to this (see RequestDeadlines)


class Waker(Protocol):
    """What a pooled socket's reader and the deadline buckets call: a waiting request."""

    def wake(self) -> None: ...

    def expire(self) -> None: ...


class Wait:
    """The future one request waits on: the reader sets it ``True``, the timer ``False``."""

    __slots__ = ("future",)

    def __init__(self, future: asyncio.Future[bool]) -> None:
        self.future = future

    def wake(self) -> None:
        if not self.future.done():
            self.future.set_result(True)

    def expire(self) -> None:
        if not self.future.done():
            self.future.set_result(False)

    def forget(self) -> None:
        """The request is over: a deadline bucket still holding this needs no future."""
        self.future = _SETTLED


_SETTLED: Any = SimpleNamespace(done=lambda: True)  # stands for a future already set


class RequestDeadlines:
    """Request timeouts, gathered in buckets of :data:`_DEADLINE_STEP` seconds.

    One timer per bucket instead of one per request (a uvloop timer made and cancelled
    for every GET costs a few µs): a request's deadline is rounded up to its bucket's end,
    so it expires up to a step late, never early. An answered request stays in its bucket
    (forgotten, without its future) until the bucket fires.
    """

    __slots__ = ("buckets", "loop")

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self.loop = loop
        self.buckets: dict[int, list[Waker]] = {}

    def add(self, wait: Waker, timeout: float) -> None:
        slot = int((self.loop.time() + timeout) / _DEADLINE_STEP) + 1
        bucket = self.buckets.get(slot)
        if bucket is None:
            bucket = self.buckets[slot] = []
            self.loop.call_at(slot * _DEADLINE_STEP, self._fire, slot)
        bucket.append(wait)

    def _fire(self, slot: int) -> None:
        for wait in self.buckets.pop(slot, ()):
            wait.expire()


class Reader:
    """A pooled session's socket, registered with the event loop once for its life.

    Registering a socket per request (what the library does: ``add_reader`` and
    ``remove_reader`` around each answer) costs uvloop a poll handle and two
    ``epoll_ctl`` calls a request, about a quarter of a GET. A pooled session keeps one
    registration: while a request waits, readable wakes its future; with none waiting,
    the datagram is a late answer to a request given up on and is read and dropped (a
    level-triggered poll would call again and again otherwise).
    """

    __slots__ = ("deadlines", "fd", "loop", "waiter")

    def __init__(self, fd: int, deadlines: RequestDeadlines) -> None:
        self.fd = fd
        self.deadlines = deadlines
        self.loop = deadlines.loop
        self.waiter: Waker | None = None
        self.loop.add_reader(fd, self._readable)

    def _readable(self) -> None:
        waiter = self.waiter
        if waiter is not None:
            waiter.wake()
            return
        with contextlib.suppress(OSError):  # nothing left, or an ICMP error for a request
            os.read(self.fd, 65_536)

    def close(self) -> None:
        self.loop.remove_reader(self.fd)


class Prefetch:
    """A request sent ahead (a walk's next GETBULK): its answer is read as soon as it
    comes, in the reader's callback, and kept until the walk asks for it."""

    __slots__ = ("done", "error", "future", "reader", "recv", "result")

    def __init__(self, recv: Callable[[], Any], reader: Reader) -> None:
        self.recv = recv
        self.reader = reader
        self.future: asyncio.Future[bool] = reader.loop.create_future()
        self.done = False
        self.result: Any = None
        self.error: BaseException | None = None

    def wake(self) -> None:
        if self.done:  # a datagram after the answer (a duplicate): drop it
            with contextlib.suppress(OSError):
                os.read(self.reader.fd, 65_536)
            return
        try:
            self.result = self.recv()
        except BlockingIOError:
            return  # an answer to an earlier request: wait on
        except BaseException as exc:
            self.error = exc
        self.done = True
        if not self.future.done():
            self.future.set_result(True)

    def expire(self) -> None:
        if not self.future.done():
            self.future.set_result(False)
