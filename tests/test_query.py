"""Encoded queries: parsing, compiling to parameterised SQL, and running on SQLite.

Table-driven: valid queries and their AST, invalid ones and the fault the error names,
injection attempts that must stay data.
"""

from __future__ import annotations

import calendar
import re
import sqlite3
from collections.abc import AsyncIterator, Iterator
from dataclasses import replace
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from bridge.instance.query import (
    MAX_IN_VALUES,
    MAX_QUERY_CHARS,
    OPERATORS,
    SQL,
    Condition,
    InvalidFields,
    OrderBy,
    Query,
    QueryContext,
    QueryError,
    compile_query,
    escape,
    parse,
)
from bridge.instance.sqlite_store import SQLiteStore
from bridge.instance.store import TABLES, Field, FieldType, Table

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
    ("user..name=x", "unknown operator '..name=x'"),  # user.name=x is a dot-walk
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


# --- ServiceNow's other operators, dot-walking, javascript: values ----------------------------
# Run on a plain SQLite database made from Table definitions (as the store makes its own), so
# that the compiler's SQL is checked against real rows, dot-walks and an extension hierarchy.

_S, _I, _R, _B, _D = (
    FieldType.STRING,
    FieldType.INTEGER,
    FieldType.REAL,
    FieldType.BOOLEAN,
    FieldType.DATETIME,
)


def _tbl(name: str, *fields: Field, **kw: Any) -> Table:
    system = (Field("sys_id"), Field("sys_created_on", _D, read_only=True))
    return Table(name, {f.name: f for f in (*system, *fields)}, **kw)


_CI_FIELDS = (Field("sys_class_name"), Field("name"), Field("cpus", _I))
SCHEMA: dict[str, Table] = {
    t.name: t
    for t in (
        _tbl(
            "person",
            Field("user_name"),
            Field("manager", reference="person"),
            Field("dept", reference="dept"),
            Field("secret", write_only=True),
            Field("age", _I),
            Field("score", _R),
            Field("active", _B),
            Field("born", _D),
        ),
        _tbl("dept", Field("name"), Field("head", reference="person")),
        _tbl("ci", *_CI_FIELDS, classes=("ci", "server", "linux")),
        _tbl(
            "server",
            *_CI_FIELDS,
            Field("os"),
            super_class="ci",
            storage="ci",
            classes=("server", "linux"),
        ),
        _tbl(
            "linux",
            *_CI_FIELDS,
            Field("os"),
            super_class="server",
            storage="ci",
            classes=("linux",),
        ),
        _tbl(
            "task",
            Field("number"),
            Field("short_description"),
            Field("description"),
            Field("assigned_to", reference="person"),
            Field("opened_by", reference="person"),
            Field("priority", _I),
            Field("impact", _I),
            Field("opened_at", _D),
            Field("due", _D),
            Field("active", _B),
            Field("ci", reference="server"),
            Field("ghost", reference="no_such_table"),
        ),
    )
}


def _rows(columns: str, *lines: str) -> list[dict[str, Any]]:
    """Rows from ``a|b|c`` lines; an empty cell is the column's default, digits a number."""
    rows = []
    for line in lines:
        cells = zip(columns.split(), line.split("|"), strict=True)
        rows.append(
            {
                name: int(v) if v.isdigit() else float(v) if re.fullmatch(r"\d+\.\d+", v) else v
                for name, v in cells
                if v
            }
        )
    return rows


