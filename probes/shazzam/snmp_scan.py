"""Shazzam's SNMP scan: its credentials, and the join of each host's TCP ports and SNMP tap."""

from __future__ import annotations

import asyncio
import resource
from collections.abc import AsyncGenerator, Iterator, Sequence
from typing import Any

from bridge.wire.credentials import Credential
from bridge.wire.errors import CredentialError
from probes.contract import Job, ProbeContext
from probes.kit.ratelimit import RateLimiter
from probes.shazzam.engine import HostResult, Sweep
from probes.shazzam.params import ShazzamParams
from probes.shazzam.snmp_tap import snmp_tap_credentials
from probes.snmp.credentials import COMMUNITY

FD_RESERVE = 256  # file descriptors left to the rest of the bridge

# The SNMP scan: addresses tapped at once (each tap holds up to two UDP sockets per
# community), the taps per address and the interval between them.
SNMP_IN_FLIGHT = 256
SNMP_TAPS = 2
SNMP_TAP_INTERVAL = 0.2  # seconds
# What a host's "snmp" holds: the tap's answer minus its host (the host's "ip") and its
# index into the community list. Named, so that nothing else can ever slip through.
_SNMP_FIELDS = (
    "port", "version", "credential_id", "sys_descr", "sys_object_id", "sys_name", "rtt_ms",
)  # fmt: skip


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


def snmp_in_flight(communities: int) -> int:
    """Addresses tapped at once: each holds up to 2 sockets per community while tapped."""
    per_address = SNMP_TAPS * communities
    soft, _hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft == resource.RLIM_INFINITY:
        return SNMP_IN_FLIGHT
    sockets = max(0, soft - FD_RESERVE) // 4  # TCP connects take up to half (_concurrency)
    return max(1, min(SNMP_IN_FLIGHT, sockets // per_address))


def _snmp_answer(answer: dict[str, Any] | None) -> dict[str, Any] | None:
    if answer is None:
        return None
    return {key: answer.get(key) for key in _SNMP_FIELDS}


async def _take(rate: RateLimiter, tokens: int) -> None:
    while tokens > 0:
        tokens -= await rate.acquire(tokens)


class SnmpJoin:
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
