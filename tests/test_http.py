"""RESTProbe against real aiohttp servers on loopback: plain and TLS (a CA made here)."""

from __future__ import annotations

import asyncio
import base64
import contextlib
import datetime
import gzip
import ipaddress
import logging
import os
import socket
import ssl
import time
from collections.abc import AsyncIterator
from contextlib import AbstractAsyncContextManager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import orjson
import pytest
from aiohttp import web
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from bridge.agent.credentials import LocalCredentials
from bridge.wire.client import output_record
from bridge.wire.errors import (
    BadParameter,
    ConfigError,
    ConnectionRefused,
    CredentialError,
    ProbeTimeout,
    ProtocolError,
    TlsError,
)
from bridge.wire.records import OutputRecord
from probes import REGISTRY
from probes.contract import Job, ProbeContext
from probes.http import SPEC, TOPIC, HttpClient
from tests.brokers import BrokerAddress
from tests.harness import bridge_and_client, make_config, probe_context, probe_settings

BASIC_USER = "probe"
BASIC_PASSWORD = "pw-SECRET-basic-7f3a"
BEARER_TOKEN = "tok-SECRET-bearer-91c2"
SSH_PASSWORD = "pw-SECRET-ssh-55d0"
BASIC_HEADER = "Basic " + base64.b64encode(f"{BASIC_USER}:{BASIC_PASSWORD}".encode()).decode()
SECRETS = (BASIC_PASSWORD, BEARER_TOKEN, SSH_PASSWORD, BASIC_HEADER.split()[1], "sess-SECRET")

CREDENTIALS = f"""
[[credential]]
id = "web-basic"
type = "http_basic"
user = "{BASIC_USER}"
password = "{BASIC_PASSWORD}"

[[credential]]
id = "web-bearer"
type = "http_bearer"
token = "{BEARER_TOKEN}"

[[credential]]
id = "linux"
type = "ssh_password"
user = "root"
password = "{SSH_PASSWORD}"
"""

SESSION_COOKIE = "sess-SECRET-from-login-3e1f"  # what a login with a credential hands out
UTF8_TEXT = "héllo wörld ✓ " * 50
BINARY = bytes(range(256)) * 4


# --- a test PKI: a CA and a server certificate it signed -------------------------------


@dataclass
class Pki:
    ca_file: Path
    cert_file: Path
    key_file: Path
    ca: x509.Certificate
    server: x509.Certificate


def _name(common_name: str) -> x509.Name:
    return x509.Name(
        [
            x509.NameAttribute(NameOID.ORGANIZATION_NAME, "midbridge tests"),
            x509.NameAttribute(NameOID.COMMON_NAME, common_name),
        ]
    )


def make_pki(directory: Path) -> Pki:
    now = datetime.datetime.now(datetime.UTC).replace(microsecond=0)
    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca_name = _name("midbridge test CA")
    ca = (
        x509.CertificateBuilder()
        .subject_name(ca_name)
        .issuer_name(ca_name)
        .public_key(ca_key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(hours=1))
        .not_valid_after(now + datetime.timedelta(days=2))
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=True,
                content_commitment=False,
                key_encipherment=False,
                data_encipherment=False,
                key_agreement=False,
                key_cert_sign=True,
                crl_sign=True,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        )
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(ca_key.public_key()), False)
        .sign(ca_key, hashes.SHA256())
    )
    key = ec.generate_private_key(ec.SECP256R1())
    server = (
        x509.CertificateBuilder()
        .subject_name(_name("target.test"))
        .issuer_name(ca_name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(hours=1))
        .not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(
            x509.SubjectAlternativeName(
                [x509.DNSName("localhost"), x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]
            ),
            critical=False,
        )
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
        .add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key()), False
        )
        .sign(ca_key, hashes.SHA256())
    )
    ca_file = directory / "ca.pem"
    ca_file.write_bytes(ca.public_bytes(serialization.Encoding.PEM))
    cert_file = directory / "server.pem"
    cert_file.write_bytes(server.public_bytes(serialization.Encoding.PEM))
    key_file = directory / "server.key"
    key_file.write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )
    return Pki(ca_file, cert_file, key_file, ca, server)


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Pki:
    return make_pki(tmp_path_factory.mktemp("pki"))


