"""Sweep target and port parsing, and the Shazzam parameter errors built on them."""

from __future__ import annotations

import ipaddress
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from bridge.wire.errors import BadParameter, Refused
from bridge.wire.records import OutputRecord
from bridge.wire.targets import parse_ports, parse_targets
from probes.shazzam.params import DEFAULT_PORTS, build_params
from probes.shazzam.settings import ShazzamSettings

VALID_TARGETS: list[tuple[Any, tuple[str, ...], int]] = [
    ("10.0.0.1", ("10.0.0.1",), 1),
    ("10.0.0.0/30", ("10.0.0.1-10.0.0.2",), 2),
    ("10.0.0.0/31", ("10.0.0.0-10.0.0.1",), 2),
    ("10.0.0.9/32", ("10.0.0.9",), 1),
    ("10.0.0.7/24", ("10.0.0.1-10.0.0.254",), 254),
    ("10.0.0.1-20", ("10.0.0.1-10.0.0.20",), 20),
    ("10.0.0.1-10.0.1.5", ("10.0.0.1-10.0.1.5",), 261),
    ("10.0.0.1, 10.0.0.2 10.0.0.3", ("10.0.0.1-10.0.0.3",), 3),
    (["10.0.0.5", "10.0.0.1-10"], ("10.0.0.1-10.0.0.10",), 10),
    ("10.0.0.1,10.0.0.1,\n10.0.0.1", ("10.0.0.1",), 1),
    ("10.0.0.9 10.0.0.1", ("10.0.0.1", "10.0.0.9"), 2),
    ("::1", ("::1",), 1),
    ("2001:db8::1-ff", ("2001:db8::1-2001:db8::ff",), 255),
    ("2001:db8::1-2001:db8::1:0", ("2001:db8::1-2001:db8::1:0",), 65536),
    ("2001:db8::/126", ("2001:db8::1-2001:db8::3",), 3),
    ("::1 127.0.0.1", ("127.0.0.1", "::1"), 2),
    ("10.0.0.0/8", ("10.0.0.1-10.255.255.254",), 2**24 - 2),
]


@pytest.mark.parametrize(("value", "texts", "count"), VALID_TARGETS)
def test_valid_targets(value: Any, texts: tuple[str, ...], count: int) -> None:
    parsed = parse_targets(value)
    assert parsed.texts() == texts
    assert parsed.count == count
    # The canonical form parses back to itself.
    assert parse_targets(list(texts)).texts() == texts


@pytest.mark.parametrize("network", ["192.168.4.0/29", "10.1.0.0/30", "2001:db8::/125"])
def test_networks_sweep_what_ipaddress_hosts_gives(network: str) -> None:
    expected = [str(a) for a in ipaddress.ip_network(network).hosts()]
    assert [text for _v, text in parse_targets(network).addresses()] == expected


INVALID_TARGETS: list[tuple[Any, str]] = [
    ("", "no targets"),
    (" , ", "no targets"),
    ("example.com", "host names"),
    ("10.0.0.300", "not an IP address"),
    ("10.0.0.0/33", "not a CIDR network"),
    ("10.0.0.20-10.0.0.1", "ends before it starts"),
    ("10.0.0.1-300", "over 255"),
    ("10.0.0.1-1000", "over 255"),
    ("10.0.0.1-::1", "cannot mix IPv4 and IPv6"),
    ("10.0.0.1-", "not an IP address"),
    ("-10.0.0.1", "not an IP address"),
    ("fe80::1%eth0", "zone ids"),
    ("fe80::/64%eth0", "zone ids"),
    (42, "must be text"),
    ([1, 2], "list items must be strings"),
    ("1" * 200, "too long"),
]


