"""Sweep targets and ports: parsing, counting and expanding without surprises.

Targets are IP literals only (no host names: resolving is not the scanner's job, and a
name that resolves differently on each run makes a sweep unrepeatable). Accepted forms,
separated by commas and/or white space, or given as a JSON list of such strings:

* a single address: ``10.0.0.7``, ``::1``
* a network in CIDR form: ``10.0.0.0/24``, ``2001:db8::/120``. Host bits may be set
  (``10.0.0.7/24`` is ``10.0.0.0/24``). The addresses swept are those of Python's
  ``ipaddress`` ``hosts()``: an IPv4 network of /30 or wider loses its network and
  broadcast addresses, an IPv6 network of /126 or wider loses its Subnet-Router anycast
  address (the first one); /31, /32, /127 and /128 keep every address.
* a range of full addresses: ``10.0.0.1-10.0.0.20``, ``2001:db8::1-2001:db8::ff``
* a short range, where the end replaces the last part of the start: ``10.0.0.1-20``
  (decimal last octet) or ``2001:db8::1-ff`` (hexadecimal last group).

The result is a :class:`TargetSet`: sorted, merged intervals per IP version, so
duplicates and overlaps count once. It is counted before anything is expanded, so a
``/8`` costs nothing to refuse.

Ports are a JSON list of integers (or of strings in the text form), or text such as
``"22,80,8000-8010"``. The result is sorted and without duplicates.

Errors are ``ValueError`` with a message that quotes the offending item; callers attach
the field name (``targets`` / ``ports``).
"""

from __future__ import annotations

import ipaddress
import re
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from typing import Any

MAX_TARGET_ITEMS = 100_000  # separate items in one ``targets`` value
MAX_ITEM_CHARS = 100  # one item longer than this cannot be an address, network or range
_SPLIT = re.compile(r"[\s,]+")
_SHORT_V4 = re.compile(r"^\d{1,6}$")
_SHORT_V6 = re.compile(r"^[0-9A-Fa-f]{1,4}$")
_HINT = "only IP addresses, CIDR networks and ranges are accepted, not host names"


@dataclass(frozen=True, slots=True)
class Interval:
    """Every address from ``first`` to ``last`` (inclusive) of one IP version."""

    version: int  # 4 or 6
    first: int
    last: int

    @property
    def size(self) -> int:
        return self.last - self.first + 1

    def text(self) -> str:
        """Canonical text: one address, or ``first-last`` in full."""
        start = _text(self.version, self.first)
        if self.first == self.last:
            return start
        return f"{start}-{_text(self.version, self.last)}"


def _text(version: int, value: int) -> str:
    if version == 4:
        return str(ipaddress.IPv4Address(value))
    return str(ipaddress.IPv6Address(value))


@dataclass(frozen=True, slots=True)
class TargetSet:
    """Sorted, merged, non-overlapping intervals: IPv4 first, then IPv6."""

    intervals: tuple[Interval, ...]

    @property
    def count(self) -> int:
        return sum(interval.size for interval in self.intervals)

    def texts(self) -> tuple[str, ...]:
        return tuple(interval.text() for interval in self.intervals)

    def addresses(self) -> Iterator[tuple[int, str]]:
        """Every address in order, as ``(version, text)``. Lazy: expand as you go."""
        for interval in self.intervals:
            version = interval.version
            for value in range(interval.first, interval.last + 1):
                yield version, _text(version, value)


def _parse_address(text: str, item: str) -> ipaddress.IPv4Address | ipaddress.IPv6Address:
    if "%" in text:
        raise ValueError(f"{item!r}: IPv6 zone ids (%...) are not supported")
    try:
        return ipaddress.ip_address(text)
    except ValueError:
        raise ValueError(f"{item!r} is not an IP address ({_HINT})") from None


