"""Timeouts for many short operations in flight, checked by one timer.

``asyncio.timeout`` (and aiohttp's per-request timer) makes and cancels an event-loop
timer and a context object for every operation: a few µs each, as much as a tenth of
what a keep-alive HTTP request on loopback costs. :class:`Deadlines` keeps the operations
in flight in a dict per distinct timeout (insertion order is then deadline order) and
checks them every ``step`` seconds with one timer, which runs only while something is
in flight. An operation is cancelled up to ``step`` late, never early.

Use::

    expiry = deadlines.start(timeout)      # in the task that runs the operation
    try:
        await operation()
    except asyncio.CancelledError:
        if not expiry.timed_out():         # someone else cancelled us: propagate
            raise
        ...                                # our deadline: report a timeout
    finally:
        deadlines.end(expiry)

The expiry cancels the task only while it is between ``start`` and ``end``, and
:meth:`Expiry.timed_out` takes the cancellation back (``Task.uncancel``) like
``asyncio.timeout`` does, so a cancel from outside still wins.
"""

from __future__ import annotations

import asyncio

__all__ = ["Deadlines", "Expiry"]


class Expiry:
    """One operation's deadline: cancels its task when the deadline passes."""

    __slots__ = ("cancelling", "fired", "group", "task")

    def __init__(self, task: asyncio.Task[object], group: dict[Expiry, float]) -> None:
        self.task = task
        self.cancelling = task.cancelling()  # cancels already asked for before we began
        self.fired = 0  # cancels this deadline sent and has not taken back
        self.group = group

    @property
    def expired(self) -> bool:
        return self.fired > 0

    def expire(self) -> None:
        self.fired += 1
        self.task.cancel()

    def take_back(self) -> int:
        """Take back the cancels this deadline sent; the task's cancel count left."""
        left = self.task.cancelling()
        while self.fired:
            self.fired -= 1
            left = self.task.uncancel()
        return left

    def timed_out(self) -> bool:
        """In the ``except CancelledError`` of the operation: was it our deadline (and not
        also a cancel from outside)? Takes our cancellation back when it was."""
        return self.fired > 0 and self.take_back() <= self.cancelling


class Deadlines:
    """The deadlines of one kind of operation, checked every ``step`` seconds."""

    __slots__ = ("_expired", "_groups", "_loop", "_step", "_timer")

    def __init__(self, step: float = 0.05) -> None:
        if step <= 0:
            raise ValueError("step must be positive")
        self._step = step
        self._groups: dict[float, dict[Expiry, float]] = {}  # timeout → {expiry: deadline}
        # Fired but not ended: cancelled again at every check, since a library may swallow
        # a cancel (aiohappyeyeballs does, while it cancels the losing connection attempts).
        self._expired: dict[Expiry, None] = {}
        self._loop: asyncio.AbstractEventLoop | None = None
        self._timer: asyncio.TimerHandle | None = None

    def __len__(self) -> int:
        """Operations started and not ended."""
        return sum(len(group) for group in self._groups.values()) + len(self._expired)

    def start(self, timeout: float) -> Expiry:
        """The current task's deadline, ``timeout`` seconds from now."""
        task = asyncio.current_task()
        if task is None:
            raise RuntimeError("Deadlines.start must be called from a task")
        loop = self._loop
        if loop is None:
            loop = self._loop = asyncio.get_running_loop()
        group = self._groups.get(timeout)
        if group is None:
            group = self._groups[timeout] = {}
        expiry = Expiry(task, group)
        now = loop.time()
        group[expiry] = now + timeout
        if self._timer is None:
            self._timer = loop.call_at(now + self._step, self._check)
        return expiry

    def end(self, expiry: Expiry) -> None:
        """The operation is over (done, failed or cancelled): its deadline no longer applies.
        A cancel it sent that the operation swallowed or turned into another error is taken
        back here (like ``asyncio.timeout`` does), so the task's cancel count stays true."""
        expiry.group.pop(expiry, None)
        if self._expired:
            self._expired.pop(expiry, None)
        if expiry.fired:
            expiry.take_back()

    def _check(self) -> None:
        loop = self._loop
        assert loop is not None
        self._timer = None  # rescheduled below: an error here cannot stop it for good
        now = loop.time()
        for expiry in self._expired:
            expiry.expire()  # still not ended: the last cancel was swallowed
        for timeout, group in list(self._groups.items()):
            while group:
                expiry = next(iter(group))
                if group[expiry] > now:
                    break  # the rest of this group are later
                del group[expiry]
                self._expired[expiry] = None
                expiry.expire()
            if not group:
                del self._groups[timeout]
        if self._groups or self._expired:
            self._timer = loop.call_at(now + self._step, self._check)

    def close(self) -> None:
        """Stop the timer (the deadlines left in flight will not fire)."""
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        self._groups.clear()
        self._expired.clear()