# --- the target server --------------------------------------------------------------------


@dataclass
class Target:
    http: str = ""  # http://127.0.0.1:<port>
    https: str = ""  # https://127.0.0.1:<port>
    port: int = 0
    tls_port: int = 0
    expected_auth: set[str] = field(default_factory=set)
    seen_auth: list[str | None] = field(default_factory=list)
    release: asyncio.Event = field(default_factory=asyncio.Event)


def make_app(target: Target) -> web.Application:
    routes = web.RouteTableDef()

    @routes.get("/hello")
    async def hello(request: web.Request) -> web.Response:
        resp = web.Response(text="hello")
        resp.headers.add("X-Multi", "a")
        resp.headers.add("X-Multi", "b")
        return resp

    @routes.get("/empty")
    async def empty(request: web.Request) -> web.Response:
        return web.Response(status=204)

    @routes.get("/status/{code}")
    async def status(request: web.Request) -> web.Response:
        return web.Response(status=int(request.match_info["code"]), text="status")

    @routes.get("/json")
    async def json_route(request: web.Request) -> web.Response:
        return web.json_response({"a": 1, "items": [1, 2, 3], "name": "ünï"})

    @routes.get("/badjson")
    async def bad_json(request: web.Request) -> web.Response:
        return web.Response(text="{nope", content_type="application/json")

    @routes.get("/redirect/{n}")
    async def redirect(request: web.Request) -> web.Response:
        n = int(request.match_info["n"])
        if n > 0:
            raise web.HTTPFound(f"/redirect/{n - 1}")
        return web.Response(text="landed")

    @routes.get("/loop")
    async def loop(request: web.Request) -> web.Response:
        raise web.HTTPFound("/loop")

    @routes.get("/cross")
    async def cross(request: web.Request) -> web.Response:
        # Same server, another origin (host differs): credentials must not follow.
        raise web.HTTPFound(f"http://localhost:{target.port}/auth")

    @routes.get("/ftp")
    async def ftp(request: web.Request) -> web.Response:
        raise web.HTTPFound("ftp://127.0.0.1/file")

    @routes.get("/big")
    async def big(request: web.Request) -> web.Response:
        return web.Response(body=b"x" * 200_000, content_type="text/plain")

    @routes.get("/gzip-bomb")
    async def gzip_bomb(request: web.Request) -> web.Response:
        body = gzip.compress(b"z" * 200_000)  # a few hundred bytes on the wire
        return web.Response(
            body=body, content_type="text/plain", headers={"Content-Encoding": "gzip"}
        )

    @routes.get("/big-chunked")
    async def big_chunked(request: web.Request) -> web.StreamResponse:
        resp = web.StreamResponse()
        resp.content_type = "text/plain"
        resp.enable_chunked_encoding()
        await resp.prepare(request)
        for _ in range(50):
            await resp.write(b"y" * 4000)
        await resp.write_eof()
        return resp

    @routes.get("/utf8")
    async def utf8(request: web.Request) -> web.Response:
        return web.Response(text=UTF8_TEXT, charset="utf-8")

    @routes.get("/latin1")
    async def latin1(request: web.Request) -> web.Response:
        return web.Response(body="café".encode("latin-1"), content_type="text/plain",
                            charset="iso-8859-1")  # fmt: skip

    @routes.get("/binary")
    async def binary(request: web.Request) -> web.Response:
        return web.Response(body=BINARY, content_type="application/octet-stream")

    @routes.get("/slow")
    async def slow(request: web.Request) -> web.Response:
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(target.release.wait(), 5.0)
        return web.Response(text="late")

    @routes.get("/auth")
    async def auth(request: web.Request) -> web.Response:
        header = request.headers.get("Authorization")
        target.seen_auth.append(header)
        if header is not None and header in target.expected_auth:
            resp = web.json_response({"authorized": True})
            resp.set_cookie("session", SESSION_COOKIE, httponly=True)
            return resp
        return web.Response(status=401, headers={"WWW-Authenticate": 'Basic realm="t"'})

    @routes.get("/set-cookie")
    async def set_cookie(request: web.Request) -> web.Response:
        resp = web.Response(text="cookie set")
        resp.set_cookie("session", "s3ss10n")
        return resp

    @routes.route("*", "/echo")
    async def echo(request: web.Request) -> web.Response:
        return web.json_response(
            {
                "method": request.method,
                "query": [[k, v] for k, v in request.query.items()],
                "content_type": request.headers.get("Content-Type"),
                "body": await request.text(),
                "x_test": request.headers.get("X-Test"),
                "cookie": request.headers.get("Cookie"),
                "user_agent": request.headers.get("User-Agent"),
            }
        )

    app = web.Application()
    app.add_routes(routes)
    return app


