"""HTTPS for the built-in instance: a certificate and key given, or a self-signed pair.

- :func:`server_context` loads ``--tls-cert`` / ``--tls-key`` (PEM) into a server
  :class:`ssl.SSLContext`; every problem is a :class:`TlsError` naming the flag at fault.
- :func:`self_signed` makes (first start) or reuses (later starts) a key and a self-signed
  certificate beside the instance's database (``<db>.tls-key.pem``, ``<db>.tls-cert.pem``),
  valid for localhost, 127.0.0.1, ::1 and the given host names; a new certificate is made
  when one of those names is missing from it or it expires within 30 days (same key).
  Clients trust it by its file (``curl --cacert``, ``REQUESTS_CA_BUNDLE``,
  ``SSL_CERT_FILE``) or its SHA-256 fingerprint.
- :func:`client_context` is what the CLI's own HTTP clients use: the system's CAs plus
  ``--ca-file`` (``SSL_CERT_FILE`` / ``SSL_CERT_DIR`` are honoured by OpenSSL as usual).
- :func:`check_public_url` validates ``--public-url``.
"""

from __future__ import annotations

import datetime as dt
import ipaddress
import os
import socket
import ssl
import stat
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlsplit

from cryptography import x509
from cryptography.exceptions import UnsupportedAlgorithm
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed448, ed25519, rsa
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

DEFAULT_NAMES = ("localhost", "127.0.0.1", "::1")
VALID_DAYS = 800  # under the 825 days Apple's clients accept for any TLS server certificate
RENEW_DAYS = 30  # a certificate expiring sooner is replaced at start
ORGANIZATION = "midbridge built-in instance"


# The keys a TLS server can sign its handshakes with (DSA and X25519/X448 cannot).
ServerKey = (
    ec.EllipticCurvePrivateKey
    | rsa.RSAPrivateKey
    | ed25519.Ed25519PrivateKey
    | ed448.Ed448PrivateKey
)


class TlsError(ValueError):
    """A TLS setting that cannot be used: one line, naming the flag."""


@dataclass(frozen=True, slots=True)
class SelfSigned:
    cert: Path
    key: Path
    fingerprint: str  # SHA-256 of the certificate (DER), AA:BB:... as openssl prints it
    names: tuple[str, ...]  # its subjectAltNames
    made: str  # "new" (made now), "renewed" (same key, new certificate) or "" (reused)


# --- server side ----------------------------------------------------------------------------


def server_context(cert: Path, key: Path) -> ssl.SSLContext:
    """A TLS server context for the PEM certificate (chain) ``cert`` and its key ``key``."""
    cert_pem = _read(cert, "--tls-cert")
    key_pem = _read(key, "--tls-key")
    try:
        chain = x509.load_pem_x509_certificates(cert_pem)
    except ValueError:
        raise TlsError(f"--tls-cert: {cert} holds no PEM certificate") from None
    private = _load_key(key_pem, key)
    if _public_der(chain[0].public_key()) != _public_der(private.public_key()):
        raise TlsError(f"--tls-key: {key} is not the key of the certificate in {cert}")
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    try:
        context.load_cert_chain(cert, key)
    except (ssl.SSLError, OSError) as exc:
        reason = getattr(exc, "reason", None) or getattr(exc, "strerror", None) or exc
        raise TlsError(f"--tls-cert/--tls-key: {cert}, {key}: {reason}") from None
    return context


def fingerprint(cert: x509.Certificate) -> str:
    """SHA-256 of the certificate, ``AB:CD:...`` (``openssl x509 -fingerprint -sha256``)."""
    return cert.fingerprint(hashes.SHA256()).hex(":").upper()


def file_fingerprint(path: Path) -> str:
    """The fingerprint of the first certificate in the PEM file ``path`` ("" if none)."""
    cert = _load_cert(path)
    return fingerprint(cert) if cert is not None else ""


