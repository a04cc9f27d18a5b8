"""SSHCommand: run one shell command on a target over SSH and return its output.

Reference: ``docs/probes/SSHCommand.md``. The job names the target (``host``, default the
record's ``source``), the command (default the record's ``name``) and optionally one
credential; without one, every ``ssh_password`` / ``ssh_private_key`` credential is tried
in order, the one that last worked on that host first.

Connections are pooled per (host, port, user, credential) in ``ctx.resources["ssh"]``
(:class:`SSHPool`), with at most ``max_channels`` sessions open on one connection (below
OpenSSH's ``MaxSessions`` 10), closed when idle, and replaced when they break before a
command started. Host keys are checked against a known-hosts file the bridge owns
(``accept-new`` records a host's first key; ``strict`` only trusts recorded keys).

The command goes to the server as it is (the login shell runs it, as with ``ssh host
cmd``), its standard input closed. A command that outlives ``command_timeout`` is stopped
on the server, not only abandoned: SIGTERM then SIGKILL through the channel, which
OpenSSH (7.9+) delivers to the session's whole process group. With ``must_sudo`` the
command runs under ``sudo -S -k -p ''`` inside a small ``sh`` wrapper; the password goes
to sudo's standard input, never onto a command line, and the command itself reads
``/dev/null``. The wrapper also carries the stop: sshd signals as the login user, who
may signal sudo but not the root processes under it, so sudo relays SIGTERM to the
wrapper, which kills its process group as root.

Secrets never leave this module: errors and logs name credential ids, never values.
"""

from __future__ import annotations

import asyncio
import contextlib
import ipaddress
import logging
import os
import re
import secrets
import shlex
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import asyncssh
from pydantic import BaseModel, ConfigDict, Field, field_validator

from bridge.agent.config import BridgeSection
from bridge.wire.credentials import Credential
from bridge.wire.errors import (
    AuthFailed,
    BadParameter,
    ConfigError,
    ConnectionRefused,
    CredentialError,
    HostKeyMismatch,
    ProbeTimeout,
    ProtocolError,
    Refused,
    Unreachable,
)
from bridge.wire.records import OutputRecord
from probes.contract import Job, ProbeContext, ProbeParams, ProbeSpec, parse_params, parse_settings

TOPIC = "SSHCommand"
RESOURCE = "ssh"  # key of the pool in ctx.resources
SSH_TYPES = ("ssh_password", "ssh_private_key")
HostKeyPolicy = Literal["accept-new", "strict"]

MAX_OUTPUT_LIMIT = 16 * 1024 * 1024  # the most a job may ask to keep, per stream
DEFAULT_KNOWN_HOSTS = Path(BridgeSection.model_fields["state_dir"].default) / "ssh_known_hosts"
_STOP_GRACE = 2.0  # seconds a timed-out command gets after SIGTERM before SIGKILL
_CLOSE_WAIT = 5.0  # seconds to wait for an abandoned channel to close before dropping it
_OPEN_RETRY_DELAYS = (0.01, 0.02, 0.05, 0.1, 0.2, 0.4)  # after a refused session open
# OpenSSH answers "no more sessions" with OPEN_CONNECT_FAILED ("open failed").
_RETRY_OPEN_CODES = frozenset(
    {
        asyncssh.OPEN_ADMINISTRATIVELY_PROHIBITED,
        asyncssh.OPEN_CONNECT_FAILED,
        asyncssh.OPEN_RESOURCE_SHORTAGE,
    }
)
_SUDO_CHATTER_LIMIT = 8192  # bytes of sudo's own stderr kept before the command starts
_HOSTNAME = re.compile(
    r"^(?=.{1,253}$)[A-Za-z0-9_](?:[A-Za-z0-9_-]{0,62})(?:\.[A-Za-z0-9_-]{1,63})*\.?$"
)

log = logging.getLogger("midbridge.probes.ssh")

# Under sudo: ``sudo ... -- sh -c WRAPPER midbridge COMMAND MARKER``. The wrapper first
# writes the marker to stderr (its presence tells that sudo accepted the password and
# started the command; what came before it is sudo's own text), then runs the command
# with root's shell in the background, stdin /dev/null, and returns its status. On
# SIGTERM/HUP/INT (relayed by sudo) it kills its process group, which sshd made for this
# session: compound commands and their children die too.
_SUDO_WRAPPER = (
    'printf "%s\\n" "$2" >&2; '
    'trap "trap - TERM HUP INT; kill -KILL 0" TERM HUP INT; '
    '"${SHELL:-/bin/sh}" -c "$1" </dev/null & wait $!'
)


