"""A broker for ``midbridge demo`` on a machine with nothing installed.

``async with embedded_broker(preferred) as broker:`` yields where to connect:

1. the broker given (``"host:port"``, ``"mqtt://host:port"`` or ``(host, port)``);
2. else a private ``mosquitto`` (binary on ``PATH`` or in ``/usr/sbin``) on a free loopback
   port, with a temporary config whose limits are raised (Mosquitto's defaults silently drop
   QoS 1 messages for a subscriber that falls behind, see docs/ANCHORS);
3. else an in-process amqtt broker: pure Python, MQTT 3.1.1 only, no ``$share``, and it does
   not redeliver un-acknowledged QoS 1 messages after a reconnect. Good for a demo, never for
   at-least-once delivery.

The result says which kind it is and which MQTT protocol version to speak to it.
:func:`mosquitto_config` and :func:`find_mosquitto` are shared with the test fixtures.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import shutil
import signal
import socket
import tempfile
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from bridge.wire.address import parse_host_port

log = logging.getLogger("midbridge.embedded_broker")

BrokerKind = Literal["external", "mosquitto", "amqtt"]
MqttProtocol = Literal["5", "3.1.1"]
Force = Literal["auto", "mosquitto", "amqtt"]

LOOPBACK = "127.0.0.1"
MQTT_PORT = 1883
_SBIN_DIRS = ("/usr/sbin", "/usr/local/sbin", "/opt/homebrew/sbin")


class EmbeddedBrokerError(RuntimeError):
    """The embedded broker could not be started (the message says why)."""


@dataclass(frozen=True, slots=True)
class BrokerEndpoint:
    """Where the broker listens, what it is, and which MQTT version to use with it."""

    host: str
    port: int
    kind: BrokerKind
    protocol: MqttProtocol

    @property
    def address(self) -> tuple[str, int]:
        return (self.host, self.port)

    @property
    def url(self) -> str:
        return f"mqtt://{self.host}:{self.port}"


def find_mosquitto() -> str | None:
    """Path of the ``mosquitto`` binary, or None (Debian puts it in /usr/sbin, off PATH)."""
    found = shutil.which("mosquitto")
    if found:
        return found
    for directory in _SBIN_DIRS:
        candidate = Path(directory) / "mosquitto"
        if candidate.is_file() and os.access(candidate, os.X_OK):
            return str(candidate)
    return None


def free_port(host: str = LOOPBACK) -> int:
    """A port that was free a moment ago (the caller must tolerate losing a race)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((host, 0))
        port: int = sock.getsockname()[1]
        return port


def parse_address(preferred: str | tuple[str, int]) -> tuple[str, int]:
    """``"host:port"``, ``"mqtt://host:port"``, ``"host"`` (port 1883) or ``(host, port)``."""
    if isinstance(preferred, tuple):
        host, port = preferred
        return host, int(port)
    text = preferred.strip()
    if "://" in text:
        scheme, text = text.split("://", 1)
        if scheme not in ("mqtt", "tcp"):
            raise ValueError(f"unsupported broker URL scheme {scheme!r} (use mqtt://host:port)")
        text = text.rstrip("/")
    return parse_host_port(text, option="broker address", default_port=MQTT_PORT)


