"""What ``build_params`` shares: defaults from the probe's settings, and its limits."""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

from pydantic import BaseModel

from bridge.wire.errors import Refused


def with_defaults(data: dict[str, Any], settings: BaseModel, keys: Iterable[str]) -> dict[str, Any]:
    """``data`` with each of ``keys`` it does not give taken from ``settings`` (in place)."""
    for key in keys:
        data.setdefault(key, getattr(settings, key))
    return data


def check_limit(value: int, limit: int, *, topic: str, setting: str, field: str, what: str) -> None:
    """Refuse a job that asks for more than ``[probes.settings.<topic>] <setting>`` allows."""
    if value > limit:
        raise Refused(
            f"{what} is over the limit of {limit} (probes.settings.{topic}.{setting})",
            field=field,
        )
