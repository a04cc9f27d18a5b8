"""SNMP: GET, GETNEXT, walks and tables against one agent, over gufo-snmp (v1, v2c, v3).

Reference: ``docs/probes/SNMP.md``. The job names its operations in ``oid_spec_list``
(``get 1.3.6.1.2.1.1.5.0``, ``walk system``, ``table ifTable ifDescr,ifType``); results
stream back in chunks of typed varbinds (:mod:`probes.snmp_values`).

What gufo-snmp does and does not do, and how this module makes up for it:

* One request at a time per session, and a v3 session pays an engine discovery when it is
  made. :class:`SnmpPool` (``ctx.resources["snmp"]``) keeps a few sessions per (address,
  port, version, credential), each leased to one job at a time.
* No retries and one timeout per session: every request here goes through
  :meth:`SnmpClient._request` (``timeout`` per try, ``retries`` more tries), which
  also drives the library's socket with one timer per request instead of its ``wait_for``.
* Its walk iterators are bounded to the subtree they started from, and a GETBULK whose
  answer is too large ends the walk *silently* (v3 at max-repetitions 50 after ~200
  varbinds; v2c raises past its 4 KB receive buffer). :meth:`SnmpClient.walk` drives the
  library's request context itself: when a GETBULK fails that way it steps on with plain
  GETNEXTs on the same context, then goes back to GETBULK, so a walk returns what
  ``snmpbulkwalk`` returns. This uses private parts of gufo-snmp (``SnmpSession._send``, ``_fd``,
  ``_recv``, ``_sock`` and ``gufo.snmp._fast.GetIter``): :func:`check_library` fails
  loudly at import if a release drops the methods, and ``tests/test_snmp.py`` checks the
  walks against net-snmp.
* No unbounded GETNEXT: ``getnext OID`` on an OID without children scans forward from
  its parent (:meth:`SnmpClient.successor`).
* noSuchObject and noSuchInstance arrive as one exception (GET) or as a missing varbind
  (GET of several OIDs); v1's noSuchName arrives as ``None``. One GETNEXT under the
  object tells the two apart (:meth:`SnmpClient.missing_kind`).
* A wrong community and a wrong v3 privacy key look like silence; a closed port comes
  as an immediate ``TimeoutError`` (→ ``connection_refused``); a wrong v3 user or
  authentication key raises ``SnmpAuthError``. A new authPriv session
  whose engine discovery (in clear) is answered but whose encrypted time sync is not gets
  ``auth_failed`` (the privacy key or protocol is wrong); other silence is ``timeout``.
* No v3 context name: a credential with a non-empty ``context`` is refused.

:func:`snmp_tap` is the Shazzam helper: is there an SNMP agent at ``host`` that answers
one of these communities?
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import functools
import ipaddress
import os
import re
import socket
import time
from collections.abc import (
    AsyncGenerator,
    AsyncIterator,
    Awaitable,
    Callable,
    Coroutine,
    Mapping,
    Sequence,
)
from dataclasses import dataclass, field
from types import SimpleNamespace
from typing import Any, Literal, Protocol, TypeVar, cast

import gufo.snmp as gufo_snmp
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
    SnmpAuthError,
    SnmpDecodeError,
    SnmpError,
    SnmpVersion,
    User,
)
from gufo.snmp._fast import GetIter
from gufo.snmp.aio.client import SnmpSession
from pydantic import BaseModel, ConfigDict, Field, field_validator
from pydantic_core import PydanticCustomError

from bridge.wire.credentials import Credential
from bridge.wire.errors import (
    AuthFailed,
    BadParameter,
    BridgeError,
    ConnectionRefused,
    CredentialError,
    ProbeTimeout,
    ProtocolError,
    Refused,
)
from bridge.wire.records import OutputRecord, error_payload
from probes import snmp_values as sv
from probes.contract import Job, ProbeContext, ProbeParams, ProbeSpec, parse_params, parse_settings
from probes.kit.fanout import fan_out, result_chunks

TOPIC = "SNMP"
RESOURCE = "snmp"  # key of the pool in ctx.resources

COMMUNITY = "snmp_community"
SNMPV3 = "snmpv3"
SYS_DESCR = "1.3.6.1.2.1.1.1.0"
SYS_OBJECT_ID = "1.3.6.1.2.1.1.2.0"
SYS_NAME = "1.3.6.1.2.1.1.5.0"
DEFAULT_SPEC = ("walk 1.3.6.1.2.1.1",)  # the system group: what classification reads first

MAX_SPEC_LINES = 256
MAX_GET_OIDS = 64  # OIDs on one get / getnext line
_GET_BATCH = 16  # OIDs in one GET request (keeps answers well under any size limit)
_SESSION_TIMEOUT = 3600.0  # gufo's own timeout: never reached, ours is applied per request
_V3_REFRESH_AFTER = 100.0  # s idle before a pooled v3 session re-syncs engine time (window 150 s)
_SWEEP_EVERY = 30.0  # s between sweeps of idle sessions
_DEADLINE_STEP = 0.02  # s: request deadlines are rounded up to this (see _Deadlines)

Version = Literal["1", "2c", "3"]
Op = Literal["get", "getnext", "walk", "table"]
_GUFO_VERSION: dict[str, SnmpVersion] = {
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

T = TypeVar("T")


def check_library() -> None:
    """Fail at import if gufo-snmp lost what :meth:`SnmpClient.walk` relies on."""
    missing = [
        name for name in ("_send", "_recv") if not callable(getattr(SnmpSession, name, None))
    ]
    if missing:
        raise ImportError(
            f"gufo-snmp {gufo_snmp.__version__} has no SnmpSession."
            f"{', '.join(missing)}: probes/snmp.py needs updating"
        )


check_library()


# --------------------------------------------------------------------------- parameters


def _clean_error(exc: ValueError) -> PydanticCustomError:
    return PydanticCustomError("value_error", str(exc))


@dataclass(frozen=True, slots=True)
class OidSpec:
    """One line of ``oid_spec_list``, parsed."""

    line: int  # 1-based
    op: Op
    oids: tuple[str, ...]
    columns: tuple[int, ...] = ()  # table only; empty: every column

    def text(self) -> str:
        head = f"{self.op} {' '.join(self.oids)}"
        if self.columns:
            return f"{head} {','.join(str(c) for c in self.columns)}"
        return head


_OPS: dict[str, Op] = {
    "get": "get",
    "getnext": "getnext",
    "walk": "walk",
    "bulkwalk": "walk",
    "getbulk": "walk",
    "table": "table",
}
_COLUMN_SPLIT = re.compile(r"[\s,]+")


def _columns(table_oid: str, text: str, where: str) -> tuple[int, ...]:
    table = sv.TABLES.get(table_oid)
    by_name = {name: cid for cid, name in table.columns.items()} if table else {}
    out: list[int] = []
    for item in (part for part in _COLUMN_SPLIT.split(text.strip()) if part):
        if item.isdigit() and 0 < int(item) < 2**32:
            column = int(item)
        elif item in by_name:
            column = by_name[item]
        else:
            known = f" (columns of {table.name}: {', '.join(by_name)})" if table else ""
            raise ValueError(f"{where}: {item[:40]!r} is not a column number or name{known}")
        if column not in out:
            out.append(column)
    return tuple(out)


def parse_spec_line(text: str, line: int) -> OidSpec | None:
    """One line → :class:`OidSpec`; ``None`` for a blank or ``#`` comment line."""
    body = text.strip()
    if not body or body.startswith("#"):
        return None
    where = f"line {line}"
    words = body.split(None, 1)
    op = _OPS.get(words[0].lower())
    if op is None:
        raise ValueError(
            f"{where}: unknown operation {words[0][:40]!r}; one of get, getnext, walk, table"
        )
    rest = words[1].strip() if len(words) > 1 else ""
    if not rest:
        raise ValueError(f"{where}: {op} needs an OID")
    try:
        if op == "table":
            table_word, *more = rest.split(None, 1)
            columns = more[0] if more else ""
            oid = sv.resolve_oid(table_word)
            if oid.endswith(".1") and oid[:-2] in sv.TABLES:
                oid = oid[:-2]  # the entry was named (ifEntry = ifTable.1): take its table
            return OidSpec(line, "table", (oid,), _columns(oid, columns, where))
        oids = tuple(sv.resolve_oid(word) for word in rest.split())
    except ValueError as exc:
        message = str(exc)
        raise ValueError(message if message.startswith(where) else f"{where}: {message}") from None
    if op == "walk" and len(oids) != 1:
        raise ValueError(f"{where}: walk takes one OID (write one walk line per subtree)")
    if len(oids) > MAX_GET_OIDS:
        raise ValueError(f"{where}: more than {MAX_GET_OIDS} OIDs on one line")
    return OidSpec(line, op, oids)


