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
