"""``[probes.shazzam]``: the sweep's limits and engine settings (``ProbeSpec.settings``)."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from pydantic import Field, ValidationError

from bridge.wire.errors import ConfigError
from probes.contract import ProbeSettings


class ShazzamSettings(ProbeSettings):
    max_addresses: int = Field(65_536, ge=1)  # a larger sweep is refused
    max_probes: int = Field(10_000_000, ge=1)  # addresses × ports
    chunk_hosts: int = Field(256, ge=1)  # hosts a result chunk holds
    connect_timeout: float = Field(1.0, gt=0, le=60)
    concurrency: int = Field(2048, ge=1, le=65_536)  # connects in flight per engine
    engines: int = Field(1, ge=1, le=64)  # parallel engine threads/processes per big sweep


def shazzam_settings(settings: ShazzamSettings | Mapping[str, Any]) -> ShazzamSettings:
    """The probe's settings as the model.

    Transitional: the runtime still hands probes ``[probes.shazzam]`` as a dict; once it
    passes the instance (``Config.probes.shazzam`` is one), the dict branch goes.
    """
    if isinstance(settings, ShazzamSettings):
        return settings
    known = {k: v for k, v in settings.items() if k in ShazzamSettings.model_fields}
    try:
        return ShazzamSettings.model_validate(known)
    except ValidationError as exc:
        first = exc.errors()[0]
        loc = ".".join(str(part) for part in first.get("loc", ()))
        raise ConfigError(str(first.get("msg", "invalid")), field=f"probes.shazzam.{loc}") from None
