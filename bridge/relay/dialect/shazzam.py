"""Shazzam: the ranges and port-probe specifications in, one ``<result>`` of scanners out.

ServiceNow's Shazzam output carries the ranges to scan and an XML port-probe
specification (``ShazzamLaunch.makeProbeSpec``: one port probe a scanner, by name, with
its protocol and ports). The relay reads:

- the targets: ``targets``, ``ranges``/``range``, ``ip_ranges``/``ip_range``, ``ips``
  (commas or spaces), else the record's ``source``;
- the port probes: a parameter ``port_probes`` (also ``port_probe_specs``, ``probe_spec``,
  ``portprobes``, ``scanners``) holding elements with ``name`` (or ``portprobe``),
  ``protocol`` (or ``scanner``: ``tcp``/``udp``, a scanner name containing them) and
  ``ports`` (or ``port``: ``22``, ``80,443``, ``5985-5986``), at any depth, given as nested
  XML or as escaped XML text. TCP ports are swept; a UDP probe on 161 (or named ``snmp``)
  turns on the sweep's SNMP tap; other UDP probes are dropped with a debug log (the
  bridge's sweep is TCP). Plain ``ports`` is accepted too.

The answer: one ``<result>`` holding a ``<host ip=".." alive="true">`` per live address,
with a ``<scanner name portprobe port protocol result service/>`` per port probe and port
(``result``: ``open``, ``closed``, ``filtered``; the attribute names follow ServiceNow's
``ShazzamScanner`` API: name, port, portProbe, protocol, result, service) and the
sweep's ``<totals/>``.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from typing import Any
from xml.etree import ElementTree

from bridge.relay.dialect.base import Dialect, Mapped, ParamReader, log
from bridge.relay.envelope import Element, child, element
from bridge.wire.errors import BadParameter
from bridge.wire.targets import parse_ports

SPEC_PARAMS = ("port_probes", "port_probe_specs", "probe_spec", "portprobes", "scanners")
TARGET_PARAMS = ("targets", "ranges", "range", "ip_ranges", "ip_range", "ips")
_SPLIT = re.compile(r"[\s,]+")


def parse_port_probes(text: str, field: str) -> list[dict[str, Any]]:
    """Port probes ``[{"name", "protocol", "ports"}]`` from an XML specification."""
    if "<!DOCTYPE" in text or "<!ENTITY" in text:
        raise BadParameter("DTDs and entities are not accepted", field=field)
    try:
        root = ElementTree.fromstring(f"<spec>{text}</spec>")
    except ElementTree.ParseError as exc:
        message = f"the port probe specification does not parse: {exc}"
        raise BadParameter(message, field=field) from None
    probes: list[dict[str, Any]] = []
    for node in root.iter():
        ports_text = node.get("ports") or node.get("port")
        if not ports_text:
            continue
        name = node.get("name") or node.get("portprobe") or node.get("port_probe") or ""
        kind = (node.get("protocol") or node.get("scanner") or "tcp").lower()
        protocol = "udp" if "udp" in kind or kind == "snmp" else "tcp"
        try:
            ports = list(parse_ports(ports_text))
        except ValueError as exc:
            raise BadParameter(f"port probe {name!r}: {exc}", field=field) from None
        probes.append({"name": name or f"{protocol}/{ports_text}", "protocol": protocol,
                       "ports": ports})  # fmt: skip
    if not probes:
        raise BadParameter("no port probe with ports in the specification", field=field)
    return probes


class Shazzam(Dialect):
    topic = "Shazzam"

    def map(self, reader: ParamReader) -> Mapped:
        targets = reader.text(*TARGET_PARAMS) or reader.row.get("source", "")
        params: dict[str, Any] = {"targets": " ".join(p for p in _SPLIT.split(targets) if p)}
        probes: list[dict[str, Any]] = []
        for name in SPEC_PARAMS:
            spec = reader.text(name)
            if spec is not None:
                probes = parse_port_probes(spec, name)
                break
        tcp: set[int] = set()
        used: list[dict[str, Any]] = []
        for probe in probes:
            if probe["protocol"] == "tcp":
                tcp.update(probe["ports"])
            elif 161 in probe["ports"] or probe["name"].lower().startswith("snmp"):
                params["snmp"] = True
                params["snmp_port"] = 161 if 161 in probe["ports"] else probe["ports"][0]
            else:
                log.debug("Shazzam: UDP port probe %r dropped (the sweep is TCP)", probe["name"])
                continue
            used.append(probe)
        ports = reader.text("ports")
        if ports is not None:
            try:
                tcp.update(parse_ports(ports))
            except ValueError as exc:
                raise BadParameter(str(exc), field="ports") from None
        if tcp:
            params["ports"] = sorted(tcp)
        elif probes:
            if not params.get("snmp"):
                raise BadParameter("no TCP port and no SNMP probe to scan", field="port_probes")
            params["ports"] = [params["snmp_port"]]  # the sweep needs one; the tap is SNMP
        return Mapped(params, {"probes": used})

    def results(self, payloads: Sequence[Any], extra: dict[str, Any]) -> list[Element]:
        probes = extra.get("probes") or []
        by_port: dict[int, list[str]] | None = {} if probes else None
        snmp_names: list[str] = []
        for probe in probes:
            if probe["protocol"] == "tcp":
                for port in probe["ports"]:
                    assert by_port is not None
                    by_port.setdefault(port, []).append(probe["name"])
            else:
                snmp_names.append(probe["name"])
        result = element("result")
        totals: dict[str, Any] = {}
        for payload in payloads:
            if not isinstance(payload, dict):
                continue
            totals = payload.get("totals") or totals
            for host in payload.get("hosts") or []:
                if isinstance(host, dict) and host.get("alive"):
                    result.append(_host(host, by_port, snmp_names))
        if totals:
            child(result, "totals", totals)
        return [result]


def _host(host: dict[str, Any], by_port: dict[int, list[str]] | None, snmp: list[str]) -> Element:
    """One live address: a scanner per port probe and port (every port swept when the job
    named no port probes), and the SNMP tap's answer."""
    node = element("host", {"ip": host.get("ip"), "alive": True})
    seen: list[tuple[int, str, dict[str, Any]]] = []
    for entry in host.get("open") or []:
        if isinstance(entry, dict) and isinstance(entry.get("port"), int):
            seen.append((entry["port"], "open", entry))
    seen.extend((port, "closed", {}) for port in host.get("closed") or [])
    seen.extend((port, "filtered", {}) for port in host.get("filtered") or [])
    for port, state, entry in sorted(seen, key=lambda item: item[0]):
        service = entry.get("service") or ""
        names = [service or str(port)] if by_port is None else by_port.get(port, [])
        for name in names:
            scanner = child(node, "scanner", {
                "name": name, "portprobe": name, "port": port, "protocol": "TCP",
                "result": state, "service": service or None,
            })  # fmt: skip
            if entry.get("banner"):
                child(scanner, "banner", text=entry["banner"])
    tap = host.get("snmp")
    if tap is not None or host.get("snmp_error"):
        for name in snmp or ["snmp"]:
            scanner = child(node, "scanner", {
                "name": name, "portprobe": name, "port": (tap or {}).get("port", 161),
                "protocol": "UDP", "result": "open" if tap else "no_response",
                "service": "snmp",
            })  # fmt: skip
            if isinstance(tap, dict):
                for key, tag in (("sys_descr", "sysDescr"), ("sys_object_id", "sysObjectID"),
                                 ("sys_name", "sysName"), ("version", "version")):  # fmt: skip
                    if tap.get(key) is not None:
                        child(scanner, tag, text=tap[key])
    return node
