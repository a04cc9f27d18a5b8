"""The schema as data: tables are ``sys_db_object`` records, fields ``sys_dictionary`` records.

ServiceNow keeps its schema in two tables, and so does the instance:

- ``sys_db_object`` (one record per table): ``name``, ``label``, ``super_class`` (a
  reference to the ``sys_db_object`` record of the table it extends: its sys_id),
  ``is_extendable``.
- ``sys_dictionary`` (one record per field, plus one ``collection`` record per table with
  an empty ``element``): ``name`` (the table), ``element`` (the field), ``column_label``,
  ``internal_type`` (:data:`TYPES`), ``reference`` (a table name), ``reference_cascade_rule``
  (``delete``/``cascade`` delete the referencing records with the referenced one),
  ``max_length``, ``default_value``, ``mandatory``, ``read_only``, ``display``, ``unique``,
  ``active``.

The built-in tables (``bridge.instance.store.TABLES``) and the CI class tree
(:data:`CI_CLASSES`) are *seeded* as records with deterministic sys_ids (:func:`table_id`,
:func:`entry_id`); the store upserts them on every open and keeps what users added. The
live schema (:class:`Catalog`, ``Store.schema``) is :func:`build` over those records.
A built-in table may also come with records (:data:`INITIAL_RECORDS`: the Table Cleaner's
default ``sys_auto_flush`` rules), inserted once, when the store creates its storage.

Extension (ServiceNow's table-per-hierarchy model): a table with a ``super_class`` has its
parent's fields and its own; its records live in the hierarchy root's physical table,
with ``sys_class_name`` the class they were created as. Reading a table returns its
records and those of the tables below it (``Table.classes``).

This module is storage-agnostic: seeds, :func:`build`, the checks that a write to the two
tables is allowed (:func:`check_new_table` ...), and :func:`coerce`, the value rules of
every store (``bridge.instance.store``'s docstring). ``bridge.instance.sqlite_schema``
applies the changes to SQLite.
"""

from __future__ import annotations

import logging
import re
import uuid
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from functools import cache
from typing import Any

import orjson

from bridge.instance.store import (
    SYSTEM_FIELD_NAMES,
    SYSTEM_FIELDS,
    TABLES,
    Conflict,
    Field,
    FieldError,
    FieldType,
    Record,
    Table,
)

log = logging.getLogger("midbridge.instance.store")

TABLE_OBJECTS = "sys_db_object"
DICTIONARY = "sys_dictionary"
META_TABLES = frozenset({TABLE_OBJECTS, DICTIONARY})

# The CI class tree (ServiceNow's, the part discovery fills): class -> parent class.
CI_CLASSES: Mapping[str, str | None] = {
    "cmdb_ci": None,
    "cmdb_ci_hardware": "cmdb_ci",
    "cmdb_ci_computer": "cmdb_ci_hardware",
    "cmdb_ci_server": "cmdb_ci_computer",
    "cmdb_ci_linux_server": "cmdb_ci_server",
    "cmdb_ci_netgear": "cmdb_ci_hardware",
    "cmdb_ci_appl": "cmdb_ci",
    "cmdb_ci_web_server": "cmdb_ci_appl",
    "cmdb_ci_ip_address": "cmdb_ci",
}
CI_LABELS: Mapping[str, str] = {
    "cmdb_ci_hardware": "Hardware",
    "cmdb_ci_computer": "Computer",
    "cmdb_ci_server": "Server",
    "cmdb_ci_linux_server": "Linux Server",
    "cmdb_ci_netgear": "Network Gear",
    "cmdb_ci_appl": "Application",
    "cmdb_ci_web_server": "Web Server",
    "cmdb_ci_ip_address": "IP Address",
}

NAME = re.compile(r"[a-z][a-z0-9_]*")
MAX_NAME = 80  # table and column names (ServiceNow's limit)
_RESERVED_COLUMNS = frozenset({"rowid", "oid"})  # SQLite's own; would hide the row id

