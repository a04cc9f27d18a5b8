"""RESTProbe: one HTTP(S) request to a target, answered with status, headers, body and TLS facts.

Reference: ``docs/probes/RESTProbe.md``. Every job shares one ``aiohttp.ClientSession`` per
bridge (``ctx.resources["http"]``, opened on first use, closed by the bridge at shutdown):
keep-alive connections, a total and a per-host connection limit, no cookie jar (one job's
cookies never reach another job). TLS is verified by default; an SSL context per CA bundle
is built once and cached, so a job naming a ``ca_file`` costs a ``stat`` and reuses pooled
connections.

Secrets: a job names a credential (``credential_id``, types ``http_basic`` and
``http_bearer``) and the ``Authorization`` header is built here, never taken from the record
(``headers`` may not carry ``Authorization``; a URL may not carry ``user:password@``). The
header is never echoed, and aiohttp drops it on a redirect to another origin.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import errno
import functools
import hashlib
import ipaddress
import os
import re
import ssl
import stat
import time
from collections.abc import AsyncGenerator, AsyncIterator, Coroutine, Mapping
from dataclasses import dataclass
from types import SimpleNamespace
from typing import Any, Literal

import aiohttp
import orjson
from aiohttp import hdrs
from aiohttp.helpers import parse_content_type as _parse_content_type
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from pydantic import BaseModel, ConfigDict, Field, field_validator
from pydantic_core import PydanticCustomError
from yarl import URL

from bridge.wire.credentials import Credential
from bridge.wire.errors import (
    BadParameter,
    BridgeError,
    ConnectionRefused,
    CredentialError,
    ProbeTimeout,
    ProtocolError,
    Refused,
    TlsError,
    Unreachable,
)
from bridge.wire.records import OutputRecord, error_payload
from probes.contract import Job, ProbeContext, ProbeParams, ProbeSpec, parse_params, parse_settings
from probes.kit.deadlines import Deadlines
from probes.kit.fanout import fan_out, result_chunks

TOPIC = "RESTProbe"
RESOURCE = "http"  # key in ProbeContext.resources
CREDENTIAL_TYPES = ("http_basic", "http_bearer")
MAX_URL = 8192
MAX_REQUEST_BODY = 1_048_576
# Request headers a job may not set: credentials come from credential_id, never in clear.
FORBIDDEN_HEADERS = frozenset({"authorization", "proxy-authorization"})
# Request headers whose value is never echoed.
SENSITIVE_HEADERS = frozenset({"authorization", "proxy-authorization", "cookie"})
REDACTED = "<redacted>"
_TOKEN = re.compile(r"^[!#$%&'*+\-.^_`|~0-9A-Za-z]{1,256}$")  # an RFC 9110 header name
_BAD_URL_CHARS = re.compile(r"[\s\x00-\x1f\x7f]")
_JSON_TYPE = re.compile(r"^application/(?:[\w.+-]+\+)?json$")
_SSL_CACHE_SIZE = 32
_MAX_CA_FILE = 4_194_304  # bytes; a job may not make the bridge read /dev/zero
_CERT_CACHE_SIZE = 1024


class RESTSettings(BaseModel):
    """``[probes.settings.RESTProbe]``: defaults for every job and the shared session."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    timeout: float = Field(30.0, gt=0, le=3600)  # seconds for one request, redirects included
    max_body: int = Field(1_048_576, ge=0)  # response bytes kept when a job does not say
    max_body_limit: int = Field(16_777_216, ge=0)  # the most a job may ask for
    max_redirects: int = Field(5, ge=0, le=50)
    verify: bool = True
    ca_file: str | None = None  # PEM bundle used instead of the system's trust store
    limit: int = Field(100, ge=1, le=10_000)  # connections in the pool (ANCHORS: 100 fastest)
    limit_per_host: int = Field(0, ge=0, le=10_000)  # 0: the bridge's limits.per_host
    keepalive_timeout: float = Field(15.0, gt=0, le=3600)
    user_agent: str = Field("midbridge-RESTProbe/0.1", max_length=256)
    timings: bool = False  # DNS/connect timings through an aiohttp trace (costs ~20 µs/request)
    concurrency: int = Field(100, ge=1, le=10_000)  # default requests at once in a urls job
    max_urls: int = Field(10_000, ge=1, le=1_000_000)  # URLs one job may name
    max_in_flight: int = Field(0, ge=0, le=65_536)  # requests at once, all urls jobs; 0: limit


def load_settings(settings: Mapping[str, Any]) -> RESTSettings:
    """The validated settings; cached, since every job's parameters start from them."""
    try:
        key = frozenset(settings.items())
    except TypeError:  # an unhashable value: validate it (and report it) uncached
        return _load_settings(settings)
    return _cached_settings(key)


