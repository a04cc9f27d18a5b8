"""The SNMP probe against a real snmpd on loopback (``tests/snmpd.py``): no mocks.

One agent serves the module: v1/v2c communities (one limited to the system group), three
v3 users (SHA+AES, MD5 only, MD5+DES), fixed typed scalars and a deterministic subtree of
long strings under an enterprise OID of our own. Walks are checked OID for OID against
net-snmp's ``snmpbulkwalk``.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import time
from collections.abc import AsyncGenerator, Iterator
from pathlib import Path
from typing import Any

import orjson
import pytest
from gufo.snmp import Aes128Key, Sha1Key, User
from gufo.snmp.aio.client import SnmpSession

from bridge.agent.credentials import LocalCredentials
from bridge.wire.client import output_record
from bridge.wire.credentials import Credential
from bridge.wire.errors import BadParameter, BridgeError, Refused
from bridge.wire.records import OutputRecord
from probes import REGISTRY
from probes.contract import Job, ProbeContext
from probes.shazzam.snmp_tap import snmp_tap, snmp_tap_credentials
from probes.snmp import probe as snmp
from probes.snmp import values as sv
from probes.snmp.params import SnmpParams, build_params
from probes.snmp.pool import SnmpPool
from probes.snmp.settings import TOPIC, SnmpSettings
from tests.brokers import BrokerAddress
from tests.harness import bridge_and_client, make_config, probe_context, probe_settings
from tests.snmpd import (
    BIG,
    BIG_ROWS,
    BIG_TEXT,
    COMMUNITY,
    LAB,
    SCALARS,
    SYS_NAME,
    SYSONLY_COMMUNITY,
    USERS,
    Snmpd,
    SnmpdUnavailable,
    V3User,
    bulkwalk_oids,
    free_udp_port,
)

Chunk = dict[str, Any]
SYSTEM = "1.3.6.1.2.1.1"
INTERFACES = "1.3.6.1.2.1.2"
IF_NUMBER = "1.3.6.1.2.1.2.1.0"


@pytest.fixture(scope="module")
def agent(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Snmpd]:
    try:
        server = Snmpd(tmp_path_factory.mktemp("snmpd")).start()
    except SnmpdUnavailable as exc:
        pytest.fail(str(exc), pytrace=False)
    yield server
    server.stop()


def community(
    cred_id: str = "v2", value: str = COMMUNITY, order: int = 100
) -> tuple[Credential, int]:
    return Credential(cred_id, "snmp_community", {"community": value}), order


def v3(
    user: V3User,
    cred_id: str | None = None,
    order: int = 100,
    override: dict[str, str] | None = None,
) -> tuple[Credential, int]:
    fields = {**user.credential_fields(), **(override or {})}
    return Credential(cred_id or user.name, "snmpv3", fields), order


class Runner:
    """Runs SNMP jobs the way the bridge does (build_params, then run), sharing one pool.

    Made by :meth:`open`: the settings validated and the pool opened (``SPEC.resource``) as
    the runtime does (``tests.harness.probe_context``); :meth:`aclose` closes the pool.
    """

    def __init__(self, agent: Snmpd, ctx: ProbeContext, stack: contextlib.AsyncExitStack) -> None:
        self.agent = agent
        self.ctx = ctx
        assert isinstance(ctx.settings, SnmpSettings)
        self.settings = ctx.settings
        self._stack = stack

    @classmethod
    async def open(
        cls, agent: Snmpd, entries: list[tuple[Credential, int]], **settings: Any
    ) -> Runner:
        stack = contextlib.AsyncExitStack()
        ctx = await stack.enter_async_context(
            probe_context(snmp.SPEC, settings, credentials=LocalCredentials(entries))
        )
        return cls(agent, ctx, stack)

    @property
    def pool(self) -> SnmpPool:
        pool = self.ctx.resource
        assert isinstance(pool, SnmpPool)
        return pool

    def job(self, payload: dict[str, Any]) -> Job[SnmpParams]:
        record = OutputRecord(
            sys_id="snmp-1",
            topic=TOPIC,
            source=self.agent.host,
            payload={"port": self.agent.port, **payload},
        )
        return Job(record, build_params(record, self.settings))

    async def run(self, payload: dict[str, Any], *, limit: float = 20.0) -> list[Chunk]:
        chunks: list[Chunk] = []
        stream = snmp.run(self.job(payload), self.ctx)
        assert isinstance(stream, AsyncGenerator)
        async with asyncio.timeout(limit), contextlib.aclosing(stream) as items:
            async for chunk in items:
                chunks.append(chunk)
                assert len(chunks) <= 10_000
        return chunks

    async def fails(self, payload: dict[str, Any], *, limit: float = 20.0) -> BridgeError:
        with pytest.raises(BridgeError) as caught:
            await self.run(payload, limit=limit)
        return caught.value

    async def aclose(self) -> None:
        await self._stack.aclose()


@pytest.fixture
async def lab(agent: Snmpd) -> AsyncGenerator[Runner, None]:
    """A runner with every credential of the agent: ``v2``, ``sysonly`` and each v3 user."""
    runner = await Runner.open(
        agent,
        [community("v2"), community("sysonly", SYSONLY_COMMUNITY), *(v3(u) for u in USERS)],
    )
    yield runner
    await runner.aclose()


def entries(chunks: list[Chunk]) -> list[dict[str, Any]]:
    return [entry for chunk in chunks for entry in chunk["results"]]


def varbinds(chunks: list[Chunk]) -> list[dict[str, Any]]:
    return [vb for entry in entries(chunks) for vb in entry.get("varbinds", [])]


def by_oid(chunks: list[Chunk]) -> dict[str, dict[str, Any]]:
    return {vb["oid"]: vb for vb in varbinds(chunks)}


# --------------------------------------------------------------------------- get / getnext


async def test_get_returns_typed_values(lab: Runner) -> None:
    lab_oids = " ".join(f"{LAB}.{oid}" for oid, *_ in SCALARS)
    chunks = await lab.run(
        {
            "credential_id": "v2",
            "oid_spec_list": "get sysDescr.0 sysObjectID.0 sysUpTime.0 sysName.0 sysServices.0\n"
            "get ipAdEntAddr.127.0.0.1 ifHCInOctets.1 ifPhysAddress.1\n"
            f"get {lab_oids}",
        }
    )
    [chunk] = chunks
    assert chunk["host"] == "127.0.0.1"
    assert chunk["version"] == "2c"
    assert chunk["credential_id"] == "v2"
    assert chunk["summary"]["truncated"] is False
    got = by_oid(chunks)
    assert got["1.3.6.1.2.1.1.5.0"] == {
        "oid": "1.3.6.1.2.1.1.5.0",
        "type": "OctetString",
        "value": SYS_NAME,
        "encoding": "text",
    }
    assert got["1.3.6.1.2.1.1.2.0"]["type"] == "ObjectIdentifier"
    assert got["1.3.6.1.2.1.1.2.0"]["value"].startswith("1.3.6.1.4.1.8072.")  # net-snmp
    assert got["1.3.6.1.2.1.1.3.0"]["type"] == "TimeTicks"
    assert got["1.3.6.1.2.1.1.3.0"]["value"] >= 0
    assert got["1.3.6.1.2.1.1.7.0"] == {
        "oid": "1.3.6.1.2.1.1.7.0",
        "type": "Integer32",
        "value": 72,
    }
    assert got["1.3.6.1.2.1.4.20.1.1.127.0.0.1"]["type"] == "IpAddress"
    assert got["1.3.6.1.2.1.4.20.1.1.127.0.0.1"]["value"] == "127.0.0.1"
    assert got["1.3.6.1.2.1.31.1.1.1.6.1"]["type"] == "Counter64"
    assert got["1.3.6.1.2.1.2.2.1.6.1"]["encoding"] == "hex"  # PhysAddress: always hex
    lab_values = {f"{LAB}.{oid}": gufo for oid, _kind, _value, gufo in SCALARS}
    assert got[f"{LAB}.1.1.0"] == {"oid": f"{LAB}.1.1.0", "type": "Integer", "value": -5}
    assert got[f"{LAB}.1.6.0"]["type"] == "ObjectIdentifier"
    assert got[f"{LAB}.1.6.0"]["value"] == lab_values[f"{LAB}.1.6.0"]
    assert got[f"{LAB}.1.8.0"]["value"] == "hello lab"
    assert got[f"{LAB}.1.2.0"]["value"] == 4_000_000_000
    # one entry per OID, in the order asked, with the index of its operation
    assert [(e["spec"], e["oid"]) for e in entries(chunks)][4:6] == [
        (0, "1.3.6.1.2.1.1.7.0"),
        (1, "1.3.6.1.2.1.4.20.1.1.127.0.0.1"),
    ]


@pytest.mark.parametrize("version", ["2c", "1"])
async def test_nonexistent_oids_are_typed_values_not_errors(lab: Runner, version: str) -> None:
    chunks = await lab.run(
        {
            "credential_id": "v2",
            "version": version,
            "oid_spec_list": ["get 1.3.6.1.2.1.1.99.0 sysDescr.7 sysName.0"],
        }
    )
    got = by_oid(chunks)
    assert got["1.3.6.1.2.1.1.99.0"]["type"] == "noSuchObject"
    assert got["1.3.6.1.2.1.1.99.0"]["value"] is None
    assert got["1.3.6.1.2.1.1.1.7"]["type"] == "noSuchInstance"
    assert got["1.3.6.1.2.1.1.5.0"]["value"] == SYS_NAME  # a v1 noSuchName voids nothing else
    assert chunks[-1]["version"] == version


async def test_getnext_answers_the_next_oid_and_end_of_view(lab: Runner, agent: Snmpd) -> None:
    chunks = await lab.run(
        {"credential_id": "v2", "oid_spec_list": "getnext sysDescr.0\ngetnext ifDescr"}
    )
    first, second = varbinds(chunks)
    assert first["oid"] == "1.3.6.1.2.1.1.2.0"  # sysObjectID.0 follows sysDescr.0
    assert second["oid"] == "1.3.6.1.2.1.2.2.1.2.1"  # the first ifDescr
    assert second["value"] == "lo"
    # The "sysonly" community sees the system group only: past its last OID is the end.
    last = bulkwalk_oids(agent, SYSTEM)[-1]
    chunks = await lab.run({"credential_id": "sysonly", "oid_spec_list": f"getnext {last}"})
    assert varbinds(chunks) == [{"oid": last, "type": "endOfMibView", "value": None}]


# --------------------------------------------------------------------------- walks


def _user(name: str | None) -> V3User | None:
    return next(u for u in USERS if u.name == name) if name else None


@pytest.mark.parametrize(
    ("root", "credential", "version", "max_repetitions"),
    [
        (SYSTEM, "v2", "2c", 10),
        (INTERFACES, "v2", "2c", 10),
        (INTERFACES, "v2", "1", 10),
        (SYSTEM, "sha-aes", "3", 10),
        (INTERFACES, "md5-des", "3", 25),
        # GETBULK answers beyond gufo-snmp's limits: a v3 answer the agent refuses as too
        # big (the library ends the walk silently), a v2c one past its receive buffer.
        (BIG, "sha-aes", "3", 50),
        (BIG, "v2", "2c", 100),
    ],
)
async def test_walk_returns_what_snmpbulkwalk_returns(
    lab: Runner, agent: Snmpd, root: str, credential: str, version: str, max_repetitions: int
) -> None:
    expected = bulkwalk_oids(agent, root, user=_user(credential if version == "3" else None))
    chunks = await lab.run(
        {
            "credential_id": credential,
            "version": version,
            "oid_spec_list": f"walk {root}",
            "max_repetitions": max_repetitions,
        }
    )
    assert [vb["oid"] for vb in varbinds(chunks)] == expected
    assert chunks[-1]["summary"]["varbinds"] == len(expected)
    if root == BIG:
        assert len(expected) == BIG_ROWS
        assert {vb["value"] for vb in varbinds(chunks)} == {BIG_TEXT}


async def test_gufo_bulk_walk_still_stops_early_at_high_max_repetitions(agent: Snmpd) -> None:
    """The premise of the BIG cases above (ANCHORS.md): plain gufo-snmp loses varbinds.

    If this fails, gufo-snmp fixed it and the GETNEXT fallback in ``SnmpClient.walk``
    could go.
    """
    user = _user("sha-aes")
    assert user is not None
    assert user.auth_key
    assert user.priv_key
    gufo_user = User(
        user.name,
        auth_key=Sha1Key(user.auth_key.encode()),
        priv_key=Aes128Key(user.priv_key.encode()),
    )
    async with SnmpSession(agent.host, agent.port, user=gufo_user, timeout=2.0) as session:
        count = 0
        async with asyncio.timeout(20):
            async for _oid, _value in session.getbulk(BIG, max_repetitions=50):
                count += 1
    assert count < BIG_ROWS


async def test_large_walk_streams_chunks(lab: Runner) -> None:
    chunks = await lab.run(
        {"credential_id": "v2", "oid_spec_list": f"walk {BIG}", "chunk_varbinds": 64}
    )
    assert [len(c["results"][0]["varbinds"]) for c in chunks] == [64, 64, 64, 64, 44]
    assert [c["results"][0]["more"] for c in chunks] == [True, True, True, True, False]
    assert all(c["results"][0]["oid"] == BIG for c in chunks)
    assert "summary" in chunks[-1]
    assert all("summary" not in c for c in chunks[:-1])


async def test_max_varbinds_stops_the_job_with_truncated(lab: Runner) -> None:
    chunks = await lab.run(
        {
            "credential_id": "v2",
            "oid_spec_list": f"walk {BIG}\nget sysName.0",
            "max_varbinds": 20,
            "chunk_varbinds": 8,
        }
    )
    assert [len(c["results"][0]["varbinds"]) for c in chunks] == [8, 8, 4]
    last = chunks[-1]["results"][-1]
    assert last["truncated"] is True
    assert last["op"] == "walk"  # the get after the cap never ran
    assert chunks[-1]["summary"] == {**chunks[-1]["summary"], "varbinds": 20, "truncated": True}
    # exactly at the cap is not truncated
    chunks = await lab.run(
        {"credential_id": "v2", "oid_spec_list": f"walk {BIG}", "max_varbinds": BIG_ROWS}
    )
    assert chunks[-1]["summary"]["truncated"] is False


# --------------------------------------------------------------------------- tables


async def test_table_by_names_and_by_numbers(lab: Runner) -> None:
    chunks = await lab.run(
        {
            "credential_id": "v2",
            "oid_spec_list": f"get {IF_NUMBER}\ntable ifTable ifDescr,ifType\n"
            "table 1.3.6.1.2.1.2.2 2, 3\ntable ipAddrTable",
        }
    )
    get_entry, by_name, by_number, addresses = entries(chunks)
    interfaces = get_entry["varbinds"][0]["value"]
    assert by_name["name"] == "ifTable"
    assert by_name["columns"] == {
        "ifDescr": "1.3.6.1.2.1.2.2.1.2",
        "ifType": "1.3.6.1.2.1.2.2.1.3",
    }
    assert len(by_name["rows"]) == interfaces
    assert by_name["rows"] == by_number["rows"]
    loopback = next(r for r in by_name["rows"] if r["values"]["ifDescr"]["value"] == "lo")
    assert loopback["values"]["ifType"] == {"type": "Integer32", "value": 24}  # softwareLoopback
    row = next(r for r in addresses["rows"] if r["index"] == "127.0.0.1")
    assert row["values"]["ipAdEntAddr"] == {"type": "IpAddress", "value": "127.0.0.1"}
    assert row["values"]["ipAdEntNetMask"]["value"] == "255.0.0.0"
    assert "ipAdEntIfIndex" in addresses["columns"]


# --------------------------------------------------------------------------- versions, errors


@pytest.mark.parametrize("user", USERS, ids=[f"{u.name}-{u.level}" for u in USERS])
async def test_v3_security_levels(lab: Runner, user: V3User) -> None:
    chunks = await lab.run({"credential_id": user.name, "oid_spec_list": "get sysName.0"})
    assert chunks[-1]["version"] == "3"
    assert varbinds(chunks)[0]["value"] == SYS_NAME


async def test_wrong_community_is_a_timeout(agent: Snmpd) -> None:
    runner = await Runner.open(agent, [community("wrong", "not-the-community")])
    started = time.monotonic()
    error = await runner.fails({"timeout": 0.2, "retries": 1})
    elapsed = time.monotonic() - started
    await runner.aclose()
    assert error.kind == "timeout"
    assert "2 tries of 0.2 s" in error.message
    assert 0.35 < elapsed < 3.0
    assert "not-the-community" not in str(error)


async def test_closed_port_is_connection_refused(agent: Snmpd) -> None:
    runner = await Runner.open(agent, [community("v2")])
    started = time.monotonic()
    error = await runner.fails({"port": free_udp_port(), "timeout": 2.0})
    await runner.aclose()
    assert error.kind == "connection_refused"
    assert time.monotonic() - started < 1.0  # told at once, not after the timeout


@pytest.mark.parametrize(
    ("override", "words"),
    [
        ({"auth_key": "wrong-auth-key"}, "authentication"),
        ({"user": "nobody-here"}, "authentication"),
        ({"priv_key": "wrong-priv-key"}, "privacy key"),
        ({"auth_protocol": "MD5"}, "authentication"),
    ],
)
async def test_wrong_v3_secrets_are_auth_failures(
    agent: Snmpd, override: dict[str, str], words: str
) -> None:
    runner = await Runner.open(agent, [v3(USERS[0], "bad", override=override)])
    error = await runner.fails({"timeout": 0.3, "retries": 0})
    await runner.aclose()
    assert error.kind == "auth_failed"
    assert words in error.message
    for secret in override.values():
        assert secret not in str(error)


async def test_v3_context_names_are_refused(agent: Snmpd) -> None:
    runner = await Runner.open(agent, [v3(USERS[0], "ctx", override={"context": "vlan-12"})])
    error = await runner.fails({})
    await runner.aclose()
    assert error.kind == "credential_error"
    assert error.field == "credential.ctx.context"


async def test_credentials_are_tried_in_order_and_the_working_one_remembered(
    agent: Snmpd,
) -> None:
    runner = await Runner.open(
        agent,
        [community("stale", "old-community", order=1), v3(USERS[1], "v3-md5", order=2)],
    )
    try:
        payload = {"oid_spec_list": "get sysName.0", "timeout": 1.0, "retries": 0}
        started = time.monotonic()
        chunks = await runner.run(payload)
        assert time.monotonic() - started >= 1.0  # the stale community went first, timed out
        assert chunks[-1]["credential_id"] == "v3-md5"
        assert chunks[-1]["version"] == "3"
        started = time.monotonic()
        chunks = await runner.run(payload)
        assert chunks[-1]["credential_id"] == "v3-md5"
        assert time.monotonic() - started < 0.5  # straight to the one that worked here
        # an explicit version narrows the types tried: the stale community alone
        error = await runner.fails({**payload, "version": "2c", "timeout": 0.2})
        assert error.kind == "timeout"
        assert "wrong community" in error.message
    finally:
        await runner.aclose()


async def test_v3_sessions_are_pooled_per_target(agent: Snmpd) -> None:
    runner = await Runner.open(agent, [v3(USERS[0])], sessions_per_target=2)
    try:
        for _ in range(5):
            chunks = await runner.run({"oid_spec_list": "get sysName.0"})
            assert varbinds(chunks)[0]["value"] == SYS_NAME
        assert runner.pool.created == 1  # one engine discovery for five jobs
        results = await asyncio.gather(
            *(runner.run({"oid_spec_list": f"walk {SYSTEM}"}) for _ in range(8))
        )
        counts = {len(varbinds(chunks)) for chunks in results}
        assert len(counts) == 1
        assert counts.pop() > 10
        assert runner.pool.created == 2  # never more sessions than sessions_per_target
    finally:
        await runner.aclose()


# --------------------------------------------------------------------------- parameters


@pytest.mark.parametrize(
    ("payload", "field", "words"),
    [
        ({"oid_spec_list": "get not-an-oid"}, "oid_spec_list", "line 1"),
        ({"oid_spec_list": "get 1.3.6.x"}, "oid_spec_list", "is not an OID"),
        ({"oid_spec_list": "walk 3.6.1"}, "oid_spec_list", "start with 0, 1 or 2"),
        ({"oid_spec_list": "get 1.3.6.1\nwalk"}, "oid_spec_list", "line 2"),
        ({"oid_spec_list": "walk 1.3.6.1 1.3.6.2"}, "oid_spec_list", "one OID"),
        ({"oid_spec_list": "set 1.3.6.1.2.1.1.5.0 x"}, "oid_spec_list", "unknown operation"),
        ({"oid_spec_list": "table ifTable ifNope"}, "oid_spec_list", "ifNope"),
        ({"oid_spec_list": ["# only a comment", ""]}, "oid_spec_list", "no operation"),
        ({"oid_spec_list": 7}, "oid_spec_list", "text"),
        ({"version": "4"}, "version", "not an SNMP version"),
        ({"port": 0}, "port", ""),
        ({"host": "bad host!"}, "host", "not an IP address"),
        ({"max_repetitions": 0}, "max_repetitions", ""),
        ({"community": "x"}, "community", ""),  # never a secret in the record
    ],
)
def test_bad_parameters_name_the_field(payload: dict[str, Any], field: str, words: str) -> None:
    record = OutputRecord(sys_id="s", topic=TOPIC, source="127.0.0.1", payload=payload)
    with pytest.raises(BadParameter) as caught:
        build_params(record, probe_settings(snmp.SPEC))
    assert caught.value.field == field
    assert words in caught.value.message


def test_parameters_are_canonical() -> None:
    record = OutputRecord(
        sys_id="s",
        topic=TOPIC,
        source="10.0.0.7",
        payload={
            "version": "v2c",
            "port": "1161",
            "oid_spec_list": "GET .1.3.6.1.2.1.1.5.0 sysDescr.0\n\n# x\n"
            "Table ifEntry ifDescr,3,ifDescr; walk system\n",
        },
    )
    params = build_params(record, probe_settings(snmp.SPEC, {"timeout": 0.5}))
    assert params.host == "10.0.0.7"
    assert params.port == 1161
    assert params.version == "2c"
    assert params.timeout == 0.5
    assert params.oid_spec_list == (
        "get 1.3.6.1.2.1.1.5.0 1.3.6.1.2.1.1.1.0",
        "table 1.3.6.1.2.1.2.2 2,3",
        "walk 1.3.6.1.2.1.1",
    )
    assert build_params(
        OutputRecord(sys_id="s", topic="SNMP", source="h"), probe_settings(snmp.SPEC)
    ).oid_spec_list == ("walk 1.3.6.1.2.1.1",)
    over = OutputRecord(sys_id="s", topic="SNMP", source="h", payload={"max_varbinds": 50})
    with pytest.raises(Refused):
        build_params(over, probe_settings(snmp.SPEC, {"max_varbinds": 10}))


def test_registered() -> None:
    assert REGISTRY[TOPIC] is snmp.SPEC
    assert snmp.SPEC.needs_credentials
    assert (
        snmp.SPEC.target_host(
            build_params(OutputRecord("s", "SNMP", source="h"), probe_settings(snmp.SPEC))
        )
        == "h"
    )


def test_value_typing() -> None:
    assert sv.typed("1.3.6.1.4.1.9.1.0", b"\x00\x01\xfe") == {
        "oid": "1.3.6.1.4.1.9.1.0",
        "type": "OctetString",
        "value": "00:01:fe",
        "encoding": "hex",
    }
    assert sv.typed("1.3.6.1.2.1.2.2.1.6.3", b"abcdef")["value"] == "61:62:63:64:65:66"
    assert sv.typed("1.3.6.1.2.1.2.2.1.2.3", "é tab\t".encode())["value"] == "é tab\t"
    assert sv.typed("1.3.6.1.2.1.2.2.1.10.3", 5)["type"] == "Counter32"
    assert sv.typed("1.3.6.1.4.1.9.9.1", 2**40)["type"] == "Counter64"
    assert sv.typed("1.3.6.1.4.1.9.9.1", "10.0.0.1")["type"] == "IpAddress"
    assert sv.typed("1.3.6.1.2.1.1.9.1.2.1", "1.3.6.1")["type"] == "ObjectIdentifier"
    assert sv.typed("1.3.6.1.4.1.9.9.1", "1.3.6.1.4.1.9")["type"] == "ObjectIdentifier"
    assert sv.typed("1.3.6.1.4.1.9.9.1", None)["type"] == "Null"
    assert sv.parse_oid(".1.3.6.1") == "1.3.6.1"
    for bad in ("1", "1.40", "1.3.6.1.", "1..3", f"1.3.{2**32}", "1.3 .6"):
        with pytest.raises(ValueError, match=r"OID|part"):
            sv.parse_oid(bad)
    assert sv.resolve_oid("ifHCInOctets.7") == "1.3.6.1.2.1.31.1.1.1.6.7"


# --------------------------------------------------------------------------- the tap


async def test_snmp_tap_finds_the_agent(agent: Snmpd) -> None:
    answer = await snmp_tap(agent.host, ["wrong", COMMUNITY], port=agent.port, timeout=2.0)
    assert answer is not None
    assert answer["community_index"] == 1
    assert answer["sys_name"] == SYS_NAME
    assert answer["sys_object_id"].startswith("1.3.6.1.4.1.")
    assert answer["sys_descr"]
    assert COMMUNITY not in orjson.dumps(answer).decode()
    creds = [community("a", "nope")[0], community("b")[0]]
    answer = await snmp_tap_credentials(agent.host, creds, port=agent.port, timeout=2.0)
    assert answer is not None
    assert answer["credential_id"] == "b"


async def test_snmp_tap_returns_none_without_an_answer(agent: Snmpd) -> None:
    closed = free_udp_port()
    started = time.monotonic()
    assert await snmp_tap("127.0.0.1", [COMMUNITY], port=closed, timeout=0.3) is None
    assert await snmp_tap(agent.host, ["wrong-1", "wrong-2"], port=agent.port, timeout=0.3) is None
    assert time.monotonic() - started < 2.0
    assert await snmp_tap(agent.host, [], port=agent.port) is None


# --------------------------------------------------------------------------- end to end


async def test_snmp_jobs_through_the_bridge_keep_secrets_out_of_records(
    broker: BrokerAddress,
    unique_agent: str,
    tmp_path: Path,
    agent: Snmpd,
    caplog: pytest.LogCaptureFixture,
) -> None:
    user = USERS[0]
    secrets = [COMMUNITY, user.auth_key, user.priv_key, "wrong-auth-secret"]
    credentials = tmp_path / "credentials.toml"
    credentials.write_text(
        "[[credential]]\n"
        'id = "lab-v2"\ntype = "snmp_community"\n'
        f'community = "{COMMUNITY}"\norder = 20\n\n'
        "[[credential]]\n"
        'id = "lab-v3"\ntype = "snmpv3"\n'
        f'user = "{user.name}"\nauth_protocol = "SHA"\nauth_key = "{user.auth_key}"\n'
        f'priv_protocol = "AES"\npriv_key = "{user.priv_key}"\norder = 10\n\n'
        "[[credential]]\n"
        'id = "lab-bad"\ntype = "snmpv3"\n'
        f'user = "{user.name}"\nauth_protocol = "SHA"\nauth_key = "wrong-auth-secret"\n'
        'priv_protocol = "AES"\npriv_key = "x-priv-secret"\norder = 30\n',
        encoding="utf-8",
    )
    os.chmod(credentials, 0o600)
    config = make_config(broker.host, broker.port, unique_agent, tmp_path / "state")
    config.bridge.credentials_file = credentials
    caplog.set_level(logging.DEBUG)
    mid = f"mid.server.{unique_agent}"
    async with bridge_and_client(config) as (_bridge, client):
        jobs = [
            output_record(
                "SNMP",
                agent=mid,
                source=agent.host,
                payload={
                    "port": agent.port,
                    "credential_id": "lab-v3",
                    "oid_spec_list": f"get sysName.0\nwalk {INTERFACES}",
                    "chunk_varbinds": 40,
                },
            ),
            output_record(  # no credential named, version 2c: the community credential
                "SNMP",
                agent=mid,
                source=agent.host,
                payload={"port": agent.port, "version": "2c", "oid_spec_list": "get sysName.0"},
            ),
            output_record(
                "SNMP",
                agent=mid,
                source=agent.host,
                payload={"port": agent.port, "credential_id": "lab-bad", "timeout": 0.5},
            ),
            output_record(
                "SNMP",
                agent=mid,
                source=agent.host,
                payload={"port": agent.port, "oid_spec_list": "walk 1.3.6.x"},
            ),
        ]
        await client.send(jobs)
        v3_job, v2_job, bad_key, bad_oid = await client.wait(
            [j["sys_id"] for j in jobs], timeout=30
        )

    assert v3_job.error_string == ""
    assert len(v3_job.records) > 1  # the interfaces walk came in chunks
    records = v3_job.records
    assert {r["payload"]["credential_id"] for r in records} == {"lab-v3"}
    walked = [
        vb["oid"]
        for r in records
        for e in r["payload"]["results"]
        if e["op"] == "walk"
        for vb in e["varbinds"]
    ]
    assert walked == bulkwalk_oids(agent, INTERFACES, user=user)
    assert records[0]["payload"]["results"][0]["varbinds"][0]["value"] == SYS_NAME
    assert v2_job.final["payload"]["credential_id"] == "lab-v2"
    assert v2_job.final["payload"]["version"] == "2c"
    assert bad_key.final["payload"]["error"]["kind"] == "auth_failed"
    assert bad_oid.final["payload"]["error"] == {
        "kind": "bad_parameter",
        "message": "line 1: '1.3.6.x' is not an OID (dotted numbers such as 1.3.6.1.2.1.1)",
        "field": "oid_spec_list",
    }
    everything = orjson.dumps(
        [r for job in (v3_job, v2_job, bad_key, bad_oid) for r in job.records]
    ).decode()
    logs = caplog.text
    for secret in secrets:
        assert secret
        assert secret not in everything
        assert secret not in logs
