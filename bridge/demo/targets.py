"""A small network to discover, in this process: what ``midbridge demo`` scans.

Every target listens on an address of its own (127.0.0.x by default) and on high ports,
so nothing needs root or a system package:

- **Linux hosts** (:class:`LinuxHost`): an asyncssh server with a password user and a
  generated host key. Commands run in a canned shell (:class:`CannedShell`) over a small
  virtual file system: it knows ``echo``, ``uname``, ``cat``, ``hostname``, ``grep -H .``,
  ``id``, ``whoami``, ``true``, ``false``, ``;``, ``||``, ``&&``, ``( ... )`` and
  ``2>/dev/null``: everything the SSH classifier's command line
  (``bridge.instance.cmdb.SSH_COMMAND``) uses, and a little more for a person trying it
  with ``ssh -p 2222 discovery@127.0.0.11``.
- **Network gear** (:class:`SnmpDevice`): an SNMP v2c agent over UDP answering GET,
  GETNEXT and GETBULK for the system group, ``ifNumber`` and a small ``ifTable``. The
  messages are decoded and encoded by ``pyasn1``'s BER codec with ``pysnmp``'s SNMP
  message and PDU types (``pysnmp.proto.api``): a well-kept library does the BER, this
  module only looks values up. (snmpsim would be the full simulator, but it refuses to
  run as root and brings pysmi and data files; a responder of ~100 lines is enough for
  what the SNMP classifier asks.) A request with another community gets no answer, as
  from a real agent.
- **Web servers** (:class:`WebSite`): aiohttp on HTTP and/or HTTPS (a self-signed
  certificate made with ``cryptography`` at start), with a ``Server`` header and an HTML
  ``<title>``.

Addresses of the range that no target uses answer nothing (a refused connection).

``async with demo_targets(settings) as running:`` starts them and tells what listens where
(:class:`RunningTargets`); ``python -m bridge.demo.targets`` serves them until SIGINT or
SIGTERM (``--bind 0.0.0.0 --only db01`` serves one target on every address of a
container: what ``compose/docker-compose.yml`` does).
"""

from __future__ import annotations

import argparse
import asyncio
import bisect
import contextlib
import datetime
import errno
import fnmatch
import hmac
import ipaddress
import os
import secrets
import shlex
import ssl
import sys
import tempfile
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from dataclasses import dataclass, field, replace
from functools import partial
from pathlib import Path
from typing import Any, cast

import asyncssh
from aiohttp import web
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID
from pyasn1.codec.ber import decoder as ber_decoder
from pyasn1.codec.ber import encoder as ber_encoder
from pyasn1.error import PyAsn1Error
from pysnmp.proto import api as snmp_api

from bridge.signals import StopSignals

# Read by ``python -m bridge.demo.targets`` and ``python -m bridge.demo`` (compose). Not
# MIDBRIDGE_*: the bridge's configuration takes every MIDBRIDGE_<KEY> as a setting.
SSH_PASSWORD_ENV = "DEMO_SSH_PASSWORD"
SNMP_COMMUNITY_ENV = "DEMO_SNMP_COMMUNITY"
DEFAULT_SSH_USER = "discovery"
PORT_TRIES = 10  # a port taken on this machine: the next one up, for every target of a kind

# --- the network ------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Ports:
    """The ports the targets use (a discovery schedule maps them to classifiers)."""

    ssh: int = 2222
    http: int = 8080
    https: int = 8443
    snmp: int = 1161  # UDP


def _os_release(pretty: str, name: str, ident: str, version_id: str, like: str = "") -> str:
    lines = [
        f'PRETTY_NAME="{pretty}"',
        f'NAME="{name}"',
        f'VERSION_ID="{version_id}"',
        f"ID={ident}",
    ]
    if like:
        lines.append(f"ID_LIKE={like}")
    return "\n".join(lines) + "\n"


@dataclass(frozen=True, slots=True)
class LinuxHost:
    name: str  # the target's name (``--only``)
    address: str
    hostname: str
    os_release: str  # /etc/os-release
    kernel: str  # uname -r
    version: str  # uname -v
    serial: str  # /sys/class/dmi/id/product_serial
    interfaces: tuple[tuple[str, str], ...]  # (name, MAC)
    accepts_demo_password: bool = True  # False: a host discovery cannot log in to

    def files(self) -> dict[str, str]:
        """The virtual file system the canned shell reads."""
        files = {
            "/etc/os-release": self.os_release,
            "/etc/hostname": self.hostname + "\n",
            "/proc/sys/kernel/hostname": self.hostname + "\n",
            "/proc/version": f"Linux version {self.kernel} {self.version}\n",
            "/sys/class/dmi/id/product_serial": self.serial + "\n",
            "/sys/class/net/lo/address": "00:00:00:00:00:00\n",
        }
        for interface, mac in self.interfaces:
            files[f"/sys/class/net/{interface}/address"] = mac + "\n"
        return files


