"""The Shazzam probe against real sockets on loopback: no mocks.

Linux facts these tests lean on: every 127.0.0.0/8 address is local and answers (with a
refusal on a port nobody listens on), and a listening socket whose accept queue is full
drops new SYNs, so a connect to it times out (a "filtered" port without a firewall).
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import socket
import sys
import threading
import time
from collections.abc import AsyncGenerator, AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import pytest

from bridge.wire.records import OutputRecord
from probes.contract import Job, ProbeContext
from probes.kit.ratelimit import RateLimiter
from probes.shazzam.engine import Sweep, SweepOptions
from probes.shazzam.params import TOPIC, ShazzamParams, build_params
from probes.shazzam.probe import SPEC, run
from probes.shazzam.settings import ShazzamSettings

Chunk = dict[str, Any]
PROJECT_ROOT = Path(__file__).resolve().parent.parent


def make_job(payload: dict[str, Any], **settings: Any) -> tuple[Job[ShazzamParams], ProbeContext]:
    config = ShazzamSettings(**settings)
    record = OutputRecord(sys_id="sweep-1", topic=TOPIC, payload=payload)
    params = build_params(record, config)
    ctx = ProbeContext(agent="t", rate=RateLimiter(0), per_host_limit=8, settings=config)
    return Job(record, params), ctx


async def collect(
    job: Job[ShazzamParams], ctx: ProbeContext, *, limit: float = 20.0
) -> list[Chunk]:
    chunks: list[Chunk] = []
    async with asyncio.timeout(limit), contextlib.aclosing(probe(job, ctx)) as stream:
        async for chunk in stream:
            chunks.append(chunk)
            assert len(chunks) <= 10_000
    return chunks


def probe(job: Job[ShazzamParams], ctx: ProbeContext) -> AsyncGenerator[Chunk, None]:
    stream = run(job, ctx)
    assert isinstance(stream, AsyncGenerator)
    return stream


def all_hosts(chunks: list[Chunk]) -> dict[str, dict[str, Any]]:
    hosts: dict[str, dict[str, Any]] = {}
    for chunk in chunks:
        for host in chunk["hosts"]:
            assert host["ip"] not in hosts, f"{host['ip']} reported twice"
            hosts[host["ip"]] = host
    return hosts


def closed_port(host: str = "127.0.0.1", family: int = socket.AF_INET) -> int:
    """A port that was free a moment ago: bound, then closed (connects are refused)."""
    with socket.socket(family, socket.SOCK_STREAM) as sock:
        sock.bind((host, 0))
        port: int = sock.getsockname()[1]
    return port


@contextlib.asynccontextmanager
async def listener(host: str, greeting: bytes = b"") -> AsyncIterator[int]:
    """An asyncio TCP server on ``host``, port chosen by the kernel; says ``greeting``.

    Leaving closes every connection it accepted, so no transport outlives the test.
    """
    handlers: set[asyncio.Task[None]] = set()

    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        assert task is not None
        handlers.add(task)
        try:
            with contextlib.suppress(ConnectionError):
                if greeting:
                    writer.write(greeting)
                    await writer.drain()
                await reader.read(1)  # until the prober resets the connection
        finally:
            writer.close()
            with contextlib.suppress(ConnectionError):
                await writer.wait_closed()

    server = await asyncio.start_server(handle, host, 0)
    try:
        yield server.sockets[0].getsockname()[1]
    finally:
        # A connection the kernel has completed reaches its handler a few loop turns
        # later; closing the server in between leaks the accepted socket on Python 3.11.
        # So wait (bounded) until no new handler shows up and the known ones have ended.
        for _ in range(50):
            seen = len(handlers)
            await asyncio.sleep(0.01)
            if len(handlers) == seen and all(task.done() for task in handlers):
                break
        server.close()
        for task in handlers:
            task.cancel()
        await asyncio.gather(*handlers, return_exceptions=True)
        await server.wait_closed()


@contextlib.contextmanager
def full_backlog(host: str = "127.0.0.1") -> Iterator[int]:
    """A listening port whose accept queue is full: new SYNs are dropped (a timeout)."""
    server = socket.socket()
    fillers: list[socket.socket] = []
    try:
        server.bind((host, 0))
        server.listen(0)
        port: int = server.getsockname()[1]
        for _ in range(3):
            filler = socket.socket()
            filler.setblocking(False)
            filler.connect_ex((host, port))
            fillers.append(filler)
        time.sleep(0.05)
        yield port
    finally:
        for filler in fillers:
            filler.close()
        server.close()


def waitable(pid: int) -> bool:
    """A live child or a zombie can still be waited for; a reaped one cannot."""
    try:
        os.waitpid(pid, os.WNOHANG)
    except ChildProcessError:
        return False
    return True


def sweep_threads() -> list[threading.Thread]:
    return [t for t in threading.enumerate() if t.name == "tcp-sweep"]


def test_spec_names_topic_and_parameters() -> None:
    assert SPEC.topic == "Shazzam"
    assert SPEC.params is ShazzamParams


async def test_open_closed_and_alive_on_one_host() -> None:
    refused = closed_port()
    async with listener("127.0.0.1") as open_port:
        job, ctx = make_job({"targets": "127.0.0.1", "ports": [open_port, refused]})
        chunks = await collect(job, ctx)
    assert len(chunks) == 1
    [host] = chunks[0]["hosts"]
    assert host["ip"] == "127.0.0.1"
    assert host["alive"] is True
    assert [entry["port"] for entry in host["open"]] == [open_port]
    assert set(host["open"][0]) == {"port", "service"}
    assert host["closed"] == [refused]
    assert host["filtered"] == []
    assert chunks[0]["totals"]["open_ports"] == 1


async def test_a_full_backlog_port_is_filtered_after_the_timeout() -> None:
    refused = closed_port()
    with full_backlog() as silent:
        job, ctx = make_job(
            {"targets": "127.0.0.1", "ports": [silent, refused], "connect_timeout": 0.3}
        )
        started = time.monotonic()
        chunks = await collect(job, ctx)
        elapsed = time.monotonic() - started
    [host] = chunks[0]["hosts"]
    assert host["filtered"] == [silent]
    assert host["closed"] == [refused]
    assert host["open"] == []
    assert host["alive"] is True  # the refusal is an answer
    assert 0.25 <= elapsed < 3.0


async def test_sweep_of_254_addresses_finds_exactly_the_listeners() -> None:
    addresses = ("127.0.0.10", "127.0.0.77", "127.0.0.200")
    refused = [closed_port() for _ in range(17)]
    async with (
        listener(addresses[0]) as port_a,
        listener(addresses[1]) as port_b,
        listener(addresses[2]) as port_c,
    ):
        ports = [port_a, port_b, port_c, *refused]
        assert len(set(ports)) == 20
        job, ctx = make_job({"targets": "127.0.0.1-127.0.0.254", "ports": ports})
        chunks = await collect(job, ctx)
    hosts = all_hosts(chunks)
    assert len(hosts) == 254
    found = {(ip, entry["port"]) for ip, host in hosts.items() for entry in host["open"]}
    assert found == {(addresses[0], port_a), (addresses[1], port_b), (addresses[2], port_c)}
    assert all(host["alive"] for host in hosts.values())
    assert all(host["filtered"] == [] for host in hosts.values())
    for host in hosts.values():
        assert len(host["open"]) + len(host["closed"]) == 20
        assert host["closed"] == sorted(host["closed"])
    totals = chunks[-1]["totals"]
    assert totals["addresses"] == 254
    assert totals["alive"] == 254
    assert totals["open_ports"] == 3
    assert totals["probes"] == 254 * 20
    assert totals["duration_s"] > 0
    assert totals["probes_per_s"] > 0


async def test_results_stream_in_chunks_with_progress_and_totals() -> None:
    ports = [closed_port(), closed_port()]
    job, ctx = make_job({"targets": "127.0.0.1-10", "ports": ports, "chunk_hosts": 3})
    chunks = await collect(job, ctx)
    assert [len(chunk["hosts"]) for chunk in chunks] == [3, 3, 3, 1]
    assert [chunk["chunk_hosts"] for chunk in chunks] == [3, 3, 3, 1]
    assert [chunk["progress"]["done"] for chunk in chunks] == [3, 6, 9, 10]
    assert all(chunk["progress"]["total"] == 10 for chunk in chunks)
    assert ["totals" in chunk for chunk in chunks] == [False, False, False, True]
    hosts = all_hosts(chunks)
    assert set(hosts) == {f"127.0.0.{n}" for n in range(1, 11)}
    totals = chunks[-1]["totals"]
    assert totals["addresses"] == 10
    assert totals["alive"] == 10
    assert totals["open_ports"] == 0
    assert totals["probes"] == 20


async def test_an_exact_multiple_of_the_chunk_size_ends_with_a_full_last_chunk() -> None:
    job, ctx = make_job({"targets": "127.0.0.1-9", "ports": [closed_port()], "chunk_hosts": 3})
    chunks = await collect(job, ctx)
    assert [len(chunk["hosts"]) for chunk in chunks] == [3, 3, 3]
    assert "totals" in chunks[-1]
    assert chunks[-1]["totals"]["addresses"] == 9


async def test_banner_is_read_from_open_ports_that_speak_first() -> None:
    async with (
        listener("127.0.0.1", b"SSH-2.0-test\r\n") as talker,
        listener("127.0.0.1") as silent,
    ):
        job, ctx = make_job(
            {
                "targets": "127.0.0.1",
                "ports": [talker, silent],
                "banner": True,
                "banner_timeout": 0.2,
            }
        )
        chunks = await collect(job, ctx)
    [host] = chunks[0]["hosts"]
    by_port = {entry["port"]: entry for entry in host["open"]}
    assert by_port[talker]["banner"] == "SSH-2.0-test"
    assert "banner" not in by_port[silent]
    assert set(by_port) == {talker, silent}


async def test_ipv6_loopback() -> None:
    refused = closed_port("::1", socket.AF_INET6)
    async with listener("::1") as open_port:
        job, ctx = make_job({"targets": "::1", "ports": [open_port, refused]})
        chunks = await collect(job, ctx)
    [host] = chunks[0]["hosts"]
    assert host["ip"] == "::1"
    assert [entry["port"] for entry in host["open"]] == [open_port]
    assert host["closed"] == [refused]


async def test_mixed_ipv4_and_ipv6_targets() -> None:
    port = closed_port()
    job, ctx = make_job({"targets": "::1, 127.0.0.1-2", "ports": [port]})
    hosts = all_hosts(await collect(job, ctx))
    assert set(hosts) == {"127.0.0.1", "127.0.0.2", "::1"}


async def test_the_global_rate_budget_is_honoured() -> None:
    ports = [closed_port() for _ in range(20)]
    job, ctx = make_job({"targets": "127.0.0.1-50", "ports": ports})
    ctx.rate = RateLimiter(2000)  # 1000 probes at 2000/s, burst 100: at least ~0.45 s
    started = time.monotonic()
    chunks = await collect(job, ctx)
    elapsed = time.monotonic() - started
    assert chunks[-1]["totals"]["probes"] == 1000
    assert 0.4 <= elapsed < 5.0


async def test_per_host_limit_is_honoured() -> None:
    # 8 ports that time out after 0.1 s, at most 2 in flight against the one host:
    # 4 rounds, so at least 0.4 s (all at once would take 0.1 s).
    with contextlib.ExitStack() as stack:
        silent = [stack.enter_context(full_backlog()) for _ in range(8)]
        job, ctx = make_job({"targets": "127.0.0.1", "ports": silent, "connect_timeout": 0.1})
        ctx.per_host_limit = 2
        started = time.monotonic()
        chunks = await collect(job, ctx)
        elapsed = time.monotonic() - started
    assert chunks[-1]["hosts"][0]["filtered"] == sorted(silent)
    assert elapsed >= 0.35  # 8 ports, 2 at a time, 0.1 s each: 4 rounds


async def test_cancelling_the_job_stops_the_engine_thread_quickly() -> None:
    assert sweep_threads() == []
    ports = [closed_port() for _ in range(100)]
    job, ctx = make_job({"targets": "127.0.0.1-254", "ports": ports, "chunk_hosts": 1})
    ctx.rate = RateLimiter(500)  # 25,400 probes at 500/s: ~50 s unless cancelled
    first = asyncio.Event()

    async def consume() -> None:
        async with contextlib.aclosing(probe(job, ctx)) as stream:
            async for _chunk in stream:
                first.set()

    task = asyncio.create_task(consume())
    await asyncio.wait_for(first.wait(), 10)
    assert len(sweep_threads()) == 1
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    deadline = time.monotonic() + 0.1
    while sweep_threads() and time.monotonic() < deadline:
        await asyncio.sleep(0.005)
    assert sweep_threads() == []


async def test_a_job_timeout_stops_the_engine_thread() -> None:
    ports = [closed_port() for _ in range(100)]
    job, ctx = make_job({"targets": "127.0.0.1-254", "ports": ports})
    ctx.rate = RateLimiter(500)
    with pytest.raises(TimeoutError):
        await collect(job, ctx, limit=0.3)
    deadline = time.monotonic() + 0.1
    while sweep_threads() and time.monotonic() < deadline:
        await asyncio.sleep(0.005)
    assert sweep_threads() == []


async def test_two_engine_processes_give_the_same_answer_as_one() -> None:
    refused = [closed_port() for _ in range(4)]
    async with listener("127.0.0.33") as open_port:
        ports = (open_port, *refused)
        options = SweepOptions(ports=tuple(sorted(ports)), timeout=1.0, concurrency=256)
        intervals = [(4, 0x7F000001, 0x7F000040)]  # 127.0.0.1-64
        answers: list[dict[str, Any]] = []
        for engines in (1, 2):
            hosts: dict[str, Any] = {}
            async with asyncio.timeout(20), Sweep(intervals, options, engines=engines) as sweep:
                assert sweep.engines == engines
                async for batch in sweep:
                    hosts.update((host["ip"], host) for host in batch)
            assert sweep.stats.probes == 64 * 5
            answers.append(hosts)
    assert answers[0] == answers[1]
    assert len(answers[0]) == 64
    assert [ip for ip, host in answers[0].items() if host["open"]] == ["127.0.0.33"]


async def test_a_cancelled_process_sweep_leaves_no_worker_behind() -> None:
    ports = tuple(range(1, 101))
    options = SweepOptions(ports=ports, timeout=1.0, concurrency=4)
    intervals = [(4, 0x7F000001, 0x7F0000FE)]
    sweep = Sweep(intervals, options, engines=2)
    async with asyncio.timeout(20), sweep:
        async for _batch in sweep:
            break
        pids = sweep.worker_pids
        assert len(pids) == 2
    assert not any(waitable(pid) for pid in pids)


SHORT_OF_DESCRIPTORS = """
import resource, sys
from probes.shazzam.engine import Engine, SweepOptions, iter_hosts
resource.setrlimit(resource.RLIMIT_NOFILE, (40, 40))
port = int(sys.argv[1])
got = []
options = SweepOptions(ports=(port,), timeout=0.2, concurrency=2048)
engine = Engine(iter_hosts([(4, 0x7F000001, 0x7F000064)]), options, got.extend)
probes = engine.run()
filtered = sum(1 for host in got if host["filtered"] == [port])
print(probes, len(got), filtered)
"""


async def test_running_out_of_file_descriptors_slows_the_engine_down_but_loses_nothing() -> None:
    # 100 connects that each hold a descriptor for 0.2 s, in a process allowed 40 of them.
    server = socket.socket()
    fillers: list[socket.socket] = []
    try:
        server.bind(("0.0.0.0", 0))
        server.listen(0)
        port = server.getsockname()[1]
        for _ in range(3):
            filler = socket.socket()
            filler.setblocking(False)
            filler.connect_ex(("127.0.0.1", port))
            fillers.append(filler)
        await asyncio.sleep(0.05)
        proc = await asyncio.create_subprocess_exec(
            sys.executable,
            "-c",
            SHORT_OF_DESCRIPTORS,
            str(port),
            cwd=str(PROJECT_ROOT),
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.PIPE,
        )
        out, err = await asyncio.wait_for(proc.communicate(), 20)
    finally:
        for filler in fillers:
            filler.close()
        server.close()
    assert proc.returncode == 0, err.decode()
    assert out.split() == [b"100", b"100", b"100"]
