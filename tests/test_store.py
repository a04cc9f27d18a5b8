"""The durable state: outbox order, done ledger, reopen after close."""

from __future__ import annotations

from pathlib import Path

from bridge.agent.store import StateStore


async def test_outbox_keeps_order_and_survives_reopen(tmp_path: Path) -> None:
    path = tmp_path / "s.sqlite3"
    async with StateStore(path, dedupe_window=60) as store:
        await store.append([("t", b"one", 1), ("t", b"two", 2)], ["job-1"])
        await store.append([("t", b"three", 1)], [])
        assert store.outbox_records == 4
        rows = await store.read(0, 10)
        assert [r.payload for r in rows] == [b"one", b"two", b"three"]
        await store.delete(rows[:1])
        assert store.outbox_records == 3
    async with StateStore(path, dedupe_window=60) as store:
        assert store.outbox_records == 3
        rows = await store.read(0, 10)
        assert [r.payload for r in rows] == [b"two", b"three"]
        assert await store.is_done("job-1")
        assert not await store.is_done("job-2")


async def test_done_ledger_expires_after_window(tmp_path: Path) -> None:
    path = tmp_path / "s.sqlite3"
    async with StateStore(path, dedupe_window=3600) as store:
        await store.append([], ["old"])
    async with StateStore(path, dedupe_window=0) as store:  # window 0: forget at once
        assert not await store.is_done("old")


async def test_memory_bound_falls_back_to_disk(tmp_path: Path) -> None:
    async with StateStore(tmp_path / "s.sqlite3", dedupe_window=3600, dedupe_memory=1000) as store:
        await store.append([], [f"id-{i}" for i in range(1500)])
        assert len(store._done_recent) == 1000
        assert await store.is_done("id-0")  # evicted from memory, found on disk
        assert await store.is_done("id-1499")
        assert not await store.is_done("id-1500")
