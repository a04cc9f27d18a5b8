"""Egress: input records → durable outbox → broker, in order, batched.

``submit`` returns once the records are safely in the outbox on disk; only then may the
bridge acknowledge the output they answer. The writer commits whatever accumulated while
the previous commit ran (group commit: no waiting when idle, large batches under load;
``linger_ms`` adds an optional gathering delay). A publisher task sends the outbox in
``id`` order, many records to one MQTT message, several messages in flight, and deletes
what the broker acknowledged. Rows just written are published from memory; the disk is
read only after a restart, a failed publish, or when memory would grow past a bound. A
broker outage just lets the outbox grow (bounded: past ``max_records`` submitters wait);
a restart republishes whatever was not yet acknowledged.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

import orjson

from bridge.agent.store import OutboxRow, StateStore
from bridge.wire.acks import PublishFailed, PublishRefused

log = logging.getLogger("midbridge.egress")
REFUSED_RETRY_S = 5.0
FRESH_ROWS_MAX = 4096  # rows kept in memory for the publisher; past that it reads the disk

Publisher = Callable[[str, bytes], Awaitable["asyncio.Future[None]"]]


@dataclass(slots=True)
class _Pending:
    topic: str
    records: list[dict[str, Any]]
    done_id: str | None
    safe: asyncio.Future[None] = field(
        default_factory=lambda: asyncio.get_running_loop().create_future()
    )


class Egress:
    def __init__(
        self,
        store: StateStore,
        publish: Publisher,
        connected: asyncio.Event,
        *,
        linger_ms: float = 0.0,
        batch_records: int = 200,
        max_records: int = 1_000_000,
        publish_window: int = 64,
    ) -> None:
        self.store = store
        self._publish = publish
        self._connected = connected
        self.linger = linger_ms / 1000.0
        self.batch_records = batch_records
        self.max_records = max_records
        self.publish_window = publish_window
        self._pending: list[_Pending] = []
        self._wake_writer = asyncio.Event()
        self._wake_publisher = asyncio.Event()
        self._room = asyncio.Condition()
        self._fresh: dict[int, OutboxRow] = {}  # rows written, not yet taken by the publisher
        self.published_records = 0
        self.refused_publishes = 0
        self.write_error: str | None = None  # the last outbox write failed (readiness)

    # --- producers -------------------------------------------------------------------

    async def submit(
        self, topic: str, records: list[dict[str, Any]], *, done_id: str | None = None
    ) -> None:
        """Return once ``records`` are durable; ``done_id`` marks that job finished.

        Once handed over, the records are written even if the caller is cancelled.
        """
        if self.store.outbox_records >= self.max_records:
            async with self._room:
                while self.store.outbox_records >= self.max_records:
                    await self._room.wait()
        item = _Pending(topic, records, done_id)
        self._pending.append(item)
        self._wake_writer.set()
        await item.safe

    # --- background tasks ------------------------------------------------------------

    async def run_writer(self) -> None:
        """Group commit: each transaction takes everything submitted while the last ran."""
        while True:
            await self._wake_writer.wait()
            if self.linger:
                await asyncio.sleep(self.linger)
            self._wake_writer.clear()
            batch, self._pending = self._pending, []
            if batch:
                await self._write(batch)

    async def _write(self, batch: list[_Pending]) -> None:
        rows: list[tuple[str, bytes, int]] = []
        by_topic: dict[str, list[dict[str, Any]]] = {}
        for item in batch:
            by_topic.setdefault(item.topic, []).extend(item.records)
        for topic, records in by_topic.items():
            for start in range(0, len(records), self.batch_records):
                part = records[start : start + self.batch_records]
                body = orjson.dumps(part[0]) if len(part) == 1 else orjson.dumps(part)
                rows.append((topic, body, len(part)))
        done_ids = [item.done_id for item in batch if item.done_id]
        try:
            written = await self.store.append(rows, done_ids)
        except Exception as exc:  # disk full, I/O error: the jobs stay unacknowledged
            log.error("outbox write failed: %s", exc)
            self.write_error = str(exc) or type(exc).__name__
            for item in batch:
                if not item.safe.done():
                    item.safe.set_exception(exc)
            return
        self.write_error = None
        if len(self._fresh) + len(written) <= FRESH_ROWS_MAX:
            for row in written:
                self._fresh[row.id] = row
        for item in batch:
            if not item.safe.done():
                item.safe.set_result(None)
        self._wake_publisher.set()

    async def _next_rows(self, after_id: int) -> list[OutboxRow]:
        """The rows after ``after_id`` in order: from memory when it has them, else disk."""
        rows: list[OutboxRow] = []
        next_id = after_id + 1
        while (row := self._fresh.pop(next_id, None)) is not None:
            rows.append(row)
            next_id += 1
            if len(rows) >= 256:
                return rows
        if rows or next_id >= self.store.next_id:
            return rows
        # Not in memory (a restart, a rewind, or memory was full): read the disk.
        rows = await self.store.read(after_id, 256)
        for row in rows:
            self._fresh.pop(row.id, None)
        return rows

    async def run_publisher(self) -> None:
        """Send the outbox in order with a window of messages awaiting PUBACK."""
        last_id = 0
        window = asyncio.Semaphore(self.publish_window)
        in_flight = 0
        rewind_to: int | None = None
        acked: list[OutboxRow] = []
        deleting = asyncio.Lock()

        async def flush_acked() -> None:
            async with deleting:
                nonlocal acked
                rows, acked = acked, []
                if rows:
                    await self.store.delete(rows)
                    async with self._room:
                        self._room.notify_all()

        async def track(row: OutboxRow, fut: Awaitable[None]) -> None:
            nonlocal in_flight, rewind_to
            try:
                try:
                    await fut
                except PublishFailed as exc:  # dropped unsent or refused: read it again
                    if isinstance(exc, PublishRefused):
                        # An ACL that denies our results: say so loudly, keep them on disk,
                        # and try again slowly (an operator may fix the ACL).
                        log.error(
                            "the broker refused results on %s (%s): check the broker ACL; "
                            "they stay in the outbox, next try in %.0f s",
                            row.topic,
                            exc,
                            REFUSED_RETRY_S,
                        )
                        self.refused_publishes += 1
                        await asyncio.sleep(REFUSED_RETRY_S)
                    else:
                        log.warning(
                            "record batch %s not delivered (%s); sending it again", row.id, exc
                        )
                    rewind_to = row.id - 1 if rewind_to is None else min(rewind_to, row.id - 1)
                    self._wake_publisher.set()
                    return
                acked.append(row)
                self.published_records += row.records
                if len(acked) >= 32 or in_flight <= 1:
                    await flush_acked()
            finally:
                in_flight -= 1
                window.release()

        async with asyncio.TaskGroup() as tg:
            while True:
                # Clear before looking: a wake-up that comes while we look is not lost.
                self._wake_publisher.clear()
                if rewind_to is not None:
                    last_id, rewind_to = min(last_id, rewind_to), None
                rows = await self._next_rows(last_id)
                if not rows:
                    await flush_acked()
                    await self._wake_publisher.wait()
                    continue
                for row in rows:
                    await self._connected.wait()
                    await window.acquire()
                    in_flight += 1
                    fut = await self._publish(row.topic, row.payload)
                    last_id = row.id
                    tg.create_task(track(row, fut))
