"""A credential as both ends know it: its types and their fields, one validator.

The platform stores and seals credentials of these types; the bridge reads them from its
local file or opens them from a job; probes receive a ``Credential``.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from bridge.wire.errors import ConfigError, CredentialError


@dataclass(frozen=True, slots=True)
class Credential:
    """A resolved secret. ``repr`` never shows the secret fields."""

    id: str
    type: str
    fields: Mapping[str, str]

    def __repr__(self) -> str:
        return f"Credential(id={self.id!r}, type={self.type!r}, fields=<{len(self.fields)} hidden>)"

    __str__ = __repr__


# type → (required fields, optional fields)
TYPES: dict[str, tuple[frozenset[str], frozenset[str]]] = {
    "ssh_password": (frozenset({"user", "password"}), frozenset({"sudo_password"})),
    "ssh_private_key": (
        frozenset({"user"}),
        frozenset({"private_key", "private_key_file", "passphrase", "sudo_password"}),
    ),
    "snmp_community": (frozenset({"community"}), frozenset()),
    "snmpv3": (
        frozenset({"user"}),
        frozenset({"auth_protocol", "auth_key", "priv_protocol", "priv_key", "context"}),
    ),
    "http_basic": (frozenset({"user", "password"}), frozenset()),
    "http_bearer": (frozenset({"token"}), frozenset()),
}


def check_credential(raw: Mapping[str, Any], where: str) -> tuple[Credential, int]:
    """Validate one credential table; errors name the field, never a value."""
    cred_id = raw.get("id")
    if not isinstance(cred_id, str) or not cred_id:
        raise ConfigError("every credential needs a non-empty string id", field=f"{where}.id")
    kind = raw.get("type")
    if not isinstance(kind, str) or kind not in TYPES:
        raise ConfigError(
            f"unknown type {str(kind)[:40]!r}; one of {', '.join(sorted(TYPES))}",
            field=f"{where}.type",
        )
    required, optional = TYPES[kind]
    order = raw.get("order", 100)
    if isinstance(order, bool) or not isinstance(order, int):
        raise ConfigError("must be an integer", field=f"{where}.order")
    fields: dict[str, str] = {}
    for key, value in raw.items():
        if key in ("id", "type", "order"):
            continue
        if key not in required and key not in optional:
            raise ConfigError(f"unknown field for type {kind}", field=f"{where}.{key}")
        if not isinstance(value, str):
            raise ConfigError("must be a string", field=f"{where}.{key}")
        fields[key] = value
    missing = sorted(required - fields.keys())
    if missing:
        raise ConfigError(f"missing for type {kind}", field=f"{where}.{missing[0]}")
    if kind == "ssh_private_key" and not ({"private_key", "private_key_file"} & fields.keys()):
        raise ConfigError("needs private_key or private_key_file", field=f"{where}.private_key")
    return Credential(id=cred_id, type=kind, fields=fields), order


def of_types(cred: Credential, credential_id: str, types: tuple[str, ...]) -> Credential:
    """``cred`` if it is of one of ``types``; else an error naming ``credential_id``."""
    if cred.type not in types:
        raise CredentialError(
            f"credential {credential_id[:80]!r} is of type {cred.type}, "
            f"this probe takes {', '.join(types)}",
            field="credential_id",
        )
    return cred
