"""The TCP connect sweep engine: non-blocking sockets driven through ``select.epoll``.

Why not asyncio: the transport machinery caps a connect scanner near 10-14k probes/s on
this machine class, while non-blocking ``connect`` + ``epoll`` in a plain loop reaches
36-38k/s (ANCHORS.md, TCP sweep). So the engine is a synchronous
loop that runs in a worker thread (or, for a big unpaced sweep, in worker processes) and
hands finished hosts to the event loop in batches. Measured here (2 idle cores, loopback,
127.0.0.1-254 × 100 ports, 50 listeners): ~130k probes/s against nmap ``-sT -T5`` ~110k/s.

One probe: ``socket(SOCK_NONBLOCK)``, ``connect_ex``, ``SO_ERROR`` at once (on a near
target the answer is often in already), else register for ``EPOLLOUT`` and read
``SO_ERROR`` when it fires:

* 0 → **open** (optionally keep the socket to read a banner); closed with ``SO_LINGER`` 0,
  a reset, so a big sweep leaves no TIME_WAIT pile-up (refused and unanswered connects
  leave none anyway);
* ``ECONNREFUSED`` → **closed** (the host answered: it is alive);
* no answer within the timeout, or ``EHOSTUNREACH`` / ``ENETUNREACH`` / ``EACCES`` ... →
  **filtered**.

Scheduling: hosts are admitted in address order; admitted hosts take turns (round robin),
one port each, so a host never receives all its ports at once, and a host never has more
than ``per_host`` connects in flight. The number of connects in flight is bounded by
``concurrency``. All probes share one timeout, so a FIFO of probes in start order is also
in deadline order: expiry is a pop from the left, no heap needed.

This module uses the standard library only: it runs as a script in worker processes.
"""

from __future__ import annotations

import _socket
import asyncio
import contextlib
import errno
import json
import os
import select
import socket
import struct
import sys
import threading
import time
from collections import deque
from collections.abc import AsyncIterator, Callable, Iterator, Sequence
from dataclasses import asdict, dataclass
from typing import Any, Protocol

Interval = tuple[int, int, int]  # (IP version, first address, last address) as integers
HostResult = dict[str, Any]

_LINGER0 = struct.pack("ii", 1, 0)
_STREAM = socket.SOCK_STREAM | socket.SOCK_NONBLOCK | socket.SOCK_CLOEXEC
_IN_PROGRESS = (errno.EINPROGRESS, errno.EALREADY, 0)
# Local resource shortage: not an answer from the target; put the port back, slow down.
_LOCAL_SHORTAGE = frozenset(
    {errno.EMFILE, errno.ENFILE, errno.ENOBUFS, errno.ENOMEM, errno.EAGAIN, errno.EADDRNOTAVAIL}
)
_POLL_MAX = 0.05  # seconds: the longest the loop sleeps without looking at its stop flag
_FLUSH_HOSTS = 64  # finished hosts handed over in one batch...
_FLUSH_EVERY = 0.02  # ...or at least this often (seconds)
_WORKER_SCRIPT = os.path.abspath(__file__)  # run as a script: no package imports
_STALL_LIMIT = 5.0  # seconds of local shortage with nothing in flight: give up


class RateBudget(Protocol):
    """What the engine needs of ``probes.kit.ratelimit.RateLimiter``."""

    @property
    def unlimited(self) -> bool: ...

    def take(self, wanted: int) -> tuple[int, float]: ...

    def refund(self, unused: int) -> None: ...


@dataclass(frozen=True, slots=True)
class SweepOptions:
    ports: tuple[int, ...]
    timeout: float = 1.0  # seconds a connect may take before the port counts as filtered
    concurrency: int = 2048  # connects in flight, per engine
    per_host: int = 8  # connects in flight against one address
    banner: bool = False  # read what an open port says first
    banner_timeout: float = 0.5  # seconds to wait for it
    banner_bytes: int = 256