@functools.lru_cache(maxsize=16)
def _cached_settings(key: frozenset[tuple[str, Any]]) -> RESTSettings:
    return _load_settings(dict(key))


def _load_settings(settings: Mapping[str, Any]) -> RESTSettings:
    return parse_settings(RESTSettings, settings, TOPIC)


def _clean(message: str) -> PydanticCustomError:
    """A validation error without pydantic's ``Value error,`` prefix."""
    return PydanticCustomError("value_error", message)


def _maybe_json(value: Any) -> Any:
    """XML parameters are text: accept a JSON object or list given as text."""
    if isinstance(value, str) and value.lstrip()[:1] in ("{", "["):
        try:
            return orjson.loads(value)
        except orjson.JSONDecodeError:
            raise _clean("must be a JSON object (text does not parse)") from None
    return value


def _scalar(value: Any) -> str:
    if isinstance(value, str):
        return value
    if isinstance(value, int | float) and not isinstance(value, bool):
        return str(value)
    raise _clean("query values must be text or numbers")


def check_url(value: str) -> URL:
    """An absolute http(s) URL without credentials in it; ``ValueError`` says what is wrong."""
    if len(value) > MAX_URL:
        raise ValueError(f"is longer than {MAX_URL} characters")
    if _BAD_URL_CHARS.search(value):
        raise ValueError("may not contain white space or control characters")
    try:
        url = URL(value)
    except (ValueError, TypeError) as exc:
        raise ValueError(f"does not parse as a URL: {str(exc)[:100]}") from None
    if url.scheme not in ("http", "https"):
        raise ValueError(f"scheme must be http or https, got {url.scheme[:20]!r}")
    if not url.host:
        raise ValueError("has no host")
    if url.raw_user or url.raw_password:
        raise ValueError("may not carry user:password@; name a credential in credential_id")
    return url


class RESTParams(ProbeParams):
    url: str | None = None
    urls: tuple[str, ...] | None = None  # many requests in one job (see ``run_many``)
    method: Literal["GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS"] = "GET"
    headers: dict[str, str] = Field(default_factory=dict)
    query: tuple[tuple[str, str], ...] = ()
    body: str | None = Field(None, max_length=MAX_REQUEST_BODY)
    json_body: Any = Field(None, alias="json")
    credential_id: str | None = Field(None, min_length=1, max_length=256)
    follow_redirects: bool = True
    max_redirects: int = Field(5, ge=0, le=50)
    timeout: float = Field(30.0, gt=0, le=3600)
    max_body: int = Field(1_048_576, ge=0)
    ca_file: str | None = Field(None, min_length=1, max_length=4096)
    verify: bool = True
    response_headers: bool = True  # false: the result leaves out the response's headers
    concurrency: int = Field(100, ge=1, le=10_000)  # requests of a ``urls`` job at once
    chunk_responses: int = Field(100, ge=1, le=100_000)  # responses in one result chunk

    @field_validator("urls", mode="before")
    @classmethod
    def _urls(cls, value: Any) -> Any:
        if value is None:
            return None
        if isinstance(value, str):  # XML parameters are text: URLs separated by white space
            value = value.split()
        if not isinstance(value, list | tuple):
            return value  # pydantic reports the type
        if not value:
            raise _clean("is empty: give at least one URL")
        for n, one in enumerate(value):
            if not isinstance(one, str):
                raise _clean(f"entry {n}: is not text")
        try:
            return _checked_urls(tuple(value))
        except ValueError as exc:
            raise _clean(str(exc)) from None

    @field_validator("url", mode="before")
    @classmethod
    def _url(cls, value: Any) -> Any:
        if not isinstance(value, str):
            return value  # pydantic reports the type
        value = value.strip()
        try:
            check_url(value)
            return value
        except ValueError as exc:
            raise _clean(str(exc)) from None

    @field_validator("method", mode="before")
    @classmethod
    def _method(cls, value: Any) -> Any:
        return value.strip().upper() if isinstance(value, str) else value

    @field_validator("headers", mode="before")
    @classmethod
    def _headers(cls, value: Any) -> Any:
        value = _maybe_json(value)
        if value is None:
            return {}
        if not isinstance(value, Mapping):
            return value  # pydantic reports the type
        for name, text in value.items():
            if not isinstance(name, str) or not _TOKEN.match(name):
                raise _clean(f"invalid header name {str(name)[:40]!r}")
            if name.lower() in FORBIDDEN_HEADERS:
                raise _clean(f"{name} may not be given here; name a credential in credential_id")
            if isinstance(text, str) and any(ch in text for ch in "\r\n\x00"):
                raise _clean(f"the value of {name} contains a line break or NUL")
        return value

    @field_validator("query", mode="before")
    @classmethod
    def _query(cls, value: Any) -> Any:
        value = _maybe_json(value)
        if value is None:
            return ()
        pairs: list[tuple[str, str]] = []
        if isinstance(value, Mapping):
            for key, item in value.items():
                items = item if isinstance(item, list | tuple) else [item]
                pairs.extend((str(key), _scalar(one)) for one in items)
        elif isinstance(value, list | tuple):
            for pair in value:
                if not isinstance(pair, list | tuple) or len(pair) != 2:
                    raise _clean("must be an object, or a list of [name, value] pairs")
                pairs.append((str(pair[0]), _scalar(pair[1])))
        else:
            raise _clean("must be an object, or a list of [name, value] pairs")
        return tuple(pairs)

    @property
    def host(self) -> str | None:
        return URL(self.url).host if self.url is not None else None


