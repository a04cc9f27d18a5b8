"""SNMP values as data: OID text, a small built-in MIB, and typed varbinds.

gufo-snmp hands back plain Python values and drops the ASN.1 tag on the way:

| on the wire | gufo-snmp gives |
|---|---|
| OCTET STRING | ``bytes`` |
| INTEGER, Counter32, Gauge32 (Unsigned32), TimeTicks, Counter64 | ``int`` |
| IpAddress, OBJECT IDENTIFIER | ``str`` (dotted) |
| Opaque float / double | ``float`` |
| NULL | ``None`` |

So the SMI type of a value comes from what the library keeps (bytes, number, dotted text)
refined by :data:`MIB`, a hand-written map of the MIB-2 objects discovery reads most
(``system``, ``ifTable``, ``ifXTable``, ``ipAddrTable``, ``ipNetToMediaTable``). An
integer whose object is not in the map is typed ``Integer`` (one of the integer kinds;
the wire tag is not known), or ``Counter64`` when it is beyond 32 bits. A dotted value
with four parts of 0-255 is an ``IpAddress`` unless the map says the object holds an OID.

This module has no I/O and does not import gufo-snmp.
"""

from __future__ import annotations

import functools
import re
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

SYS_DESCR = "1.3.6.1.2.1.1.1.0"
SYS_OBJECT_ID = "1.3.6.1.2.1.1.2.0"
SYS_NAME = "1.3.6.1.2.1.1.5.0"

MAX_OID_ARCS = 128  # SMI limit on sub-identifiers in an OID
_ARC_MAX = 2**32 - 1
_OID_RE = re.compile(r"^\.?([0-9]+)(\.[0-9]+)+$")  # ASCII digits only
_NAME_RE = re.compile(r"^([A-Za-z][A-Za-z0-9-]*)((?:\.[0-9]+)*)$")

# Varbind types of the result (``type`` field).
OCTET_STRING = "OctetString"
INTEGER = "Integer"  # an integer kind the library does not name
INTEGER32 = "Integer32"
COUNTER32 = "Counter32"
COUNTER64 = "Counter64"
GAUGE32 = "Gauge32"
TIMETICKS = "TimeTicks"
IP_ADDRESS = "IpAddress"
OBJECT_IDENTIFIER = "ObjectIdentifier"
OPAQUE = "Opaque"
NULL = "Null"
NO_SUCH_OBJECT = "noSuchObject"
NO_SUCH_INSTANCE = "noSuchInstance"
END_OF_MIB_VIEW = "endOfMibView"
EXCEPTIONS = frozenset({NO_SUCH_OBJECT, NO_SUCH_INSTANCE, END_OF_MIB_VIEW})

# Syntaxes of the map beyond the result types: how an OCTET STRING is shown.
DISPLAY_STRING = "DisplayString"  # text when printable (the default for any OCTET STRING)
PHYS_ADDRESS = "PhysAddress"  # always hex: a MAC address may happen to be printable


def parse_oid(text: str) -> str:
    """Canonical numeric OID (no leading dot) or ``ValueError`` quoting the input."""
    raw = text.strip()
    if not _OID_RE.match(raw):
        raise ValueError(f"{raw[:80]!r} is not an OID (dotted numbers such as 1.3.6.1.2.1.1)")
    arcs = [int(part) for part in raw.lstrip(".").split(".")]
    if len(arcs) > MAX_OID_ARCS:
        raise ValueError(f"{raw[:80]!r} has more than {MAX_OID_ARCS} parts")
    if arcs[0] > 2 or (arcs[0] < 2 and arcs[1] > 39):
        raise ValueError(f"{raw[:80]!r} is not an OID: it must start with 0, 1 or 2")
    if any(arc > _ARC_MAX for arc in arcs):
        raise ValueError(f"{raw[:80]!r} has a part above {_ARC_MAX}")
    return ".".join(str(arc) for arc in arcs)


def oid_key(oid: str) -> tuple[int, ...]:
    """Sort key in SNMP (lexicographic by sub-identifier) order."""
    return tuple(int(arc) for arc in oid.split("."))


def is_under(oid: str, root: str) -> bool:
    """``oid`` lies strictly below ``root`` in the tree."""
    return oid.startswith(root) and oid[len(root) : len(root) + 1] == "."


@dataclass(frozen=True, slots=True)
class Table:
    name: str
    oid: str  # the table; rows are ``<oid>.1.<column>.<index>`` (SMI convention)
    columns: Mapping[int, str]  # column id → name

    @property
    def entry(self) -> str:
        return f"{self.oid}.1"


