"""HeartbeatProbe and SystemCommand in ServiceNow's form.

**HeartbeatProbe** ("MID Server Monitor" sends one to every MID; a MID that answers stays
Up, KB0750372) goes to the bridge, so that only a running bridge answers it; its
parameters are accepted and dropped (the bridge's heartbeat takes none). The answer:
``<result><heartbeat status name agent host version validated/><stats>..</stats></result>``.

**SystemCommand** carries its command in the record's ``source`` (``MIDServerManage``:
``probe.setSource(cmd)``), or its ``name``, or a ``command`` parameter. The relay answers
these itself, being the MID the instance talks to: ``queue.stats`` (the relay's and the
bridge's statistics), ``config.file`` (the MID's configuration as ``config.xml``
parameters, never a password), ``pauseMid``/``pause`` and ``resumeMid``/``resume`` (the
relay stops / starts taking work other than these commands and heartbeats; the
``ecc_agent`` status becomes Paused / Up). Any other command (``restart``, ``grabLog``,
``threaddump``...) is answered with an ``unsupported`` error.
"""

from __future__ import annotations

from typing import Any, Protocol

from bridge.relay.dialect.base import Dialect, Mapped, ParamReader
from bridge.relay.envelope import Element, add_value, child, element
from bridge.wire.errors import Refused

COMMANDS = {
    "queue.stats": "stats",
    "config.file": "config",
    "pausemid": "pause",
    "pause": "pause",
    "resumemid": "resume",
    "resume": "resume",
}


class Heartbeat(Dialect):
    topic = "HeartbeatProbe"

    def map(self, reader: ParamReader) -> Mapped:
        return Mapped({})

    def result(self, payload: dict[str, Any], extra: dict[str, Any]) -> Element:
        given = payload.get("status")
        status: dict[str, Any] = given if isinstance(given, dict) else {}
        result = element("result")
        child(result, "heartbeat", {
            key: status.get(key)
            for key in ("status", "name", "agent", "host", "version", "validated")
        })  # fmt: skip
        add_value(result, "stats", payload.get("stats") or {})
        return result


class Controls(Protocol):
    """What a SystemCommand may ask of the relay."""

    def stats(self) -> dict[str, Any]: ...

    def config(self) -> list[tuple[str, str]]: ...

    def mid_status(self) -> str: ...

    async def pause(self) -> None: ...

    async def resume(self) -> None: ...


def command_of(reader: ParamReader) -> str:
    return (
        reader.row.get("source", "").strip()
        or reader.row.get("name", "").strip()
        or reader.text("command", "name")
        or ""
    )


async def run_system_command(command: str, controls: Controls) -> dict[str, Any]:
    """Do ``command``; the answer's payload (``Refused`` for a command not supported)."""
    verb = COMMANDS.get(command.lower())
    if verb is None:
        raise Refused(
            f"SystemCommand {command[:80]!r} is not supported by the midbridge relay "
            f"(supported: {', '.join(sorted(set(COMMANDS)))})",
            field="source",
        )
    if verb == "pause":
        await controls.pause()
    elif verb == "resume":
        await controls.resume()
    payload: dict[str, Any] = {"command": command, "status": controls.mid_status()}
    if verb == "stats":
        payload["stats"] = controls.stats()
    elif verb == "config":
        payload["config"] = [list(pair) for pair in controls.config()]
    return payload


class SystemCommand(Dialect):
    topic = "SystemCommand"

    def map(self, reader: ParamReader) -> Mapped:
        command = command_of(reader)
        return Mapped({"command": command}, {"command": command})

    def result(self, payload: dict[str, Any], extra: dict[str, Any]) -> Element:
        result = element("result", {"command": payload.get("command"),
                                    "status": payload.get("status")})  # fmt: skip
        if "stats" in payload:
            add_value(result, "stats", payload["stats"])
        if "config" in payload:
            config = child(result, "config")
            for name, value in payload["config"]:
                child(config, "parameter", {"name": name, "value": value})
        return result
