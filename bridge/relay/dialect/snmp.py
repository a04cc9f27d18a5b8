"""SNMP: ServiceNow's ``oid_spec_list`` in, the MIB tree of ``<result><snmp>..`` out.

ServiceNow ("SNMP probe parameters"): ``oid_spec_list`` holds one specification a line,
``walk {OID}`` or ``table {OID} {children}``; children are a comma list of the table's
columns (the ``xEntry.`` prefix may be left off), each with an optional filter in
parentheses, ``(=v)``, ``(!=v)`` or ``(#v)`` (contains): a row is kept if any filtered
child matches. ``//`` starts a comment. An OID is numeric or a MIB name path
(``iso.org.dod.internet.mgmt.mib-2.system``, ``ifTable``); one that starts with neither
``1.3.6.1`` nor ``iso.org.dod.internet`` is prefixed with ``1.3.6.1``.

To the bridge (``docs/probes/SNMP.md``): ``walk <numeric OID>`` and ``table <numeric
table OID> <column numbers>`` lines; the filters stay with the relay, which applies them
to the rows that come back. ``source`` → ``host``; ``timeout`` (ms) → ``timeout`` (s);
``retries``; ``port`` and ``version`` when given. ``index`` (Cisco community-string
indexing) other than 0 is refused: the bridge would read the default context instead.
Accepted and dropped: ``credential_id``, ``credential_tag`` (local credentials are used),
``established_session_timeout``, ``request_interval``, ``request_delay``, ``use_getbulk``,
``use_getscalar``, ``debug``, ``result_format`` (the answer is XML whatever it says).

The answer: one ``<result>`` holding ``<snmp>``, under it the OIDs as nested MIB names
(``bridge/relay/dialect/mib.py``), each value with a ServiceNow type name
(``type="SnmpOctetString"``...); a table's rows are ``<xEntry instance="<index>">``; a
scalar's ``.0`` is dropped, another instance is an ``instance`` attribute; an OID below
the known names is an ``<oid oid="<numeric>">`` element.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from typing import Any

from bridge.relay.dialect import mib
from bridge.relay.dialect.base import Dialect, Mapped, ParamReader
from bridge.relay.envelope import Element, child, element
from bridge.wire.errors import BadParameter

FIELD = "oid_spec_list"
_NUMERIC = re.compile(r"^\.?\d+(\.\d+)*$")
_CHILD = re.compile(r"^(?P<name>[^()]+?)\s*(?:\((?P<op>!=|=|#)(?P<value>.*)\))?$")
_SPLIT = re.compile(r"\s+(?=(?:walk|table|getnext|get)\s)", re.IGNORECASE)
_OPS = {"walk": "walk", "table": "table", "get": "get", "getnext": "getnext"}
TYPES = {
    "OctetString": "SnmpOctetString",
    "Integer32": "SnmpInteger",
    "Integer": "SnmpInteger",
    "Counter32": "SnmpCounter32",
    "Gauge32": "SnmpGauge32",
    "TimeTicks": "SnmpTimeTicks",
    "Counter64": "SnmpCounter64",
    "IpAddress": "SnmpIPAddress",
    "ObjectIdentifier": "SnmpObjectIdentifier",
    "Opaque": "SnmpOpaque",
    "Null": "SnmpNull",
}
_ABSENT = frozenset({"noSuchObject", "noSuchInstance", "endOfMibView"})


def resolve(text: str, where: str) -> str:
    """A numeric OID or a MIB name path → numeric, with ServiceNow's implied prefix."""
    word = text.strip()
    if _NUMERIC.match(word):
        oid = word.lstrip(".")
        if oid == mib.INTERNET or oid.startswith(mib.INTERNET + "."):
            return oid
        return f"{mib.INTERNET}.{oid}"
    parts = word.split(".")
    last = max(i for i, part in enumerate(parts) if not part.isdigit())
    name = parts[last]
    base = mib.OID_OF.get(name)
    if base is None:
        raise BadParameter(
            f"{where}: unknown MIB name {name[:60]!r} (give the numeric OID)", field=FIELD
        )
    for part in parts[:last]:
        if not part.isdigit() and part not in mib.OID_OF:
            raise BadParameter(f"{where}: unknown MIB name {part[:60]!r}", field=FIELD)
    return ".".join([base, *parts[last + 1 :]])


