"""Planning a discovery run: a schedule checked and cut into Shazzam batches, and the
classify jobs a host gets (``docs/discovery.md``; the engine that runs a plan is
``bridge/instance/discovery_engine.py``)."""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from bridge.instance.agents import agent_id, agent_name
from bridge.instance.store import Record, Store
from bridge.wire.targets import Interval, parse_ports, parse_targets

SCHEDULES = "discovery_schedule"
CREDENTIALS = "discovery_credentials"
SHAZZAM, SSH, SNMP, REST = "Shazzam", "SSHCommand", "SNMP", "RESTProbe"
SSH_TYPES = frozenset({"ssh_password", "ssh_private_key"})
SNMP_TAP_TYPES = frozenset({"snmp_community"})  # what Shazzam's SNMP tap can use
MAX_ADDRESSES = 1 << 24  # whatever a schedule says, a run holds at most this many


class DiscoveryError(Exception):
    """A run that cannot start (or be cancelled); ``status`` is the HTTP status to answer."""

    def __init__(self, message: str, status: int = 400) -> None:
        super().__init__(message)
        self.message = message
        self.status = status


def subtract(intervals: Iterable[Interval], holes: Sequence[Interval]) -> list[Interval]:
    """``intervals`` without the addresses of ``holes`` (both as ``bridge.wire.targets`` gives)."""
    out: list[Interval] = []
    for interval in intervals:
        pieces = [(interval.first, interval.last)]
        for hole in holes:
            if hole.version != interval.version:
                continue
            kept: list[tuple[int, int]] = []
            for first, last in pieces:
                if hole.last < first or hole.first > last:
                    kept.append((first, last))
                    continue
                if hole.first > first:
                    kept.append((first, hole.first - 1))
                if hole.last < last:
                    kept.append((hole.last + 1, last))
            pieces = kept
        out.extend(Interval(interval.version, first, last) for first, last in pieces)
    return out


def cut_batches(intervals: Iterable[Interval], size: int) -> list[tuple[str, int]]:
    """Consecutive batches of ``size`` addresses: (Shazzam ``targets`` text, count) each."""
    batches: list[tuple[str, int]] = []
    parts: list[str] = []
    count = 0
    for interval in intervals:
        first = interval.first
        while first <= interval.last:
            take = min(interval.last - first + 1, size - count)
            parts.append(Interval(interval.version, first, first + take - 1).text())
            count += take
            first += take
            if count == size:
                batches.append((", ".join(parts), count))
                parts, count = [], 0
    if parts:
        batches.append((", ".join(parts), count))
    return batches


def _names(text: Any) -> list[str]:
    names: list[str] = []
    for item in str(text or "").split(","):
        if item.strip() and item.strip() not in names:
            names.append(item.strip())
    return names


def _port_set(schedule: Mapping[str, Any], name: str) -> frozenset[int]:
    text = str(schedule.get(name) or "").strip()
    if not text:
        return frozenset()
    try:
        return frozenset(parse_ports(text))
    except ValueError as exc:
        raise DiscoveryError(f"{SCHEDULES}.{name}: {exc}") from None


def _positive(schedule: Mapping[str, Any], name: str, default: int, high: int) -> int:
    value = schedule.get(name)
    if value is None:
        return default
    if not isinstance(value, int) or not 1 <= value <= high:
        raise DiscoveryError(f"{SCHEDULES}.{name}: must be 1 to {high}, not {value!r}")
    return value


@dataclass(frozen=True, slots=True)
class Plan:
    """A schedule made ready to run: batches, ports, classifiers, credentials."""

    schedule: Record
    agents: tuple[str, ...]  # MID names (a cluster is one name its members share)
    batches: tuple[tuple[str, int], ...]  # (targets text, addresses)
    ports: tuple[int, ...] | None  # None: Shazzam's default ports
    snmp: bool
    snmp_port: int
    ssh_ports: frozenset[int]
    http_ports: frozenset[int]
    https_ports: frozenset[int]
    chunk_hosts: int
    parallel: int
    ssh_credentials: tuple[str | None, ...]  # one SSH attempt each; (None,): every one
    snmp_credential_ids: tuple[str, ...]  # for the tap; (): the bridge's choice
    notes: tuple[str, ...] = ()  # said in the run's log

    @property
    def addresses(self) -> int:
        return sum(count for _, count in self.batches)