@pytest.fixture
async def target(pki: Pki) -> AsyncIterator[Target]:
    tgt = Target(expected_auth={BASIC_HEADER, f"Bearer {BEARER_TOKEN}"})
    runner = web.AppRunner(make_app(tgt), access_log=None)
    await runner.setup()
    server_ssl = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    server_ssl.load_cert_chain(pki.cert_file, pki.key_file)
    plain_sock, tls_sock = _listening(), _listening()
    await web.SockSite(runner, plain_sock).start()
    await web.SockSite(runner, tls_sock, ssl_context=server_ssl).start()
    tgt.port = plain_sock.getsockname()[1]
    tgt.tls_port = tls_sock.getsockname()[1]
    tgt.http = f"http://127.0.0.1:{tgt.port}"
    tgt.https = f"https://127.0.0.1:{tgt.tls_port}"
    yield tgt
    tgt.release.set()
    await runner.cleanup()


def _listening() -> socket.socket:
    sock = socket.socket()
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind(("127.0.0.1", 0))
    sock.listen(128)
    return sock


@pytest.fixture
def credentials_file(tmp_path: Path) -> Path:
    path = tmp_path / "credentials.toml"
    path.write_text(CREDENTIALS, encoding="utf-8")
    path.chmod(0o600)
    return path


def http_context(
    credentials_file: Path, settings: dict[str, Any] | None = None
) -> AbstractAsyncContextManager[ProbeContext]:
    """RESTProbe's context as the bridge builds it: settings checked, client opened."""
    return probe_context(
        SPEC,
        {"timings": True} if settings is None else settings,
        credentials=LocalCredentials.from_file(credentials_file),
    )


@pytest.fixture
async def ctx(credentials_file: Path) -> AsyncIterator[ProbeContext]:
    async with http_context(credentials_file) as context:
        yield context


async def probe(ctx: ProbeContext, payload: dict[str, Any], source: str = "") -> dict[str, Any]:
    """Build the parameters as the bridge does and run the probe to its one chunk."""
    record = OutputRecord(sys_id="job-1", topic=TOPIC, payload=payload, source=source)
    params = SPEC.build_params(record, ctx.settings)
    chunks = [chunk async for chunk in SPEC.run(Job(record, params), ctx)]
    assert len(chunks) == 1
    return chunks[0]


def closed_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
    return port


def header_values(result: dict[str, Any], name: str) -> list[str]:
    return [v for k, v in result["headers"] if k.lower() == name.lower()]


# --- plain HTTP ----------------------------------------------------------------------------


def test_registered() -> None:
    assert REGISTRY[TOPIC] is SPEC


async def test_get_reports_status_headers_body_and_timings(
    ctx: ProbeContext, target: Target
) -> None:
    result = await probe(ctx, {"url": f"{target.http}/hello"})
    assert result["status"] == 200
    assert result["reason"] == "OK"
    assert result["http_version"] == "1.1"
    assert result["method"] == "GET"
    assert result["final_url"] == f"{target.http}/hello"
    assert result["redirects"] == []
    assert header_values(result, "X-Multi") == ["a", "b"]
    assert result["content_type"] == "text/plain"
    assert result["body"] == "hello"
    assert result["body_encoding"] == "text"
    assert result["body_bytes"] == 5
    assert result["truncated"] is False
    assert "json" not in result
    assert "tls" not in result
    timings = result["timings_ms"]
    assert 0 < timings["ttfb"] <= timings["total"]
    assert timings["new_connections"] == 1
    assert result["request"]["credential_id"] is None
    orjson.dumps(result)  # the chunk must travel as JSON


