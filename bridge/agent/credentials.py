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
from collections.abc import Sequence
from pathlib import Path

from bridge.wire.credentials import Credential, check_credential, of_types
from bridge.wire.errors import ConfigError, CredentialError
from bridge.wire.records import OutputRecord


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
