"""The schema records (``bridge.instance.schema``) applied to PostgreSQL: seeding, DDL.

The PostgreSQL twin of ``bridge.instance.sqlite_schema`` (same functions, same rules, from
``bridge.instance.schema_rules``; asyncpg connections, ``$n`` parameters), so both stores
keep one layout:

- :func:`open_schema` (in the store's opening transaction, under an advisory lock so two
  processes opening one database take turns): ``midbridge_schema_version`` checked and
  written, the two schema tables made if missing, the built-in records upserted, every
  hierarchy's physical table created or given its missing columns (an older database
  migrates this way, as SQLite's does; a table made now gets its
  ``schema.INITIAL_RECORDS``), then indexes.
- :func:`insert_meta`, :func:`update_meta`, :func:`delete_meta` (in the writing
  transaction, under the same lock): a write to ``sys_db_object`` / ``sys_dictionary``,
  checked (``schema.check_*``) and applied as DDL.
- :class:`Plan`: the statements on one table.

Physical layout: as SQLite's (strings and date-times ``TEXT NOT NULL DEFAULT ''``, booleans
``INTEGER`` 0/1 so that queries compile alike, integers ``BIGINT``, reals ``DOUBLE
PRECISION``), plus a ``"sys_row" BIGSERIAL`` in every table: the insertion order SQLite's
``rowid`` gives (``compile_query(dialect="postgresql")`` orders by it). It is never a field.
"""

from __future__ import annotations

import hashlib
import logging
import re
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import asyncpg

from bridge.instance import schema, schema_rules
from bridge.instance.query import SQL
from bridge.instance.schema import DICTIONARY, TABLE_OBJECTS, Catalog
from bridge.instance.schema_rules import (
    CONVERTING,
    class_field,
    full_row,
    table_fields,
    to_record,
)
from bridge.instance.sqlite_schema import INDEXES
from bridge.instance.store import (
    TABLES,
    Change,
    Conflict,
    Field,
    FieldError,
    Record,
    StoreError,
    Table,
)
from bridge.instance.store_core import BasePlan, stored

log = logging.getLogger("midbridge.instance.store")

SCHEMA_VERSION = 1  # midbridge_schema_version: 1, the layout above
VERSION_TABLE = "midbridge_schema_version"
ROW = "sys_row"  # the row-order column of every table
_OBJECTS, _ENTRIES = TABLES[TABLE_OBJECTS], TABLES[DICTIONARY]
# Beyond SQLite's (sqlite_schema.INDEXES): the connector's claim in index order
# (agent=..^queue=output^state=ready^ORDERBYpriority: priority empty first, then sys_row).
PG_INDEXES = (
    'CREATE INDEX IF NOT EXISTS ecc_queue_claim ON ecc_queue("agent", "queue", "state", '
    f'"priority" ASC NULLS FIRST, "{ROW}")',
)
# Advisory lock keys are per database: each names the schema (search_path) too.
SCHEMA_LOCK = "SELECT pg_advisory_xact_lock(hashtext(current_schema() || '/midbridge-schema'))"


def marks(count: int, first: int = 1) -> str:
    return ", ".join(f"${i}" for i in range(first, first + count))


def column_sql(spec: Field, name: str | None = None) -> str:
    return schema_rules.column_sql(spec, name, integer="BIGINT", real="DOUBLE PRECISION")


def unique_index(physical: str, element: str) -> str:
    """A user field's unique index: a name no table can have (a hash: names are <= 63)."""
    digest = hashlib.sha1(f"{physical}.{element}".encode()).hexdigest()[:24]
    return f'"unique:{digest}"'


def _unique_sql(physical: str, spec: Field) -> str:
    return schema_rules.unique_sql(unique_index(physical, spec.name), physical, spec)


