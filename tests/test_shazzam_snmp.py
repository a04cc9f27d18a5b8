"""Shazzam's SNMP scanner (``snmp: true``) against a real snmpd on loopback.

Every packet is real; two tests only wrap the tap function, to count taps in flight and
to prove a sweep without ``snmp`` never taps.

The agent (``tests/snmpd.py``) listens on 127.0.0.1:<free UDP port> only, so a sweep
with ``snmp_port`` set to that port finds it on 127.0.0.1 and gets ICMP port unreachable
from every other 127.0.0.0/8 address. A UDP socket bound to 0.0.0.0 that never reads
stands for a silent agent on every loopback address.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import socket
import time
from collections.abc import AsyncGenerator, Iterator
from pathlib import Path
from typing import Any

import orjson
import pytest

import probes.shazzam.snmp_scan as snmp_scan
from bridge.agent.credentials import LocalCredentials, NoCredentials
from bridge.wire.client import output_record
from bridge.wire.credentials import Credential
from bridge.wire.errors import BadParameter, CredentialError, Refused
from bridge.wire.records import OutputRecord
from probes.contract import Job, ProbeContext
from probes.kit.ratelimit import RateLimiter
from probes.shazzam.engine import Sweep, SweepOptions, iter_hosts
from probes.shazzam.params import TOPIC, ShazzamParams, build_params
from probes.shazzam.probe import run
from probes.shazzam.settings import ShazzamSettings
from probes.shazzam.snmp_tap import snmp_tap_credentials
from tests.brokers import BrokerAddress
from tests.harness import bridge_and_client, make_config
from tests.snmpd import COMMUNITY, SYS_NAME, Snmpd, SnmpdUnavailable, free_udp_port
from tests.test_shazzam import all_hosts, closed_port, full_backlog, sweep_threads

Chunk = dict[str, Any]
WRONG = "mb-wrong-7e3b"  # a community the agent does not know
SNMP_KEYS = {"port", "version", "credential_id", "sys_descr", "sys_object_id", "sys_name", "rtt_ms"}


@pytest.fixture(scope="module")
def agent(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Snmpd]:
    try:
        server = Snmpd(tmp_path_factory.mktemp("snmpd"), users=()).start()
    except SnmpdUnavailable as exc:
        pytest.fail(str(exc), pytrace=False)
    yield server
    server.stop()


@pytest.fixture
def silent_udp() -> Iterator[int]:
    """A UDP port on every loopback address where datagrams arrive and nobody answers."""
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
        sock.bind(("0.0.0.0", 0))
        yield sock.getsockname()[1]


def community(cred_id: str, value: str, order: int = 100) -> tuple[Credential, int]:
    return Credential(cred_id, "snmp_community", {"community": value}), order


def lab_credentials() -> LocalCredentials:
    """``wrong`` first (order 10), then ``lab`` (the agent's community), plus an SSH one."""
    ssh = Credential("ssh", "ssh_password", {"user": "u", "password": "p"})
    return LocalCredentials(
        [community("wrong", WRONG, 10), community("lab", COMMUNITY, 20), (ssh, 5)]
    )


def make_job(
    payload: dict[str, Any], credentials: Any = None, rate: RateLimiter | None = None
) -> tuple[Job[ShazzamParams], ProbeContext]:
    config = ShazzamSettings()
    record = OutputRecord(sys_id="sweep-snmp", topic=TOPIC, payload=payload)
    ctx = ProbeContext(
        agent="t",
        rate=rate or RateLimiter(0),
        per_host_limit=8,
        settings=config,
        credentials=lab_credentials() if credentials is None else credentials,
    )
    return Job(record, build_params(record, config)), ctx


async def collect(
    job: Job[ShazzamParams], ctx: ProbeContext, *, limit: float = 15.0
) -> list[Chunk]:
    chunks: list[Chunk] = []
    stream = run(job, ctx)
    assert isinstance(stream, AsyncGenerator)
    async with asyncio.timeout(limit), contextlib.aclosing(stream) as items:
        async for chunk in items:
            chunks.append(chunk)
            assert len(chunks) <= 1000
    return chunks


def snmp_job(agent_port: int, **payload: Any) -> dict[str, Any]:
    return {
        "targets": "127.0.0.1",
        "ports": [closed_port()],
        "snmp": True,
        "snmp_port": agent_port,
        **payload,
    }


class Refusing:
    """A resolver that refuses like the bridge does before the MID is validated."""

    async def resolve(
        self, record: OutputRecord, *, credential_id: str | None, types: tuple[str, ...]
    ) -> list[Credential]:
        raise Refused("this MID is not validated", field="credentials")


class CountingRate(RateLimiter):
    """A real rate limiter that counts the tokens coroutines acquired (the TCP engine's
    thread uses ``take``; the SNMP taps use ``acquire``)."""

    acquired = 0

    async def acquire(self, wanted: int = 1) -> int:
        granted = await super().acquire(wanted)
        self.acquired += granted
        return granted


# --------------------------------------------------------------------------- parameters


def test_snmp_parameters_default_off_and_are_validated() -> None:
    job, _ctx = make_job({"targets": "127.0.0.1"})
    params = job.params
    assert (params.snmp, params.snmp_port, params.snmp_timeout) == (False, 161, 1.0)
    assert params.snmp_credential_ids is None
    # XML parameters arrive as text.
    job, _ctx = make_job(
        {
            "targets": "127.0.0.1",
            "snmp": "true",
            "snmp_port": "1161",
            "snmp_timeout": "0.5",
            "snmp_credential_ids": " a, b ,a,",
        }
    )
    params = job.params
    assert (params.snmp, params.snmp_port, params.snmp_timeout) == (True, 1161, 0.5)
    assert params.snmp_credential_ids == ("a", "b")
    job, _ctx = make_job({"targets": "127.0.0.1", "snmp_credential_ids": ["x", "y"]})
    assert job.params.snmp_credential_ids == ("x", "y")
    bad: list[tuple[dict[str, Any], str]] = [
        ({"snmp_port": 0}, "snmp_port"),
        ({"snmp_port": 70000}, "snmp_port"),
        ({"snmp_timeout": 0}, "snmp_timeout"),
        ({"snmp_timeout": 31}, "snmp_timeout"),
        ({"snmp": "perhaps"}, "snmp"),
        ({"snmp_credential_ids": []}, "snmp_credential_ids"),
        ({"snmp_credential_ids": " , "}, "snmp_credential_ids"),
        ({"snmp_credential_ids": [1]}, "snmp_credential_ids"),
        ({"snmp_credential_ids": {"id": "a"}}, "snmp_credential_ids"),
        ({"snmp_credential_ids": [f"c{i}" for i in range(33)]}, "snmp_credential_ids"),
    ]
    for extra, field in bad:
        with pytest.raises(BadParameter) as caught:
            make_job({"targets": "127.0.0.1", **extra})
        assert caught.value.field == field, extra


# --------------------------------------------------------------------------- answers


async def test_the_scanner_finds_the_agent_and_never_reports_the_community(agent: Snmpd) -> None:
    job, ctx = make_job(snmp_job(agent.port, snmp_timeout=3.0))
    chunks = await collect(job, ctx)
    [host] = chunks[0]["hosts"]
    answer = host["snmp"]
    assert set(answer) == SNMP_KEYS
    assert answer["sys_name"] == SYS_NAME
    assert answer["sys_object_id"].startswith("1.3.6.1.4.1.")
    assert answer["sys_descr"]
    assert answer["credential_id"] == "lab"  # "wrong" was tried first and not answered
    assert answer["port"] == agent.port
    assert answer["version"] == "2c"
    assert 0 <= answer["rtt_ms"] < 3000
    assert "snmp_error" not in host
    assert chunks[-1]["totals"]["snmp_answered"] == 1
    text = orjson.dumps(chunks).decode()
    assert COMMUNITY not in text
    assert WRONG not in text


async def test_a_closed_port_gets_no_answer_at_once(agent: Snmpd) -> None:
    # On IPv4 and IPv6 loopback: nothing listens on that UDP port of either.
    payload = {**snmp_job(free_udp_port(), snmp_timeout=5.0), "targets": "127.0.0.1, ::1"}
    job, ctx = make_job(payload)
    started = time.monotonic()
    chunks = await collect(job, ctx)
    elapsed = time.monotonic() - started
    hosts = all_hosts(chunks)
    assert set(hosts) == {"127.0.0.1", "::1"}
    for host in hosts.values():
        assert host["snmp"] is None
        assert "snmp_error" not in host
    assert chunks[0]["totals"]["snmp_answered"] == 0
    assert elapsed < 2.5  # ICMP port unreachable: the 5 s timeout is not waited for


async def test_a_wrong_community_gets_no_answer_after_the_timeout(agent: Snmpd) -> None:
    only_wrong = LocalCredentials([community("wrong", WRONG)])
    job, ctx = make_job(snmp_job(agent.port, snmp_timeout=0.4), only_wrong)
    started = time.monotonic()
    chunks = await collect(job, ctx)
    elapsed = time.monotonic() - started
    [host] = chunks[0]["hosts"]
    assert host["snmp"] is None
    assert chunks[0]["totals"]["snmp_answered"] == 0
    assert 0.35 <= elapsed < 3.0


async def test_a_sweep_of_20_addresses_reports_exactly_one_snmp_answer(agent: Snmpd) -> None:
    ports = [closed_port(), closed_port()]
    job, ctx = make_job(
        {
            "targets": "127.0.0.1-127.0.0.20",
            "ports": ports,
            "snmp": True,
            "snmp_port": agent.port,
            "snmp_timeout": 3.0,
            "chunk_hosts": 3,
        }
    )
    chunks = await collect(job, ctx)
    assert [len(chunk["hosts"]) for chunk in chunks] == [3, 3, 3, 3, 3, 3, 2]
    assert [chunk["progress"]["done"] for chunk in chunks] == [3, 6, 9, 12, 15, 18, 20]
    assert ["totals" in chunk for chunk in chunks] == [False] * 6 + [True]
    hosts = all_hosts(chunks)
    assert set(hosts) == {f"127.0.0.{n}" for n in range(1, 21)}
    assert all("snmp" in host for host in hosts.values())  # every chunk entry is complete
    answered = {ip: host["snmp"] for ip, host in hosts.items() if host["snmp"] is not None}
    assert list(answered) == ["127.0.0.1"]
    assert answered["127.0.0.1"]["sys_name"] == SYS_NAME
    assert all(sorted(host["closed"]) == sorted(ports) for host in hosts.values())
    totals = chunks[-1]["totals"]
    assert totals["addresses"] == 20
    assert totals["alive"] == 20
    assert totals["probes"] == 40
    assert totals["open_ports"] == 0
    assert totals["snmp_answered"] == 1


async def test_an_snmp_answer_alone_makes_a_host_alive(agent: Snmpd) -> None:
    with full_backlog() as silent_tcp:  # the TCP port never answers: filtered
        payload = {**snmp_job(agent.port, snmp_timeout=3.0), "ports": [silent_tcp]}
        payload["connect_timeout"] = 0.2
        job, ctx = make_job(payload)
        [with_snmp] = await collect(job, ctx)
        job, ctx = make_job({**payload, "snmp": False})
        [without] = await collect(job, ctx)
    [host] = with_snmp["hosts"]
    assert host["filtered"] == [silent_tcp]
    assert host["snmp"]["sys_name"] == SYS_NAME
    assert host["alive"] is True
    assert with_snmp["totals"]["alive"] == 1
    [host] = without["hosts"]
    assert host["filtered"] == [silent_tcp]
    assert host["alive"] is False
    assert "snmp" not in host
    assert without["totals"]["alive"] == 0
    assert "snmp_answered" not in without["totals"]


async def test_snmp_credential_ids_choose_the_communities(agent: Snmpd) -> None:
    job, ctx = make_job(snmp_job(agent.port, snmp_timeout=0.4, snmp_credential_ids=["wrong"]))
    [chunk] = await collect(job, ctx)
    assert chunk["hosts"][0]["snmp"] is None
    job, ctx = make_job(snmp_job(agent.port, snmp_timeout=3.0, snmp_credential_ids="lab"))
    [chunk] = await collect(job, ctx)
    assert chunk["hosts"][0]["snmp"]["credential_id"] == "lab"
    for ids in (["lab", "nope"], ["ssh"]):  # unknown; not an snmp_community
        job, ctx = make_job(snmp_job(agent.port, snmp_credential_ids=ids))
        with pytest.raises(CredentialError) as caught:
            await collect(job, ctx)
        assert caught.value.field == "snmp_credential_ids"
        assert ids[-1] in caught.value.message


# --------------------------------------------------------------------------- failures


async def test_no_community_credential_fails_at_job_start_naming_snmp(agent: Snmpd) -> None:
    ssh_only = LocalCredentials(
        [(Credential("ssh", "ssh_password", {"user": "u", "password": "p"}), 1)]
    )
    empty = LocalCredentials([community("empty", "")])
    with socket.socket() as server:
        server.bind(("127.0.0.1", 0))
        server.listen(8)
        server.setblocking(False)
        payload = snmp_job(agent.port, ports=[server.getsockname()[1]])
        for resolver in (ssh_only, NoCredentials(), empty):
            job, ctx = make_job(payload, resolver)
            with pytest.raises(CredentialError) as caught:
                await collect(job, ctx)
            assert caught.value.field == "snmp"
            assert "snmp_community" in caught.value.message
        job, ctx = make_job(payload)
        ctx.credentials = None
        with pytest.raises(CredentialError) as caught:
            await collect(job, ctx)
        assert caught.value.field == "snmp"
        job, ctx = make_job(payload, Refusing())
        with pytest.raises(Refused):
            await collect(job, ctx)
        with pytest.raises(BlockingIOError):
            server.accept()  # no sweep started: nothing ever connected
    assert sweep_threads() == []


async def test_sweeps_without_snmp_neither_tap_nor_ask_for_credentials(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    async def no_tap(*_args: Any, **_kwargs: Any) -> None:
        raise AssertionError("tapped without snmp: true")

    monkeypatch.setattr(snmp_scan, "snmp_tap_credentials", no_tap)
    job, ctx = make_job({"targets": "127.0.0.1-5", "ports": [closed_port()]}, Refusing())
    chunks = await collect(job, ctx)
    hosts = all_hosts(chunks)
    assert len(hosts) == 5
    assert not any("snmp" in host for host in hosts.values())
    assert "snmp_answered" not in chunks[-1]["totals"]


# --------------------------------------------------------------------------- pacing


async def test_taps_in_flight_are_bounded(monkeypatch: pytest.MonkeyPatch, silent_udp: int) -> None:
    real_tap = snmp_tap_credentials
    in_flight = peak = 0

    async def counted(*args: Any, **kwargs: Any) -> dict[str, Any] | None:
        nonlocal in_flight, peak
        in_flight += 1
        peak = max(peak, in_flight)
        try:
            return await real_tap(*args, **kwargs)
        finally:
            in_flight -= 1

    monkeypatch.setattr(snmp_scan, "SNMP_IN_FLIGHT", 4)
    monkeypatch.setattr(snmp_scan, "snmp_tap_credentials", counted)
    payload = {**snmp_job(silent_udp, snmp_timeout=0.2), "targets": "127.0.0.1-12"}
    job, ctx = make_job(payload)
    started = time.monotonic()
    chunks = await collect(job, ctx)
    elapsed = time.monotonic() - started
    assert peak == 4
    assert elapsed >= 0.55  # 12 silent addresses, 4 at a time, 0.2 s each: 3 rounds
    assert chunks[-1]["totals"]["snmp_answered"] == 0
    assert len(all_hosts(chunks)) == 12


async def test_taps_take_a_token_per_packet_from_a_paced_rate(agent: Snmpd) -> None:
    rate = CountingRate(400)  # burst 20
    payload = {**snmp_job(agent.port, snmp_timeout=3.0), "targets": "127.0.0.1-20"}
    job, ctx = make_job(payload, rate=rate)
    started = time.monotonic()
    chunks = await collect(job, ctx)
    elapsed = time.monotonic() - started
    # 20 addresses × 2 communities × 2 taps, paid before the tap; the TCP engine pays
    # for its connects through take() in its own thread, not counted here.
    assert rate.acquired == 80
    assert elapsed >= (80 - 20) / 400 * 0.9
    assert chunks[-1]["totals"]["snmp_answered"] == 1
    unpaced = CountingRate(0)
    job, ctx = make_job(payload, rate=unpaced)
    await collect(job, ctx)
    assert unpaced.acquired == 0  # unlimited: no token taken, no wait


def other_tasks() -> list[asyncio.Task[Any]]:
    me = asyncio.current_task()
    return [task for task in asyncio.all_tasks() if task is not me]


async def test_a_timed_out_or_abandoned_snmp_sweep_leaves_no_task_or_thread_behind(
    silent_udp: int,
) -> None:
    payload = {
        **snmp_job(silent_udp, snmp_timeout=2.0),
        "targets": "127.0.0.1-127.0.1.254",
        "chunk_hosts": 1,
    }
    job, ctx = make_job(payload)
    started = time.monotonic()
    with pytest.raises(TimeoutError):
        await collect(job, ctx, limit=0.5)
    assert time.monotonic() - started < 1.5  # the taps were cancelled, not waited for
    # Closing the job closed everything before it returned: no task to wait for.
    assert other_tasks() == []
    assert sweep_threads() == []
    # The runner closes a job between two chunks (e.g. when a result cannot be sent).
    job, ctx = make_job({**payload, "snmp_timeout": 0.2})
    stream = run(job, ctx)
    assert isinstance(stream, AsyncGenerator)
    async with asyncio.timeout(10), contextlib.aclosing(stream) as items:
        async for chunk in items:
            assert len(chunk["hosts"]) == 1
            assert other_tasks() != []  # the taps of the next hosts are running
            break
    assert other_tasks() == []
    assert sweep_threads() == []


async def test_tcp_results_waiting_for_their_taps_hold_the_engine_back(silent_udp: int) -> None:
    # One silent tap at a time (0.1 s each) and room for 2 TCP results waiting: when the
    # first host comes out the engine has handed over 2 hosts, not all 10.
    options = SweepOptions(ports=(closed_port(),), timeout=1.0)
    intervals = [(4, 0x7F000001, 0x7F00000A)]  # 127.0.0.1-10
    sweep = Sweep(intervals, options, window=2)
    creds = [community("lab", COMMUNITY)[0]]
    join = snmp_scan.SnmpJoin(
        sweep,
        (ip for _version, ip in iter_hosts(intervals)),
        10,
        creds,
        port=silent_udp,
        timeout=0.1,
        rate=RateLimiter(0),
        in_flight=1,
        window=2,
    )
    seen: list[str] = []
    handed_over: list[int] = []
    async with asyncio.timeout(10), sweep, contextlib.aclosing(join.batches()) as batches:
        async for batch in batches:
            handed_over.append(sweep.stats.hosts)
            seen += [host["ip"] for host in batch]
            assert all(host["snmp"] is None for host in batch)
    assert sorted(seen) == sorted(f"127.0.0.{n}" for n in range(1, 11))
    assert handed_over[0] <= 4
    assert handed_over[-1] == 10


# --------------------------------------------------------------------------- end to end


def credentials_file(path: Path) -> Path:
    path.write_text(
        "[[credential]]\n"
        f'id = "lab-wrong"\ntype = "snmp_community"\ncommunity = "{WRONG}"\norder = 10\n\n'
        "[[credential]]\n"
        f'id = "lab-v2"\ntype = "snmp_community"\ncommunity = "{COMMUNITY}"\norder = 20\n',
        encoding="utf-8",
    )
    os.chmod(path, 0o600)
    return path


async def test_an_snmp_sweep_through_the_bridge(
    broker: BrokerAddress,
    unique_agent: str,
    tmp_path: Path,
    agent: Snmpd,
    caplog: pytest.LogCaptureFixture,
) -> None:
    config = make_config(broker.host, broker.port, unique_agent, tmp_path / "state")
    config.bridge.credentials_file = credentials_file(tmp_path / "credentials.toml")
    caplog.set_level(logging.DEBUG)
    mid = f"mid.server.{unique_agent}"
    refused = closed_port()
    async with bridge_and_client(config) as (_bridge, client):
        jobs = [
            output_record(
                "Shazzam",
                agent=mid,
                payload={
                    "targets": "127.0.0.1-127.0.0.5",
                    "ports": [refused],
                    "snmp": True,
                    "snmp_port": agent.port,
                    "snmp_timeout": 3.0,
                    "chunk_hosts": 2,
                },
            ),
            output_record(
                "Shazzam",
                agent=mid,
                payload={"targets": "127.0.0.1", "snmp": True, "snmp_credential_ids": "missing"},
            ),
        ]
        await client.send(jobs)
        sweep, missing = await client.wait([j["sys_id"] for j in jobs], timeout=30)
    assert sweep.error_string == ""
    assert len(sweep.records) == 3
    hosts = [h for rec in sweep.records for h in rec["payload"]["hosts"]]
    assert sorted(h["ip"] for h in hosts) == [f"127.0.0.{n}" for n in range(1, 6)]
    answered = [h for h in hosts if h["snmp"] is not None]
    assert [h["ip"] for h in answered] == ["127.0.0.1"]
    assert answered[0]["snmp"]["sys_name"] == SYS_NAME
    assert answered[0]["snmp"]["credential_id"] == "lab-v2"
    totals = sweep.final["payload"]["totals"]
    assert (totals["addresses"], totals["alive"], totals["snmp_answered"]) == (5, 5, 1)
    error = missing.final["payload"]["error"]
    assert error["kind"] == "credential_error"
    assert error["field"] == "snmp_credential_ids"
    assert "missing" in error["message"]
    everything = orjson.dumps([*sweep.records, *missing.records]).decode()
    for secret in (COMMUNITY, WRONG):
        assert secret not in everything
        assert secret not in caplog.text


async def test_an_snmp_sweep_is_refused_until_the_mid_is_validated(
    broker: BrokerAddress, unique_agent: str, tmp_path: Path
) -> None:
    config = make_config(
        broker.host,
        broker.port,
        unique_agent,
        tmp_path / "state",
        security={"require_validation": True},
    )
    config.bridge.credentials_file = credentials_file(tmp_path / "credentials.toml")
    mid = f"mid.server.{unique_agent}"
    payload: dict[str, Any] = {"targets": "127.0.0.1", "ports": [closed_port()]}
    async with bridge_and_client(config) as (_bridge, client):
        jobs = [
            output_record("Shazzam", agent=mid, payload={**payload, "snmp": True}),
            output_record("Shazzam", agent=mid, payload=payload),
        ]
        await client.send(jobs)
        with_snmp, plain = await client.wait([j["sys_id"] for j in jobs], timeout=30)
    assert with_snmp.final["payload"]["error"]["kind"] == "refused"
    assert with_snmp.final["payload"]["error"]["field"] == "credentials"
    assert plain.error_string == ""
    assert plain.final["payload"]["totals"]["alive"] == 1
