"""Shared fixtures: brokers, unique agent names, uvloop for async tests.

- ``broker`` (session): a ``BrokerAddress`` to share; ``MIDBRIDGE_TEST_BROKER=host:port``
  wins, then a private mosquitto with raised limits, then 127.0.0.1:1883, then the
  in-process amqtt broker (MQTT 3.1.1: check ``broker.protocol``).
- ``private_broker`` (function): a started ``MosquittoServer`` of one's own (persistence on,
  restartable, pausable). Fails, never skips, without a mosquitto binary.
- ``mosquitto_factory`` (function): builds more of them (users, ACL, extra config).
- ``unique_agent`` (function): an agent name no other test uses, so tests sharing a broker
  never see each other's topics.

Async tests run on uvloop (the production loop) through pytest-asyncio's
``pytest_asyncio_loop_factories`` hook; ``MIDBRIDGE_TEST_LOOP=asyncio`` uses the default loop.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import re
import sqlite3
import uuid
from collections.abc import AsyncIterator, Callable, Iterator, Mapping
from pathlib import Path
from typing import Any

import pytest

from tests.brokers import BrokerAddress, MosquittoNotFound, MosquittoServer, session_broker


def _uvloop_factory() -> Callable[[], asyncio.AbstractEventLoop] | None:
    if os.environ.get("MIDBRIDGE_TEST_LOOP", "uvloop").lower() != "uvloop":
        return None
    try:
        import uvloop
    except ImportError:  # pragma: no cover - uvloop is a dependency off Windows
        return None
    return uvloop.new_event_loop


_LOOP_FACTORY = _uvloop_factory()


def pytest_asyncio_loop_factories(
    config: pytest.Config, item: pytest.Item
) -> Mapping[str, Callable[[], asyncio.AbstractEventLoop]] | None:
    if _LOOP_FACTORY is None:
        return {"asyncio": asyncio.new_event_loop}
    return {"uvloop": _LOOP_FACTORY}


# In-process instances hash passwords with a lower scrypt cost: a hash names its own
# parameters, so verification is unchanged, and a test creates many users (each 0.17 s at
# the production cost). Tests marked production_password_cost, and every instance a test
# starts as a process, keep the production cost (2**15).
TEST_SCRYPT_N = 2**10


@pytest.fixture(autouse=True)
def _test_password_cost(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> None:
    if request.node.get_closest_marker("production_password_cost") is None:
        from bridge.instance import auth

        monkeypatch.setattr(auth, "_N", TEST_SCRYPT_N)


def pytest_report_header(config: pytest.Config) -> str:
    loop = "uvloop" if _LOOP_FACTORY is not None else "asyncio"
    env = os.environ.get("MIDBRIDGE_TEST_BROKER")
    return f"midbridge: event loop {loop}; MIDBRIDGE_TEST_BROKER={env or '(unset)'}"


@pytest.fixture(scope="session")
def broker(tmp_path_factory: pytest.TempPathFactory) -> Iterator[BrokerAddress]:
    with session_broker(tmp_path_factory.mktemp("session-broker")) as address:
        yield address


def _make_server(workdir: Path, **kwargs: Any) -> MosquittoServer:
    try:
        return MosquittoServer(workdir, **kwargs)
    except MosquittoNotFound as exc:
        pytest.fail(str(exc), pytrace=False)


@pytest.fixture
def mosquitto_factory(tmp_path: Path) -> Iterator[Callable[..., MosquittoServer]]:
    """``mosquitto_factory(**MosquittoServer kwargs)`` → a started server, stopped at teardown."""
    servers: list[MosquittoServer] = []

    def make(**kwargs: Any) -> MosquittoServer:
        server = _make_server(tmp_path / f"mosquitto-{len(servers)}", **kwargs)
        servers.append(server)
        return server.start()

    yield make
    for server in servers:
        server.close()


@pytest.fixture
def private_broker(mosquitto_factory: Callable[..., MosquittoServer]) -> MosquittoServer:
    """A mosquitto of this test's own: raised limits, persistence on, same port on restart."""
    return mosquitto_factory()