async def select(
    db: asyncpg.Connection, table: Table, where: str = "", params: Sequence[Any] = ()
) -> list[Record]:
    names = list(table.fields)
    sql = "SELECT " + ", ".join(f'"{n}"' for n in names) + f' FROM "{table.physical}"'
    sql += (f" WHERE {where}" if where else "") + f' ORDER BY "{ROW}"'
    return [to_record(table, dict(row.items())) for row in await db.fetch(sql, *params)]


def _insert_sql(table: Table) -> str:
    cols = ", ".join(f'"{n}"' for n in table.fields)
    return f'INSERT INTO "{table.physical}" ({cols}) VALUES ({marks(len(table.fields))})'


def conflict_message(table: Table, exc: asyncpg.UniqueViolationError) -> str:
    """What a unique violation means, as ``sqlite_store`` says it."""
    constraint = str(getattr(exc, "constraint_name", "") or "")
    detail = str(getattr(exc, "detail", "") or "")
    if constraint == "ecc_queue_input_chunk":
        return (
            "ecc_queue: an input record with this response_to, run and sequence is already stored"
        )
    match = re.match(r"Key \((.*)\)=\((.*)\) already exists", detail)
    if match is None:
        return f"{table.name}: {exc}"
    cols = [c.strip().strip('"') for c in match.group(1).split(",")]
    if cols == ["sys_id"]:
        return f"{table.name}: a record with sys_id {match.group(2)!r} already exists"
    values = match.group(2).split(", ") if len(cols) > 1 else [match.group(2)]
    if len(values) != len(cols):
        values = [match.group(2)] * len(cols)
    shown = ", ".join(f"{c}={v!r}" for c, v in zip(cols, values, strict=True))
    return f"{table.name}: a record with {shown} already exists"


async def insert_raw(
    db: asyncpg.Connection, table: Table, values: Mapping[str, Any], now: str, actor: str
) -> Record:
    """Insert ``values`` (as stored) with the system fields and defaults filled in."""
    row = full_row(table, values, now, actor)
    try:
        await db.execute(_insert_sql(table), *row.values())
    except asyncpg.UniqueViolationError as exc:
        raise Conflict(conflict_message(table, exc)) from None
    return to_record(table, row)


async def update_raw(
    db: asyncpg.Connection,
    table: Table,
    previous: Record,
    values: Mapping[str, Any],
    now: str,
    actor: str,
) -> Record:
    changes = {n: stored(v) for n, v in values.items()}
    changes.update(sys_updated_on=now, sys_updated_by=actor)
    assigns = ", ".join(f'"{n}" = ${i}' for i, n in enumerate(changes, 1))
    await db.execute(
        f'UPDATE "{table.physical}" SET {assigns}, "sys_mod_count" = '
        f'COALESCE("sys_mod_count", 0) + 1 WHERE "sys_id" = ${len(changes) + 1}',
        *changes.values(),
        previous["sys_id"],
    )
    record = {**previous, **changes, "sys_mod_count": (previous.get("sys_mod_count") or 0) + 1}
    return to_record(table, record)


async def load(db: asyncpg.Connection) -> Catalog:
    """The schema the records in the database define now."""
    return schema.build(await select(db, _OBJECTS), await select(db, _ENTRIES))


async def columns(db: asyncpg.Connection, physical: str) -> list[str]:
    """The columns of ``physical`` in the current schema, in order (``sys_row`` included)."""
    rows = await db.fetch(
        "SELECT column_name FROM information_schema.columns WHERE table_schema = "
        "current_schema() AND table_name = $1 ORDER BY ordinal_position",
        physical,
    )
    return [str(r[0]) for r in rows]


def row_index(physical: str) -> str:
    """The index of the row order (names over 63 bytes: PostgreSQL cuts them)."""
    return f'CREATE INDEX IF NOT EXISTS "{physical[:50]}_{ROW}" ON "{physical}"("{ROW}")'


