"""``midbridge bench ssh``: ``echo hi`` over SSH on several hosts, through the bridge vs asyncssh.

Workload: :data:`COMMANDS` runs of ``echo hi`` spread round-robin over :data:`HOSTS` loopback
addresses (127.0.22.1-4), all served by one OpenSSH ``sshd`` (one port, one
``ListenAddress`` per address, default ``MaxSessions`` 10), logging in as the local user
``mbbench`` with an ed25519 key made for the run. Needs root (it makes the user if missing,
and removes it afterwards if it made it), like the SSH tests.

- peer: a bare asyncssh loop (``python -m bridge.bench.ssh peer ...``, a child process on uvloop):
  one connection per host, made before the clock starts and kept, :data:`CHANNELS` worker
  tasks per host each running ``conn.run("echo hi")`` in turn (so at most 8 sessions per
  connection), a refused session open (OpenSSH frees a session a moment after the client
  saw it closed) retried after a short pause, as the probe does.
- ours: :data:`COMMANDS` SSHCommand jobs (``command: "echo hi"``, an ``ssh_private_key``
  credential naming the key file) published :data:`BATCH` to an MQTT message, timed from
  the first publish to the last complete answer. The bridge keeps one connection per
  host with at most ``max_channels`` 8 sessions on it, and runs at most ``per_host`` 8
  jobs per host: the same concurrency as the peer.
"""

from __future__ import annotations

import asyncio
import contextlib
import shutil
import sys
import tempfile
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import orjson

from bridge.agent.config import LimitsConfig
from bridge.bench.common import (
    BRIDGE_COMMAND,
    Result,
    bench_broker,
    broker_facts,
    first_line,
    log_problems,
    random_tag,
    tool_versions,
)
from bridge.bench.peers import pass_result, run_peer, timed
from bridge.bench.rounds import bench_config, cpu_table, jobs_beside_peer
from bridge.bench.targets import SSHD, ssh_hosts
from bridge.wire.client import JobResult, output_record

HOSTS = 4
COMMANDS = 2_000
CHANNELS = 8  # sessions at a time on one connection (the probe's max_channels default)
BATCH = 100
COMMAND = "echo hi"
EXPECTED = "hi\n"
CREDENTIAL_ID = "bench-key"
PER_HOST = 8  # the default
OPEN_RETRY_DELAYS = (0.01, 0.02, 0.05, 0.1, 0.2, 0.4)  # the probe's, after a refused open


def addresses() -> list[str]:
    return [f"127.0.22.{i}" for i in range(1, HOSTS + 1)]


def credentials_text(user: str, key_file: Path) -> str:
    return (
        "[[credential]]\n"
        f'id = "{CREDENTIAL_ID}"\n'
        'type = "ssh_private_key"\n'
        f'user = "{user}"\n'
        f'private_key_file = "{key_file}"\n'
    )


# --- the peer: a bare asyncssh loop (child process) --------------------------------------------


async def _peer_setup(
    stack: contextlib.AsyncExitStack,
    hosts: list[tuple[str, int]],
    user: str,
    key_file: str,
    commands: int,
) -> Callable[[], Awaitable[dict[str, Any]]]:
    import asyncssh

    key = asyncssh.read_private_key(key_file)
    conns = [
        await stack.enter_async_context(
            await asyncssh.connect(
                host,
                port,
                username=user,
                client_keys=[key],
                known_hosts=None,
                config=None,
                agent_path=None,
            )
        )
        for host, port in hosts
    ]
    per_host = commands // len(conns)

    async def one_pass() -> dict[str, Any]:
        ok = failed = retries = 0
        example: list[str] = []

        async def worker(conn: Any, runs: int) -> None:
            nonlocal ok, failed, retries
            for _ in range(runs):
                for delay in (*OPEN_RETRY_DELAYS, None):
                    try:
                        done = await conn.run(COMMAND, check=False)
                    except asyncssh.ChannelOpenError:
                        if delay is None:
                            failed += 1
                            break
                        retries += 1
                        await asyncio.sleep(delay)
                        continue
                    if done.exit_status == 0 and done.stdout == EXPECTED:
                        ok += 1
                    else:
                        failed += 1
                        example[:] = [f"exit {done.exit_status}: {str(done.stderr)[:200]}"]
                    break

        tasks = []
        for conn in conns:
            for channel in range(CHANNELS):
                runs = per_host // CHANNELS + (1 if channel < per_host % CHANNELS else 0)
                tasks.append(worker(conn, runs))
        seconds, cpu = await timed(asyncio.gather(*tasks))
        return pass_result(
            ok, seconds, failed, open_retries=retries, failures=example, own_cpu_s=round(cpu, 3)
        )

    return one_pass


def peer_main(argv: list[str]) -> int:
    hosts = [(str(h), int(p)) for h, p in orjson.loads(argv[0])]
    user, key_file, commands = argv[1], argv[2], int(argv[3])
    return run_peer(lambda stack: _peer_setup(stack, hosts, user, key_file, commands))


