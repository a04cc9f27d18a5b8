"""Credentials: a probe names one (``credential_id``) or tries every one of its types in order.

A probe never takes a secret from a record in clear. It asks the resolver, through
``ProbeContext.credentials``. This module holds the local resolver, a TOML file next to
the config, refused if anyone but its owner may read it::

    [[credential]]
    id = "linux-admin"        # what jobs name in credential_id
    type = "ssh_password"     # see TYPES
    order = 10                # lower is tried first when a job names a type, not an id
    user = "discovery"
    password = "..."

A later resolver (credentials sent encrypted by the platform) plugs into the same
``CredentialResolver`` interface. Secrets never appear in a repr, a log, an error or a
record: errors name the credential id and the field, never the value.
"""

from __future__ import annotations

import os
import stat
import tomllib
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from bridge.errors import ConfigError, CredentialError
from bridge.jobs import Credential
from bridge.records import OutputRecord

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


class LocalCredentials:
    """The credentials file as a ``CredentialResolver``."""

    def __init__(self, entries: Sequence[tuple[Credential, int]]) -> None:
        self._by_id: dict[str, Credential] = {}
        for cred, _order in entries:
            if cred.id in self._by_id:
                raise ConfigError("duplicate credential id", field=f"credential.{cred.id}")
            self._by_id[cred.id] = cred
        self._ordered = [cred for cred, _ in sorted(entries, key=lambda e: (e[1], e[0].id))]

    @classmethod
    def from_file(cls, path: Path) -> LocalCredentials:
        try:
            info = path.stat()
        except FileNotFoundError:
            raise ConfigError("credentials file not found", field=str(path)) from None
        if info.st_mode & (stat.S_IRWXG | stat.S_IRWXO):
            raise ConfigError(
                f"credentials file is open to others (mode {stat.S_IMODE(info.st_mode):o}); "
                "chmod 600 it",
                field=str(path),
            )
        if hasattr(os, "getuid") and info.st_uid != os.getuid():
            raise ConfigError("credentials file is owned by another user", field=str(path))
        try:
            data = tomllib.loads(path.read_text(encoding="utf-8"))
        except (OSError, UnicodeDecodeError) as exc:
            raise ConfigError(
                f"credentials file cannot be read: {type(exc).__name__}", field=str(path)
            ) from None
        except tomllib.TOMLDecodeError as exc:
            # The decoder's message quotes no values, only positions.
            raise ConfigError(f"TOML does not parse: {exc}", field=str(path)) from None
        unknown = sorted(set(data) - {"credential"})
        if unknown:
            raise ConfigError("unknown key", field=unknown[0])
        tables = data.get("credential", [])
        if not isinstance(tables, list):
            raise ConfigError("must be an array of tables [[credential]]", field="credential")
        entries = []
        for i, table in enumerate(tables):
            if not isinstance(table, dict):
                raise ConfigError("must be a table [[credential]]", field=f"credential[{i}]")
            entries.append(check_credential(table, f"credential[{i}]"))
        return cls(entries)

    @property
    def ids(self) -> list[str]:
        return sorted(self._by_id)

    async def resolve(
        self, record: OutputRecord, *, credential_id: str | None, types: tuple[str, ...]
    ) -> list[Credential]:
        if credential_id is not None:
            cred = self._by_id.get(credential_id)
            if cred is None:
                raise CredentialError(
                    f"no credential with id {credential_id[:80]!r}", field="credential_id"
                )
            return [of_types(cred, credential_id, types)]
        found = [cred for cred in self._ordered if cred.type in types]
        if not found:
            raise CredentialError(
                f"no credential of type {', '.join(types)} is configured", field="credential_id"
            )
        return found


class NoCredentials:
    """The resolver when none is configured: every request is refused clearly."""

    async def resolve(
        self, record: OutputRecord, *, credential_id: str | None, types: tuple[str, ...]
    ) -> list[Credential]:
        raise CredentialError(
            "this bridge has no credentials configured (bridge.credentials_file)",
            field="credential_id",
        )
