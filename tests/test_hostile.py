"""Hostile input: the record decoder and every probe's parameter parser, fuzzed; a flood.

- ``decode_outputs`` gets random and broken bytes, runaway nesting, odd number tokens,
  surrogate escapes, big batches and records with fields of every wrong type. It never
  raises: it returns records or ``Rejected`` items whose error says what is wrong, and a
  body over the size limit is refused before it is parsed.
- Every probe in ``probes.REGISTRY`` gets random parameters and mutations of a valid set,
  through the record decoder as the bridge reads them. ``build_params`` returns the probe's
  parameters or raises a ``BridgeError`` (a ``BadParameter`` names its field): any other
  exception is a bug, since the bridge would answer nothing.
- Through a real Mosquitto, a bridge child process gets 10,000 bad records interleaved with
  100 good Echo jobs: every good job completes, every bad record is answered once with an
  error naming its fault, memory stays bounded, and the bridge is still up, without a
  traceback in its log.
"""

from __future__ import annotations

import asyncio
import os
import random
import re
import time
from collections import Counter
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from types import SimpleNamespace
from typing import Any, cast

import orjson
import pytest
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from bridge import records as records_module
from bridge.client import EccClient, output_record
from bridge.config import Config
from bridge.core import Bridge
from bridge.errors import BadParameter, BadRecord, BridgeError
from bridge.jobs import ProbeSpec
from bridge.records import (
    MAX_TEXT_FIELD,
    PRIORITIES,
    OutputRecord,
    Rejected,
    decode_outputs,
    error_input,
    record_from_dict,
)
from probes import REGISTRY
from tests.brokers import MosquittoServer
from tests.harness import BridgeProcess, make_config
from tests.hostile_strategies import (
    dumps,
    hostile_text,
    json_values,
    junk_keys,
    mutated_records,
    nested_json,
    raw_bodies,
    valid_record,
    xml_parameters,
)
from tests.test_durability import PeakRss

MAX_BYTES = 65_536
MAX_BATCH = 1_000
SYS_ID = re.compile(r"^[A-Za-z0-9_.:\-]{1,64}$")
AGENT = "mid.server.hostile"
# An error message is read by people: it may quote a bad value, never all of a huge one.
MAX_MESSAGE_CHARS = int(os.environ.get("HOSTILE_MAX_MESSAGE", "2000"))

# Long hostile strings make long example reprs; hypothesis warns, the warning is not a fault.
pytestmark = pytest.mark.filterwarnings("ignore:Generating overly large repr")

FUZZ = settings(
    max_examples=int(os.environ.get("HOSTILE_EXAMPLES", "200")),
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)


# --- checks -----------------------------------------------------------------------------


def check_error(error: BridgeError) -> None:
    """A readable error: a kind, a non-empty bounded message, and it can go on the wire."""
    assert isinstance(error, BridgeError), type(error)
    assert error.kind and error.kind != "error", error
    assert isinstance(error.message, str) and error.message.strip(), repr(error)
    assert len(error.message) <= MAX_MESSAGE_CHARS, (error.field, error.message[:200])


def check_answer(origin: OutputRecord | Rejected, error: BridgeError) -> dict[str, Any]:
    """The error input record the bridge would send, checked and encoded."""
    wire = error_input(origin, error, agent=AGENT).to_wire()
    assert orjson.loads(orjson.dumps(wire)) == wire  # encodes, and survives the round trip
    assert wire["complete"] is True and wire["result_code"] == 1
    assert wire["error_string"].startswith(f"{error.kind}: ")
    assert wire["payload"]["error"]["message"] == error.message
    assert wire["response_to"] == (origin.sys_id or "")
    return wire


def check_output(item: OutputRecord) -> None:
    """A decoded record keeps every promise of the wire contract."""
    assert SYS_ID.match(item.sys_id)
    assert isinstance(item.topic, str) and 0 < len(item.topic) <= 128
    assert item.priority in PRIORITIES and type(item.priority) is int
    assert isinstance(item.payload, dict)
    assert all(isinstance(key, str) for key in item.payload)
    for text in (item.agent, item.name, item.source, item.agent_correlator, item.sys_created_on):
        assert isinstance(text, str) and len(text) <= MAX_TEXT_FIELD
    if item.timeout is not None:
        assert 0 < item.timeout <= 86_400
    if item.expires_at is not None:
        assert item.expires_at == item.expires_at and abs(item.expires_at) != float("inf")
    assert isinstance(item.credentials, tuple) and len(item.credentials) <= 32


