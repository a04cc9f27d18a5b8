"""ECC queue records on the wire: decoding output records, building input records.

The wire contract is written down in ``docs/wire-contract.md``. One MQTT message holds
either one JSON record (an object) or a batch (an array of objects). Field names are
ServiceNow's (``ecc_queue``). An output's ``payload`` is a JSON object of parameters, or
the XML ``<parameters><parameter name=".." value=".."/></parameters>`` form, or empty.
"""

from __future__ import annotations

import itertools
import os
import re
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any
from xml.etree import ElementTree

import orjson

from bridge.wire.errors import BadRecord, BridgeError

PRIORITY_INTERACTIVE = 0
PRIORITY_EXPEDITED = 1
PRIORITY_STANDARD = 2
PRIORITIES = (PRIORITY_INTERACTIVE, PRIORITY_EXPEDITED, PRIORITY_STANDARD)

_SYS_ID = re.compile(r"^[A-Za-z0-9_.:\-]{1,64}$")
_TEXT_FIELDS = ("agent", "name", "source", "agent_correlator", "error_string", "sys_created_on")
MAX_TEXT_FIELD = 65_536


@dataclass(frozen=True, slots=True)
class OutputRecord:
    """A job: an ECC output record, decoded and checked."""

    sys_id: str
    topic: str
    agent: str = ""
    name: str = ""
    source: str = ""
    agent_correlator: str = ""
    priority: int = PRIORITY_STANDARD
    payload: dict[str, Any] = field(default_factory=dict)
    payload_format: str = "json"  # "json" or "xml": how the parameters arrived
    sys_created_on: str = ""
    timeout: float | None = None  # seconds the job may run, else the configured default
    expires_at: float | None = None  # epoch seconds; not started by then: an error record
    credentials: tuple[Any, ...] = ()  # credentials sealed to this bridge's key, for this job
    issued_at: float | None = None  # epoch seconds the platform signed it (signed records)
    valid_until: float | None = None  # epoch seconds its signature stops being accepted


@dataclass(frozen=True, slots=True)
class Rejected:
    """An output record that could not be accepted, with what is known of it."""

    error: BridgeError
    sys_id: str | None = None
    topic: str = ""
    agent: str = ""
    name: str = ""
    source: str = ""
    agent_correlator: str = ""
    priority: int = PRIORITY_STANDARD


_now_cache: tuple[int, str] = (0, "")


def now_text() -> str:
    """ServiceNow's ``sys_created_on`` shape (UTC): ``2026-11-27 13:04:05``."""
    global _now_cache
    second = int(time.time())
    if _now_cache[0] != second:
        _now_cache = (second, datetime.fromtimestamp(second, UTC).strftime("%Y-%m-%d %H:%M:%S"))
    return _now_cache[1]


_ID_PREFIX = os.urandom(8).hex()  # per process: ids stay unique across restarts and bridges
_id_counter = itertools.count(1)


def new_sys_id() -> str:
    """32 hex digits, unique: a random per-process prefix and a counter (cheaper than uuid4)."""
    return f"{_ID_PREFIX}{next(_id_counter):016x}"


def xml_parameters(text: str, *, nested: bool = False) -> list[tuple[str, str]]:
    """``<parameters><parameter name="a" value="b"/>...</parameters>``: each parameter's
    name and its ``value`` attribute, else its text, in their order; with ``nested``, a
    parameter without a value whose content is elements (ServiceNow's nested
    specifications) gives those elements as XML text.

    Raises ``BadRecord`` (field ``payload``) for what does not parse, a DTD or an entity
    declaration, another root, another element or a parameter without a name.
    """
    if "<!DOCTYPE" in text or "<!ENTITY" in text:
        raise BadRecord("DTDs and entities are not accepted in XML parameters", field="payload")
    try:
        root = ElementTree.fromstring(text)
    except ElementTree.ParseError as exc:
        raise BadRecord(f"XML parameters do not parse: {exc}", field="payload") from None
    if root.tag != "parameters":
        raise BadRecord(f"XML root must be <parameters>, got <{root.tag}>", field="payload")
    params: list[tuple[str, str]] = []
    for node in root:
        if node.tag != "parameter":
            raise BadRecord(f"unexpected XML element <{node.tag}>", field="payload")
        name = node.get("name")
        if not name:
            raise BadRecord("a <parameter> has no name attribute", field="payload")
        value = node.get("value")
        if value is None and nested and len(node):
            value = "".join(ElementTree.tostring(c, encoding="unicode") for c in node)
        params.append((name, value if value is not None else (node.text or "")))
    return params


def parse_xml_parameters(text: str) -> dict[str, Any]:
    """``<parameters><parameter name="a" value="b"/></parameters>`` → ``{"a": "b"}`` (a
    name given twice: the last one)."""
    return dict(xml_parameters(text))


