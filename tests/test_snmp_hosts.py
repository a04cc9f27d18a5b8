"""SNMP hosts jobs (``hosts`` instead of ``host``) against real snmpd agents on loopback.

Four snmpd processes share one UDP port on four loopback addresses, each with its own
``sysName``: ``127.0.0.1`` (agent-a, so ``localhost`` reaches it), ``127.0.0.2``
(agent-b), ``127.0.0.3`` (agent-c) and ``127.0.0.4``, which only answers another
community (so the lab community is *wrong* there: silence). Around them, on the same
port: plain UDP sockets that read nothing and never answer (:data:`HOLES`: silence
without ICMP), an address where nothing listens (:data:`UNUSED`: port unreachable) and,
in some tests, a relay that drops each client's first datagram (:class:`DropFirst`:
the retry answers).

No mocks: the jobs run through ``probes.snmp.probe.run`` (the Runner of ``tests/test_snmp.py``)
or through the bridge. Which engine served an agent (``probes/snmp/gets.py``'s callback
lanes or the coroutine fallback ``probes.snmp.probe._gets_step``) is seen through a task
factory counting the tasks the loop makes (:func:`counting_tasks`).
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import gc
import logging
import os
import socket
import time
from collections.abc import AsyncGenerator, AsyncIterator, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import orjson
import pytest

from bridge.wire.client import output_record
from bridge.wire.errors import BadParameter, BridgeError, Refused
from bridge.wire.records import OutputRecord
from probes.snmp import probe as snmp
from probes.snmp.credentials import fingerprint
from probes.snmp.params import build_params
from probes.snmp.pool import SnmpPool
from probes.snmp.reader import Reader
from probes.snmp.settings import TOPIC
from tests.brokers import BrokerAddress
from tests.harness import bridge_and_client, make_config, probe_settings
from tests.snmpd import BIG, COMMUNITY, LAB, USERS, Snmpd, SnmpdUnavailable, V3User, bulkwalk_oids
from tests.test_snmp import Runner, community, v3

Chunk = dict[str, Any]

NAMES = {"127.0.0.1": "agent-a", "127.0.0.2": "agent-b", "127.0.0.3": "agent-c"}
A, B, C = NAMES
OTHER = "127.0.0.4"  # an agent that answers OTHER_COMMUNITY only: the lab's is wrong there
OTHER_COMMUNITY = "mb-other-31c8e5"
HOLES = ("127.0.0.5", "127.0.0.6", "127.0.0.7", "127.0.0.8")  # read nothing, answer nothing
UNUSED = "127.0.0.9"  # nothing bound: the kernel answers port unreachable
RELAY = "127.0.0.10"  # DropFirst, in the tests that start one
SYS_NAME = "1.3.6.1.2.1.1.5.0"
MISSING = "1.3.6.1.2.1.1.99.0"  # no such object in the system group
SYS_OR_ID = "1.3.6.1.2.1.1.9.1.2"  # sysORID: a static column, the same on every agent
FALLBACK = "_gets_step.<locals>.step"  # the coroutine step of probes.snmp.probe, as a task


class LoopbackSnmpd(Snmpd):
    """tests/snmpd.py's agent on another loopback address, with its own name and community.

    The community is granted to the whole of 127.0.0.0/8: requests to 127.0.0.2 and up
    leave from 127.0.0.1, and the relay's from wherever the kernel binds it.
    """

    def __init__(self, workdir: Path, host: str, name: str, community: str = COMMUNITY):
        super().__init__(workdir)
        self.host = host
        self.name = name
        self.community = community

    def config_lines(self) -> list[str]:
        lines = []
        for line in super().config_lines():
            if line.startswith(f"rocommunity {COMMUNITY} "):
                line = f"rocommunity {self.community} 127.0.0.0/8"
            elif line.startswith("sysName "):
                line = f"sysName {self.name}"
            lines.append(line)
        return lines

    def tool_args(self, user: V3User | None = None, community: str | None = None) -> list[str]:
        return super().tool_args(user, community or self.community)


@dataclass
class Lab:
    agents: dict[str, LoopbackSnmpd]
    holes: list[socket.socket] = field(default_factory=list)

    @property
    def port(self) -> int:
        return self.agents[A].port

    def close(self) -> None:
        for hole in self.holes:
            hole.close()
        for agent in self.agents.values():
            agent.stop()


def start_lab(workdir: Path, attempts: int = 3) -> Lab:
    """The four agents (and the holes) on one port; another port if one was taken."""
    for attempt in range(attempts):
        first = LoopbackSnmpd(workdir / f"{attempt}-a", A, NAMES[A])
        first.start()
        lab = Lab({A: first})
        try:
            others = [(B, NAMES[B], COMMUNITY), (C, NAMES[C], COMMUNITY)]
            others.append((OTHER, "agent-other", OTHER_COMMUNITY))
            for host, name, value in others:
                agent = LoopbackSnmpd(workdir / f"{attempt}-{host}", host, name, value)
                agent.port = lab.port
                lab.agents[host] = agent
                if not agent._start_once(15.0):
                    raise OSError(f"port {lab.port} taken on {host}")
            for host in HOLES:
                hole = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
                lab.holes.append(hole)
                hole.bind((host, lab.port))
        except OSError:
            lab.close()
            continue
        except BaseException:
            lab.close()
            raise
        return lab
    raise SnmpdUnavailable(f"no free common UDP port for the lab after {attempts} tries")


@pytest.fixture(scope="module")
def agents(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Lab]:
    try:
        lab = start_lab(tmp_path_factory.mktemp("snmpd-hosts"))
    except SnmpdUnavailable as exc:
        pytest.fail(str(exc), pytrace=False)
    yield lab
    lab.close()


async def make_runner(lab: Lab, **settings: Any) -> Runner:
    """Credentials ``v2`` (the lab community, v2c) and ``sha-aes`` (v3 authPriv)."""
    return await Runner.open(
        lab.agents[A], [community("v2", order=10), v3(USERS[0], order=20)], **settings
    )


@pytest.fixture
async def runner(agents: Lab) -> AsyncGenerator[Runner, None]:
    runner = await make_runner(agents)
    yield runner
    await runner.aclose()


def entries(chunks: list[Chunk]) -> list[dict[str, Any]]:
    return [entry for chunk in chunks for entry in chunk["agents"]]


def by_index(chunks: list[Chunk]) -> dict[int, dict[str, Any]]:
    found = entries(chunks)
    indexed = {entry["index"]: entry for entry in found}
    assert len(indexed) == len(found)  # one entry per listed host
    return indexed


def name_varbind(name: str) -> dict[str, Any]:
    return {"oid": SYS_NAME, "type": "OctetString", "value": name, "encoding": "text"}


def one_agent_varbinds(chunks: list[Chunk]) -> list[dict[str, Any]]:
    return [vb for chunk in chunks for entry in chunk["results"] for vb in entry["varbinds"]]


@contextlib.contextmanager
def counting_tasks() -> Iterator[collections.Counter[str]]:
    """Count the tasks the running loop makes, by their coroutine's qualified name."""
    loop = asyncio.get_running_loop()
    previous = loop.get_task_factory()
    counts: collections.Counter[str] = collections.Counter()

    def factory(loop: asyncio.AbstractEventLoop, coro: Any, **kwargs: Any) -> asyncio.Future[Any]:
        counts[getattr(coro, "__qualname__", "?")] += 1
        if previous is not None:
            return previous(loop, coro, **kwargs)
        return asyncio.Task(coro, loop=loop, **kwargs)

    loop.set_task_factory(factory)
    try:
        yield counts
    finally:
        loop.set_task_factory(previous)