def check_decoded(
    body: bytes, *, max_bytes: int = MAX_BYTES, max_batch: int = MAX_BATCH
) -> list[OutputRecord | Rejected]:
    """``decode_outputs`` on ``body``: never raises; what comes back is well formed."""
    items = decode_outputs(body, max_bytes=max_bytes, max_batch=max_batch)
    assert isinstance(items, list) and items
    for item in items:
        assert isinstance(item, OutputRecord | Rejected), type(item)
        if isinstance(item, Rejected):
            assert isinstance(item.error, BadRecord), item.error
            check_error(item.error)
            assert item.sys_id is None or SYS_ID.match(item.sys_id)
            assert item.priority in PRIORITIES
            check_answer(item, item.error)
        else:
            check_output(item)
    if len(body) > max_bytes:
        [item] = items
        assert isinstance(item, Rejected)
        assert "over the limit" in item.error.message
    return items


# --- the record decoder -----------------------------------------------------------------


@FUZZ
@given(raw_bodies)
@example(b"")
@example(b"\xff\xfe\x00")
@example(b"[]")
@example(b"{}")
@example(b"null")
@example(b'"\\ud800"')
@example(b"[" * 2_000 + b"]" * 2_000)
@example(b'{"sys_id": "a", "topic": "Echo", "payload": "<parameters>' + b"<x>" * 5_000 + b'"}')
def test_decoder_never_raises(body: bytes) -> None:
    check_decoded(body)


@FUZZ
@given(st.lists(mutated_records(), min_size=1, max_size=20))
def test_batch_of_mutated_records_answers_each_record(batch: list[dict[str, Any]]) -> None:
    body = dumps(batch)
    items = check_decoded(body)
    if len(body) > MAX_BYTES:
        return  # refused whole, unread (check_decoded saw to that)
    assert len(items) == len(batch)  # one answer per record: a bad one spoils no other
    for raw, item in zip(batch, items, strict=True):
        if isinstance(item, OutputRecord):
            assert item.sys_id == raw["sys_id"]
        elif isinstance(raw.get("sys_id"), str) and SYS_ID.match(raw["sys_id"]):
            assert item.sys_id == raw["sys_id"]  # the error answers the job that sent it


@FUZZ
@given(st.sampled_from(sorted(valid_record())), json_values)
def test_every_field_of_every_wrong_type(field: str, value: Any) -> None:
    check_decoded(dumps(valid_record(**{field: value})))


@FUZZ
@given(nested_json)
def test_deep_nesting_is_refused_not_recursed(body: bytes) -> None:
    check_decoded(body, max_bytes=1_000_000)