@functools.lru_cache(maxsize=16)  # a poller's few lists; up to 10,000 URLs each
def _checked_urls(values: tuple[str, ...]) -> tuple[str, ...]:
    """Each URL checked (cached: a poller sends the same list again and again)."""
    checked: list[str] = []
    for n, value in enumerate(values):
        value = value.strip()
        try:
            check_url(value)
        except ValueError as exc:
            raise ValueError(f"entry {n}: {exc}") from None
        checked.append(value)
    return tuple(checked)


def build_params(record: OutputRecord, settings: Mapping[str, Any]) -> RESTParams:
    """Parameters from the payload; ``url`` defaults to the record's ``source`` if it is a URL."""
    cfg = load_settings(settings)
    data = {k: v for k, v in record.payload.items() if v is not None}
    if "urls" in data:
        if "url" in data:
            raise BadParameter("give either url or urls, not both", field="urls")
        data.setdefault("concurrency", cfg.concurrency)
    elif "url" not in data:
        source = record.source.strip()
        if "://" not in source:
            raise BadParameter(
                "no URL: give payload 'url' or a URL in the record's source", field="url"
            )
        data["url"] = source
    data.setdefault("timeout", cfg.timeout)
    data.setdefault("max_body", cfg.max_body)
    data.setdefault("max_redirects", cfg.max_redirects)
    data.setdefault("verify", cfg.verify)
    if cfg.ca_file is not None:
        data.setdefault("ca_file", cfg.ca_file)
    params = parse_params(RESTParams, data)
    if params.body is not None and params.json_body is not None:
        raise BadParameter("give either body or json, not both", field="body")
    if params.urls is not None and len(params.urls) > cfg.max_urls:
        raise Refused(
            f"{len(params.urls)} URLs is over the limit of {cfg.max_urls}"
            f" (probes.settings.{TOPIC}.max_urls)",
            field="urls",
        )
    if params.max_body > cfg.max_body_limit:
        raise BadParameter(
            f"at most {cfg.max_body_limit} bytes (probes.settings.{TOPIC}.max_body_limit)",
            field="max_body",
        )
    return params


# --- the shared client ----------------------------------------------------------------


class _Timing(SimpleNamespace):
    """What the trace measured for one request (durations in seconds, counts)."""

    dns: float = 0.0
    connect: float = 0.0
    connections: int = 0  # new connections opened (one per redirect hop at most)
    reused: int = 0


async def _on_dns_start(
    _s: aiohttp.ClientSession, ctx: SimpleNamespace, _p: aiohttp.TraceDnsResolveHostStartParams
) -> None:
    ctx.dns_started = time.perf_counter()


async def _on_dns_end(
    _s: aiohttp.ClientSession, ctx: SimpleNamespace, _p: aiohttp.TraceDnsResolveHostEndParams
) -> None:
    timing = ctx.trace_request_ctx
    if isinstance(timing, _Timing):
        timing.dns += time.perf_counter() - ctx.dns_started


async def _on_connect_start(
    _s: aiohttp.ClientSession, ctx: SimpleNamespace, _p: aiohttp.TraceConnectionCreateStartParams
) -> None:
    ctx.connect_started = time.perf_counter()


async def _on_connect_end(
    _s: aiohttp.ClientSession, ctx: SimpleNamespace, _p: aiohttp.TraceConnectionCreateEndParams
) -> None:
    timing = ctx.trace_request_ctx
    if isinstance(timing, _Timing):
        timing.connect += time.perf_counter() - ctx.connect_started
        timing.connections += 1


async def _on_reuse(
    _s: aiohttp.ClientSession, ctx: SimpleNamespace, _p: aiohttp.TraceConnectionReuseconnParams
) -> None:
    timing = ctx.trace_request_ctx
    if isinstance(timing, _Timing):
        timing.reused += 1


