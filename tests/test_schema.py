"""The schema as data: sys_db_object / sys_dictionary records make the tables, on each
store (``backend``: a real SQLite file, a real PostgreSQL schema; no mocks): seeding,
migration of an old database, tables and fields made and removed by records, extension
(super_class), refusals, system fields, aggregates."""

from __future__ import annotations

from typing import Any

import pytest

from bridge.instance import cmdb, schema
from bridge.instance.query import QueryError
from bridge.instance.store import TABLES, Change, Conflict, FieldError, FieldType
from tests.conftest import StoreBackend

OBJECTS, DICTIONARY = "sys_db_object", "sys_dictionary"
SYSTEM = ["sys_id", "sys_created_on", "sys_created_by", "sys_updated_on", "sys_updated_by",
          "sys_mod_count", "sys_tags"]  # fmt: skip


async def test_seeds_are_deterministic_and_idempotent(backend: StoreBackend) -> None:
    async with backend.open() as store:
        objects = await store.query(OBJECTS)
        entries = await store.query(DICTIONARY)
        assert {o["name"] for o in objects} == set(TABLES) | set(schema.CI_CLASSES)
        linux = (await store.query(OBJECTS, "name=cmdb_ci_linux_server"))[0]
        assert linux["sys_id"] == schema.table_id("cmdb_ci_linux_server")
        assert linux["super_class"] == schema.table_id("cmdb_ci_server")
        assert linux["is_extendable"] is True
        agent = (await store.query(DICTIONARY, "name=ecc_queue^element=agent"))[0]
        assert agent["sys_id"] == schema.entry_id("ecc_queue", "agent")
        assert (agent["internal_type"], agent["column_label"]) == ("string", "Agent")
        password = (await store.query(DICTIONARY, "name=sys_user^element=user_password"))[0]
        assert password["internal_type"] == "password"
        own = await store.query(DICTIONARY, "name=sys_user_has_role^element=user")
        assert (own[0]["internal_type"], own[0]["reference"]) == ("reference", "sys_user")
        assert own[0]["reference_cascade_rule"] == "delete"
        first_schema = dict(store.schema)
    async with backend.open() as store:
        assert await store.query(OBJECTS) == objects  # nothing rewritten on reopen
        assert await store.query(DICTIONARY) == entries
        assert dict(store.schema) == first_schema
    for name, seeded in TABLES.items():  # the built schema says what TABLES says
        built = first_schema[name]
        assert list(built.fields) == list(seeded.fields), name
        for field_name, spec in seeded.fields.items():
            got = built.fields[field_name]
            assert (got.type, got.default, got.reference, got.cascade_delete) == (
                spec.type, spec.default, spec.reference, spec.cascade_delete
            ), (name, field_name)  # fmt: skip
            assert (got.write_only, got.read_only) == (spec.write_only, spec.read_only)
        assert (built.unique, built.display_field, built.label) == (
            seeded.unique, seeded.display_field, seeded.label
        )  # fmt: skip


