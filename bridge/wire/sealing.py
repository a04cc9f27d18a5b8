"""What both ends share of midbridge's cryptography, stateless: sealed credentials and
signed records (docs/security.md).

- A credential is sealed to one bridge's X25519 public key for one job: an ephemeral key,
  HKDF-SHA256, ChaCha20-Poly1305 with the job's ``sys_id`` as associated data.
- An output record is signed with the platform's Ed25519 key over its canonical JSON,
  freshness (``issued_at``, ``valid_until``) included.

The bridge's own key files and validation state are ``bridge.agent.identity``.
"""

from __future__ import annotations

import base64
import hashlib
import os
import time
from typing import Any

import orjson
from cryptography.exceptions import InvalidSignature, InvalidTag
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey, X25519PublicKey
from cryptography.hazmat.primitives.ciphers.aead import ChaCha20Poly1305
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

from bridge.wire.errors import BadRecord, CredentialError

_INFO = b"midbridge credentials v1"
SIGNATURE_FIELD = "signature"
ISSUED_AT_FIELD = "issued_at"
VALID_UNTIL_FIELD = "valid_until"
DEFAULT_SIGNATURE_VALIDITY = 86_400.0  # seconds a signed record stays valid (the broker's
# default session expiry: as long as a broker keeps a job for an absent bridge)


def b64(data: bytes) -> str:
    return base64.b64encode(data).decode("ascii")


def unb64(text: Any, field: str) -> bytes:
    if not isinstance(text, str):
        raise CredentialError("must be base64 text", field=field)
    try:
        return base64.b64decode(text, validate=True)
    except ValueError:
        raise CredentialError("is not valid base64", field=field) from None


def raw_public(key: X25519PublicKey | Ed25519PublicKey) -> bytes:
    return key.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)


def fingerprint_of(public_raw: bytes) -> str:
    return hashlib.sha256(public_raw).hexdigest()


def derive_key(shared: bytes, ephemeral_raw: bytes, recipient_raw: bytes) -> bytes:
    return HKDF(
        algorithm=hashes.SHA256(), length=32, salt=ephemeral_raw + recipient_raw, info=_INFO
    ).derive(shared)


def encrypt_credential(
    recipient_public_raw: bytes, credential: dict[str, Any], *, sys_id: str
) -> dict[str, str]:
    """The platform's side: seal one credential for one job to one bridge's public key."""
    ephemeral = X25519PrivateKey.generate()
    ephemeral_raw = raw_public(ephemeral.public_key())
    shared = ephemeral.exchange(X25519PublicKey.from_public_bytes(recipient_public_raw))
    key = derive_key(shared, ephemeral_raw, recipient_public_raw)
    nonce = os.urandom(12)
    sealed = ChaCha20Poly1305(key).encrypt(nonce, orjson.dumps(credential), sys_id.encode())
    return {
        "alg": "x25519-hkdf-sha256-chacha20poly1305",
        "recipient": fingerprint_of(recipient_public_raw),
        "ephemeral": b64(ephemeral_raw),
        "nonce": b64(nonce),
        "ciphertext": b64(sealed),
    }


def open_sealed(private: X25519PrivateKey, sealed: dict[str, Any], *, sys_id: str) -> bytes:
    """The bridge's side: the plaintext of one credential sealed to ``private`` for job
    ``sys_id``; errors name fields, never values."""
    ephemeral_raw = unb64(sealed.get("ephemeral"), "credentials.ephemeral")
    nonce = unb64(sealed.get("nonce"), "credentials.nonce")
    ciphertext = unb64(sealed.get("ciphertext"), "credentials.ciphertext")
    if len(ephemeral_raw) != 32 or len(nonce) != 12:
        raise CredentialError("malformed sealed credential", field="credentials")
    shared = private.exchange(X25519PublicKey.from_public_bytes(ephemeral_raw))
    key = derive_key(shared, ephemeral_raw, raw_public(private.public_key()))
    try:
        plain = ChaCha20Poly1305(key).decrypt(nonce, ciphertext, sys_id.encode())
    except InvalidTag:
        raise CredentialError(
            "the sealed credential does not open for this job and key", field="credentials"
        ) from None
    return plain


