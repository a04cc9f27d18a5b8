"""Hypothesis strategies for hostile input: message bodies, records and probe parameters.

Everything here produces what could arrive on the wire. JSON values are those ``orjson``
can decode (no NaN or infinity, integers within 64 bits, no lone surrogates); raw bodies go
further (random and broken bytes, surrogate escapes, runaway nesting) since the decoder
sees those too.
"""

from __future__ import annotations

from typing import Any
from xml.sax.saxutils import quoteattr

import orjson
from hypothesis import strategies as st

# --- scalars and texts ------------------------------------------------------------------

# Text as JSON can carry it: any code point but the lone surrogates orjson refuses.
any_text = st.text(st.characters(exclude_categories=["Cs"]), max_size=40)

# Values that parsers of addresses, ports, OIDs, URLs and numbers trip over.
TRICKY_TEXTS: tuple[str, ...] = (
    "",
    " ",
    "\t\n\r",
    "\x00",
    "a\x00b",
    "\u200b",
    "\ufeff",
    "\U0001f4a5",
    "é",
    "ß" * 3,
    "0",
    "-1",
    "+1",
    "1e308",
    "1e999",
    "-0",
    "0x10",
    "1_000",
    "NaN",
    "nan",
    "Infinity",
    "-inf",
    "true",
    "null",
    "None",
    "١٢٣",  # Arabic-Indic digits: isdigit() is true, int() works
    "²",  # superscript two: isdigit() is true, int() fails
    "½",
    "9" * 30,
    "-" + "9" * 30,
    "18446744073709551616",
    "127.0.0.1",
    "::1",
    "[::1]",
    "fe80::1%eth0",
    "10.0.0.0/8",
    "0.0.0.0/0",
    "::/0",
    "10.0.0.1-10.0.0.0",
    "10.0.0.1-999",
    "10.0.0.1-²",
    "10.0.0.1-::1",
    "1.2.3.4/33",
    "256.1.1.1",
    "localhost",
    "a" * 254,
    "-host-",
    "host..name",
    "22,80,443",
    "1-65535",
    "0-0",
    "70000",
    "65535-1",
    "http://127.0.0.1/",
    "https://[::1]:8443/x?y=1#z",
    "http://user:pw@127.0.0.1/",
    "http://",
    "http://:80/",
    "http://exa mple.com/",
    "http://xn--/",
    "http://" + "a" * 300 + ".com/",
    "http://\u2603.com/",
    "ftp://127.0.0.1/",
    "javascript:alert(1)",
    "//127.0.0.1/",
    "get 1.3.6.1.2.1.1.1.0",
    "walk 1.3.6.1.2.1.1",
    "walk 1.3.6.1 1.3.6.2",
    "table ifTable 1,2,3",
    "table ifTable ²",
    "table ifTable 99999999999999999999",
    "get sysName.0",
    "get noSuchName.0",
    "get 1.3.6.1." + ".".join(["4294967296"] * 3),
    "get " + " ".join(["1.3.6.1"] * 70),
    "get .1.3.6",
    "get 1..3",
    "bulkwalk 1.3;get 1.3.6;# c",
    ";;;",
    "\n".join(["get 1.3.6.1.2.1.1.1.0"] * 300),
    "pause",
    "resume",
    "drain",
    "cancel",
    "stats",
    "validate",
    "invalidate",
    "STATS",
    "0" * 64,
    "f" * 64,
    "GET",
    "get",
    "TRACE",
    "v2c",
    "3",
    "v4",
    "accept-new",
    "strict",
    "{",
    "[",
    "{}",
    "[]",
    '{"a": [1, 2, {"b": null}]}',
    '[["a", "b"], ["c"]]',
    "[1, 2",
    '{"Authorization": "x"}',
    '{"X-Bad\\r\\nInjected": "1"}',
    '{"X-Ok": "a\\r\\nb"}',
    "<parameters/>",
    '<parameters><parameter name="a" value="b"/></parameters>',
    "<parameters><parameter",
    '<!DOCTYPE x [<!ENTITY e "e">]><parameters/>',
    "<?xml version='1.0'?><parameters/>",
    "<x:parameters xmlns:x='urn:x'/>",
    "&amp;&lt;&#0;&#xD800;",
    "]]>",
    "%s%n%x",
    "${jndi:ldap://x}",
    "'; DROP TABLE ecc_queue; --",
    "../../../../etc/passwd",
    "/dev/zero",
)

