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
import os
import re
import uuid
from collections.abc import Callable, Iterator, Mapping
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
