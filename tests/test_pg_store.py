"""The instance's store on SQLite and PostgreSQL alike (``backend``/``store`` fixtures: a
real SQLite file, a real PostgreSQL schema of the test's own), and what only PostgreSQL
has: two processes' stores on one database (claims that never overlap, changes told
across processes), the schema version, the PostgreSQL dialect of every query operator."""

from __future__ import annotations

import asyncio
import base64
from collections.abc import Callable
from typing import Any

import aiohttp
import asyncpg
import pytest

from bridge.instance.pg_schema import ROW, SCHEMA_VERSION, VERSION_TABLE
from bridge.instance.pg_store import PGStore, is_postgres_url, shown_url
from bridge.instance.query import QueryError, compile_query, escape
from bridge.instance.store import Change, Conflict, FieldError, FieldType, QueryContext, StoreError
from tests.conftest import StoreBackend
from tests.test_query import CONTEXT, DATA, OPERATOR_RUNS, ROWS, RUNS, SCHEMA

Store = Any  # SQLiteStore | PGStore


async def eventually(check: Callable[[], bool], what: str, timeout: float = 5.0) -> None:
    for _ in range(int(timeout / 0.02)):
        if check():
            return
        await asyncio.sleep(0.02)
    raise AssertionError(f"not within {timeout} s: {what}")


# --- the same behaviour on both ----------------------------------------------------------------


async def test_queries_select_the_same_records(store: Store) -> None:
    for i, row in enumerate(ROWS):
        await store.insert("ecc_queue", {**row, "sys_id": f"r{i}"})
    wrong = []
    for text, expected in RUNS:
        got = [r["sys_id"] for r in await store.query("ecc_queue", text)]
        if got != expected or await store.count("ecc_queue", text) != len(expected):
            wrong.append((text, got, expected))
    assert wrong == []
    for text, expected in RUNS:  # the sys_ids alone: the same records, the same order
        assert await store.sys_ids("ecc_queue", text, limit=1000) == expected, text
    assert await store.sys_ids("ecc_queue", "ORDERBYstate", limit=3) == ["r2", "r0", "r1"]
    pages = [
        [r["sys_id"] for r in await store.query("ecc_queue", "ORDERBYstate", limit=2, offset=o)]
        for o in (0, 2, 4)
    ]
    assert pages == [["r2", "r0"], ["r1", "r3"], ["r4"]]
    for text in ("sys_id;DROP TABLE ecc_queue=1", "ORDERBYname;DROP TABLE ecc_queue"):
        with pytest.raises(QueryError):
            await store.query("ecc_queue", text)
    await store.query("ecc_queue", "name=" + escape("x'); DROP TABLE ecc_queue; --"))
    assert await store.count("ecc_queue") == len(ROWS)


async def test_dot_walks_date_helpers_and_invalid_fields(store: Store) -> None:
    admin = await store.insert("sys_user", {"user_name": "admin", "user_password": "h1"})
    bob = await store.insert("sys_user", {"user_name": "bob", "user_password": "h2"})
    role = await store.insert("sys_user_role", {"name": "mid_server"})
    for user in (admin, bob):
        await store.insert(
            "sys_user_has_role",
            {"user": user["sys_id"], "role": role["sys_id"], "sys_id": "g-" + user["user_name"]},
        )

    async def ids(text: str) -> list[str]:
        return [r["sys_id"] for r in await store.query("sys_user_has_role", text)]

    assert await ids("user.user_name=bob") == ["g-bob"]
    assert await ids("role.name=mid_server^ORDERBYDESCuser.user_name") == ["g-bob", "g-admin"]
    assert await ids("user.user_nameBETWEENa@az") == ["g-admin"]
    assert await ids("userANYTHING") == ["g-admin", "g-bob"]
    with pytest.raises(QueryError, match="'user_password' of table sys_user cannot be queried"):
        await ids("user.user_passwordSTARTSWITHh")
    ctx = QueryContext(user_id="u1", user_name="admin")
    assert (
        await store.count("sys_user", "sys_created_on>javascript:gs.daysAgoStart(1)", context=ctx)
        == 2
    )
    assert await store.count("sys_user", "nope=1^ORuser_name=bob", invalid="ignore") == 1
    assert await store.count("sys_user", "nope=1^ORuser_name=bob", invalid="no_rows") == 0
    assert await store.count("sys_user", "failed_attemptsISEMPTY") == 0  # a number: 0, not empty
    assert await store.count("sys_user", "last_login_timeISEMPTY") == 2
    assert await store.count("sys_user", "activeISNOTEMPTY^user_nameLIKEAD") == 1  # any case
    assert await store.count("sys_user", "user_nameNSAMEASname") == 2