async def test_error_statuses_are_results_not_errors(ctx: ProbeContext, target: Target) -> None:
    result = await probe(ctx, {"url": f"{target.http}/status/503"})
    assert result["status"] == 503
    assert result["reason"] == "Service Unavailable"
    empty = await probe(ctx, {"url": f"{target.http}/empty"})
    assert empty["status"] == 204
    assert empty["body"] == ""


async def test_url_defaults_to_the_record_source(ctx: ProbeContext, target: Target) -> None:
    result = await probe(ctx, {}, source=f"{target.http}/hello")
    assert result["body"] == "hello"


async def test_json_body_is_parsed(ctx: ProbeContext, target: Target) -> None:
    result = await probe(ctx, {"url": f"{target.http}/json"})
    assert result["content_type"] == "application/json"
    assert result["json"] == {"a": 1, "items": [1, 2, 3], "name": "ünï"}
    bad = await probe(ctx, {"url": f"{target.http}/badjson"})
    assert "json" not in bad
    assert bad["json_error"]
    assert bad["body"] == "{nope"


async def test_post_with_json_body_query_and_headers(ctx: ProbeContext, target: Target) -> None:
    result = await probe(
        ctx,
        {
            "url": f"{target.http}/echo?fixed=1",
            "method": "post",
            "json": {"a": [1, 2]},
            "query": {"q": ["x", "y"], "n": 3},
            "headers": {"X-Test": "yes", "Cookie": "c=1"},
        },
    )
    seen = result["json"]
    assert seen["method"] == "POST"
    assert seen["content_type"] == "application/json"
    assert orjson.loads(seen["body"]) == {"a": [1, 2]}
    assert seen["query"] == [["fixed", "1"], ["q", "x"], ["q", "y"], ["n", "3"]]
    assert seen["x_test"] == "yes"
    assert seen["user_agent"].startswith("midbridge")
    # Echoed request headers hide what may be secret.
    assert result["request"]["headers"] == {"X-Test": "yes", "Cookie": "<redacted>"}


async def test_text_parameters_as_xml_payloads_carry_them(
    ctx: ProbeContext, target: Target
) -> None:
    result = await probe(
        ctx,
        {
            "url": f"{target.http}/echo",
            "method": "PUT",
            "body": "plain text",
            "headers": '{"X-Test": "from-xml"}',
            "follow_redirects": "false",
            "max_body": "100000",
        },
    )
    seen = result["json"]
    assert (seen["method"], seen["body"], seen["x_test"]) == ("PUT", "plain text", "from-xml")
    assert seen["content_type"] == "text/plain; charset=utf-8"


async def test_redirects_are_followed_and_reported(ctx: ProbeContext, target: Target) -> None:
    result = await probe(ctx, {"url": f"{target.http}/redirect/3"})
    assert result["status"] == 200
    assert result["body"] == "landed"
    assert result["final_url"] == f"{target.http}/redirect/0"
    assert [hop["status"] for hop in result["redirects"]] == [302, 302, 302]
    assert [hop["location"] for hop in result["redirects"]] == [
        "/redirect/2",
        "/redirect/1",
        "/redirect/0",
    ]
    assert result["redirects"][0]["url"] == f"{target.http}/redirect/3"


async def test_redirects_not_followed_when_asked(ctx: ProbeContext, target: Target) -> None:
    result = await probe(ctx, {"url": f"{target.http}/redirect/2", "follow_redirects": False})
    assert result["status"] == 302
    assert header_values(result, "Location") == ["/redirect/1"]
    assert result["redirects"] == []


async def test_too_many_redirects_is_a_protocol_error(ctx: ProbeContext, target: Target) -> None:
    with pytest.raises(ProtocolError, match="too many redirects: more than 2"):
        await probe(ctx, {"url": f"{target.http}/redirect/3", "max_redirects": 2})
    with pytest.raises(ProtocolError, match="more than 5"):
        await probe(ctx, {"url": f"{target.http}/loop"})
    with pytest.raises(ProtocolError, match="redirect"):
        await probe(ctx, {"url": f"{target.http}/ftp"})