def _split_lines(text: str) -> list[str]:
    # ";" too: XML attribute values lose their newlines unless written as &#10;
    return [part for line in text.splitlines() for part in line.split(";")]


def parse_spec_list(value: Any) -> tuple[OidSpec, ...]:
    """``oid_spec_list`` (text with one operation a line, or a list of lines) → specs.

    Lines are separated by newlines or ``;`` and numbered from 1 in that order (blank and
    ``#`` comment lines count), which is how errors name them.
    """
    if isinstance(value, str):
        lines = _split_lines(value)
    elif isinstance(value, list | tuple) and all(isinstance(v, str) for v in value):
        lines = [part for item in value for part in (_split_lines(item) or [""])]
    else:
        raise ValueError("must be text (one operation a line) or a list of lines")
    if len(lines) > MAX_SPEC_LINES:
        raise ValueError(f"more than {MAX_SPEC_LINES} lines")
    specs = [spec for n, text in enumerate(lines, 1) if (spec := parse_spec_line(text, n))]
    if not specs:
        raise ValueError("no operation given (e.g. 'get 1.3.6.1.2.1.1.5.0')")
    return tuple(specs)


def normalize_version(value: Any) -> Version | None:
    if value is None or value == "":
        return None
    key = str(value).strip().lower()
    if key not in _VERSION_ALIASES:
        raise ValueError(f"{str(value)[:20]!r} is not an SNMP version; one of 1, 2c, 3")
    return _VERSION_ALIASES[key]  # type: ignore[return-value]


class SnmpParams(ProbeParams):
    """A job. ``oid_spec_list`` holds the canonical lines (numeric OIDs, column numbers)."""

    host: str | None = Field(None, min_length=1, max_length=253)
    hosts: tuple[str, ...] | None = None  # many agents in one job (see ``run_many``)
    port: int = Field(161, ge=1, le=65535)
    version: Version | None = None  # None: from the credential (community → 2c, snmpv3 → 3)
    credential_id: str | None = Field(None, min_length=1, max_length=200)
    oid_spec_list: tuple[str, ...] = DEFAULT_SPEC
    max_repetitions: int = Field(10, ge=1, le=100)
    timeout: float = Field(2.0, gt=0, le=60)  # seconds per try of one request
    retries: int = Field(1, ge=0, le=10)  # more tries after a timeout
    max_varbinds: int = Field(10_000, ge=1)
    chunk_varbinds: int = Field(1000, ge=1, le=100_000)  # varbinds in one result chunk
    concurrency: int = Field(100, ge=1, le=10_000)  # agents of a ``hosts`` job at once
    chunk_agents: int = Field(100, ge=1, le=100_000)  # agents in one result chunk

    @field_validator("version", mode="before")
    @classmethod
    def _version(cls, value: Any) -> Version | None:
        try:
            return normalize_version(value)
        except ValueError as exc:
            raise _clean_error(exc) from None

    @field_validator("host", mode="before")
    @classmethod
    def _host(cls, value: Any) -> Any:
        if isinstance(value, str):
            try:
                return _check_host(value)
            except ValueError as exc:
                raise _clean_error(exc) from None
        return value

    @field_validator("hosts", mode="before")
    @classmethod
    def _hosts(cls, value: Any) -> Any:
        if value is None:
            return None
        if isinstance(value, str):  # XML parameters are text: one list, spaces or commas
            value = value.replace(",", " ").split()
        if not isinstance(value, list | tuple):
            return value  # pydantic reports the type
        for n, one in enumerate(value):
            if not isinstance(one, str):
                raise _clean_error(ValueError(f"entry {n}: is not text"))
        try:
            return _check_hosts(tuple(value))
        except ValueError as exc:
            raise _clean_error(exc) from None

    @field_validator("oid_spec_list", mode="before")
    @classmethod
    def _spec(cls, value: Any) -> tuple[str, ...]:
        try:
            return tuple(spec.text() for spec in parse_spec_list(value))
        except ValueError as exc:
            raise _clean_error(exc) from None

    def specs(self) -> tuple[OidSpec, ...]:
        return _canonical_specs(self.oid_spec_list)


@functools.lru_cache(maxsize=1024)
def _canonical_specs(lines: tuple[str, ...]) -> tuple[OidSpec, ...]:
    return parse_spec_list(list(lines))


def _check_host(value: str) -> str:
    value = value.strip()
    if value.startswith("[") and value.endswith("]"):
        value = value[1:-1]
    if value and not _is_ip(value) and not _HOST_RE.match(value):
        raise ValueError(f"{value[:80]!r} is not an IP address or host name")
    return value


@functools.lru_cache(maxsize=16)  # a poller's few lists; up to 10,000 hosts each
def _check_hosts(values: tuple[str, ...]) -> tuple[str, ...]:
    """A host list, each checked (cached: a poller sends the same list again and again)."""
    if not values:
        raise ValueError("is empty: name at least one agent")
    checked: list[str] = []
    for n, value in enumerate(values):
        if not value.strip():
            raise ValueError(f"entry {n} is empty")
        try:
            checked.append(_check_host(value))
        except ValueError as exc:
            raise ValueError(f"entry {n}: {exc}") from None
    return tuple(checked)


_HOST_RE = re.compile(r"^(?=.{1,253}$)[A-Za-z0-9]([A-Za-z0-9-]{0,62})(\.[A-Za-z0-9-]{1,63})*\.?$")


def _is_ip(text: str) -> bool:
    return _ip_literal(text) is not None


@functools.lru_cache(maxsize=4096)
def _ip_literal(text: str) -> str | None:
    """The canonical text of an IP literal, ``None`` for anything else."""
    try:
        return str(ipaddress.ip_address(text))
    except ValueError:
        return None


class SnmpSettings(BaseModel):
    """``[probes.settings.SNMP]``: defaults of the parameters and limits of the pool."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    timeout: float = Field(2.0, gt=0, le=60)
    retries: int = Field(1, ge=0, le=10)
    max_repetitions: int = Field(10, ge=1, le=100)
    max_varbinds: int = Field(10_000, ge=1, le=10_000_000)  # default and ceiling per job
    chunk_varbinds: int = Field(1000, ge=1, le=100_000)
    sessions_per_target: int = Field(2, ge=1, le=64)  # concurrent leases per agent+credential
    max_sessions: int = Field(1024, ge=1, le=65_536)  # idle sessions kept across agents
    idle_seconds: float = Field(300.0, gt=0)  # an idle session older than this is dropped
    concurrency: int = Field(100, ge=1, le=10_000)  # default agents at once in a hosts job
    max_hosts: int = Field(10_000, ge=1, le=1_000_000)  # agents one job may name
    max_in_flight: int = Field(256, ge=1, le=65_536)  # agents queried at once, all hosts jobs


def settings_of(raw: Mapping[str, Any]) -> SnmpSettings:
    """The probe's settings, validated (once per distinct settings: jobs ask every time)."""
    try:
        key = tuple(sorted(raw.items()))
        cached = _SETTINGS.get(key)
    except TypeError:  # an unhashable value: validation will name it
        key, cached = None, None
    if cached is not None:
        return cached
    settings = _validate_settings(raw)
    if key is not None:
        if len(_SETTINGS) > 64:
            _SETTINGS.clear()
        _SETTINGS[key] = settings
    return settings


_SETTINGS: dict[tuple[tuple[str, Any], ...], SnmpSettings] = {}


def _validate_settings(raw: Mapping[str, Any]) -> SnmpSettings:
    return parse_settings(SnmpSettings, raw, TOPIC)


def build_params(record: OutputRecord, settings: Mapping[str, Any]) -> SnmpParams:
    """Parameters from the payload; ``host`` defaults to the record's ``source``."""
    cfg = settings_of(settings)
    data = {k: v for k, v in record.payload.items() if v is not None}
    if "hosts" in data:
        if "host" in data:
            raise BadParameter("give either host or hosts, not both", field="hosts")
    elif "host" not in data:
        if not record.source.strip():
            raise BadParameter("no host: give payload 'host' or the record's source", field="host")
        data["host"] = record.source
    for key in ("timeout", "retries", "max_repetitions", "max_varbinds", "chunk_varbinds"):
        data.setdefault(key, getattr(cfg, key))
    data.setdefault("concurrency", cfg.concurrency)
    params = parse_params(SnmpParams, data)
    if params.hosts is not None and len(params.hosts) > cfg.max_hosts:
        raise Refused(
            f"{len(params.hosts)} hosts is over the limit of {cfg.max_hosts}"
            f" (probes.settings.{TOPIC}.max_hosts)",
            field="hosts",
        )
    if params.max_varbinds > cfg.max_varbinds:
        raise Refused(
            f"max_varbinds {params.max_varbinds} is over the limit of {cfg.max_varbinds}"
            f" (probes.settings.{TOPIC}.max_varbinds)",
            field="max_varbinds",
        )
    return params


