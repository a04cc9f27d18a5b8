"""Starting the sample targets: every target of a kind on one port, what listens where."""

from __future__ import annotations

import contextlib
import errno
import ipaddress
import secrets
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from dataclasses import dataclass, field, replace
from functools import partial

from bridge.demo.targets.network import (
    DEFAULT_SSH_USER,
    NETWORK,
    LinuxHost,
    Ports,
    SnmpDevice,
    Target,
)
from bridge.demo.targets.snmp import start_snmp
from bridge.demo.targets.ssh import start_ssh
from bridge.demo.targets.web import start_web

PORT_TRIES = 10  # a port taken on this machine: the next one up, for every target of a kind


def _generated() -> str:
    return "demo-" + secrets.token_urlsafe(12)


@dataclass(frozen=True, slots=True)
class TargetSettings:
    ssh_user: str = DEFAULT_SSH_USER
    ssh_password: str = field(default_factory=_generated)  # generated: the demo's own
    snmp_community: str = field(default_factory=_generated)
    ports: Ports = field(default_factory=Ports)
    bind: str | None = None  # serve every target on this address instead of its own
    only: frozenset[str] | None = None  # target names; None: all


@dataclass(frozen=True, slots=True)
class Listening:
    target: Target
    service: str  # "ssh", "snmp", "http", "https"
    address: str
    port: int

    @property
    def where(self) -> str:
        proto = "udp" if self.service == "snmp" else "tcp"
        return f"{self.address}:{self.port}/{proto}"


@dataclass(slots=True)
class RunningTargets:
    settings: TargetSettings
    ports: Ports  # as bound (a port taken on this machine moves its kind one up)
    listening: list[Listening] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)

    @property
    def addresses(self) -> list[str]:
        return sorted({item.address for item in self.listening}, key=ipaddress.ip_address)


Starter = Callable[[str, int], Awaitable[Callable[[], Awaitable[None]]]]


async def _bind_kind(
    service: str,
    preferred: int,
    items: Sequence[tuple[Target, str, Starter]],
    stops: list[Callable[[], Awaitable[None]]],
    running: RunningTargets,
) -> int:
    """Start every item of one service on one port: ``preferred`` or the next free one."""
    if not items:
        return preferred
    last_error: OSError | None = None
    for port in range(preferred, min(preferred + PORT_TRIES, 65536)):
        started: list[Callable[[], Awaitable[None]]] = []
        try:
            for _target, address, start in items:
                started.append(await start(address, port))
        except OSError as exc:
            last_error = exc
            for stop in reversed(started):
                await stop()
            if exc.errno == errno.EADDRNOTAVAIL:
                running.notes.append(
                    f"{service}: {exc.strerror} ({len(items)} target(s) not started): this "
                    "machine has only some 127.0.0.x addresses on its loopback interface "
                    "(macOS: sudo ifconfig lo0 alias 127.0.0.11 up, and so on)"
                )
                return preferred
            continue
        stops.extend(started)
        running.listening += [Listening(t, service, a, port) for t, a, _ in items]
        if port != preferred:
            running.notes.append(f"{service}: port {preferred} is taken here; using {port}")
        return port
    running.notes.append(
        f"{service}: no free port in {preferred}-{preferred + PORT_TRIES - 1} ({last_error}); "
        f"{len(items)} target(s) not started"
    )
    return preferred


@contextlib.asynccontextmanager
async def demo_targets(settings: TargetSettings | None = None) -> AsyncIterator[RunningTargets]:
    """Start the sample targets; stop them on exit."""
    settings = settings or TargetSettings()
    chosen = [t for t in NETWORK if settings.only is None or t.name in settings.only]
    stops: list[Callable[[], Awaitable[None]]] = []
    running = RunningTargets(settings, settings.ports)
    user, password, community = settings.ssh_user, settings.ssh_password, settings.snmp_community

    def at(target: Target) -> str:
        return settings.bind or target.address

    ssh: list[tuple[Target, str, Starter]] = []
    snmp: list[tuple[Target, str, Starter]] = []
    http: list[tuple[Target, str, Starter]] = []
    https: list[tuple[Target, str, Starter]] = []
    for target in chosen:
        if isinstance(target, LinuxHost):
            ssh.append(
                (target, at(target), partial(start_ssh, target, user=user, password=password))
            )
        elif isinstance(target, SnmpDevice):
            snmp.append((target, at(target), partial(start_snmp, target, community=community)))
        else:
            if target.http:
                http.append((target, at(target), partial(start_web, target, tls=False)))
            if target.https:
                https.append((target, at(target), partial(start_web, target, tls=True)))
    try:
        ports = settings.ports
        ports = replace(ports, ssh=await _bind_kind("ssh", ports.ssh, ssh, stops, running))
        ports = replace(ports, snmp=await _bind_kind("snmp", ports.snmp, snmp, stops, running))
        ports = replace(ports, http=await _bind_kind("http", ports.http, http, stops, running))
        ports = replace(ports, https=await _bind_kind("https", ports.https, https, stops, running))
        running.ports = ports
        yield running
    finally:
        for stop in reversed(stops):
            with contextlib.suppress(Exception):
                await stop()
