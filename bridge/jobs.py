"""What a probe sees: the job, its context, and the one probe signature.

A probe is a plain async generator function::

    async def run(job: Job[Params], ctx: ProbeContext) -> AsyncIterator[dict[str, Any]]:
        yield {"...": "..."}   # one result chunk; the caller turns each into an input record

It does not time itself, apply its deadline, build envelopes or catch its own errors
beyond translating library exceptions into ``bridge.errors`` at its edge: the caller
(``bridge.runner``) does all of that. The last chunk yielded is sent with ``complete``.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Generic, Protocol, TypeVar

from pydantic import BaseModel, ConfigDict, ValidationError

from bridge.errors import BadParameter, BridgeError, ConfigError
from bridge.ratelimit import RateLimiter
from bridge.records import OutputRecord


class ProbeParams(BaseModel):
    """Base of every probe's parameter model: unknown parameters are refused."""

    model_config = ConfigDict(extra="forbid", frozen=True)


P = TypeVar("P", bound=ProbeParams)


@dataclass(frozen=True, slots=True)
class Credential:
    """A resolved secret. ``repr`` never shows the secret fields."""

    id: str
    type: str
    fields: Mapping[str, str]

    def __repr__(self) -> str:
        return f"Credential(id={self.id!r}, type={self.type!r}, fields=<{len(self.fields)} hidden>)"

    __str__ = __repr__


class CredentialResolver(Protocol):
    """Finds the credentials a job may use: by id, or every one of the given types in order."""

    async def resolve(
        self, record: OutputRecord, *, credential_id: str | None, types: tuple[str, ...]
    ) -> list[Credential]: ...


@dataclass(slots=True)
class Job(Generic[P]):
    record: OutputRecord
    params: P


@dataclass(slots=True)
class ProbeContext:
    """Shared services a probe may use; owned by the bridge, not by the probe."""

    agent: str
    rate: RateLimiter  # global probes/s budget for sweeps; acquire before each probe packet
    per_host_limit: int  # concurrent probes a probe may run against one target host
    settings: Mapping[str, Any] = field(default_factory=dict)  # the probe's config section
    credentials: CredentialResolver | None = None
    resources: dict[str, Any] = field(default_factory=dict)  # shared clients, e.g. an HTTP session
    state_dir: Path | None = None  # the bridge's state directory (owner-only), for probe stores


@dataclass(frozen=True, slots=True)
class ProbeSpec:
    """One registry entry: topic → parameters model, probe function, and policy."""

    topic: str
    params: type[ProbeParams]
    run: Callable[[Job[Any], ProbeContext], AsyncIterator[dict[str, Any]]]
    build_params: Callable[[OutputRecord, Mapping[str, Any]], ProbeParams]
    target_host: Callable[[Any], str | None] = lambda _params: None
    sweep: bool = False  # many targets: paced by the global probe rate instead of per host
    needs_credentials: bool = False
    control: bool = False  # heartbeats and SystemCommand: a lane of their own, never paused


def validation_to_error(exc: ValidationError) -> BadParameter:
    """The first pydantic error as a ``BadParameter`` naming its field."""
    first = exc.errors()[0]
    loc = ".".join(str(part) for part in first.get("loc", ())) or "payload"
    message = str(first.get("msg", "invalid"))
    return BadParameter(message, field=loc)


M = TypeVar("M", bound=BaseModel)


def parse_settings(model: type[M], settings: Mapping[str, Any], topic: str) -> M:
    """A probe's ``[probes.settings.<topic>]`` table; a fault is a ``ConfigError`` naming it."""
    try:
        return model.model_validate(dict(settings))
    except ValidationError as exc:
        first = exc.errors()[0]
        loc = ".".join(str(part) for part in first.get("loc", ()))
        message = "unknown key" if first.get("type") == "extra_forbidden" else first["msg"]
        raise ConfigError(str(message), field=f"probes.settings.{topic}.{loc}") from None


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
