"""Shazzam: the TCP connect sweep of discovery's Scanning phase.

Which addresses answer, and which of the given TCP ports are open on them. Reference:
``docs/probes/Shazzam.md``. The engine is :mod:`probes.tcp_sweep` (epoll in a worker
thread, or worker processes for a big unpaced sweep); this module validates the job,
runs the engine and turns finished hosts into result chunks.

With ``snmp: true`` the sweep also taps UDP ``snmp_port`` (161) of every address with
the job's ``snmp_community`` credentials (:func:`probes.snmp.snmp_tap_credentials`: a GET
of sysDescr / sysObjectID / sysName, two taps a short interval apart), on the event loop
while the TCP engine runs in its thread. :class:`_SnmpJoin` pairs the two halves: a host
is reported once its TCP ports and its tap are both done.
"""

from __future__ import annotations

import asyncio
import contextlib
import resource
import time
from collections.abc import AsyncGenerator, AsyncIterator, Iterator, Mapping, Sequence
from typing import Any

from pydantic import Field, ValidationError, field_validator
from pydantic_core import PydanticCustomError

from bridge.agent.config import ShazzamConfig
from bridge.wire.credentials import Credential
from bridge.wire.errors import BadParameter, BridgeError, ConfigError, CredentialError, Refused
from bridge.wire.records import OutputRecord
from bridge.wire.targets import TargetSet, parse_ports, parse_targets
from probes.contract import Job, ProbeContext, ProbeParams, ProbeSpec, parse_params
from probes.kit.ratelimit import RateLimiter
from probes.services import service_name
from probes.snmp import COMMUNITY, snmp_tap_credentials
from probes.tcp_sweep import HostResult, Sweep, SweepError, SweepOptions, iter_hosts

TOPIC = "Shazzam"

# The TCP ports discovery's classifiers look at: remote shells and file transfer, web,
# Windows (WMI/RPC, NetBIOS, SMB, WinRM, RDP), mail, and the common databases.
DEFAULT_PORTS: tuple[int, ...] = (
    21, 22, 23, 25, 80, 135, 139, 443, 445, 1433, 1521, 3306, 3389, 5432, 5985, 5986,
    8080, 8443,
)  # fmt: skip

# Engines beyond the first are worker processes (threads would share the GIL), each worth
# starting only past this many probes. Measured on 2 idle cores, loopback, 100 ports, one
# engine thread vs two worker processes: 25,400 probes ~128k vs ~128k probes/s (process
# start-up eats the gain), 51,000 probes ~132k vs ~179k, 204,600 probes ~131k vs ~228k
# (1.74 ×). With the cores busy elsewhere, two processes gained nothing: hence
# ``engines`` stays 1 unless configured.
PROBES_PER_EXTRA_ENGINE = 25_000
_FD_RESERVE = 256  # file descriptors left to the rest of the bridge

# The SNMP scan: addresses tapped at once (each tap holds up to two UDP sockets per
# community), the taps per address and the interval between them.
SNMP_IN_FLIGHT = 256
SNMP_TAPS = 2
SNMP_TAP_INTERVAL = 0.2  # seconds
MAX_SNMP_CREDENTIAL_IDS = 32
# What a host's "snmp" holds: the tap's answer minus its host (the host's "ip") and its
# index into the community list. Named, so that nothing else can ever slip through.
_SNMP_FIELDS = (
    "port", "version", "credential_id", "sys_descr", "sys_object_id", "sys_name", "rtt_ms",
)  # fmt: skip


def _clean_error(exc: ValueError) -> PydanticCustomError:
    """A parse error as pydantic reports it, without the ``Value error,`` prefix."""
    return PydanticCustomError("value_error", str(exc))


