"""The schema records (``bridge.instance.schema``) applied to SQLite: seeding, DDL.

- :func:`open_schema` (in the store's opening transaction): the two schema tables made if
  missing, the built-in records upserted (new ones inserted, changed ones updated, ones no
  longer built in removed; what users made is kept), then every hierarchy's physical table
  created or given its missing columns (an old database migrates this way; a table made
  now gets its ``schema.INITIAL_RECORDS``), then indexes.
- :func:`insert_meta`, :func:`update_meta`, :func:`delete_meta` (in the writing
  transaction): a write to ``sys_db_object`` / ``sys_dictionary``, checked
  (``schema.check_*``) and applied: CREATE TABLE, ALTER TABLE ADD / DROP COLUMN, DROP TABLE,
  a column rebuilt for a type change whose every value converts both ways unchanged.
- :class:`Plan`: what the store's statements on one table need (column list, SELECT and
  INSERT text, boolean columns, defaults, the class restriction of a child table), made
  once per table and schema.

Physical layout: a table per hierarchy root, a column per field of every table stored in
it (strings and date-times ``TEXT NOT NULL DEFAULT ''``, booleans ``INTEGER`` 0/1, integers
and reals nullable); built-in unique constraints in the table, a user field's ``unique`` a
partial unique index that leaves empty values out (ServiceNow stores empty as NULL).
What ``pg_schema`` decides alike (column definitions, seeding steps, type-change checks)
is in ``bridge.instance.schema_rules``; this module runs it with SQLite's SQL.
"""

from __future__ import annotations

import logging
import sqlite3
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

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
from bridge.instance.store import (
    TABLES,
    Change,
    Conflict,
    Field,
    FieldError,
    FieldType,
    Record,
    StoreError,
    Table,
)
from bridge.instance.store_core import BasePlan

log = logging.getLogger("midbridge.instance.store")

INDEXES = (
    'CREATE INDEX IF NOT EXISTS ecc_queue_lane ON ecc_queue("agent", "queue", "state", "priority")',
    'CREATE INDEX IF NOT EXISTS ecc_queue_lease ON ecc_queue("queue", "state", "lease_until")',
    'CREATE INDEX IF NOT EXISTS ecc_queue_response ON ecc_queue("response_to", "sequence")',
    'CREATE UNIQUE INDEX IF NOT EXISTS ecc_queue_input_chunk ON ecc_queue("response_to", "run", '
    '"sequence") WHERE "queue" = \'input\' AND "sequence" IS NOT NULL',
    'CREATE INDEX IF NOT EXISTS sys_user_has_role_role ON sys_user_has_role("role")',
    'CREATE INDEX IF NOT EXISTS sys_user_grmember_group ON sys_user_grmember("group")',
    'CREATE INDEX IF NOT EXISTS ecc_dead_letter_agent ON ecc_dead_letter("agent")',
    'CREATE INDEX IF NOT EXISTS sys_dictionary_element ON sys_dictionary("element")',
)
_OBJECTS, _ENTRIES = TABLES[TABLE_OBJECTS], TABLES[DICTIONARY]
_SEEDED_OBJECT = ("name", "label", "super_class", "is_extendable")


def column_sql(spec: Field, name: str | None = None) -> str:
    return schema_rules.column_sql(spec, name, integer="INTEGER", real="REAL")


def unique_index(physical: str, element: str) -> str:
    return f'"unique:{physical}.{element}"'  # a name no table can have


def _unique_sql(physical: str, spec: Field) -> str:
    return schema_rules.unique_sql(unique_index(physical, spec.name), physical, spec)


def select(
    db: sqlite3.Connection, table: Table, where: str = "", params: Sequence[Any] = ()
) -> list[Record]:
    names = list(table.fields)
    bools = [n for n, spec in table.fields.items() if spec.type is FieldType.BOOLEAN]
    sql = "SELECT " + ", ".join(f'"{n}"' for n in names) + f' FROM "{table.physical}"'
    out = []
    for row in db.execute(sql + (f" WHERE {where}" if where else "") + " ORDER BY rowid", params):
        record = dict(zip(names, row, strict=True))
        for name in bools:
            record[name] = bool(record[name])
        out.append(record)
    return out


def _insert_sql(table: Table) -> str:
    cols = ", ".join(f'"{n}"' for n in table.fields)
    return f'INSERT INTO "{table.physical}" ({cols}) VALUES ({", ".join("?" * len(table.fields))})'


