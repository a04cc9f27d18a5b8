"""ServiceNow encoded queries: parse into an AST, compile to parameterised SQLite SQL.

An encoded query is terms joined by ``^``::

    agent=mid.server.dc1^queue=output^state=ready^ORDERBYpriority^ORDERBYsys_created_on

- ``^`` is AND; a term starting ``OR`` is OR-ed with the condition before it (OR binds
  tighter than AND, as in ServiceNow: ``a=1^ORb=2^c=3`` is ``(a=1 OR b=2) AND c=3``); a term
  starting ``NQ`` starts a new query OR-ed with the previous ones.
- ``ORDERBYfield`` / ``ORDERBYDESCfield`` sort (several allowed, in order); ``EQ`` (which
  ServiceNow appends) and empty terms are ignored. A caret inside a value is written ``^^``.
- A field is a name or a dot-walk through reference fields (``user.user_name``, at most
  ``MAX_DOT_WALK`` references): the referenced record's field, empty when there is none.
- Operators (ServiceNow's "Operators available for filters and queries"): ``=``, ``!=``,
  ``<``, ``<=``, ``>``, ``>=``, ``IN`` / ``NOT IN`` (comma list), ``STARTSWITH``,
  ``ENDSWITH``, ``LIKE`` (contains), ``NOT LIKE`` (also ``NOTLIKE``; GlideRecord's
  ``CONTAINS`` / ``DOES NOT CONTAIN`` are the same two), ``ISEMPTY`` / ``ISNOTEMPTY`` (also
  ``EMPTY`` / ``NOTEMPTY``), ``ANYTHING``, ``EMPTYSTRING``, ``BETWEENlow@high`` (inclusive),
  ``ONlabel@start@end`` / ``NOTON...`` (or a single date: that day), ``RELATIVEGT`` /
  ``LT`` / ``GE`` / ``LE`` / ``EE`` ``@unit@ago|ahead@n``, ``DATEPARTlabel@javascript:
  gs.datePart('part','value','op')``, ``SAMEAS`` / ``NSAMEAS`` / ``GT_FIELD`` / ``LT_FIELD``
  / ``GT_OR_EQUALS_FIELD`` / ``LT_OR_EQUALS_FIELD`` (another field; ``SAMEAS`` of date-times
  may end ``@day`` etc.), ``INSTANCEOF`` (on ``sys_class_name``: the class and those below
  it). ``=``/``!=``/``IN`` compare exactly; the ``LIKE`` family ignores ASCII case;
  ``!=``, ``NOT IN``, ``NOTON`` and ``NSAMEAS`` also match empty values. Operators
  ServiceNow has that this instance does not (``UNSUPPORTED``) raise QueryError naming them.
- ``javascript:gs.<helper>(...)`` values are evaluated (``bridge.instance.glide_dates``)
  when a ``QueryContext`` is given; any other ``javascript:`` value raises QueryError. Without
  a context (the store's own callers, whose values may be data) they are plain text.

Field names are checked against the table and values against the field's type; every
fault raises ``QueryError`` naming it. Values only ever reach SQL as bound parameters;
field and table names only after they matched the schema.
"""

from __future__ import annotations

import re
import time
from collections.abc import Collection, Mapping
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any, Literal

from bridge.instance import glide_dates
from bridge.instance.store import TABLES, FieldType, Table
from bridge.instance.store import InvalidFields as InvalidFields
from bridge.instance.store import QueryContext as QueryContext

MAX_QUERY_CHARS = 32_768
MAX_IN_VALUES = 1_000
MAX_TERMS = 100  # conditions and ORDERBY terms in a client's query (the Table API's bound)
# Any query the store compiles: a client's plus what access rules AND into each branch.
# SQLite refuses expression trees deeper than 1,000; this keeps far below that.
MAX_COMPILED_TERMS = 4 * MAX_TERMS
MAX_DOT_WALK = 5  # references one field path may follow (a.b.c.d.e.f: five)


