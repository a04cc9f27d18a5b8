"""The SNMP session pool: sessions kept per agent and credential, leased one job at a time."""

from __future__ import annotations

import asyncio
import collections
import contextlib
import time
from dataclasses import dataclass, field
from pathlib import Path

from gufo.snmp import SnmpVersion
from gufo.snmp.aio.client import SnmpSession

from bridge.wire.credentials import Credential
from bridge.wire.errors import AuthFailed, BridgeError
from probes.contract import ProbeContext
from probes.snmp.client import Policy, SnmpClient
from probes.snmp.credentials import fingerprint, v3_user
from probes.snmp.errors import sound
from probes.snmp.reader import Reader, RequestDeadlines
from probes.snmp.settings import SnmpSettings
from probes.snmp.versions import GUFO_VERSION, SESSION_TIMEOUT, Version

_V3_REFRESH_AFTER = 100.0  # s idle before a pooled v3 session re-syncs engine time (window 150 s)
_SWEEP_EVERY = 30.0  # s between sweeps of idle sessions


class Gate:
    """A semaphore that hands a freed slot straight to the next waiter.

    ``asyncio.Semaphore`` costs about 2 µs to take and give back even when free (3.11
    checks every waiter in ``locked()``); a pooled session is leased once per GET.
    """

    __slots__ = ("free", "waiters")

    def __init__(self, slots: int) -> None:
        self.free = slots
        self.waiters: collections.deque[asyncio.Future[None]] = collections.deque()

    def try_take(self) -> bool:
        if self.free > 0 and not self.waiters:
            self.free -= 1
            return True
        return False

    async def take(self) -> None:
        if self.try_take():
            return
        waiter: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self.waiters.append(waiter)
        try:
            await waiter
        except asyncio.CancelledError:
            if waiter.done() and not waiter.cancelled():
                self.give()  # handed a slot just as we were cancelled: pass it on
            else:
                with contextlib.suppress(ValueError):
                    self.waiters.remove(waiter)
            raise

    def give(self) -> None:
        while self.waiters:
            waiter = self.waiters.popleft()
            if not waiter.done():
                waiter.set_result(None)
                return
        self.free += 1


@dataclass(frozen=True, slots=True)
class Target:
    address: str  # IP literal
    port: int
    version: Version


@dataclass(slots=True, eq=False)
class Pooled:
    session: SnmpSession
    has_priv: bool
    reader: Reader | None = None  # registered once discovery is done
    last_used: float = field(default_factory=time.monotonic)
    client: SnmpClient | None = None  # made on the first lease, reset on each

    def lease_client(self, version: Version, policy: Policy) -> SnmpClient:
        client = self.client
        if client is None:
            client = self.client = SnmpClient(
                self.session,
                version=version,
                has_priv=self.has_priv,
                policy=policy,
                reader=self.reader,
            )
            return client
        client.policy = policy
        client.reader = self.reader
        client.requests = 0
        client.resumed = 0
        return client

    def listen(self, deadlines: RequestDeadlines) -> None:
        if self.reader is None:
            self.reader = Reader(self.session._fd, deadlines)

    def fresh(self) -> bool:
        """For v3: still within the agent's engine time window (no re-sync needed)."""
        return time.monotonic() - self.last_used < _V3_REFRESH_AFTER

    def drop(self) -> None:
        """Unregister the socket: the session is about to be forgotten (and closed)."""
        if self.reader is not None:
            self.reader.close()
            self.reader = None


@dataclass(slots=True)
class Group:
    gate: Gate
    idle: list[Pooled] = field(default_factory=list)
    leased: int = 0


def new_session(target: Target, cred: Credential) -> tuple[SnmpSession, bool]:
    """A gufo session for ``cred`` (not yet discovered for v3) and whether it encrypts."""
    try:
        if target.version == "3":
            user = v3_user(cred)
            session = SnmpSession(
                addr=target.address,
                port=target.port,
                user=user,
                version=SnmpVersion.v3,
                timeout=SESSION_TIMEOUT,
            )
            return session, user.priv_key is not None
        return (
            SnmpSession(
                addr=target.address,
                port=target.port,
                community=cred.fields["community"],
                version=GUFO_VERSION[target.version],
                timeout=SESSION_TIMEOUT,
            ),
            False,
        )
    except OSError as exc:
        raise BridgeError(f"cannot open a UDP socket: {exc.strerror or exc}") from None


