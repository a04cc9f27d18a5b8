"""A throwaway OpenSSH server for tests: ``/usr/sbin/sshd`` as a child process.

- :func:`ensure_users` (root only) makes two local accounts once, idempotently: ``mbkey``
  (public-key login) and ``mbpass`` (password login, may ``sudo`` with its password when
  sudo is installed: :func:`check_sudo`). The password is new on every call
  (``chpasswd``). :func:`remove_users` undoes what :func:`ensure_users` created, and only
  that.
- :class:`SshServer` runs sshd on a free 127.0.0.1 port with its own config, host key,
  pid file and authorized keys in a work directory, logging to ``sshd.log`` there.
  ``restart(new_host_key=True)`` keeps the port and changes the host key; ``stop`` ends
  the listener and every per-connection child it forked (by pid, never by name);
  ``close`` also removes the authorized-keys directory (outside ``workdir``: sshd reads
  it as the user, who cannot enter pytest's private tmp directories).
"""

from __future__ import annotations

import contextlib
import os
import secrets
import shutil
import socket
import subprocess
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import psutil

SSHD = "/usr/sbin/sshd"
KEY_USER = "mbkey"
PASS_USER = "mbpass"
SUDOERS_FILE = Path("/etc/sudoers.d/midbridge-tests")


class SshdUnavailable(RuntimeError):
    """What the tests need is missing; the message says how to get it."""


@dataclass(frozen=True)
class TestUsers:
    key_user: str
    pass_user: str
    password: str  # mbpass's login and sudo password, new every session
    created: tuple[str, ...]  # accounts this call created (for remove_users)
    created_sudoers: bool

    __test__ = False  # not a pytest test class


def _run(args: list[str], *, input_text: str | None = None) -> None:
    result = subprocess.run(args, input=input_text, capture_output=True, text=True, check=False)
    if result.returncode != 0:
        # never echo input_text: it may hold a password
        raise SshdUnavailable(f"{args[0]} failed ({result.returncode}): {result.stderr.strip()}")


def check_environment() -> None:
    """Fail clearly unless root, sshd and the account tools are available."""
    if os.geteuid() != 0:
        raise SshdUnavailable(
            "the SSH tests need root (they create local users mbkey/mbpass and run sshd); "
            "CI runs as root"
        )
    if not os.access(SSHD, os.X_OK):
        raise SshdUnavailable(f"{SSHD} not found: apt-get install openssh-server")
    for tool in ("ssh-keygen", "useradd", "userdel", "usermod", "chpasswd"):
        if shutil.which(tool) is None:
            raise SshdUnavailable(f"{tool} not found: apt-get install openssh-server passwd")


def check_sudo(users: TestUsers) -> None:
    """Fail clearly unless sudo is installed and ``mbpass`` may use it."""
    if shutil.which("sudo") is None or shutil.which("visudo") is None:
        raise SshdUnavailable("sudo not found: apt-get install sudo (scripts/test PACKAGES)")
    if not SUDOERS_FILE.exists():
        raise SshdUnavailable(f"{SUDOERS_FILE} is missing: sudo was installed after the users")


def _user_exists(name: str) -> bool:
    import pwd

    try:
        pwd.getpwnam(name)
    except KeyError:
        return False
    return True


def ensure_users() -> TestUsers:
    """Create (if missing) the two test accounts; set a fresh password on ``mbpass``."""
    check_environment()
    created: list[str] = []
    for name in (KEY_USER, PASS_USER):
        if not _user_exists(name):
            _run(["useradd", "--create-home", "--shell", "/bin/bash", name])
            created.append(name)
    # '*' is "no password" without being "locked": with UsePAM no, sshd refuses locked
    # accounts ('!') even for a public key.
    _run(["usermod", "-p", "*", KEY_USER])
    password = "pw-" + secrets.token_urlsafe(18)
    _run(["chpasswd"], input_text=f"{PASS_USER}:{password}\n")
    created_sudoers = False
    if shutil.which("visudo") is not None and not SUDOERS_FILE.exists():
        tmp = SUDOERS_FILE.with_name(".midbridge-tests.tmp")
        tmp.write_text(f"{PASS_USER} ALL=(ALL:ALL) ALL\n", encoding="utf-8")
        os.chmod(tmp, 0o440)
        _run(["visudo", "-c", "-q", "-f", str(tmp)])
        tmp.replace(SUDOERS_FILE)
        created_sudoers = True
    return TestUsers(KEY_USER, PASS_USER, password, tuple(created), created_sudoers)


def remove_users(users: TestUsers) -> None:
    """Undo what ``ensure_users`` created (accounts it found are left as they were)."""
    if users.created_sudoers:
        SUDOERS_FILE.unlink(missing_ok=True)
    for name in users.created:
        subprocess.run(["userdel", "--remove", name], capture_output=True, check=False)


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
    return port


def generate_key(path: Path, comment: str = "midbridge-test") -> Path:
    """An ed25519 key pair at ``path`` / ``path.pub`` (no passphrase)."""
    path.unlink(missing_ok=True)
    path.with_name(path.name + ".pub").unlink(missing_ok=True)
    _run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-C", comment, "-f", str(path)])
    return path


