"""The local credentials file (bridge/agent/credentials.py): validation, file rules, resolving."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from bridge.agent.bridge import Bridge
from bridge.agent.config import Config
from bridge.agent.credentials import LocalCredentials, NoCredentials
from bridge.wire.credentials import TYPES, Credential
from bridge.wire.errors import ConfigError, CredentialError
from bridge.wire.records import OutputRecord
from probes import REGISTRY

SECRET = "S3CRET-do-not-show"  # every secret field in these files holds this marker

EVERY_TYPE = f"""
[[credential]]
id = "linux-pw"
type = "ssh_password"
order = 20
user = "discovery"
password = "{SECRET}-1"
sudo_password = "{SECRET}-2"

[[credential]]
id = "linux-key"
type = "ssh_private_key"
order = 10
user = "discovery"
private_key_file = "/etc/midbridge/id_ed25519"
passphrase = "{SECRET}-3"

[[credential]]
id = "snmp-public"
type = "snmp_community"
community = "{SECRET}-4"

[[credential]]
id = "snmp-v3"
type = "snmpv3"
user = "monitor"
auth_protocol = "SHA"
auth_key = "{SECRET}-5"
priv_protocol = "AES"
priv_key = "{SECRET}-6"

[[credential]]
id = "web-basic"
type = "http_basic"
user = "probe"
password = "{SECRET}-7"