async def test_claims_take_each_record_once(store: Store) -> None:
    await store.insert_many(
        "ecc_queue",
        [{"queue": "output", "agent": "mid.server.a", "priority": i % 3} for i in range(10)],
    )
    claim = "agent=mid.server.a^queue=output^state=ready^ORDERBYpriority"
    fields = {"state": "processing", "lease_until": 99.5}
    first, second = await asyncio.gather(
        store.update_query("ecc_queue", claim, fields, limit=6),
        store.update_query("ecc_queue", claim, fields, limit=6),
    )
    ids = [r["sys_id"] for r in first + second]
    assert len(ids) == len(set(ids)) == 10
    assert sorted([len(first), len(second)]) == [4, 6]
    six = first if len(first) == 6 else second
    assert [r["priority"] for r in six] == [0, 0, 0, 0, 1, 1]
    assert all(r["state"] == "processing" and r["lease_until"] == 99.5 for r in first + second)
    assert all(r["sys_mod_count"] == 1 for r in first + second)
    assert (
        await store.update_query("ecc_queue", f"sys_id={ids[0]}^state=ready", {"state": "x"}) == []
    )
    expired = await store.update_query(
        "ecc_queue", "state=processing^lease_until<100", {"state": "ready"}
    )
    assert len(expired) == 10
    with pytest.raises(FieldError, match=r"ecc_queue\.nope: no such field"):
        await store.update_query("ecc_queue", "", {"nope": 1})


async def test_input_chunks_are_stored_once(store: Store) -> None:
    output = await store.insert("ecc_queue", {"queue": "output", "agent": "a"})
    chunk = {"agent": "a", "response_to": output["sys_id"], "run": "r1", "sequence": 0}
    first, inserted = await store.insert_input_once({**chunk, "sys_id": "in-1"})
    assert inserted
    assert first["queue"] == "input"
    again, inserted = await store.insert_input_once({**chunk, "sys_id": "in-1"})
    assert (again, inserted) == (first, False)
    other_id, inserted = await store.insert_input_once({**chunk, "sys_id": "in-2"})
    assert (other_id["sys_id"], inserted) == ("in-1", False)  # same response_to/run/sequence
    _, inserted = await store.insert_input_once({**chunk, "sequence": 1})
    assert inserted
    with pytest.raises(Conflict, match="an ecc_queue record with this sys_id exists"):
        await store.insert_input_once({**chunk, "sequence": 5, "sys_id": output["sys_id"]})
    with pytest.raises(FieldError, match="insert_input_once takes input records"):
        await store.insert_input_once({**chunk, "queue": "output"})
    with pytest.raises(Conflict, match="response_to, run and sequence is already stored"):
        await store.insert("ecc_queue", {**chunk, "queue": "input"})
    with pytest.raises(Conflict, match="a record with sys_id 'in-1' already exists"):
        await store.insert("ecc_queue", {"sys_id": "in-1"})
    assert await store.count("ecc_queue", "queue=input") == 2


