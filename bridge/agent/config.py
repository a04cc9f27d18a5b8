"""The one typed configuration model: TOML file, defaults, ``MIDBRIDGE_*`` env overrides.

Unknown keys are refused with the key named. Env overrides use ``__`` between levels
(a variable without ``__`` counts only if it names a top-level key such as ``LOG_LEVEL``;
others belong to other commands and are left alone):
``MIDBRIDGE_BROKER__HOST=broker.lan``, ``MIDBRIDGE_LIMITS__MAX_IN_FLIGHT=500``,
``MIDBRIDGE_PROBES__SHAZZAM__MAX_ADDRESSES=4096``.
"""

from __future__ import annotations

import os
import tomllib
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Literal

import orjson
from pydantic import (
    BaseModel,
    Field,
    ValidationError,
    model_validator,
)

from bridge.wire.broker import BrokerConfig, Section
from bridge.wire.errors import ConfigError
from probes.shazzam.settings import ShazzamSettings

ENV_PREFIX = "MIDBRIDGE_"


class BridgeSection(Section):
    agent: str = Field("midbridge", pattern=r"^[A-Za-z0-9_.\-]{1,64}$")
    topic_prefix: str = Field("ecc", pattern=r"^[A-Za-z0-9_.\-/]{1,64}$")
    state_dir: Path = Path("./midbridge-state")
    shared_group: str | None = Field(None, pattern=r"^[A-Za-z0-9_.\-]{1,64}$")  # $share/<g>/...
    credentials_file: Path | None = None  # TOML [[credential]] tables, owner-only (chmod 600)
    instance: str | None = Field(None, pattern=r"^[A-Za-z0-9_.\-]{1,64}$")  # cluster member

    @property
    def agent_id(self) -> str:
        """ServiceNow's agent field: ``mid.server.<NAME>``."""
        return f"mid.server.{self.agent}"


class SecurityConfig(Section):
    require_validation: bool = True  # credential-bearing jobs refused until validated
    require_signatures: bool = False  # the hardened config turns this on
    platform_key: str | None = None  # the platform's Ed25519 public key, raw, base64
    clock_skew: float = Field(60.0, ge=0, le=3600)  # seconds a signed record's times may be off
    status_interval: float = Field(30.0, gt=0, le=3600)  # seconds between status records

    @model_validator(mode="after")
    def _key_for_signatures(self) -> SecurityConfig:
        if self.require_signatures and not self.platform_key:
            raise ValueError("platform_key: required when require_signatures is on")
        return self


class LimitsConfig(Section):
    max_in_flight: int = Field(1000, ge=1, le=65535)  # unacknowledged jobs (MQTT receive max)
    express_in_flight: int = Field(64, ge=1, le=65535)  # same, for the interactive session
    lane_workers: tuple[int, int, int] = (20, 50, 100)  # running jobs: interactive/expedited/std
    per_host: int = Field(8, ge=1, le=1000)  # concurrent probes against one host
    probe_rate: float = Field(0.0, ge=0)  # sweep probes/s across the bridge; 0 = unlimited
    default_timeout: float = Field(300.0, gt=0)  # seconds a job may run if its record says not
    max_message_bytes: int = Field(1_048_576, ge=1024)  # checked before parsing
    max_batch: int = Field(1000, ge=1)  # records in one inbound MQTT message
    egress_linger_ms: float = Field(0.0, ge=0, le=1000)  # extra gathering before a commit
    egress_batch: int = Field(200, ge=1, le=10_000)  # input records in one MQTT message
    outbox_max_records: int = Field(1_000_000, ge=100)  # on disk; past it jobs wait
    dedupe_window: float = Field(7 * 86_400.0, ge=0)  # seconds a finished sys_id is remembered
    dedupe_memory: int = Field(500_000, ge=1000)  # finished sys_ids held in memory
    drain_timeout: float = Field(10.0, ge=0)  # seconds shutdown waits for running jobs

    @model_validator(mode="after")
    def _lanes_positive(self) -> LimitsConfig:
        if any(n < 1 for n in self.lane_workers):
            raise ValueError("lane_workers: every lane needs at least one worker")
        return self


