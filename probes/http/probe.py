"""RESTProbe: one HTTP(S) request to a target, answered with status, headers, body and TLS facts.

Reference: ``docs/probes/RESTProbe.md``. Every job shares one ``aiohttp.ClientSession`` per
bridge (``ctx.resource``, the ``HttpClient`` of ``probes.http.client``: opened when the bridge
starts, closed when it stops). TLS is verified by default; an SSL context per CA bundle is
built once and cached, so a job naming a ``ca_file`` costs a ``stat`` and reuses pooled
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
import ipaddress
import re
import ssl
import time
from collections.abc import AsyncGenerator, AsyncIterator, Coroutine, Mapping
from dataclasses import dataclass
from typing import Any

import aiohttp
import orjson
from aiohttp import hdrs
from aiohttp.helpers import parse_content_type as _parse_content_type

from bridge.wire.credentials import Credential
from bridge.wire.errors import (
    BadParameter,
    BridgeError,
    ConnectionRefused,
    CredentialError,
    ProbeTimeout,
    ProtocolError,
    TlsError,
    Unreachable,
)
from bridge.wire.records import OutputRecord, error_payload
from probes.contract import Job, ProbeContext, ProbeSpec
from probes.http.client import HttpClient, Timing, open_client
from probes.http.params import TOPIC, RESTParams, RESTSettings, build_params
from probes.kit.fanout import fan_out, result_chunks

CREDENTIAL_TYPES = ("http_basic", "http_bearer")
# Request headers whose value is never echoed.
SENSITIVE_HEADERS = frozenset({"authorization", "proxy-authorization", "cookie"})
REDACTED = "<redacted>"
_JSON_TYPE = re.compile(r"^application/(?:[\w.+-]+\+)?json$")


# --- results ----------------------------------------------------------------------------


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
    client = ctx.resource
    if not isinstance(client, HttpClient):
        raise BridgeError("RESTProbe runs without its HTTP client (ProbeSpec.resource)")
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
    timing: Timing | None = None
    if client.timings:
        timing = Timing()
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
    TOPIC, RESTParams, run, build_params, settings=RESTSettings, resource=open_client,
    target_host=_target_host,
)  # fmt: skip
