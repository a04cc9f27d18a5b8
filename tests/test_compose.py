"""compose/: the files parse and agree with each other (no Docker engine runs here)."""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import io
import ipaddress
import os
import re
import socket
import subprocess
import sys
import urllib.request
from pathlib import Path
from typing import Any

import orjson
import yaml

from bridge import cli
from bridge.agent.config import Config, load_config
from bridge.demo import loop as demo
from bridge.demo import targets as demo_targets
from bridge.demo.targets import SNMP_COMMUNITY_ENV, SSH_PASSWORD_ENV
from bridge.demo.targets import cli as targets_cli
from bridge.instance import cli as instance_cli
from bridge.instance import health
from bridge.wire.targets import parse_targets
from tests.brokers import MosquittoServer

REPO = Path(__file__).resolve().parent.parent
COMPOSE = REPO / "compose"
THIRD_PARTY = {"mosquitto", "prometheus"}  # services not built from compose/Dockerfile
INSTRUCTIONS = {
    "FROM",
    "RUN",
    "CMD",
    "LABEL",
    "EXPOSE",
    "ENV",
    "ADD",
    "COPY",
    "ENTRYPOINT",
    "VOLUME",
    "USER",
    "WORKDIR",
    "ARG",
    "ONBUILD",
    "STOPSIGNAL",
    "HEALTHCHECK",
    "SHELL",
}


def compose() -> dict[str, Any]:
    data = yaml.safe_load((COMPOSE / "docker-compose.yml").read_text())
    assert isinstance(data, dict)
    return data


def test_compose_services_and_mounts_exist() -> None:
    data = compose()
    services = data["services"]
    assert {"mosquitto", "instance", "bridge", "demo"} <= set(services)
    assert [name for name in services if name.startswith("target-")]
    bridge = services["bridge"]
    for name, service in services.items():
        if name in THIRD_PARTY:
            continue
        # One image, built from compose/Dockerfile, for every midbridge service.
        assert service["build"]["dockerfile"] == "compose/Dockerfile", name
        assert (COMPOSE / service["build"]["context"] / service["build"]["dockerfile"]).is_file()
        assert service["image"] == bridge["image"], name
    for name, service in services.items():
        for volume in service.get("volumes", []):
            source = volume.split(":")[0]
            if source.startswith("./"):
                assert (COMPOSE / source).exists(), source
            else:
                assert source in data["volumes"], f"{name}: volume {source} is not declared"
        networks = service.get("networks", [])
        for network in networks if isinstance(networks, list) else list(networks):
            assert network in data["networks"], f"{name}: network {network} is not declared"
    assert bridge["depends_on"]["mosquitto"]["condition"] == "service_healthy"
    assert bridge["environment"]["MIDBRIDGE_BROKER__HOST"] == "mosquitto"


def test_mounted_bridge_config_is_valid() -> None:
    config = load_config(COMPOSE / "midbridge.toml", environ={})
    assert config.broker.host == "mosquitto"
    assert str(config.bridge.state_dir) == "/var/lib/midbridge"


def test_mosquitto_config_raises_the_limits_the_bridge_needs() -> None:
    lines = dict(
        line.split(None, 1)
        for line in (COMPOSE / "mosquitto.conf").read_text().splitlines()
        if line.strip() and not line.startswith("#")
    )
    assert int(lines["max_queued_messages"]) >= 100_000
    assert lines["set_tcp_nodelay"].strip() == "true"
    assert lines["persistence"].strip() == "true"


