"""ServiceNow's Aggregate API: ``GET /api/now/stats/<table>`` (and ``/api/now/v1/stats``).

Parameters: ``sysparm_query`` (or ``field=value`` pairs), ``sysparm_count``,
``sysparm_avg_fields``, ``sysparm_min_fields``, ``sysparm_max_fields``,
``sysparm_sum_fields``, ``sysparm_group_by``, ``sysparm_having``
(``aggregate^field^operator^value``, comma-separated), ``sysparm_order_by`` (a group-by
field, ``COUNT`` or ``AVG^field``..., each optionally ``^DESC``), ``sysparm_display_value``
(for the group-by values). Answers, values as strings (averages with four decimals)::

    {"result": {"stats": {"count": "12", "avg": {"priority": "1.5000"}}}}
    {"result": [{"stats": {...}, "groupby_fields": [{"field": "state", "value": "ready"}]}]}

Read access is the Table API's (same roles, same agent scope). Unknown field names are
ignored, as ServiceNow ignores invalid fields; write-only fields are never aggregated.
"""

from __future__ import annotations

import operator
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from aiohttp import web

from bridge.instance import auth
from bridge.instance.api_access import context, hidden, read_query, table_for
from bridge.instance.api_format import Shaper, wire_value
from bridge.instance.api_http import ApiError, authenticate, public_base, respond
from bridge.instance.api_params import Params
from bridge.instance.auth import Authenticator
from bridge.instance.store import Aggregate, FieldType, Store, Table

AGGREGATES = ("avg", "min", "max", "sum")
MAX_GROUP_BY = 10
_NUMERIC = frozenset({FieldType.INTEGER, FieldType.REAL})
_OPERATORS: Mapping[str, Callable[[Any, Any], bool]] = {
    "=": operator.eq,
    "!=": operator.ne,
    ">": operator.gt,
    ">=": operator.ge,
    "<": operator.lt,
    "<=": operator.le,
}


@dataclass(frozen=True, slots=True)
class Having:
    aggregate: str  # count, avg, min, max, sum
    field: str
    op: str
    value: str


def _fields(table: Table, params: Params, name: str) -> list[str]:
    """The known, readable fields a comma-list parameter names (others ignored)."""
    return [
        item
        for item in params.names(name) or []
        if item in table.fields and not table.fields[item].write_only
    ]


def _numeric_only(table: Table, names: Sequence[str], parameter: str) -> None:
    for name in names:
        if table.fields[name].type not in _NUMERIC:
            raise ApiError(
                400,
                f"Invalid {parameter}: field {name!r} is not numeric",
                f"table {table.name}: {name} is {table.fields[name].type}",
            )


def _having(table: Table, text: str) -> list[Having]:
    found: list[Having] = []
    for term in (t.strip() for t in text.split(",")):
        if not term:
            continue
        parts = term.split("^")
        if len(parts) != 4 or parts[0].lower() not in ("count", *AGGREGATES):
            raise ApiError(
                400,
                f"Invalid sysparm_having term {term[:80]!r}",
                "expected aggregate^field^operator^value, e.g. count^state^>^3",
            )
        aggregate, name, op, value = parts[0].lower(), parts[1], parts[2], parts[3]
        if op not in _OPERATORS:
            raise ApiError(
                400,
                f"Invalid sysparm_having term {term[:80]!r}",
                f"operator {op[:10]!r}: expected one of {', '.join(_OPERATORS)}",
            )
        if aggregate != "count":
            spec = table.fields.get(name)
            if spec is None or spec.write_only:
                continue  # an unknown field: ignored, as in the rest of the query
            if aggregate in ("avg", "sum"):
                _numeric_only(table, [name], "sysparm_having")
        found.append(Having(aggregate, name, op, value))
    return found


def _number(value: Any) -> float | None:
    try:
        return float(value)
    except (TypeError, ValueError):
        return None


def _statistic(group: Aggregate, aggregate: str, field: str) -> Any:
    if aggregate == "count":
        return group.count
    values: Mapping[str, Any] = getattr(group, aggregate)
    return values.get(field)


def _passes(group: Aggregate, having: Sequence[Having]) -> bool:
    for rule in having:
        actual = _statistic(group, rule.aggregate, rule.field)
        if actual is None:
            return False
        left, right = _number(actual), _number(rule.value)
        if left is None or right is None:
            left, right = wire_value(actual), rule.value  # type: ignore[assignment]
        if not _OPERATORS[rule.op](left, right):
            return False
    return True


def _sort_key(value: Any) -> tuple[int, float, str]:
    """None/empty first, then numbers, then text."""
    if value is None or value == "":
        return (0, 0.0, "")
    number = _number(value)
    if number is not None and not isinstance(value, str):
        return (1, number, "")
    return (2, 0.0, wire_value(value))