class ShazzamParams(ProbeParams):
    """A sweep. ``targets`` holds the canonical, merged form (``first-last`` intervals)."""

    targets: tuple[str, ...]
    ports: tuple[int, ...] = DEFAULT_PORTS
    connect_timeout: float = Field(1.0, gt=0, le=60)  # seconds before a port is filtered
    banner: bool = False  # read what an open port says first
    banner_timeout: float = Field(0.5, gt=0, le=10)  # seconds to wait for it
    chunk_hosts: int = Field(256, ge=1, le=65_536)  # hosts in one result chunk
    snmp: bool = False  # also tap UDP snmp_port with the snmp_community credentials
    snmp_port: int = Field(161, ge=1, le=65_535)
    snmp_timeout: float = Field(1.0, gt=0, le=30)  # seconds from the first tap to giving up
    snmp_credential_ids: tuple[str, ...] | None = None  # None: every snmp_community, in order

    @field_validator("targets", mode="before")
    @classmethod
    def _parse_targets(cls, value: Any) -> tuple[str, ...]:
        try:
            return parse_targets(value).texts()
        except ValueError as exc:
            raise _clean_error(exc) from None

    @field_validator("ports", mode="before")
    @classmethod
    def _parse_ports(cls, value: Any) -> tuple[int, ...]:
        try:
            return parse_ports(value)
        except ValueError as exc:
            raise _clean_error(exc) from None

    @field_validator("snmp_credential_ids", mode="before")
    @classmethod
    def _parse_credential_ids(cls, value: Any) -> tuple[str, ...] | None:
        if value is None:
            return None
        if isinstance(value, str):
            items: list[Any] = value.split(",")
        elif isinstance(value, list | tuple):
            items = list(value)
        else:
            raise PydanticCustomError(
                "value_error", "a list of credential ids, or one text of ids separated by commas"
            )
        ids: list[str] = []
        for item in items:
            if not isinstance(item, str):
                raise PydanticCustomError("value_error", "credential ids are texts")
            text = item.strip()
            if text and text not in ids:
                ids.append(text)
        if not ids:
            raise PydanticCustomError("value_error", "no credential id given")
        if len(ids) > MAX_SNMP_CREDENTIAL_IDS:
            raise PydanticCustomError(
                "value_error", f"at most {MAX_SNMP_CREDENTIAL_IDS} credential ids"
            )
        return tuple(ids)

    def target_set(self) -> TargetSet:
        return parse_targets(list(self.targets))


def _config(settings: Mapping[str, Any]) -> ShazzamConfig:
    known = {k: v for k, v in settings.items() if k in ShazzamConfig.model_fields}
    try:
        return ShazzamConfig.model_validate(known)
    except ValidationError as exc:
        first = exc.errors()[0]
        loc = ".".join(str(part) for part in first.get("loc", ()))
        raise ConfigError(str(first.get("msg", "invalid")), field=f"probes.shazzam.{loc}") from None


def build_params(record: OutputRecord, settings: Mapping[str, Any]) -> ShazzamParams:
    """Parameters from the payload (targets default to the record's ``source``).

    Raises ``BadParameter`` naming the field, or ``Refused`` for a sweep over the limits.
    """
    cfg = _config(settings)
    data = {k: v for k, v in record.payload.items() if v is not None}
    if "targets" not in data:
        if not record.source.strip():
            raise BadParameter(
                "no targets: give payload 'targets' or the record's source", field="targets"
            )
        data["targets"] = record.source
    data.setdefault("connect_timeout", cfg.connect_timeout)
    data.setdefault("chunk_hosts", cfg.chunk_hosts)
    params = parse_params(ShazzamParams, data)
    addresses = params.target_set().count
    if addresses > cfg.max_addresses:
        raise Refused(
            f"the sweep covers {addresses} addresses, over the limit of {cfg.max_addresses}"
            " (probes.shazzam.max_addresses): split it into smaller jobs",
            field="targets",
        )
    probes = addresses * len(params.ports)
    if probes > cfg.max_probes:
        raise Refused(
            f"{addresses} addresses × {len(params.ports)} ports = {probes} probes, over the"
            f" limit of {cfg.max_probes} (probes.shazzam.max_probes): split it into smaller jobs"
        )
    return params