@dataclass
class Samples:
    free: list[int] = field(default_factory=list)  # pool.budget slots free
    leased: list[int] = field(default_factory=list)  # groups marked in use, all together


@contextlib.asynccontextmanager
async def sampling(runner: Runner) -> AsyncIterator[Samples]:
    """Every 2 ms while the block runs: the pool's free budget and its leases in use."""
    samples = Samples()

    async def sample() -> None:
        while True:
            pool = runner.pool
            samples.free.append(pool.budget._value)
            samples.leased.append(sum(g.leased for g in pool._groups.values()))
            await asyncio.sleep(0.002)

    task = asyncio.create_task(sample())
    try:
        yield samples
    finally:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task


def live_readers(loop: asyncio.AbstractEventLoop) -> list[Reader]:
    """The pooled-socket readers still alive on this loop (the loop keeps registered ones)."""
    gc.collect()
    return [o for o in gc.get_objects() if type(o) is Reader and o.loop is loop]


def assert_pool_at_rest(pool: SnmpPool, max_in_flight: int) -> None:
    """Nothing leased, the whole budget free, and every registered reader an idle session's."""
    assert [g.leased for g in pool._groups.values() if g.leased] == []
    assert pool.budget._value == max_in_flight
    idle = [p for g in pool._groups.values() for p in g.idle]
    assert all(p.reader is not None and p.reader.fd == p.session._fd for p in idle)
    kept = {id(p.reader) for p in idle}
    strays = [r.fd for r in live_readers(asyncio.get_running_loop()) if id(r) not in kept]
    assert strays == []