@dataclass(frozen=True, slots=True)
class SnmpDevice:
    name: str
    address: str
    sys_name: str
    sys_descr: str
    sys_object_id: str
    location: str
    interfaces: tuple[tuple[str, str, int], ...]  # (ifDescr, MAC, speed in bit/s)


@dataclass(frozen=True, slots=True)
class WebSite:
    name: str
    address: str
    hostname: str  # the certificate's name
    title: str
    server: str  # the Server header
    http: bool = True
    https: bool = False


Target = LinuxHost | SnmpDevice | WebSite

# sysObjectID of net-snmp's Linux agent (NET-SNMP-TC::linux): what a Linux-based router
# or switch running net-snmp reports.
NET_SNMP_LINUX = "1.3.6.1.4.1.8072.3.2.10"

NETWORK: tuple[Target, ...] = (
    LinuxHost(
        "db01",
        "127.0.0.11",
        "db01.demo.lan",
        _os_release("Debian GNU/Linux 12 (bookworm)", "Debian GNU/Linux", "debian", "12"),
        "6.1.0-28-amd64",
        "#1 SMP PREEMPT_DYNAMIC Debian 6.1.119-1 (2024-11-22)",
        "DEMO-0011-7Q2X",
        (("eth0", "02:6d:62:00:00:11"),),
    ),
    LinuxHost(
        "app01",
        "127.0.0.12",
        "app01.demo.lan",
        _os_release("Ubuntu 24.04.1 LTS", "Ubuntu", "ubuntu", "24.04", "debian"),
        "6.8.0-49-generic",
        "#49-Ubuntu SMP PREEMPT_DYNAMIC Mon Nov  4 02:06:24 UTC 2024",
        "DEMO-0012-K8PL",
        (("ens3", "02:6d:62:00:00:12"), ("ens4", "02:6d:62:00:01:12")),
    ),
    LinuxHost(
        "build01",
        "127.0.0.13",
        "build01.demo.lan",
        _os_release(
            "AlmaLinux 9.5 (Teal Serval)", "AlmaLinux", "almalinux", "9.5", '"rhel centos fedora"'
        ),
        "5.14.0-503.14.1.el9_5.x86_64",
        "#1 SMP PREEMPT_DYNAMIC Fri Nov 15 12:04:32 EST 2024",
        "DEMO-0013-M3ZT",
        (("eth0", "02:6d:62:00:00:13"),),
    ),
    LinuxHost(  # its SSH refuses the demo password: recorded as an IP address only
        "legacy01",
        "127.0.0.14",
        "legacy01.demo.lan",
        _os_release("CentOS Linux 7 (Core)", "CentOS Linux", "centos", "7"),
        "3.10.0-1160.el7.x86_64",
        "#1 SMP Mon Oct 19 16:18:59 UTC 2020",
        "DEMO-0014-OLD1",
        (("eth0", "02:6d:62:00:00:14"),),
        accepts_demo_password=False,
    ),
    SnmpDevice(
        "rtr01",
        "127.0.0.21",
        "rtr01.demo.lan",
        "midbridge demo router (simulated), Linux 5.15.0 armv7l",
        NET_SNMP_LINUX,
        "Rack A1, demo lab",
        (
            ("lo", "", 0),
            ("wan0", "02:6d:62:00:00:21", 1_000_000_000),
            ("lan0", "02:6d:62:00:01:21", 1_000_000_000),
        ),
    ),
    SnmpDevice(
        "sw01",
        "127.0.0.22",
        "sw01.demo.lan",
        "midbridge demo switch (simulated), 8 ports",
        NET_SNMP_LINUX,
        "Rack A2, demo lab",
        tuple((f"port{i}", f"02:6d:62:00:{i:02x}:22", 1_000_000_000) for i in range(1, 9)),
    ),
    WebSite(
        "intranet",
        "127.0.0.31",
        "intranet.demo.lan",
        "Demo Intranet - Home",
        "midbridge-demo-httpd/1.0",
    ),
    WebSite(
        "monitor",
        "127.0.0.32",
        "monitor.demo.lan",
        "Monitoring - Demo Lab",
        "midbridge-demo-httpd/1.0",
        http=False,
        https=True,
    ),
    WebSite(
        "wiki",
        "127.0.0.33",
        "wiki.demo.lan",
        "Demo Wiki",
        "midbridge-demo-httpd/1.0",
        http=True,
        https=True,
    ),
)
TARGET_NAMES = tuple(t.name for t in NETWORK)