def test_dockerfile_lints() -> None:
    text = (COMPOSE / "Dockerfile").read_text()
    lines = [ln for ln in text.splitlines() if ln.strip() and not ln.lstrip().startswith("#")]
    joined: list[str] = []  # continuation lines (ending in a backslash) joined
    for line in lines:
        if joined and joined[-1].endswith("\\"):
            joined[-1] = joined[-1][:-1].rstrip() + " " + line.strip()
        else:
            joined.append(line.strip())
    lines = joined
    for line in lines:
        word = line.split()[0]
        assert word in INSTRUCTIONS, f"unknown instruction {word!r}"
    froms = [ln for ln in lines if ln.startswith("FROM")]
    assert froms
    assert all(re.match(r"FROM \S+:\S+", ln) for ln in froms), "pin base images"
    for line in lines:
        if line.startswith("COPY") and "--from" not in line:
            for source in line.split()[1:-1]:
                assert (REPO / source).exists(), f"COPY source {source} missing"
    users = [ln for ln in lines if ln.startswith("USER")]
    assert users
    assert users[-1].split()[1] != "root", "the image must not run as root"
    assert any(ln.startswith("CMD") and "midbridge" in ln for ln in lines)
    # Base images: a patch release of the locked interpreter on a named Debian release, or
    # a digest (the Dockerfile says why none is written); never a floating tag.
    python = re.search(r"Python (\d+\.\d+\.\d+)", (REPO / "constraints.txt").read_text())
    assert python
    for line in froms:
        image = line.split()[1]
        assert re.fullmatch(
            rf"python:{re.escape(python[1])}-slim-bookworm(@sha256:[0-9a-f]{{64}})?", image
        ), f"{image}: pin the locked Python's patch release (constraints.txt: {python[1]})"
    # pip itself pinned; OCI labels; the benchmarks left out.
    assert re.search(r"pip install [^\n]*pip==\d+\.\d+", text)
    for label in ("title", "description", "version", "revision", "licenses", "base.name"):
        assert f"org.opencontainers.image.{label}=" in text, label
    assert "rm -rf bridge/bench" in text
    # HEALTHCHECK: liveness (/livez on the bridge's metrics port), never readiness.
    [check] = [ln for ln in text.splitlines() if ln.strip().startswith('CMD ["python"')]
    assert "/livez" in check
    assert "/readyz" not in check
    # The image's defaults for the bridge's metrics port.
    env = dict(re.findall(r"(MIDBRIDGE_METRICS_(?:HOST|PORT))=(\S+)", text))
    assert env == {"MIDBRIDGE_METRICS_HOST": "0.0.0.0", "MIDBRIDGE_METRICS_PORT": "9108"}
    assert "'9108'" in check
    assert re.search(r"^EXPOSE 8080 9108$", text, re.M)


# --- the secure variant: docker-compose.secure.yml over docker-compose.yml -----------------


def secure_overlay() -> dict[str, Any]:
    data = yaml.safe_load((COMPOSE / "docker-compose.secure.yml").read_text())
    assert isinstance(data, dict)
    return data


def mosquitto_listeners(path: Path) -> tuple[dict[str, str], list[dict[str, str]]]:
    """(global options, one dict of options per listener, with its ``listener`` value)."""
    head: dict[str, str] = {}
    listeners: list[dict[str, str]] = []
    for line in path.read_text().splitlines():
        if not line.strip() or line.startswith("#"):
            continue
        key, _, value = line.partition(" ")
        if key == "listener":
            listeners.append({"listener": value.strip()})
        elif listeners and key in {"allow_anonymous", "password_file", "acl_file"}:
            listeners[-1][key] = value.strip()
        else:
            head[key] = value.strip()
    return head, listeners


def mounts(service: dict[str, Any]) -> dict[str, str]:
    """Container path → source (relative to compose/) of a service's bind mounts."""
    found = {}
    for volume in service.get("volumes", []):
        source, target = volume.split(":")[:2]
        found[target] = source
    return found


