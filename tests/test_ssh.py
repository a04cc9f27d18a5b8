"""SSHCommand against a real OpenSSH server (``tests/sshd.py``), and through the bridge.

The tests run as root: they create two local accounts once (``mbkey``, ``mbpass``), start
sshd on a free 127.0.0.1 port with a config of their own, and check output, exit codes,
sudo, authentication failures, host-key changes, timeouts (the process must be gone on
the server), the channel cap, the pool, bad input, and that no secret reaches a record,
a log or the bridge's state.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import orjson
import pytest

from bridge.agent.credentials import LocalCredentials
from bridge.wire.client import output_record
from bridge.wire.credentials import Credential
from bridge.wire.errors import (
    AuthFailed,
    BadParameter,
    BridgeError,
    ConfigError,
    ConnectionRefused,
    CredentialError,
    HostKeyMismatch,
    ProbeTimeout,
    ProtocolError,
)
from bridge.wire.records import OutputRecord
from probes import REGISTRY
from probes.contract import Job, ProbeContext
from probes.kit.ratelimit import RateLimiter
from probes.ssh import SPEC, TOPIC, SSHPool, build_params, remote_command
from tests.brokers import BrokerAddress
from tests.harness import bridge_and_client, make_config, probe_settings
from tests.sshd import (
    SshdUnavailable,
    SshServer,
    TestUsers,
    check_sudo,
    ensure_users,
    free_port,
    generate_key,
    remove_users,
)

# --- fixtures -----------------------------------------------------------------------------


@pytest.fixture(scope="session")
def users() -> Iterator[TestUsers]:
    try:
        made = ensure_users()
    except SshdUnavailable as exc:
        pytest.fail(str(exc), pytrace=False)
    yield made
    remove_users(made)


@pytest.fixture
def sudo_ready(users: TestUsers) -> None:
    """For tests that use sudo on the target: fail clearly if it is not installed."""
    try:
        check_sudo(users)
    except SshdUnavailable as exc:
        pytest.fail(str(exc), pytrace=False)


@pytest.fixture(scope="session")
def keys(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """``good`` is authorized for mbkey, ``other`` is not."""
    base = tmp_path_factory.mktemp("ssh-keys")
    return {name: generate_key(base / f"id_{name}") for name in ("good", "other")}


@pytest.fixture
def sshd(tmp_path: Path, users: TestUsers, keys: dict[str, Path]) -> Iterator[SshServer]:
    good_pub = keys["good"].with_name(keys["good"].name + ".pub")
    server = SshServer(tmp_path / "sshd", authorized_keys={users.key_user: [good_pub]})
    try:
        server.start()
    except SshdUnavailable as exc:
        pytest.fail(str(exc), pytrace=False)
    yield server
    server.close()


def password_cred(users: TestUsers, cid: str = "pw", password: str | None = None) -> Credential:
    return Credential(
        cid,
        "ssh_password",
        {"user": users.pass_user, "password": password if password is not None else users.password},
    )


def key_cred(users: TestUsers, key: Path, cid: str = "key") -> Credential:
    return Credential(
        cid, "ssh_private_key", {"user": users.key_user, "private_key_file": str(key)}
    )


def make_ctx(tmp_path: Path, creds: list[Credential], **settings: Any) -> ProbeContext:
    """The probe's context as the bridge builds it: settings checked, its own pool."""
    validated = probe_settings(SPEC, {"known_hosts": str(tmp_path / "known_hosts"), **settings})
    return ProbeContext(
        agent="mid.server.test",
        rate=RateLimiter(0),
        per_host_limit=8,
        settings=validated,
        credentials=LocalCredentials([(c, i) for i, c in enumerate(creds)]),
        resource=SSHPool(validated),
    )


@pytest.fixture
async def contexts() -> AsyncIterator[list[ProbeContext]]:
    """Contexts a test registers here get their pool closed afterwards."""
    made: list[ProbeContext] = []
    yield made
    for ctx in made:
        pool = ctx.resource
        if isinstance(pool, SSHPool):
            await pool.aclose()