class SweepError(Exception):
    """The engine could not go on (a local fault, not an answer from a target)."""


def iter_hosts(
    intervals: Sequence[Interval], index: int = 0, step: int = 1
) -> Iterator[tuple[int, str]]:
    """Every ``step``-th address (starting at the ``index``-th) as ``(version, text)``."""
    position = 0
    for version, first, last in intervals:
        size = 16 if version == 6 else 4
        family = socket.AF_INET6 if version == 6 else socket.AF_INET
        start = first + (index - position) % step
        for value in range(start, last + 1, step):
            yield version, socket.inet_ntop(family, value.to_bytes(size, "big"))
        position += last - first + 1


class _Host:
    __slots__ = (
        "closed",
        "error",
        "family",
        "filtered",
        "inflight",
        "ip",
        "open",
        "queued",
        "remaining",
        "todo",
    )

    def __init__(self, version: int, ip: str, ports: Sequence[int]) -> None:
        self.family = socket.AF_INET6 if version == 6 else socket.AF_INET
        self.ip = ip
        self.todo = list(reversed(ports))  # pop() gives the lowest port first
        self.remaining = len(ports)
        self.inflight = 0
        self.queued = False
        self.open: list[tuple[int, bytes | None]] = []
        self.closed: list[int] = []
        self.filtered: list[int] = []
        self.error: str | None = None

    def result(self) -> HostResult:
        open_ports: list[dict[str, Any]] = []
        for port, banner in sorted(self.open, key=lambda item: item[0]):
            entry: dict[str, Any] = {"port": port}
            if banner:
                text = banner.decode("utf-8", errors="replace").strip("\r\n\x00 \t")
                if text:
                    entry["banner"] = text
            open_ports.append(entry)
        self.closed.sort()
        self.filtered.sort()
        result: HostResult = {
            "ip": self.ip,
            "alive": bool(self.open or self.closed),
            "open": open_ports,
            "closed": self.closed,
            "filtered": self.filtered,
        }
        if self.error:
            result["error"] = self.error
        return result


class _Probe:
    __slots__ = ("buf", "deadline", "done", "host", "port", "read_deadline", "sock")

    def __init__(self, sock: _socket.socket, host: _Host, port: int, deadline: float) -> None:
        self.sock = sock
        self.host = host
        self.port = port
        self.deadline = deadline  # of the connect; never moves (the FIFO stays sorted)
        self.read_deadline = 0.0  # of the banner read
        self.done = False
        self.buf: bytes | None = None  # not None once connected and waiting for a banner


