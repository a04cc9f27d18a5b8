"""SSHCommand: a shell command over SSH (``probe``), its parameters and settings
(``params``), and the connection pool with the bridge's known-hosts file (``pool``)."""

from probes.ssh.params import TOPIC, SSHCommandParams, SSHSettings, build_params
from probes.ssh.pool import KnownHostsStore, SSHPool, open_pool
from probes.ssh.probe import SPEC, remote_command, run_command

__all__ = [
    "SPEC",
    "TOPIC",
    "KnownHostsStore",
    "SSHCommandParams",
    "SSHPool",
    "SSHSettings",
    "build_params",
    "open_pool",
    "remote_command",
    "run_command",
]