# --- configuration and parameters ------------------------------------------------------


class SSHSettings(BaseModel):
    """``[probes.settings.SSHCommand]``: defaults for jobs and the pool's limits."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    known_hosts: Path = DEFAULT_KNOWN_HOSTS  # the bridge's own OpenSSH-format store
    host_key_policy: HostKeyPolicy = "accept-new"
    connect_timeout: float = Field(10.0, gt=0, le=300)
    command_timeout: float = Field(60.0, gt=0, le=86_400)
    max_output: int = Field(1_048_576, ge=0, le=MAX_OUTPUT_LIMIT)
    max_channels: int = Field(8, ge=1, le=64)  # sessions on one connection (MaxSessions 10)
    idle_timeout: float = Field(60.0, ge=0, le=86_400)  # close an unused connection after
    max_connections: int = Field(256, ge=1, le=65_536)  # idle ones beyond this close first
    keepalive_interval: float = Field(30.0, ge=0, le=3600)  # 0 = off


def load_settings(settings: Mapping[str, Any]) -> SSHSettings:
    return parse_settings(SSHSettings, settings, TOPIC)


class SSHCommandParams(ProbeParams):
    host: str = Field(min_length=1, max_length=253)
    port: int = Field(22, ge=1, le=65_535)
    command: str = Field(min_length=1, max_length=65_536)
    credential_id: str | None = Field(None, min_length=1, max_length=256)
    must_sudo: bool = False
    connect_timeout: float = Field(10.0, gt=0, le=300)
    command_timeout: float = Field(60.0, gt=0, le=86_400)
    max_output: int = Field(1_048_576, ge=0, le=MAX_OUTPUT_LIMIT)
    host_key_policy: HostKeyPolicy = "accept-new"

    @field_validator("host")
    @classmethod
    def _check_host(cls, value: str) -> str:
        host = value.strip()
        if host.startswith("[") and host.endswith("]"):
            host = host[1:-1]
        try:
            return str(ipaddress.ip_address(host))
        except ValueError:
            pass
        if not _HOSTNAME.match(host):
            raise ValueError("must be an IP address or a host name")
        return host.lower()

    @field_validator("command")
    @classmethod
    def _check_command(cls, value: str) -> str:
        if "\x00" in value:
            raise ValueError("must not contain NUL characters")
        if not value.strip():
            raise ValueError("must not be blank")
        return value


def build_params(record: OutputRecord, settings: Mapping[str, Any]) -> SSHCommandParams:
    """Parameters from the payload; ``host`` defaults to ``source``, ``command`` to ``name``.

    Empty values (XML parameters often carry ``value=""``) count as absent.
    """
    cfg = load_settings(settings)
    data = {k: v for k, v in record.payload.items() if v is not None and v != ""}
    if "host" not in data:
        if not record.source.strip():
            raise BadParameter(
                "no target: give payload 'host' or the record's source", field="host"
            )
        data["host"] = record.source
    if "command" not in data:
        if not record.name.strip():
            raise BadParameter(
                "no command: give payload 'command' or the record's name", field="command"
            )
        data["command"] = record.name
    for key in ("connect_timeout", "command_timeout", "max_output", "host_key_policy"):
        data.setdefault(key, getattr(cfg, key))
    return parse_params(SSHCommandParams, data)


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


class _Client(asyncssh.SSHClient):
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
        if isinstance(client, _Client):
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


def get_pool(ctx: ProbeContext) -> SSHPool:
    pool = ctx.resources.get(RESOURCE)
    if not isinstance(pool, SSHPool):
        settings = dict(ctx.settings)
        if ctx.state_dir is not None:  # the bridge's own store unless configured otherwise
            settings.setdefault("known_hosts", ctx.state_dir / "ssh_known_hosts")
        pool = SSHPool(load_settings(settings))
        ctx.resources[RESOURCE] = pool
    return pool


# --- connecting --------------------------------------------------------------------------


class _AuthRejected(Exception):
    """This credential was refused; the next one may be tried."""

    def __init__(self, note: str = "") -> None:
        super().__init__(note)
        self.note = note


def _load_key(cred: Credential) -> Any:
    fields = cred.fields
    passphrase = fields.get("passphrase")
    try:
        if "private_key" in fields:
            return asyncssh.import_private_key(fields["private_key"], passphrase)
        return asyncssh.read_private_key(fields["private_key_file"], passphrase)
    except (asyncssh.KeyImportError, asyncssh.KeyEncryptionError, OSError, ValueError) as exc:
        # These messages describe the format or the file, never the key's content.
        reason = type(exc).__name__
        if isinstance(exc, OSError):
            reason = exc.strerror or reason
        raise _AuthRejected(f"private key unusable: {reason}") from None


def _clip(text: object, limit: int = 200) -> str:
    value = str(text).replace("\n", " ").strip()
    return value if len(value) <= limit else value[: limit - 1] + "…"


async def _connect(pool: SSHPool, cred: Credential, params: SSHCommandParams) -> Any:
    """One authenticated connection, library errors translated (auth → ``_AuthRejected``)."""
    host, port = params.host, params.port
    client = _Client(pool.known_hosts, params.host_key_policy, host, port)
    options: dict[str, Any] = {
        "username": cred.fields["user"],
        "known_hosts": pool.known_hosts.match,
        "client_factory": lambda: client,
        "config": None,  # never read ~/.ssh/config
        "agent_path": None,  # never use an ssh-agent
        "agent_forwarding": False,
        "x509_trusted_certs": None,
        "gss_host": None,
        "host_based_auth": False,
        "keepalive_interval": pool.settings.keepalive_interval,
        "keepalive_count_max": 3,
    }
    if cred.type == "ssh_password":
        options.update(
            password=cred.fields["password"],
            client_keys=None,
            preferred_auth=("password", "keyboard-interactive"),
        )
    else:
        options.update(
            client_keys=[_load_key(cred)],
            password=None,
            preferred_auth=("publickey",),
        )
    where = f"{host}:{port}"
    try:
        async with asyncio.timeout(params.connect_timeout):
            conn = await asyncssh.connect(host, port, **options)
    except TimeoutError:
        raise ProbeTimeout(
            f"no SSH session with {where} within {params.connect_timeout:g} s (connect_timeout)"
        ) from None
    except asyncssh.PermissionDenied:
        raise _AuthRejected() from None
    except asyncssh.HostKeyNotVerifiable:
        if client.mismatch is not None:
            log.warning(
                "ssh %s: host key mismatch (offered %s, recorded key differs)",
                where,
                client.mismatch,
            )
            raise HostKeyMismatch(
                f"host key mismatch for {where}: the server offered {client.mismatch}, which "
                f"is not the key recorded in {pool.known_hosts.path}; if the change is "
                "expected, remove the old entry"
            ) from None
        if client.unknown is not None:
            raise HostKeyMismatch(
                f"host key of {where} is not known (host_key_policy strict): it offered "
                f"{client.unknown}; record it in {pool.known_hosts.path} or use accept-new"
            ) from None
        raise ProtocolError(f"host key of {where} not verifiable") from None
    except ConnectionRefusedError:
        raise ConnectionRefused(f"{where} refused the connection") from None
    except OSError as exc:  # unreachable, unresolvable, reset
        raise Unreachable(
            f"cannot connect to {where}: {_clip(exc.strerror or type(exc).__name__)}"
        ) from None
    except asyncssh.DisconnectError as exc:
        raise ProtocolError(f"SSH handshake with {where} failed: {_clip(exc.reason)}") from None
    except asyncssh.Error as exc:
        raise ProtocolError(f"SSH error with {where}: {_clip(exc.reason)}") from None
    log.info("ssh %s: connected as %s (credential %s)", where, cred.fields["user"], cred.id)
    return conn


# --- running the command -------------------------------------------------------------------


class _CommandSession(asyncssh.SSHClientSession[bytes]):
    """Collects stdout/stderr up to ``limit`` bytes each; reads and drops the rest."""

    def __init__(self, limit: int, marker: bytes | None, done: asyncio.Future[None]) -> None:
        self.limit = limit
        self.stdout = bytearray()
        self.stderr = bytearray()
        self.stdout_truncated = False
        self.stderr_truncated = False
        self.exit_status: int | None = None
        self.exit_signal: str | None = None
        self.lost: Exception | None = None
        self._marker = marker
        self.started = marker is None  # under sudo: once the marker came through
        self.sudo_text = bytearray()
        self._done = done

    def _keep(self, buf: bytearray, data: bytes) -> bool:
        room = self.limit - len(buf)
        if room > 0:
            buf += data[:room]
        return len(data) > room

    def data_received(self, data: bytes, datatype: asyncssh.DataType) -> None:
        if datatype == asyncssh.EXTENDED_DATA_STDERR:
            if not self.started:
                assert self._marker is not None
                self.sudo_text += data
                at = self.sudo_text.find(self._marker)
                if at < 0:
                    if len(self.sudo_text) > _SUDO_CHATTER_LIMIT:
                        del self.sudo_text[: len(self.sudo_text) - _SUDO_CHATTER_LIMIT]
                    return
                self.started = True
                data = bytes(self.sudo_text[at + len(self._marker) :])
                del self.sudo_text[at:]
                if not data:
                    return
            if self._keep(self.stderr, data):
                self.stderr_truncated = True
        elif self._keep(self.stdout, data):
            self.stdout_truncated = True

    def exit_status_received(self, status: int) -> None:
        self.exit_status = status

    def exit_signal_received(self, signal: str, core_dumped: bool, msg: str, lang: str) -> None:
        self.exit_signal = signal

    def connection_lost(self, exc: Exception | None) -> None:
        self.lost = exc
        if not self._done.done():
            self._done.set_result(None)


def remote_command(command: str, sudo: Literal["no", "password", "nopassword"], marker: str) -> str:
    """What goes into the SSH exec request (no secret ever does)."""
    if sudo == "no":
        return command
    flags = "-S -k -p ''" if sudo == "password" else "-n -k"
    return (
        f"exec sudo {flags} -- sh -c {shlex.quote(_SUDO_WRAPPER)} midbridge "
        f"{shlex.quote(command)} {marker}"
    )


def _sudo_password(cred: Credential) -> str | None:
    value = cred.fields.get("sudo_password")
    if value is None and cred.type == "ssh_password":
        value = cred.fields.get("password")
    return value


async def _stop(channel: Any, done: asyncio.Future[None]) -> None:
    """Stop a running command: SIGTERM, then SIGKILL (to the session's process group), close."""
    for signal, grace in (("TERM", _STOP_GRACE), ("KILL", 1.0)):
        try:
            channel.send_signal(signal)
        except (OSError, asyncssh.Error):
            break
        try:
            async with asyncio.timeout(grace):
                await asyncio.shield(done)
            return
        except TimeoutError:
            continue
    channel.close()


async def _open_session(
    pool: SSHPool, entry: PooledConnection, command: str, make: Callable[[], _CommandSession]
) -> tuple[Any, _CommandSession]:
    """Open the session channel on a held slot; library errors escape untranslated.

    OpenSSH frees a session a moment after the client has seen its channel closed, so an
    open can meet "no more sessions" (``MaxSessions``) although the client holds fewer
    channels than that: such a refusal is retried after a short pause, keeping the slot
    (releasing it would let another job take the server's next free session first).
    """
    for delay in (*_OPEN_RETRY_DELAYS, None):
        session = make()

        def factory(session: _CommandSession = session) -> _CommandSession:
            return session

        try:
            channel, _ = await entry.conn.create_session(factory, command, encoding=None)
        except asyncssh.ChannelOpenError as exc:
            if delay is None or exc.code not in _RETRY_OPEN_CODES or entry.conn.is_closed():
                raise
            pool.open_retries += 1
            await asyncio.sleep(delay)
            continue
        return channel, session
    raise AssertionError("unreachable")  # pragma: no cover


async def _execute(
    pool: SSHPool,
    entry: PooledConnection,
    channel: Any,
    session: _CommandSession,
    done: asyncio.Future[None],
    cred: Credential,
    params: SSHCommandParams,
    password: str | None,
) -> dict[str, Any]:
    """Drive a started session to its end; the slot is given back in every case."""
    where = f"{params.host}:{params.port}"
    started = time.perf_counter()
    try:
        if password is not None:
            channel.write((password + "\n").encode())
        channel.write_eof()
        try:
            async with asyncio.timeout(params.command_timeout):
                await asyncio.shield(done)
        except TimeoutError:
            await _stop(channel, done)
            raise ProbeTimeout(
                f"the command did not finish within {params.command_timeout:g} s "
                "(command_timeout); it was stopped"
            ) from None
    except (OSError, asyncssh.Error):
        # writing to a channel whose connection just died: wait for the loss to show
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(1.0):
                await asyncio.shield(done)
        if session.lost is None:
            session.lost = ConnectionError("channel write failed")
    finally:
        if done.done():  # the channel is closed: its session slot on the server is free
            pool.release(entry)
        else:  # timed out or cancelled: stop it on the server, free the slot once closed
            with contextlib.suppress(OSError, asyncssh.Error):
                channel.send_signal("TERM")
            channel.close()
            pool.release_when_closed(entry, channel)
    duration_ms = (time.perf_counter() - started) * 1000.0
    if session.lost is not None:
        pool.discard(entry)
    if session.lost is not None and session.exit_status is None and session.exit_signal is None:
        raise ProtocolError(
            f"the SSH connection to {where} was lost while the command ran; "
            "it may or may not have completed"
        )
    if not session.started:
        said = _clip(session.sudo_text.decode("utf-8", "replace"), 300) or "(nothing)"
        if session.exit_status == 1:
            raise AuthFailed(
                f"sudo on {where} refused credential {cred.id}: {said}", field="must_sudo"
            )
        raise ProtocolError(
            f"sudo on {where} did not start the command (exit {session.exit_status}): {said}",
            field="must_sudo",
        )
    return {
        "host": params.host,
        "port": params.port,
        "user": cred.fields["user"],
        "credential_id": cred.id,
        "command": params.command,
        "exit_status": session.exit_status,
        "exit_signal": session.exit_signal,
        "stdout": session.stdout.decode("utf-8", "replace"),
        "stderr": session.stderr.decode("utf-8", "replace"),
        "stdout_truncated": session.stdout_truncated,
        "stderr_truncated": session.stderr_truncated,
        "duration_ms": round(duration_ms, 3),
    }


async def _run_with(pool: SSHPool, cred: Credential, params: SSHCommandParams) -> dict[str, Any]:
    """Run the command with one credential; ``_AuthRejected`` if it does not log in."""
    host, port = params.host, params.port
    key: PoolKey = (host, port, cred.fields["user"], cred.id)
    password = _sudo_password(cred) if params.must_sudo else None
    sudo: Literal["no", "password", "nopassword"] = "no"
    if params.must_sudo:
        sudo = "password" if password is not None else "nopassword"
    marker = f"midbridge-{secrets.token_hex(8)}" if params.must_sudo else ""
    command = remote_command(params.command, sudo, marker)
    reconnected = False
    while True:
        entry = await pool.acquire(key, lambda: _connect(pool, cred, params))
        if params.credential_id is None:  # a job that names its credential proves nothing
            pool.remember(host, port, cred.id)
        done: asyncio.Future[None] = asyncio.get_running_loop().create_future()

        def make(done: asyncio.Future[None] = done) -> _CommandSession:
            return _CommandSession(
                params.max_output, (marker + "\n").encode() if marker else None, done
            )

        try:
            channel, session = await _open_session(pool, entry, command, make)
        except (asyncssh.Error, OSError) as exc:
            pool.release(entry)
            if entry.dead or entry.conn.is_closed():
                pool.discard(entry)
                if not reconnected:
                    reconnected = True
                    log.info("ssh %s:%d: pooled connection broke; reconnecting", host, port)
                    continue
                raise ProtocolError(
                    f"the SSH connection to {host}:{port} closed before the command could start"
                ) from None
            reason = getattr(exc, "reason", None) or type(exc).__name__
            raise ProtocolError(
                f"{host}:{port} refused a session channel: {_clip(reason)}"
            ) from None
        except BaseException:
            pool.release(entry)
            raise
        return await _execute(pool, entry, channel, session, done, cred, params, password)


async def run_command(
    pool: SSHPool, params: SSHCommandParams, creds: Sequence[Credential]
) -> dict[str, Any]:
    """Try the credentials in order until one logs in, then run the command once."""
    tried: list[str] = []
    for cred in pool.ordered(params.host, params.port, creds):
        try:
            return await _run_with(pool, cred, params)
        except _AuthRejected as rejected:
            if len(creds) == 1 and rejected.note:
                raise CredentialError(
                    f"credential {cred.id}: {rejected.note}", field="credential_id"
                ) from None
            tried.append(f"{cred.id} ({rejected.note})" if rejected.note else cred.id)
    raise AuthFailed(
        f"{params.host}:{params.port} accepted none of the credentials tried: {', '.join(tried)}",
        field="credential_id",
    )


async def run(job: Job[SSHCommandParams], ctx: ProbeContext) -> AsyncIterator[dict[str, Any]]:
    params = job.params
    if ctx.credentials is None:
        raise CredentialError("this bridge has no credential resolver", field="credential_id")
    creds = await ctx.credentials.resolve(
        job.record, credential_id=params.credential_id, types=SSH_TYPES
    )
    result = await run_command(get_pool(ctx), params, creds)
    log.debug(
        "ssh %s:%d as %s: exit %s in %.1f ms",
        params.host,
        params.port,
        result["credential_id"],
        result["exit_status"],
        result["duration_ms"],
    )
    yield result


SPEC = ProbeSpec(
    topic=TOPIC,
    params=SSHCommandParams,
    run=run,
    build_params=build_params,
    target_host=lambda p: p.host,
    needs_credentials=True,
)


__all__ = [
    "SPEC",
    "KnownHostsStore",
    "SSHCommandParams",
    "SSHPool",
    "SSHSettings",
    "build_params",
    "get_pool",
    "remote_command",
    "run_command",
]