class Engine:
    """One sweep loop. ``run()`` blocks (call it in a thread); ``stop()`` is thread-safe.

    ``emit`` receives lists of finished host results (never one call per probe).
    ``window`` bounds hosts admitted but not yet acknowledged with ``ack()``: the consumer's
    backpressure. 0 disables it.
    """

    def __init__(
        self,
        hosts: Iterator[tuple[int, str]],
        options: SweepOptions,
        emit: Callable[[list[HostResult]], None],
        *,
        rate: RateBudget | None = None,
        window: int = 0,
        watch_fd: int | None = None,
    ) -> None:
        self._hosts = hosts
        self._opt = options
        self._emit = emit
        self._rate = None if rate is None or rate.unlimited else rate
        self._window = window
        self._watch_fd = watch_fd  # readable or hung up → stop (a worker's stdin)
        self._stop = False
        self._wake = os.eventfd(0, os.EFD_NONBLOCK | os.EFD_CLOEXEC)
        self._wake_lock = threading.Lock()  # never write to the eventfd once it is closed
        self._wake_open = True
        self.admitted = 0
        self.acked = 0
        self.probes = 0  # ports classified

    def _poke(self) -> None:
        with self._wake_lock:
            if self._wake_open:
                os.eventfd_write(self._wake, 1)

    def stop(self) -> None:
        self._stop = True
        self._poke()

    def ack(self, hosts: int) -> None:
        """The consumer has taken ``hosts`` more results: the engine may admit more."""
        self.acked += hosts
        if self._window:
            self._poke()

    @property
    def stopped(self) -> bool:
        return self._stop

    def run(self) -> int:
        """Sweep until every host is done or ``stop()``; returns the number of probes."""
        ep = select.epoll()
        inflight: dict[int, _Probe] = {}
        try:
            ep.register(self._wake, select.EPOLLIN)
            if self._watch_fd is not None:
                ep.register(self._watch_fd, select.EPOLLIN)
            self._loop(ep, inflight)
        finally:
            for probe in inflight.values():
                probe.sock.close()
            ep.close()
            with self._wake_lock:
                self._wake_open = False
                os.close(self._wake)
        return self.probes

    def _loop(self, ep: select.epoll, inflight: dict[int, _Probe]) -> None:
        opt = self._opt
        ports = opt.ports
        timeout = opt.timeout
        # A host never has more connects in flight than it has ports: counting more would
        # take rate tokens no connect spends.
        per_host = max(1, min(opt.per_host, len(ports)))
        banner = opt.banner
        banner_timeout = opt.banner_timeout
        banner_bytes = opt.banner_bytes
        rate = self._rate
        window = self._window
        hosts = self._hosts
        emit = self._emit
        wake = self._wake
        watch = self._watch_fd
        limit = opt.concurrency
        maxevents = max(64, min(opt.concurrency, 4096))

        ready: deque[_Host] = deque()  # admitted hosts with ports to try and room in flight
        connecting: deque[_Probe] = deque()  # start order == deadline order
        reading: deque[_Probe] = deque()  # banner waits, deadline order too
        finished: list[HostResult] = []
        exhausted = False
        last_flush = time.monotonic()
        stalled_since = 0.0
        resume_at = 0.0

        new_socket = _socket.socket
        sol, so_linger, so_error = socket.SOL_SOCKET, socket.SO_LINGER, socket.SO_ERROR
        epollout, epollin = select.EPOLLOUT, select.EPOLLIN
        refused = errno.ECONNREFUSED
        in_progress = errno.EINPROGRESS

        def settle(probe: _Probe, outcome: int) -> None:
            """Record one port's answer (0 open, 1 closed, 2 filtered) and free its slot."""
            probe.done = True
            sock = probe.sock
            del inflight[sock.fileno()]
            host = probe.host
            if outcome == 0:
                # Only an established connection leaves TIME_WAIT behind: reset it instead.
                with contextlib.suppress(OSError):
                    sock.setsockopt(sol, so_linger, _LINGER0)
                host.open.append((probe.port, probe.buf))
            elif outcome == 1:
                host.closed.append(probe.port)
            else:
                host.filtered.append(probe.port)
            sock.close()
            self.probes += 1
            host.inflight -= 1
            host.remaining -= 1
            if host.remaining == 0:
                finished.append(host.result())
            elif host.todo and not host.queued:
                host.queued = True
                ready.append(host)

        while not self._stop:
            now = time.monotonic()
            # 1. Start connects while there is room, work and (if paced) budget.
            room = limit - len(inflight)
            rate_wait = 0.0
            short = False  # a local shortage (descriptors, ports) stopped this round
            if room > 0 and now >= resume_at:
                admit = not ready and not exhausted
                if admit and window and self.admitted - self.acked >= window:
                    admit = False  # the consumer is behind: finish what is admitted first
                if rate is not None:
                    # Take the budget first, so that a slow rate admits few hosts (which
                    # then finish one after the other) rather than all of them at once.
                    want = room if admit else min(room, len(ready) * per_host)
                    room, rate_wait = rate.take(want) if want else (0, 0.0)
                if admit:
                    # Admit hosts until enough are runnable to fill the room.
                    while len(ready) * per_host < room and (
                        not window or self.admitted - self.acked < window
                    ):
                        item = next(hosts, None)
                        if item is None:
                            exhausted = True
                            break
                        host = _Host(item[0], item[1], ports)
                        host.queued = True
                        ready.append(host)
                        self.admitted += 1
                while room > 0 and ready:
                    if self._stop:
                        return
                    host = ready.popleft()
                    port = host.todo.pop()
                    room -= 1  # one connect attempt, answered at once or not
                    if not room & 255:
                        now = time.monotonic()  # keep deadlines honest in a long round
                    try:
                        sock = new_socket(host.family, _STREAM)
                    except OSError as exc:
                        err = exc.errno or -1
                        if err not in _LOCAL_SHORTAGE:
                            # e.g. IPv6 disabled: this port of this host cannot be probed.
                            host.error = host.error or (exc.strerror or str(exc))
                            err = -1
                    else:
                        err = sock.connect_ex((host.ip, port))
                        if err == in_progress:
                            # On a near target the answer may be in already: skip epoll.
                            # Loopback sweep: ~130k probes/s with this, ~90k/s without;
                            # elsewhere it costs one cheap syscall per probe.
                            err = sock.getsockopt(sol, so_error) or in_progress
                        if err in _IN_PROGRESS:
                            probe = _Probe(sock, host, port, now + timeout)
                            fd = sock.fileno()
                            inflight[fd] = probe
                            ep.register(fd, epollout)
                            connecting.append(probe)
                            host.inflight += 1
                            if host.todo and host.inflight < per_host:
                                ready.append(host)
                            else:
                                host.queued = False
                            continue
                        sock.close()
                    if err in _LOCAL_SHORTAGE:  # no socket, or no local port: not an answer
                        host.todo.append(port)
                        ready.appendleft(host)
                        limit = max(1, len(inflight))
                        resume_at = now + 0.01
                        short = True
                        break
                    # An immediate answer: refused, or unreachable / not permitted.
                    if err == refused:
                        host.closed.append(port)
                    else:
                        host.filtered.append(port)
                    self.probes += 1
                    host.remaining -= 1
                    if host.remaining == 0:
                        host.queued = False
                        finished.append(host.result())
                    elif host.todo and host.inflight < per_host:
                        ready.append(host)
                    else:
                        host.queued = False
                if rate is not None and room > 0:
                    rate.refund(room)  # taken for connects this round did not make

            if exhausted and not inflight and not ready:
                break
            if short and not inflight:
                if not stalled_since:
                    stalled_since = now
                elif now - stalled_since > _STALL_LIMIT:
                    raise SweepError("cannot open sockets (out of file descriptors or ports)")
            elif not short:
                stalled_since = 0.0

            # 2. Wait for answers, no longer than the next deadline.
            wait = _POLL_MAX
            if connecting:
                wait = min(wait, connecting[0].deadline - now)
            if reading:
                wait = min(wait, reading[0].read_deadline - now)
            if ready and len(inflight) < limit:
                wait = min(wait, rate_wait, max(0.0, resume_at - now))
            if finished:
                wait = min(wait, last_flush + _FLUSH_EVERY - now)
            events = ep.poll(max(0.0, wait), maxevents)
            for fd, _mask in events:
                probe_or_none = inflight.get(fd)
                if probe_or_none is None:
                    if fd == wake:
                        with contextlib.suppress(BlockingIOError):
                            os.eventfd_read(wake)
                    elif fd == watch:
                        self._stop = True
                    continue
                probe = probe_or_none
                sock = probe.sock
                if probe.buf is None:
                    err = sock.getsockopt(sol, so_error)
                    if err == 0:
                        if banner:
                            probe.buf = b""
                            probe.read_deadline = time.monotonic() + banner_timeout
                            ep.modify(fd, epollin)
                            reading.append(probe)
                            continue
                        settle(probe, 0)
                    elif err == refused:
                        settle(probe, 1)
                    else:
                        settle(probe, 2)
                    continue
                # Reading a banner.
                try:
                    data = sock.recv(banner_bytes - len(probe.buf))
                except BlockingIOError:
                    continue
                except OSError:
                    data = b""
                probe.buf += data
                if not data or b"\n" in data or len(probe.buf) >= banner_bytes:
                    settle(probe, 0)
            if limit < opt.concurrency and not resume_at > now:
                limit = min(opt.concurrency, limit * 2)

            # 3. Expire deadlines.
            now = time.monotonic()
            while connecting and connecting[0].deadline <= now:
                probe = connecting.popleft()
                if not probe.done and probe.buf is None:
                    settle(probe, 2)
            while connecting and connecting[0].done:
                connecting.popleft()
            while reading and reading[0].read_deadline <= now:
                probe = reading.popleft()
                if not probe.done:
                    settle(probe, 0)

            # 4. Hand finished hosts over.
            if finished and (len(finished) >= _FLUSH_HOSTS or now - last_flush >= _FLUSH_EVERY):
                emit(finished)
                finished = []
                last_flush = now
        if finished and not self._stop:
            emit(finished)


