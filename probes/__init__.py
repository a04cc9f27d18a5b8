"""The probe registry: ECC topic → probe. Adding a probe adds one line here."""

from __future__ import annotations

from bridge.jobs import ProbeSpec
from probes import echo, heartbeat, http, shazzam, snmp, ssh, system_command

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