def insert_raw(
    db: sqlite3.Connection, table: Table, values: Mapping[str, Any], now: str, actor: str
) -> Record:
    """Insert ``values`` (as stored) with the system fields and defaults filled in."""
    row = full_row(table, values, now, actor)
    try:
        db.execute(_insert_sql(table), list(row.values()))
    except sqlite3.IntegrityError as exc:
        raise Conflict(f"{table.name}: {exc}") from None
    return to_record(table, row)


def update_raw(
    db: sqlite3.Connection,
    table: Table,
    previous: Record,
    values: Mapping[str, Any],
    now: str,
    actor: str,
) -> Record:
    changes = dict(values)
    for name in changes:
        if table.fields[name].type is FieldType.BOOLEAN:
            changes[name] = int(bool(changes[name]))
    changes.update(sys_updated_on=now, sys_updated_by=actor)
    assigns = ", ".join(f'"{n}" = ?' for n in changes)
    db.execute(
        f'UPDATE "{table.physical}" SET {assigns}, "sys_mod_count" = '
        'COALESCE("sys_mod_count", 0) + 1 WHERE "sys_id" = ?',
        [*changes.values(), previous["sys_id"]],
    )
    record = {**previous, **changes, "sys_mod_count": (previous.get("sys_mod_count") or 0) + 1}
    return to_record(table, record)


def load(db: sqlite3.Connection) -> Catalog:
    """The schema the records in the database define now."""
    return schema.build(select(db, _OBJECTS), select(db, _ENTRIES))


def _columns(db: sqlite3.Connection, physical: str) -> set[str]:
    return {row[1] for row in db.execute(f'PRAGMA table_info("{physical}")')}


def _ensure_physical(db: sqlite3.Connection, cat: Catalog, root: Table) -> set[str]:
    """Create ``root``'s table, or add the columns it lacks (returned)."""
    fields = table_fields(cat, root.name)
    have = _columns(db, root.name)
    added: set[str] = set()
    if not have:
        cols = [column_sql(f) for f in fields]
        seeded = TABLES.get(root.name)
        for key in seeded.unique if seeded is not None else ():
            cols.append("UNIQUE (" + ", ".join(f'"{f}"' for f in key) + ")")
        db.execute(f'CREATE TABLE "{root.name}" (' + ", ".join(cols) + ")")
    else:
        for spec in fields:
            if spec.name not in have:
                db.execute(f'ALTER TABLE "{root.name}" ADD COLUMN {column_sql(spec)}')
                added.add(spec.name)
    for spec in schema_rules.user_unique_fields(cat, root.name):
        db.execute(_unique_sql(root.name, spec))
    return added