@pytest.mark.parametrize("path", ["/big", "/big-chunked", "/gzip-bomb"])
async def test_oversize_body_is_truncated(ctx: ProbeContext, target: Target, path: str) -> None:
    result = await probe(ctx, {"url": f"{target.http}{path}", "max_body": 1000})
    assert result["truncated"] is True
    assert result["body_bytes"] == 1000
    assert len(result["body"]) == 1000
    assert set(result["body"]) <= {"x", "y", "z"}
    assert "json" not in result
    # The connection with unread bytes was dropped; the next job still works.
    again = await probe(ctx, {"url": f"{target.http}/hello"})
    assert again["body"] == "hello"
    whole = await probe(ctx, {"url": f"{target.http}{path}"})
    assert (whole["truncated"], whole["body_bytes"]) == (False, 200_000)


async def test_truncated_utf8_keeps_whole_characters(ctx: ProbeContext, target: Target) -> None:
    encoded = UTF8_TEXT.encode()
    cut = encoded.index("✓".encode()) + 1  # one byte into a three-byte character
    result = await probe(ctx, {"url": f"{target.http}/utf8", "max_body": cut})
    assert result["truncated"] is True
    assert result["body_encoding"] == "text"
    assert UTF8_TEXT.startswith(result["body"])
    assert result["body"].endswith(" ")


async def test_binary_body_is_base64(ctx: ProbeContext, target: Target) -> None:
    result = await probe(ctx, {"url": f"{target.http}/binary"})
    assert result["body_encoding"] == "base64"
    assert base64.b64decode(result["body"]) == BINARY
    assert result["body_bytes"] == len(BINARY)


async def test_charset_of_the_response_is_used(ctx: ProbeContext, target: Target) -> None:
    result = await probe(ctx, {"url": f"{target.http}/latin1"})
    assert (result["body"], result["body_encoding"]) == ("café", "text")


async def test_timeout_is_a_probe_timeout(ctx: ProbeContext, target: Target) -> None:
    started = time.monotonic()
    with pytest.raises(ProbeTimeout, match=r"0\.2 s"):
        await probe(ctx, {"url": f"{target.http}/slow", "timeout": 0.2})
    assert time.monotonic() - started < 2.0


async def test_response_headers_false_leaves_the_headers_out(
    ctx: ProbeContext, target: Target
) -> None:
    result = await probe(ctx, {"url": f"{target.http}/hello", "response_headers": False})
    assert result["status"] == 200
    assert result["body"] == "hello"
    assert "headers" not in result
    assert "headers" in (await probe(ctx, {"url": f"{target.http}/hello"}))


async def test_a_job_cancelled_from_outside_is_not_reported_as_a_timeout(
    ctx: ProbeContext, target: Target
) -> None:
    task = asyncio.create_task(probe(ctx, {"url": f"{target.http}/slow", "timeout": 0.3}))
    await asyncio.sleep(0.1)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    await asyncio.sleep(0.4)  # past the request's deadline: nothing fires at a task gone
    client = ctx.resource
    assert isinstance(client, HttpClient)
    assert len(client.deadlines) == 0


async def test_refused_connection(ctx: ProbeContext) -> None:
    with pytest.raises(ConnectionRefused, match="refused"):
        await probe(ctx, {"url": f"http://127.0.0.1:{closed_port()}/"})


async def test_cookies_do_not_travel_between_jobs(ctx: ProbeContext, target: Target) -> None:
    # A host name, not an IP: aiohttp's default jar would keep this cookie and send it on.
    base = f"http://localhost:{target.port}"
    first = await probe(ctx, {"url": f"{base}/set-cookie"})
    assert any("session=" in v for v in header_values(first, "Set-Cookie"))
    second = await probe(ctx, {"url": f"{base}/echo"})
    assert second["json"]["cookie"] is None


