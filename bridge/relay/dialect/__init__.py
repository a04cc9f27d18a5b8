"""ServiceNow dialects at the relay's edge: one a probe (docs/relay.md, "Dialects").

Used for outputs whose payload is ServiceNow's XML ``<parameters>``; outputs with a JSON
payload speak the bridge's own wire and pass as they are.
"""

from __future__ import annotations

from bridge.relay.dialect.base import Dialect, Mapped, ParamReader
from bridge.relay.dialect.control import Heartbeat, SystemCommand
from bridge.relay.dialect.rest import RESTProbe
from bridge.relay.dialect.shazzam import Shazzam
from bridge.relay.dialect.snmp import SNMP
from bridge.relay.dialect.ssh import SSHCommand

GENERIC = Dialect()
DIALECTS: dict[str, Dialect] = {
    d.topic: d for d in (SSHCommand(), Shazzam(), SNMP(), RESTProbe(), Heartbeat(), SystemCommand())
}
LOCAL_TOPICS = frozenset({SystemCommand.topic})  # answered by the relay itself


def dialect_for(topic: str) -> Dialect:
    """The topic's dialect, or the generic one (parameters as they are)."""
    return DIALECTS.get(topic, GENERIC)


__all__ = ["DIALECTS", "GENERIC", "LOCAL_TOPICS", "Dialect", "Mapped", "ParamReader",
           "dialect_for"]  # fmt: skip
