"""The command line: run with bad config, sweep, instance (the demo: tests/test_demo.py)."""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
from pathlib import Path

import pytest

from tests.brokers import BrokerAddress
from tests.harness import REPO, BridgeProcess, make_config


def midbridge(
    *args: str, env: dict[str, str] | None = None, timeout: float = 120
) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "bridge", *args],
        capture_output=True,
        text=True,
        cwd=REPO,
        timeout=timeout,
        env={**os.environ, "COLUMNS": "120", **(env or {})},
    )


def test_run_refuses_unknown_config_key(tmp_path: Path) -> None:
    config = tmp_path / "bad.toml"
    config.write_text("[broker]\nhots = 'x'\n")
    done = midbridge("run", "--config", str(config), timeout=30)
    assert done.returncode == 2
    assert "broker.hots: unknown key" in done.stderr
    assert "Traceback" not in done.stderr


def test_run_names_a_refused_broker(tmp_path: Path) -> None:
    env = {"MIDBRIDGE_BROKER__PORT": "1", "MIDBRIDGE_BRIDGE__STATE_DIR": str(tmp_path)}
    done = midbridge("run", "--wait-for-broker", "0", env=env, timeout=30)
    assert done.returncode == 2
    assert done.stderr.splitlines()[-1] == (
        "midbridge: error: refused: broker: the broker at 127.0.0.1:1 refused the TCP "
        "connection (nothing listens there?)"
    )
    assert "Traceback" not in done.stderr


async def test_sweep_command_against_a_running_bridge(
    broker: BrokerAddress, unique_agent: str, tmp_path: Path
) -> None:
    config = make_config(broker.host, broker.port, unique_agent, tmp_path / "state")
    bridge = BridgeProcess(config, tmp_path / "bridge.log")
    bridge.start()
    server = await asyncio.start_server(lambda r, w: w.close(), "127.0.0.3", 0)
    port = server.sockets[0].getsockname()[1]
    try:
        proc = await asyncio.create_subprocess_exec(
            sys.executable,
            "-m",
            "bridge",
            "sweep",
            "127.0.0.1-127.0.0.5",
            "--ports",
            str(port),
            "--broker",
            f"{broker.host}:{broker.port}",
            "--agent",
            unique_agent,
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.PIPE,
            cwd=REPO,
            env={**os.environ, "COLUMNS": "120"},
        )
        out, err = await asyncio.wait_for(proc.communicate(), timeout=60)
    finally:
        server.close()
        bridge.stop()
    assert proc.returncode == 0, err.decode()[-2000:]
    text = out.decode()
    assert "127.0.0.3" in text
    assert f"{port}/" in text
    assert "5 addresses, 5 alive, 1 open ports" in text


def start_instance(
    broker: BrokerAddress, tmp_path: Path, env: dict[str, str]
) -> tuple[subprocess.Popen[str], str, list[str]]:
    """``midbridge instance`` with its connector: the process, its URL, what it printed."""
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "bridge",
            "instance",
            "--port",
            "0",
            "--db",
            str(tmp_path / "i.db"),
            "--broker",
            f"{broker.host}:{broker.port}",
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        cwd=REPO,
        env=env,
    )
    assert proc.stdout is not None
    url = ""
    lines: list[str] = []
    for _ in range(10):
        line = proc.stdout.readline()
        lines.append(line)
        if line.startswith("midbridge instance on "):
            url = line.split()[3]
        if line.startswith("connector:"):
            break
    assert url.startswith("http://127.0.0.1:"), lines
    return proc, url, lines


def test_instance_serves_with_its_connector(broker: BrokerAddress, tmp_path: Path) -> None:
    env = {**os.environ, "MIDBRIDGE_ADMIN_PASSWORD": "admin-pass-123"}
    proc, _url, lines = start_instance(broker, tmp_path, env)
    try:
        assert any("platform signing key" in line for line in lines)
        assert any(line.startswith("connector: ECC queue on mqtt://") for line in lines), lines
    finally:
        proc.terminate()
        _out, err = proc.communicate(timeout=20)
    assert proc.returncode == 0, err[-2000:]
    assert "Traceback" not in err