OLD_DDL = [
    """CREATE TABLE "ecc_queue" ("sys_id" TEXT NOT NULL PRIMARY KEY, "sys_created_on" TEXT NOT
    NULL DEFAULT '', "sys_updated_on" TEXT NOT NULL DEFAULT '', "agent" TEXT NOT NULL DEFAULT '',
    "topic" TEXT NOT NULL DEFAULT '', "name" TEXT NOT NULL DEFAULT '', "source" TEXT NOT NULL
    DEFAULT '', "queue" TEXT NOT NULL DEFAULT 'input', "state" TEXT NOT NULL DEFAULT 'ready',
    "response_to" TEXT NOT NULL DEFAULT '', "agent_correlator" TEXT NOT NULL DEFAULT '',
    "priority" INTEGER DEFAULT 2, "error_string" TEXT NOT NULL DEFAULT '', "payload" TEXT NOT
    NULL DEFAULT '', "processed" TEXT NOT NULL DEFAULT '', "sequence" INTEGER, "complete" INTEGER
    NOT NULL DEFAULT 0, "run" TEXT NOT NULL DEFAULT '', "lease_until" REAL, "attempts" INTEGER
    DEFAULT 0, "timeout" REAL, "expires_at" REAL)""",
    """CREATE TABLE "sys_user" ("sys_id" TEXT NOT NULL PRIMARY KEY, "sys_created_on" TEXT NOT
    NULL DEFAULT '', "sys_updated_on" TEXT NOT NULL DEFAULT '', "user_name" TEXT NOT NULL DEFAULT
    '', "first_name" TEXT NOT NULL DEFAULT '', "last_name" TEXT NOT NULL DEFAULT '', "email" TEXT
    NOT NULL DEFAULT '', "active" INTEGER NOT NULL DEFAULT 1, "web_service_access_only" INTEGER
    NOT NULL DEFAULT 0, "user_password" TEXT NOT NULL DEFAULT '', "mid_agents" TEXT NOT NULL
    DEFAULT '', UNIQUE ("user_name"))""",
    """CREATE TABLE "cmdb_ci" ("sys_id" TEXT NOT NULL PRIMARY KEY, "sys_created_on" TEXT NOT NULL
    DEFAULT '', "sys_updated_on" TEXT NOT NULL DEFAULT '', "name" TEXT NOT NULL DEFAULT '',
    "sys_class_name" TEXT NOT NULL DEFAULT 'cmdb_ci_ip_address', "ip_address" TEXT NOT NULL
    DEFAULT '', "mac_address" TEXT NOT NULL DEFAULT '', "serial_number" TEXT NOT NULL DEFAULT '',
    "host_name" TEXT NOT NULL DEFAULT '', "os" TEXT NOT NULL DEFAULT '', "os_version" TEXT NOT
    NULL DEFAULT '', "kernel" TEXT NOT NULL DEFAULT '', "sys_descr" TEXT NOT NULL DEFAULT '',
    "sys_object_id" TEXT NOT NULL DEFAULT '', "http_server" TEXT NOT NULL DEFAULT '',
    "http_title" TEXT NOT NULL DEFAULT '', "tls_subject" TEXT NOT NULL DEFAULT '',
    "tls_not_after" TEXT NOT NULL DEFAULT '', "ports" TEXT NOT NULL DEFAULT '',
    "first_discovered" TEXT NOT NULL DEFAULT '', "last_discovered" TEXT NOT NULL DEFAULT '',
    "discovery_source" TEXT NOT NULL DEFAULT 'midbridge', "discovery_status" TEXT NOT NULL
    DEFAULT '')""",
    'CREATE INDEX ecc_queue_lane ON ecc_queue("agent", "queue", "state", "priority")',
]


async def test_an_old_database_file_migrates(backend: StoreBackend) -> None:
    stamp = "2025-01-01 00:00:00"
    await backend.execute(
        [(statement, ()) for statement in OLD_DDL]
        + [
            (
                "INSERT INTO ecc_queue (sys_id, sys_created_on, sys_updated_on, agent, queue, "
                "response_to) VALUES ('e1', ?, ?, 'mid.server.a', 'output', 'x')",
                (stamp, stamp),
            ),
            (
                "INSERT INTO sys_user (sys_id, sys_created_on, sys_updated_on, user_name, "
                "first_name, last_name) VALUES ('u1', ?, ?, 'ann', 'Ann', 'Lee')",
                (stamp, stamp),
            ),
            (
                "INSERT INTO cmdb_ci (sys_id, sys_created_on, sys_updated_on, name, "
                "sys_class_name) VALUES ('c1', ?, ?, 'web', 'cmdb_ci_linux_server')",
                (stamp, stamp),
            ),
        ]
    )
    async with backend.open() as store:
        old = await store.get("ecc_queue", "e1")
        assert old is not None
        assert (old["agent"], old["response_to"], old["sys_created_on"]) == (
            "mid.server.a",
            "x",
            stamp,
        )
        assert (old["sys_created_by"], old["sys_mod_count"], old["sys_tags"]) == ("", 0, "")
        updated = await store.update("ecc_queue", "e1", {"state": "processing"}, actor="mid")
        assert updated is not None
        assert (updated["sys_mod_count"], updated["sys_updated_by"]) == (1, "mid")
        user = await store.get("sys_user", "u1")
        assert user is not None
        assert (user["name"], user["locked_out"]) == ("Ann Lee", False)  # made once
        assert [r["sys_id"] for r in await store.query("cmdb_ci_server")] == ["c1"]
        assert await store.query("cmdb_ci_netgear") == []
        group = await store.insert("sys_user_group", {"name": "ops"})  # new built-in tables
        await store.insert("sys_user_grmember", {"user": "u1", "group": group["sys_id"]})
        assert await store.count(DICTIONARY, "name=ecc_queue^elementISNOTEMPTY") == len(
            TABLES["ecc_queue"].fields
        )
    assert {"sys_created_by", "sys_mod_count", "sys_tags"} <= set(
        await backend.columns("ecc_queue")
    )
    async with backend.open() as store:  # and again: nothing left to do
        again = await store.get("ecc_queue", "e1")
        assert again is not None
        assert again["sys_mod_count"] == 1
        assert await store.count("sys_user_grmember") == 1