def kind_of(target: Target) -> str:
    if isinstance(target, LinuxHost):
        return "linux"
    if isinstance(target, SnmpDevice):
        return "snmp"
    return "web"


# --- the canned shell -------------------------------------------------------------------


def _split(text: str, separators: Sequence[str]) -> list[tuple[str, str]]:
    """``text`` cut at the top-level ``separators`` (outside quotes and parentheses):
    ``[(separator before, piece), ...]``, the first with separator ``""``."""
    parts: list[tuple[str, str]] = []
    depth = 0
    quote = ""
    start = 0
    before = ""
    i = 0
    while i < len(text):
        char = text[i]
        if quote:
            if char == quote:
                quote = ""
            elif char == "\\" and quote == '"':
                i += 1
        elif char in "'\"":
            quote = char
        elif char == "\\":
            i += 1
        elif char == "(":
            depth += 1
        elif char == ")":
            depth = max(0, depth - 1)
        elif depth == 0:
            for sep in separators:
                if text.startswith(sep, i):
                    parts.append((before, text[start:i]))
                    before = sep
                    i += len(sep)
                    start = i
                    break
            else:
                i += 1
            continue
        i += 1
    parts.append((before, text[start:]))
    return parts


@dataclass(slots=True)
class _Output:
    out: list[str] = field(default_factory=list)
    err: list[str] = field(default_factory=list)


class CannedShell:
    """A few shell commands over a virtual file system; ``run(line)`` → (out, err, status)."""

    def __init__(self, host: LinuxHost, user: str) -> None:
        self.host = host
        self.user = user
        self.files = host.files()

    def run(self, line: str) -> tuple[str, str, int]:
        output = _Output()
        status = self._list(line, output)
        return "".join(output.out), "".join(output.err), status

    def _list(self, text: str, output: _Output) -> int:
        status = 0
        for _sep, statement in _split(text, (";", "\n")):
            if statement.strip():
                status = self._and_or(statement, output)
        return status

    def _and_or(self, text: str, output: _Output) -> int:
        status = 0
        for sep, piece in _split(text, ("||", "&&")):
            if (sep == "||" and status == 0) or (sep == "&&" and status != 0):
                continue
            status = self._command(piece.strip(), output)
        return status

    def _command(self, text: str, output: _Output) -> int:
        if text.startswith("(") and text.endswith(")"):
            return self._list(text[1:-1], output)
        try:
            words = shlex.split(text)
        except ValueError:
            output.err.append("sh: 1: Syntax error: unterminated quoted string\n")
            return 2
        quiet = False
        args: list[str] = []
        for word in words:
            if word in ("2>/dev/null", "2>&1", ">/dev/null", "&>/dev/null"):
                quiet = quiet or word.startswith(("2>/", "&>"))
                continue
            args.append(word)
        if not args:
            return 0
        sink = _Output(output.out, [] if quiet else output.err)
        handler = getattr(self, "_cmd_" + args[0].replace("-", "_"), None)
        if handler is None:
            sink.err.append(f"sh: 1: {args[0]}: not found\n")
            return 127
        status: int = handler(args[1:], sink)
        return status

    # commands ------------------------------------------------------------------------

    def _cmd_echo(self, args: list[str], output: _Output) -> int:
        newline = "\n"
        if args and args[0] == "-n":
            args, newline = args[1:], ""
        output.out.append(" ".join(args) + newline)
        return 0

    def _cmd_true(self, args: list[str], output: _Output) -> int:
        return 0

    def _cmd_false(self, args: list[str], output: _Output) -> int:
        return 1

    def _cmd_uname(self, args: list[str], output: _Output) -> int:
        host = self.host
        fields = {
            "s": "Linux",
            "n": host.hostname.split(".")[0],
            "r": host.kernel,
            "v": host.version,
            "m": "x86_64",
            "o": "GNU/Linux",
        }
        flags = "".join(a.lstrip("-") for a in args if a.startswith("-")) or "s"
        if "a" in flags:
            flags = "snrvmo"
        unknown = [f for f in flags if f not in fields]
        if unknown:
            output.err.append(f"uname: invalid option -- '{unknown[0]}'\n")
            return 1
        output.out.append(" ".join(fields[f] for f in "snrvmo" if f in flags) + "\n")
        return 0

    def _cmd_hostname(self, args: list[str], output: _Output) -> int:
        name = self.host.hostname
        output.out.append((name.split(".")[0] if "-s" in args else name) + "\n")
        return 0

    def _cmd_whoami(self, args: list[str], output: _Output) -> int:
        output.out.append(self.user + "\n")
        return 0

    def _cmd_id(self, args: list[str], output: _Output) -> int:
        output.out.append(f"uid=1001({self.user}) gid=1001({self.user}) groups=1001({self.user})\n")
        return 0

    def _cmd_cat(self, args: list[str], output: _Output) -> int:
        status = 0
        for path in args:
            text = self.files.get(path)
            if text is None:
                output.err.append(f"cat: {path}: No such file or directory\n")
                status = 1
            else:
                output.out.append(text)
        return status

    def _glob(self, pattern: str) -> list[str]:
        if not any(c in pattern for c in "*?["):
            return [pattern]
        parts = pattern.split("/")
        found = [
            path
            for path in self.files
            if len(path.split("/")) == len(parts)
            and all(fnmatch.fnmatchcase(a, b) for a, b in zip(path.split("/"), parts, strict=True))
        ]
        return sorted(found) or [pattern]

    def _cmd_grep(self, args: list[str], output: _Output) -> int:
        with_name = "-H" in args
        words = [a for a in args if not a.startswith("-")]
        if len(words) < 2 or words[0] != ".":
            output.err.append("grep: only 'grep [-H] . FILE...' is known here\n")
            return 2
        status = 1
        paths = [path for pattern in words[1:] for path in self._glob(pattern)]
        for path in paths:
            text = self.files.get(path)
            if text is None:
                output.err.append(f"grep: {path}: No such file or directory\n")
                continue
            for line in text.splitlines():
                if line:
                    output.out.append(f"{path}:{line}\n" if with_name or len(paths) > 1 else line)
                    status = 0
        return status


