"""SystemCommand: pause, resume, drain, cancel, stats, validate, invalidate.

The command is the record's ``name`` (or the ``command`` parameter). These run on the
control lane and never wait behind other work.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Any, Literal

from pydantic import Field, model_validator

from bridge.wire.errors import BadParameter, Refused
from bridge.wire.records import OutputRecord
from probes.contract import Job, NoSettings, ProbeContext, ProbeParams, ProbeSpec, parse_params

TOPIC = "SystemCommand"
Command = Literal["pause", "resume", "drain", "cancel", "stats", "validate", "invalidate"]


class SystemCommandParams(ProbeParams):
    command: Command
    sys_id: str | None = Field(None, min_length=1, max_length=64)  # the job to cancel
    fingerprint: str | None = Field(None, pattern=r"^[0-9a-f]{64}$")  # the key to validate

    @model_validator(mode="after")
    def _arguments(self) -> SystemCommandParams:
        if self.command == "cancel" and not self.sys_id:
            raise ValueError("cancel needs sys_id: the job to cancel")
        if self.command == "validate" and not self.fingerprint:
            raise ValueError("validate needs fingerprint: the key's SHA-256, 64 hex digits")
        return self


def build_params(record: OutputRecord, settings: NoSettings) -> SystemCommandParams:
    data = dict(record.payload)
    if "command" not in data and record.name:
        data["command"] = record.name
    if "command" not in data:
        raise BadParameter(
            "is missing (the record's name or the command parameter)", field="command"
        )
    return parse_params(SystemCommandParams, data)


async def run(job: Job[SystemCommandParams], ctx: ProbeContext) -> AsyncIterator[dict[str, Any]]:
    control = ctx.control
    if control is None:
        raise Refused("this bridge runs no control service")
    params = job.params
    result: dict[str, Any] = {"command": params.command}
    if params.command == "pause":
        await control.pause()
    elif params.command == "resume":
        await control.resume()
    elif params.command == "drain":
        await control.drain()
    elif params.command == "cancel":
        assert params.sys_id is not None
        result["cancelled"] = control.cancel(params.sys_id)
        result["sys_id"] = params.sys_id
        if not result["cancelled"]:
            raise BadParameter("no running job with this sys_id", field="sys_id")
    elif params.command == "validate":
        assert params.fingerprint is not None
        await control.validate(params.fingerprint)
    elif params.command == "invalidate":
        await control.invalidate()
    else:
        result["stats"] = control.stats()
    result["status"] = control.status_record()
    yield result


SPEC = ProbeSpec(TOPIC, SystemCommandParams, run, build_params, settings=NoSettings, control=True)
