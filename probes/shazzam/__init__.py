"""Shazzam: the TCP connect sweep (``probe``, engine in ``engine``), with an optional SNMP
tap (``snmp_scan``, ``snmp_tap``); settings are ``[probes.shazzam]`` (``settings``)."""

from probes.shazzam.params import TOPIC
from probes.shazzam.probe import SPEC
from probes.shazzam.settings import ShazzamSettings

__all__ = ["SPEC", "TOPIC", "ShazzamSettings"]