# internal_type -> how it is stored. The first group is what users may give a new field.
TYPES: Mapping[str, FieldType] = {
    "string": FieldType.STRING,
    "reference": FieldType.STRING,
    "password2": FieldType.STRING,  # write-only: never returned by the Table API
    "email": FieldType.STRING,
    "url": FieldType.STRING,
    "html": FieldType.STRING,
    "integer": FieldType.INTEGER,
    "longint": FieldType.INTEGER,
    "decimal": FieldType.REAL,
    "float": FieldType.REAL,
    "boolean": FieldType.BOOLEAN,
    "glide_date_time": FieldType.DATETIME,
    # built-in only
    "GUID": FieldType.STRING,
    "sys_class_name": FieldType.STRING,
    "password": FieldType.STRING,  # one-way hash (sys_user.user_password)
}
USER_TYPES = frozenset(TYPES) - {"GUID", "sys_class_name", "password"}
WRITE_ONLY_TYPES = frozenset({"password", "password2"})
CASCADE_RULES = frozenset({"", "none", "clear", "delete", "cascade"})
_DEFAULT_TYPE = {
    FieldType.STRING: "string",
    FieldType.INTEGER: "integer",
    FieldType.REAL: "decimal",
    FieldType.BOOLEAN: "boolean",
    FieldType.DATETIME: "glide_date_time",
}
_LONG_TEXT = frozenset(
    {"payload", "log", "excerpt", "stats", "public_key", "message", "description",
     "sys_descr", "error_string", "context_map", "mac_address", "ranges", "exclusions",
     "conditions"}
)  # fmt: skip
DATETIME_TEXT = re.compile(r"\d{4}-\d{2}-\d{2} \d{2}:\d{2}:\d{2}")
_DATE_ONLY = re.compile(r"\d{4}-\d{2}-\d{2}")

_NAMESPACE = uuid.UUID("5b0c8e3a-6a53-4d5e-9b0e-6d1d2c6f7a10")


def table_id(name: str) -> str:
    """The sys_id of a built-in table's ``sys_db_object`` record (the same everywhere)."""
    return uuid.uuid5(_NAMESPACE, f"{TABLE_OBJECTS}:{name}").hex


def entry_id(table: str, element: str) -> str:
    """The sys_id of a seeded ``sys_dictionary`` record (``element`` "" : the table's own)."""
    return uuid.uuid5(_NAMESPACE, f"{DICTIONARY}:{table}.{element}").hex


# --- values ----------------------------------------------------------------------------------


def coerce(table: str, spec: Field, value: Any) -> Any:
    """``value`` as ``spec``'s column holds it (the store's value rules); FieldError if not."""
    kind = spec.type
    if kind is FieldType.STRING:
        if value is None:
            return ""
        if isinstance(value, str):
            return value
        if isinstance(value, bool):
            return "true" if value else "false"
        if isinstance(value, int | float):
            return str(value)
        if isinstance(value, dict | list):
            return orjson.dumps(value).decode()
        raise FieldError(table, spec.name, f"expected text, got {type(value).__name__}")
    if kind is FieldType.DATETIME:
        if value is None or value == "":
            return ""
        if isinstance(value, str):
            text = value.strip()
            if DATETIME_TEXT.fullmatch(text):
                return text
            if _DATE_ONLY.fullmatch(text):
                return text + " 00:00:00"
        raise FieldError(table, spec.name, f"expected YYYY-MM-DD HH:MM:SS (UTC), got {value!r}")
    if kind is FieldType.BOOLEAN:
        if isinstance(value, bool):
            return int(value)
        if value in (0, 1) and isinstance(value, int):
            return value
        if isinstance(value, str) and value.lower() in ("true", "false", "1", "0"):
            return 1 if value.lower() in ("true", "1") else 0
        raise FieldError(table, spec.name, f"expected true or false, got {value!r}")
    if value is None or value == "":
        return None
    if isinstance(value, bool):
        raise FieldError(table, spec.name, f"expected a number, got {value!r}")
    if kind is FieldType.INTEGER:
        if isinstance(value, int):
            return value
        if isinstance(value, float) and value.is_integer():
            return int(value)
        if isinstance(value, str):
            try:
                return int(value.strip())
            except ValueError:
                pass
        raise FieldError(table, spec.name, f"expected an integer, got {value!r}")
    if isinstance(value, int | float):
        return float(value)
    if isinstance(value, str):
        try:
            return float(value.strip())
        except ValueError:
            pass
    raise FieldError(table, spec.name, f"expected a number, got {value!r}")


