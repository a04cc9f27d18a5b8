"""The targets of the probe benchmarks (``snmp-walk``, ``snmp-get``, ``ssh``, ``http``).

Each is a child process (or a few) on loopback addresses:

- :func:`snmp_agents`: net-snmp ``snmpd`` processes, each listening on several
  ``udp:127.x.y.z:PORT`` endpoints (one config file each, no MIB files loaded, no SMUX).
- :func:`ssh_hosts`: one OpenSSH ``sshd`` listening on several loopback addresses, with a
  local account (:data:`SSH_USER`, public-key login) made for it if missing and removed
  afterwards if this run made it. Needs root, like the SSH tests.
- :func:`http_server`: a small aiohttp server in a process of its own
  (``python -m bridge.bench.targets http-server HOST PORT``).

:class:`TreeMeter` meters their CPU. The peers are in ``bridge.bench.peers``, the bridge's
side and the rounds in ``bridge.bench.rounds``.

This module ships in the wheel: it copies the little it needs of ``tests/snmpd.py`` and
``tests/sshd.py`` instead of importing them.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from bridge.bench import BenchError
from bridge.bench.common import (
    proc_stats,
    ready_child,
    run_uvloop,
)

SNMPD = "/usr/sbin/snmpd"
SSHD = "/usr/sbin/sshd"
SNMP_COMMUNITY = "mb-bench-7d3f"
# Not the tests' ``mbkey`` (tests/sshd.py): a test suite running meanwhile may make or
# remove that one.
SSH_USER = "mbbench"
_CLOCK_TICKS = os.sysconf("SC_CLK_TCK")


# --- small helpers ------------------------------------------------------------------------------


def tool_env() -> dict[str, str]:
    """The net-snmp tools without MIB files: numeric output, no warnings."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("SNMP")}
    env["MIBS"] = ""
    env["MIBDIRS"] = ""
    return env


def free_port(kind: int) -> int:
    """A port free on every address at this moment (``kind``: SOCK_DGRAM or SOCK_STREAM)."""
    with socket.socket(socket.AF_INET, kind) as sock:
        sock.bind(("0.0.0.0", 0))
        port: int = sock.getsockname()[1]
    return port


def _children(pid: int) -> list[int]:
    """Every live descendant of ``pid`` (from /proc), children first."""
    parents: dict[int, list[int]] = {}
    for child, _comm, ppid in proc_stats():
        parents.setdefault(ppid, []).append(child)
    found: list[int] = []
    todo = list(parents.get(pid, []))
    while todo:
        child = todo.pop(0)
        found.append(child)
        todo.extend(parents.get(child, []))
    return found


def tree_cpu(pids: Sequence[int]) -> float:
    """CPU seconds of ``pids`` and their live descendants, with the children they reaped."""
    total = 0.0
    for pid in {p for root in pids for p in (root, *_children(root))}:
        try:
            text = Path(f"/proc/{pid}/stat").read_text()
        except OSError:
            continue
        fields = text[text.rindex(")") + 2 :].split()
        total += sum(int(fields[i]) for i in (11, 12, 13, 14)) / _CLOCK_TICKS
    return total


class TreeMeter:
    """CPU of a set of target processes (and their descendants) between start and stop."""

    def __init__(self, pids: Sequence[int]) -> None:
        self.pids = list(pids)
        self._start = 0.0

    def start(self) -> None:
        self._start = tree_cpu(self.pids)

    def stop(self) -> float:
        return tree_cpu(self.pids) - self._start


def _kill(pids: Sequence[int]) -> None:
    for pid in pids:
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.kill(pid, signal.SIGKILL)


# --- snmpd ----------------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class SnmpEndpoint:
    address: str
    port: int

    @property
    def text(self) -> str:
        return f"{self.address}:{self.port}"


@dataclass
class SnmpAgents:
    endpoints: list[SnmpEndpoint]
    procs: list[subprocess.Popen[bytes]] = field(default_factory=list)

    @property
    def pids(self) -> list[int]:
        return [p.pid for p in self.procs]


