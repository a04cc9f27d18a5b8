"""ServiceNow's ECC XML: an output's ``<parameters>`` in, an input's ``<results>`` out.

An output's payload is ``<parameters><parameter name=".." value=".."/>...</parameters>``;
an input's is ``<results probe_time=".." result_code=".." [error=".."]>`` holding one or
more ``<result>`` elements and the output's ``<parameters>``, echoed ("MID Server ECC
Queue", ServiceNow docs: the payload field). This module reads the first and writes the
second; what goes inside ``<result>`` is each probe's dialect (``bridge/relay/dialect``).
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping, Sequence
from typing import Any
from xml.etree import ElementTree

from bridge.wire.records import xml_parameters

Element = ElementTree.Element
Parameters = list[tuple[str, str]]  # an output's parameters, in their order

_XML_NAME = re.compile(r"^[A-Za-z_][A-Za-z0-9_.\-]{0,127}$")
# Characters XML 1.0 cannot carry (control characters, lone surrogates, U+FFFE/U+FFFF).
_XML_BAD = re.compile("[^\t\n\r\u0020-\ud7ff\ue000-\ufffd\U00010000-\U0010ffff]")


def xml_text(value: Any) -> str:
    """A value as XML text: booleans ``true``/``false``, ``None`` empty, bad characters
    U+FFFD."""
    if isinstance(value, bool):
        text = "true" if value else "false"
    elif value is None:
        text = ""
    else:
        text = str(value)
    return _XML_BAD.sub("\ufffd", text)


def is_xml_name(key: str) -> bool:
    return bool(_XML_NAME.match(key)) and not key.lower().startswith("xml")


def add_value(parent: Element, key: str, value: Any) -> Element:
    """``value`` (JSON) as a child of ``parent``: an object's keys become elements, a list's
    items ``<item>`` elements, a key that is not an XML name ``<entry name="..">``."""
    if is_xml_name(key):
        element = ElementTree.SubElement(parent, key)
    else:
        element = ElementTree.SubElement(parent, "entry", {"name": xml_text(key)})
    if isinstance(value, dict):
        for k, v in value.items():
            add_value(element, str(k), v)
    elif isinstance(value, list):
        for item in value:
            add_value(element, "item", item)
    else:
        element.text = xml_text(value)
    return element


def element(tag: str, attrs: Mapping[str, Any] | None = None, text: Any = None) -> Element:
    """An element whose attribute values and text go through :func:`xml_text`;
    attributes whose value is ``None`` are left out."""
    node = ElementTree.Element(
        tag, {k: xml_text(v) for k, v in (attrs or {}).items() if v is not None}
    )
    if text is not None:
        node.text = xml_text(text)
    return node


def child(
    parent: Element, tag: str, attrs: Mapping[str, Any] | None = None, text: Any = None
) -> Element:
    node = element(tag, attrs, text)
    parent.append(node)
    return node


def generic_result(payload: Any) -> Element:
    """One chunk's JSON payload as a ``<result>`` (:func:`add_value` for each key)."""
    result = ElementTree.Element("result")
    if isinstance(payload, dict):
        for key, value in payload.items():
            add_value(result, str(key), value)
    elif payload is not None:
        result.text = xml_text(payload)
    return result


def parameters_element(params: Iterable[tuple[str, Any]]) -> Element:
    plist = ElementTree.Element("parameters")
    for name, value in params:
        child(plist, "parameter", {"name": name, "value": value})
    return plist


def results_document(
    results: Sequence[Element],
    params: Iterable[tuple[str, Any]] | str,
    *,
    probe_time: Any = 0,
    error: str = "",
) -> str:
    """``<results probe_time result_code [error]>`` + the results + ``<parameters>``:
    ``params`` as pairs, or the output's own ``<parameters>`` text, echoed as it came
    (nested specifications included)."""
    attrs: dict[str, Any] = {"probe_time": probe_time, "result_code": 1 if error else 0}
    if error:
        attrs["error"] = error
    root = element("results", attrs)
    root.extend(results)
    if isinstance(params, str):
        root.append(_echo(params))
    else:
        root.append(parameters_element(params))
    return ElementTree.tostring(root, encoding="unicode")


def _echo(text: str) -> Element:
    """An output's ``<parameters>`` (read by :func:`parse_parameters` already), whitespace
    between elements dropped."""
    root = ElementTree.fromstring(text)
    for node in root.iter():
        if len(node) and node.text is not None and not node.text.strip():
            node.text = None
        if node.tail is not None and not node.tail.strip():
            node.tail = None
    return root


def results_envelope(record: Mapping[str, Any], params: Mapping[str, Any]) -> str:
    """One input record's payload in ServiceNow's XML form (a single chunk).

    ``<results probe_time=".." result_code=".." [error=".."]>`` holding ``<result>`` (the
    payload: an object's keys as elements, a list's items as ``<item>``, a key that is
    not an XML name as ``<entry name="..">``) and the job's ``<parameters>``.
    """
    attrs = {
        "probe_time": xml_text(record.get("probe_time", 0)),
        "result_code": xml_text(record.get("result_code", 1 if record.get("error_string") else 0)),
    }
    error = record.get("error_string")
    if error:
        attrs["error"] = xml_text(error)
    root = ElementTree.Element("results", attrs)
    root.append(generic_result(record.get("payload")))
    root.append(parameters_element(params.items()))
    return ElementTree.tostring(root, encoding="unicode")


def parse_parameters(text: str) -> Parameters:
    """An output's ``<parameters>``: each ``<parameter>``'s name and its ``value``
    attribute, else its text, else (a nested specification) its children as XML text.

    Raises ``BadRecord`` for what does not parse, a DTD or an entity declaration.
    """
    return xml_parameters(text, nested=True)


def is_xml(payload: Any) -> bool:
    return isinstance(payload, str) and payload.lstrip().startswith("<")