class ProbesConfig(Section):
    enabled: list[str] | None = None  # topics; None = every registered probe
    shazzam: ShazzamSettings = ShazzamSettings()  # [probes.shazzam]
    settings: dict[str, dict[str, Any]] = Field(default_factory=dict)  # per-topic, other probes


class Config(Section):
    broker: BrokerConfig = BrokerConfig()
    bridge: BridgeSection = BridgeSection()
    limits: LimitsConfig = LimitsConfig()
    probes: ProbesConfig = ProbesConfig()
    security: SecurityConfig = SecurityConfig()
    log_level: Literal["trace", "debug", "info", "warning", "error"] = "info"
    log_format: Literal["text", "json"] = "text"  # json: one object per line
    metrics_host: str = "127.0.0.1"
    # /metrics, /livez, /readyz, /healthz; None: off
    metrics_port: int | None = Field(None, ge=0, le=65535)

    @model_validator(mode="after")
    def _ledger_outlives_signatures(self) -> Config:
        """Signed jobs are taken only while the ledger still remembers the ones that ran."""
        if self.security.require_signatures and (
            self.limits.dedupe_window <= 2 * self.security.clock_skew
        ):
            raise ValueError(
                "limits.dedupe_window: must be longer than 2 x security.clock_skew when "
                "signatures are required (a signed job is accepted for at most "
                "dedupe_window - 2 x clock_skew seconds after it was signed)"
            )
        return self

    @property
    def signature_max_age(self) -> float:
        """Seconds after ``issued_at`` a signed record is still taken (replay protection)."""
        return self.limits.dedupe_window - 2 * self.security.clock_skew


def _env_overrides(environ: Mapping[str, str]) -> dict[str, Any]:
    return _env_tree(environ)[0]


def _env_tree(environ: Mapping[str, str]) -> tuple[dict[str, Any], dict[tuple[str, ...], str]]:
    """The overrides as a tree, and which variable set each key (by its path)."""
    tree: dict[str, Any] = {}
    names: dict[tuple[str, ...], str] = {}
    for key, raw in environ.items():
        if not key.startswith(ENV_PREFIX) or key == ENV_PREFIX + "CONFIG":
            continue
        path = key[len(ENV_PREFIX) :].lower().split("__")
        if len(path) == 1 and path[0] not in Config.model_fields:
            # Not a section key: a variable of another command (MIDBRIDGE_ADMIN_PASSWORD,
            # MIDBRIDGE_INSTANCE_*, MIDBRIDGE_TEST_*). Keys inside a section are checked.
            continue
        if not all(path):
            raise ConfigError(f"malformed environment variable name {key}", field=key)
        node = tree
        for part in path[:-1]:
            child = node.setdefault(part, {})
            if not isinstance(child, dict):
                raise ConfigError("conflicts with another variable", field=key)
            node = child
        node[path[-1]] = _env_value(raw)
        names[tuple(path)] = key
    return tree, names


def _env_value(raw: str) -> Any:
    """JSON where it parses (numbers, lists, booleans), else the text itself."""
    try:
        return orjson.loads(raw)
    except orjson.JSONDecodeError:
        return raw


def config_env(config: Config, environ: Mapping[str, str] | None = None) -> dict[str, str]:
    """``environ`` (default: this process's) without its MIDBRIDGE_* variables, plus
    ``config`` as MIDBRIDGE_* variables: what ``load_config`` reads back in a child process
    (the benchmarks' bridge, the tests' ``midbridge run``)."""
    source = os.environ if environ is None else environ
    env = {k: v for k, v in source.items() if not k.startswith(ENV_PREFIX)}

    def put(prefix: str, data: Mapping[str, Any]) -> None:
        for key, value in data.items():
            name = f"{prefix}__{key.upper()}" if prefix else key.upper()
            if isinstance(value, dict):
                put(name, value)
            elif value is not None:
                text = value if isinstance(value, str) else orjson.dumps(value).decode()
                env[ENV_PREFIX + name] = text

    put("", config.model_dump(mode="json"))
    return env


