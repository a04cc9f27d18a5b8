"""SSHCommand's settings and parameters: what a job may ask, checked before it runs."""

from __future__ import annotations

import ipaddress
import re
from pathlib import Path
from typing import Literal

from pydantic import Field, field_validator

from bridge.wire.errors import (
    BadParameter,
)
from bridge.wire.records import OutputRecord
from probes.contract import ProbeParams, ProbeSettings, parse_params
from probes.kit.limits import with_defaults

TOPIC = "SSHCommand"
HostKeyPolicy = Literal["accept-new", "strict"]

MAX_OUTPUT_LIMIT = 16 * 1024 * 1024  # the most a job may ask to keep, per stream
DEFAULT_KNOWN_HOSTS = Path("./midbridge-state") / "ssh_known_hosts"  # state_dir's default
_HOSTNAME = re.compile(
    r"^(?=.{1,253}$)[A-Za-z0-9_](?:[A-Za-z0-9_-]{0,62})(?:\.[A-Za-z0-9_-]{1,63})*\.?$"
)


# --- configuration and parameters ------------------------------------------------------


class SSHSettings(ProbeSettings):
    """``[probes.settings.SSHCommand]``: defaults for jobs and the pool's limits.

    ``known_hosts`` unset: the bridge's state directory holds the file (see ``open_pool``).
    """

    known_hosts: Path = DEFAULT_KNOWN_HOSTS  # the bridge's own OpenSSH-format store
    host_key_policy: HostKeyPolicy = "accept-new"
    connect_timeout: float = Field(10.0, gt=0, le=300)
    command_timeout: float = Field(60.0, gt=0, le=86_400)
    max_output: int = Field(1_048_576, ge=0, le=MAX_OUTPUT_LIMIT)
    max_channels: int = Field(8, ge=1, le=64)  # sessions on one connection (MaxSessions 10)
    idle_timeout: float = Field(60.0, ge=0, le=86_400)  # close an unused connection after
    max_connections: int = Field(256, ge=1, le=65_536)  # idle ones beyond this close first
    keepalive_interval: float = Field(30.0, ge=0, le=3600)  # 0 = off


class SSHCommandParams(ProbeParams):
    host: str = Field(min_length=1, max_length=253)
    port: int = Field(22, ge=1, le=65_535)
    command: str = Field(min_length=1, max_length=65_536)
    credential_id: str | None = Field(None, min_length=1, max_length=256)
    must_sudo: bool = False
    connect_timeout: float = Field(10.0, gt=0, le=300)
    command_timeout: float = Field(60.0, gt=0, le=86_400)
    max_output: int = Field(1_048_576, ge=0, le=MAX_OUTPUT_LIMIT)
    host_key_policy: HostKeyPolicy = "accept-new"

    @field_validator("host")
    @classmethod
    def _check_host(cls, value: str) -> str:
        host = value.strip()
        if host.startswith("[") and host.endswith("]"):
            host = host[1:-1]
        try:
            return str(ipaddress.ip_address(host))
        except ValueError:
            pass
        if not _HOSTNAME.match(host):
            raise ValueError("must be an IP address or a host name")
        return host.lower()

    @field_validator("command")
    @classmethod
    def _check_command(cls, value: str) -> str:
        if "\x00" in value:
            raise ValueError("must not contain NUL characters")
        if not value.strip():
            raise ValueError("must not be blank")
        return value


def build_params(record: OutputRecord, settings: SSHSettings) -> SSHCommandParams:
    """Parameters from the payload; ``host`` defaults to ``source``, ``command`` to ``name``.

    Empty values (XML parameters often carry ``value=""``) count as absent.
    """
    data = {k: v for k, v in record.payload.items() if v is not None and v != ""}
    if "host" not in data:
        if not record.source.strip():
            raise BadParameter(
                "no target: give payload 'host' or the record's source", field="host"
            )
        data["host"] = record.source
    if "command" not in data:
        if not record.name.strip():
            raise BadParameter(
                "no command: give payload 'command' or the record's name", field="command"
            )
        data["command"] = record.name
    with_defaults(
        data, settings, ("connect_timeout", "command_timeout", "max_output", "host_key_policy")
    )
    return parse_params(SSHCommandParams, data)
