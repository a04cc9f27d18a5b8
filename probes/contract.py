"""What a probe sees: the job, its context, and the one probe signature.

A probe is a plain async generator function::

    async def run(job: Job[Params], ctx: ProbeContext) -> AsyncIterator[dict[str, Any]]:
        yield {"...": "..."}   # one result chunk; the caller turns each into an input record

It does not time itself, apply its deadline, build envelopes or catch its own errors
beyond translating library exceptions into ``bridge.wire.errors`` at its edge: the caller
(``bridge.agent.runner``) does all of that. The last chunk yielded is sent with ``complete``.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable, Mapping
from contextlib import AbstractAsyncContextManager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Generic, Protocol, TypeVar

from pydantic import BaseModel, ConfigDict, ValidationError

from bridge.wire.credentials import Credential
from bridge.wire.errors import BadParameter, BridgeError, ConfigError
from bridge.wire.records import OutputRecord
from probes.kit.ratelimit import RateLimiter


class ProbeParams(BaseModel):
    """Base of every probe's parameter model: unknown parameters are refused."""

    model_config = ConfigDict(extra="forbid", frozen=True)


P = TypeVar("P", bound=ProbeParams)


class CredentialResolver(Protocol):
    """Finds the credentials a job may use: by id, or every one of the given types in order."""

    async def resolve(
        self, record: OutputRecord, *, credential_id: str | None, types: tuple[str, ...]
    ) -> list[Credential]: ...


@dataclass(slots=True)
class Job(Generic[P]):
    record: OutputRecord
    params: P


class ProbeSettings(BaseModel):
    """Base of every probe's settings model (``[probes.settings.<topic>]`` in the config).

    Validated when the bridge starts, so a typo fails the start naming the key; unknown
    keys are refused.
    """

    model_config = ConfigDict(extra="forbid", frozen=True)


class NoSettings(ProbeSettings):
    """The settings of a probe that has none."""


@dataclass(slots=True)
class ProbeContext:
    """Shared services a probe may use; owned by the bridge, not by the probe."""

    agent: str
    rate: RateLimiter  # global probes/s budget for sweeps; acquire before each probe packet
    per_host_limit: int  # concurrent probes a probe may run against one target host
    settings: Any = None  # the probe's settings: an instance of its ProbeSpec.settings model
    credentials: CredentialResolver | None = None
    resource: Any = None  # what the probe's ProbeSpec.resource opened (entered by the runtime)
    control: Control | None = None  # control probes only: what they may ask of the bridge
    state_dir: Path | None = None  # the bridge's state directory (owner-only), for probe stores


# Opens a probe's long-lived resource (a connection pool, a client session) from its
# settings and the bridge's state directory. The runtime enters it when the bridge starts
# and exits it when the bridge stops, after the last job ended.
ResourceFactory = Callable[[Any, Path | None], AbstractAsyncContextManager[Any]]


@dataclass(frozen=True, slots=True)
class ProbeSpec:
    """One registry entry: topic → parameters model, probe function, and policy."""

    topic: str
    params: type[ProbeParams]
    run: Callable[[Job[Any], ProbeContext], AsyncIterator[dict[str, Any]]]
    # (the output record, the probe's settings model instance) → the job's parameters
    build_params: Callable[[OutputRecord, Any], ProbeParams]
    settings: type[ProbeSettings] = NoSettings
    resource: ResourceFactory | None = None
    target_host: Callable[[Any], str | None] = lambda _params: None
    needs_credentials: bool = False
    control: bool = False  # heartbeats and SystemCommand: a lane of their own, never paused


def validation_to_error(exc: ValidationError) -> BadParameter:
    """The first pydantic error as a ``BadParameter`` naming its field."""
    first = exc.errors()[0]
    loc = ".".join(str(part) for part in first.get("loc", ())) or "payload"
    message = str(first.get("msg", "invalid"))
    return BadParameter(message, field=loc)


M = TypeVar("M", bound=BaseModel)


def parse_settings(
    model: type[M],
    settings: Mapping[str, Any],
    topic: str,
    *,
    section: str | None = None,
    context: Mapping[str, Any] | None = None,
) -> M:
    """A probe's settings table; a fault is a ``ConfigError`` naming ``<section>.<key>``.

    ``section`` defaults to ``probes.settings.<topic>``; ``context`` is pydantic's
    validation context (the runtime passes ``{"per_host_limit": limits.per_host}``).
    """
    where = section or f"probes.settings.{topic}"
    try:
        return model.model_validate(dict(settings), context=dict(context or {}))
    except ValidationError as exc:
        first = exc.errors()[0]
        loc = ".".join(str(part) for part in first.get("loc", ()))
        message = "unknown key" if first.get("type") == "extra_forbidden" else first["msg"]
        raise ConfigError(str(message), field=f"{where}.{loc}" if loc else where) from None


def parse_params(model: type[P], data: Mapping[str, Any]) -> P:
    """Validate raw parameters into ``model``; any fault becomes ``BadParameter``."""
    try:
        return model.model_validate(dict(data))
    except ValidationError as exc:
        raise validation_to_error(exc) from None
    except BridgeError:
        raise
    except (TypeError, ValueError) as exc:
        raise BadParameter(str(exc)) from None


# --- what the control probes (HeartbeatProbe, SystemCommand) may ask of the bridge ---


class Control(Protocol):
    def status_record(self) -> dict[str, Any]: ...

    def stats(self) -> dict[str, Any]: ...

    async def pause(self) -> None: ...

    async def resume(self) -> None: ...

    async def drain(self) -> None: ...

    def cancel(self, sys_id: str) -> bool: ...

    async def validate(self, fingerprint: str) -> None: ...

    async def invalidate(self) -> None: ...

    async def heartbeat(self) -> None: ...