# --------------------------------------------------------------------------- credentials

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


def _fingerprint(cred: Credential) -> str:
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


# --------------------------------------------------------------------------- client

_END = object()  # the library said the walk is over (or a GETBULK answer was refused)
_DECODE = object()  # the answer did not decode (e.g. larger than the receive buffer)


@dataclass(frozen=True, slots=True)
class Policy:
    timeout: float  # seconds per try
    retries: int  # more tries after a timeout

    @property
    def tries(self) -> int:
        return self.retries + 1


class Waker(Protocol):
    """What a pooled socket's reader and the deadline buckets call: a waiting request."""

    def wake(self) -> None: ...

    def expire(self) -> None: ...


class _Wait:
    """The future one request waits on: the reader sets it ``True``, the timer ``False``."""

    __slots__ = ("future",)

    def __init__(self, future: asyncio.Future[bool]) -> None:
        self.future = future

    def wake(self) -> None:
        if not self.future.done():
            self.future.set_result(True)

    def expire(self) -> None:
        if not self.future.done():
            self.future.set_result(False)

    def forget(self) -> None:
        """The request is over: a deadline bucket still holding this needs no future."""
        self.future = _SETTLED


_SETTLED: Any = SimpleNamespace(done=lambda: True)  # stands for a future already set


class _Deadlines:
    """Request timeouts, gathered in buckets of :data:`_DEADLINE_STEP` seconds.

    One timer per bucket instead of one per request (a uvloop timer made and cancelled
    for every GET costs a few µs): a request's deadline is rounded up to its bucket's end,
    so it expires up to a step late, never early. An answered request stays in its bucket
    (forgotten, without its future) until the bucket fires.
    """

    __slots__ = ("buckets", "loop")

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self.loop = loop
        self.buckets: dict[int, list[Waker]] = {}

    def add(self, wait: Waker, timeout: float) -> None:
        slot = int((self.loop.time() + timeout) / _DEADLINE_STEP) + 1
        bucket = self.buckets.get(slot)
        if bucket is None:
            bucket = self.buckets[slot] = []
            self.loop.call_at(slot * _DEADLINE_STEP, self._fire, slot)
        bucket.append(wait)

    def _fire(self, slot: int) -> None:
        for wait in self.buckets.pop(slot, ()):
            wait.expire()


class _Gate:
    """A semaphore that hands a freed slot straight to the next waiter.

    ``asyncio.Semaphore`` costs about 2 µs to take and give back even when free (3.11
    checks every waiter in ``locked()``); a pooled session is leased once per GET.
    """

    __slots__ = ("free", "waiters")

    def __init__(self, slots: int) -> None:
        self.free = slots
        self.waiters: collections.deque[asyncio.Future[None]] = collections.deque()

    def try_take(self) -> bool:
        if self.free > 0 and not self.waiters:
            self.free -= 1
            return True
        return False

    async def take(self) -> None:
        if self.try_take():
            return
        waiter: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self.waiters.append(waiter)
        try:
            await waiter
        except asyncio.CancelledError:
            if waiter.done() and not waiter.cancelled():
                self.give()  # handed a slot just as we were cancelled: pass it on
            else:
                with contextlib.suppress(ValueError):
                    self.waiters.remove(waiter)
            raise

    def give(self) -> None:
        while self.waiters:
            waiter = self.waiters.popleft()
            if not waiter.done():
                waiter.set_result(None)
                return
        self.free += 1


class _Reader:
    """A pooled session's socket, registered with the event loop once for its life.

    Registering a socket per request (what the library does: ``add_reader`` and
    ``remove_reader`` around each answer) costs uvloop a poll handle and two
    ``epoll_ctl`` calls a request, about a quarter of a GET. A pooled session keeps one
    registration: while a request waits, readable wakes its future; with none waiting,
    the datagram is a late answer to a request given up on and is read and dropped (a
    level-triggered poll would call again and again otherwise).
    """

    __slots__ = ("deadlines", "fd", "loop", "waiter")

    def __init__(self, fd: int, deadlines: _Deadlines) -> None:
        self.fd = fd
        self.deadlines = deadlines
        self.loop = deadlines.loop
        self.waiter: Waker | None = None
        self.loop.add_reader(fd, self._readable)

    def _readable(self) -> None:
        waiter = self.waiter
        if waiter is not None:
            waiter.wake()
            return
        with contextlib.suppress(OSError):  # nothing left, or an ICMP error for a request
            os.read(self.fd, 65_536)

    def close(self) -> None:
        self.loop.remove_reader(self.fd)


class _Prefetch:
    """A request sent ahead (a walk's next GETBULK): its answer is read as soon as it
    comes, in the reader's callback, and kept until the walk asks for it."""

    __slots__ = ("done", "error", "future", "reader", "recv", "result")

    def __init__(self, recv: Callable[[], Any], reader: _Reader) -> None:
        self.recv = recv
        self.reader = reader
        self.future: asyncio.Future[bool] = reader.loop.create_future()
        self.done = False
        self.result: Any = None
        self.error: BaseException | None = None

    def wake(self) -> None:
        if self.done:  # a datagram after the answer (a duplicate): drop it
            with contextlib.suppress(OSError):
                os.read(self.reader.fd, 65_536)
            return
        try:
            self.result = self.recv()
        except BlockingIOError:
            return  # an answer to an earlier request: wait on
        except BaseException as exc:
            self.error = exc
        self.done = True
        if not self.future.done():
            self.future.set_result(True)

    def expire(self) -> None:
        if not self.future.done():
            self.future.set_result(False)


def silence(policy: Policy, version: Version) -> ProbeTimeout:
    """The error for an agent that never answered."""
    tries = f"{policy.tries} {'try' if policy.tries == 1 else 'tries'}"
    message = f"no answer from the agent ({tries} of {policy.timeout:g} s)"
    if version != "3":
        message += "; a wrong community gets no answer either"
    return ProbeTimeout(message)


def _refused() -> ConnectionRefused:
    return ConnectionRefused(
        "nothing listens on this UDP port (the host answered port unreachable)"
    )


def _translate(exc: BaseException) -> BaseException:
    """A library or socket failure as the bridge's error; anything else as it is."""
    if isinstance(exc, BridgeError | asyncio.CancelledError):
        return exc
    if isinstance(exc, SnmpAuthError):
        return AuthFailed("the agent refused the SNMPv3 user or its authentication key/protocol")
    if isinstance(exc, SnmpError):  # what gufo-snmp does not name more precisely
        return ProtocolError(f"SNMP error from the library: {str(exc)[:200]}")
    if isinstance(exc, ConnectionRefusedError):
        return _refused()
    if isinstance(exc, OSError):
        return BridgeError(f"network error: {exc.strerror or exc}")
    return exc