class QueryError(ValueError):
    """An encoded query that cannot be parsed or does not fit the table."""

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message


class InvalidField(QueryError):
    """A term names a field the table does not have or that may not be queried (what
    ``invalid`` decides about)."""


@dataclass(frozen=True, slots=True)
class Condition:
    field: str
    op: str
    # A tuple for IN / NOT IN (the values), BETWEEN (low, high), ON / NOTON ((start, end)
    # or (date,)), RELATIVE* (unit, ago|ahead, n), DATEPART (part, value, op) and the
    # field comparisons ((field,) or (field, unit)).
    value: str | tuple[str, ...] = ""


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
    """``where`` and ``order_by`` read the table's storage as ``FROM "<table.physical>"``
    with no alias (dot-walks are subqueries correlated to it); every parameter belongs to
    ``where`` (``order_by`` has none). The class restriction of an extended table itself
    is the caller's (referenced tables' are in the subqueries)."""

    where: str  # "" or a boolean SQL expression
    params: tuple[Any, ...]
    order_by: str  # "" or "ORDER BY ..."


_ALIASES = {
    "NOTLIKE": "NOT LIKE",
    "CONTAINS": "LIKE",
    "DOES NOT CONTAIN": "NOT LIKE",
    "EMPTY": "ISEMPTY",
    "NOTEMPTY": "ISNOTEMPTY",
}
_NO_VALUE = frozenset({"ISEMPTY", "ISNOTEMPTY", "ANYTHING", "EMPTYSTRING"})
_LIST = frozenset({"IN", "NOT IN"})
_TEXT_ONLY = frozenset({"STARTSWITH", "ENDSWITH", "LIKE", "NOT LIKE"})
_ORDERED = frozenset({"<", "<=", ">", ">="})
_RELATIVE = {"RELATIVEGT": ">", "RELATIVELT": "<", "RELATIVEGE": ">=", "RELATIVELE": "<="}
_FIELD_COMPARE = {
    "SAMEAS": "=",
    "NSAMEAS": "IS NOT",
    "GT_FIELD": ">",
    "LT_FIELD": "<",
    "GT_OR_EQUALS_FIELD": ">=",
    "LT_OR_EQUALS_FIELD": "<=",
}
_DATES = frozenset({"ON", "NOTON", "RELATIVEEE", "DATEPART", *_RELATIVE})
_SUPPORTED = frozenset(
    {
        *_NO_VALUE,
        *_LIST,
        *_TEXT_ONLY,
        *_ORDERED,
        *_DATES,
        *_FIELD_COMPARE,
        "=",
        "!=",
        "BETWEEN",
        "INSTANCEOF",
    }
)
UNSUPPORTED: Mapping[str, str] = {  # ServiceNow operators this instance does not evaluate
    "DYNAMIC": "dynamic filter options",
    "IN_HIERARCHY": "record hierarchies",
    "IN_HIERARCHY_DYNAMIC": "record hierarchies",
    "VALCHANGES": "change detection (business rules and notifications only)",
    "CHANGESFROM": "change detection (business rules and notifications only)",
    "CHANGESTO": "change detection (business rules and notifications only)",
    "MORETHAN": "date differences between two fields",
    "LESSTHAN": "date differences between two fields",
}
_TERM_KEYWORDS = {  # terms (not conditions) ServiceNow has and this instance does not
    "RLQUERY": "related list queries (RLQUERY)",
    "ENDRLQUERY": "related list queries (RLQUERY)",
    "SUBQUERY": "subqueries (SUBQUERY)",
    "ENDSUBQUERY": "subqueries (SUBQUERY)",
    "JOINQUERY": "join queries (JOINQUERY)",
    "123TEXTQUERY321": "text search (123TEXTQUERY321)",
    "IR_AND_OR_QUERY": "text search (IR_AND_OR_QUERY)",
    "IR_OR_QUERY": "text search (IR_OR_QUERY)",
    "GOTO": "GOTO terms",
}
# Longest first, so "ISNOTEMPTY" wins over "IN" and "<=" over "<".
OPERATORS = tuple(sorted({*_SUPPORTED, *_ALIASES, *UNSUPPORTED}, key=lambda o: (-len(o), o)))

