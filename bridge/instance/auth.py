"""Users, roles, passwords, Basic authentication and the instance's access rules.

Passwords are hashed with scrypt (``hashlib.scrypt``, standard library: no extra
dependency to build or audit), N=2^15, r=8, p=1 (32 MiB, ~0.1 s), a 16-byte random salt per
user, stored as ``scrypt$N$r$p$<salt b64>$<hash b64>`` (the parameters travel with the
hash, so they can be raised later) and compared in constant time.

Basic authentication checks the password on every request, so a successful check is
remembered for five minutes under an HMAC of (user, stored hash, password) with a
process-random key: changing the password (a new hash) or deactivating the user takes
effect at once; only the scrypt work is saved. An unknown user name costs the same scrypt
work as a wrong password, so timing does not tell which one it was.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import hashlib
import hmac
import secrets
import time
from collections import OrderedDict
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any, Literal

from bridge.instance.query import escape
from bridge.instance.store import Record, Store

ROLES: Mapping[str, str] = {
    "admin": "Full control of the instance",
    "mid_server": "A MID Server (bridge): reads ECC output records, writes input records",
    "discovery_admin": "Runs discovery: reads the ECC queue and agents, creates output records",
    "itil": "Fulfiller (reserved)",
}
ADMIN_USER = "admin"
MIN_PASSWORD = 8
MAX_PASSWORD = 1024

_N, _R, _P = 2**15, 8, 1
_MAXMEM = 64 * 1024 * 1024
_CACHE_TTL = 300.0
_CACHE_SIZE = 10_000

Action = Literal["read", "create", "write", "delete"]


class AuthError(Exception):
    """Refused: ``status`` 401 (who are you?) or 403 (not allowed), ServiceNow's wording."""

    def __init__(self, status: int, detail: str) -> None:
        message = "User Not Authenticated" if status == 401 else "User Not Authorized"
        super().__init__(f"{message}: {detail}")
        self.status = status
        self.message = message
        self.detail = detail


class PasswordError(ValueError):
    pass


def check_password(password: str) -> None:
    if not MIN_PASSWORD <= len(password) <= MAX_PASSWORD:
        raise PasswordError(f"a password must be {MIN_PASSWORD} to {MAX_PASSWORD} characters long")


def hash_password(password: str) -> str:
    """The stored form of ``password`` (a fresh salt each call)."""
    salt = secrets.token_bytes(16)
    digest = hashlib.scrypt(password.encode(), salt=salt, n=_N, r=_R, p=_P, maxmem=_MAXMEM)
    b64 = base64.b64encode
    return f"scrypt${_N}${_R}${_P}${b64(salt).decode()}${b64(digest).decode()}"


def verify_password(password: str, stored: str) -> bool:
    """True if ``password`` matches ``stored`` (constant-time); False for any unusable hash."""
    try:
        scheme, n, r, p, salt, digest = stored.split("$")
        if scheme != "scrypt":
            return False
        expected = base64.b64decode(digest, validate=True)
        actual = hashlib.scrypt(
            password.encode(),
            salt=base64.b64decode(salt, validate=True),
            n=int(n),
            r=int(r),
            p=int(p),
            maxmem=_MAXMEM,
            dklen=len(expected),
        )
    except (ValueError, binascii.Error):
        return False
    return hmac.compare_digest(actual, expected)


_DUMMY_HASH: str | None = None


def _dummy_hash() -> str:
    global _DUMMY_HASH
    if _DUMMY_HASH is None:
        _DUMMY_HASH = hash_password(secrets.token_urlsafe(16))
    return _DUMMY_HASH


@dataclass(frozen=True, slots=True)
class Principal:
    """An authenticated user and the names of the roles it holds."""

    sys_id: str
    user_name: str
    roles: frozenset[str]
    web_service_access_only: bool = False

    @property
    def is_admin(self) -> bool:
        return "admin" in self.roles

    def has_any(self, *roles: str) -> bool:
        """Holds one of ``roles``; ``admin`` holds every role."""
        return self.is_admin or not self.roles.isdisjoint(roles)


# --- users and roles in the store ---------------------------------------------------------


async def find_user(store: Store, user_name: str) -> Record | None:
    rows = await store.query("sys_user", "user_name=" + escape(user_name), limit=1)
    return rows[0] if rows else None


async def find_role(store: Store, name: str) -> Record | None:
    rows = await store.query("sys_user_role", "name=" + escape(name), limit=1)
    return rows[0] if rows else None


async def roles_of(store: Store, user_sys_id: str) -> frozenset[str]:
    grants = await store.query("sys_user_has_role", "user=" + escape(user_sys_id))
    ids = sorted({g["role"] for g in grants if g["role"] and "," not in g["role"]})
    if not ids:
        return frozenset()
    roles = await store.query("sys_user_role", "sys_idIN" + escape(",".join(ids)))
    return frozenset(r["name"] for r in roles)