def test_secure_overlay_replaces_the_broker_config_and_mounts_what_it_names() -> None:
    base = compose()["services"]
    overlay = secure_overlay()["services"]
    assert set(overlay) <= set(base)
    broker = mounts(overlay["mosquitto"])
    # Compose merges volumes by container path: the same target replaces the open config.
    assert broker["/mosquitto/config/mosquitto.conf"] == "./mosquitto-secure.conf"
    assert mounts(base["mosquitto"])["/mosquitto/config/mosquitto.conf"] == "./mosquitto.conf"
    for source in broker.values():
        assert (COMPOSE / source).exists(), source
    head, listeners = mosquitto_listeners(COMPOSE / "mosquitto-secure.conf")
    assert head["per_listener_settings"] == "true"  # else allow_anonymous is one for all
    mqtt, health = listeners
    assert mqtt["listener"] == "1883 0.0.0.0"
    assert mqtt["allow_anonymous"] == "false"
    for key in ("password_file", "acl_file"):
        directory = str(Path(mqtt[key]).parent)
        assert broker[directory] == "./mosquitto/auth", f"{key} {mqtt[key]} is not mounted"
    # The anonymous listener is the health check's: loopback only, its own ACL, mounted.
    assert health["listener"].endswith(" 127.0.0.1")
    assert (COMPOSE / broker[health["acl_file"]]).read_text().count("topic ") == 1
    check = overlay["mosquitto"]["healthcheck"]["test"]
    assert check[check.index("-p") + 1] == health["listener"].split()[0]
    assert check[check.index("-h") + 1] == "127.0.0.1"
    # The raised limits of the open config hold here too.
    open_head, _ = mosquitto_listeners(COMPOSE / "mosquitto.conf")
    for key in ("max_queued_messages", "max_queued_bytes", "max_inflight_messages", "persistence"):
        assert head[key] == open_head[key], key


def test_secure_overlay_logs_the_bridge_in_as_its_mid_user() -> None:
    env = secure_overlay()["services"]["bridge"]["environment"]
    agent = load_config(COMPOSE / "midbridge.toml", environ={}).bridge.agent
    # make-mid-user.sh's default user name for an agent.
    assert env["MIDBRIDGE_BROKER__USERNAME"] == f"mid.user.{agent}"
    # The password comes from the environment, never from the file.
    assert re.fullmatch(r"\$\{MID_PASSWORD:\?[^}]+\}", env["MIDBRIDGE_BROKER__PASSWORD"])


def test_make_mid_user_script_and_templates_are_in_place() -> None:
    script = COMPOSE / "make-mid-user.sh"
    assert script.read_text().startswith("#!/bin/sh\n")
    assert script.stat().st_mode & 0o111, "make-mid-user.sh must be executable"
    for name in ("mid.acl.template", "platform.acl.template"):
        text = (COMPOSE / "mosquitto" / name).read_text()
        rules = [ln for ln in text.splitlines() if ln.startswith(("topic", "pattern"))]
        assert rules, name
        # Only topic lines, each naming the prefix and a direction: no `pattern` (it would
        # apply to every user) and no readwrite.
        assert all(re.fullmatch(r"topic (read|write) @PREFIX@/\S+", ln) for ln in rules), rules
    ignored = (COMPOSE / "mosquitto" / "auth" / ".gitignore").read_text().split()
    assert "*" in ignored, "the password file must not be committed"


# --- the demo loop: instance, bridge, targets, demo -----------------------------------------


def interpolate(value: str, environ: dict[str, str] | None = None) -> str:
    """Compose's ``${VAR:-default}`` / ``${VAR:?message}`` / ``$$``, as ``docker compose``
    would with ``environ`` (a required variable missing: a stand-in value)."""
    environ = environ or {}

    def one(match: re.Match[str]) -> str:
        name, op, arg = match[1], match[2], match[3]
        if environ.get(name):
            return environ[name]
        if op == ":-":
            return arg
        assert op == ":?", f"${{{name}}} needs a default or a message"
        return f"<{name}>"

    return re.sub(r"\$\{(\w+)(:-|:\?)([^}]*)\}", one, value).replace("$$", "$")


def service_env(service: dict[str, Any]) -> dict[str, str]:
    env = service.get("environment", {})
    assert isinstance(env, dict), "environment as a mapping"
    return {key: interpolate(str(value)) for key, value in env.items()}


def parse(parser: argparse.ArgumentParser, argv: list[str]) -> argparse.Namespace:
    """Parse like the real command line does; a bad option fails the test with argparse's
    own message instead of exiting."""
    errors = io.StringIO()
    try:
        with contextlib.redirect_stderr(errors):
            return parser.parse_args(argv)
    except SystemExit:
        raise AssertionError(f"{argv}: {errors.getvalue().strip()}") from None


