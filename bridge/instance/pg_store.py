"""The instance's tables in PostgreSQL (asyncpg), behind the ``Store`` interface.

``midbridge instance --db postgresql://user@host:5432/db`` (``InstanceConfig.db`` such a
URL) selects it; :func:`open_store` picks the store from the ``db`` given. It does what
``SQLiteStore`` does (what both do alike is ``bridge.instance.store_core``), on a pool of
connections (each call one transaction):

- the schema is data (``bridge.instance.pg_schema``: seeded and migrated on open under an
  advisory lock, a ``midbridge_schema_version`` row; writes to ``sys_db_object`` /
  ``sys_dictionary`` change the tables in the same transaction);
- queries compile with ``compile_query(dialect="postgresql")`` (``$n``, ``ILIKE``,
  ``IS DISTINCT FROM``, the ``sys_row`` order);
- ``update_query`` with a ``limit`` (a claim of "up to n") reads with ``SELECT ... FOR
  UPDATE SKIP LOCKED``: two processes claiming at once each get other records, never the
  same one. Without a limit (a compare-and-set, "every record that matches") it waits for
  the records other transactions hold and checks them again, so an empty answer still
  means somebody else won. A deadlock PostgreSQL breaks is retried;
- listeners are told after the commit, in commit order, on the event loop; and, for
  *other processes* on the same database, each transaction sends ``NOTIFY
  midbridge_changes`` (table, op, sys_id; sent by PostgreSQL only at commit): every store
  LISTENs, reads the records named and tells its own listeners (``previous`` is None in
  such a Change; a deleted record is told as ``{"sys_id": ...}``), and reloads the schema
  when another process wrote ``sys_db_object`` / ``sys_dictionary``.

The database's schema (``search_path``) is the URL's ``?search_path=name`` or the user's
default; advisory lock keys include it, so several instances can share a database in
separate schemas.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import uuid
from collections.abc import Awaitable, Callable, Mapping, Sequence
from pathlib import Path
from typing import Any, TypeVar

import asyncpg
import orjson

from bridge.instance import pg_schema, schema
from bridge.instance.pg_schema import ROW, SCHEMA_LOCK, Plan, conflict_message
from bridge.instance.query import SQL
from bridge.instance.schema import META_TABLES, Catalog
from bridge.instance.sqlite_store import SQLiteStore
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
    stored,
    written,
)

log = logging.getLogger("midbridge.instance.store")

CHANNEL = "midbridge_changes"
_NOTIFY_BYTES = 7000  # PostgreSQL's payload limit is 8000
URL_SCHEMES = ("postgresql://", "postgres://")


def is_postgres_url(db: Path | str) -> bool:
    return isinstance(db, str) and db.startswith(URL_SCHEMES)


def shown_url(url: str) -> str:
    """``url`` without its password (for messages and logs)."""
    head, sep, rest = url.partition("://")
    if "@" not in rest.split("/", 1)[0]:
        return url
    auth, _, host = rest.partition("@")
    user = auth.split(":", 1)[0]
    return f"{head}{sep}{user}@{host}"


T = TypeVar("T")
DEADLOCK_TRIES = 5


async def _retrying(call: Callable[..., Awaitable[T]], *args: Any) -> T:
    """Run one transaction again when PostgreSQL broke a deadlock by rolling it back (two
    writers locking the same rows in another order): nothing of it was written."""
    for attempt in range(1, DEADLOCK_TRIES + 1):
        try:
            return await call(*args)
        except asyncpg.DeadlockDetectedError:
            if attempt == DEADLOCK_TRIES:
                raise StoreError("the database broke a deadlock; try again") from None
            await asyncio.sleep(0.01 * attempt)
    raise AssertionError("unreachable")


class PGStore(StoreCore[Plan]):
    """The ``Store`` on PostgreSQL. ``await PGStore.open(url)`` or ``async with PGStore(url)``."""

    def __init__(self, url: str, *, pool_size: int = 10) -> None:
        super().__init__(Plan, "postgresql")
        self.url = url
        self.pool_size = pool_size
        self._pool: asyncpg.Pool | None = None
        self._listen: asyncpg.Connection | None = None
        self._origin = uuid.uuid4().hex  # our own notifications are not told twice
        self._remote: asyncio.Queue[list[list[str]]] = asyncio.Queue()
        self._remote_task: asyncio.Task[None] | None = None
        self._relisten: asyncio.Task[None] | None = None
        self._closing = False

    @classmethod
    async def open(cls, url: str) -> PGStore:
        store = cls(url)
        await store._open()
        return store

    async def __aenter__(self) -> PGStore:
        await self._open()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    async def _open(self) -> None:
        shown = shown_url(self.url)
        try:
            self._pool = await asyncpg.create_pool(
                self.url, min_size=1, max_size=self.pool_size, timeout=10
            )
            async with self._pool.acquire() as db, db.transaction():
                catalog = await pg_schema.open_schema(db, now_text())
            await self._connect_listener()
        except (
            OSError, ValueError, asyncpg.PostgresError, asyncpg.InterfaceError, TimeoutError
        ) as exc:  # fmt: skip
            await self.close()
            raise StoreError(f"cannot open the database {shown}: {exc}") from exc
        except BaseException:
            await self.close()
            raise
        self._publish(catalog)
        self._remote_task = asyncio.get_running_loop().create_task(
            self._remote_loop(), name="pg-store-remote-changes"
        )

    async def _connect_listener(self) -> None:
        conn = await asyncpg.connect(self.url, timeout=10)
        await conn.add_listener(CHANNEL, self._on_notify)
        conn.add_termination_listener(self._listener_lost)
        self._listen = conn

    def _listener_lost(self, conn: object) -> None:
        """The LISTEN connection closed (a database restart): connect it again, every
        second until it works; meanwhile other processes' writes are not told (the
        connector's sweep finds their outputs)."""
        if self._pool is None or self._closing:
            return
        log.warning("lost the change notifications of %s; connecting again", shown_url(self.url))
        self._listen = None
        self._relisten = asyncio.get_running_loop().create_task(self._listen_again())

    async def _listen_again(self) -> None:
        while self._pool is not None and not self._closing:
            try:
                await self._connect_listener()
            except (OSError, asyncpg.PostgresError, asyncpg.InterfaceError, TimeoutError):
                await asyncio.sleep(1.0)
                continue
            log.warning("change notifications of %s back", shown_url(self.url))
            try:
                async with self._db().acquire() as db:  # tables made meanwhile
                    catalog = await pg_schema.load(db)
                await self._schema_changed(catalog)
            except Exception:
                log.exception("reloading the schema failed")
            return

    async def close(self) -> None:
        self._closing = True
        relisten, self._relisten = self._relisten, None
        if relisten is not None:
            relisten.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await relisten
        if self._remote_task is not None:
            self._remote_task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._remote_task
            self._remote_task = None
        if self._listen is not None:
            with contextlib.suppress(Exception):
                await self._listen.close(timeout=5)
            self._listen = None
        if self._pool is not None:
            with contextlib.suppress(Exception):
                await asyncio.wait_for(self._pool.close(), 10)
            self._pool = None

    def _db(self) -> asyncpg.Pool:
        if self._pool is None:
            raise StoreError("the store is not open")
        return self._pool

    # --- the schema and the listeners ---------------------------------------------------

    async def _schema_changed(self, catalog: Catalog) -> None:
        """Publish ``catalog``; the pool's connections forget their prepared statements (a
        column's type may have changed under them)."""
        self._publish(catalog)
        if self._pool is not None:
            await self._pool.expire_connections()

    async def _announce(self, db: asyncpg.Connection, changes: Sequence[Change]) -> None:
        """NOTIFY the other processes (PostgreSQL delivers it when the transaction commits)."""
        batch: list[list[str]] = []
        size = 0
        for change in changes:
            item = [change.table, change.op, str(change.record.get("sys_id", ""))]
            batch.append(item)
            size += len(item[0]) + len(item[2]) + 16
            if size > _NOTIFY_BYTES:
                await self._notify(db, batch)
                batch, size = [], 0
        if batch:
            await self._notify(db, batch)

    async def _notify(self, db: asyncpg.Connection, batch: list[list[str]]) -> None:
        payload = orjson.dumps({"o": self._origin, "c": batch}).decode()
        await db.execute("SELECT pg_notify($1, $2)", CHANNEL, payload)

    def _on_notify(self, conn: object, pid: int, channel: str, payload: str) -> None:
        try:
            message = orjson.loads(payload)
        except orjson.JSONDecodeError:
            return
        if not isinstance(message, dict) or message.get("o") == self._origin:
            return
        items = message.get("c")
        if isinstance(items, list):
            self._remote.put_nowait(items)

    async def _remote_loop(self) -> None:
        """Tell our listeners of what other processes wrote, in the order it came."""
        while True:
            items = await self._remote.get()
            try:
                await self._tell_remote(items)
            except asyncio.CancelledError:
                raise
            except Exception:
                log.exception("reading changes another process made failed")

    async def _tell_remote(self, items: list[list[str]]) -> None:
        wanted = [i for i in items if isinstance(i, list) and len(i) == 3]
        if any(table in META_TABLES for table, _op, _id in wanted):
            async with self._db().acquire() as db:
                catalog = await pg_schema.load(db)
            await self._schema_changed(catalog)
        if not self._listeners:
            return
        changes = []
        for table, op, sys_id in wanted:
            if op == "delete":
                changes.append(Change(table, "delete", {"sys_id": sys_id}))
                continue
            if table not in self._catalog.tables or op not in ("insert", "update"):
                continue
            record = await self.get(table, sys_id)
            if record is not None:
                changes.append(Change(table, "insert" if op == "insert" else "update", record))
        self._tell(changes)

    # --- one transaction each -----------------------------------------------------------

    async def _get(self, db: asyncpg.Connection, plan: Plan, sys_id: str) -> Record | None:
        text, extra = plan.by_id()
        row = await db.fetchrow(text, sys_id, *extra)
        return None if row is None else plan.record(row)

    async def _check_references(
        self, db: asyncpg.Connection, plan: Plan, values: Mapping[str, Any]
    ) -> None:
        for name, target in plan.strict_refs:
            if name in values:
                table = self._catalog.tables.get(target or "")
                if table is None or await self._get(db, self._plan(table), values[name]) is None:
                    raise FieldError(
                        plan.table.name, name, f"no {target} record with sys_id {values[name]!r}"
                    )

    async def _insert_many(
        self, table: Table, rows: Sequence[Mapping[str, Any]], actor: str
    ) -> list[Change]:
        plan = self._plan(table)
        now = now_text()
        prepared = [prepare_insert(plan, row, now, actor) for row in rows]
        if table.name in META_TABLES:
            return await self._insert_meta(table, prepared, now, actor)
        async with self._db().acquire() as db, db.transaction():
            if plan.strict_refs:
                for values in prepared:
                    await self._check_references(db, plan, values)
            full = [plan.full_row(values) for values in prepared]
            try:
                if len(full) == 1:
                    await db.execute(plan.insert, *full[0])
                elif full:
                    await db.executemany(plan.insert, full)
            except asyncpg.UniqueViolationError as exc:
                raise Conflict(conflict_message(table, exc)) from None
            changes = [Change(table.name, "insert", plan.record(row)) for row in full]
            await self._announce(db, changes)
        return changes

    async def _insert_meta(
        self, table: Table, prepared: Sequence[Record], now: str, actor: str
    ) -> list[Change]:
        async with self._db().acquire() as db, db.transaction():
            await db.execute(SCHEMA_LOCK)
            catalog = await pg_schema.load(db)  # another process may have changed it
            out: list[Change] = []
            for values in prepared:
                _record, changes = await pg_schema.insert_meta(
                    db, catalog, table.name, values, now, actor
                )
                out += changes
                catalog = await pg_schema.load(db)
            await self._announce(db, out)
        await self._schema_changed(catalog)
        return out

    async def _insert_input_once(
        self, fields: Mapping[str, Any], actor: str
    ) -> tuple[Record, bool]:
        plan = self._plan(self.table("ecc_queue"))
        values = prepare_insert(plan, {**fields, "queue": "input"}, now_text(), actor)
        row = plan.full_row(values)
        async with self._db().acquire() as db, db.transaction():
            inserted = await db.fetchval(plan.insert_ignore, *row) is not None
            record: Record | None = plan.record(row) if inserted else None
            if record is None:
                record = await self._get(db, plan, values["sys_id"])
                if values.get("sequence") is not None:
                    found = await db.fetchrow(
                        plan.select + ' WHERE "queue" = \'input\' AND "response_to" = $1'
                        ' AND "run" = $2 AND "sequence" = $3',
                        values.get("response_to", ""),
                        values.get("run", ""),
                        values["sequence"],
                    )
                    if found is not None:
                        record = plan.record(found)
            else:
                await self._announce(db, [Change("ecc_queue", "insert", record)])
        if record is None:
            raise Conflict("ecc_queue input record was refused")
        if not inserted and not same_answer(record, values):
            raise Conflict("an ecc_queue record with this sys_id exists")
        return record, inserted

    async def _write(
        self, db: asyncpg.Connection, plan: Plan, row_ids: Sequence[int],
        previous: Sequence[Record], values: Record, stamp: str, actor: str,
    ) -> list[Record]:  # fmt: skip
        """Set ``values`` (as stored) on the rows; the records as they are now."""
        await self._check_references(db, plan, values)
        values = {**values, "sys_updated_on": stamp, "sys_updated_by": actor}
        assigns = ", ".join(f'"{n}" = ${i}' for i, n in enumerate(values, 1))
        as_stored = [stored(v) for v in values.values()]
        statement = (
            f'UPDATE "{plan.physical}" SET {assigns}, "sys_mod_count" = '
            f'COALESCE("sys_mod_count", 0) + 1 WHERE "{ROW}" = ${len(values) + 1}'
        )
        try:
            if len(row_ids) == 1:
                await db.execute(statement, *as_stored, row_ids[0])
            elif row_ids:
                await db.executemany(statement, [(*as_stored, r) for r in row_ids])
        except asyncpg.UniqueViolationError as exc:
            raise Conflict(conflict_message(plan.table, exc)) from None
        return written(plan, values, previous)

    async def _update(
        self, table: Table, sys_id: str, fields: Mapping[str, Any], actor: str
    ) -> tuple[Record | None, list[Change]]:
        plan = self._plan(table)
        values = self._prepare_update(plan, fields)
        catalog: Catalog | None = None
        async with self._db().acquire() as db, db.transaction():
            meta = table.name in META_TABLES
            if meta:
                await db.execute(SCHEMA_LOCK)
            text, extra = plan.by_id(plan.select_row)
            row = await db.fetchrow(text + " FOR UPDATE", sys_id, *extra)
            if row is None:
                return None, []
            previous = plan.record(row, 1)
            if meta:
                current = await pg_schema.load(db)
                record, changes = await pg_schema.update_meta(
                    db, current, table.name, previous, values, now_text(), actor
                )
                catalog = await pg_schema.load(db) if changes else None
            else:
                values = schema.derived(table, previous, values)
                changed = changed_fields(plan, values, previous)
                record, changes = previous, []
                if changed:
                    (record,) = await self._write(
                        db, plan, [row[0]], [previous], changed, now_text(), actor
                    )
                    changes = [Change(table.name, "update", record, previous)]
            await self._announce(db, changes)
        if catalog is not None:
            await self._schema_changed(catalog)
        return record, changes

    async def _update_query(
        self, table: Table, sql: SQL, fields: Mapping[str, Any], limit: int | None, actor: str
    ) -> list[Change]:
        plan = self._plan(table)
        values = self._prepare_update(plan, fields)
        where, params = plan.where(sql)
        meta = table.name in META_TABLES
        # A claim of "up to limit" skips the records other transactions hold (they are
        # someone else's now, or soon free for the next claim); any other update_query (a
        # compare-and-set, "all that match") waits for them and then checks them again,
        # or "an empty list means somebody else won" would not hold.
        skip = limit is not None and not meta
        text = f"{plan.select_row}{where} {sql.order_by} LIMIT ${len(params) + 1} " + (
            "FOR UPDATE SKIP LOCKED" if skip else "FOR UPDATE"
        )
        catalog: Catalog | None = None
        async with self._db().acquire() as db, db.transaction():
            if meta:
                await db.execute(SCHEMA_LOCK)
            rows = await db.fetch(text, *params, limit)
            previous = [plan.record(row, 1) for row in rows]
            stamp = now_text()
            if not values:
                after = previous
            elif meta:
                after = []
                catalog = await pg_schema.load(db)
                for before in previous:
                    record, _ = await pg_schema.update_meta(
                        db, catalog, table.name, before, values, stamp, actor
                    )
                    after.append(record)
                    catalog = await pg_schema.load(db)
            elif table.name in schema.DERIVED:
                after = []
                for row, before in zip(rows, previous, strict=True):
                    changed = schema.derived(table, before, values)
                    after += await self._write(db, plan, [row[0]], [before], changed, stamp, actor)
            else:
                after = await self._write(
                    db, plan, [row[0] for row in rows], previous, values, stamp, actor
                )
            changes = [
                Change(table.name, "update", a, b) for a, b in zip(after, previous, strict=True)
            ]
            if values:
                await self._announce(db, changes)
        if catalog is not None:
            await self._schema_changed(catalog)
        return changes

    async def _delete(self, table: Table, sys_id: str) -> list[Change]:
        plan = self._plan(table)
        catalog: Catalog | None = None
        async with self._db().acquire() as db, db.transaction():
            meta = table.name in META_TABLES
            if meta:
                await db.execute(SCHEMA_LOCK)
            text, extra = plan.by_id()
            row = await db.fetchrow(text + " FOR UPDATE", sys_id, *extra)
            if row is None:
                return []
            record = plan.record(row)
            if meta:
                current = await pg_schema.load(db)
                changes = await pg_schema.delete_meta(db, current, table.name, record)
                catalog = await pg_schema.load(db)
            else:
                changes = [
                    Change(table.name, "delete", record),
                    *await self._cascade(db, plan, sys_id),
                ]
                await db.execute(f'DELETE FROM "{plan.physical}" WHERE "sys_id" = $1', sys_id)
            await self._announce(db, changes)
        if catalog is not None:
            await self._schema_changed(catalog)
        return changes

    async def _cascade(self, db: asyncpg.Connection, plan: Plan, sys_id: str) -> list[Change]:
        out: list[Change] = []
        seen = {sys_id}
        todo = [(plan.physical, sys_id)]
        while todo:
            physical, target = todo.pop(0)
            for other, name in self._cascades.get(physical, ()):
                referencing = self._plan(other)
                rows = await db.fetch(referencing.select + f' WHERE "{name}" = $1', target)
                if not rows:
                    continue
                await db.execute(
                    f'DELETE FROM "{referencing.physical}" WHERE "{name}" = $1', target
                )
                for row in rows:
                    record = referencing.record(row)
                    if record["sys_id"] not in seen:
                        seen.add(record["sys_id"])
                        out.append(Change(other.name, "delete", record))
                        todo.append((referencing.physical, record["sys_id"]))
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
        changes = await self._insert_many(spec, rows, actor)
        self._tell(changes)
        return [c.record for c in changes if c.table == table]

    async def insert_input_once(
        self, fields: Mapping[str, Any], *, actor: str = "system"
    ) -> tuple[Record, bool]:
        if fields.get("queue", "input") != "input":
            raise FieldError("ecc_queue", "queue", "insert_input_once takes input records")
        record, inserted = await self._insert_input_once(fields, actor)
        if inserted:
            self._tell([Change("ecc_queue", "insert", record)])
        return record, inserted

    async def get(self, table: str, sys_id: str) -> Record | None:
        plan = self._plan(self.table(table))
        async with self._db().acquire() as db:
            return await self._get(db, plan, sys_id)

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
        spec = self.table(table)
        sql = self._compile(encoded_query, spec, hidden, invalid, context)
        plan = self._plan(spec)
        where, params = plan.where(sql)
        n = len(params)
        text = f"{plan.select}{where} {sql.order_by} LIMIT ${n + 1} OFFSET ${n + 2}"
        async with self._db().acquire() as db:
            rows = await db.fetch(text, *params, limit, max(0, offset))
        return [plan.record(row) for row in rows]

    async def sys_ids(self, table: str, encoded_query: str = "", *, limit: int) -> list[str]:
        spec = self.table(table)
        sql = self._compile(encoded_query, spec, (), "error", None)
        plan = self._plan(spec)
        where, params = plan.where(sql)
        text = (
            f'SELECT "sys_id" FROM "{plan.physical}"{where} {sql.order_by} LIMIT ${len(params) + 1}'
        )
        async with self._db().acquire() as db:
            rows = await db.fetch(text, *params, max(0, limit))
        return [str(row[0]) for row in rows]

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
        plan = self._plan(spec)
        where, params = plan.where(sql)
        async with self._db().acquire() as db:
            count = await db.fetchval(f'SELECT COUNT(*) FROM "{plan.physical}"{where}', *params)
        return int(count)

    async def _grouped(
        self, plan: Plan, sql: SQL, groups: list[str], count: bool, stats: list[tuple[str, str]]
    ) -> list[Aggregate]:
        exprs, placeholder = aggregate_columns(plan.table, groups, count, stats)
        where, params = plan.where(sql)
        text = f'SELECT {", ".join(exprs)} FROM "{plan.physical}"{where}'
        if groups:
            keys = ", ".join(f'"{g}"' for g in groups)
            text += f" GROUP BY {keys} ORDER BY " + ", ".join(
                f'"{g}" ASC NULLS FIRST' for g in groups
            )
        async with self._db().acquire() as db:
            rows = await db.fetch(text, *params)
        return aggregate_rows(plan, rows, groups, count, placeholder, stats)

    async def update(
        self, table: str, sys_id: str, fields: Mapping[str, Any], *, actor: str = "system"
    ) -> Record | None:
        spec = self.table(table)
        record, changes = await _retrying(self._update, spec, sys_id, fields, actor)
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
        changes = await _retrying(self._update_query, spec, sql, fields, limit, actor)
        if fields:
            self._tell(changes)
        return [c.record for c in changes]

    async def delete(self, table: str, sys_id: str) -> bool:
        spec = self.table(table)
        changes = await _retrying(self._delete, spec, sys_id)
        self._tell(changes)
        return bool(changes)


def store_for(db: Path | str) -> SQLiteStore | PGStore:
    """The store ``db`` names: a ``postgresql://`` URL, or an SQLite file (``":memory:"``)."""
    if is_postgres_url(db):
        assert isinstance(db, str)
        return PGStore(db)
    return SQLiteStore(db)
