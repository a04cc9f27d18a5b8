"""What the probe benchmarks (``snmp-walk``, ``snmp-get``, ``ssh``, ``http``) share.

Targets, each a child process (or a few) on loopback addresses:

- :func:`snmp_agents`: net-snmp ``snmpd`` processes, each listening on several
  ``udp:127.x.y.z:PORT`` endpoints (one config file each, no MIB files loaded, no SMUX).
- :func:`ssh_hosts`: one OpenSSH ``sshd`` listening on several loopback addresses, with a
  local account (:data:`SSH_USER`, public-key login) made for it if missing and removed
  afterwards if this run made it. Needs root, like the SSH tests.
- :func:`http_server`: a small aiohttp server in a process of its own
  (``python -m bridge.bench.targets http-server HOST PORT``).

The peer side of these benchmarks is a plain loop of the same library the probe uses,
run in a child process of its own (:class:`PeerProcess`), so that it has its own
interpreter and event loop like the bridge does. The child sets up once (sessions,
connections: not timed, as the bridge's pools are warm after the warm-up), prints
``ready``, and then makes one measured pass for every ``run`` line it reads on stdin,
answering with one JSON line (:func:`serve_passes`).

The bridge side goes through :class:`JobDriver`: output records built and encoded before
the clock starts, published ``batch`` to a message, timed from the first publish to the
last complete answer.

This module ships in the wheel: it copies the little it needs of ``tests/snmpd.py`` and
``tests/sshd.py`` instead of importing them.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import orjson

from bridge.agent.config import BridgeSection, Config, LimitsConfig, ProbesConfig, SecurityConfig
from bridge.bench import BenchError
from bridge.bench.common import (
    CpuMeter,
    Result,
    Round,
    Side,
    Table,
    bridge_process,
    process_cpu,
    progress,
)
from bridge.demo.broker import BrokerEndpoint, stop_process
from bridge.wire.broker import BrokerConfig
from bridge.wire.client import EccClient, JobResult

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
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            text = (entry / "stat").read_text()
        except OSError:
            continue
        ppid = int(text[text.rindex(")") + 2 :].split()[1])
        parents.setdefault(ppid, []).append(int(entry.name))
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

    _run_loop(main)
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
    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "bridge.bench.targets",
        "http-server",
        host,
        "0",
        stdin=asyncio.subprocess.PIPE,
        stdout=asyncio.subprocess.PIPE,
    )
    assert proc.stdout is not None
    assert proc.stdin is not None
    try:
        line = (await asyncio.wait_for(proc.stdout.readline(), 30)).decode()
        if not line.startswith("ready "):
            raise BenchError(f"the HTTP server did not start: {line!r}")
        yield HttpServer(f"http://{host}:{int(line.split()[1])}/", proc)
    finally:
        proc.stdin.close()
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(proc.wait(), 5)
        await stop_process(proc, 2)


# --- the peer loops: a child process, one measured pass per request -----------------------------


def _run_loop(main: Callable[[], Awaitable[None]]) -> None:
    async def wrapped() -> None:
        await main()

    try:
        import uvloop
    except ImportError:  # pragma: no cover - platforms without uvloop
        asyncio.run(wrapped())
        return
    uvloop.run(wrapped())


PeerSetup = Callable[
    [contextlib.AsyncExitStack], Awaitable[Callable[[], Awaitable[dict[str, Any]]]]
]


def run_peer(setup: PeerSetup) -> int:
    """A peer child's main: ``setup(stack)`` (not timed; it registers its clean-up on
    ``stack``) returns the measured pass; then :func:`serve_passes`. Runs on uvloop, like
    the bridge."""

    async def main() -> None:
        async with contextlib.AsyncExitStack() as stack:
            one_pass = await setup(stack)
            await serve_passes(one_pass)

    _run_loop(main)
    return 0


async def serve_passes(one_pass: Callable[[], Awaitable[dict[str, Any]]]) -> None:
    """Print ``ready``; for each line on stdin run ``one_pass`` and print its JSON; EOF ends."""
    print("ready", flush=True)
    loop = asyncio.get_running_loop()
    while True:
        line = await loop.run_in_executor(None, sys.stdin.readline)
        if not line:
            return
        print(orjson.dumps(await one_pass()).decode(), flush=True)


class PeerProcess:
    """The parent's end of a peer child: ``measure()`` runs one pass and returns its JSON."""

    def __init__(self, command: list[str], *, pass_timeout: float = 300.0) -> None:
        self.command = command
        self.pass_timeout = pass_timeout
        self.proc: asyncio.subprocess.Process | None = None

    @property
    def pid(self) -> int:
        assert self.proc is not None
        return self.proc.pid

    async def __aenter__(self) -> PeerProcess:
        self.proc = await asyncio.create_subprocess_exec(
            *self.command, stdin=asyncio.subprocess.PIPE, stdout=asyncio.subprocess.PIPE
        )
        try:
            line = await self._line(120.0)
            if line.strip() != b"ready":
                raise BenchError(f"the peer did not start: {line!r}")
        except BaseException:
            await self.__aexit__()
            raise
        return self

    async def __aexit__(self, *exc: object) -> None:
        if self.proc is None:
            return
        if self.proc.stdin is not None:
            self.proc.stdin.close()
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self.proc.wait(), 10)
        await stop_process(self.proc, 2)

    async def _line(self, timeout: float) -> bytes:
        assert self.proc is not None
        assert self.proc.stdout is not None
        try:
            return await asyncio.wait_for(self.proc.stdout.readline(), timeout)
        except TimeoutError:
            raise BenchError(f"the peer gave no answer within {timeout:g} s") from None

    async def measure(self) -> dict[str, Any]:
        assert self.proc is not None
        assert self.proc.stdin is not None
        self.proc.stdin.write(b"run\n")
        await self.proc.stdin.drain()
        line = await self._line(self.pass_timeout)
        if not line:
            raise BenchError(f"the peer exited ({self.proc.returncode}) during a pass")
        data: dict[str, Any] = orjson.loads(line)
        return data