def midbridge_args(command: list[str]) -> argparse.Namespace:
    assert command[0] == "midbridge", command
    return parse(cli._parser(), command[1:])


def python_module_args(command: list[str], module: str) -> list[str]:
    assert command[:3] == ["python", "-m", module], command
    return command[3:]


def mounts_of(service: dict[str, Any]) -> dict[str, str]:
    return {v.split(":")[1]: v.split(":")[0] for v in service.get("volumes", [])}


def under_mount(service: dict[str, Any], path: str) -> bool:
    return any(path.startswith(target.rstrip("/") + "/") for target in mounts_of(service))


def services() -> dict[str, Any]:
    found: dict[str, Any] = compose()["services"]
    return found


IMAGE_ENV = {
    "MIDBRIDGE_BRIDGE__STATE_DIR": "/var/lib/midbridge",
    "MIDBRIDGE_METRICS_HOST": "0.0.0.0",
    "MIDBRIDGE_METRICS_PORT": "9108",
}  # compose/Dockerfile's ENV (test_dockerfile_lints checks it)


def bridge_config() -> Config:
    """compose/midbridge.toml with the bridge service's environment (and the image's)."""
    bridge = services()["bridge"]
    env = {**IMAGE_ENV, **service_env(bridge)}
    return load_config(COMPOSE / "midbridge.toml", environ=env)


def test_prometheus_scrapes_what_the_services_serve_and_alerts_name_real_series() -> None:
    every = services()
    prometheus = every["prometheus"]
    assert prometheus["profiles"] == ["monitoring"]
    assert re.fullmatch(r"prom/prometheus:v\d+\.\d+\.\d+", prometheus["image"])
    config = yaml.safe_load((COMPOSE / "prometheus" / "prometheus.yml").read_text())
    targets = {
        job["job_name"]: (job["metrics_path"], job["static_configs"][0]["targets"])
        for job in config["scrape_configs"]
    }
    instance_port = midbridge_args(every["instance"]["command"]).port
    assert targets["midbridge-instance"] == ("/metrics", [f"instance:{instance_port}"])
    assert targets["midbridge-bridge"] == ("/metrics", [f"bridge:{bridge_config().metrics_port}"])
    [rules_file] = config["rule_files"]
    assert mounts_of(prometheus)[rules_file] == "./prometheus/alerts.yml"
    rules = yaml.safe_load((COMPOSE / "prometheus" / "alerts.yml").read_text())
    exprs = [r["expr"] for g in rules["groups"] for r in g["rules"]]
    assert len(exprs) >= 10
    dashboard = orjson.loads((COMPOSE / "grafana" / "midbridge-dashboard.json").read_bytes())
    exprs += [t["expr"] for p in dashboard["panels"] for t in p["targets"]]
    known = known_series()
    for expr in exprs:
        for name in re.findall(r"\b((?:midbridge|process)_[a-z_]+)", expr):
            assert name in known, f"{name} (in {expr!r}) is not a series midbridge serves"


def known_series() -> set[str]:
    """Every series name the instance serves (its registry) and the bridge declares."""
    from bridge.instance.metrics import InstanceMetrics
    from bridge.instance.sqlite_store import SQLiteStore

    names: set[str] = set()
    registry = InstanceMetrics(SQLiteStore(":memory:")).registry
    for family in registry.collect():  # labelled series have no sample before their first
        names.update(family.name + end for end in ("", "_total", "_bucket", "_count", "_sum"))
        names.update(sample.name for sample in family.samples)
    names.update({"midbridge_instance_connector_records_total",
                  "midbridge_instance_connector_connected"})  # fmt: skip
    source = "".join(p.read_text() for p in (REPO / "bridge" / "agent").glob("*.py"))
    for base in re.findall(r'"(midbridge_[a-z_]+)"', source):
        names.update({base, base + "_total", base + "_info", base + "_bucket"})
    return names