def _create_table(
    name: str, fields: Iterable[Field], unique: Iterable[tuple[str, ...]] = ()
) -> str:
    cols = [f'"{ROW}" BIGSERIAL NOT NULL', *(column_sql(f) for f in fields)]
    for key in unique:
        cols.append("UNIQUE (" + ", ".join(f'"{f}"' for f in key) + ")")
    return f'CREATE TABLE "{name}" (' + ", ".join(cols) + ")"


async def _ensure_physical(db: asyncpg.Connection, cat: Catalog, root: Table) -> set[str]:
    """Create ``root``'s table, or add the columns it lacks (returned)."""
    fields = table_fields(cat, root.name)
    have = set(await columns(db, root.name))
    added: set[str] = set()
    if not have:
        seeded = TABLES.get(root.name)
        await db.execute(
            _create_table(root.name, fields, seeded.unique if seeded is not None else ())
        )
    else:
        if ROW not in have:  # a table made without it (by hand, or an older tool)
            await db.execute(f'ALTER TABLE "{root.name}" ADD COLUMN "{ROW}" BIGSERIAL NOT NULL')
        for spec in fields:
            if spec.name not in have:
                await db.execute(f'ALTER TABLE "{root.name}" ADD COLUMN {column_sql(spec)}')
                added.add(spec.name)
    await db.execute(row_index(root.name))
    for spec in schema_rules.user_unique_fields(cat, root.name):
        await db.execute(_unique_sql(root.name, spec))
    return added


async def _upsert(
    db: asyncpg.Connection,
    table: Table,
    seeds: Iterable[Record],
    existing: list[Record],
    key: tuple[str, ...],
    now: str,
) -> bool:
    """Write the seeds that are missing or differ; True if it wrote any."""
    wrote = False
    steps, new = schema_rules.upsert_steps(table, seeds, existing, key)
    for renamed, have, changed in steps:
        if renamed is not None:
            await db.execute(
                f'UPDATE "{table.name}" SET "sys_id" = $1 WHERE "sys_id" = $2',
                have["sys_id"],
                renamed,
            )
            if table.name == TABLE_OBJECTS:
                await db.execute(
                    'UPDATE sys_db_object SET "super_class" = $1 WHERE "super_class" = $2',
                    have["sys_id"],
                    renamed,
                )
        if changed:
            await update_raw(db, table, have, changed, now, "system")
            wrote = True
    if new:
        default = schema_rules.defaults(table)
        rows = [list(full_row(table, seeded, now, "system", default).values()) for seeded in new]
        await db.executemany(_insert_sql(table), rows)
    return wrote or bool(new)


async def _check_version(db: asyncpg.Connection, now: str) -> None:
    await db.execute(
        f'CREATE TABLE IF NOT EXISTS "{VERSION_TABLE}" '
        "(version INTEGER NOT NULL, applied_on TEXT NOT NULL)"
    )
    have = await db.fetchval(f'SELECT MAX(version) FROM "{VERSION_TABLE}"')
    if have is not None and int(have) > SCHEMA_VERSION:
        raise StoreError(
            f"the database's schema version is {have}, newer than this midbridge's "
            f"({SCHEMA_VERSION}): run a newer midbridge"
        )
    if have is None or int(have) < SCHEMA_VERSION:
        # Versions before SCHEMA_VERSION would migrate here, step by step; the columns
        # themselves are added by _ensure_physical (as SQLite's are).
        await db.execute(f'INSERT INTO "{VERSION_TABLE}" VALUES ($1, $2)', SCHEMA_VERSION, now)