def pool_of(ctx: ProbeContext) -> SSHPool:
    pool = ctx.resource
    assert isinstance(pool, SSHPool)
    return pool


async def probe(
    ctx: ProbeContext, server: SshServer, payload: dict[str, Any] | None = None, **record: Any
) -> dict[str, Any]:
    """Run one SSHCommand job against ``server``; the one result chunk."""
    rec = OutputRecord(
        sys_id="t",
        topic=TOPIC,
        source=record.pop("source", server.host),
        name=record.pop("name", ""),
        payload={"port": server.port, **(payload or {})},
    )
    params = build_params(rec, ctx.settings)
    chunks = [chunk async for chunk in SPEC.run(Job(rec, params), ctx)]
    assert len(chunks) == 1
    return chunks[0]


async def command(*args: str) -> tuple[int, str]:
    proc = await asyncio.create_subprocess_exec(
        *args, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.DEVNULL
    )
    out, _ = await proc.communicate()
    assert proc.returncode is not None
    return proc.returncode, out.decode(errors="replace")


async def running(pattern: str) -> bool:
    """Whether some process's command line matches ``pattern`` (pgrep -f)."""
    status, _ = await command("pgrep", "-f", pattern)
    assert status in (0, 1)
    return status == 0


async def processes_gone(pattern: str, timeout: float = 5.0) -> bool:
    """True once no process's command line matches ``pattern``, within ``timeout``."""
    deadline = time.monotonic() + timeout
    while await running(pattern):
        if time.monotonic() > deadline:
            return False
        await asyncio.sleep(0.1)
    return True


# --- output, exit codes, credentials ------------------------------------------------------


async def test_output_and_exit_status(
    sshd: SshServer,
    users: TestUsers,
    keys: dict[str, Path],
    tmp_path: Path,
    contexts: list[ProbeContext],
) -> None:
    ctx = make_ctx(tmp_path, [password_cred(users), key_cred(users, keys["good"])])
    contexts.append(ctx)
    result = await probe(ctx, sshd, name="id -un; echo to-err >&2; exit 3")
    assert result["exit_status"] == 3  # a normal result, not an error record
    assert result["exit_signal"] is None
    assert result["stdout"] == f"{users.pass_user}\n"
    assert result["stderr"] == "to-err\n"
    assert result["user"] == users.pass_user
    assert result["credential_id"] == "pw"
    assert result["command"] == "id -un; echo to-err >&2; exit 3"
    assert (result["host"], result["port"]) == ("127.0.0.1", sshd.port)
    assert result["stdout_truncated"] is result["stderr_truncated"] is False
    assert result["duration_ms"] > 0

    by_key = await probe(ctx, sshd, {"command": "id -un", "credential_id": "key"}, name="ignored")
    assert by_key["stdout"] == f"{users.key_user}\n"
    assert by_key["exit_status"] == 0
    assert by_key["credential_id"] == "key"

    big = await probe(
        ctx, sshd, {"command": "head -c 5000 /dev/zero | tr '\\0' a", "max_output": 100}
    )
    assert big["stdout"] == "a" * 100
    assert big["stdout_truncated"] is True
    assert big["exit_status"] == 0  # the rest was drained, the command ran to its end

    # Standard input is closed at once: a command that reads it does not hang.
    reader = await probe(ctx, sshd, {"command": "cat; echo after-cat", "command_timeout": 5})
    assert reader["stdout"] == "after-cat\n"

    # Bash-isms work: the command goes to the login shell (bash), not to sh.
    bashism = await probe(ctx, sshd, {"command": "x=(a b c); echo ${#x[@]} ${BASH_VERSION:+bash}"})
    assert bashism["stdout"] == "3 bash\n"


