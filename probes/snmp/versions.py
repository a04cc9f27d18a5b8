"""SNMP versions: the job's spelling, and gufo-snmp's."""

from __future__ import annotations

from typing import Any, Literal

from gufo.snmp import SnmpVersion

Version = Literal["1", "2c", "3"]


GUFO_VERSION: dict[str, SnmpVersion] = {
    "1": SnmpVersion.v1,
    "2c": SnmpVersion.v2c,
    "3": SnmpVersion.v3,
}
_VERSION_ALIASES = {
    "1": "1",
    "v1": "1",
    "2": "2c",
    "2c": "2c",
    "v2": "2c",
    "v2c": "2c",
    "3": "3",
    "v3": "3",
}


SESSION_TIMEOUT = 3600.0  # gufo's own timeout: never reached, ours is applied per request


def normalize_version(value: Any) -> Version | None:
    if value is None or value == "":
        return None
    key = str(value).strip().lower()
    if key not in _VERSION_ALIASES:
        raise ValueError(f"{str(value)[:20]!r} is not an SNMP version; one of 1, 2c, 3")
    return _VERSION_ALIASES[key]  # type: ignore[return-value]
