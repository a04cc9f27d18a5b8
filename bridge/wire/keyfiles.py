"""Owner-only key files: made once with mode 600, refused when others may read them.

The built-in instance keeps its at-rest and signing keys this way
(``bridge.instance.platform_credentials``), and so does the relay its signing key
(``bridge.relay.signing``): a job signer's private key read by another user would let that
user sign jobs every bridge runs.
"""

from __future__ import annotations

import base64
import contextlib
import os
import stat
from pathlib import Path

from cryptography.exceptions import UnsupportedAlgorithm
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from bridge.wire.errors import ConfigError


def check_private(path: Path) -> None:
    """``ConfigError`` naming ``path`` if group or others have any access, or another owns it."""
    info = path.stat()
    if info.st_mode & (stat.S_IRWXG | stat.S_IRWXO):
        raise ConfigError(
            f"key file is open to others (mode {stat.S_IMODE(info.st_mode):o}); chmod 600 it",
            field=str(path),
        )
    if hasattr(os, "getuid") and info.st_uid != os.getuid():
        raise ConfigError("key file is owned by another user", field=str(path))


def write_private(path: Path, data: bytes) -> None:
    """Create ``path`` with mode 600 and ``data`` (it must not exist: no race replaces a key)."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "wb") as handle:
        handle.write(data)


def signing_key_file(path: Path) -> Ed25519PrivateKey:
    """The Ed25519 private key in ``path`` (PKCS#8 PEM), made owner-only on first use."""
    path.parent.mkdir(parents=True, exist_ok=True)
    if not path.exists():
        pem = Ed25519PrivateKey.generate().private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
        with contextlib.suppress(FileExistsError):  # made meanwhile by another process
            write_private(path, pem)
    check_private(path)
    try:
        key = serialization.load_pem_private_key(path.read_bytes(), password=None)
    except TypeError:  # encrypted: it would need a password we do not take
        raise ConfigError("is encrypted: give an unencrypted PKCS#8 PEM", field=str(path)) from None
    except (ValueError, UnsupportedAlgorithm):
        raise ConfigError("is not a PEM private key", field=str(path)) from None
    if not isinstance(key, Ed25519PrivateKey):
        raise ConfigError("is not an Ed25519 private key", field=str(path))
    return key


def public_key_b64(key: Ed25519PrivateKey) -> str:
    """The raw public key, base64: what a bridge takes as ``security.platform_key``."""
    raw = key.public_key().public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
    return base64.b64encode(raw).decode("ascii")