async def test_every_candidate_credential_is_tried_and_the_winner_remembered(
    sshd: SshServer,
    users: TestUsers,
    keys: dict[str, Path],
    tmp_path: Path,
    contexts: list[ProbeContext],
) -> None:
    creds = [
        password_cred(users, "wrong-pw", "not-the-password"),
        key_cred(users, keys["other"], "wrong-key"),
        key_cred(users, keys["good"], "right-key"),
    ]
    ctx = make_ctx(tmp_path, creds)
    contexts.append(ctx)
    result = await probe(ctx, sshd, {"command": "id -un"})
    assert result["credential_id"] == "right-key"
    assert result["stdout"] == f"{users.key_user}\n"
    assert pool_of(ctx).connects == 1
    # The next job goes straight to the credential that worked (no new failed logins).
    failures_before = sshd.log_tail(1_000_000).count("Failed ")
    again = await probe(ctx, sshd, {"command": "true"})
    assert again["credential_id"] == "right-key"
    assert sshd.log_tail(1_000_000).count("Failed ") == failures_before


async def test_wrong_password_and_wrong_key_are_auth_failed(
    sshd: SshServer,
    users: TestUsers,
    keys: dict[str, Path],
    tmp_path: Path,
    contexts: list[ProbeContext],
) -> None:
    secret = "wrong-but-secret-" + users.password[-6:]
    ctx = make_ctx(
        tmp_path,
        [password_cred(users, "pw-bad", secret), key_cred(users, keys["other"], "key-bad")],
    )
    contexts.append(ctx)
    with pytest.raises(AuthFailed) as every:
        await probe(ctx, sshd, {"command": "true"})
    assert every.value.kind == "auth_failed"
    assert every.value.field == "credential_id"
    assert "pw-bad" in str(every.value)
    assert "key-bad" in str(every.value)
    assert secret not in str(every.value)
    for cid in ("pw-bad", "key-bad"):
        with pytest.raises(AuthFailed, match=cid):
            await probe(ctx, sshd, {"command": "true", "credential_id": cid})


async def test_unusable_private_key_is_a_credential_error(
    sshd: SshServer, users: TestUsers, tmp_path: Path, contexts: list[ProbeContext]
) -> None:
    junk = Credential(
        "junk", "ssh_private_key", {"user": users.key_user, "private_key": "not a key"}
    )
    ctx = make_ctx(tmp_path, [junk])
    contexts.append(ctx)
    with pytest.raises(CredentialError) as info:
        await probe(ctx, sshd, {"command": "true", "credential_id": "junk"})
    assert info.value.field == "credential_id"
    assert "not a key" not in str(info.value)


# --- sudo ---------------------------------------------------------------------------------


async def test_must_sudo_runs_as_root_with_the_password_on_stdin_only(
    sshd: SshServer,
    users: TestUsers,
    tmp_path: Path,
    contexts: list[ProbeContext],
    sudo_ready: None,
) -> None:
    ctx = make_ctx(tmp_path, [password_cred(users)])
    contexts.append(ctx)
    # `cat` reads the command's stdin: /dev/null, never the password written for sudo.
    result = await probe(ctx, sshd, {"command": "id -u; cat; echo e >&2", "must_sudo": True})
    assert result["exit_status"] == 0
    assert result["stdout"] == "0\n"
    assert result["stderr"] == "e\n"  # sudo's own chatter is not part of the output
    assert users.password not in orjson.dumps(result).decode()

    # While a sudo'd command runs, the password is on no command line on the machine.
    job = asyncio.create_task(probe(ctx, sshd, {"command": "sleep 1.0371", "must_sudo": True}))
    deadline = time.monotonic() + 5
    seen = False
    while time.monotonic() < deadline and not seen:
        _, listed = await command("ps", "-eo", "args")
        assert users.password not in listed
        seen = "sleep 1.0371" in listed
        await asyncio.sleep(0.05)
    assert seen
    assert (await job)["exit_status"] == 0


