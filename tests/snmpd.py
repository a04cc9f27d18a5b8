"""A throwaway SNMP agent for tests: Debian's net-snmp ``/usr/sbin/snmpd`` as a child process.

:class:`Snmpd` writes its own ``snmpd.conf`` in a work directory and runs

    snmpd -f -Lo -C -c <workdir>/snmpd.conf -I -smux -M <empty dir> -m ""

* ``-f -Lo``: foreground, log to stdout (captured in ``snmpd.log``);
* ``-C -c``: read only this config, never ``/etc/snmp`` (``agentAddress`` in it names
  the port);
* ``-I -smux``: no SMUX listener (TCP 199: a second agent on the machine would fail to
  bind it);
* ``-M <empty dir> -m ""``: load no MIB files (snmpd needs none; it saves ~200 lines of
  "Cannot find module" noise and start-up time);
* ``[snmp] persistentDir`` in the config (and ``SNMP_PERSISTENT_DIR``): the agent's
  persistent state, where ``createUser`` lines are turned into localized keys at
  start-up, lives in the work directory instead of ``/var/lib/snmp``.

The port is a free loopback UDP port (bound and released just before; a start that loses
the race is retried on another). :meth:`Snmpd.start` returns once ``snmpget`` gets an
answer, within a bounded time. :meth:`Snmpd.stop` ends that one child by its pid.

The config holds: community :data:`COMMUNITY` (whole tree), community
:data:`SYSONLY_COMMUNITY` (a view of the system group only, to meet endOfMibView early),
the v3 users of :data:`USERS`, fixed ``sysName`` / ``sysLocation`` / ``sysContact``, and
under :data:`LAB` (an enterprise subtree of our own) typed scalars plus :data:`BIG_ROWS`
long strings with long OIDs: a deterministic subtree whose GETBULK answers outgrow
gufo-snmp's limits at high max-repetitions.

:func:`bulkwalk_oids` lists what net-snmp's ``snmpbulkwalk`` returns, the reference a
walk must match.
"""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

SNMPD = "/usr/sbin/snmpd"
COMMUNITY = "mb-ro-4f7c2a"  # distinctive: tests search records for it
SYSONLY_COMMUNITY = "mb-sys-9d1e"  # view: the system group only
SYS_NAME = "midbridge-snmpd"
SYS_LOCATION = "rack 7, loopback"
SYS_CONTACT = "ops@example.invalid"
LAB = "1.3.6.1.4.1.99999"  # enterprise subtree the config fills
BIG = f"{LAB}.2.1.1.1.1.1.1.1.1.1.1.1.1.1.1"  # parent of BIG_ROWS long strings
BIG_ROWS = 300
BIG_TEXT = "x" * 60

# (OID under LAB, net-snmp override type, value, what gufo-snmp gives back)
SCALARS: tuple[tuple[str, str, str, object], ...] = (
    ("1.1.0", "integer", "-5", -5),
    ("1.2.0", "counter", "4000000000", 4_000_000_000),
    ("1.4.0", "timeticks", "12345", 12345),
    ("1.6.0", "object_id", f".{LAB}.7.7", f"{LAB}.7.7"),
    ("1.8.0", "octet_str", '"hello lab"', b"hello lab"),
    ("1.10.0", "uinteger", "42", 42),
)


@dataclass(frozen=True)
class V3User:
    name: str
    auth_protocol: str | None  # "SHA" / "MD5" (net-snmp names), None: noAuthNoPriv
    auth_key: str | None
    priv_protocol: str | None  # "AES" / "DES", None: no privacy
    priv_key: str | None

    @property
    def level(self) -> str:
        if self.priv_protocol:
            return "authPriv"
        return "authNoPriv" if self.auth_protocol else "noAuthNoPriv"

    def credential_fields(self) -> dict[str, str]:
        """The fields of an ``snmpv3`` credential for this user."""
        fields = {"user": self.name}
        for key in ("auth_protocol", "auth_key", "priv_protocol", "priv_key"):
            value = getattr(self, key)
            if value:
                fields[key] = value
        return fields


USERS: tuple[V3User, ...] = (
    V3User("sha-aes", "SHA", "auth-sha-key-1", "AES", "priv-aes-key-1"),
    V3User("md5-only", "MD5", "auth-md5-key-2", None, None),
    V3User("md5-des", "MD5", "auth-md5-key-3", "DES", "priv-des-key-3"),
)


class SnmpdUnavailable(RuntimeError):
    """snmpd or the net-snmp tools are missing; the message says how to get them."""


def check_environment() -> None:
    if not os.access(SNMPD, os.X_OK):
        raise SnmpdUnavailable(f"{SNMPD} not found: apt-get install snmpd")
    for tool in ("snmpget", "snmpbulkwalk"):
        if shutil.which(tool) is None:
            raise SnmpdUnavailable(f"{tool} not found: apt-get install snmp")


def free_udp_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
    return port


