"""ServiceNow encoded queries: parse into an AST, compile to parameterised SQLite SQL.

An encoded query is terms joined by ``^``::

    agent=mid.server.dc1^queue=output^state=ready^ORDERBYpriority^ORDERBYsys_created_on

- ``^`` is AND; a term starting ``OR`` is OR-ed with the condition before it (OR binds
  tighter than AND, as in ServiceNow: ``a=1^ORb=2^c=3`` is ``(a=1 OR b=2) AND c=3``); a term
  starting ``NQ`` starts a new query OR-ed with the previous ones.
- ``ORDERBYfield`` / ``ORDERBYDESCfield`` sort (several allowed, in order); ``EQ`` (which
  ServiceNow appends) and empty terms are ignored.
- A caret inside a value is written ``^^``.
- Operators: ``=``, ``!=``, ``<``, ``<=``, ``>``, ``>=``, ``IN`` and ``NOT IN`` (comma list),
  ``STARTSWITH``, ``ENDSWITH``, ``LIKE`` (contains), ``NOT LIKE``, ``ISEMPTY``,
  ``ISNOTEMPTY``. ``=``/``!=``/``IN`` compare exactly; the ``LIKE`` family ignores ASCII
  case. ``!=`` and ``NOT IN`` also match empty values, as ServiceNow's do.

Field names are checked against the table (``bridge.instance.store.TABLES``) and values
against the field's type; every fault raises ``QueryError`` naming it. Values only ever
reach SQL as bound parameters; field names only after they matched the table's columns.
"""

from __future__ import annotations

import re
from collections.abc import Collection
from dataclasses import dataclass
from typing import Any

from bridge.instance.store import FieldType, Table

MAX_QUERY_CHARS = 32_768
MAX_IN_VALUES = 1_000
MAX_TERMS = 100  # conditions and ORDERBY terms in a client's query (the Table API's bound)
# Any query the store compiles: a client's plus what access rules AND into each branch.
# SQLite refuses expression trees deeper than 1,000; this keeps far below that.
MAX_COMPILED_TERMS = 4 * MAX_TERMS


class QueryError(ValueError):
    """An encoded query that cannot be parsed or does not fit the table."""

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message


@dataclass(frozen=True, slots=True)
class Condition:
    field: str
    op: str
    value: str | tuple[str, ...] = ""  # a tuple for IN / NOT IN


@dataclass(frozen=True, slots=True)
class OrderBy:
    field: str
    descending: bool = False


Disjunction = tuple[Condition, ...]  # conditions joined by ^OR
Conjunction = tuple[Disjunction, ...]  # groups joined by ^


@dataclass(frozen=True, slots=True)
class Query:
    branches: tuple[Conjunction, ...] = ()  # joined by ^NQ; () matches everything
    order_by: tuple[OrderBy, ...] = ()

    def fields(self) -> list[str]:
        names = [c.field for conj in self.branches for disj in conj for c in disj]
        return names + [o.field for o in self.order_by]


@dataclass(frozen=True, slots=True)
class SQL:
    where: str  # "" or a boolean SQL expression
    params: tuple[Any, ...]
    order_by: str  # "" or "ORDER BY ..."


# Longest first, so "ISNOTEMPTY" wins over "IN" and "<=" over "<".
OPERATORS = (
    "ISNOTEMPTY",
    "ISEMPTY",
    "STARTSWITH",
    "ENDSWITH",
    "NOT LIKE",
    "NOT IN",
    "LIKE",
    "IN",
    "!=",
    "<=",
    ">=",
    "=",
    "<",
    ">",
)
_NO_VALUE = frozenset({"ISEMPTY", "ISNOTEMPTY"})
_LIST = frozenset({"IN", "NOT IN"})
_TEXT_ONLY = frozenset({"STARTSWITH", "ENDSWITH", "LIKE", "NOT LIKE"})
_ORDERED = frozenset({"<", "<=", ">", ">="})
_FIELD = re.compile(r"[a-z_][a-z0-9_]*")