def _trace_config() -> aiohttp.TraceConfig:
    trace = aiohttp.TraceConfig()
    trace.on_dns_resolvehost_start.append(_on_dns_start)
    trace.on_dns_resolvehost_end.append(_on_dns_end)
    trace.on_connection_create_start.append(_on_connect_start)
    trace.on_connection_create_end.append(_on_connect_end)
    trace.on_connection_reuseconn.append(_on_reuse)
    return trace


class HttpClient:
    """The bridge's one HTTP session, SSL contexts per CA bundle, and parsed peer certificates."""

    def __init__(self, settings: RESTSettings, *, per_host: int) -> None:
        host_cap = settings.limit_per_host or per_host
        connector = aiohttp.TCPConnector(
            limit=settings.limit,
            # A per-host cap as large as the pool caps nothing; aiohttp's per-host
            # bookkeeping then costs a few µs a request for nothing.
            limit_per_host=0 if host_cap >= settings.limit else host_cap,
            keepalive_timeout=settings.keepalive_timeout,
        )
        self.timings = settings.timings
        self.session = aiohttp.ClientSession(
            connector=connector,
            cookie_jar=aiohttp.DummyCookieJar(),  # a shared jar would leak cookies across jobs
            headers={"User-Agent": settings.user_agent},
            timeout=aiohttp.ClientTimeout(total=None),
            trace_configs=[_trace_config()] if settings.timings else None,
            trust_env=False,
        )
        self._ssl: dict[tuple[str, int, int], ssl.SSLContext] = {}
        self._certs: dict[bytes, dict[str, Any]] = {}
        # Requests of urls jobs at once, all jobs together: the pool's size by default, so
        # requests wait here (cheaply) rather than in the connector.
        self.budget = asyncio.Semaphore(settings.max_in_flight or settings.limit)
        self.deadlines = Deadlines()  # every request's timeout, checked by one timer

    @property
    def closed(self) -> bool:
        return self.session.closed

    async def aclose(self) -> None:
        self.deadlines.close()
        await self.session.close()

    def ssl_for(self, *, verify: bool, ca_file: str | None) -> ssl.SSLContext | bool:
        """``False`` (no verification), ``True`` (system trust store), or a cached context."""
        if not verify:
            return False
        if ca_file is None:
            return True  # aiohttp's own cached default context
        path = os.path.abspath(os.path.expanduser(ca_file))
        try:
            info = os.stat(path)
        except OSError as exc:
            raise BadParameter(
                f"cannot read the CA bundle: {exc.strerror or 'error'}", field="ca_file"
            ) from None
        if not stat.S_ISREG(info.st_mode) or info.st_size > _MAX_CA_FILE:
            raise BadParameter(
                f"must be a regular PEM file of at most {_MAX_CA_FILE} bytes", field="ca_file"
            )
        key = (path, info.st_mtime_ns, info.st_size)  # a changed file is read again
        context = self._ssl.get(key)
        if context is None:
            try:
                context = ssl.create_default_context(cafile=path)
            except (ssl.SSLError, OSError, ValueError):
                raise BadParameter(
                    "the CA bundle holds no readable PEM certificate", field="ca_file"
                ) from None
            if len(self._ssl) >= _SSL_CACHE_SIZE:
                del self._ssl[next(iter(self._ssl))]
            self._ssl[key] = context
        return context

    def certificate(self, der: bytes) -> dict[str, Any]:
        cert = self._certs.get(der)
        if cert is None:
            cert = describe_certificate(der)
            if len(self._certs) >= _CERT_CACHE_SIZE:
                del self._certs[next(iter(self._certs))]
            self._certs[der] = cert
        return cert


def shared_client(ctx: ProbeContext) -> HttpClient:
    """The bridge's client, opened on first use (no await between the check and the store)."""
    client = ctx.resources.get(RESOURCE)
    if isinstance(client, HttpClient) and not client.closed:
        return client
    if client is not None and not isinstance(client, HttpClient):
        raise BridgeError(f"resource {RESOURCE!r} holds a {type(client).__name__}")
    client = HttpClient(load_settings(ctx.settings), per_host=max(1, ctx.per_host_limit))
    ctx.resources[RESOURCE] = client
    return client


# --- results ----------------------------------------------------------------------------


def _name(name: x509.Name) -> str:
    return name.rfc4514_string()


