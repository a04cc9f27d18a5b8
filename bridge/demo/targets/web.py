"""The demo's web servers: aiohttp on HTTP or HTTPS (a self-signed certificate made at start)."""

from __future__ import annotations

import contextlib
import datetime
import ipaddress
import ssl
import tempfile
from collections.abc import Awaitable, Callable
from pathlib import Path

from aiohttp import web
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from bridge.demo.targets.network import WebSite


def self_signed_context(hostname: str, address: str) -> ssl.SSLContext:
    """A server TLS context with a fresh self-signed certificate for ``hostname``."""
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name(
        [
            x509.NameAttribute(NameOID.COMMON_NAME, hostname),
            x509.NameAttribute(NameOID.ORGANIZATION_NAME, "midbridge demo"),
        ]
    )
    now = datetime.datetime.now(datetime.UTC)
    alt_names: list[x509.GeneralName] = [x509.DNSName(hostname)]
    with contextlib.suppress(ValueError):
        alt_names.append(x509.IPAddress(ipaddress.ip_address(address)))
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(hours=1))
        .not_valid_after(now + datetime.timedelta(days=30))
        .add_extension(x509.SubjectAlternativeName(alt_names), critical=False)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .sign(key, hashes.SHA256())
    )
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    with tempfile.TemporaryDirectory(prefix="midbridge-demo-tls-") as tmp:
        cert_file, key_file = Path(tmp) / "cert.pem", Path(tmp) / "key.pem"
        cert_file.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
        key_file.touch(mode=0o600)
        key_file.write_bytes(
            key.private_bytes(
                serialization.Encoding.PEM,
                serialization.PrivateFormat.PKCS8,
                serialization.NoEncryption(),
            )
        )
        context.load_cert_chain(cert_file, key_file)
    return context


def _site_app(site: WebSite) -> web.Application:
    page = (
        '<!doctype html>\n<html lang="en"><head><meta charset="utf-8">'
        f"<title>{site.title}</title></head>\n"
        f"<body><h1>{site.title}</h1><p>{site.hostname}: a sample web server of the "
        "midbridge demo.</p></body></html>\n"
    )

    async def index(request: web.Request) -> web.Response:
        return web.Response(text=page, content_type="text/html")

    async def server_header(request: web.Request, response: web.StreamResponse) -> None:
        response.headers["Server"] = site.server

    app = web.Application()
    app.router.add_get("/", index)
    app.on_response_prepare.append(server_header)
    return app


async def start_web(
    site: WebSite, address: str, port: int, *, tls: bool
) -> Callable[[], Awaitable[None]]:
    runner = web.AppRunner(_site_app(site), access_log=None, handle_signals=False)
    await runner.setup()
    try:
        context = self_signed_context(site.hostname, address) if tls else None
        await web.TCPSite(runner, address, port, ssl_context=context, reuse_address=True).start()
    except BaseException:
        await runner.cleanup()
        raise
    return runner.cleanup