def _columns(entry: str, names: str, syntaxes: str) -> dict[str, tuple[str, str]]:
    """``{name: (oid, syntax)}`` for columns 1, 2, ... of ``entry``."""
    out: dict[str, tuple[str, str]] = {}
    for index, (name, syntax) in enumerate(
        zip(names.split(), syntaxes.split(), strict=True), start=1
    ):
        if name != "-":
            out[name] = (f"{entry}.{index}", syntax)
    return out


def _table(names: str, columns: str, syntaxes: str) -> dict[str, tuple[str, str]]:
    """A table (``"<table> <entry> <table OID>"``), its entry, and the entry's columns."""
    table, entry, oid = names.split()
    return {table: (oid, "-"), entry: (f"{oid}.1", "-"), **_columns(f"{oid}.1", columns, syntaxes)}


# name → (OID, syntax). Syntax "-" for tables and groups (no value of their own).
# Sources: RFC 3418 (SNMPv2-MIB system group), RFC 2863 (IF-MIB), RFC 1213 / RFC 4293
# (IP-MIB ipAddrTable, ipNetToMediaTable).
MIB: dict[str, tuple[str, str]] = {
    "mib-2": ("1.3.6.1.2.1", "-"),
    "system": ("1.3.6.1.2.1.1", "-"),
    **_columns(
        "1.3.6.1.2.1.1",
        "sysDescr sysObjectID sysUpTime sysContact sysName sysLocation sysServices sysORLastChange",
        "DisplayString ObjectIdentifier TimeTicks DisplayString DisplayString DisplayString"
        " Integer32 TimeTicks",
    ),
    **_table(
        "sysORTable sysOREntry 1.3.6.1.2.1.1.9",
        "sysORIndex sysORID sysORDescr sysORUpTime",
        "Integer32 ObjectIdentifier DisplayString TimeTicks",
    ),
    "interfaces": ("1.3.6.1.2.1.2", "-"),
    "ifNumber": ("1.3.6.1.2.1.2.1", INTEGER32),
    **_table(
        "ifTable ifEntry 1.3.6.1.2.1.2.2",
        "ifIndex ifDescr ifType ifMtu ifSpeed ifPhysAddress ifAdminStatus ifOperStatus"
        " ifLastChange ifInOctets ifInUcastPkts ifInNUcastPkts ifInDiscards ifInErrors"
        " ifInUnknownProtos ifOutOctets ifOutUcastPkts ifOutNUcastPkts ifOutDiscards"
        " ifOutErrors ifOutQLen ifSpecific",
        "Integer32 DisplayString Integer32 Integer32 Gauge32 PhysAddress Integer32 Integer32"
        " TimeTicks Counter32 Counter32 Counter32 Counter32 Counter32"
        " Counter32 Counter32 Counter32 Counter32 Counter32"
        " Counter32 Gauge32 ObjectIdentifier",
    ),
    "ip": ("1.3.6.1.2.1.4", "-"),
    **_table(
        "ipAddrTable ipAddrEntry 1.3.6.1.2.1.4.20",
        "ipAdEntAddr ipAdEntIfIndex ipAdEntNetMask ipAdEntBcastAddr ipAdEntReasmMaxSize",
        "IpAddress Integer32 IpAddress Integer32 Integer32",
    ),
    **_table(
        "ipNetToMediaTable ipNetToMediaEntry 1.3.6.1.2.1.4.22",
        "ipNetToMediaIfIndex ipNetToMediaPhysAddress ipNetToMediaNetAddress ipNetToMediaType",
        "Integer32 PhysAddress IpAddress Integer32",
    ),
    **_table(
        "ifXTable ifXEntry 1.3.6.1.2.1.31.1.1",
        "ifName ifInMulticastPkts ifInBroadcastPkts ifOutMulticastPkts ifOutBroadcastPkts"
        " ifHCInOctets ifHCInUcastPkts ifHCInMulticastPkts ifHCInBroadcastPkts"
        " ifHCOutOctets ifHCOutUcastPkts ifHCOutMulticastPkts ifHCOutBroadcastPkts"
        " ifLinkUpDownTrapEnable ifHighSpeed ifPromiscuousMode ifConnectorPresent ifAlias"
        " ifCounterDiscontinuityTime",
        "DisplayString Counter32 Counter32 Counter32 Counter32"
        " Counter64 Counter64 Counter64 Counter64"
        " Counter64 Counter64 Counter64 Counter64"
        " Integer32 Gauge32 Integer32 Integer32 DisplayString"
        " TimeTicks",
    ),
}

TABLES: dict[str, Table] = {}
for _name in ("sysORTable", "ifTable", "ipAddrTable", "ipNetToMediaTable", "ifXTable"):
    _oid = MIB[_name][0]
    TABLES[_oid] = Table(
        name=_name,
        oid=_oid,
        columns={
            int(oid.rsplit(".", 1)[1]): name
            for name, (oid, _syntax) in MIB.items()
            if oid.rsplit(".", 1)[0] == f"{_oid}.1"
        },
    )

