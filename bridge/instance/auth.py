"""Users, roles, passwords, Basic authentication and the instance's access rules.

Passwords are hashed with scrypt (``hashlib.scrypt``, standard library: no extra
dependency to build or audit), N=2^15, r=8, p=1 (32 MiB, ~0.1 s), a 16-byte random salt per
user, stored as ``scrypt$N$r$p$<salt b64>$<hash b64>`` (the parameters travel with the
hash, so they can be raised later) and compared in constant time.

Failed sign-ins are throttled (:class:`SignInThrottle`): per (user name, client address)
and per client address, with exponential back-off; a throttled attempt is refused before
any scrypt work (HTTP 429 with ``Retry-After``), so guessing costs the attacker time and
the instance no CPU. An inactive user gets the same answer as a wrong password.

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
import contextlib
import hashlib
import hmac
import math
import re
import secrets
import time
import unicodedata
from collections import OrderedDict
from collections.abc import AsyncIterator, Callable, Iterable, Mapping
from dataclasses import dataclass
from typing import Any, Literal

from bridge.instance.query import escape
from bridge.instance.store import Conflict, Record, Store

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
    # The MID names (without ``mid.server.``) this user acts for with role mid_server
    # (``sys_user.mid_agents``): one agent, or the agents of one cluster.
    mid_agents: frozenset[str] = frozenset()

    @property
    def is_admin(self) -> bool:
        return "admin" in self.roles

    @property
    def reads_own_agents_only(self) -> bool:
        """A mid_server account (not admin nor discovery_admin): it reads only the ECC
        records and agent rows of its own agents."""
        return not self.has_any("discovery_admin")

    def acts_for(self, agent_name: str | None) -> bool:
        """May this user act (as mid_server) for the agent named ``agent_name``?"""
        return self.is_admin or (agent_name is not None and agent_name in self.mid_agents)

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


def mid_agents_of(user: Mapping[str, Any]) -> frozenset[str]:
    """The agent names in ``sys_user.mid_agents`` (a comma list)."""
    text = str(user.get("mid_agents") or "")
    return frozenset(name.strip() for name in text.split(",") if name.strip())


async def principal_for(store: Store, user: Mapping[str, Any]) -> Principal:
    """The principal of a ``sys_user`` record: its roles and the agents it acts for."""
    return Principal(
        sys_id=str(user["sys_id"]),
        user_name=str(user["user_name"]),
        roles=await roles_of(store, str(user["sys_id"])),
        web_service_access_only=bool(user.get("web_service_access_only")),
        mid_agents=mid_agents_of(user),
    )


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
            # Another instance on the same database may make it between the two calls.
            with contextlib.suppress(Conflict):
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
    mid_agents: Iterable[str] = (),
) -> Record:
    """Create a user (password hashed here) and grant it ``roles`` by name; ``mid_agents``:
    the MID names (without ``mid.server.``) it acts for with role mid_server.

    Raises ``PasswordError`` for a password out of bounds, ``LookupError`` for an unknown
    role, ``ValueError`` for an agent name outside the safe alphabet,
    ``bridge.instance.store.Conflict`` if the user name is taken.
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
        "mid_agents": mid_agents_text(mid_agents),
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
    was given. Several instances starting at once on one new database: one makes it, the
    others find it made (their generated password, never stored, is not returned).
    """
    await seed_roles(store)
    if await find_user(store, ADMIN_USER) is not None:
        return None
    generated = None
    if not password:
        password = generated = secrets.token_urlsafe(18)
    try:
        await create_user(
            store, ADMIN_USER, password, roles=["admin"], first_name="System",
            last_name="Administrator",
        )  # fmt: skip
    except Conflict:
        return None  # another instance on the same database made it meanwhile
    return generated


MID_AGENT_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,99}\Z")
"""A MID name (what follows ``mid.server.``): the safe alphabet every entry point checks
(anchored at the end, so ``.match`` and ``.fullmatch`` both take the whole name)."""


def check_agent_name(name: object, what: str = "agent name") -> str:
    """``name`` if it is a MID name in the safe alphabet; ``ValueError`` naming ``what``."""
    if not isinstance(name, str) or not MID_AGENT_NAME.fullmatch(name):
        shown = repr(name)[:60] if isinstance(name, str) else type(name).__name__
        raise ValueError(
            f"{what} {shown} is not a MID name: 1-100 of A-Za-z0-9_.- starting with a letter "
            "or digit"
        )
    return name


def mid_agents_text(names: Iterable[str] | str) -> str:
    """The stored form of ``sys_user.mid_agents``: checked names, comma-joined, sorted."""
    if isinstance(names, str):
        names = [n.strip() for n in names.split(",") if n.strip()]
    return ",".join(sorted({check_agent_name(n, "mid_agents entry") for n in names}))


# --- sign-in throttling ---------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class ThrottleSettings:
    """Back-off after failed sign-ins (docs/instance.md, "Sign-in throttling")."""

    free_per_user: int = 5  # failures per (user name, address) before the back-off starts
    free_per_address: int = 30  # failures per address (any user names) before it starts
    first_delay: float = 1.0  # seconds refused after the first failure past the free ones
    max_delay: float = 300.0  # the back-off doubles up to this
    forget_after: float = 900.0  # seconds without a failure before an entry is dropped
    max_entries: int = 10_000  # per table; the least recently failed go first


@dataclass(slots=True)
class _Failures:
    count: int = 0
    blocked_until: float = 0.0
    last: float = 0.0


class SignInThrottle:
    """Failed sign-ins per (user name, address) and per address, in bounded memory.

    Per (user, address), an attacker guessing one user's password from one place is slowed
    down without locking that user out anywhere else; per address, spraying many user
    names from one place is slowed down too. A success clears its (user, address) entry
    only (so a valid account does not reset the address's count).
    """

    def __init__(
        self, settings: ThrottleSettings | None = None, clock: Callable[[], float] = time.monotonic
    ) -> None:
        self.settings = settings or ThrottleSettings()
        self._clock = clock
        self._by_user: OrderedDict[tuple[str, str], _Failures] = OrderedDict()
        self._by_address: OrderedDict[str, _Failures] = OrderedDict()
        self.refused = 0  # attempts refused while throttled (for tests and metrics)

    def __len__(self) -> int:
        return len(self._by_user) + len(self._by_address)

    def retry_after(self, user_name: str, address: str) -> float:
        """Seconds until a sign-in of ``user_name`` from ``address`` may be tried; 0: now."""
        now = self._clock()
        waits = [
            entry.blocked_until - now
            for entry in (
                self._fresh(self._by_user, (user_name[:255], address), now),
                self._fresh(self._by_address, address, now),
            )
            if entry is not None
        ]
        return max([0.0, *waits])

    def failed(self, user_name: str, address: str) -> None:
        now = self._clock()
        settings = self.settings
        self._count(self._by_user, (user_name[:255], address), settings.free_per_user, now)
        self._count(self._by_address, address, settings.free_per_address, now)

    def succeeded(self, user_name: str, address: str) -> None:
        self._by_user.pop((user_name[:255], address), None)

    def _fresh(self, table: OrderedDict[Any, _Failures], key: Any, now: float) -> _Failures | None:
        entry = table.get(key)
        if entry is not None and now - entry.last > self.settings.forget_after:
            del table[key]
            return None
        return entry

    def _count(self, table: OrderedDict[Any, _Failures], key: Any, free: int, now: float) -> None:
        entry = self._fresh(table, key, now) or _Failures()
        entry.count += 1
        entry.last = now
        past = entry.count - free
        if past > 0:
            delay = self.settings.first_delay * 2 ** min(past - 1, 30)
            entry.blocked_until = now + min(self.settings.max_delay, delay)
        table[key] = entry
        table.move_to_end(key)
        while len(table) > self.settings.max_entries:
            table.popitem(last=False)


class SignInThrottled(AuthError):
    """Too many failed sign-ins: refused before any password work (HTTP 429)."""

    def __init__(self, retry_after: float) -> None:
        self.retry_after = max(1, math.ceil(retry_after))
        super().__init__(401, f"Too many failed sign-ins; retry after {self.retry_after} s")
        self.status = 429
        self.message = "Too Many Requests"


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

    def __init__(self, store: Store, throttle: SignInThrottle | None = None) -> None:
        self.store = store
        self.throttle = throttle if throttle is not None else SignInThrottle()
        self._key = secrets.token_bytes(32)
        self._verified: OrderedDict[bytes, float] = OrderedDict()
        # (user name, address) → (its lock, attempts holding or waiting for it)
        self._checking: dict[tuple[str, str], tuple[asyncio.Lock, int]] = {}

    def _cache_key(self, user: Record, password: str) -> bytes:
        message = "\0".join((user["sys_id"], user["user_password"], password)).encode()
        return hmac.new(self._key, message, hashlib.sha256).digest()

    async def _password_ok(self, user: Record | None, password: str) -> bool:
        if user is None or not user["user_password"]:
            await asyncio.to_thread(verify_password, password, _dummy_hash())
            return False
        if self._recently_verified(user, password):
            return True
        key = self._cache_key(user, password)
        now = time.monotonic()
        if len(password) > MAX_PASSWORD:
            return False
        if not await asyncio.to_thread(verify_password, password, user["user_password"]):
            return False
        self._verified[key] = now + _CACHE_TTL
        self._verified.move_to_end(key)
        while len(self._verified) > _CACHE_SIZE:
            self._verified.popitem(last=False)
        return True

    async def authenticate(self, header: str | None, address: str = "") -> Principal:
        """The principal for an ``Authorization`` header from client ``address``.

        AuthError 401 if refused (an inactive user gets the same answer as a wrong
        password: no oracle on either); ``SignInThrottled`` (429) while ``address`` or this
        user from it is backing off, before any password work.
        """
        user_name, password = parse_basic(header)
        wait = self.throttle.retry_after(user_name, address)
        if wait > 0:
            self.throttle.refused += 1
            raise SignInThrottled(wait)
        user = await self.check(user_name, password, address)
        if user is None:
            raise AuthError(401, "Invalid user name or password")
        return await principal_for(self.store, user)

    async def check(self, user_name: str, password: str, address: str) -> Record | None:
        """The active user whose password this is, or None (counted as a failed sign-in).

        The caller checks ``throttle.retry_after`` first. Password work for one (user name,
        address) runs one attempt at a time, and the throttle is asked again when an
        attempt's turn comes: a burst of concurrent guesses costs at most the free
        attempts' scrypt, not one each (they would all pass the caller's check at once).
        """
        user = await find_user(self.store, user_name)
        if user is not None and user["active"] and self._recently_verified(user, password):
            self.throttle.succeeded(user_name, address)
            return user  # no password work, nothing to serialise
        async with self._one_at_a_time((user_name[:255], address)):
            if self.throttle.retry_after(user_name, address) > 0:
                self.throttle.refused += 1
                return None
            if not await self._password_ok(user, password) or user is None or not user["active"]:
                self.throttle.failed(user_name, address)
                return None
        self.throttle.succeeded(user_name, address)
        return user

    def _recently_verified(self, user: Record, password: str) -> bool:
        if not user["user_password"]:
            return False
        until = self._verified.get(self._cache_key(user, password))
        return until is not None and until > time.monotonic()

    @contextlib.asynccontextmanager
    async def _one_at_a_time(self, key: tuple[str, str]) -> AsyncIterator[None]:
        lock, users = self._checking.get(key, (asyncio.Lock(), 0))
        self._checking[key] = (lock, users + 1)
        try:
            async with lock:
                yield
        finally:
            lock, users = self._checking[key]
            if users == 1:
                del self._checking[key]
            else:
                self._checking[key] = (lock, users - 1)


# --- access rules ---------------------------------------------------------------------------

MID_OUTPUT_FIELDS = frozenset({"state", "processed", "error_string"})
# What an agent reports about itself in its status record: the only ecc_agent fields a
# mid_server account may write (for its own agents). Keys and validation are never among
# them: keys come from the agent's status record over the broker, validation from admin.
AGENT_REPORTED_FIELDS = frozenset(
    {"host", "status", "version", "capabilities", "last_heartbeat", "started_at", "stats"}
    # ServiceNow's names, as a relay (a MID Server) writes them (docs/compat-mode.md)
    | {"host_name", "ip_address", "url", "started", "stopped", "last_refreshed"}
)
AGENT_KEY_FIELDS = frozenset({"public_key", "fingerprint"})
AGENT_PREFIX = "mid.server."
SYSTEM_COMMAND = "systemcommand"


def agent_of(agent_field: object) -> str | None:
    """The MID name in an ``ecc_queue.agent`` value (``mid.server.<name>``), else None."""
    if not isinstance(agent_field, str) or not agent_field.startswith(AGENT_PREFIX):
        return None
    name = agent_field[len(AGENT_PREFIX) :]
    return name if MID_AGENT_NAME.fullmatch(name) else None


def is_system_command(topic: object) -> bool:
    """``topic`` names SystemCommand in any spelling a bridge might take: case, spaces,
    invisible format characters and Unicode compatibility forms ignored."""
    if not isinstance(topic, str):
        return False
    text = unicodedata.normalize("NFKC", topic)
    kept = "".join(
        c for c in text if not c.isspace() and unicodedata.category(c) not in ("Cf", "Cc")
    )
    return kept.casefold() == SYSTEM_COMMAND


_ADMIN_ONLY = frozenset({"sys_user", "sys_user_role", "sys_user_has_role", "discovery_credentials"})


def _roles_text(roles: Iterable[str]) -> str:
    return " or ".join([*roles, "admin"])


_ECC_READERS = ("mid_server", "discovery_admin")
# ecc_agent_property: read only (a MID reads its properties; admin writes them).
_ECC_TABLES = frozenset({"ecc_queue", "ecc_agent", "ecc_agent_property"})
# discovery_admin reads runs and CIs, and writes schedules; the CI class tables count too
# (the Table API authorizes a table of a hierarchy as its root: cmdb_ci_linux_server as
# cmdb_ci).
_DISCOVERY_TABLES = frozenset({"discovery_schedule", "discovery_status", "cmdb_ci"})


def authorize_table(who: Principal, table: str) -> None:
    """Raise AuthError 403 unless ``who`` may use ``table`` at all (checked first, so a
    refused user learns nothing about records or bodies). ``table`` is a root table (the
    caller passes ``Table.physical`` for a table that extends another). Any table not
    named in these rules (the schema tables sys_db_object and sys_dictionary, groups, logs,
    tables added as sys_db_object records) is admin-only."""
    if who.is_admin:
        return
    if table in _ECC_TABLES and who.has_any(*_ECC_READERS):
        return
    if table in _DISCOVERY_TABLES and who.has_any("discovery_admin"):
        return
    if table in _ECC_TABLES:
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
      mid_server (for its own agents), an output record with discovery_admin (never a
      ``SystemCommand``: those go through the admin-only agent actions); write only
      ``state``, ``processed``, ``error_string`` of an output record of its own agents
      (claiming) with mid_server; delete: admin.
    - ``ecc_agent``: read with mid_server or discovery_admin; create and write with
      mid_server, for its own agents and only the fields an agent reports about itself
      (never ``public_key``, ``fingerprint``, ``validated``, nor a rename); delete: admin.

    A mid_server account's reads are narrowed to its own agents by the caller
    (``agent_scope``); what it may write is checked here.
    - ``discovery_schedule``: read, create and write with discovery_admin; the run tables
      and the CMDB (``discovery_status``, ``cmdb_ci``) are read with discovery_admin and
      written by the instance itself.
    - ``sys_user``, ``sys_user_role``, ``sys_user_has_role``, ``discovery_credentials``,
      and every table not named here (schema tables, tables added as records): admin only.
    """
    if who.is_admin:
        return
    fields = fields or {}
    if table in _ADMIN_ONLY or action == "delete":
        raise AuthError(403, f"{action} on {table} requires role admin")
    if action == "read":
        if table in _DISCOVERY_TABLES and who.has_any("discovery_admin"):
            return
        if table in _ECC_TABLES and who.has_any(*_ECC_READERS):
            return
        if table in _ECC_TABLES:
            raise AuthError(403, f"read on {table} requires role {_roles_text(_ECC_READERS)}")
        needed = _roles_text(["discovery_admin"]) if table in _DISCOVERY_TABLES else "admin"
        raise AuthError(403, f"read on {table} requires role {needed}")
    if table == "ecc_queue":
        _authorize_ecc(who, action, fields, record)
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
        _authorize_agent(who, action, fields, record)
        return
    raise AuthError(403, f"{action} on {table} requires role admin")