def _column(table: str, text: str, where: str) -> int:
    """A child of a table line (a column number, name, ``xEntry.name`` or full OID) → its
    column number."""
    word = text.strip()
    if word.isdigit():
        return int(word)
    entry = f"{table}.1"
    numeric = bool(_NUMERIC.match(word))
    oid = resolve(word, where) if numeric else mib.OID_OF.get(word.split(".")[-1], "")
    if mib.parent_of(oid) != entry:
        raise BadParameter(f"{where}: {word[:60]!r} is not a column of {table}", field=FIELD)
    return int(oid.rsplit(".", 1)[1])


def _lines(text: str) -> list[tuple[int, str]]:
    """(line number, specification) pairs: comments cut, and a line that lost its line
    breaks (an XML attribute value turns them into spaces) split before each operation."""
    out: list[tuple[int, str]] = []
    for number, raw in enumerate(text.replace("\r", "\n").split("\n"), 1):
        body = raw.split("//", 1)[0].strip()
        out.extend((number, part.strip()) for part in _SPLIT.split(body) if part.strip())
    return out


def parse_spec_list(text: str) -> tuple[list[str], list[dict[str, Any]]]:
    """ServiceNow's lines → (the bridge's lines, the row filters by line index)."""
    lines: list[str] = []
    filters: list[dict[str, Any]] = []
    for number, body in _lines(text):
        where = f"line {number}"
        words = body.split(None, 1)
        op = _OPS.get(words[0].lower())
        if op is None:
            raise BadParameter(f"{where}: {words[0][:40]!r} is not walk or table", field=FIELD)
        rest = words[1].strip() if len(words) > 1 else ""
        if not rest:
            raise BadParameter(f"{where}: {op} needs an OID", field=FIELD)
        if op != "table":
            lines.append(f"{op} {' '.join(resolve(w, where) for w in rest.split())}")
            continue
        table_word, *more = rest.split(None, 1)
        table = resolve(table_word, where)
        if mib.is_entry(table):
            table = mib.parent_of(table)
        columns: list[int] = []
        wanted: list[list[Any]] = []
        for item in (p for p in (more[0] if more else "").split(",") if p.strip()):
            match = _CHILD.match(item.strip())
            if match is None:
                raise BadParameter(f"{where}: {item[:60]!r} is not a child", field=FIELD)
            column = _column(table, match["name"], where)
            if column not in columns:
                columns.append(column)
            if match["op"]:
                wanted.append([column, match["op"], match["value"].strip()])
        line = f"table {table}"
        if columns:
            line += " " + ",".join(str(c) for c in columns)
        if wanted:
            filters.append({"line": len(lines), "table": table, "filters": wanted})
        lines.append(line)
    if not lines:
        raise BadParameter("no walk or table line", field=FIELD)
    return lines, filters


class SNMP(Dialect):
    topic = "SNMP"

    def map(self, reader: ParamReader) -> Mapped:
        spec = reader.text(FIELD)
        if spec is None:
            raise BadParameter("is missing", field=FIELD)
        lines, filters = parse_spec_list(spec)
        index = reader.text("index")
        if index not in (None, "0"):
            raise BadParameter(
                "Cisco community-string indexing is not supported by the bridge", field="index"
            )
        params: dict[str, Any] = {
            "host": reader.text("host", "source") or reader.row.get("source", ""),
            "oid_spec_list": lines,
        }
        timeout = reader.seconds_from_ms("timeout")
        if timeout is not None:
            params["timeout"] = timeout
        for name in ("retries", "port"):
            value = reader.integer(name)
            if value is not None:
                params[name] = value
        version = reader.text("version")
        if version is not None:
            params["version"] = version
        return Mapped(params, {"filters": filters})

    def results(self, payloads: Sequence[Any], extra: dict[str, Any]) -> list[Element]:
        entries = merge_entries(payloads)
        filters = {f["line"]: f["filters"] for f in extra.get("filters") or []}
        tree = _Tree()
        for entry in entries:
            if entry.get("op") == "table":
                rows = entry.get("rows") or []
                wanted = filters.get(entry.get("spec"))
                columns = entry.get("columns") or {}
                for row in rows:
                    if wanted and not _matches(row, columns, wanted):
                        continue
                    for name, cell in (row.get("values") or {}).items():
                        oid = columns.get(name) or f"{entry.get('oid')}.1.{name}"
                        tree.add(f"{oid}.{row.get('index')}", cell)
            else:
                for varbind in entry.get("varbinds") or []:
                    tree.add(str(varbind.get("oid")), varbind)
        result = element("result")
        result.append(tree.root)
        return [result]


