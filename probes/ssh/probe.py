"""SSHCommand: run one shell command on a target over SSH and return its output.

Reference: ``docs/probes/SSHCommand.md``. The job names the target (``host``, default the
record's ``source``), the command (default the record's ``name``) and optionally one
credential; without one, every ``ssh_password`` / ``ssh_private_key`` credential is tried
in order, the one that last worked on that host first.

Connections are pooled per (host, port, user, credential) in ``ctx.resource`` (the
:class:`SSHPool` of ``probes.ssh.pool``, opened when the bridge starts), with at most
``max_channels`` sessions open on one connection (below OpenSSH's ``MaxSessions`` 10),
closed when idle, and replaced when they break before a command started. Host keys are
checked against a known-hosts file the bridge owns (``accept-new`` records a host's first
key; ``strict`` only trusts recorded keys).

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
import logging
import secrets
import shlex
import time
from collections.abc import AsyncIterator, Callable, Sequence
from typing import Any, Literal

import asyncssh

from bridge.wire.credentials import Credential
from bridge.wire.errors import (
    AuthFailed,
    BridgeError,
    ConnectionRefused,
    CredentialError,
    HostKeyMismatch,
    ProbeTimeout,
    ProtocolError,
    Unreachable,
)
from probes.contract import Job, ProbeContext, ProbeSpec
from probes.ssh.params import TOPIC, SSHCommandParams, SSHSettings, build_params
from probes.ssh.pool import HostKeyClient, PooledConnection, PoolKey, SSHPool, open_pool

SSH_TYPES = ("ssh_password", "ssh_private_key")
_STOP_GRACE = 2.0  # seconds a timed-out command gets after SIGTERM before SIGKILL
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
    client = HostKeyClient(pool.known_hosts, params.host_key_policy, host, port)
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
    pool = ctx.resource
    if not isinstance(pool, SSHPool):
        raise BridgeError("SSHCommand runs without its connection pool (ProbeSpec.resource)")
    result = await run_command(pool, params, creds)
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
    TOPIC, SSHCommandParams, run, build_params, settings=SSHSettings, resource=open_pool,
    target_host=lambda p: p.host, needs_credentials=True,
)  # fmt: skip