def mosquitto_config(
    port: int,
    *,
    host: str = LOOPBACK,
    persistence_dir: Path | None = None,
    autosave_interval: int = 0,
    allow_anonymous: bool = True,
    password_file: Path | None = None,
    acl_file: Path | None = None,
    extra: Sequence[str] = (),
) -> str:
    """A mosquitto 2.0 config: one loopback listener and limits raised for a bridge.

    - ``max_queued_messages`` 1,000,000 and ``max_queued_bytes`` 0 (no byte limit): the
      defaults (1,000) silently drop QoS 1 messages queued for a slow or offline subscriber.
    - ``max_inflight_messages 0`` (no limit). Mosquitto advertises this value as the CONNACK
      ``receive_maximum`` (the default 20 is sent as 20; 0 sends none, i.e. 65,535), and gmqtt
      raises OverflowError on ``publish`` once receive_maximum - 1 QoS 1 messages are
      un-acknowledged. Towards an MQTT 5 subscriber the subscriber's own CONNECT
      ``receive_maximum`` bounds the messages in flight.
    - ``set_tcp_nodelay true``: without it (and TCP_NODELAY on the client) a round trip costs
      44-88 ms of Nagle plus delayed ACK instead of under 1 ms.
    - With ``persistence_dir``: sessions, subscriptions and queued QoS 1 messages are written
      there on a clean exit (SIGTERM) and on SIGUSR1, and every ``autosave_interval`` seconds
      if that is not 0; a restart reloads them.
    """
    lines = [
        f"listener {port} {host}",
        f"allow_anonymous {'true' if allow_anonymous else 'false'}",
        "max_queued_messages 1000000",
        "max_queued_bytes 0",
        "max_inflight_messages 0",
        "max_inflight_bytes 0",
        "set_tcp_nodelay true",
        "log_dest stderr",
        "log_type error",
        "log_type warning",
        "log_type notice",
        "log_type information",
    ]
    if hasattr(os, "geteuid") and os.geteuid() == 0:
        # As root, mosquitto would switch to the `mosquitto` user, which cannot write to a
        # private temporary directory; "root" keeps it as it is.
        lines.append("user root")
    if persistence_dir is not None:
        lines += [
            "persistence true",
            # mosquitto joins location and file name without a separator of its own.
            f"persistence_location {persistence_dir}{os.sep}",
            "persistence_file mosquitto.db",
            f"autosave_interval {int(autosave_interval)}",
            "autosave_on_changes false",
        ]
    else:
        lines.append("persistence false")
    if password_file is not None:
        lines.append(f"password_file {password_file}")
    if acl_file is not None:
        lines.append(f"acl_file {acl_file}")
    lines += list(extra)
    return "\n".join(lines) + "\n"