LONG_TEXTS: tuple[str, ...] = (
    "x" * 65_537,
    "1," * 50_000,
    "127.0.0.1 " * 20_000,
    "9" * 5_000,
    "<a>" * 10_000,
    "[" * 5_000,
)

tricky_text = st.sampled_from(TRICKY_TEXTS)
long_text = st.sampled_from(LONG_TEXTS)
# Mostly short: a long text costs time on every example, and one per field is enough.
hostile_text = st.one_of(any_text, any_text, tricky_text, tricky_text, tricky_text, long_text)

INT64_MIN = -(2**63)
UINT64_MAX = 2**64 - 1
EDGE_INTS: tuple[int, ...] = (
    *(0, 1, -1, 2, 22, 161, 255, 256, 65_535, 65_536, 86_400, 86_401),
    *(2**31, 2**32, 2**53 + 1, INT64_MIN, 2**63 - 1, UINT64_MAX),
)
edge_ints = st.sampled_from(EDGE_INTS)
json_ints = st.one_of(st.integers(INT64_MIN, UINT64_MAX), edge_ints)
json_floats = st.one_of(
    st.floats(allow_nan=False, allow_infinity=False),
    st.sampled_from((0.0, -0.0, 1e-320, 0.5, 1e308, -1e308, 3600.0001, 86_400.5)),
)
json_scalars = st.one_of(st.none(), st.booleans(), json_ints, json_floats, hostile_text)
json_values: st.SearchStrategy[Any] = st.recursive(
    json_scalars,
    lambda inner: st.one_of(
        st.lists(inner, max_size=5), st.dictionaries(any_text, inner, max_size=5)
    ),
    max_leaves=12,
)
# Keys a parameter model might know, and ones it cannot.
junk_keys = st.one_of(any_text, st.sampled_from(("", " ", "__class__", "model_config", "json")))

# --- records ------------------------------------------------------------------------------

RECORD_FIELDS: tuple[str, ...] = (
    "sys_id",
    "topic",
    "agent",
    "name",
    "source",
    "queue",
    "state",
    "priority",
    "agent_correlator",
    "payload",
    "sys_created_on",
    "timeout",
    "expires_at",
    "credentials",
    "error_string",
    "response_to",
)


def valid_record(topic: str = "Echo", **over: Any) -> dict[str, Any]:
    record: dict[str, Any] = {
        "sys_id": "9f2c6a1e0b4d4f7e8a1b2c3d4e5f6071",
        "agent": "mid.server.hostile",
        "topic": topic,
        "name": "n",
        "source": "127.0.0.1",
        "queue": "output",
        "state": "ready",
        "response_to": "",
        "agent_correlator": "run-1",
        "priority": 2,
        "error_string": "",
        "payload": {},
        "sys_created_on": "2026-11-27 13:04:05",
        "timeout": 60,
    }
    record.update(over)
    return record


@st.composite
def mutated_records(draw: st.DrawFn, base: dict[str, Any] | None = None) -> dict[str, Any]:
    """A valid record with one to four fields replaced by anything, or removed."""
    record = dict(base if base is not None else valid_record())
    for _ in range(draw(st.integers(1, 4))):
        key = draw(st.one_of(st.sampled_from(RECORD_FIELDS), junk_keys))
        if draw(st.booleans()) and key in record:
            del record[key]
        else:
            record[key] = draw(json_values)
    return record


def xml_parameters(params: dict[str, str]) -> str:
    """``{"a": "b"}`` → ``<parameters><parameter name="a" value="b"/></parameters>``."""
    body = "".join(
        f"<parameter name={quoteattr(name)} value={quoteattr(value)}/>"
        for name, value in params.items()
    )
    return f"<parameters>{body}</parameters>"


