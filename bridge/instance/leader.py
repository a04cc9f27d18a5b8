"""One leader among the instance processes that share a PostgreSQL database.

Every process serves the API (the Table API, the dashboard: any of them, behind a load
balancer); exactly one at a time runs what must run once: the broker connector (pushing
outputs, storing inputs, the agents' heartbeats) and discovery. The leader holds a
PostgreSQL session-level advisory lock (``pg_try_advisory_lock``) on a connection of its
own; the others try again every ``retry`` seconds (1 s). The table cleaner
(``bridge.instance.table_cleaner``) runs in the leader's term too.

- **Taking over.** When the leader dies (SIGKILL, a crash, its machine gone), its
  connection closes and PostgreSQL frees the lock: a follower takes it on its next try
  (about a second; a machine that vanished without closing its connection is noticed
  when PostgreSQL's TCP keepalive gives up on it, ``tcp_keepalives_*``) and enters the
  leader's work (``lead()``): the outputs in flight (``processing``) get an expired lease,
  so the connector that starts pushes them again at once (the old leader may have claimed
  some and died before sending them; the bridges drop repeats by ``sys_id`` and answers
  are stored once), and discovery closes as Error the runs the old leader was driving.
- **Losing it.** The leader checks its lock connection every ``retry`` seconds; if the
  connection fails the leader stops its work at once (it may no longer hold the lock) and
  goes back to trying. Correctness never rests on the lock alone: claims are
  ``FOR UPDATE SKIP LOCKED`` and answers are stored once (``insert_input_once``), so two
  connectors for a moment would push some outputs twice, never store an answer twice.
- **Followers.** Discovery's routes answer 503 naming the leader's role (a follower does
  not drive runs: its engine would not survive it); everything else is served.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import socket
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import AbstractAsyncContextManager, asynccontextmanager
from typing import Any

import asyncpg
from aiohttp import web

from bridge.instance import discovery
from bridge.instance.app_keys import START_RUN
from bridge.instance.connector import Connector, ConnectorSettings
from bridge.instance.discovery import CANCEL_ROUTE, RUN_ROUTE
from bridge.instance.pg_store import shown_url
from bridge.instance.platform_credentials import PlatformKeys
from bridge.instance.query import escape
from bridge.instance.table_cleaner import DEFAULT_INTERVAL, TableCleaner
from bridge.wire.broker import BrokerConfig

log = logging.getLogger("midbridge.instance.leader")

LOCK = "hashtext(current_schema() || '/midbridge-leader')"
Lead = Callable[[], AbstractAsyncContextManager[object]]


class Leadership:
    """``async with Leadership(url, lead)``: try for the lock until it is held, run
    ``lead()`` (an async context manager: entered on taking the lead, left on losing it or
    on exit); ``is_leader`` says which this process is now."""

    def __init__(
        self,
        url: str,
        lead: Lead,
        *,
        retry: float = 1.0,
        on_change: Callable[[bool], object] | None = None,
        identity: str | None = None,
    ) -> None:
        self.url = url
        self.lead = lead
        self.retry = retry
        self.on_change = on_change
        self.is_leader = False
        self.terms = 0  # how many times this process took the lead
        # Who this is (host:pid), in the lock connection's application_name.
        self.identity = identity or f"{socket.gethostname()}:{os.getpid()}"
        self._task: asyncio.Task[None] | None = None
        self._told = False

    async def __aenter__(self) -> Leadership:
        self._task = asyncio.get_running_loop().create_task(self._run(), name="leadership")
        return self

    async def __aexit__(self, *exc: object) -> None:
        task, self._task = self._task, None
        if task is not None:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task

    def _set(self, leader: bool) -> None:
        if leader == self.is_leader and self._told:
            return
        self._told = True  # a follower is told so once, when its first try fails
        self.is_leader = leader
        log.warning(
            "%s: this instance (%s) %s",
            "leader" if leader else "follower",
            self.identity,
            "runs the connector and discovery"
            if leader
            else "does not run the connector and discovery (another one leads)",
        )
        if self.on_change is not None:
            self.on_change(leader)

    async def _run(self) -> None:
        while True:
            try:
                await self._term()
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                log.warning("leadership on %s: %s; trying again", shown_url(self.url), exc)
            self._set(False)
            await asyncio.sleep(self.retry)

    async def _term(self) -> None:
        """Connect, wait for the lock, lead while the connection holds it."""
        conn = await asyncpg.connect(self.url, timeout=10)
        try:
            await conn.execute(f"SET application_name = 'midbridge {self.identity}'")
            while True:  # until the lock is ours: a try every ``retry`` seconds
                if await conn.fetchval(f"SELECT pg_try_advisory_lock({LOCK})"):
                    break
                self._set(False)
                await asyncio.sleep(self.retry)
            self.terms += 1
            async with self.lead():
                self._set(True)
                while True:  # the lock lives as long as this connection answers
                    await asyncio.sleep(self.retry)
                    await asyncio.wait_for(conn.fetchval("SELECT 1"), max(2.0, self.retry * 2))
        finally:
            self._set(False)
            with contextlib.suppress(Exception):
                await asyncio.wait_for(conn.close(), 5)


def install_discovery(instance: Any, leadership: Callable[[], bool]) -> discovery.DiscoveryEngine:
    """Discovery for one of several instance processes (instead of ``discovery.install``):
    its routes everywhere, answering 503 on a follower; the runs a dead leader left are
    closed by the next leader (``recover_discovery``), not at every process's start."""
    app: web.Application = instance.app
    engine = discovery.engine_for(instance.store, factory=discovery.engine_factory(instance))
    discovery.add_routes(app, engine)
    start: Callable[[str], Awaitable[str]] = app[START_RUN]

    async def start_on_leader(schedule: str) -> str:
        if not leadership():
            raise ValueError(FOLLOWER)
        return await start(schedule)

    app[START_RUN] = start_on_leader
    gated = {RUN_ROUTE, CANCEL_ROUTE}

    @web.middleware
    async def follower_gate(request: web.Request, handler: Any) -> web.StreamResponse:
        route = request.match_info.route.resource
        if route is not None and route.canonical in gated and not leadership():
            return web.json_response(
                {"error": {"message": FOLLOWER, "detail": "try the leader"}, "status": "failure"},
                status=503,
            )
        response: web.StreamResponse = await handler(request)
        return response

    app.middlewares.append(follower_gate)

    async def on_cleanup(app: web.Application) -> None:
        await engine.aclose()

    app.on_cleanup.append(on_cleanup)
    return engine