# --- SSH ----------------------------------------------------------------------------------


class _SshServer(asyncssh.SSHServer):
    def __init__(self, user: str, password: str) -> None:
        self._user = user
        self._password = password.encode()

    def begin_auth(self, username: str) -> bool:
        return True  # every login needs a password

    def password_auth_supported(self) -> bool:
        return True

    def validate_password(self, username: str, password: str) -> bool:
        ok = hmac.compare_digest(password.encode(), self._password)
        return ok and username == self._user


def _ssh_session(
    host: LinuxHost, user: str
) -> Callable[[asyncssh.SSHServerProcess[str]], Awaitable[None]]:
    async def session(process: asyncssh.SSHServerProcess[str]) -> None:
        shell = CannedShell(host, user)
        try:
            if process.command is not None:
                out, err, status = shell.run(process.command)
                process.stdout.write(out)
                process.stderr.write(err)
                process.exit(status)
                return
            short = host.hostname.split(".")[0]
            process.stdout.write(
                f"{host.hostname}: a canned shell of the midbridge demo ('exit' leaves)\n"
            )
            status = 0
            while True:
                process.stdout.write(f"{user}@{short}:~$ ")
                line = await process.stdin.readline()
                if not line or line.strip() in ("exit", "logout"):
                    break
                out, err, status = shell.run(line.rstrip("\r\n"))
                process.stdout.write(out)  # asyncssh's line editor adds the \r on a PTY
                process.stderr.write(err)
            process.exit(status)
        except (asyncssh.BreakReceived, asyncssh.TerminalSizeChanged, ConnectionError):
            process.exit(1)

    return session


async def _start_ssh(
    host: LinuxHost, address: str, port: int, *, user: str, password: str
) -> Callable[[], Awaitable[None]]:
    key = asyncssh.generate_private_key("ssh-ed25519")
    login = password if host.accepts_demo_password else secrets.token_urlsafe(24)
    server = await asyncssh.create_server(
        lambda: _SshServer(user, login),
        address,
        port,
        server_host_keys=[key],
        process_factory=_ssh_session(host, user),
        reuse_address=True,
    )

    async def stop() -> None:
        server.close()
        await server.wait_closed()

    return stop


