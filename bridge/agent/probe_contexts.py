"""The probes' side of the runtime: settings validated once, resources opened, one context each.

Every registered probe's ``[probes.settings.<topic>]`` table is validated into its
``ProbeSpec.settings`` model when the bridge starts, before it connects to the broker: an
unknown topic or key, or a bad value, is a ``ConfigError`` naming
``probes.settings.<topic>.<key>``. The Shazzam probe's table is ``[probes.shazzam]``.
Each enabled probe's ``ProbeSpec.resource`` is opened in the bridge's exit stack, so it
closes when the bridge stops, after the last job ended.
"""

from __future__ import annotations

from collections.abc import Mapping
from contextlib import AsyncExitStack
from typing import Any

from bridge.agent.config import Config
from bridge.wire.errors import ConfigError
from probes.contract import (
    Control,
    CredentialResolver,
    ProbeContext,
    ProbeSettings,
    ProbeSpec,
    parse_settings,
)
from probes.kit.ratelimit import RateLimiter

SHAZZAM = "Shazzam"  # its settings are the typed [probes.shazzam] section


def settings_tables(config: Config, registry: Mapping[str, ProbeSpec]) -> dict[str, dict[str, Any]]:
    """The raw settings of every probe, by its registered topic.

    Topics match ``[probes.settings.<topic>]`` without regard to case: environment
    variables (``MIDBRIDGE_PROBES__SETTINGS__SNMP__MAX_IN_FLIGHT``) reach the config lower
    cased. A table spelt as the topic is read first and another spelling (the environment's)
    overrides its keys. A table no probe answers to is a ``ConfigError`` naming it.
    """
    by_lower = {topic.lower(): topic for topic in registry}
    tables: dict[str, dict[str, Any]] = {SHAZZAM: config.probes.shazzam.model_dump()}
    spelt_as_topic_first = sorted(config.probes.settings, key=lambda name: name not in registry)
    for name in spelt_as_topic_first:
        topic = by_lower.get(name.lower())
        if topic is None or topic == SHAZZAM:
            where = " (its settings are [probes.shazzam])" if topic == SHAZZAM else ""
            raise ConfigError(f"no probe has this topic{where}", field=f"probes.settings.{name}")
        if topic in tables and topic != name and topic not in config.probes.settings:
            raise ConfigError(
                f"set twice, spelt two ways; spell it {topic}", field=f"probes.settings.{name}"
            )
        tables.setdefault(topic, {}).update(config.probes.settings[name])
    return tables


def validate_settings(
    model: type[ProbeSettings], table: Mapping[str, Any], topic: str, *, per_host_limit: int
) -> ProbeSettings:
    """One probe's settings; a fault is a ``ConfigError`` naming ``probes.settings.<topic>.<key>``.

    Validated with the context ``{"per_host_limit": limits.per_host}``, for a setting whose
    default is the bridge's own limit.
    """
    return parse_settings(
        model,
        table,
        topic,
        section="probes.shazzam" if topic == SHAZZAM else None,
        context={"per_host_limit": per_host_limit},
    )


def validate_all_settings(
    config: Config,
    registry: Mapping[str, ProbeSpec],
    enabled: Mapping[str, ProbeSpec] | None = None,
) -> dict[str, ProbeSettings]:
    """The settings of every ``enabled`` probe (default: every registered one), by topic.

    A table no registered probe answers to is refused; the tables of registered probes
    this bridge does not run are not read (as before typed settings: a disabled probe's
    table stops no start).
    """
    tables = settings_tables(config, registry)
    per_host = config.limits.per_host
    return {
        topic: validate_settings(
            spec.settings, tables.get(topic, {}), topic, per_host_limit=per_host
        )
        for topic, spec in (registry if enabled is None else enabled).items()
    }


class ProbeContexts:
    """The settings, resource and ``ProbeContext`` of every probe the bridge runs."""

    def __init__(
        self,
        config: Config,
        registry: Mapping[str, ProbeSpec],
        *,
        enabled: Mapping[str, ProbeSpec],
        rate: RateLimiter,
    ) -> None:
        self.config = config
        self.registry = registry  # every registered probe: their settings are checked
        self.enabled = enabled  # the probes this bridge runs: their resources are opened
        self.rate = rate
        self.credentials: CredentialResolver | None = None
        self.control: Control | None = None
        self._settings: dict[str, ProbeSettings] = {}
        self._contexts: dict[str, ProbeContext] = {}

    def connect(self, *, credentials: CredentialResolver, control: Control) -> None:
        """The bridge's credential gate and control handle, for the contexts."""
        self.credentials = credentials
        self.control = control

    def load_settings(self) -> None:
        """Validate every registered probe's settings (the bridge's start, before the broker)."""
        self._settings = validate_all_settings(self.config, self.registry, self.enabled)

    def settings(self, topic: str) -> ProbeSettings:
        return self._settings[topic]

    async def open(self, stack: AsyncExitStack) -> None:
        """Open every enabled probe's resource in ``stack``; then build the contexts."""
        state_dir = self.config.bridge.state_dir
        for topic, spec in self.enabled.items():
            settings = self._settings[topic]
            resource = None
            if spec.resource is not None:
                try:
                    resource = await stack.enter_async_context(spec.resource(settings, state_dir))
                except (OSError, ValueError, RuntimeError, ImportError) as exc:
                    raise ConfigError(
                        f"cannot open the probe's resource: {type(exc).__name__}: {exc}",
                        field=f"probes.{topic}",
                    ) from None
            self._contexts[topic] = ProbeContext(
                agent=self.config.bridge.agent_id,
                rate=self.rate,
                per_host_limit=self.config.limits.per_host,
                settings=settings,
                credentials=self.credentials,
                resource=resource,
                control=self.control if spec.control else None,
                state_dir=state_dir,
            )
        stack.callback(self._contexts.clear)

    def context(self, topic: str) -> ProbeContext:
        return self._contexts[topic]
