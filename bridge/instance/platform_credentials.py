"""The instance's own keys, and discovery credentials encrypted at rest.

Two owner-only files beside the database (``<db>.secret.key``, ``<db>.signing.pem``):

- the **at-rest key** (32 random bytes, base64): ChaCha20-Poly1305 over each
  ``discovery_credentials.secret``, so the database file never holds a secret in clear;
- the **signing key** (Ed25519, PKCS#8 PEM): the instance signs every output record it
  pushes (``bridge.wire.sealing.sign_record``); bridges check it with the public key
  (``PlatformKeys.public_key_b64``, their ``security.platform_key``).

A ``discovery_credentials`` row is ``name, type, order, active, secret``; ``secret`` is
``v1.<base64(nonce | ciphertext)>`` of the type's fields as JSON (``bridge.agent.credentials``
lists the types and their fields). Nothing here returns a secret except
:func:`credentials_for_job`, whose result the connector seals at once to one validated
agent's key for one job (``bridge.wire.sealing.encrypt_credential``) and then drops.
"""

from __future__ import annotations

import base64
import os
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import orjson
from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from cryptography.hazmat.primitives.ciphers.aead import ChaCha20Poly1305

from bridge.instance.api import Write
from bridge.instance.store import Record, Store
from bridge.wire.credentials import TYPES, check_credential
from bridge.wire.errors import ConfigError, CredentialError
from bridge.wire.keyfiles import check_private, public_key_b64, signing_key_file, write_private
from bridge.wire.sealing import sign_record

TABLE = "discovery_credentials"
SECRET_PREFIX = "v1."
_AAD = b"midbridge discovery_credentials v1"
MASK = "********"  # what the API shows in place of a secret
MAX_SEALED = 32  # a bridge refuses records with more sealed credentials than this

# Which credential types each topic tries when a job names none (``credential_id``).
# RESTProbe only takes a credential by id: it never tries several against a URL.
TOPIC_TYPES: dict[str, tuple[str, ...]] = {
    "SSHCommand": ("ssh_password", "ssh_private_key"),
    "SNMP": ("snmp_community", "snmpv3"),
    "RESTProbe": ("http_basic", "http_bearer"),
}
BY_ID_ONLY = frozenset({"RESTProbe"})


@dataclass(frozen=True)
class PlatformKeys:
    """The at-rest key and the signing key. ``repr`` shows neither."""

    secret_key: bytes
    signing: Ed25519PrivateKey

    def __repr__(self) -> str:
        return f"PlatformKeys(signing={self.public_key_b64[:12]}...)"

    @classmethod
    def load_or_create(cls, db_path: Path) -> PlatformKeys:
        """The keys beside ``db_path``, made (owner-only) on first use."""
        secret_path = db_path.with_name(db_path.name + ".secret.key")
        signing_path = db_path.with_name(db_path.name + ".signing.pem")
        db_path.parent.mkdir(parents=True, exist_ok=True)
        if not secret_path.exists():
            write_private(secret_path, base64.b64encode(os.urandom(32)) + b"\n")
        check_private(secret_path)
        try:
            secret = base64.b64decode(secret_path.read_bytes().strip(), validate=True)
        except ValueError:
            raise ConfigError("is not base64", field=str(secret_path)) from None
        if len(secret) != 32:
            raise ConfigError("must hold 32 bytes", field=str(secret_path))
        signing = signing_key_file(signing_path)
        return cls(secret, signing)

    @classmethod
    def ephemeral(cls) -> PlatformKeys:
        """Keys that live in memory only (an instance without a database file)."""
        return cls(os.urandom(32), Ed25519PrivateKey.generate())

    @property
    def public_key_raw(self) -> bytes:
        return self.signing.public_key().public_bytes(
            serialization.Encoding.Raw, serialization.PublicFormat.Raw
        )

    @property
    def public_key_b64(self) -> str:
        """What a bridge takes as ``security.platform_key``."""
        return public_key_b64(self.signing)

    def sign(self, record: dict[str, Any]) -> dict[str, Any]:
        return sign_record(self.signing, record)

    def seal_secret(self, fields: Mapping[str, str]) -> str:
        nonce = os.urandom(12)
        sealed = ChaCha20Poly1305(self.secret_key).encrypt(nonce, orjson.dumps(dict(fields)), _AAD)
        return SECRET_PREFIX + base64.b64encode(nonce + sealed).decode("ascii")

    def open_secret(self, text: Any, *, name: str = "?") -> dict[str, str]:
        where = f"{TABLE}.{name}.secret"
        if not isinstance(text, str) or not text.startswith(SECRET_PREFIX):
            raise CredentialError("is not a sealed secret", field=where)
        try:
            raw = base64.b64decode(text[len(SECRET_PREFIX) :], validate=True)
            plain = ChaCha20Poly1305(self.secret_key).decrypt(raw[:12], raw[12:], _AAD)
        except (ValueError, InvalidTag):
            raise CredentialError(
                "does not open with this instance's key (another key file?)", field=where
            ) from None
        data = orjson.loads(plain)
        if not isinstance(data, dict):
            raise CredentialError("is not a set of fields", field=where)
        return {str(k): str(v) for k, v in data.items()}


