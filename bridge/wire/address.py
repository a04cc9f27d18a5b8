"""``HOST:PORT`` as the commands take it (``--broker``, ...): one parser for all of them.

``host:port``, ``[v6-address]:port``, and ``host`` alone when the option has a default
port. A bare IPv6 address has several colons: when a port is required the last colon
separates it (``::1:1883``), when it may be left out the whole text is the host (``::1``);
brackets say it either way.
"""

from __future__ import annotations


class AddressError(ValueError):
    """The text is not ``HOST:PORT``; the message names the option."""


def parse_host_port(
    text: str, *, option: str = "address", default_port: int | None = None
) -> tuple[str, int]:
    """``(host, port)`` from ``text``; :class:`AddressError` naming ``option`` if it is not one.

    Without ``default_port`` the port is required.
    """
    cleaned = text.strip()
    if cleaned.startswith("["):
        host, _, rest = cleaned[1:].partition("]")
        if rest and not rest.startswith(":"):
            raise AddressError(f"{option} must be HOST:PORT, got {text!r}")
        port_text = rest[1:]
    elif cleaned.count(":") == 1 or (":" in cleaned and default_port is None):
        host, _, port_text = cleaned.rpartition(":")
    else:
        host, port_text = cleaned, ""
    if not host:
        raise AddressError(f"{option} must be HOST:PORT (no host), got {text!r}")
    if not port_text:
        if default_port is None:
            raise AddressError(f"{option} must be HOST:PORT (no port), got {text!r}")
        return host, default_port
    if not port_text.isdigit() or not 0 < int(port_text) < 65536:
        raise AddressError(f"{option} must be HOST:PORT with a port 1-65535, got {text!r}")
    return host, int(port_text)