class DropFirst(asyncio.DatagramProtocol):
    """A UDP relay to ``upstream`` that drops the first datagram of every client."""

    def __init__(self, upstream: tuple[str, int]) -> None:
        self.upstream = upstream
        self.loop = asyncio.get_running_loop()
        self.transport: asyncio.DatagramTransport | None = None
        self.links: dict[Any, socket.socket] = {}
        self.dropped = 0
        self.relayed = 0
        self.closed = asyncio.Event()

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]  # uvloop's is no subclass

    def datagram_received(self, data: bytes, addr: Any) -> None:
        link = self.links.get(addr)
        if link is None:
            link = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
            link.setblocking(False)
            link.connect(self.upstream)
            self.links[addr] = link
            self.loop.add_reader(link.fileno(), self._back, link, addr)
            self.dropped += 1
            return
        self.relayed += 1
        link.send(data)

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed.set()

    def _back(self, link: socket.socket, addr: Any) -> None:
        with contextlib.suppress(OSError):
            data = link.recv(65_536)
            if self.transport is not None:
                self.transport.sendto(data, addr)

    def close(self) -> None:
        for link in self.links.values():
            self.loop.remove_reader(link.fileno())
            link.close()
        if self.transport is not None:
            self.transport.close()


@contextlib.asynccontextmanager
async def drop_first(lab: Lab) -> AsyncIterator[DropFirst]:
    """:class:`DropFirst` on ``RELAY`` at the lab's port, relaying to agent-a."""
    loop = asyncio.get_running_loop()
    relay = DropFirst((A, lab.port))
    await loop.create_datagram_endpoint(lambda: relay, local_addr=(RELAY, lab.port))
    try:
        yield relay
    finally:
        relay.close()
        async with asyncio.timeout(2):
            await relay.closed.wait()  # the port is free again for the next relay


GETS = f"get {SYS_NAME} sysServices.0 {LAB}.1.1.0 {LAB}.1.2.0 {LAB}.1.6.0 {LAB}.1.8.0"


def typed_gets(name: str) -> list[dict[str, Any]]:
    """What GETS gives from the agent called ``name``."""
    return [
        name_varbind(name),
        {"oid": "1.3.6.1.2.1.1.7.0", "type": "Integer32", "value": 72},
        {"oid": f"{LAB}.1.1.0", "type": "Integer", "value": -5},
        {"oid": f"{LAB}.1.2.0", "type": "Integer", "value": 4_000_000_000},
        {"oid": f"{LAB}.1.6.0", "type": "ObjectIdentifier", "value": f"{LAB}.7.7"},
        {"oid": f"{LAB}.1.8.0", "type": "OctetString", "value": "hello lab", "encoding": "text"},
    ]


# --------------------------------------------------------------------------- gets


async def test_gets_over_agents_give_one_typed_entry_per_listed_host(runner: Runner) -> None:
    hosts = [A, B, C, B]  # agent-b listed twice
    with counting_tasks() as tasks:
        chunks = await runner.run({"credential_id": "v2", "hosts": hosts, "oid_spec_list": GETS})
    [chunk] = chunks
    assert set(chunk) == {"port", "version", "credential_id", "agents", "summary"}
    assert (chunk["port"], chunk["version"], chunk["credential_id"]) == (
        runner.agent.port,
        "2c",
        "v2",
    )
    got = by_index(chunks)
    assert sorted(got) == [0, 1, 2, 3]
    for index, host in enumerate(hosts):
        # an IP literal: no "address"; one GET request for the six OIDs
        assert got[index] == {
            "index": index,
            "host": host,
            "varbinds": typed_gets(NAMES[host]),
            "requests": 1,
        }
    assert chunk["summary"] == {
        "agents": 4,
        "answered": 4,
        "failed": 0,
        "varbinds": 24,
        "requests": 4,
    }
    assert tasks[FALLBACK] == 0  # every agent went through the callback lanes
    # the values are those of a one-agent job on the same agent
    one = await runner.run({"credential_id": "v2", "host": B, "oid_spec_list": GETS})
    assert one_agent_varbinds(one) == got[1]["varbinds"]


async def test_chunk_agents_splits_the_answers_and_the_last_chunk_has_the_summary(
    runner: Runner,
) -> None:
    hosts = [A, B, C, B, A]
    chunks = await runner.run(
        {
            "credential_id": "v2",
            "hosts": " , ".join(hosts),  # one text: spaces and commas
            "oid_spec_list": f"get {SYS_NAME}",
            "chunk_agents": 2,
        }
    )
    assert [len(chunk["agents"]) for chunk in chunks] == [2, 2, 1]
    assert ["summary" in chunk for chunk in chunks] == [False, False, True]
    assert all(c["version"] == "2c" and c["credential_id"] == "v2" for c in chunks)
    assert all(c["port"] == runner.agent.port for c in chunks)
    got = by_index(chunks)
    assert {i: (e["host"], e["varbinds"]) for i, e in got.items()} == {
        i: (host, [name_varbind(NAMES[host])]) for i, host in enumerate(hosts)
    }
    assert chunks[-1]["summary"] == {
        "agents": 5,
        "answered": 5,
        "failed": 0,
        "varbinds": 5,
        "requests": 5,
    }