def _snmpd_config(
    addresses: Sequence[str], port: int, persist: Path, name: str, excluded: Sequence[str]
) -> str:
    listen = ",".join(f"udp:{address}:{port}" for address in addresses)
    view = [f"view bench excluded .{oid}" for oid in excluded]
    return (
        "\n".join(
            [
                f"agentAddress {listen}",
                "view bench included .1",
                *view,
                f"rocommunity {SNMP_COMMUNITY} 127.0.0.0/8 -V bench",
                f"sysName {name}",
                "sysLocation loopback",
                "sysContact bench@example.invalid",
                "dontLogTCPWrappersConnects yes",
                f"[snmp] persistentDir {persist}",
            ]
        )
        + "\n"
    )


def _start_snmpd(
    workdir: Path, addresses: Sequence[str], port: int, name: str, excluded: Sequence[str]
) -> subprocess.Popen[bytes]:
    workdir.mkdir(parents=True, exist_ok=True)
    persist = workdir / "persist"
    no_mibs = workdir / "no-mibs"
    persist.mkdir(exist_ok=True)
    no_mibs.mkdir(exist_ok=True)
    config = workdir / "snmpd.conf"
    text = _snmpd_config(addresses, port, persist, name, excluded)
    config.write_text(text, encoding="utf-8")
    env = tool_env()
    env["SNMP_PERSISTENT_DIR"] = str(persist)
    no_mib_args = ["-M", str(no_mibs), "-m", ""]  # load no MIB files: snmpd needs none
    with (workdir / "snmpd.log").open("wb") as log:  # one log per attempt
        return subprocess.Popen(
            [SNMPD, "-f", "-Lo", "-C", "-c", str(config), "-I", "-smux", *no_mib_args],
            stdout=log,
            stderr=log,
            stdin=subprocess.DEVNULL,
            env=env,
        )


async def _answers(endpoint: SnmpEndpoint, timeout: float) -> bool:
    from gufo.snmp import SnmpError, SnmpVersion
    from gufo.snmp.aio.client import SnmpSession

    session = SnmpSession(
        addr=endpoint.address,
        port=endpoint.port,
        community=SNMP_COMMUNITY,
        version=SnmpVersion.v2c,
        timeout=timeout,
    )
    try:
        await session.get("1.3.6.1.2.1.1.5.0")
    except (TimeoutError, SnmpError, OSError):
        return False
    return True


@contextlib.asynccontextmanager
async def snmp_agents(
    workdir: Path,
    address_groups: Sequence[Sequence[str]],
    *,
    excluded: Sequence[str] = (),
    ready_timeout: float = 30.0,
) -> AsyncIterator[SnmpAgents]:
    """One snmpd per group of addresses, all on one UDP port; yields once every endpoint
    answers a GET of sysName.0. The community sees every OID but the ``excluded`` subtrees
    (numeric, no leading dot)."""
    if not os.access(SNMPD, os.X_OK):
        raise BenchError(f"{SNMPD} not found (apt-get install snmpd)")
    agents = SnmpAgents([])
    try:
        for _attempt in range(3):
            port = free_port(socket.SOCK_DGRAM)
            agents.procs = [
                _start_snmpd(workdir / f"snmpd-{i}", group, port, f"bench-snmpd-{i}", excluded)
                for i, group in enumerate(address_groups)
            ]
            agents.endpoints = [SnmpEndpoint(a, port) for group in address_groups for a in group]
            waiting = set(agents.endpoints)
            deadline = time.monotonic() + ready_timeout
            lost_race = False
            while waiting and time.monotonic() < deadline:
                if any(p.poll() is not None for p in agents.procs):
                    logs = [
                        (workdir / f"snmpd-{i}" / "snmpd.log").read_text(errors="replace")
                        for i in range(len(address_groups))
                    ]
                    if any("Error opening specified endpoint" in text for text in logs):
                        lost_race = True  # the port was taken meanwhile: another one
                        break
                    raise BenchError(f"snmpd exited: {''.join(logs)[-2000:]}")
                asked = sorted(waiting, key=lambda e: e.text)
                answered = await asyncio.gather(*(_answers(e, 0.3) for e in asked))
                waiting = {e for e, ok in zip(asked, answered, strict=True) if not ok}
            if not waiting and not lost_race:
                break
            for proc in agents.procs:
                proc.kill()
                proc.wait()
            if not lost_race:
                raise BenchError(
                    f"{len(waiting)} of {len(agents.endpoints)} SNMP endpoints did not answer "
                    f"within {ready_timeout:g} s (e.g. {sorted(e.text for e in waiting)[:3]})"
                )
        else:
            raise BenchError("snmpd could not bind a free UDP port in 3 tries")
        yield agents
    finally:
        for proc in agents.procs:
            if proc.poll() is None:
                proc.terminate()
        for proc in agents.procs:
            try:
                proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()