def describe_certificate(der: bytes) -> dict[str, Any]:
    """The facts discovery keeps about a peer certificate (DER in, JSON-ready dict out)."""
    try:
        cert = x509.load_der_x509_certificate(der)
    except ValueError:
        return {"error": "the peer certificate does not parse"}
    dns: list[str] = []
    ips: list[str] = []
    try:
        san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
        dns = [str(v) for v in san.get_values_for_type(x509.DNSName)]
        ips = [str(v) for v in san.get_values_for_type(x509.IPAddress)]
    except x509.ExtensionNotFound:
        pass
    except ValueError:  # a malformed extension: report what parses
        pass
    return {
        "subject": _name(cert.subject),
        "issuer": _name(cert.issuer),
        "san_dns": dns,
        "san_ip": ips,
        "not_before": cert.not_valid_before_utc.isoformat(),
        "not_after": cert.not_valid_after_utc.isoformat(),
        "serial": format(cert.serial_number, "x"),
        "sha256": hashlib.sha256(cert.public_bytes(serialization.Encoding.DER)).hexdigest(),
        "self_signed": cert.subject == cert.issuer,
    }


def _tls_facts(resp: aiohttp.ClientResponse, client: HttpClient, verified: bool) -> dict[str, Any]:
    """TLS version, cipher and peer certificate of the connection that answered."""
    connection = resp.connection
    transport = connection.transport if connection is not None else None
    if transport is None:
        # An empty body (HEAD, 204, Content-Length 0) puts the connection back in the pool
        # before the response reaches us; its protocol still holds the transport.
        protocol = getattr(resp, "_protocol", None)
        transport = getattr(protocol, "transport", None)
    ssl_object = transport.get_extra_info("ssl_object") if transport is not None else None
    facts: dict[str, Any] = {"verified": verified}
    if not isinstance(ssl_object, ssl.SSLObject | ssl.SSLSocket):
        facts["peer_certificate"] = None
        return facts
    cipher = ssl_object.cipher()
    facts["version"] = ssl_object.version()
    facts["cipher"] = cipher[0] if cipher else None
    der = ssl_object.getpeercert(binary_form=True)
    facts["peer_certificate"] = client.certificate(der) if der else None
    return facts


def _decode(data: bytes, charset: str | None, truncated: bool) -> str | None:
    """The body as text, or None if it is binary (NUL bytes, or not valid in its charset)."""
    if b"\x00" in data:
        return None
    name = charset or "utf-8"
    try:
        return data.decode(name)  # non-text codecs (zlib, base64...) raise LookupError
    except LookupError:  # an unknown charset: try UTF-8
        return _decode(data, "utf-8", truncated) if name != "utf-8" else None
    except UnicodeDecodeError as exc:
        # A truncated body may end inside a character: drop that tail, keep the text.
        if truncated and exc.end == len(data) and exc.start >= len(data) - 8:
            try:
                return data[: exc.start].decode(name)
            except UnicodeDecodeError:
                return None
        return None


async def _read_body(resp: aiohttp.ClientResponse, limit: int) -> tuple[bytes, bool]:
    """At most ``limit`` bytes of the body, and whether there was more (for a body whose
    size is not known to fit: :func:`fetch` reads one that is whole)."""
    buf = bytearray()
    content = resp.content
    while len(buf) <= limit:  # every turn reads at least one byte or ends the loop
        chunk = await content.read(limit + 1 - len(buf))
        if not chunk:
            break
        buf += chunk
    if len(buf) > limit:
        return bytes(buf[:limit]), True
    return bytes(buf), False


def _redacted(headers: Mapping[str, str]) -> dict[str, str]:
    return {k: (REDACTED if k.lower() in SENSITIVE_HEADERS else v) for k, v in headers.items()}


def _redact_cookie(value: str) -> str:
    """``name=value; attributes`` → ``name=<redacted>; attributes``."""
    pair, sep, attributes = value.partition(";")
    name = pair.partition("=")[0].strip()
    return f"{name}={REDACTED}{sep}{attributes}"


def _authorization(cred: Credential) -> str:
    """The Authorization header for a credential; errors name the credential, never a value."""
    if cred.type == "http_basic":
        user, password = cred.fields["user"], cred.fields["password"]
        if ":" in user or any(ch in user + password for ch in "\r\n\x00"):
            raise CredentialError(
                f"credential {cred.id!r}: user holds ':', or a field holds a line break",
                field="credential_id",
            )
        pair = base64.b64encode(f"{user}:{password}".encode()).decode("ascii")
        return f"Basic {pair}"  # RFC 7617, UTF-8
    token = cred.fields["token"]
    if not token or any(ch in token for ch in "\r\n\x00 "):
        raise CredentialError(
            f"credential {cred.id!r}: token is empty or holds white space", field="credential_id"
        )
    return f"Bearer {token}"