async def test_sudo_with_a_wrong_password_is_auth_failed(
    sshd: SshServer,
    users: TestUsers,
    keys: dict[str, Path],
    tmp_path: Path,
    contexts: list[ProbeContext],
    sudo_ready: None,
) -> None:
    wrong_sudo = Credential(
        "pw-wrong-sudo",
        "ssh_password",
        {"user": users.pass_user, "password": users.password, "sudo_password": "nope-123"},
    )
    ctx = make_ctx(tmp_path, [wrong_sudo, key_cred(users, keys["good"])])
    contexts.append(ctx)
    with pytest.raises(AuthFailed) as info:
        await probe(
            ctx, sshd, {"command": "id -u", "must_sudo": True, "credential_id": "pw-wrong-sudo"}
        )
    assert info.value.field == "must_sudo"
    assert "pw-wrong-sudo" in str(info.value)
    assert "nope-123" not in str(info.value)
    # mbkey may not sudo at all, and has no password to offer: sudo -n says so.
    with pytest.raises(AuthFailed, match="sudo"):
        await probe(ctx, sshd, {"command": "id -u", "must_sudo": True, "credential_id": "key"})


# --- host keys ----------------------------------------------------------------------------


async def test_host_key_change_is_detected(
    sshd: SshServer, users: TestUsers, tmp_path: Path, contexts: list[ProbeContext]
) -> None:
    ctx = make_ctx(tmp_path, [password_cred(users)])
    contexts.append(ctx)
    known_hosts = tmp_path / "known_hosts"

    # strict, nothing recorded: refused, and nothing is written
    with pytest.raises(HostKeyMismatch, match="not known"):
        await probe(ctx, sshd, {"command": "true", "host_key_policy": "strict"})
    assert not known_hosts.exists()

    # accept-new records the first key, then strict trusts it
    await probe(ctx, sshd, {"command": "true"})
    recorded = known_hosts.read_text()
    algorithm, blob = sshd.host_public_key().split()[:2]
    assert recorded == f"[127.0.0.1]:{sshd.port} {algorithm} {blob}\n"
    assert oct(known_hosts.stat().st_mode & 0o777) == "0o600"
    assert (await probe(ctx, sshd, {"command": "true", "host_key_policy": "strict"}))[
        "exit_status"
    ] == 0

    # same port, new host key: a mismatch under both policies, and the record stays
    sshd.restart(new_host_key=True)
    for policy in ("strict", "accept-new"):
        with pytest.raises(HostKeyMismatch) as info:
            await probe(ctx, sshd, {"command": "true", "host_key_policy": policy})
        assert info.value.kind == "host_key_mismatch"
        assert "host key mismatch" in str(info.value)
    assert known_hosts.read_text() == recorded

    # an administrator removes the stale entry: accepted again, without a restart
    known_hosts.write_text("")
    assert (await probe(ctx, sshd, {"command": "true"}))["exit_status"] == 0
    assert known_hosts.read_text().split()[2] == sshd.host_public_key().split()[1]


# --- timeouts -----------------------------------------------------------------------------


async def test_command_that_outlives_its_timeout_is_stopped_on_the_server(
    sshd: SshServer,
    users: TestUsers,
    tmp_path: Path,
    contexts: list[ProbeContext],
    sudo_ready: None,
) -> None:
    ctx = make_ctx(tmp_path, [password_cred(users)])
    contexts.append(ctx)
    cases = [
        ({"command": "sleep 30.0123", "command_timeout": 1}, "sleep 30.0123"),
        # compound: the shell waits on a child that a plain channel signal would orphan
        ({"command": "sleep 31.0456; echo never", "command_timeout": 1}, "sleep 31.0456"),
        ({"command": "sleep 32.0789", "command_timeout": 1, "must_sudo": True}, "sleep 32.0789"),
    ]
    for payload, pattern in cases:
        started = time.monotonic()
        with pytest.raises(ProbeTimeout) as info:
            await probe(ctx, sshd, payload)
        assert "command_timeout" in str(info.value)
        assert time.monotonic() - started < 4.0
        assert await processes_gone(pattern), f"{pattern!r} still runs on the server"
    pool = pool_of(ctx)
    deadline = time.monotonic() + 5
    while pool.active_channels and time.monotonic() < deadline:
        await asyncio.sleep(0.05)
    assert pool.active_channels == 0
    # the connection is still good for the next job
    assert (await probe(ctx, sshd, {"command": "echo ok"}))["stdout"] == "ok\n"
    assert pool.connects == 1