# --- SNMP ---------------------------------------------------------------------------------

_V2C: Any = snmp_api.PROTOCOL_MODULES[snmp_api.SNMP_VERSION_2C]
_SYSTEM = (1, 3, 6, 1, 2, 1, 1)
_SYS_UPTIME = (*_SYSTEM, 3, 0)
_IF_NUMBER = (1, 3, 6, 1, 2, 1, 2, 1, 0)
_IF_ENTRY = (1, 3, 6, 1, 2, 1, 2, 2, 1)
MAX_BULK_VARBINDS = 200  # in one GETBULK answer
MAX_VARBINDS = 128  # in one request


def _oid(text: str) -> tuple[int, ...]:
    return tuple(int(arc) for arc in text.strip(".").split("."))


def _mac_bytes(mac: str) -> bytes:
    return bytes.fromhex(mac.replace(":", "")) if mac else b""


class SnmpAgent(asyncio.DatagramProtocol):
    """An SNMP v2c agent for one device: GET, GETNEXT, GETBULK over a fixed MIB."""

    def __init__(self, device: SnmpDevice, community: str) -> None:
        self.device = device
        self.community = community.encode()
        self.started = time.monotonic()
        self.transport: asyncio.DatagramTransport | None = None
        self.answered = 0
        values: dict[tuple[int, ...], Any] = {
            (*_SYSTEM, 1, 0): _V2C.OctetString(device.sys_descr.encode()),
            (*_SYSTEM, 2, 0): _V2C.ObjectIdentifier(_oid(device.sys_object_id)),
            _SYS_UPTIME: _V2C.TimeTicks(0),  # computed when asked
            (*_SYSTEM, 4, 0): _V2C.OctetString(b"noc@demo.lan"),
            (*_SYSTEM, 5, 0): _V2C.OctetString(device.sys_name.encode()),
            (*_SYSTEM, 6, 0): _V2C.OctetString(device.location.encode()),
            (*_SYSTEM, 7, 0): _V2C.Integer(6),  # datalink + internet
            _IF_NUMBER: _V2C.Integer(len(device.interfaces)),
        }
        for index, (descr, mac, speed) in enumerate(device.interfaces, start=1):
            loopback = not mac
            columns: dict[int, Any] = {
                1: _V2C.Integer(index),  # ifIndex
                2: _V2C.OctetString(descr.encode()),  # ifDescr
                3: _V2C.Integer(24 if loopback else 6),  # ifType: softwareLoopback / ethernet
                4: _V2C.Integer(65536 if loopback else 1500),  # ifMtu
                5: _V2C.Gauge32(min(speed, 2**32 - 1)),  # ifSpeed
                6: _V2C.OctetString(_mac_bytes(mac)),  # ifPhysAddress
                7: _V2C.Integer(1),  # ifAdminStatus up
                8: _V2C.Integer(1),  # ifOperStatus up
                10: _V2C.Counter32(1000 * index + 7),  # ifInOctets
                16: _V2C.Counter32(900 * index + 3),  # ifOutOctets
            }
            for column, value in columns.items():
                values[(*_IF_ENTRY, column, index)] = value
        self.values = values
        self.oids = sorted(values)

    # lookups ---------------------------------------------------------------------------

    def _value(self, oid: tuple[int, ...]) -> Any:
        if oid == _SYS_UPTIME:
            return _V2C.TimeTicks(int((time.monotonic() - self.started) * 100) % 2**32)
        return self.values[oid]

    def get(self, oid: tuple[int, ...]) -> tuple[tuple[int, ...], Any]:
        if oid in self.values:
            return oid, self._value(oid)
        parent = oid[:-1]
        known = any(o[: len(parent)] == parent for o in self.oids) if parent else False
        return oid, _V2C.NoSuchInstance("") if known else _V2C.NoSuchObject("")

    def next(self, oid: tuple[int, ...]) -> tuple[tuple[int, ...], Any]:
        at = bisect.bisect_right(self.oids, oid)
        if at >= len(self.oids):
            return oid, _V2C.EndOfMibView("")
        found = self.oids[at]
        return found, self._value(found)

    def answer(self, data: bytes) -> bytes | None:
        """The response to one datagram, or None (not v2c, another community, garbage)."""
        try:
            if int(snmp_api.decodeMessageVersion(data)) != snmp_api.SNMP_VERSION_2C:
                return None
            request, _rest = ber_decoder.decode(data, asn1Spec=_V2C.Message())
        except (PyAsn1Error, ValueError, TypeError):
            return None
        community = bytes(_V2C.apiMessage.get_community(request))
        if not hmac.compare_digest(community, self.community):
            return None
        pdu = _V2C.apiMessage.get_pdu(request)
        oids = [tuple(oid) for oid, _ in _V2C.apiPDU.get_varbinds(pdu)]
        if len(oids) > MAX_VARBINDS:
            return None
        if pdu.isSameTypeWith(_V2C.GetRequestPDU()):
            varbinds = [self.get(oid) for oid in oids]
        elif pdu.isSameTypeWith(_V2C.GetNextRequestPDU()):
            varbinds = [self.next(oid) for oid in oids]
        elif pdu.isSameTypeWith(_V2C.GetBulkRequestPDU()):
            varbinds = self._bulk(
                oids,
                int(_V2C.apiBulkPDU.get_non_repeaters(pdu)),
                int(_V2C.apiBulkPDU.get_max_repetitions(pdu)),
            )
        else:
            return None  # SET and the rest: a read-only demo device stays silent
        response = _V2C.apiMessage.get_response(request)
        response_pdu = _V2C.apiMessage.get_pdu(response)
        _V2C.apiPDU.set_varbinds(
            response_pdu, [(_V2C.ObjectIdentifier(oid), value) for oid, value in varbinds]
        )
        encoded: bytes = ber_encoder.encode(response)
        return encoded

    def _bulk(
        self, oids: list[tuple[int, ...]], non_repeaters: int, max_repetitions: int
    ) -> list[tuple[tuple[int, ...], Any]]:
        non_repeaters = max(0, min(non_repeaters, len(oids)))
        varbinds = [self.next(oid) for oid in oids[:non_repeaters]]
        cursors = oids[non_repeaters:]
        for _ in range(max(0, max_repetitions)):
            if not cursors or len(varbinds) + len(cursors) > MAX_BULK_VARBINDS:
                break
            row = [self.next(oid) for oid in cursors]
            varbinds += row
            if all(isinstance(v, type(_V2C.EndOfMibView(""))) for _, v in row):
                break
            cursors = [oid for oid, _ in row]
        return varbinds

    # asyncio ---------------------------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.DatagramTransport, transport)

    def datagram_received(self, data: bytes, addr: tuple[str | Any, int]) -> None:
        answer = self.answer(data)
        if answer is not None and self.transport is not None:
            self.answered += 1
            self.transport.sendto(answer, addr)

    def error_received(self, exc: Exception) -> None:
        pass  # an ICMP error for an earlier answer: nothing to do


