"""How to reach and log in to the broker: shared by the bridge, the instance's connector,
the relay and the test clients.

``kind`` picks the transport: ``"mqtt"`` (MQTT 5, the default) or ``"nats"`` (NATS
JetStream, ``[broker.nats]``; docs/scaling.md, docs/wire-contract.md). ``host``/``port``,
the login and the TLS settings serve both; a NATS cluster is better given as
``nats.servers`` (every node, so that a client fails over).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator


class Section(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True, coerce_numbers_to_str=True)


NATS_PORT = 4222


class NatsSettings(Section):
    """``[broker.nats]``: JetStream streams and consumers (docs/wire-contract.md, NATS)."""

    servers: list[str] = Field(default_factory=list)  # nats://host:port; empty: host and port
    replicas: int = Field(1, ge=1, le=5)  # stream replicas: 3 on a three-node cluster
    ack_wait: float = Field(30.0, ge=1, le=3600)  # seconds before an unacknowledged job goes again
    max_deliver: int = Field(5, ge=2, le=1000)  # the last delivery is answered, not run
    max_ack_pending: int = Field(0, ge=0)  # the MID cluster's jobs out at once; 0: 8 x window
    duplicate_window: float = Field(120.0, ge=1, le=86_400)  # seconds Nats-Msg-Id dedupes
    status_timeout: float = Field(90.0, ge=1)  # platform: a MID silent this long is Down
    pull_expires: float = Field(2.0, ge=0.1, le=60)  # seconds one pull request waits
    manage_streams: bool = True  # create the streams and consumers that are missing
    connect_timeout: float = Field(5.0, gt=0, le=120)

    @field_validator("servers")
    @classmethod
    def _server_urls(cls, value: list[str]) -> list[str]:
        for url in value:
            if not url.startswith(("nats://", "tls://")) or len(url) < 8:
                raise ValueError(f"a server is nats://host:port or tls://host:port, not {url!r}")
        return value


class BrokerConfig(Section):
    kind: Literal["mqtt", "nats"] = "mqtt"
    host: str = "127.0.0.1"
    port: int = Field(1883, ge=1, le=65535)
    username: str | None = None
    password: str | None = Field(None, repr=False)
    tls: bool = False
    ca_file: Path | None = None
    cert_file: Path | None = None  # client certificate, optional
    key_file: Path | None = None
    tls_insecure: bool = False  # skip hostname check (test brokers only)
    keepalive: int = Field(30, ge=5, le=3600)
    session_expiry: int = Field(86_400, ge=0)  # seconds the broker keeps our session offline
    reconnect_min: float = Field(0.2, gt=0)
    reconnect_max: float = Field(10.0, gt=0)
    protocol: Literal["5", "3.1.1"] = "5"
    # Log each MQTT session in as its own user, <username>.bulk / .express / .out, whose
    # client id is that name: with Mosquitto's use_username_as_clientid (the hardened
    # compose broker) no other user can then take a session over (docs/security.md).
    session_users: bool = False
    nats: NatsSettings = Field(default_factory=NatsSettings)

    @model_validator(mode="before")
    @classmethod
    def _nats_port(cls, data: Any) -> Any:
        """NATS listens on 4222: the default port follows the kind unless one is given."""
        if isinstance(data, dict) and data.get("kind") == "nats" and data.get("port") is None:
            return {**data, "port": NATS_PORT}
        return data

    @property
    def nats_servers(self) -> list[str]:
        scheme = "tls" if self.tls else "nats"
        return list(self.nats.servers) or [f"{scheme}://{self.host}:{self.port}"]

    @field_validator("protocol", mode="before")
    @classmethod
    def _protocol_text(cls, value: Any) -> Any:
        return str(value) if isinstance(value, int) and not isinstance(value, bool) else value

    @model_validator(mode="after")
    def _session_users_need_a_user(self) -> BrokerConfig:
        if self.session_users and not self.username:
            raise ValueError("username: required when session_users is on")
        return self
