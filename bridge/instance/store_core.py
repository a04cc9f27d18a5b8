"""What both stores (``SQLiteStore``, ``PGStore``) do alike, apart from SQL and connections.

- :class:`BasePlan`: the part of a table's statement plan that does not depend on the
  engine (column names, booleans, defaults, strict references, reading a row back);
- :func:`prepare_insert` / :func:`prepare_update`: a write's fields checked and coerced,
  the system fields of a new record filled in;
- :func:`changed_fields` / :func:`written`: what an update changes, and the records as
  they are after it;
- :func:`aggregate_fields`, :func:`aggregate_columns`, :func:`aggregate_rows`: the
  Aggregate API's checks, its SELECT list and its answer;
- :class:`StoreCore`: the live schema (catalog, plans per table, cascades) and the
  listeners told of committed writes.
"""

from __future__ import annotations

import logging
import re
import time
import uuid
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any, Generic, TypeVar

from bridge.instance import schema
from bridge.instance.query import SQL, Dialect, QueryError, compile_query
from bridge.instance.schema import Catalog, coerce
from bridge.instance.store import (
    Aggregate,
    Change,
    FieldError,
    FieldType,
    InvalidFields,
    Listener,
    QueryContext,
    Record,
    Table,
    UnknownTable,
)

log = logging.getLogger("midbridge.instance.store")

SYS_ID = re.compile(r"[A-Za-z0-9_.:-]{1,64}")
NUMERIC = (FieldType.INTEGER, FieldType.REAL)
STATS = ("avg", "min", "max", "sum")


def now_text() -> str:
    """The current UTC time as ServiceNow writes it: ``YYYY-MM-DD HH:MM:SS``."""
    return time.strftime("%Y-%m-%d %H:%M:%S", time.gmtime())


def stored(value: Any) -> Any:
    """A value as a column holds it: booleans are integers 0/1."""
    return int(value) if isinstance(value, bool) else value


class BasePlan:
    """What the statements on one table need, worked out once per schema (the engine's
    ``Plan`` adds its SQL text)."""

    __slots__ = ("bools", "class_field", "defaults", "names", "physical", "strict_refs", "table")

    def __init__(self, table: Table) -> None:
        self.table = table
        self.names = tuple(table.fields)
        self.physical = table.physical
        self.bools = frozenset(n for n, f in table.fields.items() if f.type is FieldType.BOOLEAN)
        self.defaults = tuple(schema.stored_default(f) for f in table.fields.values())
        self.class_field = "sys_class_name" in table.fields
        self.strict_refs = tuple(
            (n, f.reference) for n, f in table.fields.items() if f.reference and f.cascade_delete
        )

    def record(self, row: Sequence[Any], skip: int = 0) -> Record:
        """The record of a row (its first ``skip`` columns are not fields)."""
        record = dict(zip(self.names, tuple(row)[skip:] if skip else row, strict=True))
        for name in self.bools:
            record[name] = bool(record[name])
        return record

    def full_row(self, values: Record) -> list[Any]:
        """Every column of the table, in order, as stored: ``values`` or the default."""
        return [
            stored(values.get(name, default))
            for name, default in zip(self.names, self.defaults, strict=True)
        ]


def _checked(table: Table, fields: Mapping[str, Any], read_only: Iterable[str]) -> Record:
    values: Record = {}
    for name, value in fields.items():
        spec = table.fields.get(name)
        if spec is None:
            raise FieldError(table.name, name, "no such field")
        if spec.read_only or name in read_only:
            raise FieldError(table.name, name, "read-only field")
        values[name] = coerce(table.name, spec, value)
    return values


def prepare_insert(plan: BasePlan, fields: Mapping[str, Any], now: str, actor: str) -> Record:
    """A new record's values: ``fields`` checked and coerced, the system fields set."""
    table = plan.table
    values = _checked(table, fields, ())
    sys_id = values.get("sys_id") or uuid.uuid4().hex
    if not isinstance(sys_id, str) or not SYS_ID.fullmatch(sys_id):
        raise FieldError(table.name, "sys_id", "must be 1-64 of A-Za-z0-9_.:-")
    values["sys_id"] = sys_id
    values["sys_created_on"] = values["sys_updated_on"] = now
    values["sys_created_by"] = values["sys_updated_by"] = actor
    values["sys_mod_count"] = 0
    if plan.class_field:
        cls = values.get("sys_class_name") or table.name
        if cls not in table.classes:
            raise FieldError(
                table.name, "sys_class_name", f"{cls!r} is not {table.name} or a table below it"
            )
        values["sys_class_name"] = cls
    return schema.derived(table, None, values)