[[credential]]
id = "web-bearer"
type = "http_bearer"
token = "{SECRET}-8"
"""

RECORD = OutputRecord(sys_id="job-1", topic="SSHCommand")


def write(tmp_path: Path, text: str, mode: int = 0o600, name: str = "credentials.toml") -> Path:
    path = tmp_path / name
    path.write_text(text, encoding="utf-8")
    path.chmod(mode)
    return path


def load(tmp_path: Path, text: str) -> LocalCredentials:
    return LocalCredentials.from_file(write(tmp_path, text))


def refused(tmp_path: Path, text: str) -> ConfigError:
    """The ConfigError the file raises; it must never quote a secret value."""
    with pytest.raises(ConfigError) as info:
        load(tmp_path, text)
    assert SECRET not in str(info.value)
    assert SECRET not in repr(info.value)
    return info.value


# --- one test per validation rule -----------------------------------------------------------


def test_a_valid_file_with_every_type(tmp_path: Path) -> None:
    creds = load(tmp_path, EVERY_TYPE)
    assert creds.ids == sorted(
        ["linux-pw", "linux-key", "snmp-public", "snmp-v3", "web-basic", "web-bearer"]
    )
    assert set(TYPES) == {
        "ssh_password",
        "ssh_private_key",
        "snmp_community",
        "snmpv3",
        "http_basic",
        "http_bearer",
    }


def test_an_empty_file_holds_no_credentials(tmp_path: Path) -> None:
    assert load(tmp_path, "").ids == []


def test_missing_id(tmp_path: Path) -> None:
    error = refused(tmp_path, f'[[credential]]\ntype = "http_bearer"\ntoken = "{SECRET}"\n')
    assert error.field == "credential[0].id"
    assert "id" in error.message


def test_empty_id(tmp_path: Path) -> None:
    error = refused(
        tmp_path, f'[[credential]]\nid = ""\ntype = "http_bearer"\ntoken = "{SECRET}"\n'
    )
    assert error.field == "credential[0].id"


def test_unknown_type(tmp_path: Path) -> None:
    error = refused(tmp_path, f'[[credential]]\nid = "a"\ntype = "kerberos"\ntoken = "{SECRET}"\n')
    assert error.field == "credential[0].type"
    assert "unknown type 'kerberos'" in error.message
    assert "http_bearer" in error.message  # the valid types are listed


def test_unknown_field(tmp_path: Path) -> None:
    error = refused(
        tmp_path, f'[[credential]]\nid = "a"\ntype = "http_bearer"\ntokn = "{SECRET}"\n'
    )
    assert error.field == "credential[0].tokn"
    assert "unknown field for type http_bearer" in error.message


def test_missing_required_field(tmp_path: Path) -> None:
    error = refused(tmp_path, f'[[credential]]\nid = "a"\ntype = "http_basic"\nuser = "{SECRET}"\n')
    assert error.field == "credential[0].password"
    assert "missing" in error.message


def test_non_string_value(tmp_path: Path) -> None:
    error = refused(
        tmp_path, '[[credential]]\nid = "a"\ntype = "snmp_community"\ncommunity = 12345\n'
    )
    assert error.field == "credential[0].community"
    assert error.message == "must be a string"
    assert "12345" not in str(error)


def test_non_integer_order(tmp_path: Path) -> None:
    error = refused(
        tmp_path,
        f'[[credential]]\nid = "a"\ntype = "http_bearer"\ntoken = "{SECRET}"\norder = "1"\n',
    )
    assert error.field == "credential[0].order"


def test_duplicate_id(tmp_path: Path) -> None:
    one = f'[[credential]]\nid = "same"\ntype = "http_bearer"\ntoken = "{SECRET}"\n'
    error = refused(tmp_path, one + one)
    assert error.field == "credential.same"
    assert "duplicate" in error.message


def test_private_key_type_without_a_key(tmp_path: Path) -> None:
    error = refused(
        tmp_path,
        '[[credential]]\nid = "k"\ntype = "ssh_private_key"\nuser = "u"\n'
        f'passphrase = "{SECRET}"\n',
    )
    assert error.field == "credential[0].private_key"
    assert "private_key_file" in error.message


def test_errors_name_the_entry_index(tmp_path: Path) -> None:
    good = f'[[credential]]\nid = "a"\ntype = "http_bearer"\ntoken = "{SECRET}"\n'
    bad = '[[credential]]\nid = "b"\ntype = "http_bearer"\n'
    assert refused(tmp_path, good + bad).field == "credential[1].token"


def test_unknown_top_level_key(tmp_path: Path) -> None:
    error = refused(tmp_path, f'credentials = "{SECRET}"\n')
    assert error.field == "credentials"


def test_credential_must_be_an_array_of_tables(tmp_path: Path) -> None:
    error = refused(tmp_path, f'[credential]\nid = "a"\ntype = "http_bearer"\ntoken = "{SECRET}"\n')
    assert "array of tables" in error.message


def test_not_toml(tmp_path: Path) -> None:
    # The unterminated string holds the secret: the parser's message must not quote it.
    error = refused(
        tmp_path, f'[[credential]]\nid = "a"\ntype = "http_bearer"\ntoken = "{SECRET}\n'
    )
    assert "TOML does not parse" in error.message
    assert "line 4" in error.message


# --- the file itself --------------------------------------------------------------------------


@pytest.mark.parametrize("mode", [0o644, 0o640, 0o604, 0o660, 0o700 | 0o004])
def test_a_file_others_may_read_is_refused(tmp_path: Path, mode: int) -> None:
    path = write(tmp_path, EVERY_TYPE, mode=mode)
    with pytest.raises(ConfigError) as info:
        LocalCredentials.from_file(path)
    assert "chmod 600" in info.value.message
    assert f"mode {mode:o}" in info.value.message
    assert info.value.field == str(path)


@pytest.mark.parametrize("mode", [0o600, 0o400])
def test_an_owner_only_file_is_accepted(tmp_path: Path, mode: int) -> None:
    path = write(tmp_path, EVERY_TYPE, mode=mode)
    assert len(LocalCredentials.from_file(path).ids) == 6


def test_a_file_owned_by_another_user_is_refused(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    path = write(tmp_path, EVERY_TYPE)
    owner = path.stat().st_uid
    monkeypatch.setattr(os, "getuid", lambda: owner + 1)
    with pytest.raises(ConfigError, match="owned by another user"):
        LocalCredentials.from_file(path)


def test_a_missing_file(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="not found"):
        LocalCredentials.from_file(tmp_path / "absent.toml")


def test_the_bridge_refuses_a_bad_file_at_start(tmp_path: Path) -> None:
    path = write(tmp_path, EVERY_TYPE, mode=0o644)
    config = Config.model_validate(
        {"bridge": {"state_dir": str(tmp_path / "state"), "credentials_file": str(path)}}
    )
    with pytest.raises(ConfigError, match="chmod 600"):
        Bridge(config, REGISTRY)


# --- resolving -----------------------------------------------------------------------------


async def test_resolve_by_id(tmp_path: Path) -> None:
    creds = load(tmp_path, EVERY_TYPE)
    [cred] = await creds.resolve(RECORD, credential_id="web-basic", types=("http_basic",))
    assert cred.id == "web-basic"
    assert cred.type == "http_basic"
    assert dict(cred.fields) == {"user": "probe", "password": f"{SECRET}-7"}


async def test_resolve_by_id_accepts_any_of_the_probe_types(tmp_path: Path) -> None:
    creds = load(tmp_path, EVERY_TYPE)
    [cred] = await creds.resolve(
        RECORD, credential_id="web-bearer", types=("http_basic", "http_bearer")
    )
    assert cred.type == "http_bearer"


async def test_resolve_by_type_in_order(tmp_path: Path) -> None:
    text = EVERY_TYPE + (
        f'[[credential]]\nid = "b-late"\ntype = "ssh_password"\nuser = "u"\npassword = "{SECRET}"\n'
        f'[[credential]]\nid = "a-late"\ntype = "ssh_password"\nuser = "u"\npassword = "{SECRET}"\n'
        f'[[credential]]\nid = "first"\ntype = "ssh_password"\norder = 1\nuser = "u"\n'
        f'password = "{SECRET}"\n'
    )
    creds = load(tmp_path, text)
    found = await creds.resolve(RECORD, credential_id=None, types=("ssh_password",))
    # order (default 100) first, then id
    assert [c.id for c in found] == ["first", "linux-pw", "a-late", "b-late"]
    both = await creds.resolve(
        RECORD, credential_id=None, types=("ssh_password", "ssh_private_key")
    )
    assert [c.id for c in both] == ["first", "linux-key", "linux-pw", "a-late", "b-late"]


async def test_wrong_type_for_the_probe(tmp_path: Path) -> None:
    creds = load(tmp_path, EVERY_TYPE)
    with pytest.raises(CredentialError) as info:
        await creds.resolve(RECORD, credential_id="linux-pw", types=("http_basic", "http_bearer"))
    assert info.value.field == "credential_id"
    assert "ssh_password" in info.value.message
    assert "http_basic, http_bearer" in info.value.message
    assert SECRET not in str(info.value)


async def test_unknown_id(tmp_path: Path) -> None:
    creds = load(tmp_path, EVERY_TYPE)
    with pytest.raises(CredentialError) as info:
        await creds.resolve(RECORD, credential_id="nope", types=("http_basic",))
    assert info.value.field == "credential_id"
    assert info.value.kind == "credential_error"
    assert "'nope'" in info.value.message


async def test_no_credential_of_the_type(tmp_path: Path) -> None:
    creds = load(tmp_path, '[[credential]]\nid = "a"\ntype = "http_bearer"\ntoken = "t"\n')
    with pytest.raises(CredentialError) as info:
        await creds.resolve(RECORD, credential_id=None, types=("snmpv3",))
    assert info.value.field == "credential_id"


async def test_no_credentials_configured() -> None:
    with pytest.raises(CredentialError, match="credentials_file") as info:
        await NoCredentials().resolve(RECORD, credential_id="a", types=("http_basic",))
    assert info.value.field == "credential_id"


# --- secrets stay hidden ------------------------------------------------------------------


async def test_repr_and_str_never_show_secrets(tmp_path: Path) -> None:
    creds = load(tmp_path, EVERY_TYPE)
    every = await creds.resolve(RECORD, credential_id=None, types=tuple(TYPES))
    assert len(every) == 6
    for cred in every:
        for shown in (repr(cred), str(cred), f"{cred}", f"{cred!r}", repr([cred]), repr(creds)):
            assert SECRET not in shown
        assert repr(cred).startswith(f"Credential(id={cred.id!r}, type={cred.type!r}")
    direct = Credential(id="x", type="http_bearer", fields={"token": SECRET})
    assert SECRET not in repr(direct)
    assert "1 hidden" in repr(direct)


# --- malformed files: each is a ConfigError naming the field, never a crash ---


def test_malformed_type_given_as_a_list(tmp_path: Path) -> None:
    error = refused(tmp_path, '[[credential]]\nid = "a"\ntype = ["http_bearer"]\ntoken = "t"\n')
    assert error.field == "credential[0].type"


def test_malformed_entry_that_is_not_a_table(tmp_path: Path) -> None:
    error = refused(tmp_path, 'credential = ["http_bearer"]\n')
    assert error.field == "credential[0]"


def test_malformed_file_not_utf8(tmp_path: Path) -> None:
    path = tmp_path / "latin1.toml"
    path.write_bytes(b'[[credential]]\nid = "a"\ntype = "http_bearer"\ntoken = "t\xe9"\n')
    path.chmod(0o600)
    with pytest.raises(ConfigError):
        LocalCredentials.from_file(path)


def test_malformed_path_is_a_directory(tmp_path: Path) -> None:
    path = tmp_path / "dir.toml"
    path.mkdir(mode=0o700)
    with pytest.raises(ConfigError):
        LocalCredentials.from_file(path)