def _merge(base: dict[str, Any], over: Mapping[str, Any]) -> dict[str, Any]:
    merged = dict(base)
    for key, value in over.items():
        if isinstance(value, Mapping) and isinstance(merged.get(key), dict):
            merged[key] = _merge(merged[key], value)
        else:
            merged[key] = value
    return merged


def config_from_mapping(
    data: Mapping[str, Any], env_names: Mapping[tuple[str, ...], str] | None = None
) -> Config:
    """Validate; every problem at once in one :class:`ConfigError` (``problems`` lists them).

    A key set by an environment variable is named with that variable (``env_names``).
    """
    try:
        return Config.model_validate(dict(data))
    except ValidationError as exc:
        problems = [_problem(error, env_names or {}) for error in exc.errors()]
    if len(problems) == 1:
        field, message = problems[0]
        raise ConfigError(message, field=field)
    error = ConfigError("; ".join(f"{f}: {m}" if f else m for f, m in problems))
    error.problems = [f"{f}: {m}" if f else m for f, m in problems]
    raise error


def _problem(error: Any, env_names: Mapping[tuple[str, ...], str]) -> tuple[str, str]:
    loc = tuple(str(part) for part in error.get("loc", ()))
    field = ".".join(loc)
    if error.get("type") == "extra_forbidden":
        message = "unknown key"
    else:
        message = str(error.get("msg", "invalid")).removeprefix("Value error, ")
    # The variables that set this key, the section it belongs to, or keys inside it.
    variables = sorted(
        name
        for path, name in env_names.items()
        if path[: len(loc)] == loc or loc[: len(path)] == path
    )
    if variables:
        plural = "s" if len(variables) > 1 else ""
        field = f"{field} (environment variable{plural} {', '.join(variables)})"
    return field, message


def _read_file(path: Path) -> dict[str, Any]:
    try:
        return tomllib.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise ConfigError("file not found", field=str(path)) from None
    except IsADirectoryError:
        raise ConfigError("is a directory, not a TOML file", field=str(path)) from None
    except PermissionError:
        raise ConfigError("permission denied", field=str(path)) from None
    except UnicodeDecodeError:
        raise ConfigError("not UTF-8 text", field=str(path)) from None
    except OSError as exc:
        raise ConfigError(exc.strerror or str(exc), field=str(path)) from None
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"TOML does not parse: {exc}", field=str(path)) from None


def load_config(path: Path | None = None, *, environ: Mapping[str, str] | None = None) -> Config:
    """Read the TOML file (if any), apply env overrides, validate (every problem named)."""
    env = os.environ if environ is None else environ
    data: dict[str, Any] = {}
    if path is None and env.get(ENV_PREFIX + "CONFIG"):
        path = Path(env[ENV_PREFIX + "CONFIG"])
    if path is not None:
        data = _read_file(path)
    overrides, names = _env_tree(env)
    return config_from_mapping(_merge(data, overrides), names)


def defaults_toml() -> str:
    """The default configuration as TOML (keys without a default commented out)."""
    lines = ["# midbridge: the default configuration (midbridge config defaults)"]

    def value(v: Any) -> str:
        return orjson.dumps(v).decode()  # JSON scalars and lists are valid TOML here

    def table(name: str, model: BaseModel) -> None:
        scalars: list[str] = []
        tables: list[tuple[str, BaseModel]] = []
        data = model.model_dump(mode="json")
        for key in type(model).model_fields:
            current = getattr(model, key)
            if isinstance(current, BaseModel):
                tables.append((f"{name}.{key}" if name else key, current))
            elif data[key] is None:
                scalars.append(f"# {key} = (not set)")
            elif isinstance(data[key], dict):
                scalars.append(f"# [{name}.{key}.<name>] tables (none by default)")
            else:
                scalars.append(f"{key} = {value(data[key])}")
        if name:
            lines.extend(["", f"[{name}]"])
        lines.extend(scalars)
        for sub_name, sub in tables:
            table(sub_name, sub)

    table("", Config())
    return "\n".join(lines) + "\n"