async def open_schema(db: asyncpg.Connection, now: str) -> Catalog:
    """Seed and migrate (inside the caller's transaction); the schema that results."""
    await db.execute(SCHEMA_LOCK)
    await _check_version(db, now)
    meta = schema.builtin_catalog()
    for name in schema.META_TABLES:
        await _ensure_physical(db, meta, meta.tables[name])
    objects, entries = schema.seed()
    have_objects, have_entries = await select(db, _OBJECTS), await select(db, _ENTRIES)
    wrote = await _upsert(db, _OBJECTS, objects, have_objects, ("name",), now)
    wrote = await _upsert(db, _ENTRIES, entries, have_entries, ("name", "element"), now) or wrote
    for sys_id in schema_rules.stale_entries(have_entries):  # fields no longer built in
        await db.execute('DELETE FROM sys_dictionary WHERE "sys_id" = $1', sys_id)
        wrote = True
    cat = await load(db) if wrote else schema.build(have_objects, have_entries)
    for table in cat.tables.values():
        if table.storage != "":
            continue
        new = not await columns(db, table.name)
        if "name" in await _ensure_physical(db, cat, table) and table.name == "sys_user":
            # users from before sys_user.name: their full name, as the store makes it
            await db.execute("UPDATE sys_user SET name = TRIM(first_name || ' ' || last_name)")
        for initial in schema.INITIAL_RECORDS.get(table.name, ()) if new else ():
            await insert_raw(db, table, initial, now, "system")  # once: with the new table
    for statement in (*INDEXES, *PG_INDEXES):
        await db.execute(statement)
    return cat


# --- writes to sys_db_object -----------------------------------------------------------------


async def _taken(db: asyncpg.Connection, name: str) -> bool:
    row = await db.fetchval(
        "SELECT 1 FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace "
        "WHERE n.nspname = current_schema() AND lower(c.relname) = lower($1)",
        name,
    )
    return row is not None


async def _count(db: asyncpg.Connection, table: Table) -> int:
    if table.storage:
        sql = f'SELECT COUNT(*) FROM "{table.physical}" WHERE "sys_class_name" = ANY($1::text[])'
        return int(await db.fetchval(sql, list(table.classes)))
    return int(await db.fetchval(f'SELECT COUNT(*) FROM "{table.name}"'))


async def _new_entries(
    db: asyncpg.Connection, entries: Iterable[Record], now: str, actor: str
) -> list[Change]:
    out = []
    for entry in entries:
        record = await insert_raw(db, _ENTRIES, entry, now, actor)
        out.append(Change(DICTIONARY, "insert", record))
    return out


async def _ddl(db: asyncpg.Connection, table: str, field: str, statement: str) -> None:
    """Run DDL a user's record asked for; PostgreSQL's refusal names the field at fault."""
    try:
        await db.execute(statement)
    except asyncpg.UniqueViolationError:
        raise
    except asyncpg.PostgresError as exc:
        raise FieldError(table, field, f"the database refused it: {exc}") from None


async def insert_meta(
    db: asyncpg.Connection,
    cat: Catalog,
    table: str,
    values: Mapping[str, Any],
    now: str,
    actor: str,
) -> tuple[Record, list[Change]]:
    """Insert a ``sys_db_object`` or ``sys_dictionary`` record and apply it."""
    if table == TABLE_OBJECTS:
        checked = schema.check_new_table(cat, values)
        name = checked["name"]
        if await _taken(db, name):
            raise FieldError(TABLE_OBJECTS, "name", f"{name!r} is taken in the database")
        record = await insert_raw(db, _OBJECTS, checked, now, actor)
        changes = [Change(TABLE_OBJECTS, "insert", record)]
        new = (await load(db)).tables[name]
        entries = [schema.collection_entry(name, new.label)]
        if new.super_class is None:
            own = schema_rules.root_fields(new)
            shaped = Table(name, own)
            await _ddl(db, TABLE_OBJECTS, "name", _create_table(name, own.values()))
            await db.execute(row_index(name))
            entries.extend(schema.system_entries(shaped))
        changes.extend(await _new_entries(db, entries, now, actor))
        return record, changes
    checked = schema.check_new_field(cat, values)
    owner = cat.tables[checked["name"]]
    spec = schema.field_of_entry({**checked, "active": True})
    if spec.name in await columns(db, owner.physical):
        raise FieldError(
            DICTIONARY,
            "element",
            f"table {owner.physical} still has a column {spec.name} (from an earlier field)",
        )
    record = await insert_raw(db, _ENTRIES, checked, now, actor)
    await _ddl(
        db, DICTIONARY, "element", f'ALTER TABLE "{owner.physical}" ADD COLUMN {column_sql(spec)}'
    )
    if record["unique"]:
        await _create_unique(db, owner, spec)
    return record, [Change(DICTIONARY, "insert", record)]