DATA: dict[str, list[dict[str, Any]]] = {
    "person": _rows(
        "sys_id user_name manager dept secret age score active born",
        "p1|admin||d1|s3cret|40|1.5|1|1984-05-06 07:08:09",
        "p2|abel|p1|d2|x|30||1|",
        "p3|beth|p2|||||0|1990-12-31 23:59:59",
        "p4|carl|p9|d1||30|30.0|1|2024-02-26 10:00:00",
    ),
    "dept": _rows("sys_id name head", "d1|IT|p1", "d2|HR|p3"),
    "ci": _rows(
        "sys_id sys_class_name name cpus os",
        "c1|ci|printer||",
        "c2|server|web|4|windows",
        "c3|linux|db|8|linux",
    ),
    "task": _rows(
        "sys_id number short_description description assigned_to opened_by priority impact"
        " opened_at due active ci",
        "t1|TASK001|Email down|Email down|p2|p1|1|1|2024-02-29 09:00:00|2024-02-29 17:00:00|1|c2",
        "t2|TASK002|VPN slow|vpn|p3|p3|2|3|2024-02-28 10:00:00||0|c3",
        "t3|TASK003||||p4|3|2|2023-12-31 23:59:59|2024-01-01 00:00:00|1|c1",
        "t4|TASK004|printer|Printer jam|p9|p2||||2024-03-04 08:00:00|1|",
    ),
}
NOW = float(calendar.timegm((2024, 2, 29, 13, 45, 30)))  # a Thursday
CONTEXT = QueryContext(user_id="p2", user_name="abel", now=NOW)


@pytest.fixture(scope="module")
def db() -> Iterator[sqlite3.Connection]:
    conn = sqlite3.connect(":memory:")
    for physical in {t.physical for t in SCHEMA.values()}:
        fields = {
            n: f for t in SCHEMA.values() if t.physical == physical for n, f in t.fields.items()
        }
        cols = [
            f"\"{n}\" TEXT NOT NULL DEFAULT ''" if f.type.is_text else f'"{n}" NUMERIC'
            for n, f in fields.items()
        ]
        conn.execute(f'CREATE TABLE "{physical}" ({", ".join(cols)})')
        for row in DATA[physical]:
            names = ", ".join(f'"{n}"' for n in row)
            conn.execute(
                f'INSERT INTO "{physical}" ({names}) VALUES ({", ".join("?" * len(row))})',
                tuple(row.values()),
            )
    yield conn
    conn.close()


def run(conn: sqlite3.Connection, text: str, table: str = "task", **kw: Any) -> list[str]:
    spec = SCHEMA[table]
    sql = compile_query(text, spec, schema=SCHEMA, **kw)
    statement = f'SELECT "sys_id" FROM "{spec.physical}"'
    params: tuple[Any, ...] = sql.params
    if spec.extended:
        statement += f' WHERE "sys_class_name" IN ({", ".join("?" * len(spec.classes))})'
        statement += f" AND ({sql.where})" if sql.where else ""
        params = (*spec.classes, *params)
    elif sql.where:
        statement += " WHERE " + sql.where
    return [r[0] for r in conn.execute(statement + " " + sql.order_by, params)]