def escape(value: str) -> str:
    """A value made safe to put in an encoded query term (``^`` doubled)."""
    return value.replace("^", "^^")


def _split(text: str) -> list[str]:
    terms: list[str] = []
    current: list[str] = []
    i = 0
    while i < len(text):
        ch = text[i]
        if ch == "^":
            if text.startswith("^^", i):
                current.append("^")
                i += 2
                continue
            terms.append("".join(current))
            current = []
        else:
            current.append(ch)
        i += 1
    terms.append("".join(current))
    return terms


def _shown(term: str) -> str:
    return term if len(term) <= 80 else term[:77] + "..."


def _condition(term: str) -> Condition:
    match = _FIELD.match(term)
    if match is None:
        raise QueryError(
            f"term {_shown(term)!r}: expected a field name (lowercase letters, digits, _)"
        )
    name = match.group()
    rest = term[match.end() :]
    if not rest:
        raise QueryError(f"term {_shown(term)!r}: no operator after field {name!r}")
    for op in OPERATORS:
        if rest.startswith(op):
            value = rest[len(op) :]
            break
    else:
        raise QueryError(
            f"term {_shown(term)!r}: unknown operator {_shown(rest)!r} after field {name!r}"
        )
    if op in _NO_VALUE:
        if value:
            raise QueryError(f"term {_shown(term)!r}: {op} takes no value")
        return Condition(name, op)
    if op in _LIST:
        values = tuple(value.split(","))
        if value == "":
            raise QueryError(f"term {_shown(term)!r}: {op} needs a comma-separated list")
        if len(values) > MAX_IN_VALUES:
            raise QueryError(f"term for {name!r}: {op} takes at most {MAX_IN_VALUES} values")
        return Condition(name, op, values)
    return Condition(name, op, value)


def _order(term: str, prefix: str) -> OrderBy:
    name = term[len(prefix) :]
    if not _FIELD.fullmatch(name):
        raise QueryError(f"term {_shown(term)!r}: expected a field name after {prefix}")
    return OrderBy(name, descending=prefix == "ORDERBYDESC")


def parse(text: str, *, max_terms: int = MAX_COMPILED_TERMS) -> Query:
    """The AST of an encoded query; syntax only (see ``compile_query`` for the fields).

    At most ``max_terms`` conditions and ORDERBY terms (``EQ`` and empty terms not counted).
    """
    if len(text) > MAX_QUERY_CHARS:
        raise QueryError(f"query is longer than {MAX_QUERY_CHARS} characters")
    branches: list[list[list[Condition]]] = []
    current: list[list[Condition]] = []
    order: list[OrderBy] = []
    counted = 0
    for term in _split(text):
        if term in ("", "EQ"):
            continue
        counted += 1
        if counted > max_terms:
            raise QueryError(f"query has more than {max_terms} terms")
        if term.startswith("ORDERBYDESC"):
            order.append(_order(term, "ORDERBYDESC"))
        elif term.startswith("ORDERBY"):
            order.append(_order(term, "ORDERBY"))
        elif term.startswith("NQ"):
            if not current:
                raise QueryError(f"term {_shown(term)!r}: NQ with no query before it")
            branches.append(current)
            current = [[_condition(term[2:])]]
        elif term.startswith("OR"):
            if not current:
                raise QueryError(f"term {_shown(term)!r}: OR with no condition before it")
            current[-1].append(_condition(term[2:]))
        else:
            current.append([_condition(term)])
    if current:
        branches.append(current)
    return Query(
        tuple(tuple(tuple(disj) for disj in conj) for conj in branches),
        tuple(order),
    )


def _column(table: Table, name: str, hidden: Collection[str]) -> FieldType:
    spec = table.fields.get(name)
    if spec is None:
        raise QueryError(f"unknown field {name!r} in table {table.name}")
    if name in hidden:
        raise QueryError(f"field {name!r} of table {table.name} cannot be queried")
    return spec.type


