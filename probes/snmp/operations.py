"""A job's operations on one agent, and the result entries and chunks they fill."""

from __future__ import annotations

import contextlib
from collections.abc import AsyncGenerator, Sequence
from typing import Any

from bridge.wire.errors import BridgeError
from bridge.wire.records import error_payload
from probes.snmp import values as sv
from probes.snmp.client import Missing, SnmpClient
from probes.snmp.params import SnmpParams
from probes.snmp.spec import OidSpec


class Output:
    """Result chunks: op entries of varbinds (or rows), at most ``chunk`` varbinds a chunk."""

    def __init__(self, header: dict[str, Any], *, chunk: int, cap: int) -> None:
        self.header = header
        self.chunk = chunk
        self.cap = cap
        self.results: list[dict[str, Any]] = []
        self.entry: dict[str, Any] | None = None  # the op entry being filled
        self.items = "varbinds"
        self.in_chunk = 0
        self.total = 0
        self.truncated = False

    @property
    def remaining(self) -> int:
        return self.cap - self.total

    def start(self, index: int, spec: OidSpec, oid: str, **extra: Any) -> None:
        self.items = "rows" if spec.op == "table" else "varbinds"
        self.entry = {
            "spec": index,
            "op": spec.op,
            "oid": oid,
            **extra,
            self.items: [],
            "truncated": False,
            "more": False,
        }
        self.results.append(self.entry)

    def add_many(self, items: list[dict[str, Any]]) -> bool:
        """:meth:`add` of each (varbinds of one answer); ``False`` once past the cap."""
        if self.total + len(items) > self.cap:
            return all(self.add(item) for item in items)  # stops at the first refused
        assert self.entry is not None
        self.entry[self.items].extend(items)
        self.total += len(items)
        self.in_chunk += len(items)
        return True

    def add(self, item: dict[str, Any], cost: int = 1) -> bool:
        """Append to the open entry; ``False`` (and nothing added) past the cap."""
        assert self.entry is not None
        if self.total + cost > self.cap:
            self.truncate()
            return False
        self.entry[self.items].append(item)
        self.total += cost
        self.in_chunk += cost
        return True

    def truncate(self) -> None:
        self.truncated = True
        if self.entry is not None:
            self.entry["truncated"] = True

    @property
    def full(self) -> bool:
        return self.in_chunk >= self.chunk

    def flush(self, *, open_entry: bool) -> dict[str, Any]:
        """The chunk so far; an unfinished entry goes on in the next chunk (``more``)."""
        chunk = {**self.header, "results": self.results}
        self.results = []
        self.in_chunk = 0
        if open_entry and self.entry is not None:
            self.entry["more"] = True
            self.entry = {**self.entry, self.items: [], "more": False}
            self.results.append(self.entry)
        return chunk


def _cell(oid: str, value: Any) -> dict[str, Any]:
    cell = sv.typed(oid, value)
    del cell["oid"]
    return cell


async def _table(
    client: SnmpClient, spec: OidSpec, params: SnmpParams, budget: int
) -> tuple[dict[str, str], list[dict[str, Any]], bool]:
    """``(columns, rows, truncated)`` of a table, reading at most ``budget`` cells."""
    table_oid = spec.oids[0]
    known = sv.TABLES.get(table_oid)
    entry = f"{table_oid}.1"

    def name(column: int) -> str:
        return known.columns.get(column, str(column)) if known else str(column)

    rows: dict[str, dict[str, Any]] = {}
    columns: dict[str, str] = {}
    cells = 0
    roots = [f"{entry}.{c}" for c in spec.columns] if spec.columns else [entry]
    for root in roots:
        if spec.columns:
            columns[name(int(root.rsplit(".", 1)[1]))] = root
        async with contextlib.aclosing(client.walk(root, params.max_repetitions)) as items:
            async for oid, value in items:
                if cells >= budget:
                    return columns, _sorted_rows(rows), True
                rest = oid[len(entry) + 1 :].split(".", 1)
                if len(rest) != 2:
                    continue  # not a cell (an agent answering outside the table)
                column = name(int(rest[0]))
                columns.setdefault(column, f"{entry}.{rest[0]}")
                rows.setdefault(rest[1], {})[column] = _cell(oid, value)
                cells += 1
    return columns, _sorted_rows(rows), False


