"""The command line as an operator meets it (issue 17): one-line errors with exit status 2
and no traceback, ``config check`` / ``config defaults``, global flags after the
subcommand, ``sweep`` failing fast and ``sweep --json``. Real processes throughout."""

from __future__ import annotations

import asyncio
import json
import os
import socket
import subprocess
import sys
import time
import tomllib
from pathlib import Path

from bridge.agent.config import Config, config_from_mapping
from bridge.demo.broker import free_port
from tests.brokers import BrokerAddress
from tests.harness import REPO, BridgeProcess, make_config

PREFIX = "midbridge: error: "


def midbridge(
    *args: str, env: dict[str, str] | None = None, timeout: float = 60
) -> subprocess.CompletedProcess[str]:
    base = {k: v for k, v in os.environ.items() if not k.startswith("MIDBRIDGE_")}
    return subprocess.run(
        [sys.executable, "-m", "bridge", *args],
        capture_output=True,
        text=True,
        cwd=REPO,
        timeout=timeout,
        stdin=subprocess.DEVNULL,
        env={**base, "COLUMNS": "120", **(env or {})},
    )


def one_line_error(done: subprocess.CompletedProcess[str]) -> str:
    """The one line a user error prints; exit status 2, nothing else on stderr."""
    assert done.returncode == 2, (done.returncode, done.stderr)
    assert "Traceback" not in done.stderr
    lines = done.stderr.splitlines()
    assert len(lines) == 1, done.stderr
    assert lines[0].startswith(PREFIX), lines[0]
    return lines[0][len(PREFIX) :]


def test_run_with_a_directory_as_config(tmp_path: Path) -> None:
    cause = one_line_error(midbridge("run", "-c", str(tmp_path)))
    assert cause == f"configuration error: {tmp_path}: is a directory, not a TOML file"


def test_run_with_the_metrics_port_in_use(tmp_path: Path) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        env = {
            "MIDBRIDGE_METRICS_PORT": str(port),
            # No broker there: the port is bound first, so the start stops before it.
            "MIDBRIDGE_BROKER__PORT": str(free_port("127.0.0.1")),
            "MIDBRIDGE_BRIDGE__STATE_DIR": str(tmp_path / "state"),
        }
        cause = one_line_error(midbridge("run", env=env))
    assert cause.startswith(f"metrics_port: cannot serve on 127.0.0.1:{port}: "), cause
    assert "in use" in cause


def test_instance_agent_list_without_a_password_or_a_terminal() -> None:
    cause = one_line_error(midbridge("instance", "agent", "list", "--url", "http://127.0.0.1:9"))
    assert cause == "no password for admin: set $MIDBRIDGE_ADMIN_PASSWORD (no terminal)"


def test_usage_errors_are_one_line() -> None:
    cause = one_line_error(midbridge("run", "--wait-for-broker", "soon"))
    assert cause == (
        "argument --wait-for-broker: not a number of seconds: 'soon' (midbridge run --help)"
    )
    assert one_line_error(midbridge("nosuch")).startswith("argument command: invalid choice")
    assert "--log-level" in one_line_error(midbridge("config", "defaults", "--log-level", "loud"))


def test_global_flags_before_or_after_the_subcommand(tmp_path: Path) -> None:
    for args in (
        ("--log-level", "debug", "config", "defaults"),
        ("config", "defaults", "--log-level", "debug", "--log-format", "json"),
        ("config", "--log-level", "trace", "defaults"),
    ):
        done = midbridge(*args)
        assert done.returncode == 0, (args, done.stderr)
        assert "[broker]" in done.stdout
    # Taken by `run` too, and applied: JSON lines at debug.
    env = {
        "MIDBRIDGE_BROKER__PORT": str(free_port("127.0.0.1")),
        "MIDBRIDGE_BRIDGE__STATE_DIR": str(tmp_path / "state"),
    }
    done = midbridge(
        "run", "--log-level", "debug", "--log-format", "json", "--wait-for-broker", "0", env=env
    )
    assert done.returncode == 2
    *logs, last = done.stderr.splitlines()
    assert last.startswith(PREFIX + "refused: ")
    assert logs
    assert all(json.loads(line)["level"] in ("debug", "info", "warning") for line in logs)