def stored_default(spec: Field) -> Any:
    """What a new record's column holds when the field is not given."""
    if spec.type.is_text:
        return "" if spec.default is None else str(spec.default)
    if spec.type is FieldType.BOOLEAN:
        return 1 if spec.default else 0
    return spec.default


def default_text(value: Any) -> str:
    """A field default as ``sys_dictionary.default_value`` holds it."""
    if value is None:
        return ""
    if isinstance(value, bool):
        return "true" if value else "false"
    return str(value)


def parse_default(table: str, kind: FieldType, text: str) -> Any:
    """``default_value`` text as a field default; FieldError (``default_value``) if it does
    not fit the type."""
    if text == "":
        return None
    probe = Field("default_value", kind)
    value = coerce(table, probe, text)
    return bool(value) if kind is FieldType.BOOLEAN else value


def internal_type(spec: Field) -> str:
    if spec.internal_type:
        return spec.internal_type
    if spec.reference:
        return "reference"
    if spec.write_only:
        return "password2"
    return _DEFAULT_TYPE[spec.type]


def label_of(name: str) -> str:
    """A label made from a name: ``mobile_phone`` -> ``Mobile phone``."""
    return name.replace("_", " ").strip().capitalize() or name


def _max_length(spec: Field, itype: str) -> int:
    if itype in ("GUID", "reference"):
        return 32
    if spec.type is FieldType.STRING and itype != "sys_class_name":
        return 4000 if spec.name in _LONG_TEXT else 255
    return 80 if itype == "sys_class_name" else 40


# --- seeds -----------------------------------------------------------------------------------


def _object(name: str, label: str, super_class: str | None, extendable: bool) -> Record:
    return {
        "sys_id": table_id(name),
        "name": name,
        "label": label,
        "super_class": table_id(super_class) if super_class else "",
        "is_extendable": extendable,
    }


def collection_entry(name: str, label: str) -> Record:
    """The ``sys_dictionary`` record that stands for a table (type ``collection``)."""
    return {
        "sys_id": entry_id(name, ""),
        "name": name,
        "element": "",
        "column_label": label,
        "internal_type": "collection",
        "reference": "",
        "reference_cascade_rule": "",
        "max_length": 40,
        "default_value": "",
        "mandatory": False,
        "read_only": False,
        "display": False,
        "unique": False,
        "active": True,
    }


def field_entry(table: Table, spec: Field) -> Record:
    """The ``sys_dictionary`` record of one field (deterministic sys_id)."""
    itype = internal_type(spec)
    return {
        "sys_id": entry_id(table.name, spec.name),
        "name": table.name,
        "element": spec.name,
        "column_label": spec.label or label_of(spec.name),
        "internal_type": itype,
        "reference": spec.reference or "",
        "reference_cascade_rule": "delete" if spec.cascade_delete else "",
        "max_length": _max_length(spec, itype),
        "default_value": default_text(spec.default),
        "mandatory": spec.mandatory,
        "read_only": spec.read_only,
        "display": table.display_field == spec.name,
        "unique": (spec.name,) in table.unique,
        "active": True,
    }


