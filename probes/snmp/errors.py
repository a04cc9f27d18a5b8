"""gufo-snmp and socket failures as the bridge's errors; which leave a session sound."""

from __future__ import annotations

import asyncio

from gufo.snmp import SnmpAuthError, SnmpError

from bridge.wire.errors import (
    AuthFailed,
    BridgeError,
    ConnectionRefused,
    ProtocolError,
)


def refused() -> ConnectionRefused:
    return ConnectionRefused(
        "nothing listens on this UDP port (the host answered port unreachable)"
    )


def translate(exc: BaseException) -> BaseException:
    """A library or socket failure as the bridge's error; anything else as it is."""
    if isinstance(exc, BridgeError | asyncio.CancelledError):
        return exc
    if isinstance(exc, SnmpAuthError):
        return AuthFailed("the agent refused the SNMPv3 user or its authentication key/protocol")
    if isinstance(exc, SnmpError):  # what gufo-snmp does not name more precisely
        return ProtocolError(f"SNMP error from the library: {str(exc)[:200]}")
    if isinstance(exc, ConnectionRefusedError):
        return refused()
    if isinstance(exc, OSError):
        return BridgeError(f"network error: {exc.strerror or exc}")
    return exc


def sound(exc: BaseException) -> bool:
    """Whether a session that saw ``exc`` may serve the next job.

    Timeouts, cancellation and the job's own errors leave it sound (gufo-snmp drops late
    answers by request id); an authentication or decoding failure, or a bug, do not.
    """
    if isinstance(exc, AuthFailed | ProtocolError):
        return False
    return isinstance(exc, BridgeError) or not isinstance(exc, Exception)