class SnmpClient:
    """One leased gufo session plus the retry policy of the job that holds it."""

    def __init__(
        self,
        session: SnmpSession,
        *,
        version: Version,
        has_priv: bool,
        policy: Policy,
        reader: _Reader | None = None,
    ):
        self.session = session
        self.reader = reader  # the session's lasting registration, if pooled
        self.version = version
        self.has_priv = has_priv
        self.policy = policy
        self.requests = 0  # sent, retries included
        self.resumed = 0  # GETBULK answers the library refused; the walk went on by GETNEXT

    async def _retry(self, make: Callable[[], Awaitable[T]]) -> T:
        """``make()`` with our timeout, ``retries`` more times on silence (v3 refresh only)."""
        for _ in range(self.policy.tries):
            self.requests += 1
            deadline = asyncio.timeout(self.policy.timeout)
            try:
                async with deadline:
                    return await make()
            except TimeoutError:
                if deadline.expired():
                    continue
                raise _refused() from None
            except BaseException as exc:
                raise _translate(exc) from None
        raise self._silence()

    async def _request(
        self, send: Callable[[], None], recv: Callable[[], T], *, tries: int | None = None
    ) -> T | object:
        """One request on the session's socket, ``retries`` more times on silence.

        The library's own path (``_send`` then ``_recv``, which runs ``wait_for``) under an
        ``asyncio.timeout`` costs two timers and three futures a request; this is one
        reader, one timer and one future. A datagram the library drops (an old request id)
        reads as ``BlockingIOError``: wait on. ``_END`` / ``_DECODE`` instead of the
        library's ``StopAsyncIteration`` / ``SnmpDecodeError``.
        """
        session = self.session
        reader = self.reader
        loop = reader.loop if reader is not None else asyncio.get_running_loop()
        fd = session._fd
        timeout = self.policy.timeout
        for _ in range(self.policy.tries if tries is None else tries):
            self.requests += 1
            try:
                try:
                    send()
                except BlockingIOError:  # the send buffer is full: the library waits
                    await session._send(send)
            except BaseException as exc:
                raise _translate(exc) from None
            wait = _Wait(loop.create_future())
            timer: asyncio.TimerHandle | None = None
            if reader is None:
                loop.add_reader(fd, wait.wake)
                timer = loop.call_later(timeout, wait.expire)
            else:
                reader.waiter = wait
                reader.deadlines.add(wait, timeout)
            try:
                while await wait.future:
                    try:
                        return recv()
                    except BlockingIOError:
                        wait.future = loop.create_future()
                    except StopAsyncIteration:
                        return _END
                    except SnmpDecodeError:
                        return _DECODE
                    except TimeoutError:
                        # gufo-snmp reports a refused port (ICMP port unreachable) so.
                        raise _refused() from None
                    except BaseException as exc:
                        raise _translate(exc) from None
            finally:
                if timer is not None:
                    loop.remove_reader(fd)
                    timer.cancel()
                else:
                    reader.waiter = None  # type: ignore[union-attr]
                    wait.forget()
        raise self._silence()

    def _send_ahead(self, send: Callable[[], None], recv: Callable[[], Any]) -> _Prefetch | None:
        """Send the next request of a walk now, before the caller works on this answer, so
        the agent answers while the bridge types and stores varbinds. ``None`` when it
        cannot (no lasting reader, or the send failed: :meth:`_request` sends it later and
        reports what goes wrong)."""
        reader = self.reader
        if reader is None:
            return None
        try:
            send()
        except BaseException:
            return None
        self.requests += 1
        ahead = _Prefetch(recv, reader)
        reader.waiter = ahead
        return ahead

    async def _collect(
        self, ahead: _Prefetch, send: Callable[[], None], recv: Callable[[], T]
    ) -> T | object:
        """The answer to a request sent by :meth:`_send_ahead` (as :meth:`_request` gives
        it); on silence, the remaining tries go through :meth:`_request`."""
        reader = ahead.reader
        try:
            if not ahead.done:
                reader.deadlines.add(ahead, self.policy.timeout)
                if not await ahead.future:
                    ahead.done = True  # given up: what comes late is drained
                    if self.policy.tries > 1:
                        return await self._request(send, recv, tries=self.policy.tries - 1)
                    raise self._silence()
        finally:
            if reader.waiter is ahead:
                reader.waiter = None
        error = ahead.error
        if error is None:
            return cast(T, ahead.result)
        if isinstance(error, StopAsyncIteration):
            return _END
        if isinstance(error, SnmpDecodeError):
            return _DECODE
        if isinstance(error, TimeoutError):
            raise _refused()
        raise _translate(error) from None

    def _silence(self) -> ProbeTimeout:
        return silence(self.policy, self.version)

    async def refresh(self) -> None:
        """SNMPv3 engine discovery (new session) and time sync, with our timeout and retries."""
        await self._retry(self.session.refresh)

    async def discover(self) -> None:
        """:meth:`refresh` for a new v3 session, telling a wrong privacy key from silence.

        The agent answers discovery in clear, then drops the encrypted time sync that
        follows if the privacy key or protocol is wrong (no report, no error).
        """
        try:
            await self.refresh()
        except ProbeTimeout:
            if self.has_priv and self.session.get_engine_id():
                raise AuthFailed(
                    "the agent answered SNMPv3 engine discovery but not the encrypted request"
                    " that follows: the privacy key or protocol is wrong"
                ) from None
            raise

    async def get(self, oids: Sequence[str]) -> dict[str, Any]:
        """``{oid: value}`` for every OID; one the agent lacks maps to ``_Missing(kind)``."""
        found: dict[str, Any] = {}
        for start in range(0, len(oids), _GET_BATCH):
            batch = list(oids[start : start + _GET_BATCH])
            answer = await self._get_many(batch)
            if self.version == "1" and (len(answer) < len(batch) or None in answer.values()):
                # v1: one noSuchName voids the whole answer; ask one by one
                answer = {}
                for oid in batch:
                    value = await self._get_one(oid)
                    if value is not None:
                        answer[oid] = value
            found.update(answer)
        for oid in oids:
            if oid not in found or (self.version == "1" and found[oid] is None):
                found[oid] = _Missing(await self.missing_kind(oid))
        return found

    async def _get_many(self, oids: list[str]) -> dict[str, Any]:
        sock = self.session._sock
        got = await self._request(lambda: sock.send_get_many(oids), sock.recv_get_many)
        if got is _DECODE or got is _END:
            raise ProtocolError("the agent's answer did not decode")
        return got  # type: ignore[return-value]

    async def _get_one(self, oid: str) -> Any:
        sock = self.session._sock

        def recv() -> Any:
            try:
                return sock.recv_get()
            except (SnmpAuthError, SnmpDecodeError):
                raise
            except SnmpError:  # NoSuchInstance and the v1 error statuses
                return None

        got = await self._request(lambda: sock.send_get(oid), recv)
        if got is _DECODE or got is _END:
            raise ProtocolError("the agent's answer did not decode")
        return got

    async def walk(self, root: str, max_repetitions: int) -> AsyncGenerator[tuple[str, Any], None]:
        """Every ``(oid, value)`` under ``root``, in order, by GETBULK (GETNEXT for v1).

        Nothing is sent ahead: callers of this (tables, getnext) often stop early."""
        answers = self.walk_answers(root, max_repetitions, room=0)
        async with contextlib.aclosing(answers):
            async for answer in answers:
                for item in answer:
                    yield item

    async def walk_answers(
        self, root: str, max_repetitions: int, *, room: int | None = None
    ) -> AsyncGenerator[list[tuple[str, Any]], None]:
        """:meth:`walk` an answer at a time: the varbinds of each GETBULK (or GETNEXT) in a
        list, so a caller pays the generator once per request, not once per varbind.

        After a full GETBULK answer the next GETBULK is sent at once, before the answer is
        handed over (:meth:`_send_ahead`): the agent works on it while the caller types
        and stores the varbinds. ``room``: the varbinds the caller will take at most
        (``None``: all); nothing is sent ahead that the caller would not read, since a
        late answer left in flight could reach the session's next request (an answer too
        large for the library's buffer fails to decode before its request id is checked).
        """
        sock = self.session._sock
        bulk = self.version != "1" and max_repetitions > 1
        ctx = GetIter(root, max_repetitions) if bulk else GetIter(root)
        stepping = 0  # GETNEXTs to send before the next GETBULK
        ahead: _Prefetch | None = None
        handed = 0  # varbinds handed over so far

        def send_bulk() -> None:
            sock.send_get_bulk(ctx)

        def recv_bulk() -> list[tuple[str, Any] | None]:
            return sock.recv_get_bulk(ctx)

        def send_next() -> None:
            sock.send_get_next(ctx)

        def recv_next() -> tuple[str, Any]:
            return sock.recv_get_next(ctx)

        try:
            while True:
                if bulk and stepping == 0:
                    sent, ahead = ahead, None
                    got: Any = (
                        await self._collect(sent, send_bulk, recv_bulk)
                        if sent is not None
                        else await self._request(send_bulk, recv_bulk)
                    )
                    if got is _END or got is _DECODE:
                        # Too big for the library (or the end of the MIB view): one by one.
                        self.resumed += 1
                        stepping = max_repetitions
                        continue
                    if not got:
                        return
                    if None in got:  # the end of the subtree inside this answer
                        yield got[: got.index(None)]
                        return
                    handed += len(got)
                    if len(got) >= max_repetitions and (room is None or handed <= room):
                        ahead = self._send_ahead(send_bulk, recv_bulk)  # the walk goes on
                    yield got
                else:
                    got = await self._request(send_next, recv_next)
                    if got is _END:
                        return
                    if got is _DECODE:
                        raise ProtocolError(f"an answer while walking {root} did not decode")
                    yield [got]
                    if stepping:
                        stepping -= 1
        finally:
            if ahead is not None:  # the caller stopped early: drain its answer when it comes
                ahead.done = True
                if ahead.reader.waiter is ahead:
                    ahead.reader.waiter = None

    async def first_under(self, root: str) -> tuple[str, Any] | None:
        """The first ``(oid, value)`` strictly under ``root``: one GETNEXT."""
        sock = self.session._sock
        ctx = GetIter(root)

        def send() -> None:
            sock.send_get_next(ctx)

        def recv() -> tuple[str, Any]:
            return sock.recv_get_next(ctx)

        got: Any = await self._request(send, recv)
        if got is _END:
            return None
        if got is _DECODE:
            raise ProtocolError(f"the answer to a GETNEXT of {root} did not decode")
        return got  # type: ignore[no-any-return]

    async def successor(self, oid: str, max_repetitions: int, limit: int) -> tuple[str, Any] | None:
        """What a GETNEXT of ``oid`` answers (``None``: end of the MIB view).

        gufo-snmp only walks within a subtree, so: the first OID under ``oid``; else the
        first OID after it under its parent, its grandparent, ... (at most ``limit``
        varbinds read on the way).
        """
        first = await self.first_under(oid)
        if first is not None:
            return first
        arcs = oid.split(".")
        key = sv.oid_key(oid)
        scanned = 0
        for depth in range(len(arcs) - 1, 1, -1):
            parent = ".".join(arcs[:depth])
            async with contextlib.aclosing(self.walk(parent, max_repetitions)) as items:
                async for found, value in items:
                    if sv.oid_key(found) > key:
                        return found, value
                    scanned += 1
                    if scanned >= limit:
                        raise BridgeError(
                            f"getnext {oid}: no answer within {limit} varbinds read forward"
                            " from its parent (use walk for this subtree)"
                        )
        return None

    async def missing_kind(self, oid: str) -> str:
        """noSuchInstance if the object (``oid`` minus its last part) has instances."""
        parent = oid.rsplit(".", 1)[0]
        if parent.count(".") < 1:
            return sv.NO_SUCH_OBJECT
        found = await self.first_under(parent)
        return sv.NO_SUCH_INSTANCE if found is not None else sv.NO_SUCH_OBJECT