async def test_one_shared_session_with_keepalive(credentials_file: Path, target: Target) -> None:
    async with http_context(credentials_file) as ctx:
        client = ctx.resource
        assert isinstance(client, HttpClient)
        await probe(ctx, {"url": f"{target.http}/hello"})
        second = await probe(ctx, {"url": f"{target.http}/hello"})
        assert ctx.resource is client
        assert second["timings_ms"]["reused_connections"] == 1
        assert second["timings_ms"]["new_connections"] == 0
    assert client.closed  # the resource closes with its context, as at the bridge's stop


# --- TLS -------------------------------------------------------------------------------------


async def test_tls_verification_failure(ctx: ProbeContext, target: Target) -> None:
    with pytest.raises(TlsError, match="tls: certificate verify failed") as info:
        await probe(ctx, {"url": f"{target.https}/hello"})
    assert "127.0.0.1" in str(info.value)
    assert info.value.kind == "tls_error"


async def test_tls_with_ca_bundle_reports_the_peer_certificate(
    ctx: ProbeContext, target: Target, pki: Pki
) -> None:
    for host in ("127.0.0.1", "localhost"):
        url = f"https://{host}:{target.tls_port}/hello"
        result = await probe(ctx, {"url": url, "ca_file": str(pki.ca_file)})
        assert result["status"] == 200
        tls = result["tls"]
        assert tls["verified"] is True
        assert tls["version"].startswith("TLSv1.")
        assert tls["cipher"]
        cert = tls["peer_certificate"]
        assert cert["subject"] == "CN=target.test,O=midbridge tests"
        assert cert["issuer"] == "CN=midbridge test CA,O=midbridge tests"
        assert cert["san_dns"] == ["localhost"]
        assert cert["san_ip"] == ["127.0.0.1"]
        assert cert["serial"] == format(pki.server.serial_number, "x")
        assert cert["not_before"] == pki.server.not_valid_before_utc.isoformat()
        assert cert["not_after"] == pki.server.not_valid_after_utc.isoformat()
        assert cert["self_signed"] is False
        assert len(cert["sha256"]) == 64


async def test_tls_peer_certificate_on_an_empty_answer(
    ctx: ProbeContext, target: Target, pki: Pki
) -> None:
    for payload in (
        {"url": f"{target.https}/hello", "method": "HEAD"},
        {"url": f"{target.https}/empty"},
    ):
        result = await probe(ctx, {**payload, "ca_file": str(pki.ca_file)})
        assert result["body"] == ""
        assert result["tls"]["peer_certificate"]["san_ip"] == ["127.0.0.1"]


async def test_tls_without_verification(ctx: ProbeContext, target: Target, pki: Pki) -> None:
    result = await probe(ctx, {"url": f"{target.https}/hello", "verify": False})
    assert result["status"] == 200
    assert result["tls"]["verified"] is False
    assert result["tls"]["peer_certificate"]["serial"] == format(pki.server.serial_number, "x")


async def test_ssl_context_per_ca_file_is_cached(
    ctx: ProbeContext, target: Target, pki: Pki
) -> None:
    payload = {"url": f"{target.https}/hello", "ca_file": str(pki.ca_file)}
    await probe(ctx, payload)
    client = ctx.resource
    assert isinstance(client, HttpClient)
    context = client.ssl_for(verify=True, ca_file=str(pki.ca_file))
    assert client.ssl_for(verify=True, ca_file=str(pki.ca_file)) is context
    second = await probe(ctx, payload)  # same context: the pooled TLS connection is reused
    assert second["timings_ms"]["reused_connections"] == 1
    os.utime(pki.ca_file, ns=(time.time_ns(), time.time_ns() + 10**9))
    assert client.ssl_for(verify=True, ca_file=str(pki.ca_file)) is not context  # file changed


async def test_settings_give_the_default_ca_file(
    credentials_file: Path, target: Target, pki: Pki
) -> None:
    settings = {"ca_file": str(pki.ca_file), "timeout": 5}
    async with http_context(credentials_file, settings) as ctx:
        result = await probe(ctx, {"url": f"{target.https}/hello"})
    assert result["tls"]["verified"] is True