_NAME = r"[a-z_][a-z0-9_]*"
_FIELD = re.compile(rf"{_NAME}(?:\.{_NAME})*")
_OTHER_FIELD = re.compile(rf"({_NAME}(?:\.{_NAME})*)(?:@([a-z]+))?")
_IDENTIFIER = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")
_RELATIVE_UNITS = {  # RELATIVE*'s units; the condition builder writes days as dayofweek
    "minute": "minute",
    "hour": "hour",
    "day": "day",
    "dayofweek": "day",
    "week": "week",
    "month": "month",
    "quarter": "quarter",
    "year": "year",
}
_SAME_UNITS = {"year": 4, "month": 7, "day": 10, "hour": 13, "minute": 16, "second": 19}
_DAYS = ("sunday", "monday", "tuesday", "wednesday", "thursday", "friday", "saturday")
_MONTHS = (
    "january",
    "february",
    "march",
    "april",
    "may",
    "june",
    "july",
    "august",
    "september",
    "october",
    "november",
    "december",
)
_DATE_PARTS = {  # DATEPART's parts: (SQL of the part, its range, its names)
    "dayofweek": ("CAST(strftime('%w', {c}) AS INTEGER) + 1", (1, 7), _DAYS),
    "month": ("CAST(strftime('%m', {c}) AS INTEGER)", (1, 12), _MONTHS),
    "quarter": ("(CAST(strftime('%m', {c}) AS INTEGER) + 2) / 3", (1, 4), ()),
    "year": ("CAST(strftime('%Y', {c}) AS INTEGER)", (1, 9999), ()),
    "hour": ("CAST(strftime('%H', {c}) AS INTEGER)", (0, 23), ()),
}
_PG_TIME = "CAST({c} AS TIMESTAMP)"
_PG_DATE_PARTS = {  # the same parts in PostgreSQL (EXTRACT gives numeric: made integers)
    "dayofweek": f"CAST(EXTRACT(DOW FROM {_PG_TIME}) AS INTEGER) + 1",
    "month": f"CAST(EXTRACT(MONTH FROM {_PG_TIME}) AS INTEGER)",
    "quarter": f"(CAST(EXTRACT(MONTH FROM {_PG_TIME}) AS INTEGER) + 2) / 3",
    "year": f"CAST(EXTRACT(YEAR FROM {_PG_TIME}) AS INTEGER)",
    "hour": f"CAST(EXTRACT(HOUR FROM {_PG_TIME}) AS INTEGER)",
}
Dialect = Literal["sqlite", "postgresql"]
"""The SQL compile_query writes: SQLite's (``?`` parameters, ``rowid`` order) or
PostgreSQL's (``$n`` parameters, ``IS DISTINCT FROM``, ``ILIKE``, ``TRUE``/``FALSE``,
``EXTRACT``, and a ``"sys_row"`` column, a BIGSERIAL every table has, as the row order)."""
_DATE_PART_OPS = {"EE": "=", "GT": ">", "GE": ">=", "LT": "<", "LE": "<="}
_EDGES = (glide_dates.start_of, glide_dates.end_of)


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


def _path(term: str, name: str) -> str:
    if name.count(".") > MAX_DOT_WALK:
        raise QueryError(
            f"term {_shown(term)!r}: {name!r} follows more than {MAX_DOT_WALK} references"
        )
    return name


def _condition(term: str) -> Condition:
    match = _FIELD.match(term)
    if match is None:
        raise QueryError(
            f"term {_shown(term)!r}: expected a field name (lowercase letters, digits, _)"
        )
    name = _path(term, match.group())
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
    if op in UNSUPPORTED:
        raise QueryError(
            f"term {_shown(term)!r}: operator {op} ({UNSUPPORTED[op]}) is not supported"
        )
    op = _ALIASES.get(op, op)
    return Condition(name, op, _operand(term, name, op, value))