@dataclass(frozen=True, slots=True)
class _Missing:
    kind: str


# --------------------------------------------------------------------------- pool


@dataclass(frozen=True, slots=True)
class Target:
    address: str  # IP literal
    port: int
    version: Version


@dataclass(slots=True, eq=False)
class _Pooled:
    session: SnmpSession
    has_priv: bool
    reader: _Reader | None = None  # registered once discovery is done
    last_used: float = field(default_factory=time.monotonic)
    client: SnmpClient | None = None  # made on the first lease, reset on each

    def lease_client(self, version: Version, policy: Policy) -> SnmpClient:
        client = self.client
        if client is None:
            client = self.client = SnmpClient(
                self.session,
                version=version,
                has_priv=self.has_priv,
                policy=policy,
                reader=self.reader,
            )
            return client
        client.policy = policy
        client.reader = self.reader
        client.requests = 0
        client.resumed = 0
        return client

    def listen(self, deadlines: _Deadlines) -> None:
        if self.reader is None:
            self.reader = _Reader(self.session._fd, deadlines)

    def fresh(self) -> bool:
        """For v3: still within the agent's engine time window (no re-sync needed)."""
        return time.monotonic() - self.last_used < _V3_REFRESH_AFTER

    def drop(self) -> None:
        """Unregister the socket: the session is about to be forgotten (and closed)."""
        if self.reader is not None:
            self.reader.close()
            self.reader = None


@dataclass(slots=True)
class _Group:
    gate: _Gate
    idle: list[_Pooled] = field(default_factory=list)
    leased: int = 0


def new_session(target: Target, cred: Credential) -> tuple[SnmpSession, bool]:
    """A gufo session for ``cred`` (not yet discovered for v3) and whether it encrypts."""
    try:
        if target.version == "3":
            user = v3_user(cred)
            session = SnmpSession(
                addr=target.address,
                port=target.port,
                user=user,
                version=SnmpVersion.v3,
                timeout=_SESSION_TIMEOUT,
            )
            return session, user.priv_key is not None
        return (
            SnmpSession(
                addr=target.address,
                port=target.port,
                community=cred.fields["community"],
                version=_GUFO_VERSION[target.version],
                timeout=_SESSION_TIMEOUT,
            ),
            False,
        )
    except OSError as exc:
        raise BridgeError(f"cannot open a UDP socket: {exc.strerror or exc}") from None


class _Lease:
    """One lease of :class:`SnmpPool` (a class, not a generator: it runs once per job)."""

    __slots__ = ("cred", "group", "policy", "pool", "pooled", "target")

    def __init__(
        self, pool: SnmpPool, group: _Group, target: Target, cred: Credential, policy: Policy
    ) -> None:
        self.pool = pool
        self.group = group
        self.target = target
        self.cred = cred
        self.policy = policy
        self.pooled: _Pooled | None = None

    async def __aenter__(self) -> SnmpClient:
        self.pooled = pooled = await self.pool.enter(
            self.group, self.target, self.cred, self.policy
        )
        return pooled.lease_client(self.target.version, self.policy)

    async def __aexit__(self, exc_type: object, exc: BaseException | None, tb: object) -> None:
        self.pool.leave(self.group, self.pooled, exc is None or _sound(exc))


class SnmpPool:
    """Sessions kept per (address, port, version, credential); one job per session at a time.

    A v3 session costs an engine discovery and a time sync when made (~450 sessions/s
    against one agent, where a kept session answers thousands of GETs/s), and gufo-snmp
    mixes up answers when two requests share a session. So each job *leases* a session:
    an idle one if there is one, else a new one while fewer than ``per_target`` are
    leased for that key, else it waits. Sessions idle longer than ``idle_seconds`` are
    dropped (gufo-snmp sessions have no close: dropping the last reference closes the
    socket). The pool also remembers which credential last worked for an agent, so a job
    that tries several starts with that one.
    """

    def __init__(
        self,
        *,
        per_target: int = 2,
        max_sessions: int = 1024,
        idle_seconds: float = 300.0,
        max_in_flight: int = 256,
    ) -> None:
        self.per_target = per_target
        self.max_sessions = max_sessions
        self.idle_seconds = idle_seconds
        self._groups: dict[tuple[str, int, str, str], _Group] = {}  # address, port, version, cred
        self._working: dict[tuple[str, int], str] = {}  # (address, port) → credential id
        self._idle_count = 0
        self._last_sweep = time.monotonic()
        self._closed = False
        self.created = 0  # sessions made over the pool's life (v3: one discovery each)
        self.budget = asyncio.Semaphore(max_in_flight)  # agents queried at once by hosts jobs
        self._timeouts: _Deadlines | None = None

    @property
    def idle(self) -> int:
        return self._idle_count

    def preferred(self, address: str, port: int) -> str | None:
        return self._working.get((address, port))

    def remember(self, address: str, port: int, cred_id: str) -> None:
        if len(self._working) >= 65_536:
            self._working.clear()
        self._working[(address, port)] = cred_id

    def lease(self, target: Target, cred: Credential, policy: Policy) -> _Lease:
        """``async with pool.lease(...) as client``: a session of its own for the block."""
        return _Lease(self, self.group(target, cred), target, cred, policy)

    def group(self, target: Target, cred: Credential) -> _Group:
        """The sessions of (target, credential), marked in use: :meth:`enter` must follow."""
        return self.group_of(target.address, target.port, target.version, _fingerprint(cred))

    def group_of(self, address: str, port: int, version: str, fingerprint: str) -> _Group:
        """:meth:`group` by its parts (``fingerprint``: :func:`_fingerprint` of the credential)."""
        if self._closed:
            raise BridgeError("the SNMP session pool is closed (the bridge is stopping)")
        key = (address, port, version, fingerprint)
        group = self._groups.get(key)
        if group is None:
            group = self._groups[key] = _Group(_Gate(self.per_target))
        group.leased += 1  # from now on: the group is in use, the sweep keeps it
        return group

    async def enter(
        self, group: _Group, target: Target, cred: Credential, policy: Policy
    ) -> _Pooled:
        """A session of the group for the caller alone, until :meth:`leave`."""
        if not group.gate.try_take():
            try:
                await group.gate.take()
            except BaseException:
                group.leased -= 1
                raise
        idle = group.idle
        if idle and (target.version != "3" or idle[-1].fresh()):
            self._idle_count -= 1
            return idle.pop()  # the common case, without a coroutine
        try:
            return await self._take(group, target, cred, policy)
        except BaseException:
            self.leave(group, None, keep=False)
            raise

    def enter_now(
        self, group: _Group, address: str, port: int, version: Version, cred: Credential
    ) -> _Pooled | None:
        """:meth:`enter` when it needs no wait: a free slot and an idle (or new v1/v2c)
        session. ``None``: nothing taken, and the group is no longer marked in use by the
        caller (call :meth:`group` again to use the awaiting :meth:`enter`)."""
        if not group.gate.try_take():
            group.leased -= 1
            return None
        idle = group.idle
        if idle and (version != "3" or idle[-1].fresh()):
            self._idle_count -= 1
            return idle.pop()
        if version == "3":  # engine discovery first: that waits
            group.gate.give()
            group.leased -= 1
            return None
        try:
            session, has_priv = new_session(Target(address, port, version), cred)
        except BaseException:
            self.leave(group, None, keep=False)
            raise
        self.created += 1
        pooled = _Pooled(session, has_priv)
        try:
            pooled.listen(self._deadlines())
        except BaseException:
            self.leave(group, None, keep=False)
            raise
        return pooled

    def leave(self, group: _Group, pooled: _Pooled | None, keep: bool) -> None:
        """Give back what :meth:`enter` gave (``keep``: the session may serve again)."""
        self._give_back(group, pooled, keep)

    def _give_back(self, group: _Group, pooled: _Pooled | None, keep: bool) -> None:
        if pooled is not None:
            if keep and not self._closed:
                pooled.last_used = time.monotonic()
                group.idle.append(pooled)
                self._idle_count += 1
            else:
                pooled.drop()
        group.gate.give()
        group.leased -= 1
        if self._idle_count > self.max_sessions or (
            pooled is not None and pooled.last_used - self._last_sweep >= _SWEEP_EVERY
        ):
            self._sweep()

    async def _take(
        self, group: _Group, target: Target, cred: Credential, policy: Policy
    ) -> _Pooled:
        while group.idle:
            pooled = group.idle.pop()
            self._idle_count -= 1
            if target.version != "3" or pooled.fresh():
                return pooled
            # The library's refresh registers the socket itself: step aside meanwhile.
            pooled.drop()
            client = SnmpClient(
                pooled.session, version="3", has_priv=pooled.has_priv, policy=policy
            )
            try:
                await client.refresh()  # engine time window: 150 s
            except AuthFailed:
                continue  # the agent changed (engine id, users): make a new session
            pooled.listen(self._deadlines())
            return pooled
        session, has_priv = new_session(target, cred)
        self.created += 1
        if target.version == "3":
            await SnmpClient(session, version="3", has_priv=has_priv, policy=policy).discover()
        pooled = _Pooled(session, has_priv)
        pooled.listen(self._deadlines())
        return pooled

    @property
    def deadlines(self) -> _Deadlines:
        return self._deadlines()

    def _deadlines(self) -> _Deadlines:
        if self._timeouts is None:
            self._timeouts = _Deadlines(asyncio.get_running_loop())
        return self._timeouts

    def _sweep(self) -> None:
        """Drop idle sessions past ``idle_seconds``, then the oldest past ``max_sessions``
        (run on a give-back at most every :data:`_SWEEP_EVERY` s, or when over the cap)."""
        now = time.monotonic()
        self._last_sweep = now
        for key, group in list(self._groups.items()):
            fresh = [p for p in group.idle if now - p.last_used < self.idle_seconds]
            if len(fresh) < len(group.idle):
                for pooled in group.idle:
                    if now - pooled.last_used >= self.idle_seconds:
                        pooled.drop()
            self._idle_count -= len(group.idle) - len(fresh)
            group.idle = fresh
            if not group.idle and group.leased == 0:
                del self._groups[key]
        excess = self._idle_count - self.max_sessions
        if excess > 0:  # drop the least recently used
            idle = [(p, g) for g in self._groups.values() for p in g.idle]
            idle.sort(key=lambda item: item[0].last_used)
            for pooled, group in idle[:excess]:
                group.idle.remove(pooled)
                pooled.drop()
            self._idle_count -= excess

    async def aclose(self) -> None:
        """Drop every session (their sockets close with them)."""
        self._closed = True
        for group in self._groups.values():
            for pooled in group.idle:
                pooled.drop()
        self._groups.clear()
        self._working.clear()
        self._idle_count = 0


