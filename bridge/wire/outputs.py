"""ECC output records on the wire: what the instance's connector and the relay both send.

An ``ecc_queue`` output row becomes the record a bridge takes (:func:`output_wire`), goes
to ``<prefix>/<agent>/output`` or, for priority 0 and control topics,
``.../output/interactive`` (:func:`output_topic`); encoded records travel bare when alone
and as a JSON array when several (:func:`encode_batch`, :func:`batches`), and a message
read back is a list of records either way (:func:`records_of`).
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import orjson

from bridge.wire.errors import BridgeError
from bridge.wire.records import parse_xml_parameters

HEARTBEAT = "HeartbeatProbe"
SYSTEM_COMMAND = "SystemCommand"
EXPRESS_TOPICS = frozenset({HEARTBEAT, SYSTEM_COMMAND})


def text_of(value: Any) -> str:
    """A row's field as text (None is "")."""
    if value is None:
        return ""
    return value if isinstance(value, str) else str(value)


def priority_of(value: Any) -> int:
    """A row's priority: 0, 1 or 2 (anything else is 2)."""
    try:
        number = int(value)
    except (TypeError, ValueError):
        return 2
    return number if number in (0, 1, 2) else 2


def is_express(record: Mapping[str, Any]) -> bool:
    """Priority 0 and control topics go to ``.../output/interactive``."""
    return priority_of(record.get("priority")) == 0 or record.get("topic") in EXPRESS_TOPICS


def output_topic(prefix: str, name: str, record: Mapping[str, Any]) -> str:
    base = f"{prefix}/{name}/output"
    return base + "/interactive" if is_express(record) else base


def wire_payload(payload: Any) -> Any:
    """A stored payload (text) as it goes on the wire: JSON object text becomes an object."""
    if isinstance(payload, dict):
        return payload
    text = text_of(payload)
    stripped = text.lstrip()
    if not stripped:
        return {}
    if stripped.startswith("{"):
        try:
            decoded = orjson.loads(text)
        except orjson.JSONDecodeError:
            return text  # the bridge answers it with a bad_record error
        return decoded if isinstance(decoded, dict) else text
    return text


def parameters(payload: Any) -> dict[str, Any]:
    """The job's parameters (JSON object or XML ``<parameters>``); {} if unreadable."""
    value = wire_payload(payload)
    if isinstance(value, dict):
        return value
    if isinstance(value, str) and value.lstrip().startswith("<"):
        try:
            return parse_xml_parameters(value)
        except BridgeError:
            return {}
    return {}


def output_wire(row: Mapping[str, Any]) -> dict[str, Any]:
    """An ``ecc_queue`` output row as the bridge takes it (docs/wire-contract.md)."""
    return {
        "sys_id": row["sys_id"],
        "agent": text_of(row.get("agent")),
        "topic": text_of(row.get("topic")),
        "name": text_of(row.get("name")),
        "source": text_of(row.get("source")),
        "queue": "output",
        "state": text_of(row.get("state")) or "ready",
        "response_to": text_of(row.get("response_to")),
        "agent_correlator": text_of(row.get("agent_correlator")),
        "priority": priority_of(row.get("priority")),
        "error_string": text_of(row.get("error_string")),
        "payload": wire_payload(row.get("payload")),
        "sys_created_on": text_of(row.get("sys_created_on")),
        # Only if the table has them (ecc_queue does not yet): passed on as they are.
        **{k: row[k] for k in ("timeout", "expires_at") if row.get(k) not in (None, "")},
    }


def encode_batch(bodies: Sequence[bytes]) -> bytes:
    """Encoded records as one message: a single one bare, several as a JSON array."""
    return bodies[0] if len(bodies) == 1 else b"[" + b",".join(bodies) + b"]"


def batches(bodies: Iterable[bytes], max_records: int, max_bytes: int) -> Iterable[bytes]:
    """Encoded records joined into messages within both limits (:func:`encode_batch`)."""
    group: list[bytes] = []
    size = 2
    for body in bodies:
        if group and (len(group) >= max_records or size + len(body) + 1 > max_bytes):
            yield encode_batch(group)
            group, size = [], 2
        group.append(body)
        size += len(body) + 1
    if group:
        yield encode_batch(group)


def records_of(data: Any) -> list[Any]:
    """A decoded message's records: an array's items, or the one bare record."""
    return data if isinstance(data, list) else [data]
