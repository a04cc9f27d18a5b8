"""RESTProbe's shared client: one aiohttp session per bridge, SSL contexts, certificates.

The session is the probe's ``ProbeSpec.resource``: opened when the bridge starts, closed
when it stops. Keep-alive connections, a total and a per-host connection limit, no cookie
jar (one job's cookies never reach another job).
"""

from __future__ import annotations

import asyncio
import hashlib
import os
import ssl
import stat
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import aiohttp
from cryptography import x509
from cryptography.hazmat.primitives import serialization

from bridge.wire.errors import (
    BadParameter,
)
from probes.http.params import RESTSettings
from probes.kit.deadlines import Deadlines

_SSL_CACHE_SIZE = 32
_MAX_CA_FILE = 4_194_304  # bytes; a job may not make the bridge read /dev/zero
_CERT_CACHE_SIZE = 1024
# The bridge's limits.per_host by default, for settings validated without it (the runtime
# validates them with it, so limit_per_host 0 becomes the bridge's own limit).
_DEFAULT_PER_HOST = 8


class Timing(SimpleNamespace):
    """What the trace measured for one request (durations in seconds, counts)."""

    dns: float = 0.0
    connect: float = 0.0
    connections: int = 0  # new connections opened (one per redirect hop at most)
    reused: int = 0


async def _on_dns_start(
    _s: aiohttp.ClientSession, ctx: SimpleNamespace, _p: aiohttp.TraceDnsResolveHostStartParams
) -> None:
    ctx.dns_started = time.perf_counter()


def _timing(ctx: SimpleNamespace) -> Timing | None:
    """The request's ``Timing`` (its ``trace_request_ctx``), if it is timed."""
    timing = ctx.trace_request_ctx
    return timing if isinstance(timing, Timing) else None


async def _on_dns_end(
    _s: aiohttp.ClientSession, ctx: SimpleNamespace, _p: aiohttp.TraceDnsResolveHostEndParams
) -> None:
    if (timing := _timing(ctx)) is not None:
        timing.dns += time.perf_counter() - ctx.dns_started


async def _on_connect_start(
    _s: aiohttp.ClientSession, ctx: SimpleNamespace, _p: aiohttp.TraceConnectionCreateStartParams
) -> None:
    ctx.connect_started = time.perf_counter()


async def _on_connect_end(
    _s: aiohttp.ClientSession, ctx: SimpleNamespace, _p: aiohttp.TraceConnectionCreateEndParams
) -> None:
    if (timing := _timing(ctx)) is not None:
        timing.connect += time.perf_counter() - ctx.connect_started
        timing.connections += 1


async def _on_reuse(
    _s: aiohttp.ClientSession, ctx: SimpleNamespace, _p: aiohttp.TraceConnectionReuseconnParams
) -> None:
    if (timing := _timing(ctx)) is not None:
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

    def __init__(self, settings: RESTSettings) -> None:
        host_cap = settings.limit_per_host or _DEFAULT_PER_HOST
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


@asynccontextmanager
async def open_client(settings: RESTSettings, state_dir: Path | None) -> AsyncIterator[HttpClient]:
    """RESTProbe's ``ProbeSpec.resource``: the client, opened at bridge start, closed at stop."""
    client = HttpClient(settings)
    try:
        yield client
    finally:
        await client.aclose()