async def test_a_table_and_its_fields_are_records(backend: StoreBackend) -> None:
    seen: list[Change] = []
    async with backend.open() as store:
        store.add_listener(seen.append)
        table = await store.insert(OBJECTS, {"name": "u_asset", "label": "Asset"}, actor="admin")
        assert (table["sys_created_by"], table["is_extendable"]) == ("admin", False)
        assert list(store.schema["u_asset"].fields) == SYSTEM
        made = await store.query(DICTIONARY, "name=u_asset")
        assert [e["element"] for e in made] == ["", *SYSTEM]
        told = [(c.table, c.record.get("element", "")) for c in seen]
        assert told[:3] == [(OBJECTS, ""), (DICTIONARY, ""), (DICTIONARY, "sys_id")]
        first = await store.insert("u_asset", {})
        await store.insert(
            DICTIONARY,
            {"name": "u_asset", "element": "u_cost", "internal_type": "decimal",
             "default_value": "1.5", "column_label": "Cost"},
        )  # fmt: skip
        await store.insert(
            DICTIONARY,
            {"name": "u_asset", "element": "u_owner", "internal_type": "reference",
             "reference": "sys_user", "reference_cascade_rule": "delete"},
        )  # fmt: skip
        spec = store.schema["u_asset"].fields["u_cost"]
        assert (spec.type, spec.default, spec.label) == (FieldType.REAL, 1.5, "Cost")
        assert (await store.get("u_asset", first["sys_id"]) or {})["u_cost"] == 1.5
        owner = await store.insert("sys_user", {"user_name": "o"})
        second = await store.insert("u_asset", {"u_cost": "7", "u_owner": owner["sys_id"]})
        assert second["u_cost"] == 7.0
        assert [r["sys_id"] for r in await store.query("u_asset", "u_cost>2")] == [second["sys_id"]]
        with pytest.raises(FieldError, match=r"u_asset\.u_owner: no sys_user record"):
            await store.insert("u_asset", {"u_owner": "nobody"})
        await store.delete("sys_user", owner["sys_id"])  # reference_cascade_rule delete
        assert await store.get("u_asset", second["sys_id"]) is None
    assert "u_cost" in await backend.columns("u_asset")
    async with backend.open() as store:  # the records made it: they make it again
        assert list(store.schema["u_asset"].fields) == [*SYSTEM, "u_cost", "u_owner"]
        assert await store.count("u_asset") == 1


async def test_deleting_user_made_records_drops_columns_and_tables(backend: StoreBackend) -> None:
    async with backend.open() as store:
        await store.insert(OBJECTS, {"name": "u_box", "is_extendable": True})
        await store.insert(OBJECTS, {"name": "u_small_box", "super_class": "u_box"})
        field = await store.insert(DICTIONARY, {"name": "u_small_box", "element": "u_size"})
        keep = await store.insert(DICTIONARY, {"name": "u_box", "element": "u_color"})
        assert "u_size" in await backend.columns("u_box")
        assert await store.delete(DICTIONARY, field["sys_id"])
        assert "u_size" not in await backend.columns("u_box")
        assert "u_size" not in store.schema["u_small_box"].fields
        small = (await store.query(OBJECTS, "name=u_small_box"))[0]
        record = await store.insert("u_small_box", {"u_color": "red"})
        with pytest.raises(FieldError, match=r"sys_db_object\.name: table u_small_box has 1 rec"):
            await store.delete(OBJECTS, small["sys_id"])
        await store.delete("u_small_box", record["sys_id"])
        assert await store.delete(OBJECTS, small["sys_id"])
        assert "u_small_box" not in store.schema
        assert await store.query(DICTIONARY, "name=u_small_box") == []
        box = (await store.query(OBJECTS, "name=u_box"))[0]
        assert await store.delete(OBJECTS, box["sys_id"])
        assert await store.get(DICTIONARY, keep["sys_id"]) is None
    assert await backend.columns("u_box") == []