OPERATOR_RUNS: list[tuple[str, list[str]]] = [
    ("priorityBETWEEN1@2", ["t1", "t2"]),
    ("short_descriptionBETWEENE@Q", ["t1"]),  # text: between in binary order
    ("opened_atBETWEEN2024-02-28@2024-02-29", ["t2"]),  # a date alone is 00:00:00
    ("opened_atBETWEENjavascript:gs.daysAgoStart(1)@javascript:gs.daysAgoEnd(0)", ["t1", "t2"]),
    ("opened_atONToday@javascript:gs.beginningOfToday()@javascript:gs.endOfToday()", ["t1"]),
    (
        "opened_atNOTONToday@javascript:gs.beginningOfToday()@javascript:gs.endOfToday()",
        ["t2", "t3", "t4"],
    ),  # NOTON also matches an empty date, as != does
    ("opened_atON2024-02-28", ["t2"]),
    ("dueONThis week@javascript:gs.beginningOfThisWeek()@javascript:gs.endOfThisWeek()", ["t1"]),
    ("dueONNext week@javascript:gs.beginningOfNextWeek()@javascript:gs.endOfNextWeek()", ["t4"]),
    ("opened_at>javascript:gs.daysAgoStart(1)", ["t1", "t2"]),  # the example
    ("opened_at<2024-01-01", ["t3"]),  # an empty date is no date: not before one
    ("opened_at<=2024-02-28 10:00:00", ["t2", "t3"]),
    ("opened_at>=2024-02-29", ["t1"]),
    ("opened_at=2024-02-29T09:00:00Z", ["t1"]),
    ("opened_atIN2024-02-29 09:00:00,2023-12-31 23:59:59", ["t1", "t3"]),
    ("opened_atSTARTSWITH2024-02", ["t1", "t2"]),
    ("opened_atRELATIVEGT@hour@ago@5", ["t1"]),
    ("opened_atRELATIVELT@dayofweek@ago@1", ["t2", "t3"]),
    ("opened_atRELATIVEEE@day@ago@1", ["t2"]),
    ("opened_atRELATIVEGE@month@ago@2", ["t1", "t2", "t3"]),
    ("dueRELATIVELE@day@ahead@1", ["t1", "t3"]),
    ("dueRELATIVEEE@week@ahead@1", ["t4"]),
    ("opened_atDATEPARTThursday@javascript:gs.datePart('dayofweek','thursday','EE')", ["t1"]),
    ("opened_atDATEPARTMonday@javascript:gs.datePart('dayofweek','monday','LT')", ["t3"]),
    ("opened_atDATEPARTDecember@javascript:gs.datePart('month','december','EE')", ["t3"]),
    ("opened_atDATEPARTQ1@javascript:gs.datePart('quarter','1','GT')", ["t3"]),
    ("opened_atDATEPART10@javascript:gs.datePart('hour','10','GE')", ["t2", "t3"]),
    ("opened_atDATEPART2024@javascript:gs.datePart('year','2024','LE')", ["t1", "t2", "t3"]),
    ("short_descriptionANYTHING", ["t1", "t2", "t3", "t4"]),
    ("priorityANYTHING", ["t1", "t2", "t3", "t4"]),
    ("short_descriptionEMPTYSTRING", ["t3"]),
    ("short_descriptionISEMPTY", ["t3"]),
    ("priorityISEMPTY", ["t4"]),
    ("priorityEMPTY", ["t4"]),
    ("priorityNOTEMPTY", ["t1", "t2", "t3"]),
    ("short_descriptionCONTAINSdown", ["t1"]),
    ("short_descriptionDOES NOT CONTAINdown", ["t2", "t3", "t4"]),
    ("short_descriptionNOTLIKEdown", ["t2", "t3", "t4"]),
    ("short_descriptionSAMEASdescription", ["t1", "t3"]),
    ("short_descriptionNSAMEASdescription", ["t2", "t4"]),
    ("priorityGT_FIELDimpact", ["t3"]),
    ("priorityLT_FIELDimpact", ["t2"]),
    ("priorityGT_OR_EQUALS_FIELDimpact", ["t1", "t3"]),
    ("priorityLT_OR_EQUALS_FIELDimpact", ["t1", "t2"]),
    ("opened_atSAMEASdue@day", ["t1"]),
    ("opened_atNSAMEASdue@day", ["t2", "t3", "t4"]),
    ("opened_atLT_FIELDdue", ["t1", "t3"]),
    ("assigned_to.user_name=abel", ["t1"]),
    ("assigned_to.user_name!=abel", ["t2", "t3", "t4"]),  # none, or a dangling reference
    ("assigned_to.user_nameISEMPTY", ["t3", "t4"]),
    ("assigned_to.manager.user_name=admin", ["t1"]),
    ("assigned_to.manager.manager.user_nameSTARTSWITHAD", ["t2"]),
    ("assigned_to.dept.name=IT^ORassigned_to.dept.name=HR", ["t1"]),
    ("opened_by.dept.head.user_name=admin", ["t1", "t3"]),
    ("assigned_to.age>=30", ["t1"]),
    ("assigned_to.born<1995-01-01", ["t2"]),
    ("assigned_to.user_nameSAMEASopened_by.user_name", ["t2"]),
    ("assigned_to=javascript:gs.getUserID()", ["t1"]),
    ("assigned_to.user_name=javascript:gs.getUserName()", ["t1"]),
    ("assigned_toINjavascript:gs.getUserID()", ["t1"]),
    ("ci.name=web", ["t1"]),
    ("ci.nameISEMPTY", ["t3", "t4"]),  # c1 is a ci, not a server: outside the reference
    ("ci.os=linux", ["t2"]),
    ("ci.sys_class_nameINSTANCEOFserver", ["t1", "t2"]),
    ("ci.sys_class_nameINSTANCEOFlinux", ["t2"]),
    ("ORDERBYassigned_to.user_name", ["t3", "t4", "t1", "t2"]),
    ("ORDERBYDESCassigned_to.manager.user_name^ORDERBYnumber", ["t1", "t2", "t3", "t4"]),
    ("active=true^ORDERBYDESCci.cpus", ["t1", "t3", "t4"]),
]


