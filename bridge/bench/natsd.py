"""Private ``nats-server`` processes on loopback: one node, or a cluster of N with JetStream.

Used by ``midbridge bench roundtrip --transport nats``, ``midbridge bench cluster`` and the
test fixture (``tests/nats_cluster.py``). Each node gets its own free client, route and
monitoring ports and its own JetStream store directory under one temporary directory; the
nodes of a cluster list each other as routes. :meth:`NatsCluster.start` returns once every
node answers ``/healthz`` (JetStream ready, a meta leader elected) within a bounded wait;
:meth:`NatsCluster.close` always stops every node and removes the directory.

Nodes can be stopped (SIGTERM, lame duck), killed (SIGKILL) and started again, on the same
ports and store, to test what a MID cluster does when it loses a broker node.
"""

from __future__ import annotations

import contextlib
import shutil
import signal
import subprocess
import tempfile
import time
import urllib.error
import urllib.request
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from types import TracebackType
from typing import Any

from bridge.demo.broker import LOOPBACK, free_port
from bridge.wire.broker import BrokerConfig

NATS_SERVER = "nats-server"
_SBIN_DIRS = ("/usr/sbin", "/usr/local/sbin", "/usr/local/bin")


class NatsServerError(RuntimeError):
    """nats-server is missing or a node did not come up in time (the message says why)."""


def find_nats_server() -> str | None:
    """Path of the ``nats-server`` binary, or None (Debian puts it in /usr/sbin)."""
    found = shutil.which(NATS_SERVER)
    if found:
        return found
    for directory in _SBIN_DIRS:
        candidate = Path(directory) / NATS_SERVER
        if candidate.is_file():
            return str(candidate)
    return None