async def test_extension_reads_writes_and_restricts_by_class(backend: StoreBackend) -> None:
    async with backend.open() as store:
        await store.insert(OBJECTS, {"name": "u_device", "is_extendable": True})
        parent_id = store.catalog.ids["u_device"]
        await store.insert(OBJECTS, {"name": "u_phone", "super_class": parent_id})
        await store.insert(DICTIONARY, {"name": "u_device", "element": "u_vendor"})
        await store.insert(DICTIONARY, {"name": "u_phone", "element": "u_imei"})
        phone_table = store.schema["u_phone"]
        assert (phone_table.super_class, phone_table.physical) == ("u_device", "u_device")
        assert store.schema["u_device"].classes == ("u_device", "u_phone")
        assert "u_imei" not in store.schema["u_device"].fields
        phone = await store.insert("u_phone", {"u_vendor": "acme", "u_imei": "42"})
        device = await store.insert("u_device", {"u_vendor": "acme"})
        as_phone = await store.insert("u_device", {"sys_class_name": "u_phone"})
        assert (phone["sys_class_name"], device["sys_class_name"]) == ("u_phone", "u_device")
        with pytest.raises(FieldError, match=r"u_phone\.sys_class_name: 'u_device' is not u_phone"):
            await store.insert("u_phone", {"sys_class_name": "u_device"})
        via_parent = await store.query("u_device", "ORDERBYsys_created_on")
        assert {r["sys_id"] for r in via_parent} == {
            phone["sys_id"],
            device["sys_id"],
            as_phone["sys_id"],
        }
        assert "u_imei" not in via_parent[0]
        assert {r["sys_id"] for r in await store.query("u_phone")} == {
            phone["sys_id"],
            as_phone["sys_id"],
        }
        assert (await store.get("u_phone", phone["sys_id"]) or {})["u_imei"] == "42"
        assert await store.get("u_phone", device["sys_id"]) is None
        assert await store.count("u_phone", "u_vendor=acme") == 1
        # the class restriction holds for every write through the child table
        assert await store.update("u_phone", device["sys_id"], {"u_vendor": "x"}) is None
        assert not await store.delete("u_phone", device["sys_id"])
        changed = await store.update_query("u_phone", "", {"u_vendor": "z"})
        assert {r["sys_id"] for r in changed} == {phone["sys_id"], as_phone["sys_id"]}
        assert (await store.get("u_device", device["sys_id"]) or {})["u_vendor"] == "acme"
        counts = await store.aggregate("u_device", group_by=["sys_class_name"])
        assert [(a.group["sys_class_name"], a.count) for a in counts] == [
            ("u_device", 1), ("u_phone", 2)
        ]  # fmt: skip
        assert [a.count for a in await store.aggregate("u_phone")] == [2]
        assert await store.delete("u_phone", phone["sys_id"])
        # the CI class tree is such a hierarchy
        linux = await store.insert("cmdb_ci_linux_server", {"name": "web"})
        assert linux["sys_class_name"] == "cmdb_ci_linux_server"
        assert [r["name"] for r in await store.query("cmdb_ci_server")] == ["web"]
        assert await store.query("cmdb_ci_netgear") == []
        assert await store.update("cmdb_ci_netgear", linux["sys_id"], {"name": "x"}) is None
        root = await store.insert("cmdb_ci", {"name": "any"})
        assert root["sys_class_name"] == "cmdb_ci"
        await store.insert(OBJECTS, {"name": "u_ci_pi", "super_class": "cmdb_ci_linux_server"})
        assert cmdb.class_view("cmdb_ci_server", store.schema) == (
            "cmdb_ci_server", "cmdb_ci_linux_server", "u_ci_pi"
        )  # fmt: skip
        assert cmdb.class_view("cmdb_ci_server") == ("cmdb_ci_server", "cmdb_ci_linux_server")
        assert cmdb.class_view("cmdb_ci") is None
        assert cmdb.class_view("ecc_queue") is None


