"""What a probe's ServiceNow dialect does, and the parameter reader they share.

A dialect translates at the relay's edge, in both directions:

- **in**: :meth:`Dialect.map` turns an output's ServiceNow parameters (text, ServiceNow's
  names and units) into the bridge probe's JSON parameters (docs/probes/*). Parameters it
  knows are converted; the rest are accepted and dropped with a debug log (the bridge's
  own JSON wire stays strict: it refuses what it does not know). A value it cannot convert
  is a ``BadParameter`` naming the ServiceNow parameter: the output is answered with that
  error and the bridge never sees it. ``map`` also returns ``extra``: what the way back
  needs (JSON, kept in the spool with the job).
- **out**: :meth:`Dialect.results` turns the probe's result chunks (one run, in order) into
  the ``<result>`` elements of the one input record that answers the output.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from bridge.relay.envelope import Element, Parameters, generic_result
from bridge.wire.errors import BadParameter

log = logging.getLogger("midbridge.relay.dialect")

_TRUE = frozenset({"true", "yes", "1", "on"})
_FALSE = frozenset({"false", "no", "0", "off", ""})


@dataclass
class Mapped:
    """An output's parameters as the bridge's probe takes them, and what the answer needs."""

    params: dict[str, Any]
    extra: dict[str, Any] = field(default_factory=dict)


class ParamReader:
    """An output's ServiceNow parameters, read by name; :meth:`finish` logs the unused."""

    def __init__(self, params: Parameters, row: dict[str, str]) -> None:
        self.values: dict[str, str] = {}
        for name, value in params:
            self.values.setdefault(name, value)
        self.row = row
        self.used: set[str] = set()

    def text(self, *names: str) -> str | None:
        """The first of ``names`` given with a non-blank value."""
        for name in names:
            if name in self.values:
                self.used.add(name)
                value = self.values[name].strip()
                if value:
                    return value
        return None

    def number(self, *names: str) -> tuple[str, float] | None:
        """(the name given, its value as a number), or ``None``."""
        for name in names:
            value = self.text(name)
            if value is None:
                continue
            try:
                number = float(value)
            except ValueError:
                raise BadParameter(f"must be a number, got {value[:40]!r}", field=name) from None
            if number != number or number in (float("inf"), float("-inf")):
                raise BadParameter("must be a finite number", field=name)
            return name, number
        return None

    def integer(self, *names: str) -> int | None:
        found = self.number(*names)
        if found is None:
            return None
        name, number = found
        if number != int(number):
            raise BadParameter(f"must be a whole number, got {number}", field=name)
        return int(number)

    def seconds_from_ms(self, *names: str) -> float | None:
        """A duration ServiceNow gives in milliseconds, in seconds (the bridge's unit)."""
        found = self.number(*names)
        if found is None:
            return None
        name, ms = found
        if ms <= 0:
            raise BadParameter(f"must be above 0 ms, got {ms:g}", field=name)
        return ms / 1000.0

    def boolean(self, *names: str) -> bool | None:
        for name in names:
            value = self.text(name)
            if value is None:
                continue
            lowered = value.lower()
            if lowered in _TRUE:
                return True
            if lowered in _FALSE:
                return False
            raise BadParameter(f"must be true or false, got {value[:40]!r}", field=name)
        return None

    def finish(self, topic: str, sys_id: str) -> list[str]:
        """Log (debug) and return the parameters given but not used."""
        unused = [name for name in self.values if name not in self.used]
        if unused:
            log.debug(
                "%s %s: ServiceNow parameter(s) accepted and not used: %s",
                topic, sys_id, ", ".join(unused[:40]),
            )  # fmt: skip
        return unused


class Dialect:
    """The generic dialect: a probe the relay has no ServiceNow mapping for (e.g. ``Echo``).

    Its parameters go to the bridge as they are (and the bridge is strict about them);
    each result chunk becomes one ``<result>`` (``bridge.relay.envelope.generic_result``).
    """

    topic = ""

    def map(self, reader: ParamReader) -> Mapped:
        params = dict(reader.values)
        reader.used.update(params)
        return Mapped(params)

    def results(self, payloads: Sequence[Any], extra: dict[str, Any]) -> list[Element]:
        """One ``<result>`` per chunk: :meth:`result` for a chunk in the probe's own shape,
        the generic form for an error chunk or one that is not a JSON object."""
        return [
            self.result(payload, extra)
            if isinstance(payload, dict) and not error_of(payload)
            else generic_result(payload)
            for payload in payloads
        ]

    def result(self, payload: dict[str, Any], extra: dict[str, Any]) -> Element:
        """The ``<result>`` of one chunk of this probe (the generic form here)."""
        return generic_result(payload)


def error_of(payload: Any) -> bool:
    """A chunk that carries the bridge's error body (``{"error": {kind, message}}``)."""
    return isinstance(payload, dict) and isinstance(payload.get("error"), dict)