@pytest.mark.parametrize(
    ("spec", "compact"),
    [(f"get {SYS_NAME}", True), ("getnext sysName", False)],
    ids=["gets", "general"],
)
async def test_failing_agents_give_error_entries_and_the_others_answer(
    runner: Runner, spec: str, compact: bool
) -> None:
    hosts = [A, UNUSED, OTHER, B]
    started = time.monotonic()
    chunks = await runner.run(
        {
            "credential_id": "v2",
            "hosts": hosts,
            "oid_spec_list": spec,
            "timeout": 0.3,
            "retries": 0,
        },
        limit=5,
    )
    elapsed = time.monotonic() - started
    got = by_index(chunks)
    assert sorted(got) == [0, 1, 2, 3]
    # nothing listens: told at once by the kernel (or, without ICMP, a timeout)
    assert set(got[1]) == {"index", "host", "error", "requests"}
    assert got[1]["host"] == UNUSED
    assert got[1]["error"]["kind"] in ("connection_refused", "timeout")
    # the wrong community: silence
    assert got[2] == {
        "index": 2,
        "host": OTHER,
        "error": {
            "kind": "timeout",
            "message": "no answer from the agent (1 try of 0.3 s);"
            " a wrong community gets no answer either",
        },
        "requests": 1,
    }
    for index in (0, 3):
        entry = got[index]
        assert "error" not in entry
        if compact:
            assert entry["varbinds"] == [name_varbind(NAMES[hosts[index]])]
        else:
            [result] = entry["results"]
            assert result["op"] == "getnext"
            assert result["varbinds"] == [name_varbind(NAMES[hosts[index]])]
    summary = chunks[-1]["summary"]
    assert (summary["agents"], summary["answered"], summary["failed"]) == (4, 2, 2)
    assert summary["varbinds"] == 2
    assert 0.3 <= elapsed < 3.0  # one try of the silent agent, the others meanwhile
    text = orjson.dumps(chunks).decode()
    assert COMMUNITY not in text
    assert OTHER_COMMUNITY not in text


async def test_a_host_name_goes_through_the_fallback_and_says_its_address(runner: Runner) -> None:
    with counting_tasks() as tasks:
        chunks = await runner.run(
            {"credential_id": "v2", "hosts": ["localhost", B], "oid_spec_list": f"get {SYS_NAME}"}
        )
    got = by_index(chunks)
    assert got[0] == {
        "index": 0,
        "host": "localhost",
        "address": "127.0.0.1",
        "varbinds": [name_varbind(NAMES[A])],
        "requests": 1,
    }
    assert got[1] == {"index": 1, "host": B, "varbinds": [name_varbind(NAMES[B])], "requests": 1}
    assert tasks[FALLBACK] == 1  # the name only: the address went through a lane
    assert chunks[-1]["summary"]["answered"] == 2


@pytest.mark.parametrize("version", ["2c", "1"])
async def test_an_oid_the_agent_lacks_is_typed_as_in_a_one_agent_job(
    runner: Runner, version: str
) -> None:
    spec = f"get {SYS_NAME} {MISSING}\nget sysDescr.7"
    with counting_tasks() as tasks:
        chunks = await runner.run(
            {"credential_id": "v2", "version": version, "hosts": [A, B], "oid_spec_list": spec}
        )
    assert tasks[FALLBACK] == 2  # each agent lacked an OID: the coroutine step asked again
    got = by_index(chunks)
    assert chunks[-1]["version"] == version
    for index, host in enumerate([A, B]):
        assert got[index]["varbinds"] == [
            name_varbind(NAMES[host]),
            {"oid": MISSING, "type": "noSuchObject", "value": None},
            {"oid": "1.3.6.1.2.1.1.1.7", "type": "noSuchInstance", "value": None},
        ]
        one = await runner.run(
            {"credential_id": "v2", "version": version, "host": host, "oid_spec_list": spec}
        )
        assert one_agent_varbinds(one) == got[index]["varbinds"]


async def test_many_long_values_answer_as_in_a_one_agent_job(runner: Runner) -> None:
    spec = "get " + " ".join(f"{BIG}.{row}" for row in range(1, 65))
    chunks = await runner.run({"credential_id": "v2", "hosts": [A], "oid_spec_list": spec})
    one = await runner.run({"credential_id": "v2", "host": A, "oid_spec_list": spec})
    assert len(one_agent_varbinds(one)) == 64
    [entry] = entries(chunks)
    assert entry.get("error") is None
    assert entry["varbinds"] == one_agent_varbinds(one)