def _operand(term: str, name: str, op: str, value: str) -> str | tuple[str, ...]:
    """The syntax of ``op``'s value (see ``Condition.value``)."""
    shown = _shown(term)
    if op in _NO_VALUE:
        if value:
            raise QueryError(f"term {shown!r}: {op} takes no value")
        return ""
    if op in _LIST:
        values = tuple(value.split(","))
        if value == "":
            raise QueryError(f"term {shown!r}: {op} needs a comma-separated list")
        if len(values) > MAX_IN_VALUES:
            raise QueryError(f"term for {name!r}: {op} takes at most {MAX_IN_VALUES} values")
        return values
    if op == "BETWEEN":
        bounds = tuple(value.split("@"))
        if len(bounds) != 2 or not all(bounds):
            raise QueryError(f"term {shown!r}: BETWEEN needs low@high")
        return bounds
    if op in ("ON", "NOTON"):
        parts = value.split("@")
        if len(parts) == 3 and parts[1] and parts[2]:
            return (parts[1], parts[2])  # the label (parts[0]) is for people
        if len(parts) == 1 and value:
            return (value,)
        raise QueryError(f"term {shown!r}: {op} needs label@start@end or a date")
    if op in _RELATIVE or op == "RELATIVEEE":
        parts = value.removeprefix("@").split("@")
        if (
            len(parts) != 3
            or parts[0] not in _RELATIVE_UNITS
            or parts[1] not in ("ago", "ahead")
            or not re.fullmatch(r"\d{1,6}", parts[2])
        ):
            raise QueryError(
                f"term {shown!r}: {op} needs @unit@ago|ahead@n (unit: "
                + ", ".join(_RELATIVE_UNITS)
                + "; n: 1 to 6 digits)"
            )
        return (_RELATIVE_UNITS[parts[0]], parts[1], parts[2])
    if op == "DATEPART":
        return _date_part(shown, value)
    if op in _FIELD_COMPARE:
        other = _OTHER_FIELD.fullmatch(value)
        if other is None:
            raise QueryError(f"term {shown!r}: {op} needs another field's name")
        unit = other.group(2)
        if unit is not None and unit not in _SAME_UNITS:
            raise QueryError(
                f"term {shown!r}: {op} unit {unit!r} is not one of " + ", ".join(_SAME_UNITS)
            )
        path = _path(term, other.group(1))
        return (path,) if unit is None else (path, unit)
    if op == "INSTANCEOF" and not _IDENTIFIER.fullmatch(value):
        raise QueryError(f"term {shown!r}: INSTANCEOF needs a table name")
    return value


def _date_part(shown: str, value: str) -> tuple[str, ...]:
    _label, _, script = value.partition("@")  # the label is for people
    try:
        name, args = glide_dates.call(script)
    except glide_dates.ScriptError as exc:
        raise QueryError(f"term {shown!r}: DATEPART value {script!r}: {exc.message}") from None
    if name != "datePart" or len(args) != 3 or not all(isinstance(a, str) for a in args):
        raise QueryError(
            f"term {shown!r}: DATEPART needs label@javascript:gs.datePart('part','value','op')"
        )
    part, which, how = (str(a).lower() for a in args)
    if part not in _DATE_PARTS:
        raise QueryError(
            f"term {shown!r}: DATEPART part {part!r} is not one of {list(_DATE_PARTS)}"
        )
    if how.upper() not in _DATE_PART_OPS:
        raise QueryError(f"term {shown!r}: DATEPART comparison {how!r} is not EE, GT, GE, LT or LE")
    _, (low, high), names = _DATE_PARTS[part]
    number = names.index(which) + 1 if which in names else None
    if number is None and re.fullmatch(r"\d{1,4}", which):
        number = int(which)
    if number is None or not low <= number <= high:
        raise QueryError(f"term {shown!r}: DATEPART {part} value {which!r} is not valid")
    return (part, str(number), how.upper())


