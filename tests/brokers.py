"""Brokers for tests: a private, restartable mosquitto, and an in-thread embedded broker.

``MosquittoServer`` runs its own ``mosquitto`` on a free loopback port with the raised limits
of :func:`bridge.demo.broker.mosquitto_config` (the shared broker on 1883 keeps
Mosquitto's defaults, which drop QoS 1 messages past 1,000 queued per client) and, by
default, persistence in its own directory so that ``restart()`` keeps sessions and queued
QoS 1 messages. It can also pause (SIGSTOP) the broker, force a persistence checkpoint
(SIGUSR1) and take a password file and an ACL for security tests.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import shutil
import signal
import socket
import subprocess
import tempfile
import threading
import time
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType
from typing import Literal

from bridge.demo.broker import (
    LOOPBACK,
    BrokerEndpoint,
    embedded_broker,
    find_mosquitto,
    free_port,
    mosquitto_config,
)

BrokerKind = Literal["external", "mosquitto", "amqtt"]


@dataclass(frozen=True, slots=True)
class BrokerAddress:
    """Where a test broker listens; ``protocol`` is the MQTT version it speaks."""

    host: str
    port: int
    kind: BrokerKind = "external"
    protocol: Literal["5", "3.1.1"] = "5"

    @property
    def url(self) -> str:
        return f"mqtt://{self.host}:{self.port}"


def port_accepts(host: str, port: int, timeout: float = 0.5) -> bool:
    """True if a TCP connection to ``host:port`` succeeds within ``timeout`` seconds."""
    try:
        with socket.create_connection((host, port), timeout=timeout):
            return True
    except OSError:
        return False


def parse_host_port(text: str) -> tuple[str, int]:
    host, sep, port = text.strip().rpartition(":")
    if not sep or not host or not port.isdigit():
        raise ValueError(f"expected host:port, got {text!r}")
    return host, int(port)


class MosquittoNotFound(RuntimeError):
    pass


class MosquittoServer:
    """A private mosquitto process. ``start()``/``stop()``/``kill()``/``restart()``.

    ``users`` ({name: password}) builds a password file with ``mosquitto_passwd -b`` and
    turns anonymous access off unless ``allow_anonymous`` says otherwise; ``acl`` is the text
    of an ACL file; ``extra_config`` lines are appended to the config.
    """

    def __init__(
        self,
        workdir: Path | None = None,
        *,
        host: str = LOOPBACK,
        port: int | None = None,
        persistence: bool = True,
        autosave_interval: int = 0,
        users: Mapping[str, str] | None = None,
        acl: str | None = None,
        allow_anonymous: bool | None = None,
        extra_config: Sequence[str] = (),
        binary: str | None = None,
        start_timeout: float = 10.0,
    ) -> None:
        found = binary or find_mosquitto()
        if found is None:
            raise MosquittoNotFound(
                "mosquitto binary not found on PATH or in /usr/sbin: install the Debian "
                "package `mosquitto` (scripts/test does it) to run broker tests"
            )
        self.binary = found
        self._own_tmp: tempfile.TemporaryDirectory[str] | None = None
        if workdir is None:
            self._own_tmp = tempfile.TemporaryDirectory(prefix="midbridge-mosq-")
            workdir = Path(self._own_tmp.name)
        self.workdir = workdir
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.host = host
        self._fixed_port = port is not None
        self.port = port if port is not None else free_port(host)
        self.persistence = persistence
        self.autosave_interval = autosave_interval
        self.users = dict(users or {})
        self.acl = acl
        self.allow_anonymous = allow_anonymous if allow_anonymous is not None else not self.users
        self.extra_config = list(extra_config)
        self.start_timeout = start_timeout
        self.data_dir = self.workdir / "data"
        self.config_path = self.workdir / "mosquitto.conf"
        self.log_path = self.workdir / "mosquitto.log"
        self.password_file: Path | None = None
        self.acl_file: Path | None = None
        self._proc: subprocess.Popen[bytes] | None = None
        self._paused = False
        self.starts = 0

    # --- addresses ----------------------------------------------------------------------

    @property
    def url(self) -> str:
        return f"mqtt://{self.host}:{self.port}"

    @property
    def address(self) -> BrokerAddress:
        return BrokerAddress(self.host, self.port, "mosquitto", "5")

    @property
    def pid(self) -> int | None:
        return self._proc.pid if self._proc is not None else None

    @property
    def running(self) -> bool:
        return self._proc is not None and self._proc.poll() is None

    @property
    def db_path(self) -> Path:
        return self.data_dir / "mosquitto.db"

    # --- lifecycle ----------------------------------------------------------------------

    def _write_files(self) -> None:
        if self.persistence:
            self.data_dir.mkdir(parents=True, exist_ok=True)
        if self.users and self.password_file is None:
            self.password_file = self.workdir / "passwords"
            self.password_file.touch(mode=0o600)
            passwd = shutil.which("mosquitto_passwd") or "/usr/bin/mosquitto_passwd"
            for user, password in self.users.items():
                subprocess.run(
                    [passwd, "-b", str(self.password_file), user, password],
                    check=True,
                    capture_output=True,
                    timeout=30,
                )
        if self.acl is not None and self.acl_file is None:
            self.acl_file = self.workdir / "acl"
            self.acl_file.write_text(self.acl)
        self.config_path.write_text(
            mosquitto_config(
                self.port,
                host=self.host,
                persistence_dir=self.data_dir if self.persistence else None,
                autosave_interval=self.autosave_interval,
                allow_anonymous=self.allow_anonymous,
                password_file=self.password_file,
                acl_file=self.acl_file,
                extra=self.extra_config,
            )
        )

    def start(self) -> MosquittoServer:
        """Start and wait until the port accepts connections (RuntimeError with the log)."""
        if self.running:
            return self
        attempts = 1 if (self._fixed_port or self.starts) else 3
        for attempt in range(attempts):
            if attempt:
                self.port = free_port(self.host)  # lost the race for the free port
            self._write_files()
            with self.log_path.open("ab") as log_file:
                log_file.write(f"--- start {self.starts + 1} on port {self.port}\n".encode())
                log_file.flush()
                self._proc = subprocess.Popen(
                    [self.binary, "-c", str(self.config_path)],
                    stdin=subprocess.DEVNULL,
                    stdout=log_file,
                    stderr=subprocess.STDOUT,
                )
            self._paused = False
            if self._wait_ready():
                self.starts += 1
                return self
            self._terminate(timeout=2.0)
        raise RuntimeError(
            f"mosquitto did not accept connections on {self.host}:{self.port} within "
            f"{self.start_timeout:.0f} s; last log lines:\n{self.log_tail()}"
        )

    def _wait_ready(self) -> bool:
        deadline = time.monotonic() + self.start_timeout
        while time.monotonic() < deadline:
            if self._proc is None or self._proc.poll() is not None:
                return False
            if port_accepts(self.host, self.port, timeout=0.2):
                return self._proc.poll() is None
            time.sleep(0.02)
        return False

    def stop(self, timeout: float = 10.0) -> int | None:
        """SIGTERM and wait: mosquitto writes its persistence file on a clean exit."""
        return self._terminate(timeout)

    def _terminate(self, timeout: float) -> int | None:
        proc = self._proc
        if proc is None:
            return None
        if proc.poll() is None:
            if self._paused:
                proc.send_signal(signal.SIGCONT)
                self._paused = False
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(timeout)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(5.0)
        self._proc = None
        return proc.returncode

    def kill(self) -> None:
        """SIGKILL: no persistence written (what was last saved survives)."""
        proc = self._proc
        if proc is None:
            return
        if proc.poll() is None:
            proc.kill()
            proc.wait(5.0)
        self._proc = None
        self._paused = False

    def restart(self, *, kill: bool = False) -> MosquittoServer:
        """Stop (or kill) and start again on the same port."""
        if kill:
            self.kill()
        else:
            self.stop()
        return self.start()

    def pause(self) -> None:
        """SIGSTOP: the broker keeps its sockets but reads and answers nothing."""
        if self._proc is None or self._paused:
            return
        self._proc.send_signal(signal.SIGSTOP)
        self._paused = True

    def resume(self) -> None:
        if self._proc is None or not self._paused:
            return
        self._proc.send_signal(signal.SIGCONT)
        self._paused = False

    def checkpoint(self, timeout: float = 10.0) -> None:
        """Force a persistence write (SIGUSR1) and wait until the new file is in place."""
        if not self.persistence:
            raise RuntimeError("this broker runs without persistence")
        if self._proc is None or self._paused:
            raise RuntimeError("broker is not running")
        before = _file_identity(self.db_path)
        self._proc.send_signal(signal.SIGUSR1)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            now = _file_identity(self.db_path)
            if now is not None and now != before:
                return
            time.sleep(0.01)
        raise RuntimeError(f"mosquitto did not write {self.db_path} within {timeout:.0f} s")

    def log_tail(self, lines: int = 30) -> str:
        try:
            text = self.log_path.read_text(errors="replace")
        except OSError:
            return "(no log)"
        return "\n".join(text.splitlines()[-lines:]) or "(empty log)"

    def close(self) -> None:
        self.stop()
        if self._own_tmp is not None:
            self._own_tmp.cleanup()
            self._own_tmp = None

    def __enter__(self) -> MosquittoServer:
        return self.start()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    def __repr__(self) -> str:
        state = "running" if self.running else "stopped"
        return f"<MosquittoServer {self.host}:{self.port} {state} pid={self.pid}>"


def _file_identity(path: Path) -> tuple[int, int, int] | None:
    # mosquitto writes mosquitto.db.new and renames it: the inode changes on every save.
    try:
        st = path.stat()
    except FileNotFoundError:
        return None
    return (st.st_ino, st.st_mtime_ns, st.st_size)


class ThreadedEmbeddedBroker:
    """:func:`bridge.demo.broker.embedded_broker` on its own event loop in a thread.

    For a session-wide broker that outlives the tests' per-test event loops (the amqtt
    fallback runs in-process).
    """

    def __init__(self, force: Literal["mosquitto", "amqtt"] = "amqtt") -> None:
        self.force: Literal["mosquitto", "amqtt"] = force
        self.endpoint: BrokerEndpoint | None = None
        self._error: BaseException | None = None
        self._ready = threading.Event()
        self._loop: asyncio.AbstractEventLoop | None = None
        self._stop: asyncio.Event | None = None
        self._thread = threading.Thread(target=self._run, name="embedded-broker", daemon=True)

    def _run(self) -> None:
        try:
            asyncio.run(self._serve())
        except BaseException as exc:  # reported to the starting thread
            self._error = exc
        finally:
            self._ready.set()

    async def _serve(self) -> None:
        self._loop = asyncio.get_running_loop()
        self._stop = asyncio.Event()
        async with embedded_broker(force=self.force) as endpoint:
            self.endpoint = endpoint
            self._ready.set()
            await self._stop.wait()

    def start(self, timeout: float = 30.0) -> BrokerAddress:
        self._thread.start()
        if not self._ready.wait(timeout):
            raise RuntimeError(f"embedded {self.force} broker did not start in {timeout:.0f} s")
        if self.endpoint is None:
            raise RuntimeError(f"embedded {self.force} broker failed: {self._error!r}")
        ep = self.endpoint
        return BrokerAddress(ep.host, ep.port, ep.kind, ep.protocol)

    def stop(self, timeout: float = 30.0) -> None:
        loop, stop = self._loop, self._stop
        if loop is not None and stop is not None and not loop.is_closed():
            with contextlib.suppress(RuntimeError):  # loop already finished
                loop.call_soon_threadsafe(stop.set)
        self._thread.join(timeout)


@contextlib.contextmanager
def session_broker(tmp_dir: Path) -> Iterator[BrokerAddress]:
    """The broker for the session, in order of preference.

    ``MIDBRIDGE_TEST_BROKER=host:port`` if set; else a private mosquitto (raised limits);
    else a broker already listening on 127.0.0.1:1883; else the in-process amqtt broker.
    """
    env = os.environ.get("MIDBRIDGE_TEST_BROKER", "").strip()
    if env:
        host, port = parse_host_port(env)
        yield BrokerAddress(host, port, "external", "5")
        return
    if find_mosquitto() is not None:
        with MosquittoServer(tmp_dir, persistence=False) as server:
            yield server.address
        return
    if port_accepts(LOOPBACK, 1883):
        yield BrokerAddress(LOOPBACK, 1883, "external", "5")
        return
    threaded = ThreadedEmbeddedBroker("amqtt")
    try:
        yield threaded.start()
    finally:
        threaded.stop()