async def test_many_long_values_take_batched_requests_and_leave_the_pool_at_rest(
    runner: Runner,
) -> None:
    """More OIDs than one request carries (16): the coroutine path asks in batches."""
    spec = "get " + " ".join(f"{BIG}.{row}" for row in range(1, 65))
    chunks = await runner.run({"credential_id": "v2", "hosts": [A, B], "oid_spec_list": spec})
    for entry in entries(chunks):
        assert "error" not in entry
        assert len(entry["varbinds"]) == 64
        assert entry["requests"] == 4  # 64 OIDs, 16 a request
    assert chunks[-1]["summary"]["requests"] == 8
    assert_pool_at_rest(runner.pool, 256)


async def test_a_session_given_up_leaves_no_reader(agents: Lab, runner: Runner) -> None:
    """A session the pool does not keep (after an authentication or decoding failure) is
    unregistered from the event loop before it is forgotten."""
    await runner.run({"credential_id": "v2", "hosts": [A], "oid_spec_list": GETS})
    pool = runner.pool
    cred = community("v2", order=10)[0]
    group = pool.group_of(A, agents.port, "2c", fingerprint(cred))
    pooled = pool.enter_now(group, A, agents.port, "2c", cred)
    assert pooled is not None
    assert pooled.reader is not None
    fd = pooled.reader.fd
    assert fd in [r.fd for r in live_readers(asyncio.get_running_loop())]
    pool.leave(group, pooled, keep=False)
    assert pooled.reader is None
    assert fd not in [r.fd for r in live_readers(asyncio.get_running_loop())]
    assert_pool_at_rest(pool, 256)


@pytest.mark.parametrize("credential_id", ["v2", "sha-aes"])
async def test_an_agent_listed_many_times_with_one_session_answers_each_time(
    agents: Lab, credential_id: str
) -> None:
    runner = await make_runner(agents, sessions_per_target=1)
    hosts = [A] * 6 + [B] * 2
    try:
        for _ in range(2):
            chunks = await runner.run(
                {"credential_id": credential_id, "hosts": hosts, "oid_spec_list": GETS}, limit=5
            )
            got = by_index(chunks)
            assert {i: e["varbinds"] for i, e in got.items()} == {
                i: typed_gets(NAMES[host]) for i, host in enumerate(hosts)
            }
            assert runner.pool.created == 2  # one session per agent, shared in turn
            assert_pool_at_rest(runner.pool, 256)
    finally:
        await runner.aclose()


# --------------------------------------------------------------------------- retries


@pytest.mark.parametrize("spec", [f"get {SYS_NAME}", "getnext sysName"], ids=["gets", "general"])
async def test_a_silent_agent_costs_retries_plus_one_tries(runner: Runner, spec: str) -> None:
    hosts = [OTHER, HOLES[0], A]
    started = time.monotonic()
    chunks = await runner.run(
        {"credential_id": "v2", "hosts": hosts, "oid_spec_list": spec, "timeout": 0.2, "retries": 1}
    )
    elapsed = time.monotonic() - started
    got = by_index(chunks)
    for index in (0, 1):
        assert got[index]["error"] == {
            "kind": "timeout",
            "message": "no answer from the agent (2 tries of 0.2 s);"
            " a wrong community gets no answer either",
        }
    assert "error" not in got[2]
    assert 0.4 <= elapsed < 3.0  # two tries of 0.2 s, never cut short
    summary = chunks[-1]["summary"]
    assert (summary["answered"], summary["failed"]) == (1, 2)


@pytest.mark.parametrize("spec", [f"get {SYS_NAME}", "getnext sysName"], ids=["gets", "general"])
async def test_the_summary_counts_the_tries_of_silent_agents(runner: Runner, spec: str) -> None:
    chunks = await runner.run(
        {
            "credential_id": "v2",
            "hosts": [OTHER, A],
            "oid_spec_list": spec,
            "timeout": 0.1,
            "retries": 1,
        }
    )
    got = by_index(chunks)
    assert got[0]["error"]["kind"] == "timeout"
    answered = got[1].get("requests") or got[1]["summary"]["requests"]
    assert answered == 1
    assert chunks[-1]["summary"]["requests"] == 2 + answered  # 2 tries + the answered GET


@pytest.mark.parametrize("spec", [f"get {SYS_NAME}", "getnext sysName"], ids=["gets", "general"])
async def test_a_lost_request_is_sent_again_and_answered(agents: Lab, spec: str) -> None:
    runner = await make_runner(agents)
    try:
        async with drop_first(agents) as relay:
            started = time.monotonic()
            chunks = await runner.run(
                {
                    "credential_id": "v2",
                    "hosts": [RELAY],
                    "oid_spec_list": spec,
                    "timeout": 0.2,
                    "retries": 1,
                },
                limit=5,
            )
            elapsed = time.monotonic() - started
        [entry] = entries(chunks)
        assert "error" not in entry
        assert relay.dropped == 1
        assert elapsed >= 0.2  # the first try waited out its timeout
        if "varbinds" in entry:
            assert entry["varbinds"] == [name_varbind(NAMES[A])]
            assert entry["requests"] == 2
        else:
            assert entry["results"][0]["varbinds"][0]["value"] == NAMES[A]
            assert entry["summary"]["requests"] == 2
        assert chunks[-1]["summary"]["requests"] == 2
        # without retries, the same loss is the agent's error
        async with drop_first(agents):
            fresh = await make_runner(agents)
            try:
                chunks = await fresh.run(
                    {
                        "credential_id": "v2",
                        "hosts": [RELAY],
                        "oid_spec_list": spec,
                        "timeout": 0.2,
                        "retries": 0,
                    },
                    limit=5,
                )
            finally:
                await fresh.aclose()
        [entry] = entries(chunks)
        assert entry["error"]["kind"] == "timeout"
        assert "(1 try of 0.2 s)" in entry["error"]["message"]
    finally:
        await runner.aclose()