def _translate(exc: BaseException, params: RESTParams) -> BridgeError:
    """An aiohttp/OS failure as the bridge's error; messages never carry request headers."""
    if isinstance(exc, aiohttp.TooManyRedirects):
        return ProtocolError(f"too many redirects: more than {params.max_redirects}")
    if isinstance(exc, aiohttp.RedirectClientError):
        return ProtocolError(f"redirect to an invalid or non-HTTP URL: {str(exc)[:200]}")
    if isinstance(exc, aiohttp.InvalidURL):
        return BadParameter(f"invalid URL: {str(exc)[:200]}", field="url")
    if isinstance(exc, aiohttp.ClientConnectorCertificateError):
        cert_error = exc.certificate_error
        reason = getattr(cert_error, "verify_message", None) or str(cert_error)
        return TlsError(f"tls: certificate verify failed: {reason} ({exc.host}:{exc.port})")
    if isinstance(exc, aiohttp.ClientSSLError):
        os_error = exc.os_error
        reason = getattr(os_error, "reason", None) or str(os_error) or type(os_error).__name__
        return TlsError(f"tls: handshake failed: {reason} ({exc.host}:{exc.port})")
    if isinstance(exc, aiohttp.ClientConnectorDNSError):
        return Unreachable(f"dns: cannot resolve {exc.host!r}")
    if isinstance(exc, aiohttp.ClientConnectorError):
        code = exc.os_error.errno
        where = f"{exc.host}:{exc.port}"
        if code == errno.ECONNREFUSED:
            return ConnectionRefused(f"connection refused by {where}")
        if code == errno.ETIMEDOUT:
            return ProbeTimeout(f"connect to {where} timed out")
        return Unreachable(f"cannot connect to {where}: {exc.os_error.strerror or exc.os_error}")
    if isinstance(exc, TimeoutError):  # aiohttp's ServerTimeoutError is one
        return ProbeTimeout(f"no complete answer within {params.timeout:g} s (timeout)")
    if isinstance(exc, aiohttp.ClientResponseError):
        return ProtocolError(f"http: {exc.status} {exc.message}"[:300])
    if isinstance(exc, aiohttp.ServerDisconnectedError):
        return ProtocolError("http: the server closed the connection without an answer")
    if isinstance(exc, aiohttp.ClientPayloadError):
        return ProtocolError(f"http: the body is malformed: {str(exc)[:200]}")
    if isinstance(exc, aiohttp.ClientError | OSError):
        return ProtocolError(f"http: {type(exc).__name__}: {str(exc)[:200]}")
    if isinstance(exc, ValueError):
        return BadParameter(f"refused by the HTTP client: {str(exc)[:200]}")
    return BridgeError(f"http: {type(exc).__name__}")


@functools.lru_cache(maxsize=256)
def _media_type(raw: str | None) -> tuple[str, str | None, bool]:
    """``(media type, charset, is JSON)`` of a Content-Type header, exactly as aiohttp's
    ``content_type`` and ``charset`` give them, parsed once per distinct header (servers
    send the same few again and again)."""
    if raw is None:
        return "application/octet-stream", None, False  # RFC 9110's default
    media, params = _parse_content_type(raw)
    return media, params.get("charset"), _JSON_TYPE.match(media) is not None


def _ms(seconds: float) -> float:
    return int(seconds * 1_000_000.0) / 1000.0  # ms with µs precision (round() costs more)


_VERSIONS = {aiohttp.HttpVersion10: "1.0", aiohttp.HttpVersion11: "1.1"}


@dataclass(slots=True)
class Prepared:
    """What every request of a job shares: resolved once per job, not per URL."""

    client: HttpClient
    ssl: ssl.SSLContext | bool
    credential: Credential | None
    options: dict[str, Any]  # the request's keyword arguments that differ from aiohttp's


async def prepare(params: RESTParams, ctx: ProbeContext, record: OutputRecord) -> Prepared:
    """The shared client, headers (with the credential's Authorization), body and TLS."""
    client = shared_client(ctx)
    headers = dict(params.headers)
    credential: Credential | None = None
    if params.credential_id is not None:
        if ctx.credentials is None:
            raise CredentialError("this bridge has no credential resolver", field="credential_id")
        found = await ctx.credentials.resolve(
            record, credential_id=params.credential_id, types=CREDENTIAL_TYPES
        )
        credential = found[0]
        headers["Authorization"] = _authorization(credential)
    data: bytes | None = None
    if params.json_body is not None:
        data = orjson.dumps(params.json_body)
        if not any(k.lower() == "content-type" for k in headers):
            headers["Content-Type"] = "application/json"
    elif params.body is not None:
        data = params.body.encode("utf-8")
        if not any(k.lower() == "content-type" for k in headers):
            headers["Content-Type"] = "text/plain; charset=utf-8"
    ssl_arg = client.ssl_for(verify=params.verify, ca_file=params.ca_file)
    # Only what differs from aiohttp's defaults: each keyword costs on every request.
    # No per-request timeout for aiohttp (its timer costs a few µs a request): fetch
    # applies params.timeout through the client's Deadlines.
    options: dict[str, Any] = {"max_redirects": params.max_redirects}
    if headers:
        options["headers"] = headers
    if params.query:
        options["params"] = params.query
    if data is not None:
        options["data"] = data
    if not params.follow_redirects:
        options["allow_redirects"] = False
    if ssl_arg is not True:
        options["ssl"] = ssl_arg
    return Prepared(client=client, ssl=ssl_arg, credential=credential, options=options)