@pytest.mark.parametrize(("text", "expected"), OPERATOR_RUNS, ids=[t for t, _ in OPERATOR_RUNS])
def test_operators_select_the_right_records(
    db: sqlite3.Connection, text: str, expected: list[str]
) -> None:
    assert run(db, text, context=CONTEXT) == expected


@pytest.mark.parametrize(
    ("text", "table", "expected"),
    [
        ("sys_class_nameINSTANCEOFserver", "ci", ["c2", "c3"]),
        ("sys_class_nameINSTANCEOFci", "ci", ["c1", "c2", "c3"]),
        ("sys_class_nameINSTANCEOFnope", "ci", []),
        ("name!=web", "server", ["c3"]),  # the store keeps a table to its classes
        ("manager.user_name=admin", "person", ["p2"]),
        ("manager.manager.manager.user_name=admin", "person", []),
        ("manager.user_nameISEMPTY", "person", ["p1", "p4"]),
        ("dept.head.dept.head.user_name=admin^ORDERBYDESCage", "person", ["p1", "p4"]),
    ],
)
def test_other_tables(db: sqlite3.Connection, text: str, table: str, expected: list[str]) -> None:
    assert run(db, text, table, context=CONTEXT) == expected


def test_javascript_values_are_text_without_a_context(db: sqlite3.Connection) -> None:
    assert run(db, "assigned_to=javascript:gs.getUserID()") == []
    sql = compile_query("number=javascript:gs.getUserID()", SCHEMA["task"], schema=SCHEMA)
    assert sql.params == ("javascript:gs.getUserID()",)
    with pytest.raises(QueryError, match="not a date-time"):
        compile_query("opened_at>javascript:gs.daysAgo(1)", SCHEMA["task"], schema=SCHEMA)


def test_date_helpers_read_the_context_clock(db: sqlite3.Connection) -> None:
    later = QueryContext(now=NOW + 86400)
    assert run(db, "opened_at>javascript:gs.daysAgoStart(1)", context=later) == ["t1"]