# --- credentials -----------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("credential_id", "header"),
    [("web-basic", BASIC_HEADER), ("web-bearer", f"Bearer {BEARER_TOKEN}")],
    ids=["basic", "bearer"],  # never a secret in a test id
)
async def test_auth_from_the_credentials_file(
    ctx: ProbeContext, target: Target, credential_id: str, header: str
) -> None:
    result = await probe(ctx, {"url": f"{target.http}/auth", "credential_id": credential_id})
    assert result["status"] == 200
    assert result["json"] == {"authorized": True}
    assert target.seen_auth == [header]
    assert result["request"]["credential_id"] == credential_id
    assert header_values(result, "Set-Cookie") == ["session=<redacted>; HttpOnly; Path=/"]
    text = orjson.dumps(result).decode()
    for secret in SECRETS:
        assert secret not in text


async def test_no_credential_id_sends_no_authorization(ctx: ProbeContext, target: Target) -> None:
    result = await probe(ctx, {"url": f"{target.http}/auth"})
    assert result["status"] == 401
    assert target.seen_auth == [None]


async def test_authorization_does_not_follow_a_redirect_to_another_origin(
    ctx: ProbeContext, target: Target
) -> None:
    result = await probe(ctx, {"url": f"{target.http}/cross", "credential_id": "web-bearer"})
    assert result["final_url"] == f"http://localhost:{target.port}/auth"
    assert result["status"] == 401
    assert target.seen_auth == [None]


async def test_credential_errors_name_credential_id(ctx: ProbeContext, target: Target) -> None:
    url = f"{target.http}/auth"
    with pytest.raises(CredentialError) as unknown:
        await probe(ctx, {"url": url, "credential_id": "nope"})
    assert unknown.value.field == "credential_id"
    with pytest.raises(CredentialError, match="ssh_password") as wrong:
        await probe(ctx, {"url": url, "credential_id": "linux"})
    assert wrong.value.field == "credential_id"
    assert SSH_PASSWORD not in str(wrong.value)
    ctx.credentials = None
    with pytest.raises(CredentialError) as none:
        await probe(ctx, {"url": url, "credential_id": "web-basic"})
    assert none.value.field == "credential_id"
    assert target.seen_auth == []  # nothing was sent


# --- bad input ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("payload", "field", "words"),
    [
        ({"url": "ftp://127.0.0.1/file"}, "url", "http or https"),
        ({"url": "127.0.0.1/path"}, "url", "scheme"),
        ({"url": "http:///nohost"}, "url", "host"),
        ({"url": "http://user:pw@127.0.0.1/"}, "url", "credential_id"),
        ({"url": "http://127.0.0.1:99999/"}, "url", "Port out of range"),
        ({"url": 5}, "url", "string"),
        ({}, "url", "no URL"),
        ({"url": "http://127.0.0.1/", "method": "BREW"}, "method", "GET"),
        ({"url": "http://127.0.0.1/", "headers": {"Authorization": "x"}}, "headers", "credential"),
        ({"url": "http://127.0.0.1/", "headers": {"X-A": "a\r\nb"}}, "headers", "line break"),
        ({"url": "http://127.0.0.1/", "headers": {"bad name": "a"}}, "headers", "header name"),
        ({"url": "http://127.0.0.1/", "headers": "{oops"}, "headers", "JSON"),
        ({"url": "http://127.0.0.1/", "query": {"a": True}}, "query", "text or numbers"),
        ({"url": "http://127.0.0.1/", "body": "a", "json": {}}, "body", "either"),
        ({"url": "http://127.0.0.1/", "max_body": 10**9}, "max_body", "max_body_limit"),
        ({"url": "http://127.0.0.1/", "timeout": 0}, "timeout", "greater than 0"),
        ({"url": "http://127.0.0.1/", "max_redirects": -1}, "max_redirects", "0"),
        ({"url": "http://127.0.0.1/", "credential_id": ""}, "credential_id", "at least 1"),
        ({"url": "http://127.0.0.1/", "nope": 1}, "nope", "not permitted"),
    ],
)
def test_bad_parameters_name_their_field(payload: dict[str, Any], field: str, words: str) -> None:
    record = OutputRecord(sys_id="bad-1", topic=TOPIC, payload=payload)
    with pytest.raises(BadParameter) as info:
        SPEC.build_params(record, probe_settings(SPEC))
    assert info.value.field == field
    assert words in info.value.message