# --------------------------------------------------------------------------- general jobs


async def test_a_general_hosts_job_gives_the_one_agent_shape_per_agent(
    runner: Runner, agents: Lab
) -> None:
    spec = f"walk {SYS_OR_ID}\nget {SYS_NAME}"
    chunks = await runner.run({"credential_id": "v2", "hosts": [A, B], "oid_spec_list": spec})
    [chunk] = chunks
    assert set(chunk) == {"port", "agents", "summary"}  # version, credential: per agent
    got = by_index(chunks)
    walked = bulkwalk_oids(agents.agents[A], SYS_OR_ID)
    assert len(walked) >= 5
    for index, host in enumerate([A, B]):
        entry = got[index]
        assert set(entry) == {
            "index",
            "host",
            "address",
            "version",
            "credential_id",
            "results",
            "summary",
        }
        assert (entry["host"], entry["address"]) == (host, host)
        assert (entry["version"], entry["credential_id"]) == ("2c", "v2")
        walk, get = entry["results"]
        assert (walk["spec"], walk["op"], walk["oid"]) == (0, "walk", SYS_OR_ID)
        assert [vb["oid"] for vb in walk["varbinds"]] == walked
        assert (walk["truncated"], walk["more"]) == (False, False)
        assert get["varbinds"] == [name_varbind(NAMES[host])]
        assert entry["summary"]["varbinds"] == len(walked) + 1
        assert entry["summary"]["truncated"] is False
        # the very results of a one-agent job on that agent
        one = await runner.run({"credential_id": "v2", "host": host, "oid_spec_list": spec})
        assert one[-1]["results"] == entry["results"]
        assert one[-1]["summary"] == entry["summary"]
    assert chunk["summary"] == {
        "agents": 2,
        "answered": 2,
        "failed": 0,
        "varbinds": 2 * (len(walked) + 1),
        "requests": got[0]["summary"]["requests"] + got[1]["summary"]["requests"],
    }


async def test_gets_with_several_credentials_are_a_general_job(runner: Runner) -> None:
    """No credential_id: the community (order 10) is tried first and answers."""
    with counting_tasks() as tasks:
        chunks = await runner.run({"hosts": [A, C], "oid_spec_list": f"get {SYS_NAME}"})
    assert tasks[FALLBACK] == 0
    assert "version" not in chunks[-1]
    got = by_index(chunks)
    for index, host in enumerate([A, C]):
        assert (got[index]["credential_id"], got[index]["version"]) == ("v2", "2c")
        assert got[index]["results"][0]["varbinds"] == [name_varbind(NAMES[host])]


# --------------------------------------------------------------------------- v3


async def test_v3_gets_discover_through_the_fallback_then_reuse_sessions(runner: Runner) -> None:
    payload = {"credential_id": "sha-aes", "hosts": [A, B, C], "oid_spec_list": f"get {SYS_NAME}"}
    with counting_tasks() as tasks:
        first = await runner.run(payload)
    assert tasks[FALLBACK] == 3  # engine discovery waits: the coroutine step
    created = runner.pool.created
    assert created == 3
    with counting_tasks() as tasks:
        second = await runner.run(payload)
    assert tasks[FALLBACK] == 0  # pooled, discovered sessions: the callback lanes
    assert runner.pool.created == created
    for chunks in (first, second):
        assert (chunks[-1]["version"], chunks[-1]["credential_id"]) == ("3", "sha-aes")
        got = by_index(chunks)
        assert {i: e["varbinds"] for i, e in got.items()} == {
            i: [name_varbind(NAMES[host])] for i, host in enumerate([A, B, C])
        }
        assert chunks[-1]["summary"] == {
            "agents": 3,
            "answered": 3,
            "failed": 0,
            "varbinds": 3,
            "requests": 3,
        }


# --------------------------------------------------------------------------- concurrency, budget