def canonical(record: dict[str, Any]) -> bytes:
    """The bytes a job signature covers: the record without its signature, keys sorted."""
    body = {k: v for k, v in record.items() if k != SIGNATURE_FIELD}
    return orjson.dumps(body, option=orjson.OPT_SORT_KEYS)


def sign_record(
    private: Ed25519PrivateKey,
    record: dict[str, Any],
    *,
    valid_for: float = DEFAULT_SIGNATURE_VALIDITY,
    now: float | None = None,
) -> dict[str, Any]:
    """The platform's side: a copy of ``record`` with its freshness and its ``signature``.

    ``issued_at`` (now) and ``valid_until`` (now + ``valid_for``) are set, replacing any
    the record had, and signed with the rest: a bridge refuses the record after
    ``valid_until``.
    """
    issued_at = time.time() if now is None else now
    fresh = {**record, ISSUED_AT_FIELD: issued_at, VALID_UNTIL_FIELD: issued_at + valid_for}
    return {**fresh, SIGNATURE_FIELD: b64(private.sign(canonical(fresh)))}


def _signed_time(record: dict[str, Any], field: str) -> float:
    """A freshness field of a signed record, as epoch seconds (BadRecord naming it)."""
    value = record.get(field)
    if value is None:
        raise BadRecord(
            "is missing: a signed record must carry issued_at and valid_until, signed with it "
            "(bridge.wire.sealing.sign_record adds them); without them it could be replayed "
            "forever",
            field=field,
        )
    if isinstance(value, bool) or not isinstance(value, int | float) or value != value:
        raise BadRecord("must be a number of epoch seconds", field=field)
    return float(value)


class SignatureCheck:
    """Verifies output records against the platform's Ed25519 public key, and their freshness.

    A record is fresh from ``issued_at`` to ``valid_until``, each widened by
    ``clock_skew``, and never longer than ``max_age`` seconds after ``issued_at``: the bridge
    sets that to what its dedupe ledger remembers, so a job it ran is refused as stale
    before the ledger forgets it.
    """

    def __init__(
        self, public_key_b64: str, *, clock_skew: float = 60.0, max_age: float | None = None
    ) -> None:
        try:
            raw = base64.b64decode(public_key_b64, validate=True)
            self.key = Ed25519PublicKey.from_public_bytes(raw)
        except ValueError:
            from bridge.wire.errors import ConfigError

            raise ConfigError(
                "must be the platform's raw Ed25519 public key, base64",
                field="security.platform_key",
            ) from None
        self.clock_skew = clock_skew
        self.max_age = max_age

    def verify(self, record: dict[str, Any]) -> None:
        signature = record.get(SIGNATURE_FIELD)
        if signature is None:
            raise BadRecord(
                "the record is not signed and signatures are required", field="signature"
            )
        if not isinstance(signature, str):
            raise BadRecord("must be base64 text", field="signature")
        try:
            signed = canonical(record)
        except (TypeError, ValueError):  # orjson writes about 254 levels, reads 1,024
            raise BadRecord(
                "the record cannot be put in its canonical form (nested too deep?)",
                field="signature",
            ) from None
        try:
            self.key.verify(base64.b64decode(signature, validate=True), signed)
        except (InvalidSignature, ValueError):
            raise BadRecord(
                "does not verify with the platform's key (tampered or signed by another key)",
                field="signature",
            ) from None
        self.check_fresh(record, time.time())

    def check_fresh(self, record: dict[str, Any], now: float) -> None:
        """Refuse a signed record issued in the future or past its validity (field named)."""
        issued_at = _signed_time(record, ISSUED_AT_FIELD)
        valid_until = _signed_time(record, VALID_UNTIL_FIELD)
        if issued_at - self.clock_skew > now:
            raise BadRecord(
                f"signed {issued_at - now:.0f} s in the future, more than the "
                f"{self.clock_skew:g} s of clock skew allowed (security.clock_skew)",
                field=ISSUED_AT_FIELD,
            )
        last_valid = valid_until
        if self.max_age is not None:
            last_valid = min(valid_until, issued_at + self.max_age)
        if now > last_valid + self.clock_skew:
            raise BadRecord(
                f"the signed record expired {now - last_valid:.0f} s ago (signed at "
                f"{issued_at:.0f}, valid until {last_valid:.0f}, clock skew allowed "
                f"{self.clock_skew:g} s): a stale or replayed job is not run",
                field=VALID_UNTIL_FIELD,
            )
