"""The instance's tables in one SQLite file (WAL), behind the ``Store`` interface.

One connection, one thread (``bridge.wire.sqlite_thread.SQLiteThread``): every call runs
on a single-thread executor, so SQLite is never shared between threads and writes are
naturally ordered. Each call is one transaction. Listeners (``add_listener``) are told
of each committed write on the event loop, in commit order.

The schema follows ``bridge.instance.store.TABLES``: a table per entry, a column per
field (strings ``TEXT NOT NULL DEFAULT ''``, booleans ``INTEGER`` 0/1, integers and reals
nullable), plus the unique constraints and these indexes:

- ``ecc_queue(agent, queue, state, priority)``: a MID's ready outputs, by lane;
- ``ecc_queue(queue, state, lease_until)``: expired leases to hand out again;
- ``ecc_queue(response_to, sequence)``: the inputs answering an output;
- unique ``ecc_queue(response_to, run, sequence) WHERE queue = 'input' AND sequence IS NOT
  NULL``: a repeated input chunk is stored once (``insert_input_once``);
- ``ecc_dead_letter(agent)``: an agent's dead letters, counted against its budget for every
  refused message.

Columns missing from an older file are added when it is opened.
"""

from __future__ import annotations

import logging
import os
import re
import sqlite3
import time
import uuid
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any, TypeVar

import orjson

from bridge.instance.query import SQL, compile_query
from bridge.instance.store import (
    TABLES,
    Change,
    Conflict,
    FieldError,
    FieldType,
    Listener,
    Record,
    StoreError,
    Table,
    UnknownTable,
    same_answer,
)
from bridge.wire.sqlite_thread import SQLiteThread

log = logging.getLogger("midbridge.instance.store")

T = TypeVar("T")

SYS_ID = re.compile(r"[A-Za-z0-9_.:-]{1,64}")

_INDEXES = (
    'CREATE INDEX IF NOT EXISTS ecc_queue_lane ON ecc_queue("agent", "queue", "state", "priority")',
    'CREATE INDEX IF NOT EXISTS ecc_queue_lease ON ecc_queue("queue", "state", "lease_until")',
    'CREATE INDEX IF NOT EXISTS ecc_queue_response ON ecc_queue("response_to", "sequence")',
    'CREATE UNIQUE INDEX IF NOT EXISTS ecc_queue_input_chunk ON ecc_queue("response_to", "run", '
    '"sequence") WHERE "queue" = \'input\' AND "sequence" IS NOT NULL',
    'CREATE INDEX IF NOT EXISTS sys_user_has_role_role ON sys_user_has_role("role")',
    'CREATE INDEX IF NOT EXISTS ecc_dead_letter_agent ON ecc_dead_letter("agent")',
)


def now_text() -> str:
    """The current UTC time as ServiceNow writes it: ``YYYY-MM-DD HH:MM:SS``."""
    return time.strftime("%Y-%m-%d %H:%M:%S", time.gmtime())


def _column_sql(name: str, kind: FieldType, default: Any) -> str:
    if name == "sys_id":
        return '"sys_id" TEXT NOT NULL PRIMARY KEY'
    if kind is FieldType.STRING:
        text = "" if default is None else str(default)
        return f"\"{name}\" TEXT NOT NULL DEFAULT '{text}'"  # defaults are ours, not input
    if kind is FieldType.BOOLEAN:
        return f'"{name}" INTEGER NOT NULL DEFAULT {1 if default else 0}'
    sql_type = "INTEGER" if kind is FieldType.INTEGER else "REAL"
    return f'"{name}" {sql_type}' + ("" if default is None else f" DEFAULT {default}")


def _create_sql(table: Table) -> list[str]:
    cols = [_column_sql(f.name, f.type, f.default) for f in table.fields.values()]
    for fields in table.unique:
        cols.append("UNIQUE (" + ", ".join(f'"{f}"' for f in fields) + ")")
    return [f'CREATE TABLE IF NOT EXISTS "{table.name}" (' + ", ".join(cols) + ")"]


