"""How the dashboard shows values: payloads, ages, lanes, states, links (the templates
escape every value; nothing here does)."""

from __future__ import annotations

import re
import time
from collections.abc import Mapping
from datetime import UTC, datetime
from typing import Any
from urllib.parse import quote

import orjson

from bridge.instance.agents import agent_name

_MAX_NEXT = 512
_STAMP = re.compile(r"^\d{4}-\d{2}-\d{2} \d{2}:\d{2}:\d{2}$")


def utc_text(value: Any) -> str:
    """A stored time (always UTC, ``2026-01-01 12:00:00``) shown with its zone; any other
    value as it is."""
    text = "" if value is None else str(value)
    return f"{text} UTC" if _STAMP.match(text) else text


def plural(count: Any, noun: str) -> str:
    """``"1 CI"``, ``"9 CIs"``, ``"0 records"``."""
    return f"{count} {noun}" if str(count) == "1" else f"{count} {noun}s"


def agent_actions(status: str, validated: bool, actions: tuple[str, ...]) -> list[str]:
    """The admin actions that make sense for an agent in ``status``: validate or
    invalidate (whichever it is not); pause and drain when Up; resume and drain when
    Paused; resume when Draining or Drained; nothing to send a Down agent but
    (in)validation, which the platform records at once."""
    wanted = {"invalidate" if validated else "validate"}
    if status == "Up":
        wanted |= {"pause", "drain"}
    elif status == "Paused":
        wanted |= {"resume", "drain"}
    elif status in ("Draining", "Drained"):
        wanted.add("resume")
    return [a for a in actions if a in wanted]


def pretty_payload(text: str) -> str:
    """A payload for reading: JSON indented, anything else (XML) as it is."""
    stripped = text.strip()
    if stripped[:1] in ("{", "["):
        try:
            return orjson.dumps(orjson.loads(stripped), option=orjson.OPT_INDENT_2).decode()
        except orjson.JSONDecodeError:
            pass
    return text


def age_text(stamp: Any, now: float | None = None) -> str:
    """``"12 s ago"`` for a stored UTC time text, ``""`` if it is not one."""
    if not isinstance(stamp, str) or not stamp:
        return ""
    try:
        then = datetime.strptime(stamp, "%Y-%m-%d %H:%M:%S").replace(tzinfo=UTC).timestamp()
    except ValueError:
        return ""
    seconds = int((time.time() if now is None else now) - then)
    if seconds < 0:
        return "just now"
    if seconds < 120:
        return f"{seconds} s ago"
    if seconds < 7200:
        return f"{seconds // 60} min ago"
    if seconds < 172_800:
        return f"{seconds // 3600} h ago"
    return f"{seconds // 86400} d ago"


def json_object(text: Any) -> dict[str, Any]:
    if not isinstance(text, str) or not text:
        return {}
    try:
        data = orjson.loads(text)
    except orjson.JSONDecodeError:
        return {}
    return data if isinstance(data, dict) else {}


def lanes_text(stats: Mapping[str, Any]) -> list[tuple[str, str]]:
    """[(lane, "running/waiting")] from an agent's stats, in the bridge's lane order."""
    running = stats.get("lanes_running")
    waiting = stats.get("lanes_waiting")
    if not isinstance(running, dict) or not isinstance(waiting, dict):
        return []
    names = list(running) + [n for n in waiting if n not in running]
    return [(str(n), f"{running.get(n, 0)}/{waiting.get(n, 0)}") for n in names][:8]


def status_kind(status: str) -> str:
    """A CSS class for an agent status or record state (fixed names, never from data)."""
    if status in ("Up", "processed", "Completed"):
        return "ok"
    if status in ("Down", "error", "Error", "Cancelled"):
        return "bad"
    return "warn"


def safe_next(target: str | None) -> str:
    """Where to go after sign-in: a local path only (no scheme, no ``//host``)."""
    if (
        not target
        or len(target) > _MAX_NEXT
        or not target.startswith("/")
        or target.startswith(("//", "/login", "/logout"))
        or "\\" in target
        or any(not c.isprintable() or c.isspace() for c in target)
    ):
        return "/"
    return target


def path_segment(value: Any) -> str:
    """``value`` as one URL path segment: every ``/`` and ``.``-only name escaped away
    (Jinja's ``urlencode`` keeps ``/``, so ``x/../dc1`` would reach another agent)."""
    return quote(str(value), safe="")


def short_agent(agent: Any) -> str:
    name = agent_name(agent)
    return name if name is not None else str(agent or "")


def truthy(value: Any) -> bool:
    if isinstance(value, str):
        return value.strip().lower() in ("true", "1")
    return bool(value)


def as_int(value: Any) -> int:
    try:
        return int(value or 0)
    except (TypeError, ValueError):
        return 0


def progress_of(value: Any) -> float:
    try:
        number = float(value or 0.0)
    except (TypeError, ValueError):
        return 0.0
    return max(0.0, min(100.0, number))
