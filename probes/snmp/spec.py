"""The ``oid_spec_list`` language: one operation a line (``get``, ``getnext``, ``walk``,
``table``), parsed into :class:`OidSpec`."""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any, Literal

from probes.snmp import values as sv

MAX_SPEC_LINES = 256
MAX_GET_OIDS = 64  # OIDs on one get / getnext line


DEFAULT_SPEC = ("walk 1.3.6.1.2.1.1",)  # the system group: what classification reads first


Op = Literal["get", "getnext", "walk", "table"]


@dataclass(frozen=True, slots=True)
class OidSpec:
    """One line of ``oid_spec_list``, parsed."""

    line: int  # 1-based
    op: Op
    oids: tuple[str, ...]
    columns: tuple[int, ...] = ()  # table only; empty: every column

    def text(self) -> str:
        head = f"{self.op} {' '.join(self.oids)}"
        if self.columns:
            return f"{head} {','.join(str(c) for c in self.columns)}"
        return head


_OPS: dict[str, Op] = {
    "get": "get",
    "getnext": "getnext",
    "walk": "walk",
    "bulkwalk": "walk",
    "getbulk": "walk",
    "table": "table",
}
_COLUMN_SPLIT = re.compile(r"[\s,]+")


def _columns(table_oid: str, text: str, where: str) -> tuple[int, ...]:
    table = sv.TABLES.get(table_oid)
    by_name = {name: cid for cid, name in table.columns.items()} if table else {}
    out: list[int] = []
    for item in (part for part in _COLUMN_SPLIT.split(text.strip()) if part):
        if item.isdigit() and 0 < int(item) < 2**32:
            column = int(item)
        elif item in by_name:
            column = by_name[item]
        else:
            known = f" (columns of {table.name}: {', '.join(by_name)})" if table else ""
            raise ValueError(f"{where}: {item[:40]!r} is not a column number or name{known}")
        if column not in out:
            out.append(column)
    return tuple(out)


def parse_spec_line(text: str, line: int) -> OidSpec | None:
    """One line → :class:`OidSpec`; ``None`` for a blank or ``#`` comment line."""
    body = text.strip()
    if not body or body.startswith("#"):
        return None
    where = f"line {line}"
    words = body.split(None, 1)
    op = _OPS.get(words[0].lower())
    if op is None:
        raise ValueError(
            f"{where}: unknown operation {words[0][:40]!r}; one of get, getnext, walk, table"
        )
    rest = words[1].strip() if len(words) > 1 else ""
    if not rest:
        raise ValueError(f"{where}: {op} needs an OID")
    try:
        if op == "table":
            table_word, *more = rest.split(None, 1)
            columns = more[0] if more else ""
            oid = sv.resolve_oid(table_word)
            if oid.endswith(".1") and oid[:-2] in sv.TABLES:
                oid = oid[:-2]  # the entry was named (ifEntry = ifTable.1): take its table
            return OidSpec(line, "table", (oid,), _columns(oid, columns, where))
        oids = tuple(sv.resolve_oid(word) for word in rest.split())
    except ValueError as exc:
        message = str(exc)
        raise ValueError(message if message.startswith(where) else f"{where}: {message}") from None
    if op == "walk" and len(oids) != 1:
        raise ValueError(f"{where}: walk takes one OID (write one walk line per subtree)")
    if len(oids) > MAX_GET_OIDS:
        raise ValueError(f"{where}: more than {MAX_GET_OIDS} OIDs on one line")
    return OidSpec(line, op, oids)


def _split_lines(text: str) -> list[str]:
    # ";" too: XML attribute values lose their newlines unless written as &#10;
    return [part for line in text.splitlines() for part in line.split(";")]


def parse_spec_list(value: Any) -> tuple[OidSpec, ...]:
    """``oid_spec_list`` (text with one operation a line, or a list of lines) → specs.

    Lines are separated by newlines or ``;`` and numbered from 1 in that order (blank and
    ``#`` comment lines count), which is how errors name them.
    """
    if isinstance(value, str):
        lines = _split_lines(value)
    elif isinstance(value, list | tuple) and all(isinstance(v, str) for v in value):
        lines = [part for item in value for part in (_split_lines(item) or [""])]
    else:
        raise ValueError("must be text (one operation a line) or a list of lines")
    if len(lines) > MAX_SPEC_LINES:
        raise ValueError(f"more than {MAX_SPEC_LINES} lines")
    specs = [spec for n, text in enumerate(lines, 1) if (spec := parse_spec_line(text, n))]
    if not specs:
        raise ValueError("no operation given (e.g. 'get 1.3.6.1.2.1.1.5.0')")
    return tuple(specs)
