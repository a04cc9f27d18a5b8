"""The relay's durable spool (SQLite): the outputs it holds and the result chunks received.

A MID answers an output with one input record, but the bridge streams a job's results in
chunks. The relay keeps every chunk here *before* it acknowledges the broker message that
carried it, and writes the one input when a run is complete (its last chunk and every
chunk before it): a relay that stops or crashes loses nothing, and one that starts again
finishes what it held (docs/relay.md, "Restarts").

- ``jobs``: each output this relay claimed (its claim token, the row as fetched, the
  dialect's state) and how far its answer got: ``running`` → ``posting`` (the input is
  being written: after a crash, look for it before writing it again) → ``written`` (the
  input's sys_id is known; an attachment may be due) → removed once the output is closed.
- ``chunks``: the result chunks by (output, run, sequence), written once.

``state_dir`` unset: an in-memory database (what a crash loses is then lost).
"""

from __future__ import annotations

import sqlite3
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import orjson

from bridge.wire.sqlite_thread import SQLiteThread

_SCHEMA = """
CREATE TABLE IF NOT EXISTS jobs (
    sys_id TEXT PRIMARY KEY,
    token TEXT NOT NULL,
    doc BLOB NOT NULL,
    stage TEXT NOT NULL DEFAULT 'running',
    input_sys_id TEXT NOT NULL DEFAULT ''
) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS chunks (
    sys_id TEXT NOT NULL,
    run TEXT NOT NULL,
    seq INTEGER NOT NULL,
    complete INTEGER NOT NULL,
    record BLOB NOT NULL,
    PRIMARY KEY (sys_id, run, seq)
) WITHOUT ROWID;
"""


@dataclass
class SpooledJob:
    sys_id: str
    token: str
    doc: dict[str, Any]  # the job as the relay holds it (bridge/relay/jobs.py)
    stage: str = "running"
    input_sys_id: str = ""


@dataclass(frozen=True, slots=True)
class Chunk:
    sys_id: str
    run: str
    seq: int
    complete: bool
    record: dict[str, Any] = field(hash=False, compare=False)


class Spool:
    """Async façade over one SQLite connection on its own thread."""

    def __init__(self, state_dir: Path | None) -> None:
        self.path = state_dir / "relay.sqlite3" if state_dir is not None else None
        self._thread = SQLiteThread(thread_name="midbridge-relay-spool", what="relay spool")

    async def open(self) -> None:
        await self._thread.call(self._open)

    def _open(self) -> None:
        if self.path is not None:
            self.path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
            db = sqlite3.connect(self.path, isolation_level=None)
            db.execute("PRAGMA journal_mode=WAL")
            db.execute("PRAGMA synchronous=FULL")
        else:
            db = sqlite3.connect(":memory:", isolation_level=None)
        db.executescript(_SCHEMA)
        self._thread.db = db

    async def close(self) -> None:
        await self._thread.close()

    # --- jobs ------------------------------------------------------------------------

    async def put_jobs(self, jobs: list[SpooledJob]) -> None:
        rows = [(j.sys_id, j.token, orjson.dumps(j.doc), j.stage, j.input_sys_id) for j in jobs]
        await self._thread.call(self._put_jobs, rows)

    def _put_jobs(self, rows: list[tuple[Any, ...]]) -> None:
        db = self._thread.conn()
        with db:
            db.execute("BEGIN")
            db.executemany("INSERT OR REPLACE INTO jobs VALUES (?, ?, ?, ?, ?)", rows)

    async def jobs(self) -> list[SpooledJob]:
        rows = await self._thread.call(self._jobs)
        return [SpooledJob(r[0], r[1], orjson.loads(r[2]), r[3], r[4]) for r in rows]

    def _jobs(self) -> list[tuple[Any, ...]]:
        return self._thread.conn().execute("SELECT * FROM jobs").fetchall()

    async def set_stage(self, sys_id: str, stage: str, input_sys_id: str = "") -> None:
        await self._thread.call(self._set_stage, sys_id, stage, input_sys_id)

    def _set_stage(self, sys_id: str, stage: str, input_sys_id: str) -> None:
        self._thread.conn().execute(
            "UPDATE jobs SET stage = ?, input_sys_id = ? WHERE sys_id = ?",
            (stage, input_sys_id, sys_id),
        )

    async def remove(self, sys_id: str) -> None:
        await self._thread.call(self._remove, sys_id)

    def _remove(self, sys_id: str) -> None:
        db = self._thread.conn()
        with db:
            db.execute("BEGIN")
            db.execute("DELETE FROM chunks WHERE sys_id = ?", (sys_id,))
            db.execute("DELETE FROM jobs WHERE sys_id = ?", (sys_id,))

    # --- chunks ------------------------------------------------------------------------

    async def add_chunks(self, chunks: list[Chunk]) -> int:
        """Written in one transaction, each (output, run, sequence) once; how many were new."""
        if not chunks:
            return 0
        rows = [(c.sys_id, c.run, c.seq, int(c.complete), orjson.dumps(c.record))
                for c in chunks]  # fmt: skip
        return await self._thread.call(self._add_chunks, rows)

    def _add_chunks(self, rows: list[tuple[Any, ...]]) -> int:
        db = self._thread.conn()
        before = db.total_changes
        with db:
            db.execute("BEGIN")
            db.executemany("INSERT OR IGNORE INTO chunks VALUES (?, ?, ?, ?, ?)", rows)
        return db.total_changes - before

    async def complete_run(self, sys_id: str) -> list[dict[str, Any]] | None:
        """The chunks of a complete run of ``sys_id`` in order, or ``None``."""
        blobs = await self._thread.call(self._complete_run, sys_id)
        return None if blobs is None else [orjson.loads(b) for b in blobs]

    def _complete_run(self, sys_id: str) -> list[bytes] | None:
        db = self._thread.conn()
        finals = db.execute(
            "SELECT run, MIN(seq) FROM chunks WHERE sys_id = ? AND complete = 1 GROUP BY run",
            (sys_id,),
        ).fetchall()
        for run, last in finals:
            rows = db.execute(
                "SELECT seq, record FROM chunks WHERE sys_id = ? AND run = ? AND seq <= ? "
                "ORDER BY seq",
                (sys_id, run, last),
            ).fetchall()
            if len(rows) == last + 1 and all(row[0] == i for i, row in enumerate(rows)):
                return [row[1] for row in rows]
        return None
