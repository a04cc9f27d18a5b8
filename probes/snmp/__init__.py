"""SNMP: GET, GETNEXT, walks and tables (``probe``), on one agent or many; see
``probes/snmp/probe.py`` for the package's modules."""

from probes.snmp.probe import SPEC
from probes.snmp.settings import TOPIC, SnmpSettings

__all__ = ["SPEC", "TOPIC", "SnmpSettings"]