async def test_connect_errors_are_translated(
    sshd: SshServer, users: TestUsers, tmp_path: Path, contexts: list[ProbeContext]
) -> None:
    ctx = make_ctx(tmp_path, [password_cred(users)])
    contexts.append(ctx)
    with pytest.raises(ConnectionRefused):
        await probe(ctx, sshd, {"command": "true", "port": free_port()})
    # a listener that never speaks SSH: the connect_timeout applies
    accepted: list[asyncio.StreamWriter] = []

    async def mute(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        accepted.append(writer)

    silent = await asyncio.start_server(mute, "127.0.0.1", 0)
    try:
        port = silent.sockets[0].getsockname()[1]
        started = time.monotonic()
        with pytest.raises(ProbeTimeout, match="connect_timeout"):
            await probe(ctx, sshd, {"command": "true", "port": port, "connect_timeout": 0.5})
        assert time.monotonic() - started < 3.0
    finally:
        for writer in accepted:
            writer.close()
        silent.close()
        await silent.wait_closed()


# --- the pool -----------------------------------------------------------------------------


async def test_fifty_jobs_share_one_connection_within_the_channel_cap(
    sshd: SshServer,
    users: TestUsers,
    keys: dict[str, Path],
    tmp_path: Path,
    contexts: list[ProbeContext],
) -> None:
    ctx = make_ctx(tmp_path, [key_cred(users, keys["good"])])
    contexts.append(ctx)
    # Each command reports, from the server's clock, when it started and ended.
    command = "date +%s.%N; sleep 0.2; date +%s.%N"
    results = await asyncio.gather(*(probe(ctx, sshd, {"command": command}) for _ in range(50)))
    assert all(r["exit_status"] == 0 for r in results)
    spans = [tuple(float(x) for x in r["stdout"].split()) for r in results]
    events = sorted([(s, 1) for s, _ in spans] + [(e, -1) for _, e in spans])
    running = peak = 0
    for _, step in events:
        running += step
        peak = max(peak, running)
    pool = pool_of(ctx)
    assert 2 <= peak <= 8, f"{peak} commands ran at once on the server"
    assert pool.peak_channels == 8
    assert pool.connects == 1


async def test_broken_connection_is_replaced_and_idle_ones_close(
    sshd: SshServer, users: TestUsers, tmp_path: Path, contexts: list[ProbeContext]
) -> None:
    ctx = make_ctx(tmp_path, [password_cred(users)], idle_timeout=0.5)
    contexts.append(ctx)
    assert (await probe(ctx, sshd, {"command": "echo one"}))["stdout"] == "one\n"
    assert sshd.drop_connections() > 0  # the server side of the pooled connection dies
    assert (await probe(ctx, sshd, {"command": "echo two"}))["stdout"] == "two\n"
    pool = pool_of(ctx)
    assert pool.connects == 2
    # idle: the pool closes the connection, and the server's session process goes away
    deadline = time.monotonic() + 5
    while (len(pool) or sshd.session_pids()) and time.monotonic() < deadline:
        await asyncio.sleep(0.1)
    assert len(pool) == 0
    assert sshd.session_pids() == []


async def test_connection_lost_mid_command_and_connection_cap(
    sshd: SshServer,
    users: TestUsers,
    keys: dict[str, Path],
    tmp_path: Path,
    contexts: list[ProbeContext],
) -> None:
    ctx = make_ctx(
        tmp_path, [password_cred(users), key_cred(users, keys["good"])], max_connections=1
    )
    contexts.append(ctx)
    job = asyncio.create_task(probe(ctx, sshd, {"command": "sleep 5.0369"}))
    deadline = time.monotonic() + 5
    while not await running("sleep 5.0369") and time.monotonic() < deadline:
        await asyncio.sleep(0.05)
    assert await running("sleep 5.0369")
    sshd.drop_connections()
    with pytest.raises(ProtocolError, match="may or may not have completed"):
        await job
    # max_connections 1: the pool keeps only the newest idle connection
    assert (await probe(ctx, sshd, {"command": "echo pw"}))["credential_id"] == "pw"
    assert (await probe(ctx, sshd, {"command": "echo k", "credential_id": "key"}))[
        "stdout"
    ] == "k\n"
    pool = pool_of(ctx)
    assert len(pool) == 1
    assert pool.connects == 3


async def test_pool_closes_everything(sshd: SshServer, users: TestUsers, tmp_path: Path) -> None:
    ctx = make_ctx(tmp_path, [password_cred(users)])
    await probe(ctx, sshd, {"command": "true"})
    pool = pool_of(ctx)
    assert len(pool) == 1
    await pool.aclose()
    assert len(pool) == 0
    deadline = time.monotonic() + 5
    while sshd.session_pids() and time.monotonic() < deadline:
        await asyncio.sleep(0.05)
    assert sshd.session_pids() == []


# --- bad input ----------------------------------------------------------------------------


def record(payload: dict[str, Any] | None = None, **fields: Any) -> OutputRecord:
    return OutputRecord(sys_id="b", topic=TOPIC, payload=payload or {}, **fields)


@pytest.mark.parametrize(
    ("rec", "field"),
    [
        (record(source="10.0.0.1"), "command"),
        (record({"command": "  "}, source="10.0.0.1"), "command"),
        (record(name="uname -a"), "host"),
        (record({"port": 0}, source="h", name="x"), "port"),
        (record({"port": 70000}, source="h", name="x"), "port"),
        (record({"port": "ssh"}, source="h", name="x"), "port"),
        (record({"host": "bad host!"}, name="x"), "host"),
        (record({"must_sudo": "perhaps"}, source="h", name="x"), "must_sudo"),
        (record({"command_timeout": 0}, source="h", name="x"), "command_timeout"),
        (record({"host_key_policy": "yolo"}, source="h", name="x"), "host_key_policy"),
        (record({"password": "x"}, source="h", name="x"), "password"),  # unknown parameter
    ],
)
def test_bad_parameters_name_their_field(rec: OutputRecord, field: str) -> None:
    with pytest.raises(BadParameter) as info:
        build_params(rec, probe_settings(SPEC))
    assert info.value.field == field


def test_parameters_defaults_and_xml_strings() -> None:
    params = build_params(
        record({"port": "2222", "must_sudo": "true", "credential_id": ""}, source=" [::1] ",
               name="uname -a"),
        probe_settings(SPEC, {"command_timeout": 5, "host_key_policy": "strict"}),
    )  # fmt: skip
    assert (params.host, params.port, params.command) == ("::1", 2222, "uname -a")
    assert params.must_sudo is True
    assert params.credential_id is None  # XML's empty value counts as absent
    assert (params.command_timeout, params.host_key_policy) == (5.0, "strict")
    assert params.connect_timeout == 10.0
    assert SPEC.target_host(params) == "::1"
    assert SPEC.needs_credentials
    assert REGISTRY[TOPIC] is SPEC
    with pytest.raises(ConfigError) as info:
        probe_settings(SPEC, {"max_channels": 0})
    assert info.value.field == f"probes.settings.{TOPIC}.max_channels"


def test_the_password_never_enters_the_exec_request() -> None:
    line = remote_command("id -u; echo 'quoted'", "password", "midbridge-00")
    assert line.startswith("exec sudo -S -k -p '' -- sh -c ")
    assert "'id -u; echo '\"'\"'quoted'\"'\"''" in line


async def test_unknown_credential_id_is_refused(
    sshd: SshServer, users: TestUsers, tmp_path: Path, contexts: list[ProbeContext]
) -> None:
    ctx = make_ctx(tmp_path, [password_cred(users)])
    contexts.append(ctx)
    with pytest.raises(CredentialError) as info:
        await probe(ctx, sshd, {"command": "true", "credential_id": "nobody"})
    assert info.value.field == "credential_id"
    assert info.value.kind == "credential_error"
    no_resolver = ProbeContext(
        agent="a", rate=RateLimiter(0), per_host_limit=1, settings=probe_settings(SPEC)
    )
    with pytest.raises(BridgeError) as again:
        await probe(no_resolver, sshd, {"command": "true"})
    assert again.value.field == "credential_id"


# --- through the bridge and the broker ----------------------------------------------------


async def test_ssh_end_to_end_keeps_secrets_off_the_wire(
    broker: BrokerAddress,
    unique_agent: str,
    tmp_path: Path,
    sshd: SshServer,
    users: TestUsers,
    caplog: pytest.LogCaptureFixture,
    sudo_ready: None,
) -> None:
    caplog.set_level(logging.DEBUG)
    wrong = "wrong-" + users.password[::-1]
    credentials = tmp_path / "credentials.toml"
    credentials.write_text(
        f"""
[[credential]]
id = "linux-wrong"
type = "ssh_password"
order = 10
user = "{users.pass_user}"
password = "{wrong}"

[[credential]]
id = "linux"
type = "ssh_password"
order = 20
user = "{users.pass_user}"
password = "{users.password}"
""",
        encoding="utf-8",
    )
    credentials.chmod(0o600)
    state_dir = tmp_path / "state"
    config = make_config(broker.host, broker.port, unique_agent, state_dir)
    config.bridge.credentials_file = credentials
    config.probes.settings = {TOPIC: {"known_hosts": str(state_dir / "ssh_known_hosts")}}
    agent = f"mid.server.{unique_agent}"
    port = {"port": sshd.port}
    jobs = [
        output_record(TOPIC, agent=agent, source=sshd.host, name="id -un; exit 7", payload=port),
        output_record(TOPIC, agent=agent, source=sshd.host, name="id -u; cat",
                      payload={**port, "must_sudo": True}),
        output_record(TOPIC, agent=agent, source=sshd.host, name="true",
                      payload={**port, "credential_id": "linux-wrong"}),
        output_record(TOPIC, agent=agent, source=sshd.host, name="sleep 33.0147",
                      payload={**port, "command_timeout": 0.5}),
        output_record(TOPIC, agent=agent, source=sshd.host, payload=port),  # no command
        # the job's own deadline (the runner's) ends the probe first: still stopped
        output_record(TOPIC, agent=agent, source=sshd.host, name="sleep 34.0258",
                      payload=port, timeout=1),
    ]  # fmt: skip
    async with bridge_and_client(config) as (bridge, client):
        await client.send(jobs)
        results = await client.wait([job["sys_id"] for job in jobs], timeout=30)
        pool = bridge.probes.context(TOPIC).resource
    assert isinstance(pool, SSHPool)
    assert pool.closed  # the bridge closed the pool at shutdown
    assert len(pool) == 0
    plain, sudo, wrong_cred, slow, no_command, deadline = (r.final for r in results)

    assert plain["error_string"] == ""
    assert plain["complete"] is True
    assert plain["payload"]["stdout"] == f"{users.pass_user}\n"
    assert plain["payload"]["exit_status"] == 7
    assert plain["payload"]["credential_id"] == "linux"  # after linux-wrong was refused

    assert sudo["error_string"] == ""
    assert sudo["payload"]["stdout"] == "0\n"

    assert wrong_cred["payload"]["error"]["kind"] == "auth_failed"
    assert "linux-wrong" in wrong_cred["error_string"]

    assert slow["payload"]["error"]["kind"] == "timeout"
    assert await processes_gone("sleep 33.0147")

    assert deadline["payload"]["error"]["kind"] == "timeout"
    assert "within 1 s" in deadline["error_string"]
    assert await processes_gone("sleep 34.0258")

    assert no_command["payload"]["error"]["field"] == "command"
    assert no_command["payload"]["error"]["kind"] == "bad_parameter"

    wire = orjson.dumps([r.records for r in results]).decode()
    stored = b"".join(p.read_bytes() for p in state_dir.rglob("*") if p.is_file())
    for secret in (users.password, wrong):
        assert secret not in wire
        assert secret not in caplog.text
        assert secret.encode() not in stored
    assert (state_dir / "ssh_known_hosts").read_text().startswith(f"[127.0.0.1]:{sshd.port} ")