def system_entries(table: Table) -> list[Record]:
    """The records of a new root table's system fields (and ``sys_class_name``)."""
    return [field_entry(table, f) for f in table.fields.values() if f.name in SYSTEM_FIELD_NAMES]


@cache
def seed() -> tuple[tuple[Record, ...], tuple[Record, ...]]:
    """The built-in ``sys_db_object`` and ``sys_dictionary`` records, in order."""
    objects: list[Record] = []
    entries: list[Record] = []
    for table in TABLES.values():
        objects.append(_object(table.name, table.label, None, table.extendable))
        entries.append(collection_entry(table.name, table.label))
        entries.extend(field_entry(table, f) for f in table.fields.values())
    for cls, parent in CI_CLASSES.items():
        if cls not in TABLES:
            label = CI_LABELS.get(cls) or label_of(cls)
            objects.append(_object(cls, label, parent, True))
            entries.append(collection_entry(cls, label))
    return tuple(objects), tuple(entries)


@cache
def seed_keys() -> tuple[frozenset[str], frozenset[tuple[str, str]]]:
    """Built-in table names, and built-in (table, element) pairs (refused to change)."""
    objects, entries = seed()
    return (
        frozenset(o["name"] for o in objects),
        frozenset((e["name"], e["element"]) for e in entries),
    )


AUTO_FLUSH = "sys_auto_flush"  # the Table Cleaner's rules (bridge/instance/table_cleaner.py)
_DAY = 86_400


def record_id(table: str, key: str) -> str:
    """The sys_id of a record a built-in table is created with (the same everywhere)."""
    return uuid.uuid5(_NAMESPACE, f"{table}:{key}").hex


def _flush_rule(key: str, tablename: str, age: int, conditions: str = "") -> Record:
    return {
        "sys_id": record_id(AUTO_FLUSH, key),
        "tablename": tablename,
        "matchfield": "sys_created_on",
        "age": age,
        "conditions": conditions,
        "active": True,
    }


# The records a built-in table gets when its storage is created, and only then: what an
# administrator changes, deactivates or deletes later stays so (nothing seeds them again).
INITIAL_RECORDS: Mapping[str, tuple[Record, ...]] = {
    AUTO_FLUSH: (
        # Inputs, and the outputs that were answered or failed; never an output still
        # awaiting its answer (ready, processing).
        _flush_rule(
            "ecc_queue", "ecc_queue", 7 * _DAY, "queue=input^NQqueue=output^stateINprocessed,error"
        ),
        _flush_rule("ecc_dead_letter", "ecc_dead_letter", 30 * _DAY),
        _flush_rule("syslog", "syslog", 30 * _DAY),
        _flush_rule("sys_attachment.ecc_queue", "sys_attachment", 7 * _DAY, "table_name=ecc_queue"),
    ),
}


# --- the live schema -------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Catalog:
    """The schema built from the records: tables by name, and the record ids behind them."""

    tables: Mapping[str, Table]
    ids: Mapping[str, str]  # table name -> its sys_db_object sys_id
    names: Mapping[str, str]  # sys_db_object sys_id -> table name
    own: Mapping[str, tuple[str, ...]]  # table name -> the fields it declares itself
    children: Mapping[str, tuple[str, ...]]  # table name -> the tables extending it

    def table_name(self, value: str) -> str | None:
        """A table named by its ``sys_db_object`` sys_id, or by its name."""
        if value in self.names:
            return self.names[value]
        return value if value in self.tables else None

    def hierarchy(self, name: str) -> list[Table]:
        """Every table stored in ``name``'s physical table."""
        physical = self.tables[name].physical
        return [t for t in self.tables.values() if t.physical == physical]


