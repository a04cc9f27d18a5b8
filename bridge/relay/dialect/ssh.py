"""SSHCommand: ServiceNow's parameters in, ``<result command=".."><stdout/><stderr/>`` out.

ServiceNow: "SSHCommand parameters" and "SSHCommand probe" (docs/relay.md cites them).
The command is the record's ``name`` (or a ``name``/``command`` parameter), the target
its ``source``. Mapped: ``port``; ``must_sudo``; ``command_timeout_ms`` (milliseconds) →
``command_timeout`` (seconds); ``timeout`` (the legacy client's socket connect timeout,
milliseconds) → ``connect_timeout``. Accepted and dropped: ``channel_timeout_ms`` (the
bridge has no inactivity timer: ``command_timeout`` bounds the whole command),
``use_snc_ssh``, ``debug``, ``debug_ssh``, ``path_override``, ``set_path``,
``rm_override``, ``keyboard_interactive``, ``run_in_terminal``,
``preserve_sudo_environment``, ``allow_unsupported_shells``, ``credentials_debug``,
``credential_id`` (ServiceNow's credentials are not the bridge's: it tries its own).
"""

from __future__ import annotations

from typing import Any

from bridge.relay.dialect.base import Dialect, Mapped, ParamReader
from bridge.relay.envelope import Element, child, element


class SSHCommand(Dialect):
    topic = "SSHCommand"

    def map(self, reader: ParamReader) -> Mapped:
        command = reader.text("command", "name") or reader.row.get("name", "")
        host = reader.text("host", "source") or reader.row.get("source", "")
        params: dict[str, Any] = {"host": host, "command": command}
        port = reader.integer("port")
        if port is not None:
            params["port"] = port
        sudo = reader.boolean("must_sudo")
        if sudo is not None:
            params["must_sudo"] = sudo
        command_timeout = reader.seconds_from_ms("command_timeout_ms")
        if command_timeout is not None:
            params["command_timeout"] = command_timeout
        connect_timeout = reader.seconds_from_ms("timeout")
        if connect_timeout is not None:
            params["connect_timeout"] = connect_timeout
        return Mapped(params, {"command": command})

    def result(self, payload: dict[str, Any], extra: dict[str, Any]) -> Element:
        result = element("result", {"command": payload.get("command", extra.get("command"))})
        child(result, "stdout", text=payload.get("stdout") or None)
        child(result, "stderr", text=payload.get("stderr") or None)
        return result
