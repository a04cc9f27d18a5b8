"""ServiceNow's XML form of the REST APIs: answers and request bodies.

Answers (``Accept: application/xml`` or ``text/xml``): the JSON answer's tree as elements
under ``<response>``; a list is its element repeated (a record list is repeated
``<result>``), an object nests (a reference ``<caller_id><link>..</link><value>..</value>
</caller_id>``), an empty value is an empty element. Errors have the same shape:
``<response><error><message/><detail/></error><status>failure</status></response>``.

Request bodies (``Content-Type: application/xml`` or ``text/xml``): ``<request><entry>
<field>value</field>...</entry></request>`` as the REST API Explorer writes them, or any
root element holding the field elements directly. Parsing is safe by construction: the
body must be UTF-8 (an encoding named in the XML declaration is not followed), and a
document with any markup declaration (``<!DOCTYPE``, ``<!ENTITY``, ``<!ELEMENT``...) is
refused before the parser sees it, so no entity is ever expanded and nothing external is
fetched; the body's size is bounded by the caller.
"""

from __future__ import annotations

import re
import xml.etree.ElementTree as ET
from collections.abc import Mapping
from typing import Any

XML_TYPES = frozenset({"application/xml", "text/xml"})

# Characters XML 1.0 cannot carry (control characters, lone surrogates, U+FFFE/U+FFFF).
_NOT_XML = re.compile("[^\t\n\r\x20-\ud7ff\ue000-\ufffd\U00010000-\U0010ffff]")
_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_.-]*")
# A markup declaration: allowed only as a comment (<!--) or a CDATA section (<![CDATA[).
_DECLARATION = re.compile(r"<!(?!--|\[CDATA\[)")


class XmlBodyError(ValueError):
    """A request body that is not acceptable XML; the message says why."""


def _text(value: Any) -> str:
    if value is None:
        text = ""
    elif isinstance(value, bool):
        text = "true" if value else "false"
    else:
        text = str(value)
    text = _NOT_XML.sub("\ufffd", text)
    return text.replace("&", "&amp;").replace("<", "&lt;").replace(">", "&gt;")


def _name(key: str) -> str:
    """An element name for ``key`` (field names already are; anything else is made one)."""
    if _NAME.fullmatch(key) and not key.lower().startswith("xml"):
        return key
    fixed = re.sub(r"[^A-Za-z0-9_.-]", "_", key)
    return fixed if _NAME.fullmatch(fixed) else "_" + fixed


def _element(parts: list[str], key: str, value: Any) -> None:
    name = _name(key)
    if isinstance(value, list):
        for item in value:
            _element(parts, key, item)
        return
    if isinstance(value, Mapping):
        parts.append(f"<{name}>")
        for child, item in value.items():
            _element(parts, str(child), item)
        parts.append(f"</{name}>")
        return
    text = _text(value)
    parts.append(f"<{name}>{text}</{name}>" if text else f"<{name}/>")


def render(data: Mapping[str, Any]) -> bytes:
    """The XML answer for a JSON-shaped one (``{"result": ...}`` or an error)."""
    parts = ['<?xml version="1.0" encoding="UTF-8"?><response>']
    for key, value in data.items():
        _element(parts, key, value)
    parts.append("</response>")
    return "".join(parts).encode("utf-8")


def _local(tag: str) -> str:
    return tag.rpartition("}")[2]  # without a namespace


def parse_body(raw: bytes) -> dict[str, str]:
    """The fields of an XML request body (the first of a repeated field wins)."""
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise XmlBodyError(f"the body is not UTF-8 ({exc.reason} at byte {exc.start})") from None
    declaration = _DECLARATION.search(text)
    if declaration is not None:
        shown = text[declaration.start() : declaration.start() + 12]
        raise XmlBodyError(f"markup declarations are refused ({shown!r}): no DTD, no entities")
    try:
        root = ET.fromstring(text)
    except ET.ParseError as exc:
        raise XmlBodyError(f"not well-formed XML: {exc}") from None
    holder = root
    if _local(root.tag) == "request":
        entries = [child for child in root if _local(child.tag) == "entry"]
        if entries:
            holder = entries[0]
    fields: dict[str, str] = {}
    for child in holder:
        name = _local(child.tag)
        if len(child):
            raise XmlBodyError(f"field {name!r} holds XML elements; a field holds text")
        fields.setdefault(name, child.text or "")
    return fields


__all__ = ["XML_TYPES", "XmlBodyError", "parse_body", "render"]