COMPILE_FAULTS: list[tuple[str, str]] = [
    ("assigned_to.secret=x", "field 'secret' of table person cannot be queried"),
    ("ORDERBYassigned_to.secret", "field 'secret' of table person cannot be queried"),
    ("assigned_to.nope=1", "unknown field 'nope' in table person (in 'assigned_to.nope')"),
    ("number.x=1", "field 'number' of table task is not a reference (in 'number.x')"),
    ("ghost.name=1", "field 'ghost' of table task refers to an unknown table"),
    ("ci.nope=1", "unknown field 'nope' in table server"),
    ("opened_at=javascript:gs.getMyGroups()", "javascript: value 'javascript:gs.getMyGroups()'"),
    ("opened_at>javascript:gs.daysAgo()", "gs.daysAgo takes 1 argument"),
    (
        "numberLIKEjavascript:eval('x')",
        "field 'number': javascript: value \"javascript:eval('x')\"",
    ),
    ("assigned_toINjavascript:getMyGroups()", "javascript: value 'javascript:getMyGroups()'"),
    ("opened_at=yesterday", "field 'opened_at': 'yesterday' is not a date-time"),
    ("opened_atBETWEEN2024-01-01@soon", "'soon' is not a date-time"),
    ("opened_atON2024-02-30", "'2024-02-30' is not a date-time"),
    ("priorityONToday@2024-01-01@2024-01-02", "operator ON does not apply to integer field"),
    ("activeRELATIVEGT@day@ago@1", "operator RELATIVEGT does not apply to boolean field"),
    ("priorityDATEPART1@javascript:gs.datePart('hour','1','EE')", "does not apply to integer"),
    ("numberINSTANCEOFtask", "INSTANCEOF applies to sys_class_name, not 'number'"),
    ("prioritySAMEASshort_description", "integer field 'priority' and string field"),
    ("activeGT_FIELDpriority", "boolean field 'active' and integer field 'priority'"),
    ("prioritySAMEASimpact@day", "@day applies to date-time fields"),
    ("prioritySAMEASnope", "unknown field 'nope' in table task"),
    ("priorityBETWEEN1@x", "field 'priority': 'x' is not an integer"),
    ("opened_atRELATIVEGT@year@ago@999999", "out of range"),
]


@pytest.mark.parametrize(("text", "fault"), COMPILE_FAULTS, ids=[t for t, _ in COMPILE_FAULTS])
def test_compile_faults_name_the_term(text: str, fault: str) -> None:
    with pytest.raises(QueryError) as info:
        compile_query(text, SCHEMA["task"], schema=SCHEMA, context=CONTEXT)
    assert fault in info.value.message


SYNTAX_FAULTS: list[tuple[str, str]] = [
    ("caller_idDYNAMIC90d1921e5f510100a9ad2572f2b477fe", "operator DYNAMIC (dynamic filter"),
    ("managerIN_HIERARCHYabc", "operator IN_HIERARCHY (record hierarchies) is not supported"),
    ("stateVALCHANGES", "operator VALCHANGES"),
    ("stateCHANGESFROM4", "operator CHANGESFROM"),
    ("stateCHANGESTO4", "operator CHANGESTO"),
    ("sla_dueMORETHANactivity_due@day@before@1", "operator MORETHAN"),
    ("sla_dueLESSTHANactivity_due@day@before@3", "operator LESSTHAN"),
    ("RLQUERYsys_user_has_role.user,>=1^role=x^ENDRLQUERY", "related list queries (RLQUERY)"),
    ("123TEXTQUERY321=email", "text search (123TEXTQUERY321)"),
    ("GOTOnumber>=TASK001", "GOTO terms are not supported"),
    ("priorityBETWEEN1", "BETWEEN needs low@high"),
    ("priorityBETWEEN1@2@3", "BETWEEN needs low@high"),
    ("priorityBETWEEN@2", "BETWEEN needs low@high"),
    ("dueONToday@x", "ON needs label@start@end or a date"),
    ("dueNOTON", "NOTON needs label@start@end or a date"),
    ("dueRELATIVEGT@fortnight@ago@1", "RELATIVEGT needs @unit@ago|ahead@n"),
    ("dueRELATIVEGT@day@before@1", "RELATIVEGT needs @unit@ago|ahead@n"),
    ("dueRELATIVEEE@day@ago@x", "RELATIVEEE needs @unit@ago|ahead@n"),
    ("dueDATEPARTx@javascript:gs.datePart('week','1','EE')", "part 'week' is not one of"),
    ("dueDATEPARTx@javascript:gs.datePart('month','smarch','EE')", "value 'smarch' is not valid"),
    ("dueDATEPARTx@javascript:gs.datePart('hour','24','EE')", "value '24' is not valid"),
    ("dueDATEPARTx@javascript:gs.datePart('hour','2','NE')", "comparison 'ne' is not EE"),
    ("dueDATEPARTx@javascript:gs.daysAgo(1)", "DATEPART needs label@javascript:gs.datePart"),
    ("dueDATEPARTx@javascript:alert(1)", "DATEPART value 'javascript:alert(1)'"),
    ("nameSAMEAS", "SAMEAS needs another field's name"),
    ("nameSAMEASx;y", "SAMEAS needs another field's name"),
    ("dueSAMEASopened_at@week", "unit 'week' is not one of"),
    ("sys_class_nameINSTANCEOF", "INSTANCEOF needs a table name"),
    ("sys_class_nameINSTANCEOFa'b", "INSTANCEOF needs a table name"),
    ("nameANYTHINGx", "ANYTHING takes no value"),
    ("a.b.c.d.e.f.g=1", "follows more than 5 references"),
    ("ORDERBYa.b.c.d.e.f.g", "follows more than 5 references"),
    ("nameSAMEASa.b.c.d.e.f.g", "follows more than 5 references"),
]