@FUZZ
@given(st.binary(min_size=1, max_size=64), st.integers(1, 4_096))
def test_oversize_body_is_refused(unit: bytes, over: int) -> None:
    body = (unit * (MAX_BYTES // len(unit) + over))[: MAX_BYTES + over]
    [item] = check_decoded(body)
    assert isinstance(item, Rejected)
    assert f"over the limit of {MAX_BYTES}" in item.error.message


def test_size_limit_applies_before_parsing(monkeypatch: pytest.MonkeyPatch) -> None:
    """Over the limit, the parser is never called; at the limit, it is."""
    calls: list[int] = []
    real_loads = orjson.loads

    def counting_loads(data: bytes | str) -> Any:
        calls.append(len(data))
        return real_loads(data)

    monkeypatch.setattr(
        records_module,
        "orjson",
        SimpleNamespace(loads=counting_loads, JSONDecodeError=orjson.JSONDecodeError),
    )
    record = dumps(valid_record(payload={"pad": ""}))
    pad = MAX_BYTES - len(record)
    at_limit = record.replace(b'"pad":""', b'"pad":"' + b"x" * pad + b'"')
    assert len(at_limit) == MAX_BYTES
    [item] = decode_outputs(at_limit, max_bytes=MAX_BYTES, max_batch=MAX_BATCH)
    assert isinstance(item, OutputRecord)
    assert calls == [MAX_BYTES]
    calls.clear()
    # One byte over, and a body that would be costly to parse: neither reaches the parser.
    for body in (at_limit + b" ", b"[" * (4 * MAX_BYTES)):
        [item] = decode_outputs(body, max_bytes=MAX_BYTES, max_batch=MAX_BATCH)
        assert isinstance(item, Rejected)
        assert item.error.message == (
            f"message of {len(body)} bytes is over the limit of {MAX_BYTES}"
        )
    assert calls == []


def test_batch_over_the_limit_is_one_rejection() -> None:
    [item] = check_decoded(dumps([valid_record()] * (MAX_BATCH + 1)), max_bytes=10**8)
    assert isinstance(item, Rejected)
    assert f"batch of {MAX_BATCH + 1} records is over the limit" in item.error.message


# --- every probe's parameter parser ------------------------------------------------------

TOPICS = sorted(REGISTRY)

# The least a job of each topic needs. A new probe whose empty payload is not valid makes
# test_minimal_payload_is_valid fail until it gets a line here.
MINIMAL: dict[str, dict[str, Any]] = {
    "Echo": {},
    "HeartbeatProbe": {},
    "SystemCommand": {"command": "stats"},
    "Shazzam": {"targets": "127.0.0.1"},
    "SSHCommand": {"host": "127.0.0.1", "command": "id"},
    "SNMP": {"host": "127.0.0.1", "oid_spec_list": "get 1.3.6.1.2.1.1.1.0"},
    "RESTProbe": {"url": "http://127.0.0.1/"},
}


def bridge_settings(topic: str) -> dict[str, Any]:
    """What ``Bridge`` passes to ``build_params`` under the default configuration."""
    return Bridge._settings(cast(Bridge, SimpleNamespace(config=Config())), topic)


def param_keys(spec: ProbeSpec) -> list[str]:
    """The names a probe's parameter model knows (aliases too)."""
    keys: set[str] = set()
    for name, info in spec.params.model_fields.items():
        keys.add(name)
        if info.alias:
            keys.add(info.alias)
    return sorted(keys)


def to_xml_value(value: Any) -> str:
    """How an XML parameter would carry ``value``: text, JSON for the rest."""
    return value if isinstance(value, str) else orjson.dumps(value).decode()


@dataclass(frozen=True)
class Outcome:
    params: Any | None = None
    error: BridgeError | None = None


def build(topic: str, record: dict[str, Any]) -> Outcome:
    """Decode ``record`` as the bridge does, then build the probe's parameters."""
    spec = REGISTRY[topic]
    item = record_from_dict(record)
    if isinstance(item, Rejected):
        check_error(item.error)
        check_answer(item, item.error)
        return Outcome(error=item.error)
    check_output(item)
    try:
        params = spec.build_params(item, bridge_settings(topic))
    except BridgeError as exc:
        check_error(exc)
        assert exc.kind in ("bad_parameter", "refused"), (type(exc).__name__, exc)
        if isinstance(exc, BadParameter):
            assert exc.field, f"BadParameter without a field: {exc.message!r}"
        check_answer(item, exc)
        return Outcome(error=exc)
    assert isinstance(params, spec.params), type(params)
    host = spec.target_host(params)  # the scheduler calls it next; it may not raise either
    assert host is None or isinstance(host, str)
    return Outcome(params=params)


def job_record(topic: str, payload: dict[str, Any], form: str, **fields: Any) -> dict[str, Any]:
    """A record carrying ``payload`` as a JSON object, JSON text or XML parameters."""
    wire: Any = payload
    if form == "xml":
        wire = xml_parameters({str(k): to_xml_value(v) for k, v in payload.items()})
    elif form == "json-text":
        wire = orjson.dumps(payload).decode()
    return valid_record(topic, payload=wire, **fields)


payload_forms = st.sampled_from(("json", "json", "xml", "json-text"))
record_texts = st.fixed_dictionaries(
    {}, optional={"name": hostile_text, "source": hostile_text}
)


@pytest.mark.parametrize("topic", TOPICS)
def test_minimal_payload_is_valid(topic: str) -> None:
    for form in ("json", "xml", "json-text"):
        outcome = build(topic, job_record(topic, MINIMAL.get(topic, {}), form))
        assert outcome.error is None, (
            f"{topic}: MINIMAL[{topic!r}] does not build ({outcome.error}); "
            "give it the least payload a job of this topic needs"
        )


@pytest.mark.parametrize("topic", TOPICS)
@FUZZ
@given(data=st.data())
def test_probe_params_random_payloads(topic: str, data: st.DataObject) -> None:
    keys = st.one_of(st.sampled_from(param_keys(REGISTRY[topic]) or ["x"]), junk_keys)
    payload = data.draw(st.dictionaries(keys, json_values, max_size=6), label="payload")
    form = data.draw(payload_forms, label="form")
    texts = data.draw(record_texts, label="name/source")
    build(topic, job_record(topic, payload, form, **texts))


@pytest.mark.parametrize("topic", TOPICS)
@FUZZ
@given(data=st.data())
def test_probe_params_mutated_valid_payloads(topic: str, data: st.DataObject) -> None:
    payload = dict(MINIMAL.get(topic, {}))
    known = param_keys(REGISTRY[topic]) or ["x"]
    for _ in range(data.draw(st.integers(1, 3), label="mutations")):
        key = data.draw(st.one_of(st.sampled_from(known), junk_keys), label="key")
        if key in payload and data.draw(st.booleans(), label="delete"):
            del payload[key]
        else:
            payload[key] = data.draw(json_values, label=f"value of {key}")
    form = data.draw(payload_forms, label="form")
    texts = data.draw(record_texts, label="name/source")
    build(topic, job_record(topic, payload, form, **texts))


@pytest.mark.parametrize("topic", TOPICS)
@FUZZ
@given(data=st.data())
def test_probe_records_with_mutated_fields(topic: str, data: st.DataObject) -> None:
    """Whole records of the topic with any field broken: decoded, then parameters built."""
    base = job_record(topic, MINIMAL.get(topic, {}), "json")
    build(topic, data.draw(mutated_records(base), label="record"))