def _field_of(table: str, entry: Mapping[str, Any]) -> Field:
    itype = str(entry.get("internal_type") or "string")
    kind = TYPES.get(itype, FieldType.STRING)
    try:
        default = parse_default(table, kind, str(entry.get("default_value") or ""))
    except FieldError:
        default = None
    builtin = (table, entry["element"]) in seed_keys()[1] or entry["element"] in SYSTEM_FIELD_NAMES
    rule = str(entry.get("reference_cascade_rule") or "").lower()
    return Field(
        str(entry["element"]),
        kind,
        default=default,
        reference=str(entry.get("reference") or "") or None,
        cascade_delete=rule in ("delete", "cascade"),
        write_only=itype in WRITE_ONLY_TYPES,
        # sys_dictionary.read_only is a form setting in ServiceNow; only the system
        # fields and the built-in ones the store sets are read-only to writers here.
        read_only=bool(entry.get("read_only")) and builtin,
        label=str(entry.get("column_label") or "") or label_of(str(entry["element"])),
        mandatory=bool(entry.get("mandatory")),
        internal_type=itype,
    )


def build(objects: Iterable[Mapping[str, Any]], entries: Iterable[Mapping[str, Any]]) -> Catalog:
    """The schema ``sys_db_object`` records (``objects``) and ``sys_dictionary`` records
    (``entries``) define; fields in the order of ``entries`` (a table's after its parent's).
    Records that do not make sense (an unknown table, a name that is not a name) are left
    out rather than failing: the checks keep them from being written."""
    rows = {str(o["name"]): o for o in objects if NAME.fullmatch(str(o.get("name") or ""))}
    ids = {name: str(o["sys_id"]) for name, o in rows.items()}
    names = {sys_id: name for name, sys_id in ids.items()}
    parent: dict[str, str | None] = {}
    for name, o in rows.items():
        sup = names.get(str(o.get("super_class") or ""))
        parent[name] = sup if sup != name else None
    for name in rows:  # a loop in super_class (never written by the checks): cut it
        seen = {name}
        up = parent[name]
        while up is not None:
            if up in seen:
                parent[name] = None
                break
            seen.add(up)
            up = parent[up]
    own: dict[str, list[Field]] = {name: [] for name in rows}
    display: dict[str, str] = {}
    unique: dict[str, list[tuple[str, ...]]] = {name: [] for name in rows}
    for entry in entries:
        table, element = str(entry.get("name") or ""), str(entry.get("element") or "")
        if table not in own or not element or not entry.get("active", True):
            continue
        spec = _field_of(table, entry)
        own[table].append(spec)
        if entry.get("display"):
            display[table] = element
        if entry.get("unique"):
            unique[table].append((element,))
    children: dict[str, list[str]] = {name: [] for name in rows}
    for name in rows:
        up = parent[name]
        if up is not None:
            children[up].append(name)
    tables: dict[str, Table] = {}

    def below(name: str) -> list[str]:
        found: list[str] = []
        queue = list(children[name])
        while queue:
            child = queue.pop(0)
            found.append(child)
            queue.extend(children[child])
        return found

    def make(name: str, base: Table | None) -> None:
        fields = dict(base.fields) if base is not None else {}
        fields.update((f.name, f) for f in own[name])
        seeded = TABLES.get(name)
        uniques = list(base.unique) if base is not None else []
        for key in (*(seeded.unique if seeded is not None else ()), *unique[name]):
            if key not in uniques:
                uniques.append(key)
        o = rows[name]
        tables[name] = Table(
            name,
            fields,
            unique=tuple(uniques),
            display_field=display.get(name) or (base.display_field if base else "sys_id"),
            label=str(o.get("label") or "") or label_of(name),
            super_class=base.name if base is not None else None,
            storage=(base.physical if base is not None else ""),
            classes=(name, *below(name)) if "sys_class_name" in fields else (),
            extendable=bool(o.get("is_extendable")),
        )
        for child in children[name]:
            make(child, tables[name])

    for name in rows:
        if parent[name] is None:
            make(name, None)
    return Catalog(
        tables=tables,
        ids=ids,
        names=names,
        own={name: tuple(f.name for f in fields) for name, fields in own.items()},
        children={name: tuple(c) for name, c in children.items()},
    )