async def _start_snmp(
    device: SnmpDevice, address: str, port: int, *, community: str
) -> Callable[[], Awaitable[None]]:
    loop = asyncio.get_running_loop()
    transport, _protocol = await loop.create_datagram_endpoint(
        lambda: SnmpAgent(device, community), local_addr=(address, port)
    )

    async def stop() -> None:
        transport.close()

    return stop


# --- HTTP and HTTPS -----------------------------------------------------------------------


def self_signed_context(hostname: str, address: str) -> ssl.SSLContext:
    """A server TLS context with a fresh self-signed certificate for ``hostname``."""
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name(
        [
            x509.NameAttribute(NameOID.COMMON_NAME, hostname),
            x509.NameAttribute(NameOID.ORGANIZATION_NAME, "midbridge demo"),
        ]
    )
    now = datetime.datetime.now(datetime.UTC)
    alt_names: list[x509.GeneralName] = [x509.DNSName(hostname)]
    with contextlib.suppress(ValueError):
        alt_names.append(x509.IPAddress(ipaddress.ip_address(address)))
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(hours=1))
        .not_valid_after(now + datetime.timedelta(days=30))
        .add_extension(x509.SubjectAlternativeName(alt_names), critical=False)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .sign(key, hashes.SHA256())
    )
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    with tempfile.TemporaryDirectory(prefix="midbridge-demo-tls-") as tmp:
        cert_file, key_file = Path(tmp) / "cert.pem", Path(tmp) / "key.pem"
        cert_file.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
        key_file.touch(mode=0o600)
        key_file.write_bytes(
            key.private_bytes(
                serialization.Encoding.PEM,
                serialization.PrivateFormat.PKCS8,
                serialization.NoEncryption(),
            )
        )
        context.load_cert_chain(cert_file, key_file)
    return context