def _coerce(table: Table, name: str, value: Any) -> Any:
    """A value as the column holds it (see ``bridge.instance.store``); FieldError if not."""
    kind = table.fields[name].type
    if kind is FieldType.STRING:
        if value is None:
            return ""
        if isinstance(value, str):
            return value
        if isinstance(value, bool):
            return "true" if value else "false"
        if isinstance(value, int | float):
            return str(value)
        if isinstance(value, dict | list):
            return orjson.dumps(value).decode()
        raise FieldError(table.name, name, f"expected text, got {type(value).__name__}")
    if kind is FieldType.BOOLEAN:
        if isinstance(value, bool):
            return int(value)
        if value in (0, 1) and isinstance(value, int):
            return value
        if isinstance(value, str) and value.lower() in ("true", "false", "1", "0"):
            return 1 if value.lower() in ("true", "1") else 0
        raise FieldError(table.name, name, f"expected true or false, got {value!r}")
    if value is None or value == "":
        return None
    if isinstance(value, bool):
        raise FieldError(table.name, name, f"expected a number, got {value!r}")
    if kind is FieldType.INTEGER:
        if isinstance(value, int):
            return value
        if isinstance(value, float) and value.is_integer():
            return int(value)
        number = _parsed(int, value)
        if number is not None:
            return number
        raise FieldError(table.name, name, f"expected an integer, got {value!r}")
    if isinstance(value, int | float):
        return float(value)
    real = _parsed(float, value)
    if real is not None:
        return real
    raise FieldError(table.name, name, f"expected a number, got {value!r}")


def _parsed(parse: Callable[[str], T], value: Any) -> T | None:
    """``parse`` of a text value (stripped); None if it is not text or does not parse."""
    if not isinstance(value, str):
        return None
    try:
        return parse(value.strip())
    except ValueError:
        return None


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