@pytest.mark.parametrize("spec", [f"get {SYS_NAME}", "getnext sysName"], ids=["gets", "general"])
async def test_concurrency_bounds_the_agents_in_flight(agents: Lab, spec: str) -> None:
    runner = await make_runner(agents, max_in_flight=10)
    try:
        started = time.monotonic()
        async with sampling(runner) as samples:
            chunks = await runner.run(
                {
                    "credential_id": "v2",
                    "hosts": list(HOLES),
                    "oid_spec_list": spec,
                    "timeout": 0.3,
                    "retries": 0,
                    "concurrency": 2,
                },
                limit=5,
            )
        elapsed = time.monotonic() - started
        assert [e["error"]["kind"] for e in entries(chunks)] == ["timeout"] * 4
        assert 0.6 <= elapsed < 3.0  # two at a time: two rounds of 0.3 s
        assert min(samples.free) == 8  # two slots of the budget, never more
        assert max(samples.leased) == 2
        assert_pool_at_rest(runner.pool, 10)
    finally:
        await runner.aclose()


async def test_a_budget_of_one_serves_jobs_one_agent_at_a_time(agents: Lab) -> None:
    runner = await make_runner(agents, max_in_flight=1)
    hosts = [A, B, HOLES[0], C, B]  # a silent one keeps each job going for 50 ms at least
    try:
        gets = {
            "credential_id": "v2",
            "hosts": hosts,
            "oid_spec_list": f"get {SYS_NAME}",
            "timeout": 0.05,
            "retries": 0,
        }
        general = {**gets, "oid_spec_list": "getnext sysName"}
        chunks = await runner.run(gets, limit=5)
        assert chunks[-1]["summary"]["answered"] == 4
        started = time.monotonic()
        async with sampling(runner) as samples:
            results = await asyncio.gather(
                runner.run(gets, limit=5), runner.run(general, limit=5), runner.run(gets, limit=5)
            )
        assert time.monotonic() - started >= 0.15  # the three silences one after the other
        for chunks in results:
            got = by_index(chunks)
            assert chunks[-1]["summary"]["answered"] == 4
            assert got[2]["error"]["kind"] == "timeout"
            for index, host in enumerate(hosts):
                if host in NAMES:
                    value = got[index].get("varbinds") or got[index]["results"][0]["varbinds"]
                    assert value == [name_varbind(NAMES[host])]
        assert len(samples.free) >= 20
        assert min(samples.free) == 0
        assert max(samples.leased) == 1  # one agent at a time, all three jobs together
        assert_pool_at_rest(runner.pool, 1)
    finally:
        await runner.aclose()


@pytest.mark.parametrize(
    ("credential_id", "spec"),
    [("v2", f"get {SYS_NAME}"), ("sha-aes", f"get {SYS_NAME}"), ("v2", "getnext sysName")],
    ids=["gets-v2c", "gets-v3", "general"],
)
async def test_closing_the_job_midway_gives_everything_back(
    agents: Lab, credential_id: str, spec: str
) -> None:
    runner = await make_runner(agents, max_in_flight=20)
    loop = asyncio.get_running_loop()
    try:
        hosts = [A, HOLES[0], HOLES[1], "localhost", B, HOLES[2]]
        payload = {
            "credential_id": credential_id,
            "hosts": hosts,
            "oid_spec_list": spec,
            "timeout": 2.0,
            "retries": 1,
            "chunk_agents": 1,
        }
        started = time.monotonic()
        stream = snmp.run(runner.job(payload), runner.ctx)
        assert isinstance(stream, AsyncGenerator)
        async with asyncio.timeout(3):
            first = await anext(stream)
            assert len(first["agents"]) == 1
            assert first["agents"][0]["host"] in (A, B, "localhost")
            assert "error" not in first["agents"][0]
            pool = runner.pool
            assert sum(g.leased for g in pool._groups.values()) >= 3  # the holes, waiting
            assert pool.budget._value < 20
            await stream.aclose()
        assert time.monotonic() - started < 1.5  # not after the holes' timeouts
        assert_pool_at_rest(pool, 20)
        # the sessions given back mid-request still serve
        chunks = await runner.run({**payload, "hosts": [A, B, "localhost"]}, limit=5)
        assert chunks[-1]["summary"]["answered"] == 3
        assert_pool_at_rest(pool, 20)
        await runner.aclose()
        assert live_readers(loop) == []  # closing the pool unregistered every socket
    finally:
        await runner.aclose()


# --------------------------------------------------------------------------- parameters