def _sound(exc: BaseException) -> bool:
    """Whether a session that saw ``exc`` may serve the next job.

    Timeouts, cancellation and the job's own errors leave it sound (gufo-snmp drops late
    answers by request id); an authentication or decoding failure, or a bug, do not.
    """
    if isinstance(exc, AuthFailed | ProtocolError):
        return False
    return isinstance(exc, BridgeError) or not isinstance(exc, Exception)


def pool_of(ctx: ProbeContext, settings: SnmpSettings) -> SnmpPool:
    pool = ctx.resources.get(RESOURCE)
    if not isinstance(pool, SnmpPool):
        pool = SnmpPool(
            per_target=settings.sessions_per_target,
            max_sessions=settings.max_sessions,
            idle_seconds=settings.idle_seconds,
            max_in_flight=settings.max_in_flight,
        )
        ctx.resources[RESOURCE] = pool
    return pool


# --------------------------------------------------------------------------- the probe


async def resolve_host(host: str, port: int) -> str:
    """An IP literal as is; a name → its first address (IPv4 first)."""
    literal = _ip_literal(host)
    if literal is not None:
        return literal
    loop = asyncio.get_running_loop()
    try:
        infos = await loop.getaddrinfo(host, port, type=socket.SOCK_DGRAM)
    except OSError:
        raise BadParameter(f"{host[:80]!r} does not resolve", field="host") from None
    addresses = sorted({str(info[4][0]) for info in infos}, key=lambda a: ":" in a)
    if not addresses:
        raise BadParameter(f"{host[:80]!r} does not resolve", field="host")
    return str(addresses[0])


async def credentials_for(job: Job[SnmpParams], ctx: ProbeContext) -> list[Credential]:
    params = job.params
    if ctx.credentials is None:
        raise CredentialError("this bridge has no credentials configured", field="credential_id")
    types: tuple[str, ...]
    if params.version == "3":
        types = (SNMPV3,)
    elif params.version in ("1", "2c"):
        types = (COMMUNITY,)
    else:
        types = (COMMUNITY, SNMPV3)
    return await ctx.credentials.resolve(
        job.record, credential_id=params.credential_id, types=types
    )


def open_client(
    pool: SnmpPool,
    address: str,
    port: int,
    creds: Sequence[Credential],
    version: Version | None,
    policy: Policy,
) -> contextlib.AbstractAsyncContextManager[tuple[SnmpClient, Credential]]:
    """``async with``: a leased client for the first credential the agent accepts.

    With one credential, no extra request: its errors surface from the job's own requests.
    With several, each is tried in order (the one that last worked here first) with a GET
    of sysObjectID.0; silence and authentication failures move on to the next one.
    """
    if len(creds) == 1:
        cred = creds[0]
        return _OneCredential(
            pool.lease(Target(address, port, version_for(cred, version)), cred, policy), cred
        )
    return _first_accepted(pool, address, port, creds, version, policy)


class _OneCredential:
    """:func:`open_client` with one credential: a plain class (it runs once per agent)."""

    __slots__ = ("cred", "lease")

    def __init__(self, lease: _Lease, cred: Credential) -> None:
        self.lease = lease
        self.cred = cred

    async def __aenter__(self) -> tuple[SnmpClient, Credential]:
        return await self.lease.__aenter__(), self.cred

    async def __aexit__(self, exc_type: object, exc: BaseException | None, tb: object) -> None:
        await self.lease.__aexit__(exc_type, exc, tb)


@contextlib.asynccontextmanager
async def _first_accepted(
    pool: SnmpPool,
    address: str,
    port: int,
    creds: Sequence[Credential],
    version: Version | None,
    policy: Policy,
) -> AsyncIterator[tuple[SnmpClient, Credential]]:
    ordered = list(creds)
    preferred = pool.preferred(address, port)
    ordered.sort(key=lambda c: c.id != preferred)
    failures: list[tuple[str, BridgeError]] = []
    for cred in ordered:
        target = Target(address, port, version_for(cred, version))
        stack = contextlib.AsyncExitStack()
        try:
            client = await stack.enter_async_context(pool.lease(target, cred, policy))
            await client.get([SYS_OBJECT_ID])
        except (ProbeTimeout, AuthFailed) as exc:
            await stack.__aexit__(type(exc), exc, exc.__traceback__)
            failures.append((cred.id, exc))
            continue
        except BaseException as exc:
            await stack.__aexit__(type(exc), exc, exc.__traceback__)
            raise
        async with stack:
            pool.remember(address, port, cred.id)
            yield client, cred
        return
    tried = ", ".join(cred_id for cred_id, _ in failures)
    if any(isinstance(exc, AuthFailed) for _, exc in failures):
        raise AuthFailed(f"no credential was accepted (tried {tried})", field="credential_id")
    raise ProbeTimeout(
        f"no answer with any credential (tried {tried}; a wrong community gets no answer)",
        field="credential_id",
    )


