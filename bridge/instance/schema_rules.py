"""The decisions both engines' schema modules (``sqlite_schema``, ``pg_schema``) take alike.

The schema records (``bridge.instance.schema``) become tables the same way on SQLite and
PostgreSQL: the same column definitions but for the numeric types, the same rows for new
records, the same seeding decisions (which built-in records to insert, rename, update or
remove) and the same checks of a column's type change. This module holds those; each
engine's module runs them with its own SQL and connection.
"""

from __future__ import annotations

import logging
import uuid
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

from bridge.instance import schema
from bridge.instance.schema import DICTIONARY, Catalog
from bridge.instance.store import SYSTEM_FIELDS, Field, FieldError, FieldType, Record, Table
from bridge.instance.store_core import stored

log = logging.getLogger("midbridge.instance.store")

CONVERTING = "midbridge_converting"  # the column a type change fills before the swap
NUMERIC = (FieldType.INTEGER, FieldType.REAL)


def _text(value: str) -> str:
    return "'" + value.replace("'", "''") + "'"


def column_sql(spec: Field, name: str | None, *, integer: str, real: str) -> str:
    """A column's definition; ``integer`` and ``real`` are the engine's numeric types."""
    col = name or spec.name
    if col == "sys_id":
        return '"sys_id" TEXT NOT NULL PRIMARY KEY'
    default = schema.stored_default(spec)
    if spec.type.is_text:
        return f'"{col}" TEXT NOT NULL DEFAULT {_text(default)}'
    if spec.type is FieldType.BOOLEAN:
        return f'"{col}" INTEGER NOT NULL DEFAULT {int(default)}'
    sql_type = integer if spec.type is FieldType.INTEGER else real
    return f'"{col}" {sql_type}' + ("" if default is None else f" DEFAULT {default!r}")


def unique_sql(index: str, physical: str, spec: Field) -> str:
    """A user field's ``unique``: a partial unique index leaving empty values out
    (ServiceNow stores empty as NULL)."""
    col = f'"{spec.name}"'
    where = f"{col} IS NOT NULL" + (f" AND {col} != ''" if spec.type.is_text else "")
    return f'CREATE UNIQUE INDEX IF NOT EXISTS {index} ON "{physical}"({col}) WHERE {where}'


def to_record(table: Table, row: Mapping[str, Any]) -> Record:
    return {
        name: bool(row[name]) if spec.type is FieldType.BOOLEAN else row[name]
        for name, spec in table.fields.items()
    }


def defaults(table: Table) -> dict[str, Any]:
    return {name: schema.stored_default(spec) for name, spec in table.fields.items()}


def full_row(
    table: Table,
    values: Mapping[str, Any],
    now: str,
    actor: str,
    default: Mapping[str, Any] | None = None,
) -> dict[str, Any]:
    """Every column of a new record of ``table``, as stored, system fields filled in."""
    row = dict(defaults(table) if default is None else default)
    row.update((k, v) for k, v in values.items() if k in row)
    row["sys_id"] = values.get("sys_id") or uuid.uuid4().hex
    row.update(sys_created_on=now, sys_updated_on=now, sys_created_by=actor, sys_updated_by=actor)
    row["sys_mod_count"] = 0
    return {name: stored(value) for name, value in row.items()}


def table_fields(cat: Catalog, root: str) -> list[Field]:
    """Every field stored in ``root``'s physical table (its own and its children's)."""
    fields: dict[str, Field] = {}
    for table in cat.hierarchy(root):
        for spec in table.fields.values():
            fields.setdefault(spec.name, spec)
    return list(fields.values())


def user_unique_fields(cat: Catalog, root: str) -> list[Field]:
    """The fields of ``root``'s hierarchy made unique by a user (a partial index each)."""
    builtin = schema.seed_keys()[1]
    return [
        table.fields[name]
        for table in cat.hierarchy(root)
        for name in cat.own.get(table.name, ())
        if (name,) in table.unique and (table.name, name) not in builtin
    ]


