"""Records as the Table API answers them: ServiceNow's value, display-value and
reference-link forms, ``sysparm_fields`` with dot-walked names.

Every value is a string (``true``/``false`` for booleans, ``""`` for empty). A reference
field (``Field.reference``), with ``sysparm_exclude_reference_link=false`` (the
default), is ``{"link": "<base>/api/now/table/<table>/<sys_id>", "value": sys_id}``; an
empty reference is ``""``. ``sysparm_display_value``:

- ``false``: the stored values;
- ``true``: display values: a reference shows the referenced record's display field
  (``Table.display_field``), ``sys_class_name`` the class's label, anything else its
  value; with links a reference is ``{"display_value", "link"}``;
- ``all``: ``{"display_value", "value"}`` for every field (``"link"`` too for a
  reference).

A dot-walked name (``user.user_name``) follows reference fields to the referenced
record; it is answered under that name. Names that are not fields of the table, that
follow a field that is not a reference, or that reach a table or record the user may not
read are left out, as ServiceNow leaves out invalid fields and fields its ACLs hide;
write-only fields (password hashes, secrets) never appear. A referenced record the user
may not read has the display value ``""``.
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any
from urllib.parse import quote

from bridge.instance.api_access import may_read, sees
from bridge.instance.api_params import DisplayValue
from bridge.instance.auth import Principal
from bridge.instance.query import MAX_IN_VALUES
from bridge.instance.store import Field, Record, Store, Table

_SYS_ID = re.compile(r"[A-Za-z0-9_.:-]{1,64}")
_CLASS_FIELD = "sys_class_name"


def wire_value(value: Any) -> str:
    """A stored value as ServiceNow returns it: always a string."""
    if value is None:
        return ""
    if isinstance(value, bool):
        return "true" if value else "false"
    return str(value)


def to_wire(table: Table, record: Record, fields: list[str] | None = None) -> dict[str, str]:
    """``record``'s plain values (no links, no display values), write-only fields left out."""
    names = fields if fields is not None else list(table.fields)
    return {
        name: wire_value(record.get(name))
        for name in names
        if name in record and name in table.fields and not table.fields[name].write_only
    }


@dataclass(frozen=True, slots=True)
class Column:
    """One answered name: the fields it goes through (table, field), the last one answered."""

    name: str
    steps: tuple[tuple[Table, Field], ...]

    @property
    def last(self) -> Field:
        return self.steps[-1][1]