SYNTAX: dict[str, str] = {oid: syntax for oid, syntax in MIB.values() if syntax != "-"}
NAMES: dict[str, str] = {oid: name for name, (oid, _syntax) in MIB.items()}
_SYNTAX_DEPTHS = sorted({oid.count(".") + 1 for oid in SYNTAX}, reverse=True)
_MAPPED_PREFIX = "1.3.6.1.2.1."  # every object of the map is under mib-2
assert all(oid.startswith(_MAPPED_PREFIX) for oid in SYNTAX)


def resolve_oid(text: str) -> str:
    """A numeric OID, or a name of :data:`MIB` with an optional numeric suffix.

    ``sysName.0`` → ``1.3.6.1.2.1.1.5.0``; ``ifTable`` → ``1.3.6.1.2.1.2.2``.
    """
    raw = text.strip()
    named = _NAME_RE.match(raw)
    if named is None:
        return parse_oid(raw)
    entry = MIB.get(named.group(1))
    if entry is None:
        raise ValueError(
            f"{raw[:80]!r} is not an OID, and {named.group(1)[:40]!r} is not a name this "
            "bridge knows (give the numeric OID)"
        )
    return parse_oid(entry[0] + named.group(2))


@functools.lru_cache(maxsize=16_384)
def syntax_of(oid: str) -> str | None:
    """The map's syntax of the object ``oid`` is an instance of, if known."""
    if not oid.startswith(_MAPPED_PREFIX):
        return None
    return _syntax_under(oid.rpartition(".")[0])


@functools.lru_cache(maxsize=4096)
def _syntax_under(parent: str) -> str | None:
    """:func:`syntax_of` by the instance's parent (a column, for one-part indexes)."""
    arcs = parent.split(".")
    for depth in _SYNTAX_DEPTHS:
        if len(arcs) >= depth:
            found = SYNTAX.get(".".join(arcs[:depth]))
            if found is not None:
                return found
    return None


def _printable(data: bytes) -> str | None:
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError:
        return None
    if text.isprintable() or text.translate(_LINE_SPACE).isprintable():
        return text
    return None


_LINE_SPACE = {ord("\t"): None, ord("\r"): None, ord("\n"): None}  # printable in a value


def octets(data: bytes, syntax: str | None = None) -> tuple[str, str]:
    """``(value, encoding)``: the text when printable, else colon-separated hex."""
    if syntax != PHYS_ADDRESS:
        text = _printable(data)
        if text is not None:
            return text, "text"
    return data.hex(":"), "hex"


def _is_ipv4(text: str) -> bool:
    parts = text.split(".")
    return len(parts) == 4 and all(p.isdigit() and int(p) <= 255 for p in parts)


def typed(oid: str, value: Any) -> dict[str, Any]:
    """One varbind of the result: ``{"oid", "type", "value"}`` (+ ``encoding`` for octets)."""
    syntax = syntax_of(oid)
    if isinstance(value, bytes):
        text, encoding = octets(value, syntax)
        return {"oid": oid, "type": OCTET_STRING, "value": text, "encoding": encoding}
    if isinstance(value, bool):  # not produced by gufo-snmp; keep bool out of the int branch
        return {"oid": oid, "type": INTEGER, "value": int(value)}
    if isinstance(value, int):
        if syntax in (INTEGER32, COUNTER32, COUNTER64, GAUGE32, TIMETICKS):
            kind = syntax
        elif value > _ARC_MAX:
            kind = COUNTER64
        else:
            kind = INTEGER
        return {"oid": oid, "type": kind, "value": value}
    if isinstance(value, str):
        if syntax == IP_ADDRESS or (syntax != OBJECT_IDENTIFIER and _is_ipv4(value)):
            return {"oid": oid, "type": IP_ADDRESS, "value": value}
        return {"oid": oid, "type": OBJECT_IDENTIFIER, "value": value}
    if isinstance(value, float):
        return {"oid": oid, "type": OPAQUE, "value": value}
    if value is None:
        return {"oid": oid, "type": NULL, "value": None}
    return {"oid": oid, "type": OPAQUE, "value": repr(value)[:200]}


def exception(oid: str, kind: str) -> dict[str, Any]:
    """A varbind that carries an SNMP exception instead of a value."""
    return {"oid": oid, "type": kind, "value": None}


def text_value(value: Any) -> str | None:
    """A value as plain text (for the tap's summary fields)."""
    if value is None:
        return None
    if isinstance(value, bytes):
        return octets(value)[0]
    return str(value)