def test_instance_service_runs_the_instance_with_its_connector_on_the_broker() -> None:
    instance = services()["instance"]
    args = midbridge_args(instance["command"])
    assert args.command == "instance"
    assert args.instance_command is None  # serve
    assert args.host == "0.0.0.0"
    assert f"127.0.0.1:{args.port}:{args.port}" in instance["ports"]
    assert under_mount(instance, str(args.db)), "the database must live on a volume"
    broker, prefix = instance_cli._broker(args) or (None, None)
    assert broker is not None, "the instance needs --broker for its connector"
    assert (broker.host, broker.port) == ("mosquitto", 1883)
    assert "listener 1883 0.0.0.0" in (COMPOSE / "mosquitto.conf").read_text()
    assert prefix == bridge_config().bridge.topic_prefix
    assert instance["depends_on"]["mosquitto"]["condition"] == "service_healthy"
    # The admin password comes from the environment, never from the file.
    raw = instance["environment"][instance_cli.ADMIN_PASS_ENV]
    assert re.fullmatch(r"\$\{MIDBRIDGE_ADMIN_PASSWORD:\?[^}]+\}", raw)
    # Its health check asks readiness, a route the instance serves without credentials.
    check = " ".join(instance["healthcheck"]["test"])
    assert f"http://127.0.0.1:{args.port}{health.READY_ROUTE}" in check


def test_bridge_service_runs_the_bridge_that_waits_for_validation() -> None:
    bridge = services()["bridge"]
    run = midbridge_args(bridge["command"])
    assert run.command == "run"
    assert mounts_of(bridge)[str(run.config)] == "./midbridge.toml"
    env = service_env(bridge)
    # No secret of the demo: the instance seals credentials per job to the validated bridge.
    assert SSH_PASSWORD_ENV not in env
    assert SNMP_COMMUNITY_ENV not in env
    config = bridge_config()  # every MIDBRIDGE_* variable of the service is a valid key
    assert config.security.require_validation
    # Its metrics port: reachable by Prometheus on the network, published on loopback, and
    # the health check asks its liveness there.
    assert config.metrics_host == "0.0.0.0"
    assert f"127.0.0.1:{config.metrics_port}:{config.metrics_port}" in bridge["ports"]
    check = " ".join(bridge["healthcheck"]["test"])
    assert f"http://127.0.0.1:{config.metrics_port}/livez" in check
    for name in ("demo", *target_services()):
        assert services()[name]["healthcheck"] == {"disable": True}, name
    assert config.bridge.credentials_file is None
    assert under_mount(bridge, str(config.bridge.state_dir) + "/x")


def target_services() -> dict[str, dict[str, Any]]:
    return {n: s for n, s in services().items() if n.startswith("target-")}


def test_target_services_serve_every_kind_of_sample_target_on_the_demo_network() -> None:
    data = compose()
    [subnet] = [
        ipaddress.ip_network(c["subnet"]) for c in data["networks"]["demo"]["ipam"]["config"]
    ]
    kinds: set[str] = set()
    addresses = []
    for name, service in target_services().items():
        args = parse(
            targets_cli.command_parser(),
            python_module_args(service["command"], "bridge.demo.targets"),
        )
        assert args.bind == "0.0.0.0"
        only = args.only.split(",")
        assert set(only) <= set(demo_targets.TARGET_NAMES), name
        assert len(only) == 1, f"{name}: one target per container (one address each)"
        [target] = [t for t in demo_targets.NETWORK if t.name == only[0]]
        kinds.add(demo_targets.kind_of(target))
        address = ipaddress.ip_address(service["networks"]["demo"]["ipv4_address"])
        assert address in subnet, name
        addresses.append(address)
        env = service_env(service)
        assert env[SSH_PASSWORD_ENV]
        assert env[SNMP_COMMUNITY_ENV]
    assert kinds == {"linux", "snmp", "web"}
    assert len(set(addresses)) == len(addresses)
    names = {
        a
        for s in target_services().values()
        for a in s["command"]
        if a in demo_targets.TARGET_NAMES
    }
    # One Linux host that discovery cannot log in to: recorded as an IP address.
    assert any(
        isinstance(t, demo_targets.LinuxHost) and not t.accepts_demo_password
        for t in demo_targets.NETWORK
        if t.name in names
    )