def _order(groups: list[Aggregate], table: Table, text: str, group_by: Sequence[str]) -> None:
    """Sort ``groups`` in place by ``sysparm_order_by`` (unknown items ignored)."""
    keys: list[tuple[str, str, bool]] = []
    for item in (i.strip() for i in text.split(",")):
        tokens = [t for t in item.split("^") if t]
        descending = bool(tokens) and tokens[-1].upper() == "DESC"
        if descending:
            tokens.pop()
        if not tokens:
            continue
        head = tokens[0].lower()
        if head == "count":
            keys.append(("count", "", descending))
        elif head in AGGREGATES and len(tokens) > 1 and tokens[1] in table.fields:
            keys.append((head, tokens[1], descending))
        elif tokens[0] in group_by:
            keys.append(("group", tokens[0], descending))
    for aggregate, name, descending in reversed(keys):

        def key(group: Aggregate, aggregate: str = aggregate, name: str = name) -> Any:
            if aggregate == "group":
                return _sort_key(group.group.get(name))
            return _sort_key(_statistic(group, aggregate, name))

        groups.sort(key=key, reverse=descending)


def _stat_text(table: Table, aggregate: str, name: str, value: Any) -> str:
    if value is None:
        return ""
    if aggregate == "avg":
        return f"{float(value):.4f}"
    if aggregate == "sum":
        if table.fields[name].type is FieldType.INTEGER:
            return str(round(float(value)))
        return f"{float(value):.4f}"
    return wire_value(value)


class StatsApi:
    """The Aggregate API's handler."""

    def __init__(self, store: Store, authenticator: Authenticator) -> None:
        self.store = store
        self.authenticator = authenticator

    def add_routes(self, app: web.Application) -> None:
        app.router.add_get("/api/now/stats/{table}", self.stats)
        app.router.add_get("/api/now/{version:v1}/stats/{table}", self.stats)

    async def stats(self, request: web.Request) -> web.Response:
        who = await authenticate(request, self.authenticator)
        table = table_for(self.store, request.match_info["table"], who)
        auth.authorize(who, table.physical, "read")
        params = Params.of(request)
        query = read_query(self.store, who, table, params)
        wanted = {name: _fields(table, params, f"sysparm_{name}_fields") for name in AGGREGATES}
        _numeric_only(table, wanted["avg"], "sysparm_avg_fields")
        _numeric_only(table, wanted["sum"], "sysparm_sum_fields")
        group_by = _fields(table, params, "sysparm_group_by")[:MAX_GROUP_BY]
        having = _having(table, params.get("sysparm_having"))
        count = params.flag("sysparm_count")
        display = params.display_value()
        asked = {name: list(fields) for name, fields in wanted.items()}
        for rule in having:
            if rule.aggregate != "count" and rule.field not in asked[rule.aggregate]:
                asked[rule.aggregate].append(rule.field)
        groups = await self.store.aggregate(
            table.name,
            query,
            group_by=group_by,
            count=count or any(rule.aggregate == "count" for rule in having),
            avg_fields=asked["avg"],
            min_fields=asked["min"],
            max_fields=asked["max"],
            sum_fields=asked["sum"],
            hidden=hidden(table),
            invalid="ignore",
            context=context(who),
        )
        groups = [g for g in groups if _passes(g, having)]
        _order(groups, table, params.get("sysparm_order_by"), group_by)
        shaper = Shaper(self.store, who, table, display=display, base=public_base(request))
        labels = await self._group_labels(shaper, table, group_by, groups, display)
        results: list[dict[str, Any]] = []
        for group in groups:
            stats: dict[str, Any] = {}
            if count:
                stats["count"] = wire_value(group.count)
            for name in AGGREGATES:
                if wanted[name]:
                    values: Mapping[str, Any] = getattr(group, name)
                    stats[name] = {
                        f: _stat_text(table, name, f, values.get(f)) for f in wanted[name]
                    }
            entry: dict[str, Any] = {"stats": stats}
            if group_by:
                entry["groupby_fields"] = [
                    self._group_field(name, group.group.get(name), labels, display)
                    for name in group_by
                ]
            results.append(entry)
        if group_by:
            return respond(request, {"result": results})
        return respond(request, {"result": results[0] if results else {"stats": {}}})

    async def _group_labels(
        self,
        shaper: Shaper,
        table: Table,
        group_by: Sequence[str],
        groups: Sequence[Aggregate],
        display: str,
    ) -> dict[str, dict[str, str]]:
        """Display values of the group-by values that are references or classes."""
        labels: dict[str, dict[str, str]] = {}
        if display == "false":
            return labels
        for name in group_by:
            values = sorted({wire_value(g.group.get(name)) for g in groups} - {""})
            spec = table.fields[name]
            target = shaper.schema.get(spec.reference or "")
            if target is not None:
                labels[name] = await shaper.display_values(target, values)
            elif name == "sys_class_name":
                labels[name] = {
                    v: shaper.schema[v].label or v for v in values if v in shaper.schema
                }
        return labels

    @staticmethod
    def _group_field(
        name: str, raw: Any, labels: Mapping[str, Mapping[str, str]], display: str
    ) -> dict[str, str]:
        value = wire_value(raw)
        if display == "false":
            return {"field": name, "value": value}
        shown = labels.get(name, {}).get(value, value if name not in labels else "")
        if display == "true":
            return {"field": name, "value": shown}
        return {"field": name, "value": value, "display_value": shown}


__all__ = ["StatsApi"]