async def _create_unique(db: asyncpg.Connection, owner: Table, spec: Field) -> None:
    try:
        await db.execute(_unique_sql(owner.physical, spec))
    except asyncpg.UniqueViolationError:
        raise Conflict(
            f"{owner.name}.{spec.name}: records share values already, so it cannot be unique"
        ) from None


async def update_meta(
    db: asyncpg.Connection,
    cat: Catalog,
    table: str,
    previous: Record,
    values: Mapping[str, Any],
    now: str,
    actor: str,
) -> tuple[Record, list[Change]]:
    """Update a schema record and apply the change (nothing to apply: the record only)."""
    if table == TABLE_OBJECTS:
        checked = schema.check_table_update(cat, previous, values)
        if not checked:
            return previous, []
        name = str(previous["name"])
        current = cat.tables.get(name)
        extra: list[Change] = []
        if schema_rules.adds_class_column(checked, current):
            spec = class_field(name)
            await db.execute(f'ALTER TABLE "{name}" ADD COLUMN {column_sql(spec)}')
            entry = schema.field_entry(Table(name, {spec.name: spec}), spec)
            extra = await _new_entries(db, [entry], now, actor)
        record = await update_raw(db, _OBJECTS, previous, checked, now, actor)
        return record, [Change(TABLE_OBJECTS, "update", record, previous), *extra]
    checked = schema.check_field_update(cat, previous, values)
    if not checked:
        return previous, []
    merged = {**previous, **checked}
    owner = cat.tables.get(str(previous["name"]))
    if owner is not None:
        old, new = schema.field_of_entry(previous), schema.field_of_entry(merged)
        retyped = old.type is not new.type
        if retyped:
            await _convert(db, owner, old, new, str(merged["internal_type"]))
        if retyped or bool(previous["unique"]) != bool(merged["unique"]):
            await db.execute(f"DROP INDEX IF EXISTS {unique_index(owner.physical, old.name)}")
            if merged["unique"]:
                await _create_unique(db, owner, new)
    record = await update_raw(db, _ENTRIES, previous, checked, now, actor)
    return record, [Change(DICTIONARY, "update", record, previous)]


async def _convert(
    db: asyncpg.Connection, owner: Table, old: Field, new: Field, itype: str
) -> None:
    """Rebuild ``old``'s column as ``new``'s type if every value converts there and back
    unchanged (``schema_rules.converted``)."""
    physical, col = owner.physical, old.name
    rows = await db.fetch(f'SELECT "{ROW}", "sys_id", "{col}" FROM "{physical}"')
    values = schema_rules.converted(owner, old, new, itype, rows)
    if column_sql(old).split(" DEFAULT")[0] == column_sql(new).split(" DEFAULT")[0]:
        return  # the same storage (string <-> glide_date_time): every value fits already
    await db.execute(f'ALTER TABLE "{physical}" ADD COLUMN {column_sql(new, CONVERTING)}')
    await db.executemany(f'UPDATE "{physical}" SET "{CONVERTING}" = $1 WHERE "{ROW}" = $2', values)
    await db.execute(f"DROP INDEX IF EXISTS {unique_index(physical, col)}")
    await db.execute(f'ALTER TABLE "{physical}" DROP COLUMN "{col}"')
    await db.execute(f'ALTER TABLE "{physical}" RENAME COLUMN "{CONVERTING}" TO "{col}"')