@pytest.fixture
def unique_agent(request: pytest.FixtureRequest) -> str:
    """``t-<test name>-<random>``, within the agent pattern ``[A-Za-z0-9_.-]{1,64}``."""
    name = re.sub(r"[^A-Za-z0-9_.-]+", "-", request.node.name).strip("-.")[:40]
    return f"t-{name}-{uuid.uuid4().hex[:12]}"


# --- PostgreSQL (the instance's store, docs/scaling.md) ----------------------------------------

PG_URL = os.environ.get("MIDBRIDGE_TEST_PG", "postgresql://{user}@127.0.0.1:5432/test")


async def _pg_admin() -> tuple[Any, str]:
    """A connection to the test database (user postgres, else root): fails, never skips."""
    import asyncpg

    errors = []
    for user in ("postgres", "root"):
        url = PG_URL.format(user=user)
        try:
            return await asyncpg.connect(url, timeout=5), url
        except (OSError, asyncpg.PostgresError, TimeoutError) as exc:
            errors.append(f"{url}: {exc}")
    pytest.fail(
        "PostgreSQL is not reachable (the store tests need it at 127.0.0.1:5432, trust auth, "
        "database test; or set MIDBRIDGE_TEST_PG): " + "; ".join(errors),
        pytrace=False,
    )


@contextlib.asynccontextmanager
async def pg_schema() -> AsyncIterator[str]:
    """A fresh PostgreSQL schema, dropped on exit: its URL (``?search_path=``)."""
    admin, url = await _pg_admin()
    name = f"t_{uuid.uuid4().hex[:16]}"
    await admin.execute(f'CREATE SCHEMA "{name}"')
    try:
        yield f"{url}?search_path={name}"
    finally:
        await admin.execute(f'DROP SCHEMA "{name}" CASCADE')
        await admin.close()


@pytest.fixture
async def pg_url() -> AsyncIterator[str]:
    """The URL of a PostgreSQL schema of this test's own, dropped at teardown."""
    async with pg_schema() as url:
        yield url


class StoreBackend:
    """One database of a test on SQLite (a file) or PostgreSQL (a schema): ``open()`` a
    store on it (again and again: a reopen), read its columns, run raw SQL (``?``)."""

    def __init__(self, kind: str, db: str) -> None:
        self.kind = kind
        self.db = db

    def open(self) -> Any:
        if self.kind == "postgresql":
            from bridge.instance.pg_store import PGStore

            return PGStore(self.db)
        from bridge.instance.sqlite_store import SQLiteStore

        return SQLiteStore(self.db)

    async def columns(self, table: str) -> list[str]:
        """The table's columns in order (PostgreSQL's row-order column left out)."""
        if self.kind == "sqlite":
            with sqlite3.connect(self.db) as db:
                return [row[1] for row in db.execute(f'PRAGMA table_info("{table}")')]
        import asyncpg

        from bridge.instance.pg_schema import ROW, columns

        conn = await asyncpg.connect(self.db)
        try:
            return [c for c in await columns(conn, table) if c != ROW]
        finally:
            await conn.close()

    async def execute(self, statements: list[tuple[str, tuple[Any, ...]]]) -> None:
        if self.kind == "sqlite":
            with sqlite3.connect(self.db) as db:
                for sql, params in statements:
                    db.execute(sql, params)
            db.close()
            return
        import asyncpg

        conn = await asyncpg.connect(self.db)
        try:
            async with conn.transaction():  # all or nothing, as SQLite's `with` above
                for sql, params in statements:
                    parts = sql.split("?")  # the statements hold no literal "?"
                    numbered = parts[0] + "".join(f"${i}{p}" for i, p in enumerate(parts[1:], 1))
                    await conn.execute(numbered, *params)
        finally:
            await conn.close()


@pytest.fixture(params=["sqlite", "postgresql"])
async def backend(request: pytest.FixtureRequest, tmp_path: Path) -> AsyncIterator[StoreBackend]:
    """The store tests' database, on each engine (PostgreSQL must be reachable: no skip)."""
    if request.param == "sqlite":
        yield StoreBackend("sqlite", str(tmp_path / "s.db"))
        return
    async with pg_schema() as url:
        yield StoreBackend("postgresql", url)


@pytest.fixture
async def store(backend: StoreBackend) -> AsyncIterator[Any]:
    """A store open on ``backend`` (SQLite, PostgreSQL)."""
    async with backend.open() as opened:
        yield opened