async def seed_roles(store: Store) -> None:
    """Create the built-in roles that are missing (idempotent)."""
    for name, description in ROLES.items():
        if await find_role(store, name) is None:
            await store.insert("sys_user_role", {"name": name, "description": description})


async def grant(store: Store, user_sys_id: str, role_name: str) -> Record:
    """Give a user a role by name (``PasswordError``-free; ``LookupError`` if no such role)."""
    role = await find_role(store, role_name)
    if role is None:
        raise LookupError(f"no role named {role_name!r}")
    existing = await store.query(
        "sys_user_has_role", f"user={escape(user_sys_id)}^role={escape(role['sys_id'])}", limit=1
    )
    if existing:
        return existing[0]
    return await store.insert("sys_user_has_role", {"user": user_sys_id, "role": role["sys_id"]})


async def create_user(
    store: Store,
    user_name: str,
    password: str | None,
    *,
    roles: Iterable[str] = (),
    first_name: str = "",
    last_name: str = "",
    email: str = "",
    web_service_access_only: bool = False,
    active: bool = True,
) -> Record:
    """Create a user (password hashed here) and grant it ``roles`` by name.

    Raises ``PasswordError`` for a password out of bounds, ``LookupError`` for an unknown
    role, ``bridge.instance.store.Conflict`` if the user name is taken.
    """
    roles = list(roles)
    for name in roles:
        if await find_role(store, name) is None:
            raise LookupError(f"no role named {name!r}")
    fields: dict[str, Any] = {
        "user_name": user_name,
        "first_name": first_name,
        "last_name": last_name,
        "email": email,
        "web_service_access_only": web_service_access_only,
        "active": active,
    }
    if password is not None:
        check_password(password)
        fields["user_password"] = await asyncio.to_thread(hash_password, password)
    user = await store.insert("sys_user", fields)
    for name in roles:
        await grant(store, user["sys_id"], name)
    return user


async def ensure_admin(store: Store, password: str | None) -> str | None:
    """First start: create ``admin`` (role admin) if missing.

    Its password is ``password`` if given, else a generated one, which is returned (the
    only time it can be seen). Returns None when the admin already existed or the password
    was given.
    """
    await seed_roles(store)
    if await find_user(store, ADMIN_USER) is not None:
        return None
    generated = None
    if not password:
        password = generated = secrets.token_urlsafe(18)
    await create_user(
        store, ADMIN_USER, password, roles=["admin"], first_name="System", last_name="Administrator"
    )
    return generated


# --- Basic authentication -----------------------------------------------------------------


def parse_basic(header: str | None) -> tuple[str, str]:
    """(user name, password) from an ``Authorization: Basic ...`` header; AuthError 401."""
    if not header:
        raise AuthError(401, "Required to provide Auth information")
    scheme, _, token = header.partition(" ")
    if scheme.lower() != "basic" or not token.strip():
        raise AuthError(401, "Only Basic authentication is supported")
    try:
        text = base64.b64decode(token.strip(), validate=True).decode("utf-8")
    except (binascii.Error, UnicodeDecodeError):
        raise AuthError(401, "Malformed Basic credentials") from None
    user, sep, password = text.partition(":")
    if not sep or not user:
        raise AuthError(401, "Malformed Basic credentials")
    return user, password


class Authenticator:
    """Checks Basic credentials against ``sys_user`` and loads the user's roles."""

    def __init__(self, store: Store) -> None:
        self.store = store
        self._key = secrets.token_bytes(32)
        self._verified: OrderedDict[bytes, float] = OrderedDict()

    def _cache_key(self, user: Record, password: str) -> bytes:
        message = "\0".join((user["sys_id"], user["user_password"], password)).encode()
        return hmac.new(self._key, message, hashlib.sha256).digest()

    async def _password_ok(self, user: Record | None, password: str) -> bool:
        if user is None or not user["user_password"]:
            await asyncio.to_thread(verify_password, password, _dummy_hash())
            return False
        key = self._cache_key(user, password)
        now = time.monotonic()
        until = self._verified.get(key)
        if until is not None and until > now:
            return True
        if len(password) > MAX_PASSWORD:
            return False
        if not await asyncio.to_thread(verify_password, password, user["user_password"]):
            return False
        self._verified[key] = now + _CACHE_TTL
        self._verified.move_to_end(key)
        while len(self._verified) > _CACHE_SIZE:
            self._verified.popitem(last=False)
        return True

    async def authenticate(self, header: str | None) -> Principal:
        """The principal for an ``Authorization`` header; AuthError 401 if refused."""
        user_name, password = parse_basic(header)
        user = await find_user(self.store, user_name)
        if not await self._password_ok(user, password):
            raise AuthError(401, "Invalid user name or password")
        assert user is not None
        if not user["active"]:
            raise AuthError(401, f"User {user_name} is inactive")
        return Principal(
            sys_id=user["sys_id"],
            user_name=user["user_name"],
            roles=await roles_of(self.store, user["sys_id"]),
            web_service_access_only=bool(user["web_service_access_only"]),
        )