async def delete_meta(
    db: asyncpg.Connection, cat: Catalog, table: str, record: Record
) -> list[Change]:
    """Delete a schema record and what it made: an empty table, a column."""
    if table == TABLE_OBJECTS:
        doomed = schema.check_table_delete(cat, record)
        changes = []
        if doomed is not None:
            count = await _count(db, doomed)
            if count:
                raise FieldError(
                    TABLE_OBJECTS,
                    "name",
                    f"table {doomed.name} has {count} record(s): delete them first",
                )
            entries = await select(db, _ENTRIES, '"name" = $1', (doomed.name,))
            if doomed.storage:
                for name in cat.own.get(doomed.name, ()):
                    await _drop_column(db, doomed.physical, name)
            else:
                await db.execute(f'DROP TABLE IF EXISTS "{doomed.name}"')
            await db.execute('DELETE FROM sys_dictionary WHERE "name" = $1', doomed.name)
            changes = [Change(DICTIONARY, "delete", e) for e in entries]
        await db.execute('DELETE FROM sys_db_object WHERE "sys_id" = $1', record["sys_id"])
        return [Change(TABLE_OBJECTS, "delete", record), *changes]
    schema.check_field_delete(record)
    owner = cat.tables.get(str(record["name"]))
    if owner is not None:
        await _drop_column(db, owner.physical, str(record["element"]))
    await db.execute('DELETE FROM sys_dictionary WHERE "sys_id" = $1', record["sys_id"])
    return [Change(DICTIONARY, "delete", record)]


async def _drop_column(db: asyncpg.Connection, physical: str, name: str) -> None:
    if name not in await columns(db, physical):
        return
    await db.execute(f"DROP INDEX IF EXISTS {unique_index(physical, name)}")
    try:
        await db.execute(f'ALTER TABLE "{physical}" DROP COLUMN "{name}"')
    except asyncpg.PostgresError as exc:
        raise StoreError(f"{physical}.{name}: the column cannot be dropped: {exc}") from None


# --- statements per table (the store's hot path) -------------------------------------------


class Plan(BasePlan):
    """What the statements on one table need, worked out once per schema."""

    __slots__ = ("insert", "insert_ignore", "select", "select_row")

    def __init__(self, table: Table) -> None:
        super().__init__(table)
        cols = ", ".join(f'"{n}"' for n in self.names)
        self.select = f'SELECT {cols} FROM "{self.physical}"'
        self.select_row = f'SELECT "{ROW}", {cols} FROM "{self.physical}"'
        into = f'INTO "{self.physical}" ({cols}) VALUES ({marks(len(self.names))})'
        self.insert = "INSERT " + into
        self.insert_ignore = "INSERT " + into + " ON CONFLICT DO NOTHING RETURNING 1"

    @property
    def restricted(self) -> bool:
        return bool(self.table.storage and self.table.classes)

    def where(self, sql: SQL | None = None) -> tuple[str, tuple[Any, ...]]:
        """`` WHERE ...`` (or "") with the class restriction (after the query's
        parameters), and its parameters."""
        text, params = (sql.where, sql.params) if sql is not None else ("", ())
        if self.restricted:
            restrict = f'"sys_class_name" = ANY(${len(params) + 1}::text[])'
            classes = list(self.table.classes)
            if text:
                return f" WHERE ({text}) AND {restrict}", (*params, classes)
            return f" WHERE {restrict}", (classes,)
        return (f" WHERE {text}" if text else ""), params

    def by_id(self, head: str | None = None) -> tuple[str, tuple[Any, ...]]:
        """The statement reading one record by sys_id ($1), and the extra parameters."""
        text = (head or self.select) + ' WHERE "sys_id" = $1'
        if self.restricted:
            return text + ' AND "sys_class_name" = ANY($2::text[])', (list(self.table.classes),)
        return text, ()