def _truthy(value: Any) -> bool:
    if isinstance(value, str):
        return value.strip().lower() in ("true", "1", "yes")
    return bool(value)


def credential_row(keys: PlatformKeys, body: Mapping[str, Any]) -> dict[str, Any]:
    """A storable ``discovery_credentials`` row from what an administrator gave.

    ``body`` has ``name``, ``type``, optional ``order`` (default 100) and ``active``
    (default true), and the type's fields either at the top level or as a ``secret``
    object. The fields are checked (``bridge.agent.credentials.check_credential``: errors name
    fields, never values) and sealed; no clear value is left in the result.
    """
    name = body.get("name")
    if not isinstance(name, str) or not name.strip():
        raise ConfigError("every credential needs a non-empty name", field="name")
    kind = body.get("type")
    if not isinstance(kind, str) or kind not in TYPES:
        raise ConfigError(f"unknown type; one of {', '.join(sorted(TYPES))}", field="type")
    required, optional = TYPES[kind]
    nested = body.get("secret")
    source: Mapping[str, Any] = nested if isinstance(nested, Mapping) else body
    fields = {k: v for k, v in source.items() if k in required or k in optional}
    order_raw = body.get("order", 100)
    try:
        order = int(order_raw) if not isinstance(order_raw, bool) else -1
    except (TypeError, ValueError):
        raise ConfigError("must be an integer", field="order") from None
    check_credential({"id": name, "type": kind, **fields}, TABLE)
    return {
        "name": name,
        "type": kind,
        "order": order,
        "active": _truthy(body.get("active", True)),
        "secret": keys.seal_secret(fields),
    }


def public_view(row: Mapping[str, Any]) -> Record:
    """A row as the API may show it: the secret masked."""
    shown = dict(row)
    if shown.get("secret"):
        shown["secret"] = MASK
    return shown


async def add_credential(
    store: Store,
    keys: PlatformKeys,
    *,
    name: str,
    type: str,
    fields: Mapping[str, str],
    order: int = 100,
    active: bool = True,
) -> Record:
    """Insert a credential (sealed); returns the stored row with its secret masked."""
    row = credential_row(
        keys, {"name": name, "type": type, "order": order, "active": active, **fields}
    )
    return public_view(await store.insert(TABLE, row))


def types_for(topic: str, params: Mapping[str, Any]) -> tuple[str, ...]:
    """The credential types a job of ``topic`` may use (SNMP narrows by its version)."""
    types = TOPIC_TYPES.get(topic, ())
    if topic == "Shazzam":  # its SNMP scanner taps with communities
        return ("snmp_community",) if _truthy(params.get("snmp", False)) else ()
    if topic == "SNMP":
        version = str(params.get("version") or "")
        if version == "3":
            return ("snmpv3",)
        if version in ("1", "2c"):
            return ("snmp_community",)
    return types


def needs_credentials(topic: str, params: Mapping[str, Any]) -> bool:
    """True when the connector should attach sealed credentials to this job."""
    if params.get("credential_id"):
        return True
    if topic == "Shazzam":
        return bool(types_for(topic, params))
    return topic in TOPIC_TYPES and topic not in BY_ID_ONLY