async def fetch(
    prep: Prepared, params: RESTParams, url: str, *, index: int | None = None
) -> dict[str, Any]:
    """One request to ``url`` and the description of its answer.

    With ``index`` (a urls job), the compact entry: ``index`` first, no ``method``, and no
    ``final_url`` or ``redirects`` unless there were redirects; a failure is then an entry
    (``{"index", "url", "error"}``) rather than raised.
    """
    client = prep.client
    options = prep.options
    timing: _Timing | None = None
    if client.timings:
        timing = _Timing()
        options = {**options, "trace_request_ctx": timing}
    started = time.perf_counter()
    expiry = client.deadlines.start(params.timeout)  # the whole request, redirects included
    try:
        async with client.session.request(params.method, url, **options) as resp:
            first_byte = time.perf_counter()
            tls = (
                _tls_facts(resp, client, verified=prep.ssl is not False)
                if resp.url.scheme == "https"
                else None
            )
            length = resp.headers.get(hdrs.CONTENT_LENGTH)  # istr: no case folding a lookup
            if (
                length is not None
                and length.isdigit()
                and int(length) <= params.max_body
                and hdrs.CONTENT_ENCODING not in resp.headers
            ):  # known to fit (Content-Length counts compressed bytes: not then)
                body, truncated = await resp.read(), False
            else:
                body, truncated = await _read_body(resp, params.max_body)
            if truncated:
                resp.close()  # unread bytes: this connection cannot go back to the pool
    except asyncio.CancelledError:
        if not expiry.timed_out():
            raise  # cancelled from outside (the job's deadline, a cancel, shutdown)
        return _failed(TimeoutError(), params, url, index)
    except (BridgeError, aiohttp.ClientError, OSError, TimeoutError, ValueError) as exc:
        # Our deadline's cancel turned into another error on its way out: a timeout.
        return _failed(TimeoutError() if expiry.expired else exc, params, url, index)
    finally:
        client.deadlines.end(expiry)
    finished = time.perf_counter()
    result = describe(
        resp, url, params.method, body, truncated, index=index, headers=params.response_headers
    )
    if prep.credential is not None and params.response_headers:
        # A session cookie won with our credential is as good as the credential.
        result["headers"] = [
            [k, _redact_cookie(v) if k.lower() == "set-cookie" else v] for k, v in result["headers"]
        ]
    timings: dict[str, Any] = {  # ms, µs precision (faster than round())
        "ttfb": int((first_byte - started) * 1_000_000.0) / 1000.0,
        "total": int((finished - started) * 1_000_000.0) / 1000.0,
    }
    if timing is not None:
        timings["dns"] = _ms(timing.dns)
        timings["connect"] = _ms(timing.connect)  # TCP and TLS handshakes, every hop
        timings["new_connections"] = timing.connections
        timings["reused_connections"] = timing.reused
    result["timings_ms"] = timings
    if tls is not None:
        result["tls"] = tls
    return result


def _failed(exc: BaseException, params: RESTParams, url: str, index: int | None) -> dict[str, Any]:
    """A request's failure: raised as the bridge's error, or (a urls job) an error entry."""
    error = exc if isinstance(exc, BridgeError) else _translate(exc, params)
    if index is None:
        raise error from None
    return {"index": index, "url": url, **error_payload(error)}


def request_info(params: RESTParams, prep: Prepared) -> dict[str, Any]:
    """The request as the result shows it: headers (redacted) and the credential's id."""
    credential = prep.credential
    return {
        "headers": _redacted(params.headers),
        "credential_id": credential.id if credential is not None else None,
        "credential_type": credential.type if credential is not None else None,
    }


async def request(params: RESTParams, ctx: ProbeContext, record: OutputRecord) -> dict[str, Any]:
    """Run one request and describe its answer (the probe's single result chunk)."""
    assert params.url is not None  # build_params: url or urls
    prep = await prepare(params, ctx, record)
    result = await fetch(prep, params, params.url)
    result["request"] = request_info(params, prep)
    return result