@pytest.mark.parametrize(("text", "fault"), SYNTAX_FAULTS, ids=[t[:40] for t, _ in SYNTAX_FAULTS])
def test_syntax_faults_name_the_operator_or_term(text: str, fault: str) -> None:
    with pytest.raises(QueryError) as info:
        parse(text)
    assert fault in info.value.message


def test_aliases_parse_to_the_operator_they_stand_for() -> None:
    assert parse("nameNOTLIKEx^nameCONTAINSy^nameDOES NOT CONTAINz^nEMPTY^nNOTEMPTY") == q(
        (c("name", "NOT LIKE", "x"),),
        (c("name", "LIKE", "y"),),
        (c("name", "NOT LIKE", "z"),),
        (c("n", "ISEMPTY"),),
        (c("n", "ISNOTEMPTY"),),
    )
    assert parse("a.b.c=1^ORDERBYDESCa.b") == q(
        (c("a.b.c", "=", "1"),), order=(OrderBy("a.b", descending=True),)
    )
    assert parse("dueONToday@javascript:gs.beginningOfToday()@javascript:gs.endOfToday()") == q(
        (c("due", "ON", ("javascript:gs.beginningOfToday()", "javascript:gs.endOfToday()")),)
    )
    assert parse("dueRELATIVEGT@dayofweek@ago@3") == q(
        (c("due", "RELATIVEGT", ("day", "ago", "3")),)
    )


# --- invalid fields: error, ignore (ServiceNow's default), no_rows -----------------------------

INVALID_RUNS: list[tuple[str, list[str], list[str]]] = [
    # (query, ignore, no_rows)
    ("nope=1", ["t1", "t2", "t3", "t4"], []),
    ("number=TASK001^ORnope=1", ["t1"], []),  # only the invalid condition is dropped
    ("nope=1^ORnumber=TASK001", ["t1"], []),
    ("number=TASK001^nope=1", ["t1"], []),
    ("nope=1^NQnumber=TASK002", ["t1", "t2", "t3", "t4"], []),  # an empty query: all records
    ("number=TASK001^NQnope=1^number=TASK002", ["t1", "t2"], []),
    ("assigned_to.nope=1^number=TASK002", ["t2"], []),
    ("assigned_to.secretSTARTSWITHs", ["t1", "t2", "t3", "t4"], []),  # no oracle on secrets
    ("descriptionLIKEvpn", ["t1", "t2", "t3", "t4"], []),  # hidden (below)
    ("number.x=1^active=false", ["t2"], []),
    ("ORDERBYnope^ORDERBYDESCnumber", ["t4", "t3", "t2", "t1"], []),
    ("prioritySAMEASnope^number=TASK003", ["t3"], []),
]


@pytest.mark.parametrize(
    ("text", "ignored", "none"), INVALID_RUNS, ids=[t for t, _, _ in INVALID_RUNS]
)
def test_invalid_fields(
    db: sqlite3.Connection, text: str, ignored: list[str], none: list[str]
) -> None:
    kw: dict[str, Any] = {"hidden": ["description"], "context": CONTEXT}
    assert run(db, text, invalid="ignore", **kw) == ignored
    assert run(db, text, invalid="no_rows", **kw) == none
    with pytest.raises(QueryError):
        run(db, text, invalid="error", **kw)