def pass_result(count: int, seconds: float, failed: int, **extra: Any) -> dict[str, Any]:
    """What a peer's pass reports: units done, wall seconds, failures, its own CPU."""
    return {"count": count, "seconds": seconds, "failed": failed, **extra}


# --- the bridge side ------------------------------------------------------------------------------


def write_credentials(path: Path, text: str) -> Path:
    """The credentials TOML, owner-only from the start (the bridge refuses anything else)."""
    path.unlink(missing_ok=True)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "w", encoding="utf-8") as out:
        out.write(text)
    return path


def bench_config(
    endpoint: BrokerEndpoint,
    agent: str,
    workdir: Path,
    *,
    credentials: str | None,
    limits: LimitsConfig,
    probe_settings: dict[str, dict[str, Any]] | None = None,
) -> Config:
    """The bridge's config: a credentials file (chmod 600), validation not required."""
    cred_file = (
        write_credentials(workdir / "credentials.toml", credentials) if credentials else None
    )
    return Config(
        broker=BrokerConfig(
            host=endpoint.host,
            port=endpoint.port,
            protocol=endpoint.protocol,
            session_expiry=300,
        ),
        bridge=BridgeSection(agent=agent, state_dir=workdir / "state", credentials_file=cred_file),
        limits=limits,
        probes=ProbesConfig(settings=probe_settings or {}),
        security=SecurityConfig(require_validation=False),
        log_level="info",
    )