class SQLiteStore:
    """The ``Store`` on one SQLite file (``":memory:"`` for a throwaway one).

    Use ``await SQLiteStore.open(path)`` (or ``async with SQLiteStore(path)``).
    """

    def __init__(self, path: Path | str) -> None:
        self.path = path
        self._thread = SQLiteThread(thread_name="midbridge-instance", what="instance store")
        self._listeners: list[Listener] = []
        self._columns: dict[str, list[str]] = {
            name: list(table.fields) for name, table in TABLES.items()
        }

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

    # --- listeners --------------------------------------------------------------------

    def add_listener(self, listener: Listener) -> Callable[[], None]:
        self._listeners.append(listener)

        def remove() -> None:
            if listener in self._listeners:
                self._listeners.remove(listener)

        return remove

    def _tell(self, changes: Sequence[Change]) -> None:
        for change in changes:
            for listener in list(self._listeners):
                try:
                    listener(change)
                except Exception:
                    log.exception("store listener %r failed on %s", listener, change.op)

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
        self._migrate(db)
        self._thread.db = db

    @staticmethod
    def _migrate(db: sqlite3.Connection) -> None:
        db.execute("PRAGMA synchronous=NORMAL")
        db.execute("PRAGMA busy_timeout=5000")  # the CLI may write while a server runs
        db.execute("BEGIN IMMEDIATE")
        try:
            for table in TABLES.values():
                for statement in _create_sql(table):
                    db.execute(statement)
                have = {row[1] for row in db.execute(f'PRAGMA table_info("{table.name}")')}
                for spec in table.fields.values():
                    if spec.name not in have:
                        column = _column_sql(spec.name, spec.type, spec.default)
                        db.execute(f'ALTER TABLE "{table.name}" ADD COLUMN {column}')
            for statement in _INDEXES:
                db.execute(statement)
            db.execute("COMMIT")
        except BaseException:
            db.execute("ROLLBACK")
            db.close()
            raise

    def _conn(self) -> sqlite3.Connection:
        return self._thread.conn()

    def _record(self, table: Table, row: Sequence[Any]) -> Record:
        record: Record = {}
        for name, value in zip(self._columns[table.name], row, strict=True):
            if table.fields[name].type is FieldType.BOOLEAN:
                value = bool(value)
            record[name] = value
        return record

    def _select_sql(self, table: Table, *, rowid: bool = False) -> str:
        cols = ", ".join(f'"{c}"' for c in self._columns[table.name])
        return f'SELECT {"rowid, " if rowid else ""}{cols} FROM "{table.name}"'

    def _get(self, table: Table, sys_id: str) -> Record | None:
        row = (
            self._conn()
            .execute(self._select_sql(table) + ' WHERE "sys_id" = ?', (sys_id,))
            .fetchone()
        )
        return None if row is None else self._record(table, row)

    def _prepare_insert(self, table: Table, fields: Mapping[str, Any], now: str) -> Record:
        values: Record = {}
        for name, value in fields.items():
            spec = table.fields.get(name)
            if spec is None:
                raise FieldError(table.name, name, "no such field")
            if spec.read_only:
                raise FieldError(table.name, name, "read-only field")
            values[name] = _coerce(table, name, value)
        sys_id = values.get("sys_id") or uuid.uuid4().hex
        if not isinstance(sys_id, str) or not SYS_ID.fullmatch(sys_id):
            raise FieldError(table.name, "sys_id", "must be 1-64 of A-Za-z0-9_.:-")
        values["sys_id"] = sys_id
        values["sys_created_on"] = now
        values["sys_updated_on"] = now
        return values

    def _insert_row(self, table: Table, values: Record, *, or_ignore: bool = False) -> bool:
        names = list(values)
        cols = ", ".join(f'"{n}"' for n in names)
        marks = ", ".join("?" * len(names))
        verb = "INSERT OR IGNORE" if or_ignore else "INSERT"
        try:
            cur = self._conn().execute(
                f'{verb} INTO "{table.name}" ({cols}) VALUES ({marks})',
                [values[n] for n in names],
            )
        except sqlite3.IntegrityError as exc:
            raise Conflict(_conflict_message(table, values, exc)) from None
        return cur.rowcount == 1

    def _check_references(self, table: Table, values: Mapping[str, Any]) -> None:
        for name, value in values.items():
            spec = table.fields[name]
            if spec.reference is None or not spec.cascade_delete:
                continue  # only the strict (cascading) references must exist
            target = TABLES[spec.reference]
            if self._get(target, value) is None:
                raise FieldError(table.name, name, f"no {target.name} record with sys_id {value!r}")

    def _insert_many(self, table: Table, rows: Sequence[Mapping[str, Any]]) -> list[Record]:
        db = self._conn()
        now = now_text()
        prepared = [self._prepare_insert(table, row, now) for row in rows]
        db.execute("BEGIN IMMEDIATE")
        try:
            out = []
            for values in prepared:
                self._check_references(table, values)
                self._insert_row(table, values)
                record = self._get(table, values["sys_id"])
                assert record is not None
                out.append(record)
            db.execute("COMMIT")
        except BaseException:
            db.execute("ROLLBACK")
            raise
        return out

    def _insert_input_once(self, fields: Mapping[str, Any]) -> tuple[Record, bool]:
        table = TABLES["ecc_queue"]
        values = self._prepare_insert(table, {**fields, "queue": "input"}, now_text())
        db = self._conn()
        db.execute("BEGIN IMMEDIATE")
        try:
            inserted = self._insert_row(table, values, or_ignore=True)
            record = self._get(table, values["sys_id"])
            if not inserted and values.get("sequence") is not None:
                row = db.execute(
                    self._select_sql(table) + ' WHERE "queue" = \'input\' AND "response_to" = ?'
                    ' AND "run" = ? AND "sequence" = ?',
                    (values.get("response_to", ""), values.get("run", ""), values["sequence"]),
                ).fetchone()
                if row is not None:
                    record = self._record(table, row)
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

    def _query(self, table: Table, sql: SQL, limit: int | None, offset: int) -> list[Record]:
        text = self._select_sql(table)
        if sql.where:
            text += " WHERE " + sql.where
        text += " " + sql.order_by + " LIMIT ? OFFSET ?"
        params = (*sql.params, -1 if limit is None else limit, offset)
        return [self._record(table, row) for row in self._conn().execute(text, params)]

    def _count(self, table: Table, sql: SQL) -> int:
        text = f'SELECT COUNT(*) FROM "{table.name}"'
        if sql.where:
            text += " WHERE " + sql.where
        (count,) = self._conn().execute(text, sql.params).fetchone()
        return int(count)

    def _prepare_update(self, table: Table, fields: Mapping[str, Any]) -> Record:
        values: Record = {}
        for name, value in fields.items():
            spec = table.fields.get(name)
            if spec is None:
                raise FieldError(table.name, name, "no such field")
            if spec.read_only or name == "sys_id":
                raise FieldError(table.name, name, "read-only field")
            values[name] = _coerce(table, name, value)
        return values

    def _write(self, table: Table, rowids: Sequence[int], values: Record) -> None:
        self._check_references(table, values)
        assigns = ", ".join(f'"{n}" = ?' for n in values)
        try:
            self._conn().executemany(
                f'UPDATE "{table.name}" SET {assigns} WHERE rowid = ?',
                [(*values.values(), rowid) for rowid in rowids],
            )
        except sqlite3.IntegrityError as exc:
            raise Conflict(_conflict_message(table, values, exc)) from None

    def _update(
        self, table: Table, sys_id: str, fields: Mapping[str, Any]
    ) -> tuple[Record | None, Record | None]:
        values = self._prepare_update(table, fields)
        db = self._conn()
        db.execute("BEGIN IMMEDIATE")
        try:
            row = db.execute(
                self._select_sql(table, rowid=True) + ' WHERE "sys_id" = ?',
                (sys_id,),
            ).fetchone()
            if row is None:
                db.execute("COMMIT")
                return None, None
            previous = self._record(table, row[1:])
            if values:
                values = _new_key_clears_validation(table, previous, values)
                self._write(table, [row[0]], {**values, "sys_updated_on": now_text()})
            record = self._get(table, sys_id)
            db.execute("COMMIT")
        except BaseException:
            db.execute("ROLLBACK")
            raise
        return record, previous

    def _update_query(
        self, table: Table, sql: SQL, fields: Mapping[str, Any], limit: int | None
    ) -> list[tuple[Record, Record]]:
        values = self._prepare_update(table, fields)
        db = self._conn()
        text = self._select_sql(table, rowid=True)
        if sql.where:
            text += " WHERE " + sql.where
        text += " " + sql.order_by + " LIMIT ?"
        db.execute("BEGIN IMMEDIATE")
        try:
            rows = db.execute(text, (*sql.params, -1 if limit is None else limit)).fetchall()
            previous = [self._record(table, row[1:]) for row in rows]
            stamp = now_text()
            if rows and values and table.name == "ecc_agent":
                for row, before in zip(rows, previous, strict=True):  # a new key, row by row
                    changed = _new_key_clears_validation(table, before, values)
                    self._write(table, [row[0]], {**changed, "sys_updated_on": stamp})
            elif rows and values:
                self._write(table, [row[0] for row in rows], {**values, "sys_updated_on": stamp})
            out = []
            for before in previous:
                after = self._get(table, before["sys_id"])
                assert after is not None
                out.append((after, before))
            db.execute("COMMIT")
        except BaseException:
            db.execute("ROLLBACK")
            raise
        return out

    def _delete(self, table: Table, sys_id: str) -> list[tuple[str, Record]]:
        """Delete the record and whatever references it with cascade; (table, record) each."""
        db = self._conn()
        db.execute("BEGIN IMMEDIATE")
        try:
            record = self._get(table, sys_id)
            if record is None:
                db.execute("COMMIT")
                return []
            deleted: list[tuple[str, Record]] = []
            for other in TABLES.values():
                for spec in other.fields.values():
                    if spec.reference == table.name and spec.cascade_delete:
                        rows = db.execute(
                            self._select_sql(other) + f' WHERE "{spec.name}" = ?', (sys_id,)
                        ).fetchall()
                        db.execute(f'DELETE FROM "{other.name}" WHERE "{spec.name}" = ?', (sys_id,))
                        deleted.extend((other.name, self._record(other, r)) for r in rows)
            db.execute(f'DELETE FROM "{table.name}" WHERE "sys_id" = ?', (sys_id,))
            db.execute("COMMIT")
        except BaseException:
            db.execute("ROLLBACK")
            raise
        return [(table.name, record), *deleted]

    # --- async API ----------------------------------------------------------------------

    @staticmethod
    def table(name: str) -> Table:
        table = TABLES.get(name)
        if table is None:
            raise UnknownTable(name)
        return table

    async def insert(self, table: str, fields: Mapping[str, Any]) -> Record:
        (record,) = await self.insert_many(table, [fields])
        return record

    async def insert_many(self, table: str, rows: Sequence[Mapping[str, Any]]) -> list[Record]:
        spec = self.table(table)
        records = await self._call(self._insert_many, spec, rows)
        self._tell([Change(table, "insert", r) for r in records])
        return records

    async def insert_input_once(self, fields: Mapping[str, Any]) -> tuple[Record, bool]:
        if fields.get("queue", "input") != "input":
            raise FieldError("ecc_queue", "queue", "insert_input_once takes input records")
        record, inserted = await self._call(self._insert_input_once, fields)
        if inserted:
            self._tell([Change("ecc_queue", "insert", record)])
        return record, inserted

    async def get(self, table: str, sys_id: str) -> Record | None:
        return await self._call(self._get, self.table(table), sys_id)

    async def query(
        self,
        table: str,
        encoded_query: str = "",
        *,
        limit: int | None = None,
        offset: int = 0,
        hidden: Sequence[str] = (),
    ) -> list[Record]:
        """Records matching, in the query's order (then insertion order).

        ``hidden``: fields the query may not use (the API passes the write-only ones).
        """
        spec = self.table(table)
        sql = compile_query(encoded_query, spec, hidden=hidden)
        return await self._call(self._query, spec, sql, limit, max(0, offset))

    async def count(
        self, table: str, encoded_query: str = "", *, hidden: Sequence[str] = ()
    ) -> int:
        spec = self.table(table)
        sql = compile_query(encoded_query, spec, hidden=hidden)
        return await self._call(self._count, spec, sql)

    async def update(self, table: str, sys_id: str, fields: Mapping[str, Any]) -> Record | None:
        spec = self.table(table)
        record, previous = await self._call(self._update, spec, sys_id, fields)
        if record is not None and previous is not None and record != previous:
            self._tell([Change(table, "update", record, previous)])
        return record

    async def update_query(
        self,
        table: str,
        encoded_query: str,
        fields: Mapping[str, Any],
        *,
        limit: int | None = None,
    ) -> list[Record]:
        spec = self.table(table)
        sql = compile_query(encoded_query, spec)
        pairs = await self._call(self._update_query, spec, sql, fields, limit)
        self._tell([Change(table, "update", after, before) for after, before in pairs if fields])
        return [after for after, _before in pairs]

    async def delete(self, table: str, sys_id: str) -> bool:
        spec = self.table(table)
        deleted = await self._call(self._delete, spec, sys_id)
        self._tell([Change(name, "delete", record) for name, record in deleted])
        return bool(deleted)


def _new_key_clears_validation(table: Table, previous: Record, values: Record) -> Record:
    """``values`` for an update of ``previous``: on ``ecc_agent``, a public key or
    fingerprint other than the stored one always sets ``validated`` false, whoever writes
    it (an approval is for one key; docs/security.md)."""
    if table.name != "ecc_agent":
        return values
    changed = any(
        name in values and values[name] != previous.get(name)
        for name in ("public_key", "fingerprint")
    )
    if not changed:
        return values
    if previous.get("validated"):
        log.info("ecc_agent %s: a new key; validated cleared", previous.get("name"))
    return {**values, "validated": False}


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