def _site_app(site: WebSite) -> web.Application:
    page = (
        '<!doctype html>\n<html lang="en"><head><meta charset="utf-8">'
        f"<title>{site.title}</title></head>\n"
        f"<body><h1>{site.title}</h1><p>{site.hostname}: a sample web server of the "
        "midbridge demo.</p></body></html>\n"
    )

    async def index(request: web.Request) -> web.Response:
        return web.Response(text=page, content_type="text/html")

    async def server_header(request: web.Request, response: web.StreamResponse) -> None:
        response.headers["Server"] = site.server

    app = web.Application()
    app.router.add_get("/", index)
    app.on_response_prepare.append(server_header)
    return app


async def _start_web(
    site: WebSite, address: str, port: int, *, tls: bool
) -> Callable[[], Awaitable[None]]:
    runner = web.AppRunner(_site_app(site), access_log=None, handle_signals=False)
    await runner.setup()
    try:
        context = self_signed_context(site.hostname, address) if tls else None
        await web.TCPSite(runner, address, port, ssl_context=context, reuse_address=True).start()
    except BaseException:
        await runner.cleanup()
        raise
    return runner.cleanup


# --- starting them ------------------------------------------------------------------------


def _generated() -> str:
    return "demo-" + secrets.token_urlsafe(12)


@dataclass(frozen=True, slots=True)
class TargetSettings:
    ssh_user: str = DEFAULT_SSH_USER
    ssh_password: str = field(default_factory=_generated)  # generated: the demo's own
    snmp_community: str = field(default_factory=_generated)
    ports: Ports = field(default_factory=Ports)
    bind: str | None = None  # serve every target on this address instead of its own
    only: frozenset[str] | None = None  # target names; None: all


@dataclass(frozen=True, slots=True)
class Listening:
    target: Target
    service: str  # "ssh", "snmp", "http", "https"
    address: str
    port: int

    @property
    def where(self) -> str:
        proto = "udp" if self.service == "snmp" else "tcp"
        return f"{self.address}:{self.port}/{proto}"


@dataclass(slots=True)
class RunningTargets:
    settings: TargetSettings
    ports: Ports  # as bound (a port taken on this machine moves its kind one up)
    listening: list[Listening] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)

    @property
    def addresses(self) -> list[str]:
        return sorted({item.address for item in self.listening}, key=ipaddress.ip_address)


Starter = Callable[[str, int], Awaitable[Callable[[], Awaitable[None]]]]


async def _bind_kind(
    service: str,
    preferred: int,
    items: Sequence[tuple[Target, str, Starter]],
    stops: list[Callable[[], Awaitable[None]]],
    running: RunningTargets,
) -> int:
    """Start every item of one service on one port: ``preferred`` or the next free one."""
    if not items:
        return preferred
    last_error: OSError | None = None
    for port in range(preferred, min(preferred + PORT_TRIES, 65536)):
        started: list[Callable[[], Awaitable[None]]] = []
        try:
            for _target, address, start in items:
                started.append(await start(address, port))
        except OSError as exc:
            last_error = exc
            for stop in reversed(started):
                await stop()
            if exc.errno == errno.EADDRNOTAVAIL:
                running.notes.append(
                    f"{service}: {exc.strerror} ({len(items)} target(s) not started): this "
                    "machine has only some 127.0.0.x addresses on its loopback interface "
                    "(macOS: sudo ifconfig lo0 alias 127.0.0.11 up, and so on)"
                )
                return preferred
            continue
        stops.extend(started)
        running.listening += [Listening(t, service, a, port) for t, a, _ in items]
        if port != preferred:
            running.notes.append(f"{service}: port {preferred} is taken here; using {port}")
        return port
    running.notes.append(
        f"{service}: no free port in {preferred}-{preferred + PORT_TRIES - 1} ({last_error}); "
        f"{len(items)} target(s) not started"
    )
    return preferred