def _tool_env() -> dict[str, str]:
    """The net-snmp tools without MIB files: numeric output, no warnings."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("SNMP")}
    env["MIBS"] = ""
    env["MIBDIRS"] = ""
    return env


class Snmpd:
    """snmpd on 127.0.0.1:<free UDP port> with a config of its own in ``workdir``."""

    def __init__(
        self,
        workdir: Path,
        *,
        users: Sequence[V3User] = USERS,
        extra_config: Sequence[str] = (),
    ) -> None:
        check_environment()
        self.workdir = workdir
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.host = "127.0.0.1"
        self.port = 0
        self.users = tuple(users)
        self.extra_config = tuple(extra_config)
        self.proc: subprocess.Popen[bytes] | None = None
        self.log_path = self.workdir / "snmpd.log"
        self.persist = self.workdir / "persist"
        self.no_mibs = self.workdir / "no-mibs"

    @property
    def address(self) -> str:
        return f"{self.host}:{self.port}"

    def user(self, name: str) -> V3User:
        return next(u for u in self.users if u.name == name)

    def config_lines(self) -> list[str]:
        lines = [
            f"agentAddress udp:{self.host}:{self.port}",
            f"rocommunity {COMMUNITY} 127.0.0.1",
            "view systemonly included .1.3.6.1.2.1.1",
            f"rocommunity {SYSONLY_COMMUNITY} 127.0.0.1 -V systemonly",
            f"sysName {SYS_NAME}",
            f"sysLocation {SYS_LOCATION}",
            f"sysContact {SYS_CONTACT}",
            "sysServices 72",
            "dontLogTCPWrappersConnects yes",
        ]
        for u in self.users:
            level = {"authPriv": "priv", "authNoPriv": "auth", "noAuthNoPriv": "noauth"}[u.level]
            lines.append(f"rouser {u.name} {level}")
            create = f"createUser {u.name}"
            if u.auth_protocol:
                create += f' {u.auth_protocol} "{u.auth_key}"'
            if u.priv_protocol:
                create += f' {u.priv_protocol} "{u.priv_key}"'
            lines.append(create)
        for oid, kind, value, _gufo in SCALARS:
            lines.append(f"override .{LAB}.{oid} {kind} {value}")
        for row in range(1, BIG_ROWS + 1):
            lines.append(f'override .{BIG}.{row} octet_str "{BIG_TEXT}"')
        lines.append(f"[snmp] persistentDir {self.persist}")
        lines.extend(self.extra_config)
        return lines

    def start(self, timeout: float = 15.0, attempts: int = 3) -> Snmpd:
        """Start on a free port (another one if that port was taken meanwhile)."""
        for _ in range(attempts):
            self.port = free_udp_port()
            if self._start_once(timeout):
                return self
        raise SnmpdUnavailable(f"snmpd did not start after {attempts} tries:\n{self.log_tail()}")

    def _start_once(self, timeout: float) -> bool:
        self.persist.mkdir(exist_ok=True)
        self.no_mibs.mkdir(exist_ok=True)
        config = self.workdir / "snmpd.conf"
        config.write_text("\n".join(self.config_lines()) + "\n", encoding="utf-8")
        env = _tool_env()
        env["SNMP_PERSISTENT_DIR"] = str(self.persist)
        offset = self.log_path.stat().st_size if self.log_path.exists() else 0
        no_mibs = ["-M", str(self.no_mibs), "-m", ""]
        with self.log_path.open("ab") as log:
            self.proc = subprocess.Popen(
                [SNMPD, "-f", "-Lo", "-C", "-c", str(config), "-I", "-smux", *no_mibs],
                stdout=log,
                stderr=log,
                stdin=subprocess.DEVNULL,
                env=env,
            )
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                text = self.log_path.read_bytes()[offset:].decode(errors="replace")
                if "Error opening specified endpoint" in text:
                    return False  # lost the port race: the caller tries another port
                raise SnmpdUnavailable(f"snmpd exited {self.proc.returncode}:\n{text[-3000:]}")
            if self.answers(wait=0.3):
                return True
        self.stop()
        raise SnmpdUnavailable(f"snmpd did not answer within {timeout} s:\n{self.log_tail()}")

    def answers(self, *, wait: float = 0.5) -> bool:
        result = subprocess.run(
            ["snmpget", *self.tool_args(), "-t", str(wait), "-r", "0", "1.3.6.1.2.1.1.5.0"],
            capture_output=True,
            env=_tool_env(),
            check=False,
            timeout=wait + 10,
        )
        return result.returncode == 0

    def tool_args(self, user: V3User | None = None, community: str = COMMUNITY) -> list[str]:
        """Arguments of the net-snmp tools for this agent (v2c, or v3 as ``user``)."""
        if user is None:
            return ["-v2c", "-c", community, "-On", self.address]
        args = ["-v3", "-l", user.level, "-u", user.name, "-On"]
        if user.auth_protocol:
            args += ["-a", user.auth_protocol, "-A", user.auth_key or ""]
        if user.priv_protocol:
            args += ["-x", user.priv_protocol, "-X", user.priv_key or ""]
        return [*args, self.address]

    def log_tail(self, chars: int = 3000) -> str:
        return self.log_path.read_text(errors="replace")[-chars:] if self.log_path.exists() else ""

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(timeout=5)
        self.proc = None

    def __enter__(self) -> Snmpd:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()


def bulkwalk_oids(
    agent: Snmpd, oid: str, *, user: V3User | None = None, max_repetitions: int = 10
) -> list[str]:
    """The OIDs ``snmpbulkwalk`` returns under ``oid`` (numeric, no leading dot)."""
    result = subprocess.run(
        [
            "snmpbulkwalk",
            *agent.tool_args(user),
            f"-Cr{max_repetitions}",
            "-Oq",
            "-t",
            "2",
            "-r",
            "1",
            oid,
        ],
        capture_output=True,
        text=True,
        env=_tool_env(),
        check=False,
        timeout=60,
    )
    if result.returncode != 0:
        raise RuntimeError(f"snmpbulkwalk failed ({result.returncode}): {result.stderr.strip()}")
    oids: list[str] = []
    for line in result.stdout.splitlines():
        if not line.startswith(".") or "No more variables left" in line:
            continue  # a continuation of a multi-line value, or the end-of-view marker
        oids.append(line.split(None, 1)[0].lstrip("."))
    return oids