# --- the event loop side -------------------------------------------------------------------


@dataclass(slots=True)
class SweepStats:
    probes: int = 0
    hosts: int = 0
    duration_s: float = 0.0


_END = object()


class Sweep:
    """A running sweep, seen from asyncio::

        async with Sweep(intervals, options, rate=ctx.rate) as sweep:
            async for hosts in sweep:      # lists of finished host results
                ...
        sweep.stats

    Leaving the ``async with`` block (done, cancelled, or an error) stops the engines: the
    worker thread exits within milliseconds, worker processes are killed.

    ``engines`` > 1 splits the addresses across that many worker processes (the GIL makes
    more threads useless); it is used only when the rate is unlimited, since the budget
    lives in this process.
    """

    def __init__(
        self,
        intervals: Sequence[Interval],
        options: SweepOptions,
        *,
        rate: RateBudget | None = None,
        engines: int = 1,
        window: int = 4096,
    ) -> None:
        self._intervals = tuple(intervals)
        self._options = options
        self._rate = rate
        self._window = window
        paced = rate is not None and not rate.unlimited
        self.engines = 1 if paced else max(1, engines)
        self.stats = SweepStats()
        self._engine: Engine | None = None
        self._thread: threading.Thread | None = None
        self._procs: list[asyncio.subprocess.Process] = []
        self._readers: list[asyncio.Task[None]] = []
        self._queue: asyncio.Queue[Any] = asyncio.Queue()
        self._started = 0.0
        self._open_engines = 0

    async def __aenter__(self) -> Sweep:
        self._started = time.monotonic()
        if self.engines == 1:
            self._start_thread()
        else:
            await self._start_processes()
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.close()

    def __aiter__(self) -> AsyncIterator[list[HostResult]]:
        return self._batches()

    async def _batches(self) -> AsyncIterator[list[HostResult]]:
        while self._open_engines:
            item = await self._queue.get()
            if item is _END:
                self._open_engines -= 1
                continue
            if isinstance(item, BaseException):
                raise SweepError(f"sweep engine failed: {item}") from item
            hosts: list[HostResult] = item
            self.stats.hosts += len(hosts)
            if self._engine is not None:
                self._engine.ack(len(hosts))
            yield hosts
        self.stats.duration_s = time.monotonic() - self._started

    # threads

    def _start_thread(self) -> None:
        loop = asyncio.get_running_loop()
        queue = self._queue

        def emit(hosts: list[HostResult]) -> None:
            loop.call_soon_threadsafe(queue.put_nowait, hosts)

        engine = Engine(
            iter_hosts(self._intervals), self._options, emit, rate=self._rate, window=self._window
        )

        def body() -> None:
            outcome: Any = _END
            try:
                self.stats.probes = engine.run()
            except Exception as exc:
                outcome = exc
            try:
                loop.call_soon_threadsafe(queue.put_nowait, outcome)
                if outcome is not _END:
                    loop.call_soon_threadsafe(queue.put_nowait, _END)
            except RuntimeError:  # the loop is closed: nobody is listening any more
                pass

        self._engine = engine
        self._open_engines = 1
        self._thread = threading.Thread(target=body, name="tcp-sweep", daemon=True)
        self._thread.start()

    # processes

    async def _start_processes(self) -> None:
        spec = {"intervals": self._intervals, "options": asdict(self._options)}
        for index in range(self.engines):
            proc = await asyncio.create_subprocess_exec(
                sys.executable,
                "-I",
                _WORKER_SCRIPT,
                "--worker",
                stdin=asyncio.subprocess.PIPE,
                stdout=asyncio.subprocess.PIPE,
                limit=64 * 1024 * 1024,
            )
            self._procs.append(proc)
            assert proc.stdin is not None
            line = json.dumps({**spec, "index": index, "step": self.engines}) + "\n"
            proc.stdin.write(line.encode())
            self._open_engines += 1
            self._readers.append(asyncio.create_task(self._read_worker(proc)))

    async def _read_worker(self, proc: asyncio.subprocess.Process) -> None:
        assert proc.stdout is not None
        outcome: Any = _END
        try:
            while True:
                line = await proc.stdout.readline()
                if not line:
                    outcome = SweepError(f"sweep worker exited early ({await proc.wait()})")
                    break
                message = json.loads(line)
                if "hosts" in message:
                    self._queue.put_nowait(message["hosts"])
                elif "done" in message:
                    self.stats.probes += int(message["done"])
                    break
                else:
                    outcome = SweepError(str(message.get("error", "unknown worker error")))
                    break
        except asyncio.CancelledError:
            raise
        except Exception as exc:
            outcome = exc
        if outcome is not _END:
            self._queue.put_nowait(outcome)
        self._queue.put_nowait(_END)

    async def close(self) -> None:
        """Stop every engine; safe to call twice."""
        if self._engine is not None:
            self._engine.stop()
        if self._thread is not None:
            # The loop sees the stop flag within a few milliseconds (eventfd wake-up).
            self._thread.join(timeout=0.5)
            self._thread = None
        for task in self._readers:
            task.cancel()
        for proc in self._procs:
            if proc.returncode is None:
                with contextlib.suppress(ProcessLookupError):
                    proc.kill()
        for proc in self._procs:
            with contextlib.suppress(Exception):
                await proc.wait()
        for task in self._readers:
            with contextlib.suppress(BaseException):
                await task
        self._readers = []
        self._procs = []

    @property
    def thread(self) -> threading.Thread | None:
        return self._thread

    @property
    def worker_pids(self) -> list[int]:
        return [proc.pid for proc in self._procs]


def _worker_main() -> int:
    """Worker process: one JSON spec on stdin, JSON lines of results on stdout."""
    spec = json.loads(sys.stdin.buffer.readline())
    options = SweepOptions(**{**spec["options"], "ports": tuple(spec["options"]["ports"])})
    intervals: list[Interval] = [(int(v), int(a), int(b)) for v, a, b in spec["intervals"]]
    out = sys.stdout

    def emit(hosts: list[HostResult]) -> None:
        out.write(json.dumps({"hosts": hosts}, separators=(",", ":")))
        out.write("\n")
        out.flush()

    engine = Engine(
        iter_hosts(intervals, spec["index"], spec["step"]),
        options,
        emit,
        watch_fd=sys.stdin.fileno(),
    )
    try:
        probes = engine.run()
    except Exception as exc:
        emit_line = json.dumps({"error": f"{type(exc).__name__}: {exc}"})
        out.write(emit_line + "\n")
        out.flush()
        return 1
    if not engine.stopped:
        out.write(json.dumps({"done": probes}) + "\n")
        out.flush()
    return 0


if __name__ == "__main__" and sys.argv[1:] == ["--worker"]:
    sys.exit(_worker_main())