@cache
def builtin_catalog() -> Catalog:
    """The schema of the seeds alone (what a new database starts with)."""
    objects, entries = seed()
    return build(objects, entries)


# --- checks on writes to sys_db_object and sys_dictionary ------------------------------------


def _check_name(table: str, field: str, value: Any, what: str) -> str:
    if not isinstance(value, str) or not value:
        raise FieldError(table, field, f"a {what} name is required")
    if len(value) > MAX_NAME or not NAME.fullmatch(value):
        raise FieldError(
            table,
            field,
            f"{what} name {value[:100]!r} must be 1-{MAX_NAME} of a-z, 0-9 and _, "
            "starting with a letter",
        )
    return value


def _first_change(previous: Mapping[str, Any], values: Mapping[str, Any]) -> str | None:
    for name, value in values.items():
        before = previous.get(name)
        if isinstance(before, bool):
            value = bool(value)
        if value != before:
            return name
    return None


def check_new_table(cat: Catalog, values: Mapping[str, Any]) -> dict[str, Any]:
    """A new ``sys_db_object`` record, checked and completed (label, super_class's sys_id)."""
    out = dict(values)
    name = _check_name(TABLE_OBJECTS, "name", values.get("name"), "table")
    if name.startswith("sqlite_"):
        raise FieldError(TABLE_OBJECTS, "name", f"table name {name!r}: sqlite_ is reserved")
    if name in cat.tables:
        raise Conflict(f"{TABLE_OBJECTS}: a record with name={name!r} already exists")
    out["label"] = values.get("label") or label_of(name)
    sup = str(values.get("super_class") or "")
    if sup:
        parent = cat.table_name(sup)
        if parent is None:
            raise FieldError(
                TABLE_OBJECTS,
                "super_class",
                f"no table {sup[:100]!r} (a sys_db_object sys_id or name)",
            )
        if not cat.tables[parent].extendable:
            raise FieldError(
                TABLE_OBJECTS,
                "super_class",
                f"table {parent} is not extendable (is_extendable false)",
            )
        if parent in META_TABLES:
            raise FieldError(TABLE_OBJECTS, "super_class", f"table {parent} cannot be extended")
        out["super_class"] = cat.ids[parent]
    return out


def check_table_update(
    cat: Catalog, previous: Mapping[str, Any], values: Mapping[str, Any]
) -> dict[str, Any]:
    """The changes an update may make to a ``sys_db_object`` record (label, is_extendable)."""
    name = str(previous["name"])
    changed = _first_change(previous, values)
    if changed is None:
        return {}
    if name in seed_keys()[0]:
        raise FieldError(
            TABLE_OBJECTS, changed, f"{name} is a built-in table: its record cannot be changed"
        )
    out = dict(values)
    if "name" in values and values["name"] != name:
        raise FieldError(TABLE_OBJECTS, "name", f"table {name} cannot be renamed")
    if "super_class" in values:
        sup = str(values["super_class"] or "")
        resolved = cat.ids.get(cat.table_name(sup) or "", sup) if sup else ""
        if resolved != (previous.get("super_class") or ""):
            raise FieldError(
                TABLE_OBJECTS, "super_class", f"table {name}: what it extends is set when created"
            )
        out["super_class"] = resolved
    if "is_extendable" in values and not values["is_extendable"] and cat.children.get(name):
        raise FieldError(
            TABLE_OBJECTS,
            "is_extendable",
            f"table {name} is extended by {', '.join(cat.children[name])}",
        )
    if "label" in values and not values["label"]:
        out["label"] = label_of(name)
    return out