async def wait_for_port(host: str, port: int, within: float) -> bool:
    """True once ``host:port`` accepts a TCP connection, False after ``within`` seconds."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + within
    while loop.time() < deadline:
        try:
            _, writer = await asyncio.wait_for(asyncio.open_connection(host, port), 1.0)
        except (OSError, TimeoutError):
            await asyncio.sleep(0.02)
            continue
        writer.close()
        with contextlib.suppress(OSError):
            await writer.wait_closed()
        return True
    return False


def _tail(path: Path, lines: int = 20) -> str:
    try:
        text = path.read_text(errors="replace")
    except OSError:
        return "(no log)"
    return "\n".join(text.splitlines()[-lines:]) or "(empty log)"


@contextlib.asynccontextmanager
async def _run_mosquitto(
    binary: str, host: str, start_timeout: float, data_dir: Path | None
) -> AsyncIterator[BrokerEndpoint]:
    with tempfile.TemporaryDirectory(prefix="midbridge-mosquitto-") as tmp:
        workdir = Path(tmp)
        log_path = workdir / "mosquitto.log"
        proc: asyncio.subprocess.Process | None = None
        port = 0
        for _attempt in range(3):  # a free port can be taken between probe and bind
            port = free_port(host)
            conf = workdir / "mosquitto.conf"
            conf.write_text(mosquitto_config(port, host=host, persistence_dir=data_dir))
            with log_path.open("ab") as log_file:
                proc = await asyncio.create_subprocess_exec(
                    binary,
                    "-c",
                    str(conf),
                    stdin=asyncio.subprocess.DEVNULL,
                    stdout=log_file,
                    stderr=log_file,
                )
            if await _wait_started(proc, host, port, start_timeout):
                break
            await stop_process(proc, 2.0)
            proc = None
        if proc is None:
            raise EmbeddedBrokerError(
                f"mosquitto ({binary}) did not start on {host}; last log lines:\n{_tail(log_path)}"
            )
        log.info("embedded mosquitto on %s:%s (pid %s)", host, port, proc.pid)
        try:
            yield BrokerEndpoint(host, port, "mosquitto", "5")
        finally:
            await stop_process(proc, 5.0)


async def _wait_started(
    proc: asyncio.subprocess.Process, host: str, port: int, within: float
) -> bool:
    loop = asyncio.get_running_loop()
    deadline = loop.time() + within
    while loop.time() < deadline:
        if proc.returncode is not None:
            return False
        if await wait_for_port(host, port, 0.05):
            return proc.returncode is None
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(proc.wait(), 0.02)
    return False


async def stop_process(proc: asyncio.subprocess.Process, grace: float = 10.0) -> None:
    """SIGTERM, wait up to ``grace`` seconds, then SIGKILL."""
    if proc.returncode is not None:
        return
    with contextlib.suppress(ProcessLookupError):
        proc.send_signal(signal.SIGTERM)
    try:
        await asyncio.wait_for(proc.wait(), grace)
    except TimeoutError:
        with contextlib.suppress(ProcessLookupError):
            proc.kill()
        await proc.wait()


def amqtt_config(host: str, port: int) -> dict[str, Any]:
    """amqtt 0.12 broker config: one TCP listener, anonymous access, no $SYS publisher."""
    return {
        "listeners": {"default": {"type": "tcp", "bind": f"{host}:{port}", "max_connections": 0}},
        "plugins": {"amqtt.plugins.authentication.AnonymousAuthPlugin": {"allow_anonymous": True}},
    }


@contextlib.asynccontextmanager
async def _run_amqtt(host: str) -> AsyncIterator[BrokerEndpoint]:
    try:
        from amqtt.broker import Broker
    except ImportError as exc:  # pragma: no cover - amqtt is a dependency
        raise EmbeddedBrokerError(
            f"no mosquitto binary and amqtt is not importable: {exc}"
        ) from exc
    last_error: Exception | None = None
    for _attempt in range(3):  # a free port can be taken between probe and bind
        port = free_port(host)
        broker = Broker(amqtt_config(host, port))
        try:
            await broker.start()
        except Exception as exc:  # amqtt wraps bind errors in BrokerError
            last_error = exc
            continue
        log.info("embedded amqtt broker (MQTT 3.1.1) on %s:%s", host, port)
        try:
            yield BrokerEndpoint(host, port, "amqtt", "3.1.1")
        finally:
            await broker.shutdown()
        return
    raise EmbeddedBrokerError(f"amqtt broker did not start on {host}: {last_error}")


@contextlib.asynccontextmanager
async def embedded_broker(
    preferred: str | tuple[str, int] | None = None,
    *,
    force: Force = "auto",
    host: str = LOOPBACK,
    data_dir: Path | None = None,
    start_timeout: float = 10.0,
) -> AsyncIterator[BrokerEndpoint]:
    """Yield a broker to connect to; stop it (if started here) on exit.

    ``force="mosquitto"`` or ``"amqtt"`` picks that embedded kind (ignoring ``preferred``);
    ``data_dir`` gives a started mosquitto a persistence directory (default: none).
    """
    if force == "auto" and preferred is not None:
        phost, pport = parse_address(preferred)
        yield BrokerEndpoint(phost, pport, "external", "5")
        return
    binary = find_mosquitto() if force in ("auto", "mosquitto") else None
    if force == "mosquitto" and binary is None:
        raise EmbeddedBrokerError("no mosquitto binary on PATH or in /usr/sbin")
    if binary is not None:
        async with _run_mosquitto(binary, host, start_timeout, data_dir) as endpoint:
            yield endpoint
        return
    async with _run_amqtt(host) as endpoint:
        yield endpoint