class Shaper:
    """Shapes records of ``table`` for ``who`` (see the module's docstring)."""

    def __init__(
        self,
        store: Store,
        who: Principal,
        table: Table,
        *,
        display: DisplayValue = "false",
        links: bool = True,
        base: str = "",
        fields: Sequence[str] | None = None,
    ) -> None:
        self.store = store
        self.schema: Mapping[str, Table] = store.schema
        self.who = who
        self.table = table
        self.display = display
        self.links = links
        self.base = base
        self._cache: dict[tuple[str, str], Record | None] = {}
        self._readable: dict[str, bool] = {}
        names = list(fields) if fields is not None else list(table.fields)
        self.columns = [c for c in (self._column(name) for name in names) if c is not None]

    # --- which columns --------------------------------------------------------------------

    def _may_read(self, table: Table) -> bool:
        if table.name not in self._readable:
            self._readable[table.name] = may_read(self.who, table)
        return self._readable[table.name]

    def _column(self, name: str) -> Column | None:
        parts = name.split(".")
        table = self.table
        steps: list[tuple[Table, Field]] = []
        for i, part in enumerate(parts):
            spec = table.fields.get(part)
            if spec is None or spec.write_only:
                return None
            steps.append((table, spec))
            if i < len(parts) - 1:
                target = self.schema.get(spec.reference or "")
                if target is None or not self._may_read(target):
                    return None
                table = target
        return Column(name, tuple(steps))

    # --- looking referenced records up -------------------------------------------------------

    def _lookup(
        self, table: str, sys_id: str, misses: dict[str, set[str]] | None
    ) -> tuple[bool, Record | None]:
        """(known, record): known is False when the record must be fetched first."""
        key = (table, sys_id)
        if key in self._cache:
            return True, self._cache[key]
        if not _SYS_ID.fullmatch(sys_id):
            self._cache[key] = None
            return True, None
        if misses is not None:
            misses.setdefault(table, set()).add(sys_id)
        return False, None

    async def _fetch(self, misses: Mapping[str, set[str]]) -> None:
        for name, ids in misses.items():
            table = self.schema.get(name)
            wanted = sorted(ids)
            for sys_id in wanted:
                self._cache[(name, sys_id)] = None
            if table is None or not self._may_read(table):
                continue
            for start in range(0, len(wanted), MAX_IN_VALUES):
                chunk = wanted[start : start + MAX_IN_VALUES]
                rows = await self.store.query(name, "sys_idIN" + ",".join(chunk))
                for row in rows:
                    if sees(self.who, table, row):
                        self._cache[(name, str(row["sys_id"]))] = row

    def _walk(
        self, row: Record, column: Column, misses: dict[str, set[str]] | None
    ) -> tuple[str, str] | None:
        """(value, display value) of ``column`` in ``row``; None when a lookup is missing."""
        record: Record | None = row
        for _table, spec in column.steps[:-1]:
            assert record is not None
            value = wire_value(record.get(spec.name))
            if not value:
                return "", ""
            known, record = self._lookup(spec.reference or "", value, misses)
            if not known:
                return None
            if record is None:
                return "", ""
        assert record is not None
        last = column.last
        value = wire_value(record.get(last.name))
        if self.display == "false" or not value:
            return value, value
        if last.name == _CLASS_FIELD:
            found = self.schema.get(value)
            return value, (found.label or value) if found is not None else value
        target = self.schema.get(last.reference or "")
        if target is None:
            return value, value
        if target.display_field == "sys_id":
            return value, value if self._may_read(target) else ""
        known, referenced = self._lookup(target.name, value, misses)
        if not known:
            return None
        return value, wire_value(referenced.get(target.display_field)) if referenced else ""

    # --- answers --------------------------------------------------------------------------------

    def _link(self, reference: str, value: str) -> str:
        return f"{self.base}/api/now/table/{reference}/{quote(value, safe='')}"

    def _shape(self, column: Column, value: str, display: str) -> Any:
        reference = column.last.reference
        if reference is not None and self.links and value:
            link = self._link(reference, value)
            if self.display == "false":
                return {"link": link, "value": value}
            if self.display == "true":
                return {"display_value": display, "link": link}
            return {"display_value": display, "link": link, "value": value}
        if self.display == "false":
            return value
        if self.display == "true":
            return display
        return {"display_value": display, "value": value}

    async def records(self, rows: Sequence[Record]) -> list[dict[str, Any]]:
        needy = [
            c
            for c in self.columns
            if len(c.steps) > 1
            or (self.display != "false" and (c.last.reference or c.last.name == _CLASS_FIELD))
        ]
        for _round in range(len(max((c.steps for c in needy), key=len, default=())) + 1):
            misses: dict[str, set[str]] = {}
            for row in rows:
                for column in needy:
                    self._walk(row, column, misses)
            if not misses:
                break
            await self._fetch(misses)
        answer: list[dict[str, Any]] = []
        for row in rows:
            shaped: dict[str, Any] = {}
            for column in self.columns:
                if len(column.steps) == 1 and column.name not in row:
                    continue
                walked = self._walk(row, column, None)
                value, display = walked if walked is not None else ("", "")
                shaped[column.name] = self._shape(column, value, display)
            answer.append(shaped)
        return answer

    async def record(self, row: Record) -> dict[str, Any]:
        return (await self.records([row]))[0]

    async def display_values(self, table: Table, values: Sequence[str]) -> dict[str, str]:
        """Display values of ``values`` (sys_ids of ``table`` records) for the Aggregate API."""
        if table.display_field == "sys_id" or not self._may_read(table):
            return {}
        misses: dict[str, set[str]] = {}
        for value in values:
            self._lookup(table.name, value, misses)
        await self._fetch(misses)
        found: dict[str, str] = {}
        for value in values:
            _known, record = self._lookup(table.name, value, None)
            if record is not None:
                found[value] = wire_value(record.get(table.display_field))
        return found


__all__ = ["Column", "Shaper", "to_wire", "wire_value"]