async def test_listeners_are_told_after_commit_in_order(store: Store) -> None:
    seen: list[Change] = []
    remove = store.add_listener(seen.append)
    record = await store.insert("ecc_queue", {"queue": "output", "agent": "a"})
    await store.update("ecc_queue", record["sys_id"], {"state": "processing"})
    await store.update("ecc_queue", record["sys_id"], {"state": "processing"})  # no change
    await store.update_query("ecc_queue", "state=processing", {"state": "processed"})
    user = await store.insert("sys_user", {"user_name": "u"})
    role = await store.insert("sys_user_role", {"name": "r"})
    await store.insert("sys_user_has_role", {"user": user["sys_id"], "role": role["sys_id"]})
    with pytest.raises(Conflict):
        await store.insert("sys_user", {"user_name": "u"})  # refused: nobody is told
    await store.delete("sys_user", user["sys_id"])  # and its role grant, by cascade
    remove()
    await store.insert("syslog", {"message": "unseen"})
    assert [(c.table, c.op) for c in seen] == [
        ("ecc_queue", "insert"), ("ecc_queue", "update"), ("ecc_queue", "update"),
        ("sys_user", "insert"), ("sys_user_role", "insert"), ("sys_user_has_role", "insert"),
        ("sys_user", "delete"), ("sys_user_has_role", "delete"),
    ]  # fmt: skip
    assert seen[1].previous is not None
    assert seen[1].previous["state"] == "ready"
    assert seen[2].record["state"] == "processed"


async def test_an_old_table_gets_its_missing_columns(backend: StoreBackend) -> None:
    stamp = "2026-01-01 00:00:00"
    await backend.execute(
        [
            (
                'CREATE TABLE ecc_agent ("sys_id" TEXT NOT NULL PRIMARY KEY, '
                '"sys_created_on" TEXT NOT NULL, "sys_updated_on" TEXT NOT NULL, '
                "\"name\" TEXT NOT NULL DEFAULT '')",
                (),
            ),
            ("INSERT INTO ecc_agent VALUES ('a1', ?, ?, 'old')", (stamp, stamp)),
        ]
    )
    async with backend.open() as store:
        record = await store.get("ecc_agent", "a1")
        assert (record["name"], record["validated"], record["status"]) == ("old", False, "Down")
        await store.update("ecc_agent", "a1", {"validated": True})
        await store.insert("ecc_agent", {"name": "new"})
        assert [r["name"] for r in await store.query("ecc_agent")] == ["old", "new"]
    async with backend.open() as store:
        again = await store.get("ecc_agent", "a1")
        assert (again["validated"], again["sys_mod_count"]) == (True, 1)
    assert "validated" in await backend.columns("ecc_agent")


# --- PostgreSQL only: several processes on one database -----------------------------------------


async def test_two_stores_claim_without_overlap(pg_url: str) -> None:
    async with PGStore(pg_url) as one, PGStore(pg_url) as two:
        await one.insert_many("ecc_queue", [{"queue": "output", "agent": "a"} for _ in range(300)])
        claim = "agent=a^queue=output^state=ready^ORDERBYpriority"

        async def drain(store: PGStore) -> list[str]:
            got: list[str] = []
            while True:
                rows = await store.update_query(
                    "ecc_queue", claim, {"state": "processing"}, limit=7
                )
                if not rows:
                    return got
                got += [r["sys_id"] for r in rows]

        results = await asyncio.gather(*(drain(s) for s in (one, two, one, two)))
        ids = [i for r in results for i in r]
        assert len(ids) == len(set(ids)) == 300
        assert all(results)  # each claimer took some
        assert await two.count("ecc_queue", "state=processing") == 300


async def test_a_claim_skips_held_records_a_compare_and_set_waits_for_them(pg_url: str) -> None:
    async with PGStore(pg_url) as store:
        held, free = await store.insert_many("ecc_queue", [{"queue": "output"}] * 2)
        conn = await asyncpg.connect(pg_url)
        try:
            tx = conn.transaction()
            await tx.start()
            await conn.execute(
                "SELECT 1 FROM ecc_queue WHERE sys_id = $1 FOR UPDATE", held["sys_id"]
            )
            claimed = await store.update_query(
                "ecc_queue", "state=ready", {"state": "processing"}, limit=5
            )
            assert [r["sys_id"] for r in claimed] == [free["sys_id"]]  # skipped, not waited
            cas = asyncio.create_task(
                store.update_query(
                    "ecc_queue", f"sys_id={held['sys_id']}^state=ready", {"state": "processing"}
                )
            )
            await asyncio.sleep(0.3)
            assert not cas.done()  # it waits for the holder
            await conn.execute(
                "UPDATE ecc_queue SET lease_until = 5 WHERE sys_id = $1", held["sys_id"]
            )
            await tx.commit()
            (won,) = await asyncio.wait_for(cas, 5)  # and, the state unchanged, wins
            assert (won["state"], won["lease_until"]) == ("processing", 5.0)
        finally:
            await conn.close()


