"""SSHCommand's connection pool and the known-hosts file it checks host keys against."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import asyncssh

from bridge.wire.credentials import Credential
from bridge.wire.errors import (
    ConfigError,
    ProtocolError,
    Refused,
)
from probes.ssh.params import TOPIC, HostKeyPolicy, SSHSettings

_CLOSE_WAIT = 5.0  # seconds to wait for an abandoned channel to close before dropping it

log = logging.getLogger("midbridge.probes.ssh")


# --- known hosts -----------------------------------------------------------------------


def _host_label(host: str, port: int) -> str:
    return host if port == 22 else f"[{host}]:{port}"


def _public_line(key: asyncssh.SSHKey) -> str:
    """``<algorithm> <base64>`` without the comment."""
    text: str = key.export_public_key("openssh").decode("ascii")
    return " ".join(text.split()[:2])


def _fingerprint(key: asyncssh.SSHKey) -> str:
    value: str = key.get_fingerprint("sha256")
    return value


class KnownHostsStore:
    """An OpenSSH ``known_hosts`` file owned by the bridge, re-read when it changes.

    An administrator may edit it (remove a stale entry after a legitimate key change)
    while the bridge runs.
    """

    def __init__(self, path: Path) -> None:
        self.path = path
        self._stamp: tuple[int, int, int] | None = None
        self._known: Any = asyncssh.import_known_hosts("")

    def _refresh(self) -> None:
        try:
            info = self.path.stat()
        except FileNotFoundError:
            if self._stamp is not None:
                self._known = asyncssh.import_known_hosts("")
                self._stamp = None
            return
        stamp = (info.st_mtime_ns, info.st_size, info.st_ino)
        if stamp == self._stamp:
            return
        try:
            self._known = asyncssh.read_known_hosts(str(self.path))
        except (ValueError, OSError, asyncssh.KeyImportError) as exc:
            raise ConfigError(
                f"the known-hosts file does not load: {type(exc).__name__}: {str(exc)[:200]}",
                field=f"probes.settings.{TOPIC}.known_hosts",
            ) from None
        self._stamp = stamp

    def match(self, host: str, addr: str, port: int | None) -> Any:
        """asyncssh's ``known_hosts`` callable: what is trusted for this host.

        Exact on the port, as OpenSSH is: asyncssh's public ``match`` falls back to the
        port-22 entry when ``[host]:port`` has none, which would call a different server
        on another port of the same address a mismatch.
        """
        self._refresh()
        exact = getattr(self._known, "_match", None)
        if exact is not None:
            return exact(host, addr, port)
        return self._known.match(host, addr, port)

    def knows(self, host: str, addr: str, port: int | None) -> bool:
        """Whether any key (or CA) is recorded for the host."""
        matched = self.match(host, addr, None if port == 22 else port)
        return bool(matched[0] or matched[1])

    def trusts(self, host: str, addr: str, port: int, key: asyncssh.SSHKey) -> bool:
        return key in self.match(host, addr, None if port == 22 else port)[0]

    def add(self, host: str, port: int, key: asyncssh.SSHKey) -> None:
        """Append ``[host]:port <key>`` (file 0600, directory created 0700)."""
        self.path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
        line = f"{_host_label(host, port)} {_public_line(key)}\n"
        fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600)
        try:
            os.write(fd, line.encode("ascii"))
        finally:
            os.close(fd)
        self._stamp = None  # re-read on next use


class HostKeyClient(asyncssh.SSHClient):
    """Host-key policy for one connection attempt, and loss notification for the pool."""

    def __init__(self, store: KnownHostsStore, policy: HostKeyPolicy, host: str, port: int):
        self.store = store
        self.policy = policy
        self.host = host
        self.port = port
        self.mismatch: str | None = None  # fingerprint of an offered key that differs
        self.unknown: str | None = None  # fingerprint offered to a strict check, no record
        self._new_key: asyncssh.SSHKey | None = None
        self.on_lost: Callable[[], None] | None = None

    def validate_host_public_key(
        self, host: str, addr: str, port: int, key: asyncssh.SSHKey
    ) -> bool:
        # Called only for a key that is not among the recorded ones.
        if self.store.knows(host, addr, port):
            self.mismatch = _fingerprint(key)
            return False
        if self.policy == "strict":
            self.unknown = _fingerprint(key)
            return False
        self._new_key = key  # trusted once the key exchange proves the server holds it
        return True

    def begin_auth(self, username: str) -> None:
        # The key exchange is done: the server proved it holds the key. Record it.
        key, self._new_key = self._new_key, None
        if key is None:
            return
        if self.store.knows(self.host, self.host, self.port):
            if not self.store.trusts(self.host, self.host, self.port, key):
                log.warning(
                    "ssh %s:%d: another connection recorded a different host key meanwhile; "
                    "not recording %s",
                    self.host,
                    self.port,
                    _fingerprint(key),
                )
            return
        self.store.add(self.host, self.port, key)
        log.info(
            "ssh %s:%d: recorded new host key %s in %s",
            self.host,
            self.port,
            _fingerprint(key),
            self.store.path,
        )

    def connection_lost(self, exc: Exception | None) -> None:
        if self.on_lost is not None:
            self.on_lost()


# --- the pool --------------------------------------------------------------------------

PoolKey = tuple[str, int, str, str]  # host, port, user, credential id


@dataclass(eq=False)
class PooledConnection:
    key: PoolKey
    conn: Any  # asyncssh.SSHClientConnection
    slots: asyncio.Semaphore
    active: int = 0
    dead: bool = False
    last_used: float = field(default_factory=time.monotonic)
    idle_handle: asyncio.TimerHandle | None = None


class SSHPool:
    """SSH connections shared by jobs: one per (host, port, user, credential).

    ``acquire`` returns a connection with one of its ``max_channels`` session slots held;
    ``release`` (or ``release_when_closed``) gives it back. Concurrent jobs for a key that
    has no connection yet wait for one connection attempt (never one each). Unused
    connections close after ``idle_timeout``; beyond ``max_connections`` the least
    recently used idle ones close first.
    """

    def __init__(self, settings: SSHSettings) -> None:
        self.settings = settings
        self.known_hosts = KnownHostsStore(settings.known_hosts)
        self.max_channels = settings.max_channels
        self._conns: dict[PoolKey, PooledConnection] = {}
        self._connecting: dict[PoolKey, asyncio.Task[PooledConnection]] = {}
        self._affinity: dict[tuple[str, int], str] = {}  # (host, port) → credential that worked
        self._background: set[asyncio.Task[None]] = set()
        self.closed = False
        # counters (tests, metrics)
        self.connects = 0
        self.open_retries = 0  # session opens the server refused for a moment
        self.active_channels = 0
        self.peak_channels = 0

    def __len__(self) -> int:
        return len(self._conns)

    # credentials that worked on a host go first next time
    def ordered(self, host: str, port: int, creds: Sequence[Credential]) -> list[Credential]:
        preferred = self._affinity.get((host, port))
        first = [c for c in creds if c.id == preferred]
        return first + [c for c in creds if c.id != preferred]

    def remember(self, host: str, port: int, credential_id: str) -> None:
        self._affinity[(host, port)] = credential_id

    async def acquire(
        self, key: PoolKey, connect: Callable[[], Awaitable[Any]]
    ) -> PooledConnection:
        for _ in range(3):
            if self.closed:
                raise Refused("the bridge is shutting down")
            entry = self._conns.get(key)
            if entry is None or entry.dead:
                entry = await self._connect_once(key, connect)
            await entry.slots.acquire()
            if entry.dead:  # it broke while this job waited for a slot
                entry.slots.release()
                continue
            entry.active += 1
            entry.last_used = time.monotonic()
            if entry.idle_handle is not None:
                entry.idle_handle.cancel()
                entry.idle_handle = None
            self.active_channels += 1
            self.peak_channels = max(self.peak_channels, self.active_channels)
            return entry
        raise ProtocolError("the SSH connection kept closing before a session could start")

    async def _connect_once(
        self, key: PoolKey, connect: Callable[[], Awaitable[Any]]
    ) -> PooledConnection:
        task = self._connecting.get(key)
        if task is None:
            task = asyncio.get_running_loop().create_task(self._open(key, connect))
            self._connecting[key] = task

            def done(t: asyncio.Task[PooledConnection]) -> None:
                if self._connecting.get(key) is t:
                    del self._connecting[key]
                if not t.cancelled():
                    t.exception()  # retrieved: every waiter gets it through shield

            task.add_done_callback(done)
        return await asyncio.shield(task)

    async def _open(self, key: PoolKey, connect: Callable[[], Awaitable[Any]]) -> PooledConnection:
        conn = await connect()
        entry = PooledConnection(key, conn, asyncio.Semaphore(self.max_channels))
        client = conn.get_owner()
        if isinstance(client, HostKeyClient):
            client.on_lost = lambda: self._lost(entry)
        if conn.is_closed() or self.closed:
            conn.close()
            raise ProtocolError("the SSH connection closed as soon as it opened")
        old = self._conns.get(key)
        if old is not None and old is not entry:
            self.discard(old)
        self._conns[key] = entry
        self.connects += 1
        self._evict(keep=entry)
        return entry

    def _lost(self, entry: PooledConnection) -> None:
        entry.dead = True
        if self._conns.get(entry.key) is entry:
            del self._conns[entry.key]
        if entry.idle_handle is not None:
            entry.idle_handle.cancel()
            entry.idle_handle = None

    def discard(self, entry: PooledConnection) -> None:
        """Drop a connection from the pool and close it."""
        self._lost(entry)
        entry.conn.close()

    def release(self, entry: PooledConnection) -> None:
        entry.active -= 1
        self.active_channels -= 1
        entry.slots.release()
        entry.last_used = time.monotonic()
        if entry.active == 0 and not entry.dead and not self.closed:
            loop = asyncio.get_running_loop()
            entry.idle_handle = loop.call_later(self.settings.idle_timeout, self._close_idle, entry)

    def release_when_closed(self, entry: PooledConnection, channel: Any) -> None:
        """Hold the slot until the (closing) channel is gone, without blocking the caller."""

        async def wait() -> None:
            try:
                async with asyncio.timeout(_CLOSE_WAIT):
                    await channel.wait_closed()
            except TimeoutError:
                self.discard(entry)  # a channel that will not close: trust nothing on it
            finally:
                self.release(entry)

        task = asyncio.get_running_loop().create_task(wait())
        self._background.add(task)
        task.add_done_callback(self._background.discard)

    def _close_idle(self, entry: PooledConnection) -> None:
        entry.idle_handle = None
        if entry.active == 0 and not entry.dead:
            log.debug("ssh %s:%d (%s): closing idle connection", *entry.key[:3])
            self.discard(entry)

    def _evict(self, keep: PooledConnection) -> None:
        excess = len(self._conns) - self.settings.max_connections
        if excess <= 0:
            return
        idle = sorted(
            (e for e in self._conns.values() if e.active == 0 and e is not keep),
            key=lambda e: e.last_used,
        )
        for entry in idle[:excess]:
            self.discard(entry)

    async def aclose(self) -> None:
        """Close every connection (the bridge calls this at shutdown)."""
        self.closed = True
        for task in list(self._connecting.values()) + list(self._background):
            task.cancel()
        entries = list(self._conns.values())
        for entry in entries:
            self.discard(entry)
        waits = [e.conn.wait_closed() for e in entries]
        if waits:
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(2.0):
                    await asyncio.gather(*waits, return_exceptions=True)


@asynccontextmanager
async def open_pool(settings: SSHSettings, state_dir: Path | None) -> AsyncIterator[SSHPool]:
    """SSHCommand's ``ProbeSpec.resource``: the pool, opened at bridge start, closed at stop.

    The known-hosts file is the bridge's own (in its state directory) unless configured.
    """
    if state_dir is not None and "known_hosts" not in settings.model_fields_set:
        settings = settings.model_copy(update={"known_hosts": state_dir / "ssh_known_hosts"})
    pool = SSHPool(settings)
    try:
        yield pool
    finally:
        await pool.aclose()