def _sorted_rows(rows: dict[str, dict[str, Any]]) -> list[dict[str, Any]]:
    return [{"index": index, "values": rows[index]} for index in sorted(rows, key=sv.oid_key)]


async def operate(
    client: SnmpClient, specs: Sequence[OidSpec], params: SnmpParams, out: Output
) -> AsyncGenerator[dict[str, Any], None]:
    """Every operation of ``specs`` on one agent into ``out``; a chunk whenever it is full."""
    typed = sv.typed
    for index, spec in enumerate(specs):
        if spec.op == "get":
            values = await client.get(spec.oids)
            for oid in spec.oids:
                out.start(index, spec, oid)
                value = values[oid]
                item = (
                    sv.exception(oid, value.kind)
                    if isinstance(value, Missing)
                    else sv.typed(oid, value)
                )
                if not out.add(item):
                    break
        elif spec.op == "getnext":
            for oid in spec.oids:
                out.start(index, spec, oid)
                found = await client.successor(
                    oid, params.max_repetitions, max(params.max_varbinds, 1000)
                )
                item = (
                    sv.exception(oid, sv.END_OF_MIB_VIEW)
                    if found is None
                    else sv.typed(found[0], found[1])
                )
                if not out.add(item):
                    break
        elif spec.op == "walk":
            out.start(index, spec, spec.oids[0])
            async with contextlib.aclosing(
                client.walk_answers(spec.oids[0], params.max_repetitions, room=out.remaining)
            ) as answers:
                async for answer in answers:
                    items = [typed(oid, value) for oid, value in answer]
                    while items:  # exactly ``chunk_varbinds`` a chunk
                        room = out.chunk - out.in_chunk
                        if not out.add_many(items[:room]):
                            break
                        items = items[room:]
                        if out.full:
                            yield out.flush(open_entry=True)
                    if out.truncated:
                        break
        else:
            table = sv.TABLES.get(spec.oids[0])
            columns, rows, cut = await _table(client, spec, params, out.remaining)
            out.start(
                index, spec, spec.oids[0], name=table.name if table else None, columns=columns
            )
            for row in rows:
                out.add(row, cost=len(row["values"]))
                if out.full:
                    yield out.flush(open_entry=True)
            if cut:
                out.truncate()
        out.entry = None
        if out.truncated:
            break
        if out.full:
            yield out.flush(open_entry=False)


def failed_entry(index: int, host: str, error: BridgeError, requests: int) -> dict[str, Any]:
    """An agent of a hosts job that failed: the error, and the requests it was sent."""
    return {"index": index, "host": host, **error_payload(error), "requests": requests}


def gets_entry(
    index: int,
    host: str,
    address: str,
    oids: Sequence[str],
    found: dict[str, Any],
    requests: int,
) -> dict[str, Any]:
    """One agent's entry of a hosts job of GETs, from ``{oid: value or Missing}``
    (``oids``: every OID of the job's get lines, in order).

    Compact, since a poller's job answers thousands of agents: ``varbinds`` holds one typed
    varbind per OID in the order of the spec lines (the job's lines are all ``get``, so the
    per-operation grouping of ``results`` would add nothing); ``address`` only when it is
    not ``host`` itself; the version and credential are the job's (in each chunk).
    """
    varbinds: list[dict[str, Any]] = []
    for oid in oids:
        value = found[oid]
        missing = isinstance(value, Missing)
        varbinds.append(sv.exception(oid, value.kind) if missing else sv.typed(oid, value))
    entry: dict[str, Any] = {"index": index, "host": host}
    if address != host:
        entry["address"] = address
    entry["varbinds"] = varbinds
    entry["requests"] = requests
    return entry


def summary_of(out: Output, client: SnmpClient) -> dict[str, Any]:
    return {
        "varbinds": out.total,
        "truncated": out.truncated,
        "requests": client.requests,
        "bulk_resumed": client.resumed,
    }