async def test_changes_are_told_to_other_processes(pg_url: str) -> None:
    async with PGStore(pg_url) as writer, PGStore(pg_url) as reader:
        seen: list[Change] = []
        mine: list[Change] = []
        reader.add_listener(seen.append)
        writer.add_listener(mine.append)
        record = await writer.insert("ecc_queue", {"queue": "output", "agent": "a"})
        await writer.update("ecc_queue", record["sys_id"], {"state": "processing"})
        await writer.insert_many("syslog", [{"message": f"m{i}"} for i in range(400)])
        await writer.delete("ecc_queue", record["sys_id"])
        await eventually(lambda: len(seen) >= 403, "the reader told of 403 changes")
        assert [(c.table, c.op) for c in seen[:2]] == [
            ("ecc_queue", "insert"),
            ("ecc_queue", "update"),
        ]
        assert seen[1].record["state"] == "processing"
        assert [c.record["message"] for c in seen[2:402]] == [f"m{i}" for i in range(400)]
        assert (seen[402].op, seen[402].record) == ("delete", {"sys_id": record["sys_id"]})
        assert len(mine) == 403  # the writer is told once, not again by its own NOTIFY
        # a table made by one process is known to the other
        await writer.insert("sys_db_object", {"name": "u_thing"})
        await writer.insert("sys_dictionary", {"name": "u_thing", "element": "u_size",
                                               "internal_type": "integer"})  # fmt: skip
        await eventually(lambda: "u_size" in reader.schema.get("u_thing", _NONE).fields, "schema")
        made = await reader.insert("u_thing", {"u_size": "3"})
        assert made["u_size"] == 3


async def test_change_notifications_come_back_after_a_lost_connection(pg_url: str) -> None:
    async with PGStore(pg_url) as writer, PGStore(pg_url) as reader:
        seen: list[Change] = []
        reader.add_listener(seen.append)
        assert reader._listen is not None
        pid = reader._listen.get_server_pid()
        async with writer._db().acquire() as conn:
            assert await conn.fetchval("SELECT pg_terminate_backend($1)", pid)
        await eventually(
            lambda: reader._listen is not None and reader._listen.get_server_pid() != pid,
            "reconnected",
        )
        await writer.insert("syslog", {"message": "after"})
        await eventually(lambda: [c.record.get("message") for c in seen] == ["after"], "told")


class _NoTable:
    def __init__(self) -> None:
        self.fields: dict[str, Any] = {}


_NONE: Any = _NoTable()


async def test_schema_version_and_refusals(pg_url: str) -> None:
    async with PGStore(pg_url):
        pass
    conn = await asyncpg.connect(pg_url)
    try:
        assert await conn.fetchval(f"SELECT MAX(version) FROM {VERSION_TABLE}") == SCHEMA_VERSION
        assert await conn.fetchval(f"SELECT COUNT(*) FROM {VERSION_TABLE}") == 1
        names = await conn.fetch(
            "SELECT table_name FROM information_schema.columns WHERE column_name = $1 "
            "AND table_schema = current_schema()",
            ROW,
        )
        assert {"ecc_queue", "sys_user", "cmdb_ci", "sys_dictionary"} <= {r[0] for r in names}
        await conn.execute(f"INSERT INTO {VERSION_TABLE} VALUES ($1, 'later')", SCHEMA_VERSION + 1)
    finally:
        await conn.close()
    with pytest.raises(StoreError, match=rf"schema version is {SCHEMA_VERSION + 1}, newer"):
        await PGStore.open(pg_url)
    bad = "postgresql://someone:s3cret@127.0.0.1:1/nope"
    with pytest.raises(StoreError, match="cannot open the database") as caught:
        await PGStore.open(bad)
    assert "s3cret" not in caught.value.message
    assert shown_url(bad) == "postgresql://someone@127.0.0.1:1/nope"
    assert is_postgres_url("postgres://x/y")
    assert not is_postgres_url("state/instance.db")