def certificate_names(host: str, extra: Iterable[str] = ()) -> tuple[str, ...]:
    """localhost, 127.0.0.1, ::1, the listening host (this machine's name when it listens
    on every address) and ``extra`` (the public URL's host), without repeats."""
    names = list(DEFAULT_NAMES)
    wanted = [host.strip("[]"), *extra]
    if host.strip("[]") in ("", "0.0.0.0", "::"):
        wanted = [socket.gethostname(), *extra]
    for name in wanted:
        name = name.strip("[]").rstrip(".").lower()
        if name and name not in names and name not in ("0.0.0.0", "::"):
            names.append(name)
    return tuple(names)


def self_signed(db: Path, names: Iterable[str]) -> SelfSigned:
    """The self-signed certificate and key beside ``db``: made, renewed or reused."""
    cert_path = db.with_name(db.name + ".tls-cert.pem")
    key_path = db.with_name(db.name + ".tls-key.pem")
    wanted = tuple(dict.fromkeys(names))
    try:
        db.parent.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise TlsError(f"--tls-self-signed: cannot make {db.parent}: {exc.strerror}") from None
    made = ""
    if key_path.exists():
        _check_private(key_path)
        private = _load_key(_read(key_path, "--tls-self-signed"), key_path, "--tls-self-signed")
    else:
        private = ec.generate_private_key(ec.SECP256R1())
        pem = private.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
        _write(key_path, pem, private=True)
        made = "new"
    cert = _reusable(cert_path, private, wanted) if not made else None
    if cert is None:
        # Renewed: the names it had stay (a start with another --host keeps older clients).
        kept = _names_of(_load_cert(cert_path)) if not made else ()
        cert = _make_certificate(private, tuple(dict.fromkeys((*wanted, *kept))))
        _write(cert_path, cert.public_bytes(serialization.Encoding.PEM), private=False)
        made = made or "renewed"
    return SelfSigned(cert_path, key_path, fingerprint(cert), _names_of(cert), made)


def _reusable(path: Path, private: ServerKey, names: tuple[str, ...]) -> x509.Certificate | None:
    """The certificate at ``path`` if it is for ``private``, names every one of ``names``
    and has more than RENEW_DAYS to live."""
    cert = _load_cert(path)
    if cert is None:
        return None
    if _public_der(cert.public_key()) != _public_der(private.public_key()):
        return None
    left = cert.not_valid_after_utc - dt.datetime.now(dt.UTC)
    if left < dt.timedelta(days=RENEW_DAYS):
        return None
    if not set(names) <= set(_names_of(cert)):
        return None
    return cert


def _make_certificate(private: ServerKey, names: tuple[str, ...]) -> x509.Certificate:
    now = dt.datetime.now(dt.UTC)
    subject = x509.Name(
        [
            x509.NameAttribute(NameOID.COMMON_NAME, names[0] if names else "localhost"),
            x509.NameAttribute(NameOID.ORGANIZATION_NAME, ORGANIZATION),
        ]
    )
    alt: list[x509.GeneralName] = []
    for name in names:
        try:
            alt.append(x509.IPAddress(ipaddress.ip_address(name)))
        except ValueError:
            alt.append(x509.DNSName(name))
    public = private.public_key()
    ski = x509.SubjectKeyIdentifier.from_public_key(public)
    return (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(subject)
        .public_key(public)
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(hours=1))
        .not_valid_after(now + dt.timedelta(days=VALID_DAYS))
        .add_extension(x509.SubjectAlternativeName(alt), critical=False)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=True,
                content_commitment=False,
                key_encipherment=False,
                data_encipherment=False,
                key_agreement=False,
                key_cert_sign=False,
                crl_sign=False,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        )
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
        .add_extension(ski, critical=False)
        .add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_subject_key_identifier(ski), critical=False
        )
        .sign(private, hashes.SHA256())
    )


def _load_cert(path: Path) -> x509.Certificate | None:
    try:
        return x509.load_pem_x509_certificate(path.read_bytes())
    except (OSError, ValueError):
        return None


def _names_of(cert: x509.Certificate | None) -> tuple[str, ...]:
    if cert is None:
        return ()
    try:
        alt = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    except x509.ExtensionNotFound:
        return ()
    dns = [str(n) for n in alt.get_values_for_type(x509.DNSName)]
    ips = [str(ip) for ip in alt.get_values_for_type(x509.IPAddress)]
    return tuple(dns + ips)