@pytest.mark.parametrize(("value", "message"), INVALID_TARGETS)
def test_invalid_targets(value: Any, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        parse_targets(value)


VALID_PORTS: list[tuple[Any, tuple[int, ...]]] = [
    ([22, 80], (22, 80)),
    ([80, 22, 80], (22, 80)),
    ("22,80,8000-8002", (22, 80, 8000, 8001, 8002)),
    ("443 22 22", (22, 443)),
    (["22", "80-81"], (22, 80, 81)),
    ([22, "23-24"], (22, 23, 24)),
    (8080, (8080,)),
    ("1", (1,)),
    ("65535", (65535,)),
]


@pytest.mark.parametrize(("value", "ports"), VALID_PORTS)
def test_valid_ports(value: Any, ports: tuple[int, ...]) -> None:
    assert parse_ports(value) == ports


def test_full_port_range() -> None:
    assert parse_ports("1-65535") == tuple(range(1, 65536))


INVALID_PORTS: list[tuple[Any, str]] = [
    (0, "out of range"),
    ([0], "out of range"),
    (70000, "out of range"),
    ("70000", "out of range"),
    ([22, 65536], "out of range"),
    ("1-70000", "out of range"),
    ("abc", "not a port number"),
    ("22,x", "not a port number"),
    ("²", "not a port number"),
    ("-5", "not a port number"),
    ("", "no ports"),
    ([], "no ports"),
    ("80-22", "ends before it starts"),
    ([True], "boolean"),
    ([22.5], "must be integers"),
    (22.5, "must be text"),
    ({"a": 1}, "must be text"),
]


@pytest.mark.parametrize(("value", "message"), INVALID_PORTS)
def test_invalid_ports(value: Any, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        parse_ports(value)


# --- the same faults through build_params: BadParameter naming the field -------------------


def record(payload: dict[str, Any], source: str = "") -> OutputRecord:
    return OutputRecord(sys_id="s1", topic="Shazzam", source=source, payload=payload)


SETTINGS = ShazzamSettings()

BAD_PARAMETERS: list[tuple[dict[str, Any], str, str]] = [
    ({"targets": "example.com"}, "targets", "host names"),
    ({"targets": ""}, "targets", "no targets"),
    ({"targets": 7}, "targets", "must be text"),
    ({"targets": "10.0.0.1", "ports": 0}, "ports", "out of range"),
    ({"targets": "10.0.0.1", "ports": "70000"}, "ports", "out of range"),
    ({"targets": "10.0.0.1", "ports": "ssh"}, "ports", "not a port number"),
    ({"targets": "10.0.0.1", "ports": [22, "x"]}, "ports", "not a port number"),
    ({"targets": "10.0.0.1", "connect_timeout": 0}, "connect_timeout", "greater than 0"),
    ({"targets": "10.0.0.1", "connect_timeout": "soon"}, "connect_timeout", "number"),
    ({"targets": "10.0.0.1", "banner": "maybe"}, "banner", "boolean"),
    ({"targets": "10.0.0.1", "chunk_hosts": 0}, "chunk_hosts", "greater than or equal"),
    ({"targets": "10.0.0.1", "scan_type": "syn"}, "scan_type", "not permitted"),
]


@pytest.mark.parametrize(("payload", "field", "message"), BAD_PARAMETERS)
def test_bad_parameters_name_their_field(payload: dict[str, Any], field: str, message: str) -> None:
    with pytest.raises(BadParameter) as info:
        build_params(record(payload), SETTINGS)
    assert info.value.field == field
    assert message in info.value.message
    assert not info.value.message.startswith("Value error")


def test_targets_come_from_source_when_payload_has_none() -> None:
    params = build_params(record({}, source="192.168.1.0/30"), SETTINGS)
    assert params.targets == ("192.168.1.1-192.168.1.2",)
    assert params.ports == DEFAULT_PORTS


def test_no_targets_anywhere_is_a_bad_parameter() -> None:
    with pytest.raises(BadParameter) as info:
        build_params(record({}, source="  "), SETTINGS)
    assert info.value.field == "targets"


def test_xml_style_text_parameters_and_defaults_from_settings() -> None:
    settings = ShazzamSettings(connect_timeout=2.5, chunk_hosts=17)
    params = build_params(
        record({"targets": "10.0.0.1-3", "ports": "22,80", "banner": "true"}), settings
    )
    assert params.ports == (22, 80)
    assert params.banner is True
    assert params.connect_timeout == 2.5
    assert params.chunk_hosts == 17
    overridden = build_params(
        record({"targets": "10.0.0.1", "connect_timeout": "0.25", "chunk_hosts": "5"}), settings
    )
    assert overridden.connect_timeout == 0.25
    assert overridden.chunk_hosts == 5


def test_too_many_addresses_is_refused_with_the_numbers() -> None:
    settings = ShazzamSettings(max_addresses=100)
    with pytest.raises(Refused) as info:
        build_params(record({"targets": "10.0.0.0/24"}), settings)
    assert "254 addresses" in info.value.message
    assert "100" in info.value.message
    assert info.value.field == "targets"


def test_a_huge_network_is_refused_without_expanding_it() -> None:
    with pytest.raises(Refused, match="281474976710655 addresses"):
        build_params(record({"targets": "2001:db8::/80"}), SETTINGS)


def test_too_many_probes_is_refused_with_the_numbers() -> None:
    settings = ShazzamSettings(max_probes=100)
    with pytest.raises(Refused) as info:
        build_params(record({"targets": "10.0.0.1-10", "ports": "1-11"}), settings)
    assert "10 addresses × 11 ports = 110 probes" in info.value.message
    assert "100" in info.value.message
    # Exactly at the limit is fine.
    build_params(record({"targets": "10.0.0.1-10", "ports": "1-10"}), settings)


JSON_LEAVES = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(min_value=-(2**70), max_value=2**70),
    st.floats(allow_nan=True, allow_infinity=True),
    st.text(max_size=40),
    st.text(alphabet="0123456789abcdef.:/-, %", max_size=40),
)
JSON_VALUES = st.recursive(
    JSON_LEAVES,
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner),
    max_leaves=8,
)


@settings(max_examples=200, deadline=None)
@given(
    payload=st.dictionaries(
        st.sampled_from(
            ["targets", "ports", "connect_timeout", "banner", "banner_timeout", "chunk_hosts", "x"]
        ),
        JSON_VALUES,
    ),
    source=st.text(alphabet="0123456789abcdef.:/-, ", max_size=30),
)
def test_no_payload_raises_anything_but_a_bridge_error(
    payload: dict[str, Any], source: str
) -> None:
    error: BadParameter | Refused | None = None
    try:
        params = build_params(record(payload, source=source), SETTINGS)
    except (BadParameter, Refused) as exc:
        error = exc
    if error is None:
        assert params.targets
        assert params.ports
    else:
        assert error.message
        assert error.field or isinstance(error, Refused)