class JobDriver:
    """Publishes output records ``batch`` to a message and waits for every complete answer."""

    def __init__(self, client: EccClient, *, answer_within: float = 120.0) -> None:
        self.client = client
        self.answer_within = answer_within

    async def run(self, records: list[dict[str, Any]], batch: int) -> tuple[float, list[JobResult]]:
        """Wall seconds from the first publish to the last complete answer, and the answers."""
        client = self.client
        sys_ids = [str(r["sys_id"]) for r in records]
        bodies = [
            orjson.dumps(records[i]) if batch == 1 else orjson.dumps(records[i : i + batch])
            for i in range(0, len(records), batch)
        ]
        client.expect(sys_ids)
        session = client.session
        topic = client.topics.output
        started = time.perf_counter()
        pubacks = [await session.publish_start(topic, body) for body in bodies]
        try:
            results = await client.wait(sys_ids, self.answer_within)
        except TimeoutError:
            answered = sum(1 for s in sys_ids if client.results[s].done)
            for s in sys_ids:
                client.results.pop(s, None)
            raise BenchError(
                f"{answered:,} of {len(sys_ids):,} jobs answered within {self.answer_within:g} s"
            ) from None
        seconds = time.perf_counter() - started
        await asyncio.gather(*pubacks)
        for s in sys_ids:
            client.results.pop(s, None)
        return seconds, results


def failures(results: Sequence[JobResult], check: Callable[[dict[str, Any]], bool]) -> list[str]:
    """The error strings (or a note) of answers that failed ``check`` on their final payload."""
    bad: list[str] = []
    for result in results:
        if result.error_string:
            bad.append(result.error_string)
        elif not check(result.final.get("payload") or {}):
            bad.append(f"unexpected answer: {orjson.dumps(result.final.get('payload'))[:200]!r}")
    return bad


# --- rounds -------------------------------------------------------------------------------------


async def measure_peer(peer: PeerProcess, targets: TreeMeter | None = None) -> Side:
    """One pass of the peer child: its own count and wall time, its CPU from /proc."""
    meter = CpuMeter(peer.pid)
    meter.start()
    if targets is not None:
        targets.start()
    data = await peer.measure()
    cpu = meter.stop()
    extra: dict[str, Any] = {k: v for k, v in data.items() if k not in ("count", "seconds")}
    side = Side(int(data["count"]), float(data["seconds"]), cpu, extra)
    if targets is not None:
        side.extra["target_cpu_s"] = round(targets.stop(), 3)
    return side


async def measure_ours(
    driver: JobDriver,
    records: list[dict[str, Any]],
    batch: int,
    bridge_pid: int,
    check: Callable[[list[JobResult]], tuple[int, list[str]]],
    targets: TreeMeter | None = None,
) -> Side:
    """One pass through the bridge: ``check`` turns the answers into (units done, failures)."""
    meter = CpuMeter(bridge_pid)
    meter.start()
    if targets is not None:
        targets.start()
    driver_cpu = time.process_time()
    seconds, results = await driver.run(records, batch)
    driver_cpu = time.process_time() - driver_cpu
    cpu = meter.stop()
    count, failed = check(results)
    side = Side(count, seconds, cpu, {"failed": len(failed)})
    if failed:
        side.extra["failures"] = failed[:3]
    side.extra["driver_cpu_s"] = round(driver_cpu, 3)
    if targets is not None:
        side.extra["target_cpu_s"] = round(targets.stop(), 3)
    return side


async def side_by_side(
    result: Result,
    rounds: int,
    peer: Callable[[], Awaitable[Side]],
    ours: Callable[[], Awaitable[Side]],
) -> None:
    """One untimed warm-up of each side, then ``rounds`` alternating rounds into ``result``."""
    progress("warm-up: one untimed pass of each side")
    await peer()
    await ours()
    for index in range(1, rounds + 1):
        order = ("peer", "ours") if index % 2 else ("ours", "peer")
        sides: dict[str, Side] = {}
        for who in order:
            sides[who] = await (peer() if who == "peer" else ours())
        rnd = Round(index, order, sides["peer"], sides["ours"])
        result.rounds.append(rnd)
        progress(
            f"round {index}/{rounds}: peer {rnd.peer.rate:,.0f} {result.unit} "
            f"({rnd.peer.count:,} in {rnd.peer.seconds:.3f} s), ours {rnd.ours.rate:,.0f} "
            f"{result.unit} ({rnd.ours.count:,} in {rnd.ours.seconds:.3f} s), "
            f"ratio {rnd.ratio:.2f}"
        )
        for who, side in (("peer", rnd.peer), ("ours", rnd.ours)):
            if side.extra.get("failed"):
                result.warnings.append(
                    f"round {index}: {who}: {side.extra['failed']} unit(s) failed, e.g. "
                    f"{side.extra.get('failures', [])[:1]}"
                )


