"""The probe registry: ECC topic → probe. Adding a probe adds one line here."""

from __future__ import annotations

from probes import echo, heartbeat, http, shazzam, snmp, ssh, system_command
from probes.contract import ProbeSpec

REGISTRY: dict[str, ProbeSpec] = {
    spec.topic: spec
    for spec in (
        echo.SPEC,
        shazzam.SPEC,
        http.SPEC,
        heartbeat.SPEC,
        system_command.SPEC,
        snmp.SPEC,
        ssh.SPEC,
    )
}