async def test_every_operator_compiles_for_postgresql(pg_url: str) -> None:
    """test_query's operator cases, on PostgreSQL with the dialect's SQL."""
    conn = await asyncpg.connect(pg_url)
    try:
        sql_type = {FieldType.INTEGER: "BIGINT", FieldType.REAL: "DOUBLE PRECISION",
                    FieldType.BOOLEAN: "INTEGER"}  # fmt: skip
        for physical in sorted({t.physical for t in SCHEMA.values()}):
            fields = {
                n: f for t in SCHEMA.values() if t.physical == physical for n, f in t.fields.items()
            }
            cols = [f'"{ROW}" BIGSERIAL'] + [
                f"\"{n}\" TEXT NOT NULL DEFAULT ''"
                if f.type.is_text
                else f'"{n}" {sql_type[f.type]}'
                for n, f in fields.items()
            ]
            await conn.execute(f'CREATE TABLE "{physical}" ({", ".join(cols)})')
            for row in DATA[physical]:
                names = ", ".join(f'"{n}"' for n in row)
                values = [str(v) if fields[n].type.is_text else v for n, v in row.items()]
                marks = ", ".join(f"${i}" for i in range(1, len(row) + 1))
                await conn.execute(f'INSERT INTO "{physical}" ({names}) VALUES ({marks})', *values)

        async def run(text: str, table: str = "task") -> list[str]:
            spec = SCHEMA[table]
            sql = compile_query(text, spec, schema=SCHEMA, context=CONTEXT, dialect="postgresql")
            clauses = [f"({sql.where})"] if sql.where else []
            params: list[Any] = list(sql.params)
            if spec.extended:
                params.append(list(spec.classes))
                clauses.append(f'"sys_class_name" = ANY(${len(params)}::text[])')
            where = (" WHERE " + " AND ".join(clauses)) if clauses else ""
            statement = f'SELECT "sys_id" FROM "{spec.physical}"{where} {sql.order_by}'
            return [r[0] for r in await conn.fetch(statement, *params)]

        wrong = []
        cases = [(text, "task", expected) for text, expected in OPERATOR_RUNS] + [
            ("sys_class_nameINSTANCEOFserver", "ci", ["c2", "c3"]),
            ("name!=web", "server", ["c3"]),
            ("manager.user_nameISEMPTY", "person", ["p1", "p4"]),
            ("dept.head.dept.head.user_name=admin^ORDERBYDESCage", "person", ["p1", "p4"]),
            ("scoreISEMPTY^ORactive=false", "person", ["p2", "p3"]),
            ("ageIN30,^ORDERBYage", "person", ["p3", "p2", "p4"]),
        ]
        for text, table, expected in cases:
            got = await run(text, table)
            if got != expected:
                wrong.append((text, got, expected))
        assert wrong == []
        sql = compile_query(
            "number!=a^short_descriptionLIKEb%", SCHEMA["task"], schema=SCHEMA, dialect="postgresql"
        )
        assert sql.where == (
            '"number" IS DISTINCT FROM $1 AND "short_description" ILIKE $2 ESCAPE \'\\\''
        )
        assert sql.params == ("a", "%b\\%%")
    finally:
        await conn.close()


async def test_an_instance_on_postgresql_serves_the_table_api(pg_url: str) -> None:
    from bridge.instance.server import Instance, InstanceConfig

    password = "Pg-instance-admin-1"
    auth = {"Authorization": "Basic " + base64.b64encode(f"admin:{password}".encode()).decode()}
    async with (
        Instance(InstanceConfig(db=pg_url, admin_password=password, dashboard=None)) as inst,
        aiohttp.ClientSession(headers=auth) as http,
    ):
        assert isinstance(inst.store, PGStore)
        url = f"{inst.url}/api/now/table/sys_user_group"
        async with http.post(url, json={"name": "ops"}) as resp:
            assert resp.status == 201, await resp.text()
        async with http.get(url + "?sysparm_query=nameSTARTSWITHOP") as resp:
            body = await resp.json()
        assert [r["name"] for r in body["result"]] == ["ops"]
    async with PGStore(pg_url) as store:  # what the API wrote is in the database
        assert await store.count("sys_user_group", "name=ops") == 1
        assert await store.count("sys_user", "user_name=admin") == 1
