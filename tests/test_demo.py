"""``midbridge demo``: the whole loop (both embedded brokers), its sample targets, and the
discovery loop against an instance elsewhere (what compose runs)."""

from __future__ import annotations

import asyncio
import base64
import os
import re
import secrets
import signal
import socket
import ssl
import subprocess
import sys
import time
from collections.abc import AsyncIterator
from contextlib import AsyncExitStack
from pathlib import Path
from typing import Any

import aiohttp
import asyncssh
import pytest
from gufo.snmp import SnmpVersion
from gufo.snmp.aio.client import SnmpSession

from bridge.agent.bridge import Bridge
from bridge.agent.config import BridgeSection, Config, LimitsConfig, SecurityConfig
from bridge.demo import loop as demo
from bridge.demo.targets import (
    NETWORK,
    SNMP_COMMUNITY_ENV,
    SSH_PASSWORD_ENV,
    CannedShell,
    LinuxHost,
    Ports,
    RunningTargets,
    TargetSettings,
    demo_targets,
)
from bridge.instance import cmdb
from bridge.wire.broker import BrokerConfig
from probes import REGISTRY
from tests.brokers import BrokerAddress
from tests.harness import REPO

SYS_DESCR, SYS_OBJECT_ID, SYS_NAME = "1.3.6.1.2.1.1.1.0", "1.3.6.1.2.1.1.2.0", "1.3.6.1.2.1.1.5.0"
IF_PHYS_ADDRESS = "1.3.6.1.2.1.2.2.1.6"


def run_module(
    *args: str, env: dict[str, str] | None = None, timeout: float = 120
) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", *args],
        capture_output=True,
        text=True,
        cwd=REPO,
        timeout=timeout,
        env={**os.environ, "COLUMNS": "200", **(env or {})},
    )


def ci_rows(out: str) -> list[tuple[str, str, str]]:
    """(class, name, ip) of each row of the demo's CI table."""
    rows = []
    for line in out.splitlines():
        match = re.match(r"^\s*(linux_server|netgear|web_server|ip_address)\s+(\S+)\s+(\S+)", line)
        if match:
            rows.append((match[1], match[2], match[3]))
    return rows


# --- the demo, end to end ----------------------------------------------------------------


@pytest.mark.parametrize("embedded", ["mosquitto", "amqtt"])
def test_demo_discovers_the_sample_network_and_prints_the_cis(embedded: str) -> None:
    env = dict.fromkeys((SSH_PASSWORD_ENV, SNMP_COMMUNITY_ENV, demo.ADMIN_PASSWORD_ENV), "")
    started = time.monotonic()
    done = run_module("bridge", "demo", "--embedded", embedded, env=env)
    elapsed = time.monotonic() - started
    out = done.stdout
    assert done.returncode == 0, (out[-3000:], done.stderr[-3000:])
    assert "Traceback" not in out + done.stderr
    # Nothing on stderr: no Python warning (asyncssh's DSA one included), and no
    # insecure-default warning about the demo's own private, anonymous broker.
    assert done.stderr == "", done.stderr[-3000:]
    assert elapsed < 60, f"the demo took {elapsed:.1f} s"
    assert f"broker: {embedded} on 127.0.0.1:" in out
    assert "agent: validated: the bridge confirmed fingerprint" in out
    assert "discovery Completed" in out
    rows = set(ci_rows(out))
    assert {
        ("linux_server", "db01.demo.lan", "127.0.0.11"),
        ("linux_server", "app01.demo.lan", "127.0.0.12"),
        ("linux_server", "build01.demo.lan", "127.0.0.13"),
        ("ip_address", "127.0.0.14", "127.0.0.14"),  # its SSH refused the demo password
        ("netgear", "rtr01.demo.lan", "127.0.0.21"),
        ("netgear", "sw01.demo.lan", "127.0.0.22"),
        ("web_server", "127.0.0.31:8080", "127.0.0.31"),
        ("web_server", "127.0.0.32:8443", "127.0.0.32"),
        ("web_server", "127.0.0.33:8443", "127.0.0.33"),
    } <= rows, out
    assert len(rows) == len(ci_rows(out)), "a CI twice"
    assert "“Monitoring - Demo Lab”" in out
    assert "TLS O=midbridge demo,CN=monitor.demo.lan" in out
    assert "serial DEMO-0011-7Q2X" in out
    assert re.search(r"dashboard: http://127\.0\.0\.1:\d+/ +\(user admin, password \S+\)", out)


