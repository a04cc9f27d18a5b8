"""How to reach and log in to the broker: shared by the bridge, the instance's connector,
the relay and the test clients."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator


class Section(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True, coerce_numbers_to_str=True)


class BrokerConfig(Section):
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

    @field_validator("protocol", mode="before")
    @classmethod
    def _protocol_text(cls, value: Any) -> Any:
        return str(value) if isinstance(value, int) and not isinstance(value, bool) else value

    @model_validator(mode="after")
    def _session_users_need_a_user(self) -> BrokerConfig:
        if self.session_users and not self.username:
            raise ValueError("username: required when session_users is on")
        return self