def _authorize_ecc(
    who: Principal, action: Action, fields: Mapping[str, Any], record: Mapping[str, Any] | None
) -> None:
    queue = str((record or {}).get("queue") or fields.get("queue") or "input")
    if action == "create":
        needed = "mid_server" if queue == "input" else "discovery_admin"
        if not who.has_any(needed):
            raise AuthError(
                403, f"creating an ecc_queue {queue} record requires role {_roles_text([needed])}"
            )
        if queue != "input" and is_system_command(fields.get("topic")):
            raise AuthError(
                403,
                "SystemCommand outputs are sent only by the agent actions "
                "(POST /api/midbridge/agents/<name>/<action>, role admin), "
                "not through the Table API",
            )
        if queue == "input" and "agent" in fields:
            _own_agent(who, agent_of(fields.get("agent")), "an input record's agent")
        return
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
    _own_agent(who, agent_of((record or {}).get("agent")), "the output record's agent")
    _mid_state_change(str((record or {}).get("state") or ""), fields)


# A MID claims an output (ready → processing) and closes it (→ processed or error); it
# never reopens one: a reopened output would be pushed again, freshly signed (a replay).
_MID_FROM_STATES = frozenset({"ready", "processing"})
_MID_TO_STATES = frozenset({"processing", "processed", "error"})