async def test_instance_agent_actions_from_the_command_line(
    broker: BrokerAddress, unique_agent: str, tmp_path: Path
) -> None:
    from tests.harness import bridge_and_client

    env = {**os.environ, "MIDBRIDGE_ADMIN_PASSWORD": "admin-pass-123"}
    proc, url, _lines = start_instance(broker, tmp_path, env)
    try:
        config = make_config(
            broker.host,
            broker.port,
            unique_agent,
            tmp_path / "state",
            security={"require_validation": True},
        )

        async def cli(*args: str) -> tuple[int, str, str]:
            sub = await asyncio.create_subprocess_exec(
                sys.executable,
                "-m",
                "bridge",
                "instance",
                "agent",
                *args,
                "--url",
                url,
                stdout=asyncio.subprocess.PIPE,
                stderr=asyncio.subprocess.PIPE,
                cwd=REPO,
                env=env,
            )
            out, err = await asyncio.wait_for(sub.communicate(), timeout=30)
            return sub.returncode or 0, out.decode(), err.decode()

        async with bridge_and_client(config) as (bridge, _client):
            deadline = asyncio.get_running_loop().time() + 15
            listed = ""
            while unique_agent not in listed and asyncio.get_running_loop().time() < deadline:
                _rc, listed, _err = await cli("list")
                await asyncio.sleep(0.2)
            assert unique_agent in listed
            rc, _out, err = await cli("validate", unique_agent)
            assert rc == 0, err
            while not bridge.identity.validated and asyncio.get_running_loop().time() < deadline:
                await asyncio.sleep(0.05)
            assert bridge.identity.validated
            rc, _out, err = await cli("pause", "no-such-agent")
            assert rc == 2
            assert "HTTP 404" in err
            assert "Traceback" not in err
            sub = await asyncio.create_subprocess_exec(
                sys.executable,
                "-m",
                "bridge",
                "instance",
                "discovery",
                "run",
                "no-such",
                "--url",
                url,
                stdout=asyncio.subprocess.PIPE,
                stderr=asyncio.subprocess.PIPE,
                cwd=REPO,
                env=env,
            )
            _o, e = await asyncio.wait_for(sub.communicate(), timeout=30)
            assert sub.returncode == 2
            assert "HTTP 404" in e.decode()
    finally:
        proc.terminate()
        proc.communicate(timeout=20)


@pytest.mark.parametrize(
    ("table", "key"),
    [("RESTProbe", "tiemout = 3"), ("SNMP", "retires = 2"), ("SSHCommand", "max_channels = 0")],
)
def test_run_refuses_a_bad_probe_setting_before_the_broker(
    tmp_path: Path, table: str, key: str
) -> None:
    config = tmp_path / "bad.toml"
    config.write_text(f"[broker]\nport = 1\n\n[probes.settings.{table}]\n{key}\n")
    env = {"MIDBRIDGE_BRIDGE__STATE_DIR": str(tmp_path / "state")}
    done = midbridge("run", "--config", str(config), env=env, timeout=30)
    assert done.returncode == 2
    name = key.split(" = ")[0]
    assert f"probes.settings.{table}.{name}:" in done.stderr
    assert "cannot reach the broker" not in done.stderr  # checked before connecting
    assert "Traceback" not in done.stderr


def test_run_refuses_settings_for_an_unknown_probe(tmp_path: Path) -> None:
    config = tmp_path / "bad.toml"
    config.write_text("[broker]\nport = 1\n\n[probes.settings.RESTProbes]\ntimeout = 3\n")
    env = {"MIDBRIDGE_BRIDGE__STATE_DIR": str(tmp_path / "state")}
    done = midbridge("run", "--config", str(config), env=env, timeout=30)
    assert done.returncode == 2
    assert "probes.settings.RESTProbes: no probe has this topic" in done.stderr