def _concurrency(configured: int) -> int:
    """Connects in flight, kept well inside the process's file descriptor limit."""
    soft, _hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft == resource.RLIM_INFINITY:
        return configured
    return max(16, min(configured, (soft - _FD_RESERVE) // 2))


def _host(raw: dict[str, Any]) -> dict[str, Any]:
    """Name the service on each open port (the engine reports numbers only)."""
    raw["open"] = [
        {"port": entry["port"], "service": service_name(entry["port"]), **entry}
        for entry in raw["open"]
    ]
    return raw


async def snmp_credentials(job: Job[ShazzamParams], ctx: ProbeContext) -> list[Credential]:
    """The ``snmp_community`` credentials the SNMP scan taps with, in order.

    ``snmp_credential_ids`` names them, else every one the bridge has. None usable →
    ``CredentialError`` naming ``snmp`` (or ``snmp_credential_ids``); ``Refused`` (the MID
    is not validated) passes through.
    """
    ids = job.params.snmp_credential_ids
    field = "snmp" if ids is None else "snmp_credential_ids"
    if ctx.credentials is None:
        raise CredentialError(
            "the SNMP scan needs an snmp_community credential; this bridge has none",
            field=field,
        )
    found: list[Credential] = []
    try:
        if ids is None:
            found = await ctx.credentials.resolve(
                job.record, credential_id=None, types=(COMMUNITY,)
            )
        else:
            for cred_id in ids:
                found += await ctx.credentials.resolve(
                    job.record, credential_id=cred_id, types=(COMMUNITY,)
                )
    except CredentialError as exc:
        if exc.field != "credential_id":  # e.g. a sealed credential that does not open
            raise
        # The resolver names the parameter of the SNMP probe; this job's is another.
        raise CredentialError(
            f"the SNMP scan needs an snmp_community credential: {exc.message}", field=field
        ) from None
    usable: list[Credential] = []
    communities: set[str] = set()
    for cred in found:
        community = cred.fields.get("community", "")
        if cred.type == COMMUNITY and community and community not in communities:
            communities.add(community)  # the same community twice: the same packet twice
            usable.append(cred)
    if not usable:
        raise CredentialError(
            "the SNMP scan needs an snmp_community credential with a community", field=field
        )
    return usable


def _snmp_in_flight(communities: int) -> int:
    """Addresses tapped at once: each holds up to 2 sockets per community while tapped."""
    per_address = SNMP_TAPS * communities
    soft, _hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft == resource.RLIM_INFINITY:
        return SNMP_IN_FLIGHT
    sockets = max(0, soft - _FD_RESERVE) // 4  # TCP connects take up to half (_concurrency)
    return max(1, min(SNMP_IN_FLIGHT, sockets // per_address))


def _snmp_answer(answer: dict[str, Any] | None) -> dict[str, Any] | None:
    if answer is None:
        return None
    return {key: answer.get(key) for key in _SNMP_FIELDS}


async def _take(rate: RateLimiter, tokens: int) -> None:
    while tokens > 0:
        tokens -= await rate.acquire(tokens)


class _SnmpJoin:
    """The TCP sweep's hosts, each completed with its SNMP tap, as batches of hosts.

    Tap workers (``in_flight`` of them) walk the addresses in order, taking
    ``SNMP_TAPS`` × communities tokens from a paced rate before each address: every
    packet the tap may send is paid for before it goes. A task pumps the sweep's batches
    in. The two halves of a host meet in :meth:`batches`, which yields a host only when
    both are in. The pump stops reading the sweep while ``window`` TCP results wait for
    their taps, so the engine (whose own window then fills) stops admitting addresses.
    """

    def __init__(
        self,
        sweep: Sweep,
        addresses: Iterator[str],
        total: int,
        credentials: Sequence[Credential],
        *,
        port: int,
        timeout: float,
        rate: RateLimiter,
        in_flight: int,
        window: int,
    ) -> None:
        self._sweep = sweep
        self._addresses = addresses
        self._total = total
        self._credentials = list(credentials)
        self._port = port
        self._timeout = timeout
        self._interval = min(SNMP_TAP_INTERVAL, timeout)
        self._rate = None if rate.unlimited else rate
        self._tokens = SNMP_TAPS * len(self._credentials)
        self._token_lock = asyncio.Lock()  # one worker at a time waits for the budget
        self._in_flight = max(1, min(in_flight, total))
        self._window = window
        self._events: asyncio.Queue[tuple[str, Any]] = asyncio.Queue()
        self._tcp_waiting = 0  # TCP results taken from the sweep and not yet joined
        self._room = asyncio.Event()

    async def _pump(self) -> None:
        try:
            async for batch in self._sweep:
                self._events.put_nowait(("tcp", batch))
                self._tcp_waiting += len(batch)
                while self._tcp_waiting >= self._window:
                    self._room.clear()
                    await self._room.wait()
            self._events.put_nowait(("tcp_end", None))
        except Exception as exc:
            self._events.put_nowait(("fail", exc))

    async def _tap_worker(self) -> None:
        try:
            for ip in self._addresses:  # shared: each address goes to one worker
                if self._rate is not None:
                    async with self._token_lock:
                        await _take(self._rate, self._tokens)
                error: str | None = None
                try:
                    answer = await snmp_tap_credentials(
                        ip,
                        self._credentials,
                        port=self._port,
                        timeout=self._timeout,
                        taps=SNMP_TAPS,
                        interval=self._interval,
                    )
                except OSError as exc:  # a local fault (no socket, IPv6 off): no answer
                    answer, error = None, exc.strerror or str(exc)
                self._events.put_nowait(("snmp", (ip, _snmp_answer(answer), error)))
        except Exception as exc:
            self._events.put_nowait(("fail", exc))

    async def batches(self) -> AsyncGenerator[list[HostResult], None]:
        tcp: dict[str, HostResult] = {}  # TCP half in, tap still running
        taps: dict[str, tuple[dict[str, Any] | None, str | None]] = {}  # the other way round
        tasks = [asyncio.create_task(self._pump(), name="shazzam-snmp-pump")]
        tasks += [
            asyncio.create_task(self._tap_worker(), name="shazzam-snmp-tap")
            for _ in range(self._in_flight)
        ]
        joined = tapped = 0
        tcp_ended = False

        def join(host: HostResult, tap: tuple[dict[str, Any] | None, str | None]) -> HostResult:
            answer, error = tap
            host["snmp"] = answer
            if error is not None:
                host["snmp_error"] = error
            if answer is not None:
                host["alive"] = True
            return host

        try:
            # Once the sweep is over and every address is tapped, nothing more can join.
            while joined < self._total and not (tcp_ended and tapped == self._total):
                ready: list[HostResult] = []
                kind, data = await self._events.get()
                while True:
                    if kind == "tcp":
                        for host in data:
                            tap = taps.pop(host["ip"], None)
                            if tap is None:
                                tcp[host["ip"]] = host
                            else:
                                ready.append(join(host, tap))
                    elif kind == "snmp":
                        ip, answer, error = data
                        tapped += 1
                        host = tcp.pop(ip, None)
                        if host is None:
                            taps[ip] = (answer, error)
                        else:
                            ready.append(join(host, (answer, error)))
                    elif kind == "tcp_end":
                        tcp_ended = True
                    else:
                        raise data
                    if self._events.empty():
                        break
                    kind, data = self._events.get_nowait()
                if ready:
                    joined += len(ready)
                    self._tcp_waiting -= len(ready)
                    if self._tcp_waiting < self._window:
                        self._room.set()
                    yield ready
        finally:
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)


async def _tcp_only(sweep: Sweep) -> AsyncGenerator[list[HostResult], None]:
    async for batch in sweep:
        yield batch


async def run(job: Job[ShazzamParams], ctx: ProbeContext) -> AsyncIterator[dict[str, Any]]:
    params = job.params
    cfg = _config(ctx.settings)
    targets = params.target_set()
    total = targets.count
    chunk = params.chunk_hosts
    # Before any packet: a sweep that cannot tap SNMP fails at once.
    credentials = await snmp_credentials(job, ctx) if params.snmp else []
    options = SweepOptions(
        ports=params.ports,
        timeout=params.connect_timeout,
        concurrency=_concurrency(cfg.concurrency),
        per_host=max(1, ctx.per_host_limit),
        banner=params.banner,
        banner_timeout=params.banner_timeout,
    )
    engines = min(cfg.engines, max(1, total * len(params.ports) // PROBES_PER_EXTRA_ENGINE))
    intervals = [(i.version, i.first, i.last) for i in targets.intervals]
    reported = done = alive = open_ports = snmp_answered = 0
    pending: list[dict[str, Any]] = []
    started = time.monotonic()
    window = max(4096, 2 * chunk)
    sweep = Sweep(intervals, options, rate=ctx.rate, engines=engines, window=window)
    if params.snmp:
        batches = _SnmpJoin(
            sweep,
            (ip for _version, ip in iter_hosts(intervals)),
            total,
            credentials,
            port=params.snmp_port,
            timeout=params.snmp_timeout,
            rate=ctx.rate,
            in_flight=_snmp_in_flight(len(credentials)),
            window=window,
        ).batches()
    else:
        batches = _tcp_only(sweep)
    try:
        async with sweep, contextlib.aclosing(batches):
            async for batch in batches:
                for host in batch:
                    pending.append(_host(host))
                    alive += host["alive"]
                    open_ports += len(host["open"])
                    snmp_answered += host.get("snmp") is not None
                done += len(batch)
                # Hold back the last full chunk until more hosts come: the last chunk
                # always carries hosts as well as the totals.
                while len(pending) > chunk or (len(pending) == chunk and done < total):
                    reported += chunk
                    yield {
                        "hosts": pending[:chunk],
                        "chunk_hosts": chunk,
                        "progress": {"done": reported, "total": total},
                    }
                    del pending[:chunk]
    except SweepError as exc:
        raise BridgeError(str(exc)) from None
    duration = time.monotonic() - started
    if reported + len(pending) != total:
        raise BridgeError(
            f"the sweep engine stopped after {reported + len(pending)} of {total} addresses"
        )
    probes = sweep.stats.probes
    totals: dict[str, Any] = {
        "addresses": total,
        "alive": alive,
        "open_ports": open_ports,
        "probes": probes,
        "duration_s": round(duration, 3),
        "probes_per_s": round(probes / duration) if duration > 0 else 0,
    }
    if params.snmp:
        totals["snmp_answered"] = snmp_answered
    yield {
        "hosts": pending,
        "chunk_hosts": len(pending),
        "progress": {"done": total, "total": total},
        "totals": totals,
    }


SPEC = ProbeSpec(topic=TOPIC, params=ShazzamParams, run=run, build_params=build_params)