async def credentials_for_job(
    store: Store, keys: PlatformKeys, topic: str, params: Mapping[str, Any]
) -> list[dict[str, str]]:
    """The clear credentials one job may use, each ``{"id", "type", ...fields}``.

    By id (``credential_id`` names a row by ``sys_id`` or ``name``; the sealed copy keeps
    the job's own spelling as its ``id``, which the bridge matches), else every active
    credential of the topic's types in ``order``, at most ``MAX_SEALED``. Inactive rows,
    and rows of a type the topic cannot use, are never sent. An unknown id gives an empty
    list: the bridge then answers the job with its own ``credential_error``.
    """
    wanted = params.get("credential_id")
    types = types_for(topic, params)
    rows: list[Record]
    if wanted:
        wanted = str(wanted)
        row = await store.get(TABLE, wanted)
        if row is None:
            rows = [r for r in await store.query(TABLE) if r.get("name") == wanted]
        else:
            rows = [row]
        rows = [
            r
            for r in rows
            if _truthy(r.get("active", True)) and (not types or r.get("type") in types)
        ][:1]
        ids = [wanted] * len(rows)
    else:
        if not types or topic in BY_ID_ONLY:
            return []
        rows = [
            r
            for r in await store.query(TABLE)
            if r.get("type") in types and _truthy(r.get("active", True))
        ]
        only = params.get("snmp_credential_ids")  # Shazzam: the communities to tap with
        if only:
            names = {n.strip() for n in (only.split(",") if isinstance(only, str) else only)}
            rows = [r for r in rows if r.get("name") in names or r.get("sys_id") in names]
        rows.sort(key=lambda r: (_order(r.get("order")), str(r.get("name"))))
        rows = rows[:MAX_SEALED]
        ids = [str(r.get("name")) for r in rows]
    found: list[dict[str, str]] = []
    for row, cred_id in zip(rows, ids, strict=True):
        fields = keys.open_secret(row.get("secret"), name=str(row.get("name")))
        found.append({"id": cred_id, "type": str(row.get("type")), **fields})
    return found


def _order(value: Any) -> int:
    try:
        return int(value)
    except (TypeError, ValueError):
        return 100


def credential_hook(keys: PlatformKeys) -> Callable[[Write], None]:
    """A Table API before-write hook for ``discovery_credentials``: seal ``secret``.

    The administrator sends ``secret`` as the type's fields (a JSON object, or its text);
    the hook checks them against ``type`` (errors name fields, never values) and stores
    them sealed. Changing ``type`` needs a new ``secret``. The API never returns it.
    """

    def hook(write: Write) -> None:
        fields = write.fields
        previous = write.previous or {}
        if write.op == "update" and "secret" not in fields and "type" not in fields:
            return
        kind = fields.get("type", previous.get("type"))
        name = fields.get("name", previous.get("name")) or "credential"
        if "secret" not in fields:
            if write.op == "insert":
                raise ValueError("secret is required: the type's fields as a JSON object")
            if kind != previous.get("type"):
                raise ValueError("changing type needs a new secret for the new type")
            return
        raw = fields["secret"]
        if isinstance(raw, str) and raw.startswith(SECRET_PREFIX):
            try:
                values: Any = keys.open_secret(raw, name=str(name))
            except CredentialError as exc:
                raise ValueError(str(exc)) from None
        elif isinstance(raw, dict):
            values = raw
        elif isinstance(raw, str):
            try:
                values = orjson.loads(raw)
            except orjson.JSONDecodeError:
                raise ValueError("secret must be a JSON object of the type's fields") from None
        else:
            raise ValueError("secret must be a JSON object of the type's fields")
        if not isinstance(values, dict):
            raise ValueError("secret must be a JSON object of the type's fields")
        if not isinstance(kind, str) or kind not in TYPES:
            raise ValueError(f"type must be one of {', '.join(sorted(TYPES))}")
        reserved = sorted({"id", "type", "order"} & values.keys())
        if reserved:
            raise ValueError(f"secret: {reserved[0]}: not a field of the secret")
        try:
            check_credential({"id": str(name), "type": kind, **values}, "secret")
        except ConfigError as exc:
            raise ValueError(str(exc)) from None
        fields["secret"] = keys.seal_secret(values)

    return hook