async def refused(call: Any, pattern: str, error: type[Exception] = FieldError) -> None:
    with pytest.raises(error, match=pattern):
        await call


async def test_refusals_name_the_field_at_fault(backend: StoreBackend) -> None:
    async with backend.open() as store:
        ecc = (await store.query(OBJECTS, "name=ecc_queue"))[0]
        agent = (await store.query(DICTIONARY, "name=ecc_queue^element=agent"))[0]
        await refused(
            store.update(OBJECTS, ecc["sys_id"], {"label": "X"}),
            r"sys_db_object\.label: ecc_queue is a built-in table",
        )
        await refused(
            store.delete(OBJECTS, ecc["sys_id"]), r"sys_db_object\.name: ecc_queue is a built-in"
        )
        await refused(
            store.update(DICTIONARY, agent["sys_id"], {"column_label": "X"}),
            r"sys_dictionary\.column_label: ecc_queue\.agent is a built-in field",
        )
        await refused(
            store.delete(DICTIONARY, agent["sys_id"]), r"sys_dictionary\.element: ecc_queue\.agent"
        )
        for bad in ("Bad", "9x", "a-b", "x" * 81):
            await refused(store.insert(OBJECTS, {"name": bad}), r"sys_db_object\.name: table name")
        await refused(
            store.insert(OBJECTS, {"name": "sqlite_x"}), r"sys_db_object\.name: .*reserved"
        )
        await refused(store.insert(OBJECTS, {"name": "ecc_queue_lane"}), r"taken in the database")
        await refused(store.insert(OBJECTS, {"name": "ecc_queue"}), "already exists", Conflict)
        await refused(
            store.insert(OBJECTS, {"name": "u_q", "super_class": "ecc_queue"}),
            r"sys_db_object\.super_class: table ecc_queue is not extendable",
        )
        await refused(
            store.insert(OBJECTS, {"name": "u_q", "super_class": "nope"}),
            r"super_class: no table 'nope'",
        )
        await refused(
            store.insert(DICTIONARY, {"name": "nope", "element": "a"}), r"sys_dictionary\.name"
        )
        await refused(
            store.insert(DICTIONARY, {"name": DICTIONARY, "element": "a"}), "cannot be added"
        )
        for element in ("agent", "sys_x", "rowid", "Bad"):
            await refused(
                store.insert(DICTIONARY, {"name": "ecc_queue", "element": element}),
                r"sys_dictionary\.element",
            )
        await refused(
            store.insert(
                DICTIONARY, {"name": "ecc_queue", "element": "u_x", "internal_type": "blob"}
            ),
            r"sys_dictionary\.internal_type: type 'blob' is not supported",
        )
        await refused(
            store.insert(
                DICTIONARY, {"name": "ecc_queue", "element": "u_x", "internal_type": "reference"}
            ),
            r"sys_dictionary\.reference",
        )
        await refused(
            store.insert(
                DICTIONARY, {"name": "ecc_queue", "element": "u_x", "internal_type": "integer",
                             "default_value": "many"},
            ),
            r"sys_dictionary\.default_value: does not fit integer",
        )  # fmt: skip
        await store.insert(OBJECTS, {"name": "u_base", "is_extendable": True})
        await store.insert(OBJECTS, {"name": "u_sub", "super_class": "u_base"})
        base = (await store.query(OBJECTS, "name=u_base"))[0]
        await refused(store.delete(OBJECTS, base["sys_id"]), r"table u_base is extended by u_sub")
        await refused(
            store.update(OBJECTS, base["sys_id"], {"is_extendable": False}),
            r"is_extendable: table u_base",
        )
        await refused(
            store.update(OBJECTS, base["sys_id"], {"name": "u_other"}), "cannot be renamed"
        )
        await store.insert(
            DICTIONARY, {"name": "ecc_queue", "element": "u_base_ref", "internal_type": "reference",
                         "reference": "u_sub"},
        )  # fmt: skip
        sub = (await store.query(OBJECTS, "name=u_sub"))[0]
        await refused(
            store.delete(OBJECTS, sub["sys_id"]), r"field ecc_queue\.u_base_ref references"
        )
        # a failed write changes nothing, the schema included
        await refused(
            store.insert_many(DICTIONARY, [{"name": "u_base", "element": "u_ok"},
                                           {"name": "u_base", "element": "u_ok"}]),
            r"u_base\.u_ok exists",
        )  # fmt: skip
        assert "u_ok" not in store.schema["u_base"].fields
        assert await store.query(DICTIONARY, "element=u_ok") == []