@contextlib.asynccontextmanager
async def demo_targets(settings: TargetSettings | None = None) -> AsyncIterator[RunningTargets]:
    """Start the sample targets; stop them on exit."""
    settings = settings or TargetSettings()
    chosen = [t for t in NETWORK if settings.only is None or t.name in settings.only]
    stops: list[Callable[[], Awaitable[None]]] = []
    running = RunningTargets(settings, settings.ports)
    user, password, community = settings.ssh_user, settings.ssh_password, settings.snmp_community

    def at(target: Target) -> str:
        return settings.bind or target.address

    ssh: list[tuple[Target, str, Starter]] = []
    snmp: list[tuple[Target, str, Starter]] = []
    http: list[tuple[Target, str, Starter]] = []
    https: list[tuple[Target, str, Starter]] = []
    for target in chosen:
        if isinstance(target, LinuxHost):
            ssh.append(
                (target, at(target), partial(_start_ssh, target, user=user, password=password))
            )
        elif isinstance(target, SnmpDevice):
            snmp.append((target, at(target), partial(_start_snmp, target, community=community)))
        else:
            if target.http:
                http.append((target, at(target), partial(_start_web, target, tls=False)))
            if target.https:
                https.append((target, at(target), partial(_start_web, target, tls=True)))
    try:
        ports = settings.ports
        ports = replace(ports, ssh=await _bind_kind("ssh", ports.ssh, ssh, stops, running))
        ports = replace(ports, snmp=await _bind_kind("snmp", ports.snmp, snmp, stops, running))
        ports = replace(ports, http=await _bind_kind("http", ports.http, http, stops, running))
        ports = replace(ports, https=await _bind_kind("https", ports.https, https, stops, running))
        running.ports = ports
        yield running
    finally:
        for stop in reversed(stops):
            with contextlib.suppress(Exception):
                await stop()


def describe(target: Target) -> str:
    """One line: what the target is."""
    if isinstance(target, LinuxHost):
        release = dict(line.split("=", 1) for line in target.os_release.splitlines() if "=" in line)
        what = release.get("PRETTY_NAME", "Linux").strip('"')
        note = "; refuses the demo password" if not target.accepts_demo_password else ""
        return f"Linux, {what}{note}"
    if isinstance(target, SnmpDevice):
        return f"network gear, {target.sys_name}, {len(target.interfaces)} interfaces"
    return f"web server, {target.title!r}"


# --- command line -------------------------------------------------------------------------


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m bridge.demo.targets",
        description="Serve the midbridge demo's sample targets until SIGINT/SIGTERM.",
    )
    parser.add_argument(
        "--bind", default=None, help="serve the targets on this address (default: each its own)"
    )
    parser.add_argument(
        "--only",
        default=None,
        help=f"comma list of targets to serve (default: all of {', '.join(TARGET_NAMES)})",
    )
    parser.add_argument("--ssh-user", default=DEFAULT_SSH_USER)
    defaults = Ports()
    parser.add_argument("--ssh-port", type=int, default=defaults.ssh)
    parser.add_argument("--http-port", type=int, default=defaults.http)
    parser.add_argument("--https-port", type=int, default=defaults.https)
    parser.add_argument("--snmp-port", type=int, default=defaults.snmp)
    return parser


async def _serve(settings: TargetSettings) -> int:
    with StopSignals() as stop:
        return await _serve_until(settings, stop)


async def _serve_until(settings: TargetSettings, stop: asyncio.Event) -> int:
    async with demo_targets(settings) as running:
        for item in running.listening:
            print(f"{item.target.name:<9} {item.where:<24} {describe(item.target)}", flush=True)
        for note in running.notes:
            print(f"note: {note}", flush=True)
        if not running.listening:
            print("nothing started", file=sys.stderr)
            return 1
        print(
            f"SSH user {settings.ssh_user!r} (password from ${SSH_PASSWORD_ENV}), "
            f"SNMP community from ${SNMP_COMMUNITY_ENV}; serving until SIGINT/SIGTERM",
            flush=True,
        )
        await stop.wait()
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    only = None
    if args.only:
        only = frozenset(n.strip() for n in str(args.only).split(",") if n.strip())
        unknown = sorted(only - set(TARGET_NAMES))
        if unknown:
            print(
                f"demo_targets: unknown target(s) {', '.join(unknown)}; "
                f"known: {', '.join(TARGET_NAMES)}",
                file=sys.stderr,
            )
            return 2
    for env in (SSH_PASSWORD_ENV, SNMP_COMMUNITY_ENV):
        if not os.environ.get(env):
            print(f"demo_targets: set ${env} (the discovery side must know it)", file=sys.stderr)
            return 2
    settings = TargetSettings(
        ssh_user=args.ssh_user,
        ssh_password=os.environ[SSH_PASSWORD_ENV],
        snmp_community=os.environ[SNMP_COMMUNITY_ENV],
        ports=Ports(args.ssh_port, args.http_port, args.https_port, args.snmp_port),
        bind=args.bind,
        only=only,
    )
    return asyncio.run(_serve(settings))


if __name__ == "__main__":
    sys.exit(main())
