"""NATS for tests: a 3-node JetStream cluster, or one node, on loopback.

Each node runs its own ``nats-server`` (``bridge.bench.natsd.NatsCluster``) with free
client, route and monitoring ports and a JetStream store in the test's temporary
directory; the fixture returns once every node is healthy (bounded wait) and always tears
the nodes down. A test module takes the fixtures with
``pytest_plugins = ("tests.nats_cluster",)``. Without a ``nats-server`` binary the
fixtures fail, never skip (CI installs it).
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from bridge.bench.natsd import NatsCluster, NatsServerError


def _cluster(workdir: Path, size: int) -> Iterator[NatsCluster]:
    try:
        cluster = NatsCluster(size, workdir=workdir, start_timeout=30.0)
    except NatsServerError as exc:
        pytest.fail(str(exc), pytrace=False)
    try:
        with cluster:
            yield cluster
    except NatsServerError as exc:
        pytest.fail(str(exc), pytrace=False)


@pytest.fixture
def nats_cluster(tmp_path: Path) -> Iterator[NatsCluster]:
    """Three nodes, routes between them, JetStream on each (streams may have 3 replicas)."""
    yield from _cluster(tmp_path / "nats", 3)


@pytest.fixture
def nats_node(tmp_path: Path) -> Iterator[NatsCluster]:
    """One node with JetStream (a cluster of one)."""
    yield from _cluster(tmp_path / "nats", 1)