@dataclass
class NatsNode:
    """One node: its ports, directory and process."""

    name: str
    host: str
    port: int
    cluster_port: int
    http_port: int
    workdir: Path
    proc: subprocess.Popen[bytes] | None = field(default=None, repr=False)

    @property
    def url(self) -> str:
        return f"nats://{self.host}:{self.port}"

    @property
    def running(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    @property
    def log_path(self) -> Path:
        return self.workdir / "nats.log"

    def log_tail(self, chars: int = 3000) -> str:
        try:
            return self.log_path.read_text(errors="replace")[-chars:]
        except OSError:
            return ""

    def healthy(self) -> bool:
        """``/healthz`` answers 200: the node serves clients and JetStream is ready."""
        url = f"http://{self.host}:{self.http_port}/healthz"
        try:
            with urllib.request.urlopen(url, timeout=1.0) as response:
                return bool(response.status == 200)
        except (urllib.error.URLError, OSError, ValueError):
            return False


class NatsCluster:
    """``size`` nats-server nodes with JetStream, clustered when ``size`` > 1."""

    def __init__(
        self,
        size: int = 3,
        *,
        host: str = LOOPBACK,
        workdir: Path | None = None,
        binary: str | None = None,
        cluster_name: str = "midbridge",
        start_timeout: float = 30.0,
        extra_config: Sequence[str] = (),
    ) -> None:
        found = binary or find_nats_server()
        if found is None:
            raise NatsServerError(
                "nats-server not found on PATH or in /usr/sbin: install it (Debian package "
                "`nats-server`) to run a NATS cluster"
            )
        if size < 1:
            raise ValueError("a cluster has at least one node")
        self.binary = found
        self.size = size
        self.host = host
        self.cluster_name = cluster_name
        self.start_timeout = start_timeout
        self.extra_config = list(extra_config)  # lines added to every node's config
        self._tmp: tempfile.TemporaryDirectory[str] | None = None
        if workdir is None:
            self._tmp = tempfile.TemporaryDirectory(prefix="midbridge-nats-")
            workdir = Path(self._tmp.name)
        self.workdir = workdir
        self.nodes = [
            NatsNode(
                f"n{i + 1}",
                host,
                free_port(host),
                free_port(host),
                free_port(host),
                workdir / f"n{i + 1}",
            )
            for i in range(size)
        ]

    @property
    def urls(self) -> list[str]:
        return [node.url for node in self.nodes]

    def broker_settings(self, **nats: Any) -> dict[str, Any]:
        """A bridge's ``[broker]`` for this cluster: every node's URL, replicas = its size."""
        node = self.nodes[0]
        settings = {"servers": self.urls, "replicas": self.size, **nats}
        return {"kind": "nats", "host": node.host, "port": node.port, "nats": settings}

    def broker_config(self, **nats: Any) -> BrokerConfig:
        return BrokerConfig.model_validate(self.broker_settings(**nats))

    def _config(self, node: NatsNode) -> str:
        store = node.workdir / "jetstream"
        lines = [
            f"server_name: {node.name}",
            f"listen: {node.host}:{node.port}",
            f"http: {node.host}:{node.http_port}",
            "max_payload: 8MB",
            "jetstream {",
            f'  store_dir: "{store}"',
            "  max_memory_store: 256MB",
            "  max_file_store: 4GB",
            "}",
            *self.extra_config,
        ]
        if self.size > 1:
            routes = ", ".join(
                f"nats-route://{other.host}:{other.cluster_port}"
                for other in self.nodes
                if other is not node
            )
            lines += [
                "cluster {",
                f"  name: {self.cluster_name}",
                f"  listen: {node.host}:{node.cluster_port}",
                f"  routes: [{routes}]",
                "}",
            ]
        return "\n".join(lines) + "\n"

    # --- lifecycle ----------------------------------------------------------------------

    def start(self) -> NatsCluster:
        """Start every node that is not running; wait until all are healthy."""
        for index, node in enumerate(self.nodes):
            if not node.running:
                self._spawn(index)
        self.wait_healthy(range(self.size))
        return self

    def _spawn(self, index: int) -> None:
        node = self.nodes[index]
        node.workdir.mkdir(parents=True, exist_ok=True)
        config = node.workdir / "nats.conf"
        config.write_text(self._config(node))
        with node.log_path.open("ab") as log:
            node.proc = subprocess.Popen(
                [self.binary, "-c", str(config)],
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=log,
            )

    def wait_healthy(self, indexes: range | list[int], timeout: float | None = None) -> None:
        deadline = time.monotonic() + (timeout or self.start_timeout)
        waiting = [self.nodes[i] for i in indexes]
        while waiting:
            for node in list(waiting):
                if node.proc is not None and node.proc.poll() is not None:
                    raise NatsServerError(
                        f"nats-server {node.name} exited {node.proc.returncode}:\n{node.log_tail()}"
                    )
                if node.healthy():
                    waiting.remove(node)
            if not waiting:
                return
            if time.monotonic() > deadline:
                names = ", ".join(n.name for n in waiting)
                raise NatsServerError(
                    f"nats-server {names} not healthy within "
                    f"{timeout or self.start_timeout:g} s:\n{waiting[0].log_tail()}"
                )
            time.sleep(0.1)

    def stop_node(self, index: int, timeout: float = 10.0) -> None:
        """A clean stop (SIGTERM); SIGKILL if it does not exit within ``timeout``."""
        self._end(self.nodes[index], signal.SIGTERM, timeout)

    def kill_node(self, index: int) -> None:
        self._end(self.nodes[index], signal.SIGKILL, 10.0)

    def start_node(self, index: int) -> None:
        """Start a stopped node again (same ports, same store); wait until it is healthy."""
        if not self.nodes[index].running:
            self._spawn(index)
        self.wait_healthy([index])

    @staticmethod
    def _end(node: NatsNode, sig: int, timeout: float) -> None:
        proc = node.proc
        if proc is None or proc.poll() is not None:
            return
        with contextlib.suppress(ProcessLookupError):
            proc.send_signal(sig)
        try:
            proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            with contextlib.suppress(ProcessLookupError):
                proc.kill()
            proc.wait(timeout=10)

    def close(self) -> None:
        """Stop every node (SIGKILL after a short grace) and remove the directory."""
        for node in self.nodes:
            with contextlib.suppress(Exception):
                self._end(node, signal.SIGTERM, 5.0)
        if self._tmp is not None:
            with contextlib.suppress(OSError):
                self._tmp.cleanup()
            self._tmp = None

    def __enter__(self) -> NatsCluster:
        try:
            return self.start()
        except BaseException:
            self.close()
            raise

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()