def _order(term: str, prefix: str) -> OrderBy:
    name = term[len(prefix) :]
    if not _FIELD.fullmatch(name):
        raise QueryError(f"term {_shown(term)!r}: expected a field name after {prefix}")
    return OrderBy(_path(term, name), descending=prefix == "ORDERBYDESC")


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
        for keyword, what in _TERM_KEYWORDS.items():
            if term.startswith(keyword):
                raise QueryError(f"term {_shown(term)!r}: {what} are not supported")
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


# --- compiling ------------------------------------------------------------------------------


def _quoted(name: str, quote: str = '"') -> str:
    """A schema name as an SQL identifier (or, ``quote="'"``, a string literal); names that
    could need escaping are refused."""
    if not _IDENTIFIER.fullmatch(name):
        raise QueryError(f"name {name!r} cannot be used in a query")
    return f"{quote}{name}{quote}"


@dataclass(frozen=True, slots=True)
class _Column:
    sql: str  # an SQL expression of the value; never has parameters
    kind: FieldType
    path: str  # as the query wrote it
    name: str  # the field's own name (the last part of the path)


class _Compiler:
    def __init__(
        self,
        table: Table,
        hidden: Collection[str],
        schema: Mapping[str, Table],
        context: QueryContext | None,
        dialect: Dialect = "sqlite",
    ) -> None:
        self.pg = dialect == "postgresql"
        self.true, self.false = ("TRUE", "FALSE") if self.pg else ("1", "0")
        self.table = table
        self.hidden = frozenset(hidden)
        self.schema = schema
        self.context = context
        self.now = time.time() if context is None or context.now is None else context.now
        self.aliases = 0

    def _hidden(self, table: Table) -> frozenset[str]:
        """Fields of a table reached by dot-walking that may not be used."""
        hidden = frozenset(name for name, spec in table.fields.items() if spec.write_only)
        return hidden | self.hidden if table.name == self.table.name else hidden

    def column(self, path: str) -> _Column:
        """The value of ``path`` (a field, or a dot-walk through reference fields)."""
        names = path.split(".")
        table, hidden = self.table, self.hidden
        within = f" (in {path!r})" if len(names) > 1 else ""
        sql = ""
        for i, name in enumerate(names):
            spec = table.fields.get(name)
            if spec is None:
                raise InvalidField(f"unknown field {name!r} in table {table.name}{within}")
            if name in hidden:
                raise InvalidField(f"field {name!r} of table {table.name} cannot be queried")
            if i == 0:
                sql = _quoted(name)
                if len(names) > 1:  # correlated to the row the outer statement reads
                    sql = f"{_quoted(table.physical)}.{sql}"
            else:
                self.aliases += 1
                alias = f"_w{self.aliases}"
                restriction = ""
                if table.extended:
                    classes = ", ".join(_quoted(c, "'") for c in table.classes)
                    restriction = f' AND {alias}."sys_class_name" IN ({classes})'
                sql = (
                    f"(SELECT {alias}.{_quoted(name)} FROM {_quoted(table.physical)} AS {alias}"
                    f' WHERE {alias}."sys_id" = {sql}{restriction})'
                )
            if i == len(names) - 1:
                if i and spec.type.is_text:  # no referenced record: an empty value
                    sql = f"COALESCE({sql}, '')"
                return _Column(sql, spec.type, path, name)
            target = self.schema.get(spec.reference) if spec.reference else None
            if target is None:
                what = "is not a reference" if not spec.reference else "refers to an unknown table"
                raise InvalidField(f"field {name!r} of table {table.name} {what}{within}")
            table, hidden = target, self._hidden(target)
        raise AssertionError("unreachable")

    def script(self, col: _Column, raw: str) -> str:
        """``raw``, a ``javascript:`` value evaluated when there is a context."""
        if self.context is None or not glide_dates.is_script(raw):
            return raw
        try:
            return glide_dates.evaluate(
                raw, self.now, user_id=self.context.user_id, user_name=self.context.user_name
            )
        except glide_dates.ScriptError as exc:
            raise QueryError(
                f"field {col.path!r}: javascript: value {_shown(raw)!r}: {exc.message}"
            ) from None

    def value(self, col: _Column, raw: str) -> Any:
        """``raw`` (a ``javascript:`` value evaluated) as a value of ``col``'s type."""
        raw = self.script(col, raw)
        kind = col.kind
        if raw == "" and not kind.is_text:
            return None
        if kind is FieldType.INTEGER:
            try:
                return int(raw)
            except ValueError:
                raise QueryError(f"field {col.path!r}: {raw!r} is not an integer") from None
        if kind is FieldType.REAL:
            try:
                return float(raw)
            except ValueError:
                raise QueryError(f"field {col.path!r}: {raw!r} is not a number") from None
        if kind is FieldType.BOOLEAN:
            lowered = raw.lower()
            if lowered in ("true", "1"):
                return 1
            if lowered in ("false", "0"):
                return 0
            raise QueryError(f"field {col.path!r}: {raw!r} is not true or false")
        if kind is FieldType.DATETIME and raw != "":
            return self.moment(col, raw)
        return raw

    def moment(self, col: _Column, raw: str) -> str:
        """``raw`` (evaluated) as ``YYYY-MM-DD HH:MM:SS``, for date operators."""
        raw = self.script(col, raw)
        moment = glide_dates.normalize(raw)
        if moment is None:
            raise QueryError(
                f"field {col.path!r}: {_shown(raw)!r} is not a date-time (YYYY-MM-DD HH:MM:SS)"
            )
        return moment

    def condition(self, cond: Condition, params: list[Any]) -> str:
        col = self.column(cond.field)
        op = cond.op
        if op in _NO_VALUE:
            if self.pg and not col.kind.is_text:  # '' is no value of a number column
                return {
                    "ANYTHING": self.true,
                    "EMPTYSTRING": self.false,
                    "ISEMPTY": f"{col.sql} IS NULL",
                    "ISNOTEMPTY": f"{col.sql} IS NOT NULL",
                }[op]
            return {
                "ANYTHING": self.true,
                "EMPTYSTRING": f"{col.sql} = ''",
                "ISEMPTY": f"COALESCE({col.sql}, '') = ''",
                "ISNOTEMPTY": f"COALESCE({col.sql}, '') != ''",
            }[op]
        if op in _LIST:
            assert isinstance(cond.value, tuple)
            return self._list(col, op, cond.value, params)
        if op == "INSTANCEOF":
            assert isinstance(cond.value, str)
            if col.name != "sys_class_name":
                raise QueryError(f"operator INSTANCEOF applies to sys_class_name, not {col.path!r}")
            target = self.schema.get(cond.value)
            classes = (target.classes if target is not None else ()) or (cond.value,)
            params.extend(classes)
            return f"{col.sql} IN ({', '.join('?' * len(classes))})"
        if op in _FIELD_COMPARE:
            assert isinstance(cond.value, tuple)
            return self._compare_fields(col, op, cond.value)
        if op in _DATES:
            return self._date(col, op, cond.value, params)
        if op == "BETWEEN":
            assert isinstance(cond.value, tuple)
            low, high = (self.value(col, v) for v in cond.value)
            if low is None or high is None:
                raise QueryError(f"operator BETWEEN on field {col.path!r} needs two values")
            params.extend((low, high))
            return f"{_ordered(col)} BETWEEN ? AND ?"
        assert isinstance(cond.value, str)
        if op in _TEXT_ONLY:
            if not col.kind.is_text:
                raise QueryError(f"operator {op} does not apply to {col.kind} field {col.path!r}")
            pattern = _like(self.script(col, cond.value))
            if op == "STARTSWITH":
                pattern = pattern + "%"
            elif op == "ENDSWITH":
                pattern = "%" + pattern
            else:
                pattern = "%" + pattern + "%"
            params.append(pattern)
            negate = "NOT " if op == "NOT LIKE" else ""
            like = "ILIKE" if self.pg else "LIKE"  # SQLite's LIKE ignores ASCII case
            return f"{col.sql} {negate}{like} ? ESCAPE '\\'"
        value = self.value(col, cond.value)
        if op == "=":
            if value is None:
                return f"{col.sql} IS NULL"
            params.append(value)
            return f"{col.sql} = ?"
        if op == "!=":
            params.append(value)
            return f"{col.sql} {'IS DISTINCT FROM' if self.pg else 'IS NOT'} ?"
        assert op in _ORDERED
        if value is None:
            raise QueryError(f"operator {op} on field {col.path!r} needs a value")
        params.append(value)
        return f"{_ordered(col)} {op} ?"

    def _list(self, col: _Column, op: str, raw: tuple[str, ...], params: list[Any]) -> str:
        joined = ",".join(raw)
        if self.context is not None and glide_dates.is_script(joined):
            raw = (joined,)  # one javascript: value (its arguments may hold commas)
        values = [self.value(col, v) for v in raw]
        present = [v for v in values if v is not None]
        marks = ", ".join("?" * len(present))
        params.extend(present)
        has_null = len(present) != len(values)
        if op == "IN":
            inside = f"{col.sql} IN ({marks})" if present else self.false
            return f"({inside} OR {col.sql} IS NULL)" if has_null else inside
        outside = f"{col.sql} NOT IN ({marks})" if present else self.true
        if has_null:
            return f"({outside} AND {col.sql} IS NOT NULL)"
        return f"({col.sql} IS NULL OR {outside})"

    def _compare_fields(self, col: _Column, op: str, operand: tuple[str, ...]) -> str:
        other = self.column(operand[0])
        families = {col.kind.is_text, other.kind.is_text}
        numeric = {FieldType.INTEGER, FieldType.REAL}
        if len(families) != 1 or (
            not col.kind.is_text and col.kind != other.kind and {col.kind, other.kind} != numeric
        ):
            raise QueryError(
                f"operator {op}: {col.kind} field {col.path!r} and {other.kind} field "
                f"{other.path!r} cannot be compared"
            )
        left, right = _ordered(col), _ordered(other)
        if len(operand) > 1:
            if not col.kind.is_text:
                raise QueryError(f"operator {op}: @{operand[1]} applies to date-time fields")
            size = _SAME_UNITS[operand[1]]
            left, right = f"substr({left}, 1, {size})", f"substr({right}, 1, {size})"
        compare = _FIELD_COMPARE[op]
        if self.pg and compare == "IS NOT":
            compare = "IS DISTINCT FROM"
        return f"{left} {compare} {right}"

    def _date(
        self, col: _Column, op: str, operand: str | tuple[str, ...], params: list[Any]
    ) -> str:
        if not col.kind.is_text:
            raise QueryError(f"operator {op} does not apply to {col.kind} field {col.path!r}")
        assert isinstance(operand, tuple)
        c = f"NULLIF({col.sql}, '')"
        if op == "DATEPART":
            part, number, how = operand
            params.append(int(number))
            sql = _PG_DATE_PARTS[part] if self.pg else _DATE_PARTS[part][0]
            return f"{sql.format(c=c)} {_DATE_PART_OPS[how]} ?"
        if op in ("ON", "NOTON"):
            if len(operand) == 1:
                day = glide_dates.parse_text(self.moment(col, operand[0]))
                bounds = [glide_dates.text(edge(day, "day")) for edge in _EDGES]
            else:
                bounds = [self.moment(col, v) for v in operand]
            params.extend(bounds)
            if op == "ON":
                return f"{c} BETWEEN ? AND ?"
            return f"COALESCE({c} NOT BETWEEN ? AND ?, {self.true})"
        unit, direction, count = operand
        now = datetime.fromtimestamp(int(self.now), UTC).replace(tzinfo=None)
        try:
            moment = glide_dates.shift(now, unit, int(count) * (-1 if direction == "ago" else 1))
        except (OverflowError, ValueError):
            raise QueryError(f"operator {op} on field {col.path!r}: out of range") from None
        if op == "RELATIVEEE":
            params.extend(glide_dates.text(edge(moment, unit)) for edge in _EDGES)
            return f"{c} BETWEEN ? AND ?"
        params.append(glide_dates.text(moment))
        return f"{c} {_RELATIVE[op]} ?"