async def test_type_changes_keep_every_value_or_are_refused(backend: StoreBackend) -> None:
    async with backend.open() as store:
        await store.insert(OBJECTS, {"name": "u_t"})
        entry = await store.insert(DICTIONARY, {"name": "u_t", "element": "u_n", "unique": True})
        await store.insert("u_t", {"u_n": "5"})
        await store.insert("u_t", {"u_n": ""})
        await store.insert("u_t", {"u_n": ""})  # empty values are not unique values
        await refused(store.insert("u_t", {"u_n": "5"}), r"u_n='5' already exists", Conflict)
        await store.update(DICTIONARY, entry["sys_id"], {"internal_type": "integer"})
        assert store.schema["u_t"].fields["u_n"].type is FieldType.INTEGER
        assert sorted(r["u_n"] or 0 for r in await store.query("u_t")) == [0, 0, 5]
        await refused(store.insert("u_t", {"u_n": 5}), "already exists", Conflict)  # still unique
        await store.update(DICTIONARY, entry["sys_id"], {"internal_type": "decimal"})
        await store.insert("u_t", {"u_n": 2.5})
        await refused(
            store.update(DICTIONARY, entry["sys_id"], {"internal_type": "integer"}),
            r"sys_dictionary\.internal_type: u_t\.u_n holds 2\.5 .* would lose data",
        )
        await store.update(DICTIONARY, entry["sys_id"], {"internal_type": "string"})
        await store.insert("u_t", {"u_n": "abc"})
        await refused(
            store.update(DICTIONARY, entry["sys_id"], {"internal_type": "decimal"}), "holds 'abc'"
        )
        await refused(store.update(DICTIONARY, entry["sys_id"], {"element": "u_m"}), "cannot move")
        assert sorted(r["u_n"] for r in await store.query("u_t")) == ["", "", "2.5", "5.0", "abc"]
    assert (await backend.columns("u_t"))[-1] == "u_n"


async def test_system_fields_and_mod_count(backend: StoreBackend) -> None:
    async with backend.open() as store:
        record = await store.insert("ecc_queue", {"agent": "a"}, actor="alice")
        assert (record["sys_created_by"], record["sys_updated_by"]) == ("alice", "alice")
        assert (record["sys_mod_count"], record["sys_tags"]) == (0, "")
        assert record == await store.get("ecc_queue", record["sys_id"])
        sys_id = record["sys_id"]
        updated = await store.update("ecc_queue", sys_id, {"state": "processing"}, actor="bob")
        assert updated is not None
        assert (updated["sys_created_by"], updated["sys_updated_by"]) == ("alice", "bob")
        assert updated["sys_mod_count"] == 1
        assert updated == await store.get("ecc_queue", sys_id)
        same = await store.update("ecc_queue", sys_id, {"state": "processing"}, actor="carl")
        assert same == updated  # nothing changed: nothing written
        claimed = await store.update_query("ecc_queue", "state=processing", {"state": "ready"})
        assert [r["sys_mod_count"] for r in claimed] == [2]
        assert claimed[0] == await store.get("ecc_queue", sys_id)
        for name in ("sys_tags", "sys_mod_count", "sys_created_by", "sys_updated_on"):
            await refused(store.insert("ecc_queue", {name: "x"}), rf"ecc_queue\.{name}: read-only")
        await refused(store.update("ecc_queue", sys_id, {"sys_tags": "x"}), "read-only")
        answer, inserted = await store.insert_input_once(
            {"agent": "a", "response_to": sys_id, "sequence": 0}, actor="mid"
        )
        assert inserted
        assert (answer["sys_created_by"], answer["queue"]) == ("mid", "input")
        # response_to is a plain string, as in ServiceNow: any text, no reference check
        spec = store.schema["ecc_queue"].fields["response_to"]
        assert (spec.reference, spec.internal_type) == (None, "string")
        await store.insert("ecc_queue", {"response_to": "not-a-record"})