# --- sshd -----------------------------------------------------------------------------------------


@dataclass
class SshHosts:
    hosts: list[tuple[str, int]]
    user: str
    key_file: Path  # the client's private key (ed25519, no passphrase)
    proc: subprocess.Popen[bytes]

    @property
    def pids(self) -> list[int]:
        return [self.proc.pid]


def _run(args: list[str], *, input_text: str | None = None) -> None:
    done = subprocess.run(args, input=input_text, capture_output=True, text=True, check=False)
    if done.returncode != 0:
        raise BenchError(f"{args[0]} failed ({done.returncode}): {done.stderr.strip()[:300]}")


def _user_exists(name: str) -> bool:
    import pwd

    try:
        pwd.getpwnam(name)
    except KeyError:
        return False
    return True


def _keygen(path: Path, comment: str) -> None:
    _run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-C", comment, "-f", str(path)])


def _banner(address: str, port: int) -> bool:
    try:
        with socket.create_connection((address, port), timeout=1.0) as sock:
            return sock.recv(64).startswith(b"SSH-")
    except OSError:
        return False


class _Sshd:
    """The blocking part of :func:`ssh_hosts` (run in a thread): user, keys, sshd."""

    def __init__(self, workdir: Path, addresses: Sequence[str], ready_timeout: float) -> None:
        self.workdir = workdir
        self.addresses = list(addresses)
        self.ready_timeout = ready_timeout
        self.created_user = False
        self.keys_dir: Path | None = None
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self) -> SshHosts:
        if os.geteuid() != 0:
            raise BenchError("the ssh benchmark needs root (it makes a local user and runs sshd)")
        for tool in (SSHD, "ssh-keygen", "useradd", "userdel", "usermod"):
            if shutil.which(tool) is None:
                raise BenchError(f"{tool} not found (apt-get install openssh-server passwd)")
        if not _user_exists(SSH_USER):
            _run(["useradd", "--create-home", "--shell", "/bin/bash", SSH_USER])
            self.created_user = True
        # '*': no password, not locked (sshd with UsePAM no refuses locked accounts)
        _run(["usermod", "-p", "*", SSH_USER])
        # sshd reads authorized keys as the user: outside the private work directory
        self.keys_dir = Path(tempfile.mkdtemp(prefix="midbridge-bench-keys-"))
        self.keys_dir.chmod(0o755)
        self.workdir.mkdir(parents=True, exist_ok=True)
        client_key = self.workdir / "client_ed25519"
        host_key = self.workdir / "host_ed25519"
        _keygen(client_key, "midbridge-bench")
        _keygen(host_key, "midbridge-bench-host")
        authorized = self.keys_dir / SSH_USER
        authorized.write_text(Path(f"{client_key}.pub").read_text(), encoding="utf-8")
        authorized.chmod(0o644)
        Path("/run/sshd").mkdir(mode=0o755, exist_ok=True)  # privilege separation
        for _attempt in range(3):
            port = free_port(socket.SOCK_STREAM)
            if self._start_once(port, host_key):
                return SshHosts(
                    [(a, port) for a in self.addresses], SSH_USER, client_key, self._proc()
                )
        raise BenchError("sshd could not bind a free port in 3 tries")

    def _proc(self) -> subprocess.Popen[bytes]:
        assert self.proc is not None
        return self.proc

    def _start_once(self, port: int, host_key: Path) -> bool:
        """sshd on ``port``; False if the port was taken meanwhile."""
        config = self.workdir / "sshd_config"
        lines = [
            *(f"ListenAddress {address}:{port}" for address in self.addresses),
            f"HostKey {host_key}",
            f"PidFile {self.workdir / 'sshd.pid'}",
            "UsePAM no",
            "StrictModes no",
            f"AuthorizedKeysFile {self.keys_dir}/%u",
            "PasswordAuthentication no",
            "KbdInteractiveAuthentication no",
            "PubkeyAuthentication yes",
            "PermitRootLogin no",
            f"AllowUsers {SSH_USER}",
            "PrintMotd no",
            "PrintLastLog no",
            "LogLevel ERROR",
        ]
        config.write_text("\n".join(lines) + "\n", encoding="utf-8")
        log_path = self.workdir / "sshd.log"
        with log_path.open("ab") as log:
            self.proc = subprocess.Popen(
                [SSHD, "-D", "-e", "-f", str(config)],
                stdout=log,
                stderr=log,
                stdin=subprocess.DEVNULL,
            )
        waiting = list(self.addresses)
        deadline = time.monotonic() + self.ready_timeout
        while waiting and time.monotonic() < deadline and self.proc.poll() is None:
            if _banner(waiting[0], port):
                waiting.pop(0)
            else:
                time.sleep(0.05)
        if not waiting:
            return True
        text = log_path.read_text(errors="replace")
        self._stop_listener()
        if "Address already in use" in text:
            return False
        raise BenchError(f"sshd did not start: {text[-1500:]}")

    def _stop_listener(self) -> None:
        if self.proc is None:
            return
        sessions = _children(self.proc.pid)  # per-connection sshd processes, their shells
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=5)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        _kill(sessions)
        self.proc = None

    def stop(self) -> None:
        self._stop_listener()
        if self.keys_dir is not None:
            shutil.rmtree(self.keys_dir, ignore_errors=True)
        if self.created_user:
            subprocess.run(["userdel", "--remove", SSH_USER], capture_output=True, check=False)