# --- access rules ---------------------------------------------------------------------------

MID_OUTPUT_FIELDS = frozenset({"state", "processed", "error_string"})
_ADMIN_ONLY = frozenset({"sys_user", "sys_user_role", "sys_user_has_role", "discovery_credentials"})


def _roles_text(roles: Iterable[str]) -> str:
    return " or ".join([*roles, "admin"])


_ECC_READERS = ("mid_server", "discovery_admin")
# discovery_admin reads runs and CIs, and writes schedules; the CI class views count too.
_DISCOVERY_TABLES = frozenset({"discovery_schedule", "discovery_status", "cmdb_ci"})


def authorize_table(who: Principal, table: str) -> None:
    """Raise AuthError 403 unless ``who`` may use ``table`` at all (checked first, so a
    refused user learns nothing about records or bodies)."""
    if who.is_admin:
        return
    if table in ("ecc_queue", "ecc_agent") and who.has_any(*_ECC_READERS):
        return
    if table in _DISCOVERY_TABLES and who.has_any("discovery_admin"):
        return
    if table in ("ecc_queue", "ecc_agent"):
        needed = _roles_text(_ECC_READERS)
    elif table in _DISCOVERY_TABLES:
        needed = _roles_text(["discovery_admin"])
    else:
        needed = "admin"
    raise AuthError(403, f"table {table} requires role {needed}")


def authorize(
    who: Principal,
    table: str,
    action: Action,
    *,
    fields: Mapping[str, Any] | None = None,
    record: Mapping[str, Any] | None = None,
) -> None:
    """Raise AuthError 403 unless ``who`` may do ``action`` on ``table``.

    ``fields`` are the fields a create/write sets; ``record`` the record a write or delete
    touches. The rules (``admin`` may do everything):

    - ``ecc_queue``: read with mid_server or discovery_admin; create an input record with
      mid_server, an output record with discovery_admin; write only ``state``,
      ``processed``, ``error_string`` of an output record (claiming) with mid_server;
      delete: admin.
    - ``ecc_agent``: read with mid_server or discovery_admin; create and write with
      mid_server, except ``validated``; delete: admin.
    - ``discovery_schedule``: read, create and write with discovery_admin; the run tables
      and the CMDB (``discovery_status``, ``cmdb_ci``) are read with discovery_admin and
      written by the instance itself.
    - ``sys_user``, ``sys_user_role``, ``sys_user_has_role``, ``discovery_credentials``:
      admin only.
    """
    if who.is_admin:
        return
    fields = fields or {}
    if table in _ADMIN_ONLY or action == "delete":
        raise AuthError(403, f"{action} on {table} requires role admin")
    if action == "read":
        if table in _DISCOVERY_TABLES and who.has_any("discovery_admin"):
            return
        if table not in _DISCOVERY_TABLES and who.has_any(*_ECC_READERS):
            return
        raise AuthError(403, f"read on {table} requires role {_roles_text(_ECC_READERS)}")
    if table == "ecc_queue":
        queue = str((record or {}).get("queue") or fields.get("queue") or "input")
        if action == "create":
            needed = "mid_server" if queue == "input" else "discovery_admin"
            if who.has_any(needed):
                return
            raise AuthError(
                403, f"creating an ecc_queue {queue} record requires role {_roles_text([needed])}"
            )
        if not who.has_any("mid_server"):
            raise AuthError(
                403, f"changing ecc_queue records requires role {_roles_text(['mid_server'])}"
            )
        extra = sorted(set(fields) - MID_OUTPUT_FIELDS)
        if queue != "output" or extra:
            raise AuthError(
                403,
                "role mid_server may change only "
                + ", ".join(sorted(MID_OUTPUT_FIELDS))
                + " of an output record"
                + (f"; refused field: {extra[0]}" if extra and queue == "output" else ""),
            )
        return
    if table == "discovery_schedule":
        if who.has_any("discovery_admin"):
            return
        raise AuthError(
            403, f"{action} on discovery_schedule requires role {_roles_text(['discovery_admin'])}"
        )
    if table in _DISCOVERY_TABLES:
        raise AuthError(403, f"{table} is written by the instance's discovery only")
    if table == "ecc_agent":
        if not who.has_any("mid_server"):
            raise AuthError(
                403, f"{action} on ecc_agent requires role {_roles_text(['mid_server'])}"
            )
        if "validated" in fields:
            raise AuthError(403, "only admin may set ecc_agent.validated")
        return
    raise AuthError(403, f"{action} on {table} requires role admin")