@pytest.mark.parametrize(
    ("payload", "settings", "error", "words"),
    [
        ({"host": A, "hosts": [B]}, {}, BadParameter, "either host or hosts"),
        ({"hosts": []}, {}, BadParameter, "is empty"),
        ({"hosts": " , "}, {}, BadParameter, "is empty"),
        ({"hosts": [A, "bad host!"]}, {}, BadParameter, "entry 1: 'bad host!' is not an IP"),
        ({"hosts": [A, B, " "]}, {}, BadParameter, "entry 2 is empty"),
        ({"hosts": [A, 7]}, {}, BadParameter, "entry 1: is not text"),
        ({"hosts": 7}, {}, BadParameter, ""),
        ({"hosts": [A, B, C]}, {"max_hosts": 2}, Refused, "3 hosts is over the limit of 2"),
    ],
)
def test_bad_hosts_name_the_field(
    payload: dict[str, Any], settings: dict[str, Any], error: type[BridgeError], words: str
) -> None:
    record = OutputRecord(sys_id="s", topic=TOPIC, source="127.0.0.1", payload=payload)
    with pytest.raises(error) as caught:
        build_params(record, probe_settings(snmp.SPEC, settings))
    assert type(caught.value) is error
    assert caught.value.field == "hosts"
    assert words in caught.value.message


def test_hosts_parameters_are_canonical() -> None:
    record = OutputRecord(
        sys_id="s",
        topic=TOPIC,
        source="10.0.0.7",
        payload={"hosts": " 10.0.0.1, [::1] edge-3.example ,10.0.0.1", "chunk_agents": 50},
    )
    params = build_params(record, probe_settings(snmp.SPEC, {"concurrency": 7, "max_hosts": 4}))
    assert params.hosts == ("10.0.0.1", "::1", "edge-3.example", "10.0.0.1")
    assert params.host is None  # the record's source is not an agent of a hosts job
    assert (params.concurrency, params.chunk_agents) == (7, 50)
    assert snmp.SPEC.target_host(params) is None


# --------------------------------------------------------------------------- bridge


async def test_a_hosts_job_through_the_bridge(
    broker: BrokerAddress,
    unique_agent: str,
    tmp_path: Path,
    agents: Lab,
    caplog: pytest.LogCaptureFixture,
) -> None:
    credentials = tmp_path / "credentials.toml"
    credentials.write_text(
        "[[credential]]\n"
        'id = "lab-v2"\ntype = "snmp_community"\n'
        f'community = "{COMMUNITY}"\norder = 20\n',
        encoding="utf-8",
    )
    os.chmod(credentials, 0o600)
    config = make_config(broker.host, broker.port, unique_agent, tmp_path / "state")
    config.bridge.credentials_file = credentials
    caplog.set_level(logging.DEBUG)
    mid = f"mid.server.{unique_agent}"
    hosts = [A, UNUSED, B, OTHER, C]
    async with bridge_and_client(config) as (_bridge, client):
        jobs = [
            output_record(
                "SNMP",
                agent=mid,
                source="10.255.255.1",  # not used: the job names its agents
                payload={
                    "port": agents.port,
                    "hosts": hosts,
                    "credential_id": "lab-v2",
                    "oid_spec_list": f"get {SYS_NAME}",
                    "chunk_agents": 2,
                    "timeout": 0.3,
                    "retries": 0,
                },
            ),
            output_record(
                "SNMP",
                agent=mid,
                source=A,
                payload={"port": agents.port, "host": A, "hosts": [B]},
            ),
        ]
        await client.send(jobs)
        good, bad = await client.wait([j["sys_id"] for j in jobs], timeout=20)

    records = good.records
    assert [r["sequence"] for r in records] == [0, 1, 2]
    assert [r["complete"] for r in records] == [False, False, True]
    assert {r["response_to"] for r in records} == {jobs[0]["sys_id"]}
    assert {r["topic"] for r in records} == {"SNMP"}
    assert all(r["error_string"] == "" for r in records)
    payloads = [r["payload"] for r in records]
    assert [len(p["agents"]) for p in payloads] == [2, 2, 1]
    assert ["summary" in p for p in payloads] == [False, False, True]
    assert all(
        (p["port"], p["version"], p["credential_id"]) == (agents.port, "2c", "lab-v2")
        for p in payloads
    )
    got = by_index(payloads)
    assert sorted(got) == [0, 1, 2, 3, 4]
    for index in (0, 2, 4):
        assert got[index]["varbinds"] == [name_varbind(NAMES[hosts[index]])]
    assert got[1]["error"]["kind"] in ("connection_refused", "timeout")
    assert got[1]["requests"] == 1  # retries 0: refused or silent, one request
    assert got[3]["error"]["kind"] == "timeout"
    assert got[3]["requests"] == 1
    assert payloads[-1]["summary"] == {
        "agents": 5,
        "answered": 3,
        "failed": 2,
        "varbinds": 3,
        "requests": 5,
    }
    assert bad.final["complete"] is True
    assert bad.final["payload"]["error"] == {
        "kind": "bad_parameter",
        "message": "give either host or hosts, not both",
        "field": "hosts",
    }
    everything = orjson.dumps([r for job in (good, bad) for r in job.records]).decode()
    for secret in (COMMUNITY, OTHER_COMMUNITY):
        assert secret not in everything
        assert secret not in caplog.text