def _upsert(
    db: sqlite3.Connection,
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
            db.execute(
                f'UPDATE "{table.name}" SET "sys_id" = ? WHERE "sys_id" = ?',
                (have["sys_id"], renamed),
            )
            if table.name == TABLE_OBJECTS:
                db.execute(
                    'UPDATE sys_db_object SET "super_class" = ? WHERE "super_class" = ?',
                    (have["sys_id"], renamed),
                )
        if changed:
            update_raw(db, table, have, changed, now, "system")
            wrote = True
    default = schema_rules.defaults(table)
    rows = [list(full_row(table, seeded, now, "system", default).values()) for seeded in new]
    db.executemany(_insert_sql(table), rows)
    return wrote or bool(new)


def open_schema(db: sqlite3.Connection, now: str) -> Catalog:
    """Seed and migrate (inside the caller's transaction); the schema that results."""
    meta = schema.builtin_catalog()
    for name in schema.META_TABLES:
        _ensure_physical(db, meta, meta.tables[name])
    objects, entries = schema.seed()
    have_objects, have_entries = select(db, _OBJECTS), select(db, _ENTRIES)
    wrote = _upsert(db, _OBJECTS, objects, have_objects, ("name",), now)
    wrote = _upsert(db, _ENTRIES, entries, have_entries, ("name", "element"), now) or wrote
    for sys_id in schema_rules.stale_entries(have_entries):  # fields no longer built in
        db.execute('DELETE FROM sys_dictionary WHERE "sys_id" = ?', (sys_id,))
        wrote = True
    cat = load(db) if wrote else schema.build(have_objects, have_entries)
    for table in cat.tables.values():
        if table.storage != "":
            continue
        new = not _columns(db, table.name)
        if "name" in _ensure_physical(db, cat, table) and table.name == "sys_user":
            # users from before sys_user.name: their full name, as the store makes it
            db.execute("UPDATE sys_user SET name = TRIM(first_name || ' ' || last_name)")
        for initial in schema.INITIAL_RECORDS.get(table.name, ()) if new else ():
            insert_raw(db, table, initial, now, "system")  # once: with the new table
    for statement in INDEXES:
        db.execute(statement)
    return cat


# --- writes to sys_db_object -----------------------------------------------------------------


def _taken(db: sqlite3.Connection, name: str) -> bool:
    row = db.execute(
        "SELECT 1 FROM sqlite_master WHERE name = ? COLLATE NOCASE", (name,)
    ).fetchone()
    return row is not None


def _count(db: sqlite3.Connection, table: Table) -> int:
    if table.storage:
        marks = ", ".join("?" * len(table.classes))
        sql = f'SELECT COUNT(*) FROM "{table.physical}" WHERE "sys_class_name" IN ({marks})'
        return int(db.execute(sql, table.classes).fetchone()[0])
    return int(db.execute(f'SELECT COUNT(*) FROM "{table.name}"').fetchone()[0])


def _new_entries(
    db: sqlite3.Connection, entries: Iterable[Record], now: str, actor: str
) -> list[Change]:
    out = []
    for entry in entries:
        record = insert_raw(db, _ENTRIES, entry, now, actor)
        out.append(Change(DICTIONARY, "insert", record))
    return out


def insert_meta(
    db: sqlite3.Connection,
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
        if _taken(db, name):
            raise FieldError(TABLE_OBJECTS, "name", f"{name!r} is taken in the database")
        record = insert_raw(db, _OBJECTS, checked, now, actor)
        changes = [Change(TABLE_OBJECTS, "insert", record)]
        new = load(db).tables[name]
        entries = [schema.collection_entry(name, new.label)]
        if new.super_class is None:
            own = schema_rules.root_fields(new)
            shaped = Table(name, own)
            db.execute(
                f'CREATE TABLE "{name}" (' + ", ".join(column_sql(f) for f in own.values()) + ")"
            )
            entries.extend(schema.system_entries(shaped))
        changes.extend(_new_entries(db, entries, now, actor))
        return record, changes
    checked = schema.check_new_field(cat, values)
    owner = cat.tables[checked["name"]]
    spec = schema.field_of_entry({**checked, "active": True})
    if spec.name in _columns(db, owner.physical):
        raise FieldError(
            DICTIONARY,
            "element",
            f"table {owner.physical} still has a column {spec.name} (from an earlier field)",
        )
    record = insert_raw(db, _ENTRIES, checked, now, actor)
    db.execute(f'ALTER TABLE "{owner.physical}" ADD COLUMN {column_sql(spec)}')
    if record["unique"]:
        _create_unique(db, owner, spec)
    return record, [Change(DICTIONARY, "insert", record)]


def _create_unique(db: sqlite3.Connection, owner: Table, spec: Field) -> None:
    try:
        db.execute(_unique_sql(owner.physical, spec))
    except sqlite3.IntegrityError:
        raise Conflict(
            f"{owner.name}.{spec.name}: records share values already, so it cannot be unique"
        ) from None


def update_meta(
    db: sqlite3.Connection,
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
            db.execute(f'ALTER TABLE "{name}" ADD COLUMN {column_sql(spec)}')
            entry = schema.field_entry(Table(name, {spec.name: spec}), spec)
            extra = _new_entries(db, [entry], now, actor)
        record = update_raw(db, _OBJECTS, previous, checked, now, actor)
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
            _convert(db, owner, old, new, str(merged["internal_type"]))
        if retyped or bool(previous["unique"]) != bool(merged["unique"]):
            db.execute(f"DROP INDEX IF EXISTS {unique_index(owner.physical, old.name)}")
            if merged["unique"]:
                _create_unique(db, owner, new)
    record = update_raw(db, _ENTRIES, previous, checked, now, actor)
    return record, [Change(DICTIONARY, "update", record, previous)]


def _convert(db: sqlite3.Connection, owner: Table, old: Field, new: Field, itype: str) -> None:
    """Rebuild ``old``'s column as ``new``'s type if every value converts there and back
    unchanged (``schema_rules.converted``)."""
    physical, col = owner.physical, old.name
    rows = db.execute(f'SELECT rowid, "sys_id", "{col}" FROM "{physical}"').fetchall()
    values = schema_rules.converted(owner, old, new, itype, rows)
    if column_sql(old).split(" DEFAULT")[0] == column_sql(new).split(" DEFAULT")[0]:
        return  # the same storage (string <-> glide_date_time): every value fits already
    db.execute(f'ALTER TABLE "{physical}" ADD COLUMN {column_sql(new, CONVERTING)}')
    db.executemany(f'UPDATE "{physical}" SET "{CONVERTING}" = ? WHERE rowid = ?', values)
    db.execute(f"DROP INDEX IF EXISTS {unique_index(physical, col)}")
    db.execute(f'ALTER TABLE "{physical}" DROP COLUMN "{col}"')
    db.execute(f'ALTER TABLE "{physical}" RENAME COLUMN "{CONVERTING}" TO "{col}"')


def delete_meta(db: sqlite3.Connection, cat: Catalog, table: str, record: Record) -> list[Change]:
    """Delete a schema record and what it made: an empty table, a column."""
    if table == TABLE_OBJECTS:
        doomed = schema.check_table_delete(cat, record)
        changes = []
        if doomed is not None:
            count = _count(db, doomed)
            if count:
                raise FieldError(
                    TABLE_OBJECTS,
                    "name",
                    f"table {doomed.name} has {count} record(s): delete them first",
                )
            entries = select(db, _ENTRIES, '"name" = ?', (doomed.name,))
            if doomed.storage:
                for name in cat.own.get(doomed.name, ()):
                    _drop_column(db, doomed.physical, name)
            else:
                db.execute(f'DROP TABLE IF EXISTS "{doomed.name}"')
            db.execute('DELETE FROM sys_dictionary WHERE "name" = ?', (doomed.name,))
            changes = [Change(DICTIONARY, "delete", e) for e in entries]
        db.execute('DELETE FROM sys_db_object WHERE "sys_id" = ?', (record["sys_id"],))
        return [Change(TABLE_OBJECTS, "delete", record), *changes]
    schema.check_field_delete(record)
    owner = cat.tables.get(str(record["name"]))
    if owner is not None:
        _drop_column(db, owner.physical, str(record["element"]))
    db.execute('DELETE FROM sys_dictionary WHERE "sys_id" = ?', (record["sys_id"],))
    return [Change(DICTIONARY, "delete", record)]


def _drop_column(db: sqlite3.Connection, physical: str, name: str) -> None:
    if name not in _columns(db, physical):
        return
    db.execute(f"DROP INDEX IF EXISTS {unique_index(physical, name)}")
    try:
        db.execute(f'ALTER TABLE "{physical}" DROP COLUMN "{name}"')
    except sqlite3.OperationalError as exc:
        raise StoreError(f"{physical}.{name}: the column cannot be dropped: {exc}") from None


# --- statements per table (the store's hot path) -------------------------------------------


class Plan(BasePlan):
    """What the statements on one table need, worked out once per schema."""

    __slots__ = (
        "insert",
        "insert_ignore",
        "restrict",
        "restrict_params",
        "select",
        "select_rowid",
    )

    def __init__(self, table: Table) -> None:
        super().__init__(table)
        cols = ", ".join(f'"{n}"' for n in self.names)
        self.select = f'SELECT {cols} FROM "{self.physical}"'
        self.select_rowid = f'SELECT rowid, {cols} FROM "{self.physical}"'
        into = f'INTO "{self.physical}" ({cols}) VALUES ({", ".join("?" * len(self.names))})'
        self.insert = "INSERT " + into
        self.insert_ignore = "INSERT OR IGNORE " + into
        if table.storage and table.classes:
            marks = ", ".join("?" * len(table.classes))
            self.restrict = f'"sys_class_name" IN ({marks})'
            self.restrict_params: tuple[Any, ...] = table.classes
        else:
            self.restrict, self.restrict_params = "", ()

    def where(self, sql: SQL) -> tuple[str, tuple[Any, ...]]:
        """`` WHERE ...`` (or "") with the class restriction, and its parameters."""
        if self.restrict:
            if sql.where:
                return f" WHERE {self.restrict} AND ({sql.where})", (
                    *self.restrict_params,
                    *sql.params,
                )
            return f" WHERE {self.restrict}", self.restrict_params
        return (f" WHERE {sql.where}" if sql.where else ""), sql.params

    def by_id(self) -> str:
        return (
            self.select + ' WHERE "sys_id" = ?' + (f" AND {self.restrict}" if self.restrict else "")
        )