async def test_missing_ca_file_names_ca_file(ctx: ProbeContext, tmp_path: Path) -> None:
    with pytest.raises(BadParameter) as missing:
        await probe(ctx, {"url": "https://127.0.0.1/", "ca_file": str(tmp_path / "none.pem")})
    assert missing.value.field == "ca_file"
    junk = tmp_path / "junk.pem"
    junk.write_text("not a certificate")
    with pytest.raises(BadParameter, match="PEM") as bad:
        await probe(ctx, {"url": "https://127.0.0.1/", "ca_file": str(junk)})
    assert bad.value.field == "ca_file"
    with pytest.raises(BadParameter, match="regular PEM file") as device:
        await probe(ctx, {"url": "https://127.0.0.1/", "ca_file": "/dev/zero"})
    assert device.value.field == "ca_file"


async def test_tls_to_a_plain_port_is_a_tls_error(ctx: ProbeContext, target: Target) -> None:
    with pytest.raises(TlsError, match="tls: handshake failed"):
        await probe(ctx, {"url": f"https://127.0.0.1:{target.port}/hello"})


def test_unknown_setting_is_a_config_error() -> None:
    with pytest.raises(ConfigError) as info:
        probe_settings(SPEC, {"tiemout": 3})
    assert info.value.field == "probes.settings.RESTProbe.tiemout"


def test_target_host_is_the_url_host() -> None:
    record = OutputRecord(sys_id="h-1", topic=TOPIC, payload={"url": "https://Example.COM:8443/x"})
    assert SPEC.target_host(SPEC.build_params(record, probe_settings(SPEC))) == "example.com"


# --- through the bridge and the broker -------------------------------------------------------


async def test_rest_probe_end_to_end_keeps_secrets_off_the_wire(
    broker: BrokerAddress,
    unique_agent: str,
    tmp_path: Path,
    target: Target,
    credentials_file: Path,
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.DEBUG)
    state_dir = tmp_path / "state"
    config = make_config(broker.host, broker.port, unique_agent, state_dir)
    config.bridge.credentials_file = credentials_file
    agent = f"mid.server.{unique_agent}"
    jobs = [
        output_record(TOPIC, agent=agent, payload={"url": f"{target.http}/auth",
                                                   "credential_id": "web-bearer"}),
        output_record(TOPIC, agent=agent, payload={"url": f"{target.http}/auth",
                                                   "credential_id": "web-basic"}),
        output_record(TOPIC, agent=agent, source=f"{target.http}/json"),
        output_record(TOPIC, agent=agent, payload={"url": f"{target.http}/auth",
                                                   "credential_id": "linux"}),
        output_record(TOPIC, agent=agent, payload={"url": "ftp://127.0.0.1/"}),
    ]  # fmt: skip
    async with bridge_and_client(config) as (bridge, client):
        await client.send(jobs)
        results = await client.wait([job["sys_id"] for job in jobs], timeout=20)
        http_client = bridge.probes.context(TOPIC).resource
    assert isinstance(http_client, HttpClient)
    assert http_client.closed  # the bridge closed the shared session at shutdown
    bearer, basic, plain, wrong_type, bad_url = (r.final for r in results)
    for ok in (bearer, basic):
        assert ok["error_string"] == ""
        assert ok["payload"]["status"] == 200
        assert ok["payload"]["json"] == {"authorized": True}
    assert plain["payload"]["json"]["a"] == 1
    assert "credential_id" in wrong_type["error_string"]
    assert wrong_type["payload"]["error"]["kind"] == "credential_error"
    assert bad_url["payload"]["error"] == {
        "kind": "bad_parameter",
        "message": "scheme must be http or https, got 'ftp'",
        "field": "url",
    }
    assert sorted(target.seen_auth, key=str) == sorted(
        [BASIC_HEADER, f"Bearer {BEARER_TOKEN}"], key=str
    )
    wire = orjson.dumps([r.records for r in results]).decode()
    logs = caplog.text
    stored = b"".join(p.read_bytes() for p in state_dir.rglob("*") if p.is_file())
    for secret in SECRETS:
        assert secret not in wire
        assert secret not in logs
        assert secret.encode() not in stored
