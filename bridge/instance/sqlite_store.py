"""The instance's tables in one SQLite file (WAL), behind the ``Store`` interface.

One connection, one thread (``bridge.wire.sqlite_thread.SQLiteThread``): every call runs
on a single-thread executor, so SQLite is never shared between threads and writes are
naturally ordered. Each call is one transaction. Listeners (``add_listener``) are told
of each committed write on the event loop, in commit order.

The schema is data (``bridge.instance.schema``): on open the built-in ``sys_db_object``
and ``sys_dictionary`` records are seeded and the tables made or migrated
(``bridge.instance.sqlite_schema``); a write to those two tables changes the tables in the
same transaction, and ``schema`` is rebuilt from the records once it is committed. A table
that extends another keeps its records in the hierarchy root's table, with
``sys_class_name``: every statement on it reads ``Table.physical`` and adds
``"sys_class_name" IN (<Table.classes>)`` (a root needs no restriction).

The hot path (ECC inserts, claims) costs dict lookups beyond SQLite: per table a cached
plan (column list, SELECT and INSERT text, boolean columns, defaults, class restriction),
dropped when the schema changes; an insert writes every column of the table in one
statement and builds the record it returns from what it wrote; an update builds it from
the row it read. Indexes: ``bridge.instance.sqlite_schema.INDEXES``. What both stores do
alike (the live schema, listeners, a write's checks, the Aggregate API's columns and
answer) is ``bridge.instance.store_core``; this module keeps SQLite's SQL and transactions.
"""

from __future__ import annotations

import logging
import os
import sqlite3
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any, TypeVar

from bridge.instance import schema, sqlite_schema
from bridge.instance.query import SQL
from bridge.instance.schema import META_TABLES, Catalog
from bridge.instance.sqlite_schema import Plan
from bridge.instance.store import (
    Aggregate,
    Change,
    Conflict,
    FieldError,
    InvalidFields,
    QueryContext,
    Record,
    StoreError,
    Table,
    same_answer,
)
from bridge.instance.store_core import (
    StoreCore,
    aggregate_columns,
    aggregate_rows,
    changed_fields,
    now_text,
    prepare_insert,
    written,
)
from bridge.wire.sqlite_thread import SQLiteThread

log = logging.getLogger("midbridge.instance.store")

T = TypeVar("T")

DB_FILE_SUFFIXES = ("", "-wal", "-shm", "-journal")


def _create_owner_only(path: Path) -> None:
    """Make the database file mode 600 (its directory 700 when made here) before SQLite
    opens it: it holds password hashes and every payload. SQLite gives its -wal, -shm and
    -journal files the database file's mode."""
    path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
    os.close(os.open(path, os.O_CREAT | os.O_RDWR, 0o600))
    _owner_only(path)


def _owner_only(path: Path) -> None:
    """Take group and other access away from the database's files we own."""
    for suffix in DB_FILE_SUFFIXES:
        part = path.with_name(path.name + suffix)
        try:
            mode = part.stat()
        except FileNotFoundError:
            continue
        if mode.st_mode & 0o077 and mode.st_uid == os.getuid():
            os.chmod(part, 0o600)


