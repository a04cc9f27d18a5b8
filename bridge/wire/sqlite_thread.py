"""One SQLite connection on one thread, for asyncio code.

Every call runs on a single-thread executor, so the connection is never shared between
threads and writes are naturally ordered. The owner opens the connection on that thread
(``await thread.call(open_fn)``, which sets ``thread.db``), reaches it from there with
``thread.conn()``, and ends with ``await thread.close()``.
"""

from __future__ import annotations

import asyncio
import sqlite3
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import Any, TypeVar

T = TypeVar("T")


class SQLiteThread:
    """The executor and the connection; ``what`` names the store in "is not open"."""

    def __init__(self, *, thread_name: str, what: str) -> None:
        self.what = what
        self.db: sqlite3.Connection | None = None
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix=thread_name)

    async def call(self, fn: Callable[..., T], *args: Any) -> T:
        """``fn(*args)`` on the connection's thread."""
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(self._executor, fn, *args)

    def conn(self) -> sqlite3.Connection:
        """The open connection (on the connection's thread); RuntimeError if closed."""
        if self.db is None:
            raise RuntimeError(f"{self.what} is not open")
        return self.db

    def close_db(self) -> None:
        """Close the connection (on the connection's thread)."""
        if self.db is not None:
            self.db.close()
            self.db = None

    async def close(self) -> None:
        """Close the connection if it is open, then stop the thread."""
        if self.db is not None:
            await self.call(self.close_db)
        self._executor.shutdown(wait=True)
