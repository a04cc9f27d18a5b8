"""compose/: the files parse and agree with each other (no Docker engine runs here)."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import yaml

from bridge.config import load_config

REPO = Path(__file__).resolve().parent.parent
COMPOSE = REPO / "compose"
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
    services = compose()["services"]
    assert {"mosquitto", "bridge", "target"} <= set(services)
    bridge = services["bridge"]
    assert bridge["build"]["dockerfile"] == "compose/Dockerfile"
    assert (COMPOSE / bridge["build"]["context"] / bridge["build"]["dockerfile"]).is_file()
    for service in services.values():
        for volume in service.get("volumes", []):
            source = volume.split(":")[0]
            if source.startswith("./"):
                assert (COMPOSE / source).exists(), source
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