class SshServer:
    """sshd on 127.0.0.1:<free port> with a config of its own in ``workdir``."""

    def __init__(
        self,
        workdir: Path,
        *,
        authorized_keys: dict[str, list[Path]] | None = None,
        extra_config: list[str] | None = None,
    ) -> None:
        check_environment()
        self.workdir = workdir
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.host = "127.0.0.1"
        self.port = free_port()
        self.extra_config = extra_config or []
        self.proc: subprocess.Popen[bytes] | None = None
        self.host_key = self.workdir / "host_ed25519"
        # sshd reads authorized keys as the user: they live outside pytest's 0700 tmp dirs.
        self.keys_dir = Path(tempfile.mkdtemp(prefix="midbridge-sshd-keys-"))
        self.keys_dir.chmod(0o755)
        for user, pubs in (authorized_keys or {}).items():
            self.authorize(user, pubs)
        self.log_path = self.workdir / "sshd.log"
        generate_key(self.host_key, "midbridge-test-host")

    def authorize(self, user: str, public_keys: list[Path]) -> None:
        text = "".join(p.read_text(encoding="utf-8") for p in public_keys)
        path = self.keys_dir / user
        path.write_text(text, encoding="utf-8")
        path.chmod(0o644)  # public keys: sshd reads them as the user

    def host_public_key(self) -> str:
        return self.host_key.with_name(self.host_key.name + ".pub").read_text().strip()

    def _write_config(self) -> Path:
        lines = [
            f"Port {self.port}",
            f"ListenAddress {self.host}",
            f"HostKey {self.host_key}",
            f"PidFile {self.workdir / 'sshd.pid'}",
            "UsePAM no",
            "StrictModes no",
            f"AuthorizedKeysFile {self.keys_dir}/%u",
            "PasswordAuthentication yes",
            "KbdInteractiveAuthentication no",
            "PubkeyAuthentication yes",
            "PermitRootLogin no",
            f"AllowUsers {KEY_USER} {PASS_USER}",
            "PrintMotd no",
            "PrintLastLog no",
            "LogLevel VERBOSE",
            *self.extra_config,
        ]
        config = self.workdir / "sshd_config"
        config.write_text("\n".join(lines) + "\n", encoding="utf-8")
        return config

    def start(self, timeout: float = 10.0) -> SshServer:
        # sshd refuses to start without its privilege-separation directory.
        Path("/run/sshd").mkdir(mode=0o755, exist_ok=True)
        config = self._write_config()
        check = subprocess.run([SSHD, "-t", "-f", str(config)], capture_output=True, text=True)
        if check.returncode != 0:
            raise SshdUnavailable(f"sshd -t rejects the test config: {check.stderr.strip()}")
        with self.log_path.open("ab") as log:
            self.proc = subprocess.Popen(
                [SSHD, "-D", "-e", "-f", str(config)], stdout=log, stderr=log
            )
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise SshdUnavailable(f"sshd exited {self.proc.returncode}:\n{self.log_tail()}")
            try:
                with socket.create_connection((self.host, self.port), timeout=1.0) as sock:
                    if sock.recv(64).startswith(b"SSH-"):
                        return self
            except OSError:
                time.sleep(0.05)
        self.stop()
        raise SshdUnavailable(f"sshd did not answer within {timeout} s:\n{self.log_tail()}")

    def log_tail(self, chars: int = 3000) -> str:
        if not self.log_path.exists():
            return ""
        return self.log_path.read_text(errors="replace")[-chars:]

    def session_pids(self) -> list[int]:
        """Per-connection sshd processes (children of the listener)."""
        if self.proc is None or self.proc.poll() is not None:
            return []
        try:
            return [p.pid for p in psutil.Process(self.proc.pid).children(recursive=False)]
        except psutil.NoSuchProcess:
            return []

    def drop_connections(self) -> int:
        """Kill every per-connection sshd (and what runs under it); the listener stays."""
        killed = 0
        for pid in self.session_pids():
            killed += _kill_tree(pid)
        return killed

    def stop(self) -> None:
        if self.proc is None:
            return
        if self.proc.poll() is None:
            for pid in self.session_pids():
                _kill_tree(pid)
            self.proc.terminate()
            try:
                self.proc.wait(timeout=5)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(timeout=5)
        self.proc = None

    def restart(self, *, new_host_key: bool = False) -> SshServer:
        self.stop()
        if new_host_key:
            generate_key(self.host_key, "midbridge-test-host-2")
        return self.start()

    def __enter__(self) -> SshServer:
        return self.start()

    def close(self) -> None:
        """Stop sshd and remove the authorized-keys directory."""
        self.stop()
        shutil.rmtree(self.keys_dir, ignore_errors=True)

    def __exit__(self, *exc: object) -> None:
        self.close()


def _kill_tree(pid: int) -> int:
    try:
        root = psutil.Process(pid)
        procs = [*root.children(recursive=True), root]
    except psutil.NoSuchProcess:
        return 0
    for proc in procs:
        with contextlib.suppress(psutil.NoSuchProcess):
            proc.kill()
    # Not our children (the listener reaps them): gone or a zombie is enough.
    deadline = time.monotonic() + 5
    while time.monotonic() < deadline and any(_alive(p) for p in procs):
        time.sleep(0.01)
    return len(procs)


def _alive(proc: psutil.Process) -> bool:
    try:
        return bool(proc.status() != psutil.STATUS_ZOMBIE)
    except psutil.NoSuchProcess:
        return False