def test_demo_service_discovers_the_targets_through_the_instance() -> None:
    every = services()
    service = every["demo"]
    args = parse(demo._parser(), python_module_args(service["command"], "bridge.demo"))
    assert args.command == "discover"
    instance_args = midbridge_args(every["instance"]["command"])
    assert args.url == f"http://instance:{instance_args.port}"
    assert args.agent == bridge_config().bridge.agent
    ranges = parse_targets(args.ranges)
    for target in target_services().values():
        address = target["networks"]["demo"]["ipv4_address"]
        assert any(
            i.first <= int(ipaddress.ip_address(address)) <= i.last for i in ranges.intervals
        ), f"{address} is outside --ranges {args.ranges}"
        # The targets serve on the ports the demo's schedule maps to the classifiers.
        targets_args = parse(
            targets_cli.command_parser(),
            python_module_args(target["command"], "bridge.demo.targets"),
        )
        for port in ("ssh_port", "http_port", "https_port", "snmp_port"):
            assert getattr(targets_args, port) == getattr(args, port), port
    env = service["environment"]
    assert (
        env[instance_cli.ADMIN_PASS_ENV]
        == every["instance"]["environment"][instance_cli.ADMIN_PASS_ENV]
    )
    for name in (SSH_PASSWORD_ENV, SNMP_COMMUNITY_ENV):
        values = {str(s["environment"][name]) for s in [*target_services().values(), service]}
        assert len(values) == 1, f"{name} differs between the targets and the demo"
    depends = service["depends_on"]
    assert depends["instance"]["condition"] == "service_healthy"
    assert {"bridge", *target_services()} <= set(depends)
    assert service["restart"] == "no"


def test_secure_overlay_logs_the_instance_in_as_the_platform_user() -> None:
    base = services()["instance"]["command"]
    overlay = secure_overlay()["services"]["instance"]
    args = midbridge_args(overlay["command"])
    assert args.broker_username == "platform"  # make-mid-user.sh --platform's default
    # The same command as the base file's, plus the user: the two cannot drift apart.
    assert overlay["command"][: len(base)] == base
    assert overlay["command"][len(base) :] == ["--broker-username", "platform"]
    password = overlay["environment"][instance_cli.BROKER_PASSWORD_ENV]
    assert re.fullmatch(r"\$\{PLATFORM_PASSWORD:\?[^}]+\}", password)


# --- the compose commands themselves, as processes on loopback -------------------------------


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


def _http_status(url: str) -> int:
    with urllib.request.urlopen(url, timeout=5) as resp:  # the health checks' own call
        status: int = resp.status
        return status


def _with_option(argv: list[str], option: str, value: str) -> list[str]:
    """``argv`` with the value after ``option`` replaced (the option must be there)."""
    at = argv.index(option)
    return [*argv[: at + 1], value, *argv[at + 2 :]]


def _local(command: list[str]) -> list[str]:
    """A compose command run here: ``midbridge`` and ``python`` of this interpreter."""
    if command[0] == "midbridge":
        return [sys.executable, "-m", "bridge", *command[1:]]
    if command[0] == "python":
        return [sys.executable, *command[1:]]
    return command