def _value(table: Table, name: str, kind: FieldType, raw: str) -> Any:
    if raw == "" and kind is not FieldType.STRING:
        return None
    if kind is FieldType.INTEGER:
        try:
            return int(raw)
        except ValueError:
            raise QueryError(f"field {name!r}: {raw!r} is not an integer") from None
    if kind is FieldType.REAL:
        try:
            return float(raw)
        except ValueError:
            raise QueryError(f"field {name!r}: {raw!r} is not a number") from None
    if kind is FieldType.BOOLEAN:
        lowered = raw.lower()
        if lowered in ("true", "1"):
            return 1
        if lowered in ("false", "0"):
            return 0
        raise QueryError(f"field {name!r}: {raw!r} is not true or false")
    return raw


def _like(value: str) -> str:
    return value.replace("\\", "\\\\").replace("%", "\\%").replace("_", "\\_")


def _compile_condition(
    table: Table, cond: Condition, hidden: Collection[str], params: list[Any]
) -> str:
    kind = _column(table, cond.field, hidden)
    col = f'"{cond.field}"'  # safe: the name matched one of the table's fields
    op = cond.op
    if op == "ISEMPTY":
        return f"({col} IS NULL OR {col} = '')"
    if op == "ISNOTEMPTY":
        return f"({col} IS NOT NULL AND {col} != '')"
    if op in _LIST:
        assert isinstance(cond.value, tuple)
        values = [_value(table, cond.field, kind, v) for v in cond.value]
        present = [v for v in values if v is not None]
        marks = ", ".join("?" * len(present))
        params.extend(present)
        has_null = len(present) != len(values)
        if op == "IN":
            inside = f"{col} IN ({marks})" if present else "0"
            return f"({inside} OR {col} IS NULL)" if has_null else inside
        outside = f"{col} NOT IN ({marks})" if present else "1"
        return f"({outside} AND {col} IS NOT NULL)" if has_null else f"({col} IS NULL OR {outside})"
    assert isinstance(cond.value, str)
    if op in _TEXT_ONLY:
        if kind is not FieldType.STRING:
            raise QueryError(f"operator {op} does not apply to {kind} field {cond.field!r}")
        pattern = _like(cond.value)
        if op == "STARTSWITH":
            pattern = pattern + "%"
        elif op == "ENDSWITH":
            pattern = "%" + pattern
        else:
            pattern = "%" + pattern + "%"
        params.append(pattern)
        negate = "NOT " if op == "NOT LIKE" else ""
        return f"{col} {negate}LIKE ? ESCAPE '\\'"
    value = _value(table, cond.field, kind, cond.value)
    if op == "=":
        if value is None:
            return f"{col} IS NULL"
        params.append(value)
        return f"{col} = ?"
    if op == "!=":
        params.append(value)
        return f"{col} IS NOT ?"
    assert op in _ORDERED
    if value is None:
        raise QueryError(f"operator {op} on field {cond.field!r} needs a value")
    params.append(value)
    return f"{col} {op} ?"


def compile_query(query: Query | str, table: Table, *, hidden: Collection[str] = ()) -> SQL:
    """Parameterised SQL for ``query`` on ``table``; ``hidden`` fields may not appear."""
    if isinstance(query, str):
        query = parse(query)
    params: list[Any] = []
    branches: list[str] = []
    for conj in query.branches:
        groups: list[str] = []
        for disj in conj:
            parts = [_compile_condition(table, c, hidden, params) for c in disj]
            groups.append(parts[0] if len(parts) == 1 else "(" + " OR ".join(parts) + ")")
        branches.append(" AND ".join(groups))
    if not branches:
        where = ""
    elif len(branches) == 1:
        where = branches[0]
    else:
        where = " OR ".join(f"({b})" for b in branches)
    keys: list[str] = []
    for order in query.order_by:
        _column(table, order.field, hidden)
        keys.append(f'"{order.field}" {"DESC" if order.descending else "ASC"}')
    keys.append("rowid ASC")  # a stable order: ties (and no ORDERBY) in insertion order
    return SQL(where, tuple(params), "ORDER BY " + ", ".join(keys))
