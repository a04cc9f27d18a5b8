"""The bridge's durable state on disk (SQLite, WAL): the outbox and the finished-job ledger.

One file, one connection, one thread: every call runs on a single-thread executor, so
SQLite is never shared between threads and writes are naturally ordered.

- ``outbox``: input records (already encoded, grouped by MQTT topic) waiting to be
  published. A job's records are appended here *before* its output is acknowledged, so a
  crash or a broker outage loses nothing; they are published in ``id`` order and deleted
  once the broker has acknowledged them.
- ``done``: ``sys_id`` of every output whose final record reached the outbox, with the
  time. Written in the same transaction as that final record, so a job that has a
  durable result is never run again (dedupe across restarts, for ``dedupe_window``).
"""

from __future__ import annotations

import asyncio
import sqlite3
import time
from collections import OrderedDict
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

T = TypeVar("T")

_SCHEMA = """
CREATE TABLE IF NOT EXISTS outbox (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    topic TEXT NOT NULL,
    payload BLOB NOT NULL,
    records INTEGER NOT NULL
);
CREATE TABLE IF NOT EXISTS done (
    sys_id TEXT PRIMARY KEY,
    at REAL NOT NULL
) WITHOUT ROWID;
CREATE INDEX IF NOT EXISTS done_at ON done(at);
"""


@dataclass(frozen=True, slots=True)
class OutboxRow:
    id: int
    topic: str
    payload: bytes
    records: int


