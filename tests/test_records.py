"""The record decoder and input record shape."""

from __future__ import annotations

import orjson
import pytest

from bridge.wire.errors import BadRecord
from bridge.wire.records import (
    OutputRecord,
    Rejected,
    decode_outputs,
    error_input,
    parse_xml_parameters,
)


def decode_one(data: bytes) -> OutputRecord | Rejected:
    [item] = decode_outputs(data, max_bytes=65_536, max_batch=100)
    return item


def good(**over: object) -> dict[str, object]:
    record: dict[str, object] = {
        "sys_id": "abc123",
        "agent": "mid.server.t",
        "topic": "Shazzam",
        "name": "sweep",
        "source": "10.0.0.0/30",
        "queue": "output",
        "state": "ready",
        "priority": 1,
        "payload": {"targets": "10.0.0.0/30"},
        "sys_created_on": "2026-11-27 10:00:00",
    }
    record.update(over)
    return record


def test_good_record_decodes() -> None:
    item = decode_one(orjson.dumps(good()))
    assert isinstance(item, OutputRecord)
    assert item.sys_id == "abc123"
    assert item.priority == 1
    assert item.payload == {"targets": "10.0.0.0/30"}
    assert item.payload_format == "json"


def test_batch_decodes_each_record() -> None:
    items = decode_outputs(
        orjson.dumps([good(sys_id="a"), good(sys_id="b"), {"sys_id": "c"}]),
        max_bytes=65_536,
        max_batch=10,
    )
    assert [type(i).__name__ for i in items] == ["OutputRecord", "OutputRecord", "Rejected"]
    bad = items[2]
    assert isinstance(bad, Rejected)
    assert bad.sys_id == "c"
    assert bad.error.field == "topic"


def test_xml_parameters_are_accepted() -> None:
    xml = (
        '<parameters><parameter name="targets" value="10.0.0.1"/>'
        '<parameter name="ports" value="22,80"/></parameters>'
    )
    item = decode_one(orjson.dumps(good(payload=xml)))
    assert isinstance(item, OutputRecord)
    assert item.payload == {"targets": "10.0.0.1", "ports": "22,80"}
    assert item.payload_format == "xml"


@pytest.mark.parametrize(
    ("data", "field", "words"),
    [
        (b"{not json", None, "malformed JSON"),
        (orjson.dumps(good(sys_id=None) | {"sys_id": None}), "sys_id", "missing"),
        (orjson.dumps({k: v for k, v in good().items() if k != "sys_id"}), "sys_id", "missing"),
        (orjson.dumps(good(sys_id="bad id with spaces")), "sys_id", "characters"),
        (orjson.dumps(good(topic=7)), "topic", "non-empty string"),
        (orjson.dumps(good(priority=5)), "priority", "0, 1 or 2"),
        (orjson.dumps(good(priority=True)), "priority", "0, 1 or 2"),
        (orjson.dumps(good(queue="input")), "queue", "output"),
        (orjson.dumps(good(name=["x"])), "name", "string"),
        (orjson.dumps(good(payload=[1, 2])), "payload", "JSON object"),
        (orjson.dumps(good(payload="<parameters><x/></parameters>")), "payload", "<x>"),
        (orjson.dumps(good(payload="<parameters>")), "payload", "do not parse"),
        (orjson.dumps(good(timeout=-1)), "timeout", "between"),
        (orjson.dumps(good(timeout="soon")), "timeout", "number"),
        (orjson.dumps([]), None, "empty batch"),
        (orjson.dumps(42), None, "JSON object"),
    ],
)
def test_bad_records_name_the_fault(data: bytes, field: str | None, words: str) -> None:
    item = decode_one(data)
    assert isinstance(item, Rejected)
    assert item.error.field == field
    assert words in str(item.error)


def test_sys_id_kept_when_readable_so_the_error_answers_it() -> None:
    item = decode_one(orjson.dumps(good(priority="high")))
    assert isinstance(item, Rejected)
    assert item.sys_id == "abc123"
    rec = error_input(item, item.error, agent="mid.server.t").to_wire()
    assert rec["response_to"] == "abc123"
    assert rec["complete"] is True
    assert rec["queue"] == "input"
    assert rec["error_string"].startswith("bad_record: priority:")
    assert rec["payload"]["error"]["field"] == "priority"


def test_size_limit_applies_before_parsing() -> None:
    items = decode_outputs(b"[" + b"1," * 10_000 + b"1]", max_bytes=1000, max_batch=10)
    assert len(items) == 1
    assert isinstance(items[0], Rejected)
    assert "over the limit" in str(items[0].error)


def test_batch_limit() -> None:
    items = decode_outputs(
        orjson.dumps([good(sys_id=str(i)) for i in range(11)]), max_bytes=1 << 20, max_batch=10
    )
    assert len(items) == 1
    assert isinstance(items[0], Rejected)


def test_xml_entities_refused() -> None:
    with pytest.raises(BadRecord, match="DTD"):
        parse_xml_parameters('<!DOCTYPE x [<!ENTITY a "b">]><parameters/>')