@pytest.mark.parametrize("invalid", ["ignore", "no_rows"])
def test_faults_other_than_fields_are_errors_whatever_invalid_says(invalid: InvalidFields) -> None:
    for text in ("priority=high", "opened_at=javascript:gs.getMyGroups()", "priorityLIKE1"):
        with pytest.raises(QueryError):
            compile_query(text, SCHEMA["task"], schema=SCHEMA, invalid=invalid, context=CONTEXT)


def test_names_reach_sql_only_after_matching_the_schema() -> None:
    sql = compile_query("ci.name=web^ORDERBYassigned_to.user_name", SCHEMA["task"], schema=SCHEMA)
    assert sql.params == ("web",)
    assert "'server', 'linux'" in sql.where  # the referenced table's classes, from the schema
    odd = {**SCHEMA, "server": replace(SCHEMA["server"], classes=("server", "x'y"))}
    with pytest.raises(QueryError, match='name "x\'y" cannot be used in a query'):
        compile_query("ci.name=web", SCHEMA["task"], schema=odd)


# --- the store's own tables, through SQLiteStore ---------------------------------------------


@pytest.fixture
async def users() -> AsyncIterator[SQLiteStore]:
    async with SQLiteStore(":memory:") as store:
        admin = await store.insert("sys_user", {"user_name": "admin", "user_password": "h1"})
        bob = await store.insert("sys_user", {"user_name": "bob", "user_password": "h2"})
        role = await store.insert("sys_user_role", {"name": "mid_server"})
        for user in (admin, bob):
            await store.insert(
                "sys_user_has_role",
                {
                    "user": user["sys_id"],
                    "role": role["sys_id"],
                    "sys_id": "g-" + user["user_name"],
                },
            )
        await store.insert("sys_user", {"user_name": "javascript:gs.getUserID()"})
        yield store


async def test_store_dot_walks_and_new_operators(users: SQLiteStore) -> None:
    async def ids(text: str) -> list[str]:
        return [r["sys_id"] for r in await users.query("sys_user_has_role", text)]

    assert await ids("user.user_name=bob") == ["g-bob"]
    assert await ids("role.name=mid_server^ORDERBYDESCuser.user_name") == ["g-bob", "g-admin"]
    assert await ids("user.user_nameBETWEENa@az") == ["g-admin"]
    assert await ids("user.user_nameSAMEASrole.name") == []
    assert await ids("userANYTHING") == ["g-admin", "g-bob"]
    with pytest.raises(QueryError, match="'user_password' of table sys_user cannot be queried"):
        await ids("user.user_passwordSTARTSWITHh")
    # the store's own callers: javascript: values are plain text (they may be data)
    rows = await users.query("sys_user", "user_name=" + escape("javascript:gs.getUserID()"))
    assert [r["user_name"] for r in rows] == ["javascript:gs.getUserID()"]
    assert await users.count("sys_user", "user_nameEMPTYSTRING") == 0


async def test_store_evaluates_date_helpers_with_a_context(users: SQLiteStore) -> None:
    ctx = QueryContext(user_id="u1", user_name="admin")
    recent = "sys_created_on>javascript:gs.daysAgoStart(1)^user_name!=bob"
    assert await users.count("sys_user", recent, context=ctx) == 2
    assert (
        await users.count("sys_user", "sys_created_on<javascript:gs.daysAgoStart(1)", context=ctx)
        == 0
    )
    assert await users.count("sys_user", "nope=1^ORuser_name=bob", invalid="ignore") == 1
    assert await users.count("sys_user", "nope=1^ORuser_name=bob", invalid="no_rows") == 0
    with pytest.raises(QueryError, match=r"javascript: value .javascript:gs\.getMyGroups"):
        await users.query("sys_user", "user_name=javascript:gs.getMyGroups()", context=ctx)


