"""The key pair, validation state, sealed credentials and job signatures (no broker)."""

from __future__ import annotations

import base64
import os
import stat
from pathlib import Path

import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from bridge.agent.identity import Identity
from bridge.wire.errors import BadRecord, ConfigError, CredentialError
from bridge.wire.sealing import SignatureCheck, encrypt_credential, sign_record

SECRET = "s3cret-t0ken-value"
BEARER = {"id": "api", "type": "http_bearer", "token": SECRET}


def test_key_pair_is_made_once_with_owner_only_permissions(tmp_path: Path) -> None:
    first = Identity(tmp_path)
    mode = stat.S_IMODE(os.stat(first.key_path).st_mode)
    assert mode == 0o600
    assert stat.S_IMODE(os.stat(first.dir).st_mode) == 0o700
    again = Identity(tmp_path)
    assert again.fingerprint == first.fingerprint
    assert len(first.fingerprint) == 64
    assert not first.validated


def test_validate_needs_the_right_fingerprint(tmp_path: Path) -> None:
    ident = Identity(tmp_path)
    with pytest.raises(CredentialError) as info:
        ident.validate("0" * 64)
    assert info.value.field == "fingerprint"
    assert not ident.validated
    ident.validate(ident.fingerprint)
    assert ident.validated
    assert Identity(tmp_path).validated  # survives a restart


def test_sealed_credential_opens_only_for_its_job_and_key(tmp_path: Path) -> None:
    ident = Identity(tmp_path)
    sealed = encrypt_credential(ident.keys.public_raw, BEARER, sys_id="job-1")
    assert SECRET not in str(sealed)
    cred = ident.decrypt_credential(sealed, sys_id="job-1")
    assert cred.id == "api"
    assert cred.fields["token"] == SECRET
    assert SECRET not in repr(cred)
    with pytest.raises(CredentialError, match="does not open for this job"):
        ident.decrypt_credential(sealed, sys_id="job-2")  # replayed into another job


def test_invalidate_drops_the_key_so_old_ciphertexts_no_longer_open(tmp_path: Path) -> None:
    ident = Identity(tmp_path)
    ident.validate(ident.fingerprint)
    old = ident.fingerprint
    sealed = encrypt_credential(ident.keys.public_raw, BEARER, sys_id="job-1")
    ident.invalidate()
    assert ident.fingerprint != old
    assert not ident.validated
    with pytest.raises(CredentialError, match="another key"):
        ident.decrypt_credential(sealed, sys_id="job-1")
    sealed.pop("recipient")  # even without the hint, it does not open
    with pytest.raises(CredentialError, match="does not open"):
        ident.decrypt_credential(sealed, sys_id="job-1")


@pytest.mark.parametrize(
    "broken",
    [
        "not an object",
        {"ephemeral": "!!", "nonce": "AAAA", "ciphertext": "AAAA"},
        {"ephemeral": base64.b64encode(b"x" * 31).decode(), "nonce": "AAAA", "ciphertext": ""},
        {"ephemeral": None},
    ],
)
def test_malformed_sealed_credentials_are_credential_errors(tmp_path: Path, broken: object) -> None:
    ident = Identity(tmp_path)
    with pytest.raises(CredentialError) as info:
        ident.decrypt_credential(broken, sys_id="job-1")
    assert info.value.field is not None
    assert info.value.field.startswith("credentials")


def test_sealed_credential_content_is_validated_without_echoing_secrets(tmp_path: Path) -> None:
    ident = Identity(tmp_path)
    bad = {"id": "x", "type": "http_bearer", "token": SECRET, "extra": SECRET}
    sealed = encrypt_credential(ident.keys.public_raw, bad, sys_id="j")
    with pytest.raises(CredentialError) as info:
        ident.decrypt_credential(sealed, sys_id="j")
    assert SECRET not in str(info.value)


def platform_key() -> tuple[Ed25519PrivateKey, str]:
    private = Ed25519PrivateKey.generate()
    raw = private.public_key().public_bytes(
        serialization.Encoding.Raw, serialization.PublicFormat.Raw
    )
    return private, base64.b64encode(raw).decode()


def test_signatures_accept_good_refuse_unsigned_and_tampered() -> None:
    private, public_b64 = platform_key()
    check = SignatureCheck(public_b64)
    record = {"sys_id": "a", "topic": "Echo", "payload": {"message": "hi"}}
    signed = sign_record(private, record)
    check.verify(signed)
    with pytest.raises(BadRecord, match="not signed"):
        check.verify(record)
    tampered = {**signed, "payload": {"message": "rm -rf"}}
    with pytest.raises(BadRecord, match="does not verify"):
        check.verify(tampered)
    other, _ = platform_key()
    with pytest.raises(BadRecord, match="does not verify"):
        check.verify(sign_record(other, record))
    with pytest.raises(BadRecord, match="base64"):
        check.verify({**record, "signature": 5})


def test_bad_platform_key_is_a_config_error() -> None:
    with pytest.raises(ConfigError) as info:
        SignatureCheck("not-base64!")
    assert info.value.field == "security.platform_key"