def _parse_item(item: str) -> Interval:
    if len(item) > MAX_ITEM_CHARS:
        raise ValueError(f"{item[:40]!r}... is too long to be an address, network or range")
    if "/" in item:
        if "%" in item:
            raise ValueError(f"{item!r}: IPv6 zone ids (%...) are not supported")
        try:
            net = ipaddress.ip_network(item, strict=False)
        except ValueError:
            raise ValueError(f"{item!r} is not a CIDR network ({_HINT})") from None
        first = int(net.network_address)
        last = int(net.broadcast_address)
        if net.version == 4 and net.prefixlen <= 30:
            first, last = first + 1, last - 1
        elif net.version == 6 and net.prefixlen <= 126:
            first += 1
        return Interval(net.version, first, last)
    if "-" in item:
        left, _, right = item.partition("-")
        start = _parse_address(left.strip(), item)
        right = right.strip()
        if start.version == 4 and _SHORT_V4.match(right):
            last_part = int(right)
            if last_part > 255:
                raise ValueError(f"{item!r}: the short range end {right} is over 255")
            end_value = (int(start) & ~0xFF) | last_part
        elif start.version == 6 and _SHORT_V6.match(right):
            end_value = (int(start) & ~0xFFFF) | int(right, 16)
        else:
            end = _parse_address(right, item)
            if end.version != start.version:
                raise ValueError(f"{item!r}: a range cannot mix IPv4 and IPv6")
            end_value = int(end)
        if end_value < int(start):
            raise ValueError(f"{item!r}: the range ends before it starts")
        return Interval(start.version, int(start), end_value)
    address = _parse_address(item, item)
    return Interval(address.version, int(address), int(address))


def _merge(intervals: Iterable[Interval]) -> tuple[Interval, ...]:
    merged: list[Interval] = []
    for interval in sorted(intervals, key=lambda i: (i.version, i.first, i.last)):
        if merged:
            prev = merged[-1]
            if prev.version == interval.version and interval.first <= prev.last + 1:
                if interval.last > prev.last:
                    merged[-1] = Interval(prev.version, prev.first, interval.last)
                continue
        merged.append(interval)
    return tuple(merged)


def _items(value: Any, what: str) -> list[str]:
    """Split text (or a list of texts) on commas and white space."""
    if isinstance(value, str):
        parts = [value]
    elif isinstance(value, list | tuple):
        parts = []
        for element in value:
            if not isinstance(element, str):
                raise ValueError(f"{what} list items must be strings, got {type(element).__name__}")
            parts.append(element)
    else:
        raise ValueError(f"{what} must be text or a list of texts, got {type(value).__name__}")
    items: list[str] = []
    for part in parts:
        items.extend(p for p in _SPLIT.split(part) if p)
        if len(items) > MAX_TARGET_ITEMS:
            raise ValueError(f"more than {MAX_TARGET_ITEMS} {what} items")
    return items


def parse_targets(value: Any) -> TargetSet:
    """Text or a list of texts → a :class:`TargetSet`; ``ValueError`` if any item is bad."""
    items = _items(value, "targets")
    if not items:
        raise ValueError("no targets given")
    return TargetSet(_merge(_parse_item(item) for item in items))


def _port(text: str, item: str) -> int:
    if not (text.isascii() and text.isdigit()) or len(text) > 5:
        raise ValueError(f"{item[:40]!r} is not a port number")
    number = int(text)
    if not 1 <= number <= 65535:
        raise ValueError(f"port {number} is out of range 1-65535")
    return number


def parse_ports(value: Any) -> tuple[int, ...]:
    """``[22, 80]``, ``["22", "8000-8010"]`` or ``"22,80,8000-8010"`` → sorted unique ports."""
    ports: set[int] = set()
    if isinstance(value, list | tuple):
        texts: list[str] = []
        for element in value:
            if isinstance(element, bool):
                raise ValueError("ports must be numbers, got a boolean")
            if isinstance(element, int):
                if not 1 <= element <= 65535:
                    raise ValueError(f"port {element} is out of range 1-65535")
                ports.add(element)
            elif isinstance(element, str):
                texts.append(element)
            else:
                raise ValueError(f"ports list items must be integers, got {type(element).__name__}")
        items = _items(texts, "ports") if texts else []
    elif isinstance(value, int) and not isinstance(value, bool):
        items = [str(value)]
    else:
        items = _items(value, "ports")
    for item in items:
        if "-" in item:
            low_text, _, high_text = item.partition("-")
            low, high = _port(low_text.strip(), item), _port(high_text.strip(), item)
            if high < low:
                raise ValueError(f"{item!r}: the port range ends before it starts")
            ports.update(range(low, high + 1))
        else:
            ports.add(_port(item, item))
    if not ports:
        raise ValueError("no ports given")
    return tuple(sorted(ports))