async def test_demo_keep_serves_the_dashboard_until_interrupted() -> None:
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "bridge", "demo", "--keep", "--embedded", "amqtt",
        cwd=REPO, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
        env={**os.environ, "COLUMNS": "160"},
    )  # fmt: skip
    assert proc.stdout is not None
    assert proc.stderr is not None
    lines: list[str] = []
    try:
        async with asyncio.timeout(60):
            while not any("--keep: everything stays up" in line for line in lines):
                raw = await proc.stdout.readline()
                assert raw, "".join(lines)
                lines.append(raw.decode())
        out = "".join(lines)
        found = re.search(
            r"dashboard: (http://127\.0\.0\.1:\d+/) +\(user admin, password (\S+)\)", out
        )
        assert found, out
        url, password = found[1], found[2]
        async with aiohttp.ClientSession() as http:
            async with http.get(url + "login") as page:
                assert page.status == 200
                assert "<form" in await page.text()
            auth = {
                "Authorization": "Basic " + base64.b64encode(f"admin:{password}".encode()).decode()
            }
            async with http.get(url + "api/now/table/cmdb_ci", headers=auth) as answer:
                assert answer.status == 200
                assert len((await answer.json())["result"]) == 9
    finally:
        if proc.returncode is None:
            proc.send_signal(signal.SIGINT)
        async with asyncio.timeout(20):
            rest, err = await proc.communicate()
    assert proc.returncode == 0, err.decode()[-2000:]
    assert "Traceback" not in rest.decode() + err.decode()


def test_demo_range_option_and_an_unreachable_broker() -> None:
    # --hosts 20 leaves the network gear and the web servers outside the range.
    done = run_module("bridge", "demo", "--embedded", "amqtt", "--hosts", "20")
    assert done.returncode == 0, (done.stdout[-3000:], done.stderr[-3000:])
    classes = {row[0] for row in ci_rows(done.stdout)}
    assert classes == {"linux_server", "ip_address"}
    assert "scanned 20/20" in done.stdout
    # A broker that is not there: one line, no traceback, exit 1 or 2.
    port = free_tcp_port()
    done = run_module("bridge", "demo", "--broker", f"127.0.0.1:{port}", timeout=60)
    assert done.returncode != 0
    assert "Traceback" not in done.stdout + done.stderr


def free_tcp_port(host: str = "127.0.0.1") -> int:
    with socket.socket() as sock:
        sock.bind((host, 0))
        port: int = sock.getsockname()[1]
        return port


# --- the sample targets --------------------------------------------------------------------


def linux(name: str) -> LinuxHost:
    host = next(t for t in NETWORK if t.name == name)
    assert isinstance(host, LinuxHost)
    return host


def test_canned_shell_answers_the_ssh_classifier() -> None:
    shell = CannedShell(linux("app01"), "discovery")
    out, err, status = shell.run(cmdb.SSH_COMMAND)
    assert status == 0
    assert err == ""
    seen = cmdb.parse_ssh("127.0.0.12", {"stdout": out}, [2222])
    assert seen is not None
    assert seen.sys_class_name == cmdb.LINUX_SERVER
    assert seen.name == "app01.demo.lan"
    assert seen.serial_number == "DEMO-0012-K8PL"
    assert seen.macs == ("02:6d:62:00:00:12", "02:6d:62:00:01:12")  # not lo's zeros
    assert seen.attributes["os"] == "Ubuntu 24.04.1 LTS"
    assert seen.attributes["kernel"] == "6.8.0-49-generic"


def test_canned_shell_knows_a_little_shell() -> None:
    shell = CannedShell(linux("db01"), "discovery")
    assert shell.run("uname -sr") == ("Linux 6.1.0-28-amd64\n", "", 0)
    assert shell.run("hostname -s; whoami") == ("db01\ndiscovery\n", "", 0)
    assert shell.run("false || echo 'a; b'") == ("a; b\n", "", 0)
    assert shell.run("true && false") == ("", "", 1)
    assert shell.run("cat /nope 2>/dev/null") == ("", "", 1)
    assert shell.run("cat /nope") == ("", "cat: /nope: No such file or directory\n", 1)
    assert shell.run("(false || hostname)") == ("db01.demo.lan\n", "", 0)
    assert shell.run("rm -rf /") == ("", "sh: 1: rm: not found\n", 127)
    out, _, status = shell.run("grep -H . /sys/class/net/*/address")
    assert status == 0
    assert out.splitlines() == [
        "/sys/class/net/eth0/address:02:6d:62:00:00:11",
        "/sys/class/net/lo/address:00:00:00:00:00:00",
    ]


@pytest.fixture
async def targets() -> AsyncIterator[RunningTargets]:
    settings = TargetSettings(
        ssh_password="pw-" + secrets.token_hex(8),
        snmp_community="c-" + secrets.token_hex(6),
        ports=Ports(ssh=free_tcp_port(), http=free_tcp_port(), https=free_tcp_port(),
                    snmp=free_tcp_port()),
    )  # fmt: skip
    async with demo_targets(settings) as running:
        yield running