async def test_users_groups_and_logs(backend: StoreBackend) -> None:
    async with backend.open() as store:
        ann = await store.insert(
            "sys_user", {"user_name": "ann", "first_name": "Ann", "last_name": "Lee"}
        )
        assert ann["name"] == "Ann Lee"
        renamed = await store.update("sys_user", ann["sys_id"], {"last_name": "Park"})
        assert renamed is not None
        assert renamed["name"] == "Ann Park"
        own = await store.insert("sys_user", {"user_name": "b", "first_name": "B", "name": "Boss"})
        kept = await store.update("sys_user", own["sys_id"], {"first_name": "C"})
        assert kept is not None
        assert kept["name"] == "Boss"
        assert store.schema["sys_user"].display_field == "name"  # ServiceNow's
        assert "user_password" in store.schema["sys_user"].fields
        assert store.schema["sys_user"].fields["user_password"].write_only
        assert store.schema["sys_user"].fields["last_login_time"].type is FieldType.DATETIME
        await store.update("sys_user", ann["sys_id"], {"last_login_time": "2026-01-02"})
        assert (await store.get("sys_user", ann["sys_id"]) or {})[
            "last_login_time"
        ] == "2026-01-02 00:00:00"
        await refused(
            store.update("sys_user", ann["sys_id"], {"last_login_time": "soon"}), "last_login_time"
        )
        group = await store.insert("sys_user_group", {"name": "ops", "manager": ann["sys_id"]})
        await store.insert("sys_user_grmember", {"user": ann["sys_id"], "group": group["sys_id"]})
        await refused(
            store.insert("sys_user_grmember", {"user": ann["sys_id"], "group": group["sys_id"]}),
            "already exists",
            Conflict,
        )
        await store.delete("sys_user_group", group["sys_id"])
        assert await store.count("sys_user_grmember") == 0
        log = await store.insert("syslog", {"level": 2, "message": "boom", "source": "test"})
        assert (log["level"], log["message"]) == (2, "boom")


async def test_aggregate_groups_with_sql(backend: StoreBackend) -> None:
    async with backend.open() as store:
        await store.insert_many(
            "ecc_queue",
            [{"state": s, "priority": p, "complete": c, "agent": a}
             for s, p, c, a in [("ready", 1, False, "b"), ("ready", 3, True, ""),
                                ("error", 2, False, "a")]],
        )  # fmt: skip
        out = await store.aggregate(
            "ecc_queue", "priority>0", group_by=["state"], avg_fields=["priority"],
            min_fields=["agent", "complete"], max_fields=["priority"], sum_fields=["priority"],
        )  # fmt: skip
        assert [a.group for a in out] == [{"state": "error"}, {"state": "ready"}]
        ready = out[1]
        assert (ready.count, ready.avg, ready.sum) == (2, {"priority": 2.0}, {"priority": 4.0})
        assert ready.min == {"agent": "b", "complete": False}  # empty is no value
        assert ready.max == {"priority": 3}
        (whole,) = await store.aggregate("ecc_queue", count=True)
        assert (whole.group, whole.count) == ({}, 3)
        (none,) = await store.aggregate("ecc_queue", "state=nothing", avg_fields=["priority"])
        assert (none.count, none.avg) == (0, {"priority": None})
        assert await store.aggregate("ecc_queue", "state=nothing", group_by=["state"]) == []
        by_flag = await store.aggregate("ecc_queue", group_by=["complete"], count=False)
        assert [(a.group["complete"], a.count) for a in by_flag] == [(False, None), (True, None)]
        with pytest.raises(QueryError, match="group_by: unknown field 'nope'"):
            await store.aggregate("ecc_queue", group_by=["nope"])
        ignored = await store.aggregate("ecc_queue", group_by=["nope"], invalid="ignore")
        assert [a.count for a in ignored] == [3]
        with pytest.raises(
            QueryError, match="avg: field 'agent' of table ecc_queue is not a number"
        ):
            await store.aggregate("ecc_queue", avg_fields=["agent"])
        with pytest.raises(QueryError, match="cannot be queried"):
            await store.aggregate("sys_user", group_by=["user_password"], hidden=["user_password"])