def _mid_state_change(current: str, fields: Mapping[str, Any]) -> None:
    if "state" not in fields:
        return
    new = fields["state"]
    if current not in _MID_FROM_STATES or new not in _MID_TO_STATES:
        raise AuthError(
            403,
            f"role mid_server may move an output from ready or processing to processing, "
            f"processed or error, not from {current or 'no state'!r} to {str(new)[:32]!r}",
        )


def _authorize_agent(
    who: Principal, action: Action, fields: Mapping[str, Any], record: Mapping[str, Any] | None
) -> None:
    if not who.has_any("mid_server"):
        raise AuthError(403, f"{action} on ecc_agent requires role {_roles_text(['mid_server'])}")
    if "validated" in fields:
        raise AuthError(403, "only admin may set ecc_agent.validated")
    keys = sorted(AGENT_KEY_FIELDS & set(fields))
    if keys:
        raise AuthError(
            403,
            f"ecc_agent.{keys[0]} is written only from the agent's own status record "
            "(over the broker), never through the Table API",
        )
    allowed = AGENT_REPORTED_FIELDS | ({"name"} if action == "create" else set())
    extra = sorted(set(fields) - allowed)
    if extra:
        raise AuthError(
            403,
            "role mid_server may set only "
            + ", ".join(sorted(allowed))
            + f" of its own agent; refused field: {extra[0]}",
        )
    name = fields.get("name") if action == "create" else (record or {}).get("name")
    _own_agent(who, name if isinstance(name, str) else None, "agent")