def merge_entries(payloads: Sequence[Any]) -> list[dict[str, Any]]:
    """The operation entries of every chunk, an entry split over chunks (``more``) joined."""
    merged: list[dict[str, Any]] = []
    for payload in payloads:
        if not isinstance(payload, dict):
            continue
        for entry in payload.get("results") or []:
            if not isinstance(entry, dict):
                continue
            last = merged[-1] if merged else None
            if (
                last is not None
                and last.get("more")
                and all(last.get(k) == entry.get(k) for k in ("spec", "op", "oid"))
            ):
                items = "rows" if entry.get("op") == "table" else "varbinds"
                last[items] = list(last.get(items) or []) + list(entry.get(items) or [])
                last["more"] = entry.get("more", False)
                last["truncated"] = bool(last.get("truncated") or entry.get("truncated"))
                if entry.get("columns"):
                    last["columns"] = {**(last.get("columns") or {}), **entry["columns"]}
            else:
                merged.append(dict(entry))
    return merged


def _matches(row: dict[str, Any], columns: dict[str, str], wanted: list[list[Any]]) -> bool:
    by_number = {oid.rsplit(".", 1)[1]: name for name, oid in columns.items()}
    values = row.get("values") or {}
    for column, op, expected in wanted:
        name = by_number.get(str(column), str(column))
        cell = values.get(name)
        if cell is None:
            continue
        text = "" if cell.get("value") is None else str(cell.get("value"))
        if (op == "=" and text == expected) or (op == "!=" and text != expected):
            return True
        if op == "#" and expected in text:
            return True
    return False


class _Tree:
    """The ``<snmp>`` element, filled one value at a time."""

    def __init__(self) -> None:
        self.root = element("snmp")
        self.nodes: dict[str, Element] = {}

    def _node(self, oid: str) -> Element:
        """The element of a known OID, made with its ancestors as needed."""
        parent = self.root
        for prefix in mib.path_of(oid):
            node = self.nodes.get(prefix)
            if node is None:
                node = child(parent, mib.NAME_OF[prefix])
                self.nodes[prefix] = node
            parent = node
        return parent

    def add(self, oid: str, cell: dict[str, Any]) -> None:
        kind = str(cell.get("type", ""))
        if kind in _ABSENT:
            return
        attrs = {"type": TYPES.get(kind, f"Snmp{kind}" if kind else None)}
        value = cell.get("value")
        known = mib.known_prefix(oid)
        suffix = oid[len(known) + 1 :] if known else oid
        if known and mib.is_entry(mib.parent_of(known)) and suffix:
            entry = mib.parent_of(known)
            key = f"{entry}#{suffix}"
            row = self.nodes.get(key)
            if row is None:
                row = child(self._node(mib.parent_of(entry)), mib.NAME_OF[entry],
                            {"instance": suffix})  # fmt: skip
                self.nodes[key] = row
            child(row, mib.NAME_OF[known], attrs, value)
        elif known and known not in mib.PARENTS:
            parent = self._node(mib.parent_of(known)) if mib.parent_of(known) else self.root
            instance = None if suffix in ("", "0") else suffix
            child(parent, mib.NAME_OF[known], {**attrs, "instance": instance}, value)
        else:
            parent = self._node(known) if known else self.root
            child(parent, "oid", {"oid": oid, **attrs}, value)