def _ordered(col: _Column) -> str:
    """``col`` for ordered comparisons: an empty date-time is no date (never before one)."""
    return f"NULLIF({col.sql}, '')" if col.kind is FieldType.DATETIME else col.sql


def _like(value: str) -> str:
    return value.replace("\\", "\\\\").replace("%", "\\%").replace("_", "\\_")


_NO_ROWS = SQL("0", (), "ORDER BY rowid ASC")
_PG_NO_ROWS = SQL("FALSE", (), 'ORDER BY "sys_row" ASC')
_PARAM = re.compile(r"\?")


def _numbered(where: str) -> str:
    """``?`` parameters as PostgreSQL's ``$1``, ``$2``... (no literal the compiler writes
    holds a ``?``: literals are names that matched the schema, ``''`` and ``'\\'``)."""
    counter = iter(range(1, 1 << 30))
    return _PARAM.sub(lambda _m: f"${next(counter)}", where)


def compile_query(
    query: Query | str,
    table: Table,
    *,
    hidden: Collection[str] = (),
    schema: Mapping[str, Table] | None = None,
    invalid: InvalidFields = "error",
    context: QueryContext | None = None,
    dialect: Dialect = "sqlite",
) -> SQL:
    """Parameterised SQL for ``query`` on ``table`` (see ``SQL``), in ``dialect``.

    ``hidden``: fields of ``table`` that may not appear (nor, through dot-walking, any
    write-only field). ``schema``: the tables references lead to and ``INSTANCEOF`` reads
    (``store.TABLES`` when None). ``invalid``: what a term on a field that does not exist
    or is hidden does (see ``InvalidFields``); with ``ignore`` such a condition is dropped
    from its OR group, a group left empty is dropped from its branch, and a branch left
    empty matches every record. ``context``: who asks and the clock; without one,
    ``javascript:`` values are plain text.
    """
    if isinstance(query, str):
        query = parse(query)
    compiler = _Compiler(table, hidden, TABLES if schema is None else schema, context, dialect)
    no_rows = _PG_NO_ROWS if compiler.pg else _NO_ROWS
    params: list[Any] = []
    branches: list[str] = []
    for conj in query.branches:
        groups: list[str] = []
        for disj in conj:
            parts: list[str] = []
            for cond in disj:
                mark = len(params)
                try:
                    parts.append(compiler.condition(cond, params))
                except InvalidField:
                    del params[mark:]
                    if invalid == "error":
                        raise
                    if invalid == "no_rows":
                        return no_rows
            if parts:
                groups.append(parts[0] if len(parts) == 1 else "(" + " OR ".join(parts) + ")")
        branches.append(" AND ".join(groups) if groups else compiler.true)
    if not branches:
        where = ""
    elif len(branches) == 1:
        where = branches[0]
    else:
        where = " OR ".join(f"({b})" for b in branches)
    keys: list[str] = []
    for order in query.order_by:
        try:
            col = compiler.column(order.field)
        except InvalidField:
            if invalid == "error":
                raise
            if invalid == "no_rows":
                return no_rows
            continue
        direction = "DESC" if order.descending else "ASC"
        if compiler.pg:  # empty (NULL) first, as SQLite sorts it
            direction += " NULLS LAST" if order.descending else " NULLS FIRST"
        keys.append(f"{col.sql} {direction}")
    # A stable order: ties (and no ORDERBY) in insertion order.
    keys.append('"sys_row" ASC' if compiler.pg else "rowid ASC")
    if compiler.pg:
        where = _numbered(where)
    return SQL(where, tuple(params), "ORDER BY " + ", ".join(keys))