@contextlib.asynccontextmanager
async def ssh_hosts(
    workdir: Path, addresses: Sequence[str], *, ready_timeout: float = 15.0
) -> AsyncIterator[SshHosts]:
    """sshd on ``addresses`` (one port, one process), user :data:`SSH_USER` with a new key.

    The user is made if missing (and then removed at the end); needs root."""
    sshd = _Sshd(workdir, addresses, ready_timeout)
    try:
        yield await asyncio.to_thread(sshd.start)
    finally:
        await asyncio.to_thread(sshd.stop)


# --- the HTTP server ------------------------------------------------------------------------------

HTTP_BODY = b"ok\n"


def http_server_main(host: str, port: int) -> int:
    """Serve ``GET /`` (:data:`HTTP_BODY`) until stdin reaches EOF; print ``ready PORT``."""
    from aiohttp import web

    async def hello(_request: web.Request) -> web.Response:
        return web.Response(body=HTTP_BODY, content_type="text/plain")

    async def main() -> None:
        app = web.Application()
        app.router.add_get("/", hello)
        runner = web.AppRunner(app, access_log=None)
        await runner.setup()
        site = web.TCPSite(runner, host, port, backlog=4096)
        await site.start()
        bound = runner.addresses[0][1]
        print(f"ready {bound}", flush=True)
        loop = asyncio.get_running_loop()
        await loop.run_in_executor(None, sys.stdin.buffer.read)
        await runner.cleanup()

    run_uvloop(main)
    return 0


@dataclass
class HttpServer:
    url: str
    proc: asyncio.subprocess.Process

    @property
    def pids(self) -> list[int]:
        return [self.proc.pid]


@contextlib.asynccontextmanager
async def http_server(host: str = "127.0.0.1") -> AsyncIterator[HttpServer]:
    command = (sys.executable, "-m", "bridge.bench.targets", "http-server", host, "0")
    async with ready_child("the HTTP server", *command) as (proc, port):
        yield HttpServer(f"http://{host}:{int(port)}/", proc)


if __name__ == "__main__" and sys.argv[1:2] == ["http-server"]:
    sys.exit(http_server_main(sys.argv[2], int(sys.argv[3])))