def check_table_delete(cat: Catalog, record: Mapping[str, Any]) -> Table | None:
    """The table a ``sys_db_object`` record's deletion drops (None: not a live table)."""
    name = str(record["name"])
    if name in seed_keys()[0]:
        raise FieldError(TABLE_OBJECTS, "name", f"{name} is a built-in table: it cannot be deleted")
    table = cat.tables.get(name)
    if table is None:
        return None
    if cat.children.get(name):
        raise FieldError(
            TABLE_OBJECTS, "name", f"table {name} is extended by {', '.join(cat.children[name])}"
        )
    for other in cat.tables.values():
        for field_name in cat.own.get(other.name, ()):
            if other.fields[field_name].reference == name and other.name != name:
                raise FieldError(
                    TABLE_OBJECTS,
                    "name",
                    f"field {other.name}.{field_name} references table {name}",
                )
    return table


def _check_type_fields(values: dict[str, Any], cat: Catalog) -> FieldType:
    itype = values.get("internal_type") or "string"
    if itype not in USER_TYPES:
        raise FieldError(
            DICTIONARY,
            "internal_type",
            f"type {str(itype)[:60]!r} is not supported; one of {', '.join(sorted(USER_TYPES))}",
        )
    values["internal_type"] = itype
    ref = values.get("reference") or ""
    if itype == "reference":
        if not ref:
            raise FieldError(
                DICTIONARY, "reference", "a reference field names the table it refers to"
            )
        if ref not in cat.tables:
            raise FieldError(DICTIONARY, "reference", f"no table {str(ref)[:100]!r}")
    elif ref:
        raise FieldError(DICTIONARY, "reference", f"only a reference field names a table ({itype})")
    rule = str(values.get("reference_cascade_rule") or "").lower()
    if rule not in CASCADE_RULES:
        raise FieldError(
            DICTIONARY,
            "reference_cascade_rule",
            f"{rule[:40]!r} is not supported; one of none, clear, delete, cascade",
        )
    values["reference_cascade_rule"] = rule
    kind = TYPES[itype]
    try:
        parse_default(DICTIONARY, kind, str(values.get("default_value") or ""))
    except FieldError as exc:
        raise FieldError(
            DICTIONARY, "default_value", f"does not fit {itype}: {exc.message}"
        ) from None
    return kind


def check_new_field(cat: Catalog, values: Mapping[str, Any]) -> dict[str, Any]:
    """A new ``sys_dictionary`` record, checked and completed (label, max_length, type)."""
    out = dict(values)
    table = str(values.get("name") or "")
    if table not in cat.tables:
        raise FieldError(
            DICTIONARY, "name", f"no table {table[:100]!r}" if table else "a table name is required"
        )
    if table in META_TABLES:
        raise FieldError(DICTIONARY, "name", f"fields cannot be added to {table}")
    element = values.get("element")
    if element == "" or element is None:
        raise FieldError(
            DICTIONARY, "element", f"table {table} has its entry: create tables in {TABLE_OBJECTS}"
        )
    element = _check_name(DICTIONARY, "element", element, "column")
    if element in SYSTEM_FIELD_NAMES or element.startswith("sys_") or element in _RESERVED_COLUMNS:
        raise FieldError(DICTIONARY, "element", f"column name {element!r} is reserved")
    for other in cat.hierarchy(table):
        if element in other.fields:
            raise FieldError(
                DICTIONARY,
                "element",
                f"{other.name}.{element} exists (tables of one hierarchy share their columns)",
            )
    kind = _check_type_fields(out, cat)
    out["column_label"] = values.get("column_label") or label_of(element)
    if out.get("max_length") is None:
        out["max_length"] = 32 if out["internal_type"] == "reference" else 40
    if kind is FieldType.STRING and out.get("max_length", 0) <= 0:
        raise FieldError(DICTIONARY, "max_length", "must be positive")
    return out


def builtin_entry(record: Mapping[str, Any]) -> bool:
    """A seeded field, a system field, or a table's own entry: never changed by writers."""
    key = (str(record.get("name")), str(record.get("element")))
    return key in seed_keys()[1] or key[1] in SYSTEM_FIELD_NAMES or key[1] == ""


