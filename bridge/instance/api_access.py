"""Which table a REST request names, and what its user may see of it.

Tables come from the store's live schema (``Store.schema``: built-in tables, the CMDB
class tables, tables added as ``sys_db_object`` records). A table in an extension
hierarchy is authorized as its root (``Table.physical``): ``cmdb_ci_linux_server`` as
``cmdb_ci``. ``bridge.instance.auth`` holds the rules themselves.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping

from bridge.instance import auth
from bridge.instance.api_http import ApiError
from bridge.instance.api_params import Params, check_client_query, filter_query, restrict
from bridge.instance.auth import AuthError, Principal
from bridge.instance.query import QueryContext, QueryError, compile_query, parse
from bridge.instance.store import Record, Store, Table


def table_for(store: Store, name: str, who: Principal) -> Table:
    """The table named ``name`` once ``who`` may use it at all (400 / 403 otherwise)."""
    table = store.schema.get(name)
    if table is None:
        raise ApiError(400, f"Invalid table {name[:80]}", "no such table (sys_db_object)")
    auth.authorize_table(who, table.physical)
    return table


def may_read(who: Principal, table: Table) -> bool:
    """May ``who`` read records of ``table`` (dot-walks, display values of references)?"""
    try:
        auth.authorize_table(who, table.physical)
        auth.authorize(who, table.physical, "read")
    except AuthError:
        return False
    return True


def sees(who: Principal, table: Table, record: Mapping[str, object]) -> bool:
    """May ``who`` see this record of ``table`` (its class, its agent scope)?"""
    if table.extended and record.get("sys_class_name") not in table.classes:
        return False
    return auth.in_agent_scope(who, table.physical, record)


def hidden(table: Table) -> list[str]:
    """Fields never returned nor queried through the APIs (password hashes, secrets)."""
    return [name for name, spec in table.fields.items() if spec.write_only]


def scope(who: Principal, table: Table) -> str | None:
    """The condition narrowing ``who``'s reads of ``table`` (its own agents), if any."""
    return auth.agent_scope(who, table.physical)


def context(who: Principal) -> QueryContext:
    """For ``javascript:gs.getUserID()`` / ``gs.getUserName()`` in queries."""
    return QueryContext(user_id=who.sys_id, user_name=who.user_name)


# Operators comparing a field with another field (its name is the condition's value).
_FIELD_COMPARISONS = frozenset(
    {"SAMEAS", "NSAMEAS", "GT_FIELD", "LT_FIELD", "GT_OR_EQUALS_FIELD", "LT_OR_EQUALS_FIELD"}
)


def _named_fields(query: str) -> Iterator[str]:
    parsed = parse(query)
    for conjunction in parsed.branches:
        for disjunction in conjunction:
            for condition in disjunction:
                yield condition.field
                if condition.op in _FIELD_COMPARISONS and isinstance(condition.value, tuple):
                    yield from condition.value[:1]
    for order in parsed.order_by:
        yield order.field


def check_walks(
    who: Principal, table: Table, schema: Mapping[str, Table], query: str, parameter: str
) -> None:
    """403 when a dot-walk in ``query`` goes through a table ``who`` may not read (the
    query would be an oracle on it); walks through unknown fields are left to the store
    (ignored)."""
    for name in _named_fields(query):
        current = table
        for part in name.split(".")[:-1]:
            spec = current.fields.get(part)
            target = schema.get(spec.reference or "") if spec is not None else None
            if target is None:
                break
            if not may_read(who, target):
                raise AuthError(
                    403,
                    f"{parameter}: {name[:80]!r} reaches table {target.name}, which user "
                    f"{who.user_name} may not read",
                )
            current = target


def _check_fits(
    who: Principal, table: Table, schema: Mapping[str, Table], query: str, parameter: str
) -> None:
    """400 naming ``parameter`` when a term of ``query`` does not fit the table (a value
    not of its field's type, an operator its field cannot take, a ``javascript:`` value
    that is not a supported helper): the store would refuse it without saying where the
    query came from. Unknown fields are ignored here as the store ignores them."""
    try:
        compile_query(
            query,
            table,
            hidden=hidden(table),
            schema=schema,
            invalid="ignore",
            context=context(who),
        )
    except QueryError as exc:
        raise ApiError(
            400, f"Invalid {parameter}: {exc.message}", "invalid encoded query"
        ) from None


def read_query(store: Store, who: Principal, table: Table, params: Params) -> str:
    """The encoded query a list or statistics request runs: ``sysparm_query`` AND the
    ``field=value`` parameters, narrowed to what ``who`` may read (its own agents)."""
    schema = store.schema
    query = params.get("sysparm_query")
    check_client_query(query)
    check_walks(who, table, schema, query, "sysparm_query")
    _check_fits(who, table, schema, query, "sysparm_query")
    filters = filter_query(table, schema, params.filters, lambda t: may_read(who, t))
    if filters:
        check_client_query(filters, "field=value parameters")
        _check_fits(who, table, schema, filters, "field=value parameters")
        query = restrict(query, filters) if query.strip() else filters
    narrowed = scope(who, table)
    return restrict(query, narrowed) if narrowed is not None else query


def lineage(schema: Mapping[str, Table], table: Table) -> list[str]:
    """``table`` and its ancestors, nearest first (``super_class`` chain)."""
    names = [table.name]
    parent = table.super_class
    while parent and parent not in names:
        names.append(parent)
        above = schema.get(parent)
        parent = above.super_class if above is not None else None
    return names


def visible(who: Principal, table: Table, record: Record | None) -> Record | None:
    """``record`` if ``who`` may see it, else None (answered as not found)."""
    if record is None or not sees(who, table, record):
        return None
    return record


__all__ = [
    "context",
    "hidden",
    "lineage",
    "may_read",
    "read_query",
    "scope",
    "sees",
    "table_for",
    "visible",
]