FOLLOWER = "discovery runs on the leader instance; this one is a follower (docs/scaling.md)"


def cluster_leadership(
    instance: Any,
    url: str,
    broker: tuple[BrokerConfig, str] | None,
    keys: PlatformKeys,
    *,
    retry: float = 1.0,
    table_cleaner_interval: float = DEFAULT_INTERVAL,
) -> Leadership:
    """For ``midbridge instance --db postgresql://...``, before the instance starts:
    discovery installed for a cluster, and the leadership whose term runs discovery's
    recovery, the connector (when there is a broker) and the table cleaner (every
    ``table_cleaner_interval`` seconds; 0: none). Enter it once the instance serves; it
    prints ``leader: ...`` / ``follower: ...`` lines as the role changes."""
    holder: list[Leadership] = []
    engine = install_discovery(instance, lambda: bool(holder) and holder[0].is_leader)

    @asynccontextmanager
    async def lead() -> AsyncIterator[None]:
        if table_cleaner_interval <= 0:
            async with work():
                yield
            return
        cleaner = TableCleaner(
            instance.store, table_cleaner_interval, on_deleted=instance.metrics.table_cleaned
        )
        async with cleaner, work():
            yield

    @asynccontextmanager
    async def work() -> AsyncIterator[None]:
        closed = await engine.recover()
        if closed:
            print(f"leader: closed {closed} discovery run(s) the old leader left", flush=True)
        if broker is None:
            yield
            return
        # What the old leader claimed and may never have sent (killed between its claim and
        # its publish) goes again now, not when its lease runs out: bridges drop repeats
        # by sys_id, and an answer is stored once whichever push it answers.
        leased = await instance.store.update_query(
            "ecc_queue", "queue=output^state=processing", {"lease_until": 0.0}
        )
        if leased:
            print(f"leader: {len(leased)} output(s) in flight pushed again", flush=True)
        cfg, prefix = broker
        connector = Connector(
            instance.store, cfg, settings=ConnectorSettings(prefix=prefix), keys=keys
        )
        instance.attach_connector(connector)
        async with connector, asyncio.TaskGroup() as tasks:
            settled = await settle_answered(instance.store, connector)
            if settled:
                print(f"leader: {settled} answered output(s) the old leader left open", flush=True)
            print(f"leader: connector: ECC queue on {broker_url(cfg)}", flush=True)
            janitor = tasks.create_task(_settle_leftovers(instance.store, connector))
            try:
                yield
            finally:
                janitor.cancel()

    def told(leader: bool) -> None:
        if leader:
            print("leader: this instance runs the connector and discovery", flush=True)
        else:
            print("follower: another instance leads; serving the API only", flush=True)

    leadership = Leadership(url, lead, retry=retry, on_change=told)
    holder.append(leadership)
    return leadership


def broker_url(cfg: BrokerConfig) -> str:
    if cfg.kind == "nats":
        return ",".join(cfg.nats_servers)
    return f"mqtt://{cfg.host}:{cfg.port}"


async def settle_answered(store: Any, connector: Connector) -> int:
    """Close the outputs whose answers the old leader stored and did not get to close (it
    died between storing an input and closing its output): the connector's own rule
    decides (complete record, every sequence before it). Without this they would wait for
    their lease, then be pushed to a bridge that has answered them already and drops the
    repeat. Returns how many were looked at."""
    outputs = await store.query("ecc_queue", "queue=output^state=processing")
    if not outputs:
        return 0
    answered: set[str] = set()
    ids = [o["sys_id"] for o in outputs]
    for start in range(0, len(ids), 500):
        chunk = ",".join(escape(i) for i in ids[start : start + 500])
        rows = await store.query("ecc_queue", f"queue=input^response_toIN{chunk}")
        answered.update(str(r["response_to"]) for r in rows)
    for sys_id in answered:
        progress = await connector._progress_for(sys_id)  # the connector's own rule
        if progress is not None:
            await connector._settle({sys_id: progress})
    return len(answered)


LEFTOVER_WINDOW = 30.0  # seconds after taking the lead that the old leader's work may land
LEFTOVER_EVERY = 2.0


async def _settle_leftovers(store: Any, connector: Connector) -> None:
    """Again for the first ``LEFTOVER_WINDOW`` seconds of a term: a transaction the old
    leader had sent may commit after its lock was freed, and the input it stored then
    comes back from the broker as a repeat, which the connector drops without closing the
    output."""
    loop = asyncio.get_running_loop()
    end = loop.time() + LEFTOVER_WINDOW
    while loop.time() < end:
        await asyncio.sleep(LEFTOVER_EVERY)
        try:
            await settle_answered(store, connector)
        except Exception as exc:  # the lease is the fallback
            log.warning("closing answered outputs failed: %s: %s", type(exc).__name__, exc)