class StateStore:
    """Async façade over the SQLite file; use as an async context manager."""

    def __init__(self, path: Path, *, dedupe_window: float, dedupe_memory: int = 500_000) -> None:
        self.path = path
        self.dedupe_window = dedupe_window
        self.dedupe_memory = dedupe_memory
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="midbridge-store")
        self._db: sqlite3.Connection | None = None
        self._done_recent: OrderedDict[str, float] = OrderedDict()
        self._memory_complete = True  # False once the memory set no longer holds every id
        self.outbox_records = 0  # records waiting in the outbox (kept in step with the table)
        # Outbox ids are ours and contiguous (no gaps until published), so the publisher
        # knows the row after ``id`` is ``id + 1`` and can take it from memory.
        self.next_id = 1
        # When each outbox row was written (rows of an earlier process: when it opened).
        self._written: dict[int, float] = {}

    async def __aenter__(self) -> StateStore:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        await self._call(self._open)
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self._call(self._close)
        self._executor.shutdown(wait=True)

    async def _call(self, fn: Any, *args: Any) -> Any:
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(self._executor, fn, *args)

    # --- executor-thread side -------------------------------------------------------

    def _open(self) -> None:
        db = sqlite3.connect(self.path, isolation_level=None, check_same_thread=True)
        db.execute("PRAGMA journal_mode=WAL")
        db.execute("PRAGMA synchronous=NORMAL")  # durable across process crashes (WAL)
        db.executescript(_SCHEMA)
        self._db = db
        horizon = time.time() - self.dedupe_window
        db.execute("DELETE FROM done WHERE at < ?", (horizon,))
        rows = db.execute(
            "SELECT sys_id, at FROM done ORDER BY at DESC LIMIT ?", (self.dedupe_memory + 1,)
        ).fetchall()
        if len(rows) > self.dedupe_memory:
            self._memory_complete = False
            rows = rows[: self.dedupe_memory]
        for sys_id, at in reversed(rows):
            self._done_recent[sys_id] = at
        count, top = db.execute(
            "SELECT COALESCE(SUM(records), 0), COALESCE(MAX(id), 0) FROM outbox"
        ).fetchone()
        self.outbox_records = int(count)
        self.next_id = int(top) + 1
        opened = time.time()
        ids = db.execute("SELECT id FROM outbox ORDER BY id")
        self._written = {int(row_id): opened for (row_id,) in ids}

    def _close(self) -> None:
        if self._db is not None:
            self._db.close()
            self._db = None

    def _conn(self) -> sqlite3.Connection:
        if self._db is None:
            raise RuntimeError("state store is not open")
        return self._db

    def _append(
        self, rows: list[tuple[str, bytes, int]], done_ids: list[str], first_id: int
    ) -> None:
        db = self._conn()
        now = time.time()
        db.execute("BEGIN IMMEDIATE")
        try:
            db.executemany(
                "INSERT INTO outbox(id, topic, payload, records) VALUES (?, ?, ?, ?)",
                [(first_id + i, t, p, n) for i, (t, p, n) in enumerate(rows)],
            )
            if done_ids:
                db.executemany(
                    "INSERT OR REPLACE INTO done(sys_id, at) VALUES (?, ?)",
                    [(sys_id, now) for sys_id in done_ids],
                )
            db.execute("COMMIT")
        except BaseException:
            db.execute("ROLLBACK")
            raise

    def _read(self, after_id: int, limit: int) -> list[OutboxRow]:
        cur = self._conn().execute(
            "SELECT id, topic, payload, records FROM outbox WHERE id > ? ORDER BY id LIMIT ?",
            (after_id, limit),
        )
        return [OutboxRow(int(i), str(t), bytes(p), int(n)) for i, t, p, n in cur.fetchall()]

    def _delete(self, ranges: list[tuple[int, int]]) -> None:
        db = self._conn()
        db.execute("BEGIN IMMEDIATE")
        db.executemany("DELETE FROM outbox WHERE id BETWEEN ? AND ?", ranges)
        db.execute("COMMIT")

    def _is_done_db(self, sys_id: str) -> bool:
        horizon = time.time() - self.dedupe_window
        row = (
            self._conn()
            .execute("SELECT 1 FROM done WHERE sys_id = ? AND at >= ?", (sys_id, horizon))
            .fetchone()
        )
        return row is not None

    def _prune(self) -> int:
        horizon = time.time() - self.dedupe_window
        cur = self._conn().execute("DELETE FROM done WHERE at < ?", (horizon,))
        return cur.rowcount

    # --- async API ------------------------------------------------------------------

    async def append(
        self, rows: list[tuple[str, bytes, int]], done_ids: list[str]
    ) -> list[OutboxRow]:
        """Durably add encoded messages (topic, payload, record count); mark jobs done.

        Returns the rows with their ids, in order.
        """
        first_id = self.next_id
        self.next_id += len(rows)
        try:
            await self._call(self._append, rows, done_ids, first_id)
        except BaseException:
            if self.next_id == first_id + len(rows):
                self.next_id = first_id  # nothing else was appended meanwhile: no gap
            raise
        self.outbox_records += sum(n for _t, _p, n in rows)
        now = time.time()
        for row_id in range(first_id, first_id + len(rows)):
            self._written[row_id] = now
        for sys_id in done_ids:
            self._done_recent[sys_id] = now
            self._done_recent.move_to_end(sys_id)
        while len(self._done_recent) > self.dedupe_memory:
            self._done_recent.popitem(last=False)
            self._memory_complete = False
        return [OutboxRow(first_id + i, t, p, n) for i, (t, p, n) in enumerate(rows)]

    async def read(self, after_id: int, limit: int) -> list[OutboxRow]:
        result: list[OutboxRow] = await self._call(self._read, after_id, limit)
        return result

    async def delete(self, rows: list[OutboxRow]) -> None:
        if not rows:
            return
        ids = sorted(row.id for row in rows)
        ranges: list[tuple[int, int]] = []
        for row_id in ids:
            if ranges and row_id == ranges[-1][1] + 1:
                ranges[-1] = (ranges[-1][0], row_id)
            else:
                ranges.append((row_id, row_id))
        await self._call(self._delete, ranges)
        self.outbox_records -= sum(row.records for row in rows)
        for row_id in ids:
            self._written.pop(row_id, None)

    def oldest_age(self) -> float:
        """Seconds the oldest row still in the outbox has waited (0 when it is empty)."""
        if not self._written:
            return 0.0
        # Ids grow with time: the lowest id left is the oldest row (a scrape pays O(rows)).
        return max(0.0, time.time() - self._written[min(self._written)])

    async def is_done(self, sys_id: str) -> bool:
        at = self._done_recent.get(sys_id)
        if at is not None:
            return at >= time.time() - self.dedupe_window
        if self._memory_complete:
            return False
        result: bool = await self._call(self._is_done_db, sys_id)
        return result

    async def prune(self) -> int:
        horizon = time.time() - self.dedupe_window
        while self._done_recent:
            sys_id, at = next(iter(self._done_recent.items()))
            if at >= horizon:
                break
            del self._done_recent[sys_id]
        result: int = await self._call(self._prune)
        return result
