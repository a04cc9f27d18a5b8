"""The demo's Linux hosts over SSH: an asyncssh server with a password user and the canned shell."""

from __future__ import annotations

import hmac
import secrets
from collections.abc import Awaitable, Callable

import asyncssh

from bridge.demo.targets.network import LinuxHost
from bridge.demo.targets.shell import CannedShell


class _SshServer(asyncssh.SSHServer):
    def __init__(self, user: str, password: str) -> None:
        self._user = user
        self._password = password.encode()

    def begin_auth(self, username: str) -> bool:
        return True  # every login needs a password

    def password_auth_supported(self) -> bool:
        return True

    def validate_password(self, username: str, password: str) -> bool:
        ok = hmac.compare_digest(password.encode(), self._password)
        return ok and username == self._user


def _ssh_session(
    host: LinuxHost, user: str
) -> Callable[[asyncssh.SSHServerProcess[str]], Awaitable[None]]:
    async def session(process: asyncssh.SSHServerProcess[str]) -> None:
        shell = CannedShell(host, user)
        try:
            if process.command is not None:
                out, err, status = shell.run(process.command)
                process.stdout.write(out)
                process.stderr.write(err)
                process.exit(status)
                return
            short = host.hostname.split(".")[0]
            process.stdout.write(
                f"{host.hostname}: a canned shell of the midbridge demo ('exit' leaves)\n"
            )
            status = 0
            while True:
                process.stdout.write(f"{user}@{short}:~$ ")
                line = await process.stdin.readline()
                if not line or line.strip() in ("exit", "logout"):
                    break
                out, err, status = shell.run(line.rstrip("\r\n"))
                process.stdout.write(out)  # asyncssh's line editor adds the \r on a PTY
                process.stderr.write(err)
            process.exit(status)
        except (asyncssh.BreakReceived, asyncssh.TerminalSizeChanged, ConnectionError):
            process.exit(1)

    return session


async def start_ssh(
    host: LinuxHost, address: str, port: int, *, user: str, password: str
) -> Callable[[], Awaitable[None]]:
    key = asyncssh.generate_private_key("ssh-ed25519")
    login = password if host.accepts_demo_password else secrets.token_urlsafe(24)
    server = await asyncssh.create_server(
        lambda: _SshServer(user, login),
        address,
        port,
        server_host_keys=[key],
        process_factory=_ssh_session(host, user),
        reuse_address=True,
    )

    async def stop() -> None:
        server.close()
        await server.wait_closed()

    return stop