class _Output:
    """Result chunks: op entries of varbinds (or rows), at most ``chunk`` varbinds a chunk."""

    def __init__(self, header: dict[str, Any], *, chunk: int, cap: int) -> None:
        self.header = header
        self.chunk = chunk
        self.cap = cap
        self.results: list[dict[str, Any]] = []
        self.entry: dict[str, Any] | None = None  # the op entry being filled
        self.items = "varbinds"
        self.in_chunk = 0
        self.total = 0
        self.truncated = False

    @property
    def remaining(self) -> int:
        return self.cap - self.total

    def start(self, index: int, spec: OidSpec, oid: str, **extra: Any) -> None:
        self.items = "rows" if spec.op == "table" else "varbinds"
        self.entry = {
            "spec": index,
            "op": spec.op,
            "oid": oid,
            **extra,
            self.items: [],
            "truncated": False,
            "more": False,
        }
        self.results.append(self.entry)

    def add_many(self, items: list[dict[str, Any]]) -> bool:
        """:meth:`add` of each (varbinds of one answer); ``False`` once past the cap."""
        if self.total + len(items) > self.cap:
            return all(self.add(item) for item in items)  # stops at the first refused
        assert self.entry is not None
        self.entry[self.items].extend(items)
        self.total += len(items)
        self.in_chunk += len(items)
        return True

    def add(self, item: dict[str, Any], cost: int = 1) -> bool:
        """Append to the open entry; ``False`` (and nothing added) past the cap."""
        assert self.entry is not None
        if self.total + cost > self.cap:
            self.truncate()
            return False
        self.entry[self.items].append(item)
        self.total += cost
        self.in_chunk += cost
        return True

    def truncate(self) -> None:
        self.truncated = True
        if self.entry is not None:
            self.entry["truncated"] = True

    @property
    def full(self) -> bool:
        return self.in_chunk >= self.chunk

    def flush(self, *, open_entry: bool) -> dict[str, Any]:
        """The chunk so far; an unfinished entry goes on in the next chunk (``more``)."""
        chunk = {**self.header, "results": self.results}
        self.results = []
        self.in_chunk = 0
        if open_entry and self.entry is not None:
            self.entry["more"] = True
            self.entry = {**self.entry, self.items: [], "more": False}
            self.results.append(self.entry)
        return chunk


def _cell(oid: str, value: Any) -> dict[str, Any]:
    cell = sv.typed(oid, value)
    del cell["oid"]
    return cell


async def _table(
    client: SnmpClient, spec: OidSpec, params: SnmpParams, budget: int
) -> tuple[dict[str, str], list[dict[str, Any]], bool]:
    """``(columns, rows, truncated)`` of a table, reading at most ``budget`` cells."""
    table_oid = spec.oids[0]
    known = sv.TABLES.get(table_oid)
    entry = f"{table_oid}.1"

    def name(column: int) -> str:
        return known.columns.get(column, str(column)) if known else str(column)

    rows: dict[str, dict[str, Any]] = {}
    columns: dict[str, str] = {}
    cells = 0
    roots = [f"{entry}.{c}" for c in spec.columns] if spec.columns else [entry]
    for root in roots:
        if spec.columns:
            columns[name(int(root.rsplit(".", 1)[1]))] = root
        async with contextlib.aclosing(client.walk(root, params.max_repetitions)) as items:
            async for oid, value in items:
                if cells >= budget:
                    return columns, _sorted_rows(rows), True
                rest = oid[len(entry) + 1 :].split(".", 1)
                if len(rest) != 2:
                    continue  # not a cell (an agent answering outside the table)
                column = name(int(rest[0]))
                columns.setdefault(column, f"{entry}.{rest[0]}")
                rows.setdefault(rest[1], {})[column] = _cell(oid, value)
                cells += 1
    return columns, _sorted_rows(rows), False


def _sorted_rows(rows: dict[str, dict[str, Any]]) -> list[dict[str, Any]]:
    return [{"index": index, "values": rows[index]} for index in sorted(rows, key=sv.oid_key)]


async def _operate(
    client: SnmpClient, specs: Sequence[OidSpec], params: SnmpParams, out: _Output
) -> AsyncGenerator[dict[str, Any], None]:
    """Every operation of ``specs`` on one agent into ``out``; a chunk whenever it is full."""
    typed = sv.typed
    for index, spec in enumerate(specs):
        if spec.op == "get":
            values = await client.get(spec.oids)
            for oid in spec.oids:
                out.start(index, spec, oid)
                value = values[oid]
                item = (
                    sv.exception(oid, value.kind)
                    if isinstance(value, _Missing)
                    else sv.typed(oid, value)
                )
                if not out.add(item):
                    break
        elif spec.op == "getnext":
            for oid in spec.oids:
                out.start(index, spec, oid)
                found = await client.successor(
                    oid, params.max_repetitions, max(params.max_varbinds, 1000)
                )
                item = (
                    sv.exception(oid, sv.END_OF_MIB_VIEW)
                    if found is None
                    else sv.typed(found[0], found[1])
                )
                if not out.add(item):
                    break
        elif spec.op == "walk":
            out.start(index, spec, spec.oids[0])
            async with contextlib.aclosing(
                client.walk_answers(spec.oids[0], params.max_repetitions, room=out.remaining)
            ) as answers:
                async for answer in answers:
                    items = [typed(oid, value) for oid, value in answer]
                    while items:  # exactly ``chunk_varbinds`` a chunk
                        room = out.chunk - out.in_chunk
                        if not out.add_many(items[:room]):
                            break
                        items = items[room:]
                        if out.full:
                            yield out.flush(open_entry=True)
                    if out.truncated:
                        break
        else:
            table = sv.TABLES.get(spec.oids[0])
            columns, rows, cut = await _table(client, spec, params, out.remaining)
            out.start(
                index, spec, spec.oids[0], name=table.name if table else None, columns=columns
            )
            for row in rows:
                out.add(row, cost=len(row["values"]))
                if out.full:
                    yield out.flush(open_entry=True)
            if cut:
                out.truncate()
        out.entry = None
        if out.truncated:
            break
        if out.full:
            yield out.flush(open_entry=False)


def _gets_step(
    oids: list[str],
    ask: list[str],
    cred: Credential,
    pool: SnmpPool,
    port: int,
    version: Version | None,
    policy: Policy,
) -> Callable[[tuple[int, str]], Coroutine[Any, Any, dict[str, Any]]]:
    """One agent of a hosts job of GETs with one credential, as a coroutine.

    :mod:`probes.snmp_gets` drives such jobs from callbacks and hands this whatever would
    wait (a name to resolve, a busy agent, a new v3 session, a missing OID).
    """
    wanted = version_for(cred, version)

    async def step(item: tuple[int, str]) -> dict[str, Any]:
        index, host = item
        client: SnmpClient | None = None
        try:
            address = _ip_literal(host) or await resolve_host(host, port)
            target = Target(address, port, wanted)
            group = pool.group(target, cred)
            pooled = await pool.enter(group, target, cred, policy)
            client = pooled.lease_client(wanted, policy)
            try:
                values = await client.get(ask)  # a repeated OID asked once
            except BaseException as exc:
                pool.leave(group, pooled, _sound(exc))
                raise
            pool.leave(group, pooled, True)
        except BridgeError as exc:
            return failed_entry(index, host, exc, client.requests if client is not None else 0)
        return gets_entry(index, host, address, oids, values, client.requests)

    return step


def failed_entry(index: int, host: str, error: BridgeError, requests: int) -> dict[str, Any]:
    """An agent of a hosts job that failed: the error, and the requests it was sent."""
    return {"index": index, "host": host, **error_payload(error), "requests": requests}


def gets_entry(
    index: int,
    host: str,
    address: str,
    oids: Sequence[str],
    found: dict[str, Any],
    requests: int,
) -> dict[str, Any]:
    """One agent's entry of a hosts job of GETs, from ``{oid: value or _Missing}``
    (``oids``: every OID of the job's get lines, in order).

    Compact, since a poller's job answers thousands of agents: ``varbinds`` holds one typed
    varbind per OID in the order of the spec lines (the job's lines are all ``get``, so the
    per-operation grouping of ``results`` would add nothing); ``address`` only when it is
    not ``host`` itself; the version and credential are the job's (in each chunk).
    """
    varbinds: list[dict[str, Any]] = []
    for oid in oids:
        value = found[oid]
        missing = isinstance(value, _Missing)
        varbinds.append(sv.exception(oid, value.kind) if missing else sv.typed(oid, value))
    entry: dict[str, Any] = {"index": index, "host": host}
    if address != host:
        entry["address"] = address
    entry["varbinds"] = varbinds
    entry["requests"] = requests
    return entry


def _summary(out: _Output, client: SnmpClient) -> dict[str, Any]:
    return {
        "varbinds": out.total,
        "truncated": out.truncated,
        "requests": client.requests,
        "bulk_resumed": client.resumed,
    }