def _partial_info(raw: dict[str, Any]) -> dict[str, Any]:
    """Whatever identifying fields of a bad record are readable, for its error record."""
    info: dict[str, Any] = {}
    sys_id = raw.get("sys_id")
    if isinstance(sys_id, str) and _SYS_ID.match(sys_id):
        info["sys_id"] = sys_id
    for key in ("topic", "agent", "name", "source", "agent_correlator"):
        value = raw.get(key)
        if isinstance(value, str) and len(value) <= MAX_TEXT_FIELD:
            info[key] = value
    prio = raw.get("priority")
    if isinstance(prio, int) and not isinstance(prio, bool) and prio in PRIORITIES:
        info["priority"] = prio
    elif isinstance(prio, str) and prio in ("0", "1", "2"):
        info["priority"] = int(prio)
    return info


def _number(raw: dict[str, Any], key: str) -> float | None:
    value = raw.get(key)
    if value is None or value == "":
        return None
    if isinstance(value, bool):
        raise BadRecord("must be a number", field=key)
    if isinstance(value, int | float):
        number = float(value)
    elif isinstance(value, str):
        try:
            number = float(value)
        except ValueError:
            raise BadRecord(f"must be a number, got {value[:40]!r}", field=key) from None
    else:
        raise BadRecord(f"must be a number, got {type(value).__name__}", field=key)
    if number != number or number in (float("inf"), float("-inf")):
        raise BadRecord("must be a finite number", field=key)
    return number


Verifier = Callable[[dict[str, Any]], None]


def record_from_dict(raw: Any, verify: Verifier | None = None) -> OutputRecord | Rejected:
    """Check one decoded JSON value as an output record (and its signature, if asked)."""
    if not isinstance(raw, dict):
        return Rejected(BadRecord(f"a record must be a JSON object, got {type(raw).__name__}"))
    try:
        if verify is not None:
            verify(raw)
        return _record_from_dict(raw)
    except BridgeError as exc:
        # Drop the traceback and context: they hold the decoding frames, whose callers
        # hold this Rejected, a cycle only a full collection frees (a flood grows memory).
        exc.__traceback__ = None
        exc.__context__ = None
        return Rejected(exc, **_partial_info(raw))
    except (TypeError, ValueError, RecursionError) as exc:
        # Whatever else a hostile record makes a check raise: answered, never a message
        # left unacknowledged (which would hold a slot of the receive window for good).
        error = BadRecord(f"unreadable record ({type(exc).__name__})")
        return Rejected(error, **_partial_info(raw))


def _record_from_dict(raw: dict[str, Any]) -> OutputRecord:
    sys_id = raw.get("sys_id")
    if sys_id is None:
        raise BadRecord("is missing", field="sys_id")
    if not isinstance(sys_id, str) or not _SYS_ID.match(sys_id):
        raise BadRecord("must be 1-64 characters of A-Z a-z 0-9 _ . : -", field="sys_id")
    topic = raw.get("topic")
    if topic is None:
        raise BadRecord("is missing", field="topic")
    if not isinstance(topic, str) or not topic or len(topic) > 128:
        raise BadRecord("must be a non-empty string of at most 128 characters", field="topic")
    queue = raw.get("queue", "output")
    if queue != "output":
        raise BadRecord(f"must be 'output', got {str(queue)[:40]!r}", field="queue")
    texts: dict[str, str] = {}
    for key in _TEXT_FIELDS:
        value = raw.get(key, "")
        if value is None:
            value = ""
        if not isinstance(value, str):
            raise BadRecord(f"must be a string, got {type(value).__name__}", field=key)
        if len(value) > MAX_TEXT_FIELD:
            raise BadRecord(f"is longer than {MAX_TEXT_FIELD} characters", field=key)
        texts[key] = value
    priority_raw = raw.get("priority", PRIORITY_STANDARD)
    if isinstance(priority_raw, str) and priority_raw in ("0", "1", "2"):
        priority_raw = int(priority_raw)
    if (
        isinstance(priority_raw, bool)
        or not isinstance(priority_raw, int)
        or priority_raw not in PRIORITIES
    ):
        raise BadRecord(f"must be 0, 1 or 2, got {str(priority_raw)[:20]!r}", field="priority")
    payload_raw = raw.get("payload")
    payload_format = "json"
    if payload_raw is None or payload_raw == "":
        payload: dict[str, Any] = {}
    elif isinstance(payload_raw, dict):
        payload = payload_raw
    elif isinstance(payload_raw, str) and payload_raw.lstrip().startswith("<"):
        payload = parse_xml_parameters(payload_raw)
        payload_format = "xml"
    elif isinstance(payload_raw, str) and payload_raw.lstrip().startswith("{"):
        try:
            decoded = orjson.loads(payload_raw)
        except orjson.JSONDecodeError as exc:
            raise BadRecord(f"JSON text does not parse: {exc}", field="payload") from None
        if not isinstance(decoded, dict):
            raise BadRecord("must be a JSON object of parameters", field="payload")
        payload = decoded
    else:
        raise BadRecord("must be a JSON object, XML <parameters>, or empty", field="payload")
    timeout = _number(raw, "timeout")
    if timeout is not None and not 0 < timeout <= 86_400:
        raise BadRecord("must be between 0 and 86400 seconds", field="timeout")
    expires_at = _number(raw, "expires_at")
    issued_at = _number(raw, "issued_at")
    valid_until = _number(raw, "valid_until")
    sealed = raw.get("credentials") or ()
    if not isinstance(sealed, list | tuple) or len(sealed) > 32:
        raise BadRecord("must be a list of at most 32 sealed credentials", field="credentials")
    return OutputRecord(
        sys_id=sys_id,
        topic=topic,
        agent=texts["agent"],
        name=texts["name"],
        source=texts["source"],
        agent_correlator=texts["agent_correlator"],
        priority=priority_raw,
        payload=payload,
        payload_format=payload_format,
        sys_created_on=texts["sys_created_on"],
        timeout=timeout,
        expires_at=expires_at,
        credentials=tuple(sealed),
        issued_at=issued_at,
        valid_until=valid_until,
    )