def _own_agent(who: Principal, name: str | None, what: str) -> None:
    if who.acts_for(name):
        return
    shown = repr(name) if name else "none"
    raise AuthError(
        403,
        f"user {who.user_name} acts for agents {', '.join(sorted(who.mid_agents)) or '(none)'}"
        f" only (sys_user.mid_agents); {what} is {shown}",
    )


def agent_scope(who: Principal, table: str) -> str | None:
    """The encoded condition that narrows ``who``'s reads of ``table`` to its own agents,
    or None if its reads are not narrowed (admin, discovery_admin, other tables)."""
    if table not in _ECC_TABLES or not who.reads_own_agents_only:
        return None
    names = sorted(who.mid_agents)
    if table == "ecc_agent_property":  # every MID's, and its own agents'
        return "ecc_agentISEMPTY" + ("^ORecc_agent.nameIN" + ",".join(names) if names else "")
    if not names:
        return "sys_id="  # no agent: no record (every record has a sys_id)
    if table == "ecc_agent":
        return "nameIN" + ",".join(names)
    return "agentIN" + ",".join(AGENT_PREFIX + name for name in names)


def in_agent_scope(who: Principal, table: str, record: Mapping[str, Any]) -> bool:
    """May ``who`` see ``record`` of ``table`` (the same rule as ``agent_scope``)?"""
    if agent_scope(who, table) is None:
        return True
    if table == "ecc_agent":
        return record.get("name") in who.mid_agents
    if table == "ecc_agent_property":  # by sys_id: every MID's only (lists see their own)
        return not record.get("ecc_agent")
    return agent_of(record.get("agent")) in who.mid_agents