async def test_ssh_targets_log_in_with_the_demo_password_only(targets: RunningTargets) -> None:
    settings, port = targets.settings, targets.ports.ssh
    async with asyncssh.connect(
        "127.0.0.11", port, username=settings.ssh_user, password=settings.ssh_password,
        known_hosts=None,
    ) as conn:  # fmt: skip
        result = await conn.run(cmdb.SSH_COMMAND)
        assert result.exit_status == 0
        seen = cmdb.parse_ssh("127.0.0.11", {"stdout": result.stdout})
        assert seen is not None
        assert seen.name == "db01.demo.lan"
        key = conn.get_server_host_key()
        assert key is not None
        assert key.get_algorithm() == "ssh-ed25519"
    for host, user, password in (
        ("127.0.0.11", settings.ssh_user, "wrong-password"),
        ("127.0.0.11", "root", settings.ssh_password),
        ("127.0.0.14", settings.ssh_user, settings.ssh_password),  # legacy01 refuses it
    ):
        with pytest.raises(asyncssh.PermissionDenied):
            async with asyncssh.connect(
                host, port, username=user, password=password, known_hosts=None
            ):
                pass


async def test_snmp_targets_answer_get_getnext_getbulk(targets: RunningTargets) -> None:
    port, community = targets.ports.snmp, targets.settings.snmp_community
    async with SnmpSession(
        addr="127.0.0.22", port=port, community=community, version=SnmpVersion.v2c, timeout=2.0
    ) as session:
        got = await session.get_many([SYS_DESCR, SYS_OBJECT_ID, SYS_NAME])
        assert got[SYS_NAME] == b"sw01.demo.lan"
        assert got[SYS_OBJECT_ID] == "1.3.6.1.4.1.8072.3.2.10"
        descr = got[SYS_DESCR]
        assert isinstance(descr, bytes)
        assert b"switch" in descr
        macs = [value async for _oid, value in session.getbulk(IF_PHYS_ADDRESS)]
        assert all(isinstance(m, bytes) for m in macs)
        assert [bytes(m).hex(":") for m in macs if isinstance(m, bytes)] == [
            f"02:6d:62:00:{i:02x}:22" for i in range(1, 9)
        ]
        walked = [oid async for oid, _value in session.getnext("1.3.6.1.2.1.2.2.1.2")]
        assert walked == [f"1.3.6.1.2.1.2.2.1.2.{i}" for i in range(1, 9)]
    # Another community: silence, as from a real agent.
    async with SnmpSession(
        addr="127.0.0.22", port=port, community="public", version=SnmpVersion.v2c, timeout=0.3
    ) as session:
        with pytest.raises(TimeoutError):
            await session.get(SYS_NAME)


async def test_web_targets_serve_a_title_and_a_server_header(targets: RunningTargets) -> None:
    ports = targets.ports
    async with aiohttp.ClientSession() as http:
        for url, title in (
            (f"http://127.0.0.31:{ports.http}/", "Demo Intranet - Home"),
            (f"https://127.0.0.32:{ports.https}/", "Monitoring - Demo Lab"),
            (f"https://127.0.0.33:{ports.https}/", "Demo Wiki"),
            (f"http://127.0.0.33:{ports.http}/", "Demo Wiki"),
        ):
            async with http.get(url, ssl=False) as response:
                assert response.status == 200
                assert response.headers["Server"] == "midbridge-demo-httpd/1.0"
                assert cmdb.html_title(await response.text()) == title
    # The HTTPS certificate is self-signed, for the site's name and address.
    loop = asyncio.get_running_loop()
    pem = await loop.run_in_executor(None, ssl.get_server_certificate, ("127.0.0.32", ports.https))
    assert "BEGIN CERTIFICATE" in pem


async def test_a_taken_port_moves_the_targets_of_its_kind_one_up() -> None:
    port = free_tcp_port("127.0.0.31")
    blocker = socket.socket()
    blocker.bind(("127.0.0.31", port))
    blocker.listen()
    try:
        settings = TargetSettings(ports=Ports(http=port), only=frozenset({"intranet"}))
        async with demo_targets(settings) as running:
            assert running.ports.http != port
            assert [item.port for item in running.listening] == [running.ports.http]
            assert any(f"port {port} is taken" in note for note in running.notes)
    finally:
        blocker.close()