class SQLiteStore(StoreCore[Plan]):
    """The ``Store`` on one SQLite file (``":memory:"`` for a throwaway one).

    Use ``await SQLiteStore.open(path)`` (or ``async with SQLiteStore(path)``).
    """

    def __init__(self, path: Path | str) -> None:
        super().__init__(Plan, "sqlite")
        self.path = path
        self._thread = SQLiteThread(thread_name="midbridge-instance", what="instance store")

    @classmethod
    async def open(cls, path: Path | str) -> SQLiteStore:
        store = cls(path)
        await store._call(store._open)
        return store

    async def __aenter__(self) -> SQLiteStore:
        await self._call(self._open)
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    async def close(self) -> None:
        await self._thread.close()

    async def _call(self, fn: Callable[..., T], *args: Any) -> T:
        return await self._thread.call(fn, *args)

    # --- executor-thread side -----------------------------------------------------------

    def file_path(self) -> Path | None:
        """The database file, or None for ``":memory:"`` (or a ``file:`` URI)."""
        if isinstance(self.path, Path):
            return self.path
        if self.path in ("", ":memory:") or self.path.startswith("file:"):
            return None
        return Path(self.path)

    def _open(self) -> None:
        path = self.file_path()
        try:
            if path is not None:
                _create_owner_only(path)
            db = sqlite3.connect(self.path, isolation_level=None, check_same_thread=True)
            db.execute("PRAGMA journal_mode=WAL")
            if path is not None:
                _owner_only(path)  # the -wal and -shm files SQLite just made, too
        except (OSError, sqlite3.Error) as exc:
            raise StoreError(f"cannot open the database {self.path}: {exc}") from exc
        self._publish(self._migrate(db))
        self._thread.db = db

    @staticmethod
    def _migrate(db: sqlite3.Connection) -> Catalog:
        db.execute("PRAGMA synchronous=NORMAL")
        db.execute("PRAGMA busy_timeout=5000")  # the CLI may write while a server runs
        db.execute("BEGIN IMMEDIATE")
        try:
            catalog = sqlite_schema.open_schema(db, now_text())
            db.execute("COMMIT")
        except BaseException:
            db.execute("ROLLBACK")
            db.close()
            raise
        return catalog

    def _conn(self) -> sqlite3.Connection:
        return self._thread.conn()

    def _get(self, plan: Plan, sys_id: str) -> Record | None:
        params = (sys_id, *plan.restrict_params)
        row = self._conn().execute(plan.by_id(), params).fetchone()
        return None if row is None else plan.record(row)

    def _insert_row(self, plan: Plan, values: Record, *, or_ignore: bool = False) -> Record | None:
        row = plan.full_row(values)
        try:
            cur = self._conn().execute(plan.insert_ignore if or_ignore else plan.insert, row)
        except sqlite3.IntegrityError as exc:
            raise Conflict(_conflict_message(plan.table, values, exc)) from None
        if or_ignore and cur.rowcount != 1:
            return None
        return plan.record(row)

    def _check_references(self, plan: Plan, values: Mapping[str, Any]) -> None:
        for name, target in plan.strict_refs:  # only the strict (cascading) ones must exist
            if name in values:
                table = self._catalog.tables.get(target or "")
                if table is None or self._get(self._plan(table), values[name]) is None:
                    raise FieldError(
                        plan.table.name, name, f"no {target} record with sys_id {values[name]!r}"
                    )

    def _insert_many(
        self, table: Table, rows: Sequence[Mapping[str, Any]], actor: str
    ) -> list[Change]:
        plan = self._plan(table)
        now = now_text()
        prepared = [prepare_insert(plan, row, now, actor) for row in rows]
        if table.name in META_TABLES:
            return self._insert_meta(table, prepared, now, actor)
        db = self._conn()
        db.execute("BEGIN IMMEDIATE")
        try:
            out = []
            for values in prepared:
                self._check_references(plan, values)
                record = self._insert_row(plan, values)
                assert record is not None
                out.append(Change(table.name, "insert", record))
            db.execute("COMMIT")
        except BaseException:
            db.execute("ROLLBACK")
            raise
        return out

    def _insert_input_once(self, fields: Mapping[str, Any], actor: str) -> tuple[Record, bool]:
        plan = self._plan(self.table("ecc_queue"))
        values = prepare_insert(plan, {**fields, "queue": "input"}, now_text(), actor)
        db = self._conn()
        db.execute("BEGIN IMMEDIATE")
        try:
            record = self._insert_row(plan, values, or_ignore=True)
            inserted = record is not None
            if record is None:
                record = self._get(plan, values["sys_id"])
                if values.get("sequence") is not None:
                    row = db.execute(
                        plan.select + ' WHERE "queue" = \'input\' AND "response_to" = ?'
                        ' AND "run" = ? AND "sequence" = ?',
                        (values.get("response_to", ""), values.get("run", ""), values["sequence"]),
                    ).fetchone()
                    if row is not None:
                        record = plan.record(row)
            db.execute("COMMIT")
        except BaseException:
            db.execute("ROLLBACK")
            raise
        if record is None:  # ignored, yet no record holds its keys: cannot happen
            raise Conflict("ecc_queue input record was refused")
        if not inserted and not same_answer(record, values):
            # The sys_id is another record's (an output, another agent's input): say
            # nothing of it, or a caller could read any record by naming its sys_id.
            raise Conflict("an ecc_queue record with this sys_id exists")
        return record, inserted

    def _query(self, plan: Plan, sql: SQL, limit: int | None, offset: int) -> list[Record]:
        where, params = plan.where(sql)
        text = f"{plan.select}{where} {sql.order_by} LIMIT ? OFFSET ?"
        rows = self._conn().execute(text, (*params, -1 if limit is None else limit, offset))
        return [plan.record(row) for row in rows]

    def _sys_ids(self, plan: Plan, sql: SQL, limit: int) -> list[str]:
        where, params = plan.where(sql)
        text = f'SELECT "sys_id" FROM "{plan.physical}"{where} {sql.order_by} LIMIT ?'
        return [str(row[0]) for row in self._conn().execute(text, (*params, limit))]

    def _count(self, plan: Plan, sql: SQL) -> int:
        where, params = plan.where(sql)
        (count,) = (
            self._conn()
            .execute(f'SELECT COUNT(*) FROM "{plan.physical}"{where}', params)
            .fetchone()
        )
        return int(count)

    def _aggregate(
        self, plan: Plan, sql: SQL, groups: list[str], count: bool, stats: list[tuple[str, str]]
    ) -> list[Aggregate]:
        exprs, placeholder = aggregate_columns(plan.table, groups, count, stats)
        where, params = plan.where(sql)
        text = f'SELECT {", ".join(exprs)} FROM "{plan.physical}"{where}'
        if groups:
            keys = ", ".join(f'"{g}"' for g in groups)
            text += f" GROUP BY {keys} ORDER BY {keys}"
        rows = self._conn().execute(text, params)
        return aggregate_rows(plan, rows, groups, count, placeholder, stats)

    def _write(
        self, plan: Plan, rowids: Sequence[int], previous: Sequence[Record], values: Record,
        stamp: str, actor: str,
    ) -> list[Record]:  # fmt: skip
        """Set ``values`` (as stored) on the rows; the records as they are now."""
        self._check_references(plan, values)
        values = {**values, "sys_updated_on": stamp, "sys_updated_by": actor}
        assigns = ", ".join(f'"{n}" = ?' for n in values)
        try:
            self._conn().executemany(
                f'UPDATE "{plan.physical}" SET {assigns}, '
                '"sys_mod_count" = COALESCE("sys_mod_count", 0) + 1 WHERE rowid = ?',
                [(*values.values(), rowid) for rowid in rowids],
            )
        except sqlite3.IntegrityError as exc:
            raise Conflict(_conflict_message(plan.table, values, exc)) from None
        return written(plan, values, previous)

    def _update(
        self, table: Table, sys_id: str, fields: Mapping[str, Any], actor: str
    ) -> tuple[Record | None, list[Change]]:
        plan = self._plan(table)
        values = self._prepare_update(plan, fields)
        db = self._conn()
        db.execute("BEGIN IMMEDIATE")
        try:
            row = db.execute(
                plan.select_rowid
                + ' WHERE "sys_id" = ?'
                + (f" AND {plan.restrict}" if plan.restrict else ""),
                (sys_id, *plan.restrict_params),
            ).fetchone()
            if row is None:
                db.execute("COMMIT")
                return None, []
            previous = plan.record(row[1:])
            if table.name in META_TABLES:
                record, changes = sqlite_schema.update_meta(
                    db, self._catalog, table.name, previous, values, now_text(), actor
                )
                catalog = sqlite_schema.load(db) if changes else None
            else:
                values = schema.derived(table, previous, values)
                changed = changed_fields(plan, values, previous)
                record, changes, catalog = previous, [], None
                if changed:  # nothing changed: nothing written (as ServiceNow does)
                    (record,) = self._write(plan, [row[0]], [previous], changed, now_text(), actor)
                    changes = [Change(table.name, "update", record, previous)]
            db.execute("COMMIT")
        except BaseException:
            db.execute("ROLLBACK")
            raise
        if catalog is not None:
            self._publish(catalog)
        return record, changes

    def _update_query(
        self, table: Table, sql: SQL, fields: Mapping[str, Any], limit: int | None, actor: str
    ) -> list[Change]:
        plan = self._plan(table)
        values = self._prepare_update(plan, fields)
        db = self._conn()
        where, params = plan.where(sql)
        text = f"{plan.select_rowid}{where} {sql.order_by} LIMIT ?"
        db.execute("BEGIN IMMEDIATE")
        try:
            rows = db.execute(text, (*params, -1 if limit is None else limit)).fetchall()
            previous = [plan.record(row[1:]) for row in rows]
            stamp = now_text()
            catalog = None
            if not values:
                after = previous
            elif table.name in META_TABLES:
                after = []
                for before in previous:
                    record, _ = sqlite_schema.update_meta(
                        db, catalog or self._catalog, table.name, before, values, stamp, actor
                    )
                    after.append(record)
                    catalog = sqlite_schema.load(db)
            elif table.name in schema.DERIVED:  # the values may differ row by row
                after = []
                for row, before in zip(rows, previous, strict=True):
                    changed = schema.derived(table, before, values)
                    after += self._write(plan, [row[0]], [before], changed, stamp, actor)
            else:
                after = self._write(plan, [row[0] for row in rows], previous, values, stamp, actor)
            db.execute("COMMIT")
        except BaseException:
            db.execute("ROLLBACK")
            raise
        if catalog is not None:
            self._publish(catalog)
        return [Change(table.name, "update", a, b) for a, b in zip(after, previous, strict=True)]

    def _delete(self, table: Table, sys_id: str) -> list[Change]:
        """Delete the record and whatever references it with cascade, recursively."""
        plan = self._plan(table)
        db = self._conn()
        db.execute("BEGIN IMMEDIATE")
        try:
            record = self._get(plan, sys_id)
            if record is None:
                db.execute("COMMIT")
                return []
            if table.name in META_TABLES:
                changes = sqlite_schema.delete_meta(db, self._catalog, table.name, record)
                catalog: Catalog | None = sqlite_schema.load(db)
            else:
                changes = [Change(table.name, "delete", record), *self._cascade(plan, sys_id)]
                db.execute(f'DELETE FROM "{plan.physical}" WHERE "sys_id" = ?', (sys_id,))
                catalog = None
            db.execute("COMMIT")
        except BaseException:
            db.execute("ROLLBACK")
            raise
        if catalog is not None:
            self._publish(catalog)
        return changes

    def _cascade(self, plan: Plan, sys_id: str) -> list[Change]:
        db = self._conn()
        out: list[Change] = []
        seen = {sys_id}
        todo = [(plan.physical, sys_id)]
        while todo:
            physical, target = todo.pop(0)
            for other, name in self._cascades.get(physical, ()):
                referencing = self._plan(other)
                rows = db.execute(referencing.select + f' WHERE "{name}" = ?', (target,)).fetchall()
                if not rows:
                    continue
                db.execute(f'DELETE FROM "{referencing.physical}" WHERE "{name}" = ?', (target,))
                for row in rows:
                    record = referencing.record(row)
                    if record["sys_id"] not in seen:
                        seen.add(record["sys_id"])
                        out.append(Change(other.name, "delete", record))
                        todo.append((referencing.physical, record["sys_id"]))
        return out

    def _insert_meta(
        self, table: Table, prepared: Sequence[Record], now: str, actor: str
    ) -> list[Change]:
        db = self._conn()
        catalog = self._catalog
        db.execute("BEGIN IMMEDIATE")
        try:
            out = []
            for values in prepared:
                _record, changes = sqlite_schema.insert_meta(
                    db, catalog, table.name, values, now, actor
                )
                out += changes
                catalog = sqlite_schema.load(db)
            db.execute("COMMIT")
        except BaseException:
            db.execute("ROLLBACK")
            raise
        self._publish(catalog)
        return out

    # --- async API ----------------------------------------------------------------------

    async def insert(
        self, table: str, fields: Mapping[str, Any], *, actor: str = "system"
    ) -> Record:
        (record,) = await self.insert_many(table, [fields], actor=actor)
        return record

    async def insert_many(
        self, table: str, rows: Sequence[Mapping[str, Any]], *, actor: str = "system"
    ) -> list[Record]:
        spec = self.table(table)
        changes = await self._call(self._insert_many, spec, rows, actor)
        self._tell(changes)
        return [c.record for c in changes if c.table == table]

    async def insert_input_once(
        self, fields: Mapping[str, Any], *, actor: str = "system"
    ) -> tuple[Record, bool]:
        if fields.get("queue", "input") != "input":
            raise FieldError("ecc_queue", "queue", "insert_input_once takes input records")
        record, inserted = await self._call(self._insert_input_once, fields, actor)
        if inserted:
            self._tell([Change("ecc_queue", "insert", record)])
        return record, inserted

    async def get(self, table: str, sys_id: str) -> Record | None:
        spec = self.table(table)
        return await self._call(lambda: self._get(self._plan(spec), sys_id))

    async def sys_ids(self, table: str, encoded_query: str = "", *, limit: int) -> list[str]:
        spec = self.table(table)
        sql = self._compile(encoded_query, spec, (), "error", None)
        return await self._call(lambda: self._sys_ids(self._plan(spec), sql, max(0, limit)))

    async def query(
        self,
        table: str,
        encoded_query: str = "",
        *,
        hidden: Sequence[str] = (),
        limit: int | None = None,
        offset: int = 0,
        invalid: InvalidFields = "error",
        context: QueryContext | None = None,
    ) -> list[Record]:
        """Records matching, in the query's order (then insertion order).

        ``hidden``: fields the query may not use (the API passes the write-only ones).
        """
        spec = self.table(table)
        sql = self._compile(encoded_query, spec, hidden, invalid, context)
        return await self._call(lambda: self._query(self._plan(spec), sql, limit, max(0, offset)))

    async def count(
        self,
        table: str,
        encoded_query: str = "",
        *,
        hidden: Sequence[str] = (),
        invalid: InvalidFields = "error",
        context: QueryContext | None = None,
    ) -> int:
        spec = self.table(table)
        sql = self._compile(encoded_query, spec, hidden, invalid, context)
        return await self._call(lambda: self._count(self._plan(spec), sql))

    async def _grouped(
        self, plan: Plan, sql: SQL, groups: list[str], count: bool, stats: list[tuple[str, str]]
    ) -> list[Aggregate]:
        return await self._call(self._aggregate, plan, sql, groups, count, stats)

    async def update(
        self, table: str, sys_id: str, fields: Mapping[str, Any], *, actor: str = "system"
    ) -> Record | None:
        spec = self.table(table)
        record, changes = await self._call(self._update, spec, sys_id, fields, actor)
        self._tell(changes)
        return record

    async def update_query(
        self,
        table: str,
        encoded_query: str,
        fields: Mapping[str, Any],
        *,
        limit: int | None = None,
        actor: str = "system",
    ) -> list[Record]:
        spec = self.table(table)
        sql = self._compile(encoded_query, spec)
        changes = await self._call(self._update_query, spec, sql, fields, limit, actor)
        if fields:
            self._tell(changes)
        return [c.record for c in changes]

    async def delete(self, table: str, sys_id: str) -> bool:
        spec = self.table(table)
        changes = await self._call(self._delete, spec, sys_id)
        self._tell(changes)
        return bool(changes)


def _conflict_message(table: Table, values: Mapping[str, Any], exc: sqlite3.IntegrityError) -> str:
    text = str(exc)
    if "ecc_queue_input_chunk" in text or ("response_to" in text and "sequence" in text):
        return (
            "ecc_queue: an input record with this response_to, run and sequence is already stored"
        )
    if "sys_id" in text:
        return f"{table.name}: a record with sys_id {values.get('sys_id')!r} already exists"
    for fields in table.unique:
        if all(f"{table.name}.{f}" in text for f in fields):
            shown = ", ".join(f"{f}={values.get(f)!r}" for f in fields)
            return f"{table.name}: a record with {shown} already exists"
    return f"{table.name}: {text}"