def test_config_defaults_is_the_default_config() -> None:
    done = midbridge("config", "defaults")
    assert done.returncode == 0, done.stderr
    assert config_from_mapping(tomllib.loads(done.stdout)) == Config()


def test_config_check_names_every_problem_and_the_variables(tmp_path: Path) -> None:
    path = tmp_path / "bad.toml"
    path.write_text(
        "[broker]\nport = 70000\n[limits]\nper_host = 0\n[probes.settings.SNMP]\nretires = 2\n"
    )
    done = midbridge("config", "check", str(path), env={"MIDBRIDGE_BRIDGE__AGENT": "has space"})
    assert done.returncode == 2
    assert "Traceback" not in done.stderr
    lines = done.stderr.splitlines()
    assert all(line.startswith(PREFIX) for line in lines), lines
    assert len(lines) == 3, lines
    text = done.stderr
    assert "broker.port: " in text
    assert "limits.per_host: " in text
    assert "bridge.agent (environment variable MIDBRIDGE_BRIDGE__AGENT): " in text
    # Once those are right, the probes' settings tables are checked too.
    path.write_text(
        "[probes.settings.SNMP]\nretires = 2\n[probes.settings.RESTProbe]\ntiemout = 1\n"
    )
    done = midbridge("config", "check", str(path))
    assert done.returncode == 2
    assert "probes.settings.SNMP.retires: " in done.stderr
    assert "probes.settings.RESTProbe.tiemout: " in done.stderr
    path.write_text("[broker]\nport = 1884\n")
    done = midbridge("config", "check", str(path))
    assert (done.returncode, done.stdout, done.stderr) == (0, f"{path}: ok\n", "")
    assert one_line_error(midbridge("config", "check", str(tmp_path / "nope.toml"))) == (
        f"{tmp_path / 'nope.toml'}: file not found"
    )


def test_sweep_fails_fast_when_no_bridge_answers(broker: BrokerAddress) -> None:
    started = time.monotonic()
    done = midbridge(
        "sweep", "127.0.0.1", "--broker", f"{broker.host}:{broker.port}", "--agent", "nobody-here"
    )
    assert time.monotonic() - started < 20
    cause = one_line_error(done)
    assert cause.startswith("no bridge with agent name 'nobody-here' answers: no status record"), (
        cause
    )
    assert done.stdout == ""


async def test_sweep_json_and_a_stopped_bridge(
    broker: BrokerAddress, unique_agent: str, tmp_path: Path
) -> None:
    config = make_config(broker.host, broker.port, unique_agent, tmp_path / "state")
    bridge = BridgeProcess(config, tmp_path / "bridge.log")
    bridge.start()
    server = await asyncio.start_server(lambda r, w: w.close(), "127.0.0.3", 0)
    port = server.sockets[0].getsockname()[1]
    args = (
        "sweep", "127.0.0.2-127.0.0.4", "--ports", str(port), "--json",
        "--broker", f"{broker.host}:{broker.port}", "--agent", unique_agent,
    )  # fmt: skip
    try:
        done = await asyncio.to_thread(midbridge, *args)
    finally:
        server.close()
        assert bridge.stop() == 0
    assert done.returncode == 0, done.stderr
    result = json.loads(done.stdout)
    assert result["ok"] is True
    assert result["error"] is None
    assert result["agent"] == f"mid.server.{unique_agent}"
    assert [h["ip"] for h in result["hosts"]] == ["127.0.0.2", "127.0.0.3", "127.0.0.4"]
    [open_host] = [h for h in result["hosts"] if h["open"]]
    assert open_host["ip"] == "127.0.0.3"
    assert result["totals"]["addresses"] == 3
    # Stopped: its retained status says Down, and the sweep says so at once.
    done = await asyncio.to_thread(midbridge, *args)
    cause = one_line_error(done)
    assert cause.startswith(f"the bridge {unique_agent!r} is Down"), cause