async def jobs_beside_peer(
    stack: contextlib.AsyncExitStack,
    result: Result,
    rounds: int,
    *,
    peer_command: list[str],
    config: Config,
    log_path: Path,
    target_pids: Sequence[int],
    jobs: Callable[[str], list[dict[str, Any]]],
    batch: int,
    check: Callable[[list[JobResult]], tuple[int, list[str]]],
) -> None:
    """The peer process's passes beside the same work sent as jobs through a bridge process.

    ``jobs(agent_id)`` makes one pass's output records; both sides' CPU is metered together
    with the targets' (``target_pids``).
    """
    peer = await stack.enter_async_context(PeerProcess(peer_command))
    bridge = await stack.enter_async_context(bridge_process(config, log_path))
    client = await stack.enter_async_context(
        EccClient(config.broker, agent=config.bridge.agent, prefix=config.bridge.topic_prefix)
    )
    driver = JobDriver(client)
    meter = TreeMeter(target_pids)
    agent_id = config.bridge.agent_id

    async def peer_side() -> Side:
        return await measure_peer(peer, meter)

    async def ours_side() -> Side:
        return await measure_ours(driver, jobs(agent_id), batch, bridge.pid, check, meter)

    await side_by_side(result, rounds, peer_side, ours_side)


def count_answers(
    results: list[JobResult],
    answers: Callable[[JobResult], list[tuple[str, Any]]],
    right: Callable[[Any], bool],
) -> tuple[int, list[str]]:
    """Units answered right, and what went wrong: ``answers(result)`` gives (who, answer)
    for each unit of a job; a job's error string counts as one failure."""
    ok = 0
    bad: list[str] = []
    for result in results:
        if result.error_string:
            bad.append(result.error_string)
            continue
        for who, answer in answers(result):
            if right(answer):
                ok += 1
            else:
                bad.append(f"{who}: unexpected answer {orjson.dumps(answer)[:200]!r}")
    return ok, bad


def cpu_table(result: Result, target: str) -> Table:
    """CPU per unit of each side, of the targets meanwhile and of the bench's driver."""

    def per_unit(side: Side, seconds: float | None) -> str:
        if seconds is None or not side.count:
            return "-"
        return f"{seconds / side.count * 1e6:.1f}"

    return Table(
        f"CPU per unit, µs: the measured process; {target} meanwhile; the bench's MQTT driver",
        ["round", "peer", "bridge", f"{target}: peer/ours", "driver (ours)"],
        [
            [
                str(r.index),
                per_unit(r.peer, r.peer.cpu_s),
                per_unit(r.ours, r.ours.cpu_s),
                f"{per_unit(r.peer, r.peer.extra.get('target_cpu_s'))}/"
                f"{per_unit(r.ours, r.ours.extra.get('target_cpu_s'))}",
                per_unit(r.ours, r.ours.extra.get("driver_cpu_s")),
            ]
            for r in result.rounds
        ],
    )


def tool_versions(*dists: str) -> dict[str, Any]:
    import importlib.metadata

    found: dict[str, Any] = {}
    for dist in dists:
        try:
            found[dist] = importlib.metadata.version(dist)
        except importlib.metadata.PackageNotFoundError:
            found[dist] = None
    return found


def first_line(command: Sequence[str]) -> str | None:
    try:
        done = subprocess.run(command, capture_output=True, text=True, timeout=10, check=False)
    except (OSError, subprocess.TimeoutExpired):
        return None
    text = (done.stdout or done.stderr).strip()
    return text.splitlines()[0] if text else None


def own_cpu() -> float:
    """CPU seconds of this process so far (all threads)."""
    cpu = process_cpu(os.getpid())
    return cpu if cpu is not None else time.process_time()


def random_tag() -> str:
    return secrets.token_hex(4)


if __name__ == "__main__" and sys.argv[1:2] == ["http-server"]:
    sys.exit(http_server_main(sys.argv[2], int(sys.argv[3])))