def test_demo_targets_command_line() -> None:
    done = run_module("bridge.demo.targets", "--help", timeout=30)
    assert done.returncode == 0
    assert "--bind" in done.stdout
    assert "--only" in done.stdout
    done = run_module(
        "bridge.demo.targets", "--only", "nope", env={SSH_PASSWORD_ENV: "x" * 12}, timeout=30
    )
    assert done.returncode == 2
    assert "unknown target(s) nope" in done.stderr
    env = {SSH_PASSWORD_ENV: "", SNMP_COMMUNITY_ENV: "c"}
    done = run_module("bridge.demo.targets", env=env, timeout=30)
    assert done.returncode == 2
    assert SSH_PASSWORD_ENV in done.stderr


# --- the discovery loop against an instance elsewhere (compose's demo service) -------------


async def test_discover_command_runs_the_loop_against_a_running_instance(
    broker: BrokerAddress, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: Any
) -> None:
    from bridge.instance import discovery
    from bridge.instance.connector import Connector, ConnectorSettings, install, keys_for
    from bridge.instance.server import Instance, InstanceConfig

    prefix = "t" + secrets.token_hex(6)
    agent = "compose" + secrets.token_hex(3)
    admin_password = "admin-" + secrets.token_urlsafe(9)
    settings = TargetSettings(
        ssh_password="pw-" + secrets.token_hex(8),
        snmp_community="c-" + secrets.token_hex(6),
        ports=Ports(ssh=free_tcp_port(), http=free_tcp_port(), https=free_tcp_port(),
                    snmp=free_tcp_port()),
        only=frozenset({"db01", "wiki"}),
    )  # fmt: skip
    db = tmp_path / "instance" / "instance.db"
    db.parent.mkdir()
    inst = Instance(InstanceConfig(db=db, admin_password=admin_password))
    keys = keys_for(db)
    install(inst, keys)
    discovery.install(inst)
    broker_cfg = BrokerConfig(host=broker.host, port=broker.port)
    async with AsyncExitStack() as stack:
        await stack.enter_async_context(inst)
        await stack.enter_async_context(
            Connector(
                inst.store, broker_cfg, keys=keys,
                settings=ConnectorSettings(prefix=prefix, client_id=f"inst-{prefix}"),
            )
        )  # fmt: skip
        running = await stack.enter_async_context(demo_targets(settings))
        config = Config(
            broker=broker_cfg,
            bridge=BridgeSection(agent=agent, topic_prefix=prefix, state_dir=tmp_path / "bridge"),
            limits=LimitsConfig(drain_timeout=1.0),
            security=SecurityConfig(require_validation=True),
        )
        await stack.enter_async_context(Bridge(config, REGISTRY))
        monkeypatch.setenv(demo.ADMIN_PASSWORD_ENV, admin_password)
        monkeypatch.setenv(SSH_PASSWORD_ENV, settings.ssh_password)
        monkeypatch.setenv(SNMP_COMMUNITY_ENV, settings.snmp_community)
        monkeypatch.setenv("COLUMNS", "160")
        ports = running.ports
        args = demo._parser().parse_args(
            [
                "discover", "--url", inst.url, "--agent", agent, "--ranges",
                "127.0.0.10-127.0.0.34", "--wait", "20", "--timeout", "60",
                "--ssh-port", str(ports.ssh), "--http-port", str(ports.http),
                "--https-port", str(ports.https), "--snmp-port", str(ports.snmp),
            ]
        )  # fmt: skip
        code = await demo._discover_remote(args)
        out = capsys.readouterr().out
        assert code == 0, out
        assert set(ci_rows(out)) == {
            ("linux_server", "db01.demo.lan", "127.0.0.11"),
            ("web_server", f"127.0.0.33:{ports.https}", "127.0.0.33"),
        }, out
        agent_row = await inst.store.query("ecc_agent", f"name={agent}")
        assert agent_row[0]["validated"] is True
        # The secrets are sealed at rest: the database never holds them in clear.
        await asyncio.sleep(0)
    raw = db.read_bytes() + b"".join(p.read_bytes() for p in db.parent.glob("*-wal"))
    assert settings.ssh_password.encode() not in raw
    assert settings.snmp_community.encode() not in raw


def test_discover_command_needs_its_secrets_from_the_environment() -> None:
    env = {demo.ADMIN_PASSWORD_ENV: "", SSH_PASSWORD_ENV: "", SNMP_COMMUNITY_ENV: ""}
    done = run_module(
        "bridge.demo", "discover", "--url", "http://127.0.0.1:9", "--agent", "a", "--ranges",
        "127.0.0.1", env=env, timeout=30,
    )  # fmt: skip
    assert done.returncode == 2
    assert done.stderr.startswith("midbridge: error: set "), done.stderr
    assert f"${demo.ADMIN_PASSWORD_ENV}" in done.stderr
    assert "Traceback" not in done.stdout + done.stderr