def decode_outputs(
    data: bytes, *, max_bytes: int, max_batch: int, verify: Verifier | None = None
) -> list[OutputRecord | Rejected]:
    """Decode one MQTT message: a record or a batch of records.

    The size limit is applied before parsing. Never raises: a fault becomes ``Rejected``.
    """
    if len(data) > max_bytes:
        return [
            Rejected(BadRecord(f"message of {len(data)} bytes is over the limit of {max_bytes}"))
        ]
    try:
        decoded = orjson.loads(data)
    except orjson.JSONDecodeError as exc:
        return [Rejected(BadRecord(f"malformed JSON: {exc}"))]
    if isinstance(decoded, list):
        if not decoded:
            return [Rejected(BadRecord("empty batch"))]
        if len(decoded) > max_batch:
            return [
                Rejected(
                    BadRecord(f"batch of {len(decoded)} records is over the limit of {max_batch}")
                )
            ]
        return [record_from_dict(item, verify) for item in decoded]
    return [record_from_dict(decoded, verify)]


@dataclass(slots=True)
class InputRecord:
    """An ECC input record: one chunk of a job's result (or its error)."""

    response_to: str
    topic: str
    agent: str
    name: str
    source: str
    agent_correlator: str
    priority: int
    sequence: int
    complete: bool
    payload: dict[str, Any]
    error_string: str = ""
    probe_time_ms: float | None = None
    run: str = field(default_factory=new_sys_id)  # one execution of the job; chunks share it
    sys_id: str = field(default_factory=new_sys_id)
    sys_created_on: str = field(default_factory=now_text)

    def to_wire(self) -> dict[str, Any]:
        record: dict[str, Any] = {
            "sys_id": self.sys_id,
            "agent": self.agent,
            "topic": self.topic,
            "name": self.name,
            "source": self.source,
            "queue": "input",
            "state": "ready",
            "response_to": self.response_to,
            "agent_correlator": self.agent_correlator,
            "priority": self.priority,
            "error_string": self.error_string,
            "payload": self.payload,
            "sys_created_on": self.sys_created_on,
            "sequence": self.sequence,
            "complete": self.complete,
            "run": self.run,
            "result_code": 1 if self.error_string else 0,
        }
        if self.probe_time_ms is not None:
            record["probe_time"] = round(self.probe_time_ms, 3)
        return record


def error_payload(error: BridgeError) -> dict[str, Any]:
    body: dict[str, Any] = {"kind": error.kind, "message": error.message}
    if error.field:
        body["field"] = error.field
    return {"error": body}


def answer(
    origin: OutputRecord | Rejected,
    *,
    agent: str,
    payload: dict[str, Any],
    sequence: int = 0,
    complete: bool = True,
    error_string: str = "",
    probe_time_ms: float | None = None,
    run: str = "",
) -> InputRecord:
    """An input record answering ``origin``: its identifying fields copied (``agent`` when
    it names none), in run ``run`` (a new one when empty)."""
    return InputRecord(
        response_to=origin.sys_id or "",
        topic=origin.topic,
        agent=origin.agent or agent,
        name=origin.name,
        source=origin.source,
        agent_correlator=origin.agent_correlator,
        priority=origin.priority,
        sequence=sequence,
        complete=complete,
        payload=payload,
        error_string=error_string,
        probe_time_ms=probe_time_ms,
        run=run or new_sys_id(),
    )


def error_input(
    origin: OutputRecord | Rejected,
    error: BridgeError,
    *,
    agent: str,
    sequence: int = 0,
    probe_time_ms: float | None = None,
) -> InputRecord:
    """The one complete input record that answers a job with an error."""
    return answer(
        origin,
        agent=agent,
        payload=error_payload(error),
        sequence=sequence,
        error_string=f"{error.kind}: {error}",
        probe_time_ms=probe_time_ms,
    )