def prepare_update(plan: BasePlan, root: Table, fields: Mapping[str, Any]) -> Record:
    """An update's values checked and coerced; ``root`` is the hierarchy's table."""
    table = plan.table
    values = _checked(table, fields, ("sys_id",))
    cls = values.get("sys_class_name")
    if cls is not None and cls not in root.classes:
        raise FieldError(
            table.name,
            "sys_class_name",
            f"{cls!r} is not a table of {plan.physical}'s hierarchy",
        )
    return values


def changed_fields(plan: BasePlan, values: Record, previous: Record) -> Record:
    """The ``values`` (as stored) that differ from the ``previous`` record."""
    return {
        n: v for n, v in values.items()
        if (bool(v) if n in plan.bools else v) != previous[n]
    }  # fmt: skip


def written(plan: BasePlan, values: Record, previous: Sequence[Record]) -> list[Record]:
    """The ``previous`` records once ``values`` (as stored) are written on them."""
    typed = {n: bool(v) if n in plan.bools else v for n, v in values.items()}
    return [
        {**before, **typed, "sys_mod_count": (before.get("sys_mod_count") or 0) + 1}
        for before in previous
    ]


def cascades_of(catalog: Catalog) -> dict[str, list[tuple[Table, str]]]:
    """Per physical table, the (table, field) references to it that delete with it."""
    cascades: dict[str, list[tuple[Table, str]]] = {}
    for table in catalog.tables.values():
        for name in catalog.own.get(table.name, ()):
            spec = table.fields[name]
            target = catalog.tables.get(spec.reference or "")
            if target is not None and spec.cascade_delete:
                cascades.setdefault(target.physical, []).append((table, name))
    return cascades


# --- the Aggregate API ----------------------------------------------------------------------


def aggregate_fields(
    table: Table,
    group_by: Sequence[str],
    stats: Mapping[str, Sequence[str]],
    hidden: Sequence[str],
    invalid: InvalidFields,
) -> tuple[list[str], list[tuple[str, str]]]:
    """The groups and (kind, field) statistics asked for. A field the table does not have
    (or ``hidden``) raises QueryError with ``invalid="error"``, else is left out; avg and
    sum take integer and decimal fields only."""

    def usable(names: Sequence[str], what: str) -> list[str]:
        out: list[str] = []
        for name in names:
            field = table.fields.get(name)
            if field is None or name in hidden:
                if invalid == "error":
                    problem = "unknown field" if field is None else "field that cannot be queried"
                    raise QueryError(f"{what}: {problem} {name!r} in table {table.name}")
                continue
            if what in ("avg", "sum") and field.type not in NUMERIC:
                raise QueryError(f"{what}: field {name!r} of table {table.name} is not a number")
            if name not in out:
                out.append(name)
        return out

    groups = usable(group_by, "group_by")
    return groups, [(kind, name) for kind in STATS for name in usable(stats[kind], kind)]


def aggregate_columns(
    table: Table, groups: Sequence[str], count: bool, stats: Sequence[tuple[str, str]]
) -> tuple[list[str], bool]:
    """The SELECT list, and whether it is only a placeholder COUNT(*) (nothing asked: still
    one row per group)."""
    exprs = [f'"{g}"' for g in groups]
    if count:
        exprs.append("COUNT(*)")
    for kind, name in stats:
        col = f'"{name}"'
        if kind in ("min", "max") and table.fields[name].type.is_text:
            col = f"NULLIF({col}, '')"  # empty is no value (NULL in ServiceNow)
        exprs.append(f"{kind.upper()}({col})")
    return exprs or ["COUNT(*)"], not exprs