async def make_plan(store: Store, schedule: Record) -> Plan:
    """Check a schedule and cut it into batches; ``DiscoveryError`` (400) if it cannot run."""
    name = str(schedule.get("name") or schedule.get("sys_id"))
    agents = tuple(_names(schedule.get("agent")))
    if not agents:
        raise DiscoveryError(f"schedule {name!r} names no MID (agent)")
    for agent in agents:
        if agent_name(agent_id(agent)) is None:
            raise DiscoveryError(f"schedule {name!r}: agent {agent[:64]!r} is not a MID name")
    try:
        targets = parse_targets(str(schedule.get("ranges") or ""))
    except ValueError as exc:
        raise DiscoveryError(f"{SCHEDULES}.ranges: {exc}") from None
    holes: tuple[Interval, ...] = ()
    if str(schedule.get("exclusions") or "").strip():
        try:
            holes = parse_targets(str(schedule["exclusions"])).intervals
        except ValueError as exc:
            raise DiscoveryError(f"{SCHEDULES}.exclusions: {exc}") from None
    limit = _positive(schedule, "max_addresses", 65_536, MAX_ADDRESSES)
    intervals = subtract(targets.intervals, holes)
    count = sum(i.size for i in intervals)
    if count > limit:
        raise DiscoveryError(
            f"the ranges cover {count} addresses, over the limit of {limit} "
            f"({SCHEDULES}.max_addresses)"
        )
    if count == 0:
        raise DiscoveryError("no address is left to scan once the exclusions are removed")
    ports_text = str(schedule.get("ports") or "").strip()
    try:
        ports = parse_ports(ports_text) if ports_text else None
    except ValueError as exc:
        raise DiscoveryError(f"{SCHEDULES}.ports: {exc}") from None
    batch_size = _positive(schedule, "batch_size", 1000, 65_536)
    snmp_port = _positive(schedule, "snmp_port", 161, 65_535)

    notes: list[str] = []
    rows = await store.query(CREDENTIALS, "active=true^ORDERBYorder^ORDERBYname")
    listed = _names(schedule.get("credentials"))
    if listed:
        known = {str(r.get("name")) for r in rows}
        for missing in (n for n in listed if n not in known):
            notes.append(f"credential {missing!r} is not an active discovery_credentials row")
        rows = [r for r in rows if r.get("name") in listed]
    ssh_names = [str(r["name"]) for r in rows if r.get("type") in SSH_TYPES]
    ssh: tuple[str | None, ...] = tuple(ssh_names) if listed else ((None,) if ssh_names else ())
    if not ssh:
        notes.append("no SSH credential to try: the SSH classifier is off")
    snmp_ids = tuple(str(r["name"]) for r in rows if r.get("type") in SNMP_TAP_TYPES)
    return Plan(
        schedule=schedule,
        agents=agents,
        batches=tuple(cut_batches(intervals, batch_size)),
        ports=ports,
        snmp=bool(schedule.get("snmp")),
        snmp_port=snmp_port,
        ssh_ports=_port_set(schedule, "ssh_ports"),
        http_ports=_port_set(schedule, "http_ports"),
        https_ports=_port_set(schedule, "https_ports"),
        chunk_hosts=_positive(schedule, "chunk_hosts", 256, 65_536),
        parallel=_positive(schedule, "parallel_batches", 4, 1024),
        ssh_credentials=ssh,
        snmp_credential_ids=snmp_ids if listed else (),
        notes=tuple(notes),
    )


@dataclass(frozen=True, slots=True)
class Attempt:
    """One classify job to try on a host."""

    kind: str  # "ssh", "snmp", "https", "http"
    topic: str
    port: int
    credential_id: str | None = None


def attempts_for(plan: Plan, open_ports: Sequence[int], snmp: Any) -> list[Attempt]:
    """The classify jobs a host gets, in ServiceNow's order (SSH, SNMP, HTTP); [] when no
    open port is one a classifier handles."""
    attempts: list[Attempt] = []
    ssh_port = next((p for p in open_ports if p in plan.ssh_ports), None)
    if ssh_port is not None:
        attempts += [Attempt("ssh", SSH, ssh_port, cred) for cred in plan.ssh_credentials]
    if isinstance(snmp, dict):
        cred = snmp.get("credential_id")
        attempts.append(
            Attempt("snmp", SNMP, plan.snmp_port, cred if isinstance(cred, str) and cred else None)
        )
    https = next((p for p in open_ports if p in plan.https_ports), None)
    if https is not None:
        attempts.append(Attempt("https", REST, https))
    http = next((p for p in open_ports if p in plan.http_ports), None)
    if http is not None:
        attempts.append(Attempt("http", REST, http))
    return attempts
