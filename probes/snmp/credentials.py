"""SNMP credentials: ``snmp_community`` and ``snmpv3`` → gufo-snmp users, pool keys, versions."""

from __future__ import annotations

import re
from typing import Any

from gufo.snmp import (
    Aes128Key,
    Aes192Key,
    Aes256Key,
    DesKey,
    KeyExpansion,
    Md5Key,
    Sha1Key,
    Sha224Key,
    Sha256Key,
    Sha384Key,
    Sha512Key,
    User,
)

from bridge.wire.credentials import Credential
from bridge.wire.errors import CredentialError
from probes.snmp.versions import Version

COMMUNITY = "snmp_community"
SNMPV3 = "snmpv3"


_AUTH: dict[str, type[Any]] = {
    "MD5": Md5Key,
    "SHA": Sha1Key,
    "SHA1": Sha1Key,
    "SHA224": Sha224Key,
    "SHA256": Sha256Key,
    "SHA384": Sha384Key,
    "SHA512": Sha512Key,
}
# name → (key class, AES-192/256 key expansion)
_PRIV: dict[str, tuple[type[Any], KeyExpansion]] = {
    "DES": (DesKey, KeyExpansion.Blumenthal),
    "AES": (Aes128Key, KeyExpansion.Blumenthal),
    "AES128": (Aes128Key, KeyExpansion.Blumenthal),
    "AES192": (Aes192Key, KeyExpansion.Blumenthal),
    "AES256": (Aes256Key, KeyExpansion.Blumenthal),
    "AES192C": (Aes192Key, KeyExpansion.Cisco),
    "AES256C": (Aes256Key, KeyExpansion.Cisco),
}


def _protocol(name: str) -> str:
    return re.sub(r"[\s_-]", "", name).upper()


def v3_user(cred: Credential) -> User:
    """The gufo-snmp ``User`` of an ``snmpv3`` credential; errors name fields, never values."""
    fields = cred.fields
    where = f"credential.{cred.id}"
    if fields.get("context"):
        raise CredentialError(
            "SNMPv3 context names are not supported (the SNMP library, gufo-snmp, always "
            "queries the default context): remove 'context' or use another credential",
            field=f"{where}.context",
        )
    auth_name = _protocol(fields.get("auth_protocol", ""))
    priv_name = _protocol(fields.get("priv_protocol", ""))
    auth_key = fields.get("auth_key", "")
    priv_key = fields.get("priv_key", "")
    auth: Any = None
    priv: Any = None
    expansion = KeyExpansion.Blumenthal
    if auth_key:
        if auth_name not in _AUTH:
            raise CredentialError(
                f"auth_protocol must be one of {', '.join(sorted(_AUTH))} (it is "
                f"{'missing' if not auth_name else 'not supported'})",
                field=f"{where}.auth_protocol",
            )
        auth = _AUTH[auth_name](auth_key.encode())
    elif auth_name not in ("", "NONE"):
        raise CredentialError("auth_protocol is set but auth_key is not", field=f"{where}.auth_key")
    if priv_key:
        if auth is None:
            raise CredentialError(
                "priv_key needs auth_key (authPriv); SNMPv3 has no privacy without authentication",
                field=f"{where}.auth_key",
            )
        if priv_name not in _PRIV:
            raise CredentialError(
                f"priv_protocol must be one of {', '.join(sorted(_PRIV))} (it is "
                f"{'missing' if not priv_name else 'not supported'})",
                field=f"{where}.priv_protocol",
            )
        priv_class, expansion = _PRIV[priv_name]
        priv = priv_class(priv_key.encode())
    elif priv_name not in ("", "NONE"):
        raise CredentialError("priv_protocol is set but priv_key is not", field=f"{where}.priv_key")
    return User(fields["user"], auth_key=auth, priv_key=priv, key_expansion=expansion)


def fingerprint(cred: Credential) -> str:
    """Tells credentials apart in the pool without keeping their secrets in its keys.

    The id, and a hash of the fields: a credential file reloaded with a new key for the
    same id gets new sessions. Kept per credential object (a job's credentials serve all
    its agents).
    """
    known = _FINGERPRINTS.get(id(cred))
    if known is not None and known[0] is cred:
        return known[1]
    text = f"{cred.id}:{hash(tuple(sorted(cred.fields.items()))) & 0xFFFFFFFFFFFF:x}"
    if len(_FINGERPRINTS) >= 1024:
        _FINGERPRINTS.clear()
    _FINGERPRINTS[id(cred)] = (cred, text)  # holding cred keeps its id from being reused
    return text


_FINGERPRINTS: dict[int, tuple[Credential, str]] = {}


def version_for(cred: Credential, wanted: Version | None) -> Version:
    if cred.type == SNMPV3:
        return "3"
    return wanted if wanted in ("1", "2c") else "2c"