# --- seeding ----------------------------------------------------------------------------------


def upsert_steps(
    table: Table, seeds: Iterable[Record], existing: Sequence[Record], key: tuple[str, ...]
) -> tuple[list[tuple[str | None, Record, Record]], list[Record]]:
    """What seeding ``table`` writes: (steps in order, the seeds to insert). A step is
    (the sys_id a user-made record had, now the built-in one's, or None; the record as
    stored; its fields that differ from the seed, to update)."""
    steps: list[tuple[str | None, Record, Record]] = []
    new: list[Record] = []
    by_id = {r["sys_id"]: r for r in existing}
    by_key = {tuple(r[k] for k in key): r for r in existing}
    for seeded in seeds:
        have = by_id.get(seeded["sys_id"])
        renamed: str | None = None
        if have is None:
            other = by_key.get(tuple(seeded[k] for k in key))
            if other is None:
                new.append(seeded)
                continue
            # a user-made record now built in: it takes the built-in id
            shown = ".".join(str(seeded[k]) for k in key)
            log.warning("%s record %s is now built in", table.name, shown)
            renamed = other["sys_id"]
            have = {**other, "sys_id": seeded["sys_id"]}
        changed = {k: v for k, v in seeded.items() if k != "sys_id" and have.get(k) != v}
        steps.append((renamed, have, changed))
    return steps, new


def stale_entries(have_entries: Iterable[Record]) -> list[str]:
    """The sys_ids of built-in ``sys_dictionary`` records whose field is no longer built in."""
    builtin_tables, builtin_entries = schema.seed_keys()
    stale = []
    for entry in have_entries:
        key = (entry["name"], entry["element"])
        if (
            entry["name"] in builtin_tables
            and key not in builtin_entries
            and entry["sys_id"] == schema.entry_id(*key)
        ):
            stale.append(entry["sys_id"])
    return stale


# --- writes to the schema records -------------------------------------------------------------


def class_field(root: str) -> Field:
    return Field("sys_class_name", default=root, internal_type="sys_class_name", label="Class")


def root_fields(new: Table) -> dict[str, Field]:
    """The columns a new hierarchy root's table starts with."""
    own = {f.name: f for f in SYSTEM_FIELDS}
    if new.extendable:
        own["sys_class_name"] = class_field(new.name)
    return own


def adds_class_column(checked: Mapping[str, Any], current: Table | None) -> bool:
    """A ``sys_db_object`` update making a table extendable that has no class column yet."""
    return bool(
        checked.get("is_extendable")
        and current is not None
        and "sys_class_name" not in current.fields
    )


def _typed(spec: Field, value: Any) -> Any:
    return bool(value) if spec.type is FieldType.BOOLEAN else value


def converted(
    owner: Table, old: Field, new: Field, itype: str, rows: Iterable[Sequence[Any]]
) -> list[tuple[Any, Any]]:
    """``rows`` (row id, sys_id, stored value of ``old``) as (stored value of ``new``, row id),
    if every value converts there and back unchanged; FieldError (internal_type) naming
    the first that does not."""
    col = old.name
    out = []
    for row_id, sys_id, value_stored in rows:
        if value_stored is None or value_stored == "":
            out.append((stored(schema.stored_default(Field(col, new.type))), row_id))
            continue
        value = _typed(old, value_stored)
        if old.type is FieldType.BOOLEAN and new.type in NUMERIC:
            value = int(value)
        try:
            after = schema.coerce(owner.name, new, value)
            back = _typed(new, after)
            if new.type is FieldType.BOOLEAN and old.type in NUMERIC:
                back = int(back)
            again = schema.coerce(owner.name, old, back)
        except FieldError:
            again = None
        if stored(again) != value_stored:
            raise FieldError(
                DICTIONARY,
                "internal_type",
                f"{owner.name}.{col} holds {value_stored!r} (record {sys_id}), which would not "
                f"stay the same as {itype}: the change would lose data",
            )
        out.append((stored(after), row_id))
    return out
