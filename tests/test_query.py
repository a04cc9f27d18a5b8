"""Encoded queries: parsing, compiling to parameterised SQL, and running on SQLite.

Table-driven: valid queries and their AST, invalid ones and the fault the error names,
injection attempts that must stay data.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from bridge.instance.query import (
    MAX_IN_VALUES,
    MAX_QUERY_CHARS,
    SQL,
    Condition,
    OrderBy,
    Query,
    QueryError,
    compile_query,
    escape,
    parse,
)
from bridge.instance.sqlite_store import SQLiteStore
from bridge.instance.store import TABLES

ECC = TABLES["ecc_queue"]
USERS = TABLES["sys_user"]


def c(field: str, op: str, value: str | tuple[str, ...] = "") -> Condition:
    return Condition(field, op, value)


def q(*groups: tuple[Condition, ...], order: tuple[OrderBy, ...] = ()) -> Query:
    return Query((tuple(groups),) if groups else (), order)


VALID: list[tuple[str, Query]] = [
    ("", Query()),
    ("^", Query()),
    ("^EQ", Query()),
    ("state=ready", q((c("state", "=", "ready"),))),
    ("state=", q((c("state", "=", ""),))),
    (
        "agent=mid.server.dc1^queue=output^state=ready",
        q(
            (c("agent", "=", "mid.server.dc1"),),
            (c("queue", "=", "output"),),
            (c("state", "=", "ready"),),
        ),
    ),
    ("state!=ready", q((c("state", "!=", "ready"),))),
    (
        "state=ready^ORstate=processing^queue=output",
        q(
            (c("state", "=", "ready"), c("state", "=", "processing")),
            (c("queue", "=", "output"),),
        ),
    ),
    (
        "state=ready^NQqueue=input",
        Query(((((c("state", "=", "ready"),),)), (((c("queue", "=", "input"),),))), ()),
    ),
    ("stateINready,processing", q((c("state", "IN", ("ready", "processing")),))),
    ("stateNOT INready,error", q((c("state", "NOT IN", ("ready", "error")),))),
    ("nameSTARTSWITHls -", q((c("name", "STARTSWITH", "ls -"),))),
    ("nameENDSWITH.txt", q((c("name", "ENDSWITH", ".txt"),))),
    ("nameLIKEfoo", q((c("name", "LIKE", "foo"),))),
    ("nameNOT LIKEfoo", q((c("name", "NOT LIKE", "foo"),))),
    ("error_stringISEMPTY", q((c("error_string", "ISEMPTY"),))),
    ("error_stringISNOTEMPTY", q((c("error_string", "ISNOTEMPTY"),))),
    ("priority<2", q((c("priority", "<", "2"),))),
    ("priority<=2", q((c("priority", "<=", "2"),))),
    ("priority>0", q((c("priority", ">", "0"),))),
    ("priority>=1", q((c("priority", ">=", "1"),))),
    ("name=a^^b", q((c("name", "=", "a^b"),))),
    ("name=a^^ORb=c", q((c("name", "=", "a^ORb=c"),))),
    ("name=x=y", q((c("name", "=", "x=y"),))),
    (
        "ORDERBYpriority^ORDERBYDESCsys_created_on",
        Query((), (OrderBy("priority"), OrderBy("sys_created_on", descending=True))),
    ),
    (
        "queue=output^ORDERBYDESCpriority^EQ",
        q((c("queue", "=", "output"),), order=(OrderBy("priority", descending=True),)),
    ),
    ("ORDERBYdescription", Query((), (OrderBy("description"),))),
]


@pytest.mark.parametrize(("text", "expected"), VALID, ids=[t or "<empty>" for t, _ in VALID])
def test_parse_valid(text: str, expected: Query) -> None:
    assert parse(text) == expected


INVALID_SYNTAX: list[tuple[str, str]] = [
    ("State=ready", "term 'State=ready': expected a field name"),
    ("=ready", "term '=ready': expected a field name"),
    ("state", "term 'state': no operator after field 'state'"),
    ("stateFOO=1", "unknown operator 'FOO=1' after field 'state'"),
    ("state==ready^x", "term 'x': no operator"),
    ("state~ready", "unknown operator '~ready'"),
    ("ORstate=ready", "OR with no condition before it"),
    ("NQstate=ready", "NQ with no query before it"),
    ("ORDERBYpriority^ORstate=ready", "OR with no condition before it"),
    ("nameISEMPTYx", "ISEMPTY takes no value"),
    ("stateIN", "IN needs a comma-separated list"),
    ("ORDERBY", "expected a field name after ORDERBY"),
    ("ORDERBYDESC", "expected a field name after ORDERBYDESC"),
    ("ORDERBYname;DROP TABLE ecc_queue", "expected a field name after ORDERBY"),
    ("ORDERBYname DESC", "expected a field name after ORDERBY"),
    ("sys_id;DROP TABLE ecc_queue=1", "unknown operator ';DROP TABLE ecc_queue=1'"),
    ("name--=1", "unknown operator '--=1'"),
    ('"name"=1', "expected a field name"),
    ("user.name=x", "unknown operator '.name=x'"),
    ("x" * (MAX_QUERY_CHARS + 1), f"longer than {MAX_QUERY_CHARS}"),
    ("stateIN" + ",".join(["a"] * (MAX_IN_VALUES + 1)), f"at most {MAX_IN_VALUES} values"),
]


@pytest.mark.parametrize(("text", "fault"), INVALID_SYNTAX, ids=[t[:40] for t, _ in INVALID_SYNTAX])
def test_parse_invalid_names_the_fault(text: str, fault: str) -> None:
    with pytest.raises(QueryError) as info:
        parse(text)
    assert fault in info.value.message


INVALID_FIELDS: list[tuple[str, str]] = [
    ("nope=1", "unknown field 'nope' in table ecc_queue"),
    ("state=ready^ORnope=1", "unknown field 'nope'"),
    ("ORDERBYnope", "unknown field 'nope'"),
    ("ORDERBYDESCuser_name", "unknown field 'user_name' in table ecc_queue"),
    ("priority=high", "field 'priority': 'high' is not an integer"),
    ("priorityIN1,x", "field 'priority': 'x' is not an integer"),
    ("complete=maybe", "field 'complete': 'maybe' is not true or false"),
    ("lease_until<soon", "field 'lease_until': 'soon' is not a number"),
    ("prioritySTARTSWITH1", "operator STARTSWITH does not apply to integer field 'priority'"),
    ("completeLIKEt", "does not apply to boolean field 'complete'"),
    ("priority<", "operator < on field 'priority' needs a value"),
]


@pytest.mark.parametrize(("text", "fault"), INVALID_FIELDS, ids=[t for t, _ in INVALID_FIELDS])
def test_compile_invalid_names_the_fault(text: str, fault: str) -> None:
    with pytest.raises(QueryError) as info:
        compile_query(text, ECC)
    assert fault in info.value.message


@pytest.mark.parametrize(
    "text", ["user_passwordSTARTSWITHscrypt", "user_password=x", "ORDERBYuser_password"]
)
def test_hidden_fields_cannot_be_queried(text: str) -> None:
    compile_query(text, USERS)  # the store itself may
    with pytest.raises(QueryError, match="'user_password' of table sys_user cannot be queried"):
        compile_query(text, USERS, hidden=["user_password"])


INJECTIONS = [
    "x' OR '1'='1",
    "x'; DROP TABLE ecc_queue; --",
    'x" OR "1"="1',
    "') OR 1=1 --",
    "1 OR 1=1",
    "%",
    "_",
    "\\",
    "ready\x00",
    "?",
    "'||(SELECT user_password FROM sys_user)||'",
]


@pytest.mark.parametrize("value", INJECTIONS)
@pytest.mark.parametrize("op", ["=", "!=", "STARTSWITH", "LIKE", "ENDSWITH", "IN", "<"])
def test_values_only_ever_reach_sql_as_parameters(value: str, op: str) -> None:
    sql = compile_query(f"name{op}{escape(value)}", ECC)
    assert sql.where == compile_query(f"name{op}v", ECC).where  # the SQL text never varies
    if op in ("STARTSWITH", "LIKE", "ENDSWITH"):  # LIKE wildcards in the value are escaped
        value = value.replace("\\", "\\\\").replace("%", "\\%").replace("_", "\\_")
    assert any(value in str(p) for p in sql.params)


@settings(max_examples=200, deadline=None)
@given(st.text(max_size=40))
def test_any_escaped_value_is_one_equality(value: str) -> None:
    query = parse("name=" + escape(value))
    assert query == q((c("name", "=", value),))
    assert compile_query(query, ECC) == SQL('"name" = ?', (value,), "ORDER BY rowid ASC")


def test_or_binds_tighter_than_and_and_nq_ors_queries() -> None:
    sql = compile_query("state=ready^ORstate=error^queue=output^NQpriority=0", ECC)
    assert sql.where == '(("state" = ? OR "state" = ?) AND "queue" = ?) OR ("priority" = ?)'
    assert sql.params == ("ready", "error", "output", 0)


# --- running queries on SQLite ---------------------------------------------------------------

ROWS: list[dict[str, Any]] = [
    {
        "agent": "mid.server.a",
        "queue": "output",
        "state": "ready",
        "priority": 2,
        "name": "50%_of",
    },
    {"agent": "mid.server.a", "queue": "output", "state": "ready", "priority": 0, "name": "ls -l"},
    {"agent": "mid.server.a", "queue": "output", "state": "processing", "priority": 1, "name": ""},
    {"agent": "mid.server.b", "queue": "output", "state": "ready", "priority": 1, "name": "LS x"},
    {
        "agent": "mid.server.a",
        "queue": "input",
        "state": "ready",
        "priority": 2,
        "name": "x' OR '1'='1",
        "sequence": 0,
        "complete": True,
    },
]


@pytest.fixture
async def store() -> AsyncIterator[SQLiteStore]:
    async with SQLiteStore(":memory:") as db:
        for i, row in enumerate(ROWS):
            await db.insert("ecc_queue", {**row, "sys_id": f"r{i}"})
        yield db


RUNS: list[tuple[str, list[str]]] = [
    ("", ["r0", "r1", "r2", "r3", "r4"]),
    ("agent=mid.server.a^queue=output^state=ready", ["r0", "r1"]),
    ("agent=mid.server.a^queue=output^state=ready^ORDERBYpriority", ["r1", "r0"]),
    ("queue=output^ORDERBYDESCpriority^ORDERBYagent", ["r0", "r2", "r3", "r1"]),
    ("state!=ready", ["r2"]),
    ("stateINprocessing,error", ["r2"]),
    ("stateNOT INready", ["r2"]),
    ("priority<2", ["r1", "r2", "r3"]),
    ("priority<=1^queue=output^ORDERBYpriority", ["r1", "r2", "r3"]),
    ("priority>=2", ["r0", "r4"]),
    ("priority>0^priority<2", ["r2", "r3"]),
    ("nameSTARTSWITHls", ["r1", "r3"]),  # the LIKE family ignores ASCII case
    ("nameSTARTSWITH50%_", ["r0"]),
    ("nameSTARTSWITH5%", []),  # % is literal, not a wildcard
    ("nameLIKE_", ["r0"]),  # so is _
    ("nameENDSWITH_of", ["r0"]),
    ("nameNOT LIKEls", ["r0", "r2", "r4"]),
    ("nameISEMPTY", ["r2"]),
    ("nameISNOTEMPTY^queue=output", ["r0", "r1", "r3"]),
    ("sequenceISEMPTY", ["r0", "r1", "r2", "r3"]),
    ("sequence=0", ["r4"]),
    ("complete=true", ["r4"]),
    ("complete=false^agent=mid.server.b", ["r3"]),
    ("agent=mid.server.b^ORpriority=0", ["r1", "r3"]),
    ("agent=mid.server.b^NQqueue=input", ["r3", "r4"]),
    ("name=x' OR '1'='1", ["r4"]),
    ("name=x' OR '1'='2", []),
    ("name=') OR 1=1 --", []),
    ("agent=mid.server.a^^ORagent=mid.server.b", []),
]


@pytest.mark.parametrize(("text", "expected"), RUNS, ids=[t or "<all>" for t, _ in RUNS])
async def test_queries_select_the_right_records(
    store: SQLiteStore, text: str, expected: list[str]
) -> None:
    rows = await store.query("ecc_queue", text)
    assert [r["sys_id"] for r in rows] == expected
    assert await store.count("ecc_queue", text) == len(expected)


async def test_limit_and_offset_page_in_a_stable_order(store: SQLiteStore) -> None:
    pages = [
        [r["sys_id"] for r in await store.query("ecc_queue", "ORDERBYstate", limit=2, offset=o)]
        for o in (0, 2, 4)
    ]
    assert pages == [["r2", "r0"], ["r1", "r3"], ["r4"]]


async def test_injection_attempts_leave_the_tables_intact(store: SQLiteStore) -> None:
    for value in INJECTIONS:
        await store.query("ecc_queue", "name=" + escape(value))
        await store.query("ecc_queue", "nameLIKE" + escape(value))
    for text in ("sys_id;DROP TABLE ecc_queue=1", "ORDERBYname;DROP TABLE ecc_queue"):
        with pytest.raises(QueryError):
            await store.query("ecc_queue", text)
    assert await store.count("ecc_queue") == len(ROWS)
