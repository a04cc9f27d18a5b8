"""What an agent's status records and its answers say, in the order the platform hears them.

The connector takes status records and input records on separate subscriptions (on NATS,
separate pull consumers), so a heartbeat answered just before a bridge stops can be
handled after the Down its stop published. The answer is older news: the agent stays Down
until its next status record. Found by ``tests/test_nats_connector.py`` failing in CI (the
agent stayed Up after a clean stop). A real SQLite store; no broker is needed for the order.
"""

from __future__ import annotations

import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import orjson
import pytest

from bridge.instance.agents import Agents, control_output, find_agent
from bridge.instance.sqlite_store import SQLiteStore
from bridge.wire.outputs import HEARTBEAT

NAME = "order-test"


@pytest.fixture
async def agents(tmp_path: Path) -> AsyncIterator[Agents]:
    async with SQLiteStore(tmp_path / "instance.sqlite3") as store:
        yield Agents(store, heartbeat_interval=300.0, heartbeat_timeout=60.0)


def status_record(status: str, **extra: Any) -> dict[str, Any]:
    return {"status": status, "host": "h", "version": "1", "updated_at": time.time(), **extra}


async def answered_heartbeat(agents: Agents, said: dict[str, Any]) -> None:
    """A heartbeat output, and its answer carrying the status record ``said``."""
    output = await agents.store.insert("ecc_queue", control_output(NAME, HEARTBEAT, {}))
    final = {"payload": orjson.dumps({"status": said}).decode(), "error_string": ""}
    await agents.on_answer(output, final)


async def row_status(agents: Agents) -> str:
    row = await find_agent(agents.store, NAME)
    assert row is not None
    return str(row["status"])


async def test_an_answer_handled_after_the_agents_own_down_does_not_make_it_up(
    agents: Agents,
) -> None:
    await agents.on_status(NAME, status_record("Up"))
    assert await row_status(agents) == "Up"
    first = await find_agent(agents.store, NAME)
    assert first is not None
    assert not first["last_heartbeat"]
    before_stop = status_record("Up", last_heartbeat=time.time())
    await agents.on_status(NAME, status_record("Down"))  # the clean stop (or the last will)
    await answered_heartbeat(agents, before_stop)  # handled late: on its way before the stop
    assert await row_status(agents) == "Down"
    assert agents.status_of(NAME) == "Down"
    row = await find_agent(agents.store, NAME)
    assert row is not None
    assert row["last_heartbeat"]  # the answer's other news still counts (none before it)

    await agents.on_status(NAME, status_record("Up"))  # it is back: its own word lifts it
    assert await row_status(agents) == "Up"
    await answered_heartbeat(agents, status_record("Up"))
    assert await row_status(agents) == "Up"


async def test_an_answer_without_a_status_does_not_lift_the_agents_own_down(
    agents: Agents,
) -> None:
    await agents.on_status(NAME, status_record("Up"))
    await agents.on_status(NAME, status_record("Down"))
    output = await agents.store.insert("ecc_queue", control_output(NAME, HEARTBEAT, {}))
    await agents.on_answer(output, {"payload": "{}", "error_string": ""})
    assert await row_status(agents) == "Down"


async def test_a_platform_restart_remembers_an_agent_down_by_its_own_word(tmp_path: Path) -> None:
    db = tmp_path / "instance.sqlite3"
    async with SQLiteStore(db) as store:
        first = Agents(store)
        await first.on_status(NAME, status_record("Down"))
    async with SQLiteStore(db) as store:
        again = Agents(store)
        await again.load()
        await answered_heartbeat(again, status_record("Up"))
        assert await row_status(again) == "Down"
