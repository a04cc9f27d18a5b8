"""Logging for every midbridge command: levels, the protocol loggers, text or JSON lines.

- ``trace`` (level 5, below DEBUG) is the only level that lets the protocol libraries'
  packet dumps through (gmqtt, nats-py, asyncssh); ``debug`` shows midbridge's own debug
  lines without them.
- ``log_format = "json"``: one JSON object per line with ``ts`` (UTC, ISO 8601),
  ``level``, ``logger`` and ``message``, plus every field a record carries as ``extra``
  (a job's ``topic``, ``sys_id``, ``agent_correlator``, ``lane``, ``duration_ms``,
  ``result``, ``error_kind``), and ``exc`` with the traceback when there is one.
"""

from __future__ import annotations

import logging
import sys
from datetime import UTC, datetime
from typing import Any, Literal

import orjson

TRACE = 5
logging.addLevelName(TRACE, "TRACE")

LEVELS = ("trace", "debug", "info", "warning", "error")
FORMATS = ("text", "json")
LogFormat = Literal["text", "json"]

# Loggers that dump protocol packets at DEBUG (shown at trace only) or chatter at INFO.
PROTOCOL_LOGGERS = ("midbridge.gmqtt", "gmqtt", "nats", "asyncssh", "aiosqlite", "asyncio")

# Attributes every LogRecord has: what is left over was passed as ``extra``.
_STANDARD = frozenset(
    logging.LogRecord("", 0, "", 0, "", None, None).__dict__.keys()
    | {"message", "asctime", "taskName"}
)


class JsonFormatter(logging.Formatter):
    """One JSON object per line; ``extra`` fields become keys of their own."""

    def format(self, record: logging.LogRecord) -> str:
        body: dict[str, Any] = {
            "ts": datetime.fromtimestamp(record.created, UTC).isoformat(timespec="milliseconds"),
            "level": record.levelname.lower(),
            "logger": record.name,
            "message": record.getMessage(),
        }
        for key, value in record.__dict__.items():
            if key not in _STANDARD and key not in body:
                body[key] = value
        if record.exc_info:
            body["exc"] = self.formatException(record.exc_info)
        return orjson.dumps(body, default=str).decode()


def level_number(level: str) -> int:
    return TRACE if level == "trace" else int(getattr(logging, level.upper()))


_installed: list[logging.Handler] = []  # the handler an earlier call added (replaced)


def setup_logging(level: str, fmt: str = "text") -> None:
    """Log to stderr at ``level`` in ``fmt``.

    As ``logging.basicConfig``: a root logger that already has handlers of someone else's
    (a program that imports the CLI, pytest's capture) keeps them and gets none of ours;
    only the levels are set.
    """
    root = logging.getLogger()
    while _installed:
        root.removeHandler(_installed.pop())
    if not root.handlers:
        handler = logging.StreamHandler(sys.stderr)
        if fmt == "json":
            handler.setFormatter(JsonFormatter())
        else:
            handler.setFormatter(
                logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s")
            )
        root.addHandler(handler)
        _installed.append(handler)
    number = level_number(level)
    root.setLevel(number)
    # Packet dumps and per-connection chatter: at trace only; warnings always.
    quiet = TRACE if level == "trace" else max(number, logging.WARNING)
    for name in PROTOCOL_LOGGERS:
        logging.getLogger(name).setLevel(quiet)
    # gmqtt logs a lost connection as an ERROR with a traceback; our transport says it once.
    if level != "trace":
        logging.getLogger("midbridge.gmqtt").setLevel(max(number, logging.ERROR))
        logging.getLogger("gmqtt").setLevel(max(number, logging.ERROR))