# --- client side ----------------------------------------------------------------------------


def client_context(ca_file: Path | None, flag: str = "--ca-file") -> ssl.SSLContext:
    """The system's trusted CAs (with ``SSL_CERT_FILE``/``SSL_CERT_DIR`` as OpenSSL reads
    them) plus the PEM certificates in ``ca_file``."""
    context = ssl.create_default_context()
    if ca_file is not None:
        _read(ca_file, flag)
        try:
            context.load_verify_locations(cafile=ca_file)
        except (ssl.SSLError, ValueError):
            raise TlsError(f"{flag}: {ca_file} holds no PEM certificate") from None
    return context


# --- --public-url ---------------------------------------------------------------------------


def check_public_url(url: str, flag: str = "--public-url") -> str:
    """``url`` as the base of the instance's links (no trailing slash), or TlsError: an
    http(s) URL with a host, an optional path prefix, no user, query or fragment."""
    try:
        parts = urlsplit(url.strip())
        port = parts.port
    except ValueError as exc:
        raise TlsError(f"{flag}: {url!r} is not a URL ({exc})") from None
    if parts.scheme not in ("http", "https"):
        raise TlsError(f"{flag}: {url!r} must start with https:// or http://")
    if not parts.hostname:
        raise TlsError(f"{flag}: {url!r} has no host")
    if parts.username is not None or parts.password is not None:
        raise TlsError(f"{flag}: {url!r} must not hold a user or password")
    if parts.query or parts.fragment or url.rstrip().endswith(("?", "#")):
        raise TlsError(f"{flag}: {url!r} must not have a query or fragment")
    if any(c.isspace() for c in url.strip()):
        raise TlsError(f"{flag}: {url!r} must not contain spaces")
    host = parts.hostname
    shown = f"[{host}]" if ":" in host else host
    netloc = shown if port is None else f"{shown}:{port}"
    return f"{parts.scheme}://{netloc}{parts.path.rstrip('/')}"


# --- files ----------------------------------------------------------------------------------


def _read(path: Path, flag: str) -> bytes:
    try:
        return path.read_bytes()
    except FileNotFoundError:
        raise TlsError(f"{flag}: no file {path}") from None
    except IsADirectoryError:
        raise TlsError(f"{flag}: {path} is a directory") from None
    except OSError as exc:
        raise TlsError(f"{flag}: cannot read {path}: {exc.strerror or exc}") from None


def _load_key(pem: bytes, path: Path, flag: str = "--tls-key") -> ServerKey:
    try:
        key = serialization.load_pem_private_key(pem, password=None)
    except TypeError:
        raise TlsError(f"{flag}: {path} is encrypted; give the key without a passphrase") from None
    except (ValueError, UnsupportedAlgorithm):
        raise TlsError(f"{flag}: {path} holds no PEM private key") from None
    if not isinstance(key, ServerKey):
        raise TlsError(f"{flag}: {path}: a {type(key).__name__} cannot sign a TLS handshake")
    return key


def _public_der(public: object) -> bytes:
    der = getattr(public, "public_bytes", None)
    if der is None:
        return b""
    value = der(serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo)
    return value if isinstance(value, bytes) else b""


def _check_private(path: Path) -> None:
    info = path.stat()
    if info.st_mode & (stat.S_IRWXG | stat.S_IRWXO):
        mode = stat.S_IMODE(info.st_mode)
        raise TlsError(f"--tls-self-signed: {path} is open to others (mode {mode:o}); chmod 600 it")
    if hasattr(os, "getuid") and info.st_uid != os.getuid():
        raise TlsError(f"--tls-self-signed: {path} is owned by another user")


def _write(path: Path, data: bytes, *, private: bool) -> None:
    """Write ``data`` to ``path`` through a new file renamed over it (mode 600 if
    ``private``, else 644)."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600 if private else 0o644)
        with os.fdopen(fd, "wb") as handle:
            handle.write(data)
        os.replace(tmp, path)
    except OSError as exc:
        tmp.unlink(missing_ok=True)
        raise TlsError(f"--tls-self-signed: cannot write {path}: {exc.strerror or exc}") from None