# --- raw message bodies ------------------------------------------------------------------


def dumps(value: Any) -> bytes:
    return orjson.dumps(value)


@st.composite
def near_json(draw: st.DrawFn) -> bytes:
    """Valid record JSON, then truncated, spliced, or with bytes flipped or inserted."""
    source = draw(st.one_of(mutated_records(), st.lists(mutated_records(), max_size=3)))
    data = bytearray(dumps(source))
    for _ in range(draw(st.integers(1, 4))):
        op = draw(st.sampled_from(("truncate", "flip", "insert", "delete", "splice")))
        if not data:
            break
        at = draw(st.integers(0, len(data) - 1))
        if op == "truncate":
            del data[at:]
        elif op == "flip":
            data[at] = draw(st.integers(0, 255))
        elif op == "insert":
            data[at:at] = draw(
                st.sampled_from(
                    (b"\x00", b"\xff", b"\xc3", b"\\ud800", b"NaN", b"Infinity", b",", b"}", b"]")
                )
                | st.binary(max_size=8)
            )
        elif op == "delete":
            del data[at : at + draw(st.integers(1, 8))]
        else:
            data[at:at] = data[: draw(st.integers(0, len(data)))]
    return bytes(data)


def _nested(depth: int, kind: str) -> bytes:
    if kind == "array":
        return b"[" * depth + b"]" * depth
    if kind == "object":
        return b'{"a":' * depth + b"1" + b"}" * depth
    inner = b'{"a":' * depth + b"{}" + b"}" * depth
    return dumps(valid_record())[:-1] + b',"payload":' + inner + b"}"


nested_json = st.builds(
    _nested, st.integers(100, 20_000), st.sampled_from(("array", "object", "payload"))
)

NUMBER_TOKENS: tuple[bytes, ...] = (
    b"NaN",
    b"-NaN",
    b"Infinity",
    b"-Infinity",
    b"inf",
    b"1e999",
    b"-1e999",
    b"1e-999",
    b"123456789012345678901234567890",
    b"-9223372036854775809",
    b"18446744073709551616",
    b"0x10",
    b"01",
    b"1.",
    b".5",
    b"+1",
    b"1e",
    b"-",
    b"9" * 400,
)


@st.composite
def number_token_records(draw: st.DrawFn) -> bytes:
    """A record with a numeric field written as a token JSON allows, or ought not to."""
    field = draw(st.sampled_from(("priority", "timeout", "expires_at", "payload", "sys_id")))
    token = draw(st.sampled_from(NUMBER_TOKENS))
    record = valid_record()
    record[field] = "@@"
    return dumps(record).replace(b'"@@"', token)


@st.composite
def string_escape_records(draw: st.DrawFn) -> bytes:
    """A record whose text fields hold raw escapes: lone surrogates, NUL, overlong UTF-8."""
    field = draw(st.sampled_from(("sys_id", "topic", "name", "source", "agent", "payload")))
    escape = draw(
        st.sampled_from(
            (
                b"\\ud800",
                b"\\udfff",
                b"\\ud83d\\ude00",
                b"\\ud83d",
                b"\\u0000",
                b"\\uZZZZ",
                b"\\x41",
                b"\xc0\xaf",
                b"\xed\xa0\x80",
                b"\xf4\x90\x80\x80",
                b"\xef\xbb\xbf",
            )
        )
    )
    record = valid_record()
    record[field] = "@@"
    return dumps(record).replace(b"@@", escape)


def big_batch(size: int, item: Any) -> bytes:
    return dumps([item] * size)


raw_bodies = st.one_of(
    st.binary(max_size=256),
    near_json(),
    nested_json,
    number_token_records(),
    string_escape_records(),
    st.builds(dumps, json_values),
    st.builds(dumps, mutated_records()),
    st.builds(dumps, st.lists(st.one_of(mutated_records(), json_values), max_size=8)),
    st.builds(
        big_batch,
        st.integers(0, 1_500),
        st.one_of(st.just(valid_record()), json_scalars, mutated_records()),
    ),
)