async def run(job: Job[SnmpParams], ctx: ProbeContext) -> AsyncIterator[dict[str, Any]]:
    params = job.params
    if params.hosts is not None:
        async with contextlib.aclosing(run_many(job, ctx)) as chunks:
            async for chunk in chunks:
                yield chunk
        return
    host = params.host
    assert host is not None  # build_params: host or hosts
    settings = settings_of(ctx.settings)
    pool = pool_of(ctx, settings)
    address = await resolve_host(host, params.port)
    creds = await credentials_for(job, ctx)
    policy = Policy(params.timeout, params.retries)
    async with open_client(pool, address, params.port, creds, params.version, policy) as (
        client,
        cred,
    ):
        header = {
            "host": host,
            "address": address,
            "port": params.port,
            "version": client.version,
            "credential_id": cred.id,
        }
        out = _Output(header, chunk=params.chunk_varbinds, cap=params.max_varbinds)
        async with contextlib.aclosing(_operate(client, params.specs(), params, out)) as chunks:
            async for chunk in chunks:
                yield chunk
        final = out.flush(open_entry=False)
        final["summary"] = _summary(out, client)
        yield final


async def run_many(job: Job[SnmpParams], ctx: ProbeContext) -> AsyncGenerator[dict[str, Any], None]:
    """A ``hosts`` job: the operations on every agent, ``concurrency`` agents at a time.

    Each agent's answer is one entry of ``agents``: the one-agent result (``host``,
    ``address``, ``version``, ``credential_id``, ``results``, ``summary``) plus ``index``,
    its place in ``hosts``; for a job of ``get`` lines and one credential, the compact
    :func:`gets_entry`. An agent that fails gives ``{"index", "host", "error"}``: one silent
    or refusing agent does not fail the job. Entries come in the order agents finish.
    ``max_varbinds`` applies to each agent. Every chunk carries ``port`` (and, for GETs,
    ``version`` and ``credential_id``); the last one carries ``summary`` for the job.
    """
    params = job.params
    hosts = params.hosts
    assert hosts is not None
    settings = settings_of(ctx.settings)
    pool = pool_of(ctx, settings)
    specs = params.specs()
    creds = await credentials_for(job, ctx)
    policy = Policy(params.timeout, params.retries)
    port = params.port
    whole = params.max_varbinds + 1  # one agent's answer is never split across chunks

    async def one(item: tuple[int, str]) -> dict[str, Any]:
        index, host = item
        used: SnmpClient | None = None
        try:
            address = _ip_literal(host) or await resolve_host(host, port)
            async with open_client(pool, address, port, creds, params.version, policy) as (
                client,
                cred,
            ):
                used = client
                out = _Output(
                    {
                        "index": index,
                        "host": host,
                        "address": address,
                        "version": client.version,
                        "credential_id": cred.id,
                    },
                    chunk=whole,
                    cap=params.max_varbinds,
                )
                async with contextlib.aclosing(_operate(client, specs, params, out)) as chunks:
                    async for _never in chunks:
                        pass
                entry = out.flush(open_entry=False)
                entry["summary"] = _summary(out, client)
                return entry
        except BridgeError as exc:
            return failed_entry(index, host, exc, used.requests if used is not None else 0)

    targets = list(enumerate(hosts))
    get_oids = [oid for spec in specs for oid in spec.oids]
    gets_only = all(spec.op == "get" for spec in specs)
    batches: AsyncGenerator[list[dict[str, Any]], None]
    header: dict[str, Any] = {"port": port}
    distinct = list(dict.fromkeys(get_oids))  # a repeated OID is asked once
    if gets_only and len(creds) == 1 and len(get_oids) <= params.max_varbinds:
        header["version"] = version_for(creds[0], params.version)
        header["credential_id"] = creds[0].id
        step = _gets_step(get_oids, distinct, creds[0], pool, port, params.version, policy)
        if len(distinct) <= _GET_BATCH:  # one request an agent: the callback lanes
            from probes.snmp_gets import GetSweep, sweep_gets  # they build on this module

            sweep = GetSweep(
                targets,
                oids=get_oids,
                ask=distinct,
                cred=creds[0],
                pool=pool,
                port=port,
                version=version_for(creds[0], params.version),
                policy=policy,
                chunk=params.chunk_agents,
                fallback=step,
            )
            batches = sweep_gets(sweep, limit=params.concurrency)
        else:  # several requests an agent (SnmpClient.get batches them): coroutines
            batches = fan_out(
                targets,
                step,
                limit=params.concurrency,
                budget=pool.budget,
                chunk=params.chunk_agents,
            )
    else:
        batches = fan_out(
            targets, one, limit=params.concurrency, budget=pool.budget, chunk=params.chunk_agents
        )

    totals = {"agents": len(hosts), "answered": 0, "failed": 0, "varbinds": 0, "requests": 0}

    def count(entry: dict[str, Any]) -> None:
        if "error" in entry:
            totals["failed"] += 1
            totals["requests"] += entry.get("requests", 0)
            return
        totals["answered"] += 1
        summary = entry.get("summary")
        if summary is None:  # a compact GET entry
            totals["varbinds"] += len(entry["varbinds"])
            totals["requests"] += entry["requests"]
        else:
            totals["varbinds"] += summary["varbinds"]
            totals["requests"] += summary["requests"]

    chunks = result_chunks(
        batches, header=header, key="agents", count=count, summary=lambda: dict(totals)
    )
    async with contextlib.aclosing(chunks):
        async for chunk in chunks:
            yield chunk


SPEC = ProbeSpec(
    topic=TOPIC,
    params=SnmpParams,
    run=run,
    build_params=build_params,
    target_host=lambda params: params.host,  # None for a hosts job: the pool limits per agent
    needs_credentials=True,
)


# --------------------------------------------------------------------------- Shazzam's tap

TAP_OIDS = (SYS_DESCR, SYS_OBJECT_ID, SYS_NAME)


async def snmp_tap(
    host: str,
    communities: Sequence[str],
    *,
    port: int = 161,
    timeout: float = 1.0,
    taps: int = 2,
    interval: float = 0.2,
    version: Literal["1", "2c"] = "2c",
) -> dict[str, Any] | None:
    """Is there an SNMP agent at ``host:port`` that answers one of ``communities``?

    Like ServiceNow's SNMP port probe: a GET of sysDescr.0, sysObjectID.0 and sysName.0
    with every community at once, sent again (a second *tap*, on a fresh socket) every
    ``interval`` seconds while nothing answered, ``taps`` times in all; the first answer
    within ``timeout`` seconds wins. A wrong community, a closed port and no host at all
    look the same: ``None``. ``host`` must be an IP literal.

    Returns ``{"host", "port", "version", "community_index", "sys_descr",
    "sys_object_id", "sys_name", "rtt_ms"}``: the index into ``communities`` that was
    answered (never the community itself); a field is ``None`` when the agent does not
    have that object.
    """
    if not communities or taps < 1:
        return None
    address = str(ipaddress.ip_address(host))
    loop = asyncio.get_running_loop()
    started = loop.time()
    deadline = started + timeout

    async def ask(index: int, community: str) -> tuple[int, dict[str, Any]] | None:
        session = SnmpSession(
            addr=address,
            port=port,
            community=community,
            version=_GUFO_VERSION[version],
            timeout=_SESSION_TIMEOUT,
        )
        try:
            return index, await session.get_many(list(TAP_OIDS))
        except (SnmpError, OSError):
            return None  # something answered, but not an agent we can read

    pending: set[asyncio.Task[tuple[int, dict[str, Any]] | None]] = set()
    try:
        for tap in range(taps):
            for index, community in enumerate(communities):
                pending.add(asyncio.create_task(ask(index, community)))
            until = deadline if tap == taps - 1 else min(deadline, loop.time() + interval)
            while pending and (left := until - loop.time()) > 0:
                done, pending = await asyncio.wait(
                    pending, timeout=left, return_when=asyncio.FIRST_COMPLETED
                )
                answers = [task.result() for task in done]
                for answer in answers:
                    if answer is not None:
                        index, values = answer
                        return {
                            "host": address,
                            "port": port,
                            "version": version,
                            "community_index": index,
                            "sys_descr": sv.text_value(values.get(SYS_DESCR)),
                            "sys_object_id": sv.text_value(values.get(SYS_OBJECT_ID)),
                            "sys_name": sv.text_value(values.get(SYS_NAME)),
                            "rtt_ms": round((loop.time() - started) * 1000.0, 3),
                        }
            if loop.time() >= deadline:
                break
        return None
    finally:
        for task in pending:
            task.cancel()
        if pending:
            await asyncio.gather(*pending, return_exceptions=True)


async def snmp_tap_credentials(
    host: str, credentials: Sequence[Credential], **options: Any
) -> dict[str, Any] | None:
    """:func:`snmp_tap` with ``snmp_community`` credentials: adds ``credential_id``."""
    usable = [c for c in credentials if c.type == COMMUNITY and c.fields.get("community")]
    answer = await snmp_tap(host, [c.fields["community"] for c in usable], **options)
    if answer is not None:
        answer["credential_id"] = usable[answer["community_index"]].id
    return answer