async def test_the_compose_commands_run_the_loop_as_processes_on_loopback(
    private_broker: MosquittoServer, tmp_path: Path
) -> None:
    """Every midbridge service of docker-compose.yml, started with its own command and
    environment, with only what Docker would provide replaced: host names and addresses
    (loopback), the volumes (temporary directories), the image's environment."""
    every = services()
    state = tmp_path / "var-lib-midbridge"
    base_env = {k: v for k, v in os.environ.items() if not k.startswith(("MIDBRIDGE_", "DEMO_"))}
    base_env["COLUMNS"] = "160"
    secrets_env = {"MIDBRIDGE_ADMIN_PASSWORD": "admin-" + os.urandom(6).hex()}
    procs: list[asyncio.subprocess.Process] = []
    logs: list[Any] = []

    async def start(name: str, argv: list[str], env: dict[str, str]) -> None:
        log = (tmp_path / f"{name}.log").open("wb")
        logs.append(log)
        procs.append(
            await asyncio.create_subprocess_exec(
                *argv, cwd=tmp_path, env=env, stdout=log, stderr=subprocess.STDOUT
            )
        )

    def env_of(service: dict[str, Any], **extra: str) -> dict[str, str]:
        env = {
            k: interpolate(str(v), secrets_env) for k, v in service.get("environment", {}).items()
        }
        return {**base_env, **env, **extra}

    try:
        # The instance: --host/--port/--db/--broker pointed at loopback and a temp dir.
        instance = every["instance"]
        port = _free_port()
        argv = _local(instance["command"])
        argv = _with_option(argv, "--host", "127.0.0.1")
        argv = _with_option(argv, "--port", str(port))
        argv = _with_option(argv, "--db", str(tmp_path / "instance" / "instance.db"))
        argv = _with_option(argv, "--broker", f"{private_broker.host}:{private_broker.port}")
        (tmp_path / "instance").mkdir()
        await start("instance", argv, env_of(instance))
        url = f"http://127.0.0.1:{port}"

        # The bridge: its state volume in a temp dir, the broker on loopback.
        bridge = every["bridge"]
        argv = _with_option(_local(bridge["command"]), "--config", str(COMPOSE / "midbridge.toml"))
        state.mkdir()
        metrics_port = _free_port()
        bridge_env = env_of(
            bridge,
            MIDBRIDGE_BRIDGE__STATE_DIR=str(state),  # the image's ENV
            MIDBRIDGE_BROKER__HOST=private_broker.host,
            MIDBRIDGE_BROKER__PORT=str(private_broker.port),
            MIDBRIDGE_METRICS_HOST="127.0.0.1",  # loopback here, 0.0.0.0 in the container
            MIDBRIDGE_METRICS_PORT=str(metrics_port),
        )
        await start("bridge", argv, bridge_env)

        # The targets: each on a loopback address of its own instead of its container's.
        addresses = []
        for i, (name, target) in enumerate(sorted(target_services().items())):
            address = f"127.0.0.{80 + i}"
            addresses.append(address)
            await start(
                name, _with_option(_local(target["command"]), "--bind", address), env_of(target)
            )

        # The demo: the instance's URL and the targets' addresses.
        service = every["demo"]
        argv = _with_option(_local(service["command"]), "--url", url)
        argv = _with_option(argv, "--ranges", f"{addresses[0]}-{addresses[-1]}")
        demo_run = await asyncio.create_subprocess_exec(
            *argv, "--wait", "30", "--timeout", "60", cwd=tmp_path, env=env_of(service),
            stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
        )  # fmt: skip
        async with asyncio.timeout(120):
            out_bytes, err_bytes = await demo_run.communicate()
        out, err = out_bytes.decode(), err_bytes.decode()
        assert "Traceback" not in out + err
        assert "agent: validated: the bridge confirmed fingerprint" in out, (out, err)
        assert demo_run.returncode == 0, (out, err)
        classes = {
            line.split()[0]
            for line in out.splitlines()
            if line.startswith(" ")
            and line.split()
            and line.split()[0] in ("linux_server", "netgear", "web_server", "ip_address")
        }
        assert classes == {"linux_server", "netgear", "web_server", "ip_address"}, out
        # What the services' health checks ask answers 200 (the routes, ports swapped in).
        for check_url in (url + health.READY_ROUTE, f"http://127.0.0.1:{metrics_port}/livez"):
            status = await asyncio.to_thread(_http_status, check_url)
            assert status == 200, check_url
    finally:
        for proc in procs:
            if proc.returncode is None:
                proc.terminate()
        for proc in procs:
            try:
                async with asyncio.timeout(15):
                    await proc.wait()
            except TimeoutError:
                proc.kill()
                await proc.wait()
        for log in logs:
            log.close()
