"""The MID's identity: its key pair, validation state and credential decryption.

The stateless cryptography both ends share (sealing, signatures) is ``bridge.wire.sealing``.

- **Key pair** (X25519), made on first start in ``<state_dir>/identity/`` with owner-only
  permissions. Its public key and fingerprint (SHA-256 of the raw public key, hex) go
  in the status record; the platform encrypts credentials to it.
- **Validation**: an administrator's ``SystemCommand validate`` naming the fingerprint
  marks the key validated (a file beside it). ``invalidate`` deletes the key pair, makes a
  new one and marks it not validated: ciphertexts made for the old key no longer open.
- **Encrypted credentials**: hybrid encryption, X25519 key agreement with an ephemeral key
  of the sender, HKDF-SHA256, ChaCha20-Poly1305 with the job's ``sys_id`` as associated
  data, so a ciphertext copied into another job's record does not open.
- **Signed jobs**: the platform signs each output record with Ed25519 over its canonical
  form (the record without ``signature``, JSON with sorted keys, compact); the bridge,
  given the platform's public key, refuses unsigned or badly signed records. The signed
  form carries its freshness (``issued_at``, ``valid_until``, epoch seconds, added by
  ``sign_record``): a signed record without them, or past them, is refused, so a captured
  job cannot be replayed once the bridge's dedupe ledger has forgotten it.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import orjson
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey

from bridge.wire.credentials import Credential, check_credential
from bridge.wire.errors import CredentialError
from bridge.wire.sealing import b64, fingerprint_of, open_sealed, raw_public


@dataclass
class KeyPair:
    private: X25519PrivateKey

    @property
    def public_raw(self) -> bytes:
        return raw_public(self.private.public_key())

    @property
    def public_b64(self) -> str:
        return b64(self.public_raw)

    @property
    def fingerprint(self) -> str:
        return fingerprint_of(self.public_raw)


class Identity:
    """The key pair and validation state under ``<state_dir>/identity``."""

    def __init__(self, state_dir: Path) -> None:
        self.dir = state_dir / "identity"
        self.key_path = self.dir / "x25519.pem"
        self.validated_path = self.dir / "validated"
        self.keys = self._load_or_make()
        self._validated = self._read_validated()

    def _load_or_make(self) -> KeyPair:
        self.dir.mkdir(parents=True, exist_ok=True)
        os.chmod(self.dir, 0o700)
        if self.key_path.exists():
            key = serialization.load_pem_private_key(self.key_path.read_bytes(), password=None)
            if not isinstance(key, X25519PrivateKey):
                raise CredentialError(
                    "the stored key is not an X25519 key", field=str(self.key_path)
                )
            return KeyPair(key)
        key = X25519PrivateKey.generate()
        pem = key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
        fd = os.open(self.key_path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "wb") as handle:
            handle.write(pem)
        return KeyPair(key)

    @property
    def fingerprint(self) -> str:
        return self.keys.fingerprint

    def _read_validated(self) -> bool:
        try:
            return self.validated_path.read_text().strip() == self.fingerprint
        except FileNotFoundError:
            return False

    @property
    def validated(self) -> bool:
        """Read on every job: kept in memory, changed only by ``validate``/``invalidate``."""
        return self._validated

    def validate(self, fingerprint: str) -> None:
        if fingerprint != self.fingerprint:
            raise CredentialError(
                "fingerprint does not match this bridge's key (it may have been re-keyed)",
                field="fingerprint",
            )
        fd = os.open(self.validated_path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "w") as handle:
            handle.write(self.fingerprint)
        self._validated = True

    def invalidate(self) -> None:
        """Drop the key pair, make a new one, not validated."""
        self.validated_path.unlink(missing_ok=True)
        self._validated = False
        self.key_path.unlink(missing_ok=True)
        self.keys = self._load_or_make()

    def decrypt_credential(self, sealed: Any, *, sys_id: str) -> Credential:
        """Open one sealed credential of job ``sys_id``; errors name fields, never values."""
        if not isinstance(sealed, dict):
            raise CredentialError("each sealed credential must be an object", field="credentials")
        if sealed.get("recipient") not in (None, self.fingerprint):
            raise CredentialError(
                "sealed for another key (this bridge was re-keyed or it is another bridge)",
                field="credentials",
            )
        plain = open_sealed(self.keys.private, sealed, sys_id=sys_id)
        data = orjson.loads(plain)
        try:
            cred, _order = check_credential(data, "credentials")
        except Exception as exc:
            raise CredentialError(
                f"sealed credential is invalid: {exc}", field="credentials"
            ) from None
        return cred