def peer_command(hosts: list[tuple[str, int]], user: str, key_file: Path) -> list[str]:
    spec = orjson.dumps([[h, p] for h, p in hosts]).decode()
    return [
        sys.executable,
        "-m",
        "bridge.bench.ssh",
        "peer",
        spec,
        user,
        str(key_file),
        str(COMMANDS),
    ]


# --- ours -------------------------------------------------------------------------------------


def ssh_jobs(agent_id: str, hosts: list[tuple[str, int]], commands: int) -> list[dict[str, Any]]:
    return [
        output_record(
            "SSHCommand",
            agent=agent_id,
            source=hosts[i % len(hosts)][0],
            payload={
                "port": hosts[i % len(hosts)][1],
                "command": COMMAND,
                "credential_id": CREDENTIAL_ID,
            },
        )
        for i in range(commands)
    ]


def check_commands(results: list[JobResult]) -> tuple[int, list[str]]:
    ok = 0
    bad: list[str] = []
    for result in results:
        payload = result.final.get("payload") or {}
        if result.error_string:
            bad.append(result.error_string)
        elif payload.get("exit_status") == 0 and payload.get("stdout") == EXPECTED:
            ok += 1
        else:
            bad.append(f"unexpected answer: {orjson.dumps(payload)[:200]!r}")
    return ok, bad


# --- the benchmark ------------------------------------------------------------------------------


async def run(broker: tuple[str, int] | None, rounds: int) -> Result:
    agent = f"bench-ssh-{random_tag()}"
    result = Result(
        name="ssh",
        unit="commands/s",
        goal=0.8,
        peer=f"bare asyncssh loop: one connection per host, {CHANNELS} channels per "
        "connection (child process, uvloop)",
        ours=f"SSHCommand jobs through the bridge (child process), {BATCH} records a message, "
        f"per_host {PER_HOST}, max_channels {CHANNELS}",
        peer_command=[],
        ours_command=BRIDGE_COMMAND,
        workload=f"{COMMANDS:,} × {COMMAND!r} round-robin over {HOSTS} sshd addresses, "
        f"public-key login, {CHANNELS} at a time per host",
    )
    result.machine.update(tool_versions("asyncssh"))
    result.machine["sshd"] = first_line([SSHD, "-V"]) if shutil.which(SSHD) else None
    with tempfile.TemporaryDirectory(prefix="midbridge-bench-") as tmp:
        workdir = Path(tmp)
        log_path = workdir / "bridge.log"
        async with contextlib.AsyncExitStack() as stack:
            targets = await stack.enter_async_context(ssh_hosts(workdir / "sshd", addresses()))
            hosts = targets.hosts
            endpoint = await stack.enter_async_context(bench_broker(broker))
            result.broker = broker_facts(endpoint)
            config = bench_config(
                endpoint,
                agent,
                workdir,
                credentials=credentials_text(targets.user, targets.key_file),
                limits=LimitsConfig(drain_timeout=2.0, per_host=PER_HOST),
            )
            command = peer_command(hosts, targets.user, targets.key_file)
            result.peer_command = command
            await jobs_beside_peer(
                stack,
                result,
                rounds,
                peer_command=command,
                config=config,
                log_path=log_path,
                target_pids=targets.pids,
                jobs=lambda agent_id: ssh_jobs(agent_id, hosts, COMMANDS),
                batch=BATCH,
                check=check_commands,
            )
        result.warnings += [f"bridge log: {line}" for line in log_problems(log_path)]
    result.details["bridge_config"] = {
        "limits": config.limits.model_dump(mode="json"),
        "security.require_validation": False,
        "credentials_file": "one ssh_private_key credential (key file, chmod 600)",
        "probes.settings.SSHCommand": "defaults (max_channels 8, known_hosts in state_dir, "
        "accept-new)",
    }
    result.details["commands"] = COMMANDS
    result.details["hosts"] = HOSTS
    result.details["channels_per_host"] = CHANNELS
    result.details["choices"] = [
        "one sshd process listening on every address (it forks a process per connection and "
        "per session, as with one sshd per address)",
        "both sides are child processes started before the rounds; the peer connects before "
        "its first pass, the bridge during the warm-up; one untimed warm-up pass per side",
        "rounds alternate the order (peer first in odd rounds, ours first in even)",
        "peer: time from its first command to its last exit, measured in the child; ours: "
        "from the first publish to the last complete input record, in the bench",
        "cpu_s: /proc/PID/stat of the measured process over the pass; target_cpu_s: sshd "
        "and everything under it (per-connection processes, the shells, reaped children)",
    ]
    result.tables.append(cpu_table(result, "sshd + shells"))
    return result


if __name__ == "__main__" and sys.argv[1:2] == ["peer"]:
    sys.exit(peer_main(sys.argv[2:]))