def aggregate_rows(
    plan: BasePlan,
    rows: Iterable[Sequence[Any]],
    groups: Sequence[str],
    count: bool,
    placeholder: bool,
    stats: Sequence[tuple[str, str]],
) -> list[Aggregate]:
    """One ``Aggregate`` per row of the GROUP BY."""
    out = []
    for record in rows:
        row = tuple(record)
        group = {
            g: bool(v) if g in plan.bools and v is not None else v
            for g, v in zip(groups, row, strict=False)
        }
        rest = list(row[len(groups) :])
        counted: Any = rest.pop(0) if count or placeholder else None
        number = int(counted) if count else None
        result: dict[str, dict[str, Any]] = {kind: {} for kind in STATS}
        for (kind, name), value in zip(stats, rest, strict=True):
            if kind in ("avg", "sum") and value is not None:
                value = float(value)
            elif name in plan.bools and value is not None:
                value = bool(value)
            result[kind][name] = value
        out.append(Aggregate(group, number, **result))
    return out


# --- the live schema and the listeners --------------------------------------------------------

P = TypeVar("P", bound=BasePlan)


class StoreCore(Generic[P]):
    """The schema a store serves (rebuilt from the records when they change), its plans
    per table, and the listeners told of each committed write, in commit order."""

    def __init__(self, make_plan: Callable[[Table], P], dialect: Dialect) -> None:
        self._make_plan = make_plan
        self._dialect: Dialect = dialect
        self._listeners: list[Listener] = []
        self._catalog = schema.builtin_catalog()  # until open: the built-in tables
        self._plans: dict[str, P] = {}
        self._cascades: dict[str, list[tuple[Table, str]]] = {}
        self._publish(self._catalog)

    @property
    def schema(self) -> Mapping[str, Table]:
        return self._catalog.tables

    @property
    def catalog(self) -> Catalog:
        """The schema with the ``sys_db_object`` sys_ids behind it."""
        return self._catalog

    def table(self, name: str) -> Table:
        table = self._catalog.tables.get(name)
        if table is None:
            raise UnknownTable(name)
        return table

    def _publish(self, catalog: Catalog) -> None:
        """Make ``catalog`` the live schema (after the transaction that made it committed)."""
        cascades = cascades_of(catalog)
        self._catalog = catalog
        self._plans = {}
        self._cascades = cascades

    def _plan(self, table: Table) -> P:
        plan = self._plans.get(table.name)
        if plan is None or plan.table is not table:
            plan = self._make_plan(table)
            if self._catalog.tables.get(table.name) is table:
                self._plans[table.name] = plan
        return plan

    def _compile(
        self,
        query: str,
        table: Table,
        hidden: Sequence[str] = (),
        invalid: InvalidFields = "error",
        context: QueryContext | None = None,
    ) -> SQL:
        return compile_query(
            query,
            table,
            hidden=hidden,
            schema=self._catalog.tables,
            invalid=invalid,
            context=context,
            dialect=self._dialect,
        )

    def _prepare_update(self, plan: P, fields: Mapping[str, Any]) -> Record:
        return prepare_update(plan, self.table(plan.physical), fields)

    async def aggregate(
        self,
        table: str,
        encoded_query: str = "",
        *,
        group_by: Sequence[str] = (),
        count: bool = True,
        avg_fields: Sequence[str] = (),
        min_fields: Sequence[str] = (),
        max_fields: Sequence[str] = (),
        sum_fields: Sequence[str] = (),
        hidden: Sequence[str] = (),
        invalid: InvalidFields = "error",
        context: QueryContext | None = None,
    ) -> list[Aggregate]:
        """SQL GROUP BY over the records matching (``aggregate_fields`` checks the fields);
        the engine's ``_grouped`` runs it."""
        spec = self.table(table)
        sql = self._compile(encoded_query, spec, hidden, invalid, context)
        asked = {"avg": avg_fields, "min": min_fields, "max": max_fields, "sum": sum_fields}
        groups, stats = aggregate_fields(spec, group_by, asked, hidden, invalid)
        return await self._grouped(self._plan(spec), sql, groups, count, stats)

    async def _grouped(
        self, plan: P, sql: SQL, groups: list[str], count: bool, stats: list[tuple[str, str]]
    ) -> list[Aggregate]:
        """The engine's GROUP BY (``aggregate_columns``, then ``aggregate_rows``)."""
        raise NotImplementedError

    def add_listener(self, listener: Listener) -> Callable[[], None]:
        self._listeners.append(listener)

        def remove() -> None:
            if listener in self._listeners:
                self._listeners.remove(listener)

        return remove

    def _tell(self, changes: Sequence[Change]) -> None:
        for change in changes:
            for listener in list(self._listeners):
                try:
                    listener(change)
                except Exception:
                    log.exception("store listener %r failed on %s", listener, change.op)