class Lease:
    """One lease of :class:`SnmpPool` (a class, not a generator: it runs once per job)."""

    __slots__ = ("cred", "group", "policy", "pool", "pooled", "target")

    def __init__(
        self, pool: SnmpPool, group: Group, target: Target, cred: Credential, policy: Policy
    ) -> None:
        self.pool = pool
        self.group = group
        self.target = target
        self.cred = cred
        self.policy = policy
        self.pooled: Pooled | None = None

    async def __aenter__(self) -> SnmpClient:
        self.pooled = pooled = await self.pool.enter(
            self.group, self.target, self.cred, self.policy
        )
        return pooled.lease_client(self.target.version, self.policy)

    async def __aexit__(self, exc_type: object, exc: BaseException | None, tb: object) -> None:
        self.pool.leave(self.group, self.pooled, exc is None or sound(exc))


class SnmpPool:
    """Sessions kept per (address, port, version, credential); one job per session at a time.

    A v3 session costs an engine discovery and a time sync when made (~450 sessions/s
    against one agent, where a kept session answers thousands of GETs/s), and gufo-snmp
    mixes up answers when two requests share a session. So each job *leases* a session:
    an idle one if there is one, else a new one while fewer than ``per_target`` are
    leased for that key, else it waits. Sessions idle longer than ``idle_seconds`` are
    dropped (gufo-snmp sessions have no close: dropping the last reference closes the
    socket). The pool also remembers which credential last worked for an agent, so a job
    that tries several starts with that one.
    """

    def __init__(
        self,
        *,
        per_target: int = 2,
        max_sessions: int = 1024,
        idle_seconds: float = 300.0,
        max_in_flight: int = 256,
    ) -> None:
        self.per_target = per_target
        self.max_sessions = max_sessions
        self.idle_seconds = idle_seconds
        self._groups: dict[tuple[str, int, str, str], Group] = {}  # address, port, version, cred
        self._working: dict[tuple[str, int], str] = {}  # (address, port) → credential id
        self._idle_count = 0
        self._last_sweep = time.monotonic()
        self._closed = False
        self.created = 0  # sessions made over the pool's life (v3: one discovery each)
        self.budget = asyncio.Semaphore(max_in_flight)  # agents queried at once by hosts jobs
        self._timeouts: RequestDeadlines | None = None

    @property
    def idle(self) -> int:
        return self._idle_count

    def preferred(self, address: str, port: int) -> str | None:
        return self._working.get((address, port))

    def remember(self, address: str, port: int, cred_id: str) -> None:
        if len(self._working) >= 65_536:
            self._working.clear()
        self._working[(address, port)] = cred_id

    def lease(self, target: Target, cred: Credential, policy: Policy) -> Lease:
        """``async with pool.lease(...) as client``: a session of its own for the block."""
        return Lease(self, self.group(target, cred), target, cred, policy)

    def group(self, target: Target, cred: Credential) -> Group:
        """The sessions of (target, credential), marked in use: :meth:`enter` must follow."""
        return self.group_of(target.address, target.port, target.version, fingerprint(cred))

    def group_of(self, address: str, port: int, version: str, fingerprint: str) -> Group:
        """:meth:`group` by its parts (``fingerprint``: :func:`fingerprint` of the credential)."""
        if self._closed:
            raise BridgeError("the SNMP session pool is closed (the bridge is stopping)")
        key = (address, port, version, fingerprint)
        group = self._groups.get(key)
        if group is None:
            group = self._groups[key] = Group(Gate(self.per_target))
        group.leased += 1  # from now on: the group is in use, the sweep keeps it
        return group

    async def enter(self, group: Group, target: Target, cred: Credential, policy: Policy) -> Pooled:
        """A session of the group for the caller alone, until :meth:`leave`."""
        if not group.gate.try_take():
            try:
                await group.gate.take()
            except BaseException:
                group.leased -= 1
                raise
        idle = group.idle
        if idle and (target.version != "3" or idle[-1].fresh()):
            self._idle_count -= 1
            return idle.pop()  # the common case, without a coroutine
        try:
            return await self._take(group, target, cred, policy)
        except BaseException:
            self.leave(group, None, keep=False)
            raise

    def enter_now(
        self, group: Group, address: str, port: int, version: Version, cred: Credential
    ) -> Pooled | None:
        """:meth:`enter` when it needs no wait: a free slot and an idle (or new v1/v2c)
        session. ``None``: nothing taken, and the group is no longer marked in use by the
        caller (call :meth:`group` again to use the awaiting :meth:`enter`)."""
        if not group.gate.try_take():
            group.leased -= 1
            return None
        idle = group.idle
        if idle and (version != "3" or idle[-1].fresh()):
            self._idle_count -= 1
            return idle.pop()
        if version == "3":  # engine discovery first: that waits
            group.gate.give()
            group.leased -= 1
            return None
        try:
            session, has_priv = new_session(Target(address, port, version), cred)
        except BaseException:
            self.leave(group, None, keep=False)
            raise
        self.created += 1
        pooled = Pooled(session, has_priv)
        try:
            pooled.listen(self._deadlines())
        except BaseException:
            self.leave(group, None, keep=False)
            raise
        return pooled

    def leave(self, group: Group, pooled: Pooled | None, keep: bool) -> None:
        """Give back what :meth:`enter` gave (``keep``: the session may serve again)."""
        self._give_back(group, pooled, keep)

    def _give_back(self, group: Group, pooled: Pooled | None, keep: bool) -> None:
        if pooled is not None:
            if keep and not self._closed:
                pooled.last_used = time.monotonic()
                group.idle.append(pooled)
                self._idle_count += 1
            else:
                pooled.drop()
        group.gate.give()
        group.leased -= 1
        if self._idle_count > self.max_sessions or (
            pooled is not None and pooled.last_used - self._last_sweep >= _SWEEP_EVERY
        ):
            self._sweep()

    async def _take(self, group: Group, target: Target, cred: Credential, policy: Policy) -> Pooled:
        while group.idle:
            pooled = group.idle.pop()
            self._idle_count -= 1
            if target.version != "3" or pooled.fresh():
                return pooled
            # The library's refresh registers the socket itself: step aside meanwhile.
            pooled.drop()
            client = SnmpClient(
                pooled.session, version="3", has_priv=pooled.has_priv, policy=policy
            )
            try:
                await client.refresh()  # engine time window: 150 s
            except AuthFailed:
                continue  # the agent changed (engine id, users): make a new session
            pooled.listen(self._deadlines())
            return pooled
        session, has_priv = new_session(target, cred)
        self.created += 1
        if target.version == "3":
            await SnmpClient(session, version="3", has_priv=has_priv, policy=policy).discover()
        pooled = Pooled(session, has_priv)
        pooled.listen(self._deadlines())
        return pooled

    @property
    def deadlines(self) -> RequestDeadlines:
        return self._deadlines()

    def _deadlines(self) -> RequestDeadlines:
        if self._timeouts is None:
            self._timeouts = RequestDeadlines(asyncio.get_running_loop())
        return self._timeouts

    def _sweep(self) -> None:
        """Drop idle sessions past ``idle_seconds``, then the oldest past ``max_sessions``
        (run on a give-back at most every :data:`_SWEEP_EVERY` s, or when over the cap)."""
        now = time.monotonic()
        self._last_sweep = now
        for key, group in list(self._groups.items()):
            fresh = [p for p in group.idle if now - p.last_used < self.idle_seconds]
            if len(fresh) < len(group.idle):
                for pooled in group.idle:
                    if now - pooled.last_used >= self.idle_seconds:
                        pooled.drop()
            self._idle_count -= len(group.idle) - len(fresh)
            group.idle = fresh
            if not group.idle and group.leased == 0:
                del self._groups[key]
        excess = self._idle_count - self.max_sessions
        if excess > 0:  # drop the least recently used
            idle = [(p, g) for g in self._groups.values() for p in g.idle]
            idle.sort(key=lambda item: item[0].last_used)
            for pooled, group in idle[:excess]:
                group.idle.remove(pooled)
                pooled.drop()
            self._idle_count -= excess

    async def aclose(self) -> None:
        """Drop every session (their sockets close with them)."""
        self._closed = True
        for group in self._groups.values():
            for pooled in group.idle:
                pooled.drop()
        self._groups.clear()
        self._working.clear()
        self._idle_count = 0


def new_pool(settings: SnmpSettings) -> SnmpPool:
    return SnmpPool(
        per_target=settings.sessions_per_target,
        max_sessions=settings.max_sessions,
        idle_seconds=settings.idle_seconds,
        max_in_flight=settings.max_in_flight,
    )


def open_pool(settings: SnmpSettings, _state_dir: Path | None) -> contextlib.aclosing[SnmpPool]:
    """``ProbeSpec.resource``: the probe's pool, from the bridge's start to its stop."""
    return contextlib.aclosing(new_pool(settings))


def pool_of(ctx: ProbeContext) -> SnmpPool:
    """The pool the runtime opened with :func:`open_pool` (``ctx.resource``)."""
    pool = ctx.resource
    if not isinstance(pool, SnmpPool):
        raise TypeError(
            f"the SNMP probe's ctx.resource is {type(pool).__name__}, not the SnmpPool "
            "its ProbeSpec.resource (open_pool) opens: was the resource entered?"
        )
    return pool