# --- fuzz: anything is SQL or a QueryError, and values stay parameters ---------------------------

MARK = "Qx7!"  # in every text value; not a name, so it may never be in the SQL text
_TEXT = st.text(max_size=8).map(lambda v: v + MARK)
_BAD = ["nope", "assigned_to.secret", "number.x", "description", "ghost.x"]  # invalid fields
_FAMILIES = [  # (paths, (operator, values) choices) that fit together
    (
        ["number", "short_description", "assigned_to.user_name", "ci.name", *_BAD],
        st.tuples(
            st.sampled_from(["=", "!=", "IN", "NOT IN", "LIKE", "STARTSWITH", "NOT LIKE", "<"]),
            _TEXT,
        ),
    ),
    (
        ["priority", "assigned_to.age", "ci.cpus", *_BAD],
        st.tuples(st.sampled_from(["=", "!=", "<", ">=", "IN"]), st.sampled_from(["1", "", "7"]))
        | st.just(("BETWEEN", "1@5")),
    ),
    (
        ["opened_at", "due", "assigned_to.born", "assigned_to.manager.born", *_BAD],
        st.sampled_from(
            [
                ("<", "2024-01-05"),
                ("=", "javascript:gs.daysAgo(1)"),
                ("BETWEEN", "2024-01-01@javascript:gs.endOfToday()"),
                ("ON", "x@javascript:gs.beginningOfToday()@javascript:gs.endOfToday()"),
                ("NOTON", "2024-02-28"),
                ("RELATIVEGT", "@dayofweek@ago@2"),
                ("RELATIVEEE", "@month@ahead@1"),
                ("DATEPART", "x@javascript:gs.datePart('hour','2','GE')"),
                ("SAMEAS", "opened_at@day"),
                ("LT_FIELD", "assigned_to.born"),
            ]
        ),
    ),
    (
        ["priority", "active", "number", "ci.sys_class_name", "assigned_to.user_name", *_BAD],
        st.sampled_from([(op, "") for op in ("ISEMPTY", "ISNOTEMPTY", "ANYTHING", "EMPTYSTRING")])
        | st.sampled_from([("SAMEAS", "impact"), ("NSAMEAS", "assigned_to.user_name")])
        | st.just(("INSTANCEOF", "server")),
    ),
]
_CONDITIONS = st.one_of(
    *(
        st.tuples(st.sampled_from(paths), values).map(lambda t: t[0] + t[1][0] + escape(t[1][1]))
        for paths, values in _FAMILIES
    ),
    st.tuples(st.sampled_from([*_BAD, "Bad", "", "number"]), st.sampled_from(OPERATORS), _TEXT).map(
        lambda t: t[0] + t[1] + escape(t[2])
    ),  # anything at all
)
_TERMS = st.tuples(st.sampled_from(["^", "^OR", "^NQ", "^EQ^"]), _CONDITIONS).map("".join) | (
    st.tuples(st.sampled_from(["^ORDERBY", "^ORDERBYDESC"]), st.sampled_from([*_BAD, "ci.cpus"]))
).map("".join)


@settings(max_examples=250, deadline=None)
@given(
    _CONDITIONS,
    st.lists(_TERMS, max_size=5),
    st.sampled_from(["error", "ignore", "no_rows"]),
    st.booleans(),
)
def test_random_queries_compile_or_raise_query_error(
    db: sqlite3.Connection, first: str, terms: list[str], invalid: InvalidFields, with_context: bool
) -> None:
    text = first + "".join(terms)
    try:
        sql = compile_query(
            text,
            SCHEMA["task"],
            schema=SCHEMA,
            invalid=invalid,
            hidden=["description"],
            context=CONTEXT if with_context else None,
        )
    except QueryError:
        return
    assert MARK not in sql.where
    assert MARK not in sql.order_by
    statement = 'SELECT "sys_id" FROM "task"' + (f" WHERE {sql.where}" if sql.where else "")
    db.execute(statement + " " + sql.order_by, sql.params).fetchall()  # valid SQL