def describe(
    resp: aiohttp.ClientResponse,
    url: str,
    method: str,
    body: bytes,
    truncated: bool,
    *,
    index: int | None = None,
    headers: bool = True,
) -> dict[str, Any]:
    """Status, headers (unless ``headers`` is false) and body of a finished response, ready
    for JSON (see :func:`fetch`)."""
    content_type, charset, is_json = _media_type(resp.headers.get(hdrs.CONTENT_TYPE))
    history = resp.history
    result: dict[str, Any] = (
        {"url": url, "method": method} if index is None else {"index": index, "url": url}
    )
    result["status"] = resp.status
    result["reason"] = resp.reason or ""
    version = resp.version
    if version is None:
        result["http_version"] = ""
    else:
        result["http_version"] = _VERSIONS.get(version) or f"{version.major}.{version.minor}"
    if index is None or history:
        result["final_url"] = str(resp.url)
        result["redirects"] = [
            {"status": hop.status, "url": str(hop.url), "location": hop.headers.get("Location")}
            for hop in history
        ]
    if headers:
        result["headers"] = list(resp.headers.items())  # (name, value) pairs: JSON arrays
    result["content_type"] = content_type
    text: str | None = None
    if charset is None and b"\x00" not in body:  # the usual case: UTF-8 by default
        try:
            text = body.decode("utf-8")
        except UnicodeDecodeError:
            text = _decode(body, charset, truncated)
    else:
        text = _decode(body, charset, truncated)
    if text is None:
        result["body"] = base64.b64encode(body).decode("ascii")
        result["body_encoding"] = "base64"
    else:
        result["body"] = text
        result["body_encoding"] = "text"
    result["body_bytes"] = len(body)
    result["truncated"] = truncated
    if is_json and text is not None and not truncated:
        try:
            result["json"] = orjson.loads(text)
        except orjson.JSONDecodeError as exc:
            result["json_error"] = str(exc)[:200]
    return result


async def run(job: Job[RESTParams], ctx: ProbeContext) -> AsyncIterator[dict[str, Any]]:
    if job.params.urls is not None:
        async with contextlib.aclosing(run_many(job, ctx)) as chunks:
            async for chunk in chunks:
                yield chunk
        return
    yield await request(job.params, ctx, job.record)


async def run_many(job: Job[RESTParams], ctx: ProbeContext) -> AsyncGenerator[dict[str, Any], None]:
    """A ``urls`` job: the same request to every URL, ``concurrency`` at a time.

    Chunks of ``responses`` in the order they finish, each the one-request result with
    ``index``, the URL's place in ``urls``, and without ``method`` and ``request`` (those
    are the job's, in every chunk) or, when nothing redirected, ``final_url`` and
    ``redirects``; a request that fails gives ``{"index", "url", "error"}`` and does not
    fail the job. The last chunk carries ``summary``.
    """
    params = job.params
    urls = params.urls
    assert urls is not None
    prep = await prepare(params, ctx, job.record)

    def step(item: tuple[int, str]) -> Coroutine[Any, Any, dict[str, Any]]:
        return fetch(prep, params, item[1], index=item[0])  # no frame of its own

    statuses: dict[str, int] = {}
    failed = [0]

    def count(entry: dict[str, Any]) -> None:
        status = entry.get("status")
        if status is None:
            failed[0] += 1
        else:
            statuses[str(status)] = statuses.get(str(status), 0) + 1

    batches = fan_out(
        list(enumerate(urls)),
        step,
        limit=params.concurrency,
        budget=prep.client.budget,
        chunk=params.chunk_responses,
    )
    chunks = result_chunks(
        batches,
        header={"method": params.method, "request": request_info(params, prep)},
        key="responses",
        count=count,
        summary=lambda: {
            "requests": len(urls),
            "answered": sum(statuses.values()),
            "failed": failed[0],
            "statuses": statuses,
        },
    )
    async with contextlib.aclosing(chunks):
        async for chunk in chunks:
            yield chunk


def _target_host(params: RESTParams) -> str | None:
    host = params.host
    if host is None:
        return None  # a urls job: the session's limit_per_host limits each host
    return _host_key(host)


@functools.lru_cache(maxsize=4096)
def _host_key(host: str) -> str:
    try:
        return str(ipaddress.ip_address(host))
    except ValueError:
        return host.lower()


SPEC = ProbeSpec(
    topic=TOPIC,
    params=RESTParams,
    run=run,
    build_params=build_params,
    target_host=_target_host,
)
