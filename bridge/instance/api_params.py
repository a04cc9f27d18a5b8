"""The Table API's query parameters, read as ServiceNow reads them.

- Each parameter's first value counts (a repeat is ignored).
- ``sysparm_*`` names this API does not know, or that do not apply to the request (a
  client may send ``sysparm_query`` and ``sysparm_limit`` on every call), are ignored.
- Other names are ``field=value`` filters on the list endpoints and ignored elsewhere.
- A known parameter with a value that cannot mean anything (``sysparm_limit=ten``) is a
  400 naming it.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Literal

from aiohttp import web

from bridge.instance.api_http import ApiError
from bridge.instance.query import MAX_TERMS, QueryError, escape, parse
from bridge.instance.store import Table

DisplayValue = Literal["false", "true", "all"]

# A field, or a dot-walk through reference fields (``user.user_name``).
FIELD_PATH = re.compile(r"[a-z_][a-z0-9_]*(?:\.[a-z_][a-z0-9_]*)*")
MAX_DOT_WALK = 3  # references followed by one dot-walked name at most
MAX_FIELDS = 500


@dataclass(frozen=True, slots=True)
class Params:
    """A request's query parameters: ``sysparm_*`` ones and the others (filters)."""

    sysparm: Mapping[str, str] = field(default_factory=dict)
    filters: Mapping[str, str] = field(default_factory=dict)

    @classmethod
    def of(cls, request: web.Request) -> Params:
        sysparm: dict[str, str] = {}
        filters: dict[str, str] = {}
        for key, value in request.query.items():
            target = sysparm if key.startswith("sysparm_") else filters
            target.setdefault(key, value)  # the first value counts
        return cls(sysparm, filters)

    def get(self, name: str, default: str = "") -> str:
        return self.sysparm.get(name, default)

    def flag(self, name: str, default: bool = False) -> bool:
        """A true/false parameter (any case; empty: the default)."""
        text = self.sysparm.get(name, "").strip().lower()
        if not text:
            return default
        if text not in ("true", "false"):
            raise ApiError(400, f"Invalid {name}: {text[:40]!r}", "expected true or false")
        return text == "true"

    def display_value(self) -> DisplayValue:
        text = self.sysparm.get("sysparm_display_value", "").strip().lower()
        if text in ("", "false"):
            return "false"
        if text == "true":
            return "true"
        if text == "all":
            return "all"
        raise ApiError(
            400, f"Invalid sysparm_display_value: {text[:40]!r}", "expected true, false or all"
        )

    def integer(self, name: str, default: int, high: int, *, clamp: bool = False) -> int:
        """A count from 0 to ``high``; above it, ``high`` when ``clamp`` else a 400."""
        text = self.sysparm.get(name, "").strip()
        if not text:
            return default
        try:
            value = int(text)
        except ValueError:
            raise ApiError(400, f"Invalid {name}: {text[:40]!r}", "expected an integer") from None
        if value < 0:
            raise ApiError(400, f"Invalid {name}: {value}", "expected 0 or more")
        if value > high:
            if clamp:
                return high
            raise ApiError(400, f"Invalid {name}: {value}", f"expected at most {high}")
        return value

    def names(self, name: str) -> list[str] | None:
        """A comma list of field names (``sysparm_fields``...): None when absent or empty;
        names that cannot be fields (or dot-walk deeper than allowed) are dropped, as
        ServiceNow ignores invalid fields."""
        text = self.sysparm.get(name, "")
        if not text.strip():
            return None
        found: list[str] = []
        for piece in text.split(","):
            item = piece.strip()
            if (
                FIELD_PATH.fullmatch(item)
                and item.count(".") <= MAX_DOT_WALK
                and item not in found
                and len(found) < MAX_FIELDS
            ):
                found.append(item)
        return found


def check_client_query(query: str, parameter: str = "sysparm_query") -> None:
    """A client's query within ``MAX_TERMS`` terms: 400 naming the parameter otherwise."""
    try:
        parse(query, max_terms=MAX_TERMS)
    except QueryError as exc:
        raise ApiError(
            400, f"Invalid {parameter}: {exc.message}", "invalid encoded query"
        ) from None


def filter_query(
    table: Table,
    schema: Mapping[str, Table],
    filters: Mapping[str, str],
    readable: Callable[[Table], bool],
) -> str:
    """``field=value`` parameters as an encoded query (AND). A reference field's value may
    also be the referenced record's display value (``assigned_to=john.smith``) when the
    user may read the referenced table (``readable``). Names that
    cannot be fields, and write-only fields, are ignored (no oracle); unknown fields are
    left to the store, which ignores them as ServiceNow does."""
    terms: list[str] = []
    for name, value in filters.items():
        if len(terms) >= MAX_TERMS // 2:
            raise ApiError(
                400,
                "Too many field=value parameters",
                f"at most {MAX_TERMS // 2} (use sysparm_query)",
            )
        if not FIELD_PATH.fullmatch(name) or "." in name:
            continue
        spec = table.fields.get(name)
        if spec is not None and spec.write_only:
            continue
        term = f"{name}={escape(value)}"
        target = schema.get(spec.reference) if spec and spec.reference else None
        if target is not None and value and readable(target):
            for lookup in lookup_fields(target):
                term += f"^OR{name}.{lookup}={escape(value)}"
        terms.append(term)
    return "^".join(terms)


# Fields besides its display field that a reference given by display value may name:
# ServiceNow shows a user by ``name`` (the full name); tools and our CLI give user_name.
EXTRA_LOOKUP_FIELDS: dict[str, tuple[str, ...]] = {"sys_user": ("user_name",)}


def lookup_fields(table: Table) -> tuple[str, ...]:
    """The fields a display value given for a reference to ``table`` is matched against,
    in order: its display field, then any extra ones (``EXTRA_LOOKUP_FIELDS``)."""
    if table.display_field == "sys_id":
        return ()
    extra = EXTRA_LOOKUP_FIELDS.get(table.name, ())
    return (table.display_field, *(f for f in extra if f in table.fields))


def restrict(query: str, condition: str) -> str:
    """``query`` (an encoded query) with ``condition`` AND-ed into each of its ``^NQ``
    branches; a syntax error in ``query`` raises ``QueryError`` as it would alone."""
    parse(query)
    terms: list[str] = []
    current: list[str] = []
    i = 0
    while i < len(query):
        if query.startswith("^^", i):
            current.append("^^")  # a caret inside a value: kept as it is
            i += 2
        elif query[i] == "^":
            terms.append("".join(current))
            current = []
            i += 1
        else:
            current.append(query[i])
            i += 1
    terms.append("".join(current))
    out = [condition]
    for term in terms:
        # An empty term (a leading ``^``, ``^NQ`` with nothing after) is left out: joined,
        # it would make ``^^``, a caret inside a value, and glue the query's next term onto
        # the last value of ``condition`` (``agentINa^^name=x,b``: agent IN (a^name=x, b)).
        # So is a term that starts with a caret: no field name does (it is dropped as an
        # unknown field anyway), and joined it would do the same.
        if term.startswith("NQ"):
            out.append("NQ" + condition)
            term = term[2:]
        if term and not term.startswith("^"):
            out.append(term)
    return "^".join(out)


__all__ = [
    "FIELD_PATH",
    "MAX_DOT_WALK",
    "DisplayValue",
    "Params",
    "check_client_query",
    "filter_query",
    "restrict",
]