def check_field_update(
    cat: Catalog, previous: Mapping[str, Any], values: Mapping[str, Any]
) -> dict[str, Any]:
    """The changes an update may make to a user-made ``sys_dictionary`` record."""
    changed = _first_change(previous, values)
    if changed is None:
        return {}
    where = f"{previous['name']}.{previous['element']}"
    if builtin_entry(previous):
        what = "the table's own entry" if not previous["element"] else "a built-in field"
        raise FieldError(DICTIONARY, changed, f"{where} is {what}: it cannot be changed")
    for key in ("name", "element"):
        if key in values and values[key] != previous[key]:
            raise FieldError(DICTIONARY, key, f"{where}: a field cannot move or be renamed")
    merged = {**previous, **values}
    _check_type_fields(merged, cat)
    out = dict(values)
    for key in ("internal_type", "reference_cascade_rule"):
        if key in values:
            out[key] = merged[key]
    if "column_label" in values and not values["column_label"]:
        out["column_label"] = label_of(str(previous["element"]))
    return out


def check_field_delete(record: Mapping[str, Any]) -> None:
    if builtin_entry(record):
        where = f"{record['name']}.{record['element']}"
        what = "the table's own entry" if not record["element"] else "a built-in field"
        raise FieldError(DICTIONARY, "element", f"{where} is {what}: it cannot be deleted")


def field_of_entry(record: Mapping[str, Any]) -> Field:
    """The field a ``sys_dictionary`` record defines."""
    return _field_of(str(record["name"]), record)


# --- values the store derives ------------------------------------------------------------


DERIVED = frozenset({"ecc_agent", "sys_user"})


def derived(table: Table, previous: Record | None, values: Record) -> Record:
    """``values`` with what the store derives: on ``ecc_agent`` a new key clears
    ``validated``; on ``sys_user`` the full ``name`` follows first, middle and last name."""
    if table.name == "ecc_agent" and previous is not None:
        return _new_key_clears_validation(table, previous, values)
    if table.name == "sys_user":
        return _full_name(previous, values)
    return values


def _name_of(record: Mapping[str, Any]) -> str:
    parts = (record.get(p) for p in ("first_name", "middle_name", "last_name"))
    return " ".join(p for p in parts if isinstance(p, str) and p)


def _full_name(previous: Record | None, values: Record) -> Record:
    """sys_user.name: first (middle) last name unless a name is given, and kept in step
    with them unless it was a name of its own."""
    if previous is None:
        if not values.get("name"):
            values = {**values, "name": _name_of(values)}
        return values
    if "name" in values or not any(p in values for p in ("first_name", "middle_name", "last_name")):
        return values
    if previous.get("name") not in ("", _name_of(previous)):
        return values
    return {**values, "name": _name_of({**previous, **values})}


def _new_key_clears_validation(table: Table, previous: Record, values: Record) -> Record:
    """``values`` for an update of ``previous``: on ``ecc_agent``, a public key or
    fingerprint other than the stored one always sets ``validated`` false, whoever writes
    it (an approval is for one key; docs/security.md)."""
    if table.name != "ecc_agent":
        return values
    changed = any(
        name in values and values[name] != previous.get(name)
        for name in ("public_key", "fingerprint")
    )
    if not changed:
        return values
    if previous.get("validated"):
        log.info("ecc_agent %s: a new key; validated cleared", previous.get("name"))
    return {**values, "validated": False}


__all__ = [
    "AUTO_FLUSH",
    "CI_CLASSES",
    "DICTIONARY",
    "INITIAL_RECORDS",
    "META_TABLES",
    "SYSTEM_FIELDS",
    "TABLE_OBJECTS",
    "TYPES",
    "Catalog",
    "build",
    "builtin_catalog",
    "coerce",
    "entry_id",
    "record_id",
    "seed",
    "table_id",
]
