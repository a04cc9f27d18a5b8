"""The relay: a ServiceNow instance's ECC queue ↔ the broker, as one MID Server.

What it does, in order (docs/relay.md has each step with its ServiceNow reference):

1. **Registers** the MID (``registration.py``): its ``ecc_agent`` record Up, refreshed
   every ``refresh_interval``, Down at a clean stop; reads the MID properties.
2. **Picks up work** (``pickup.py``): this MID's ``ready`` outputs by priority then age,
   a batch every ``mid.poll.time``; claims them so that another relay of the same MID
   cannot run them too; publishes them to ``<prefix>/<agent>/output[/interactive]``
   through each probe's ServiceNow dialect (``jobs.py``, ``dialect/``).
   SystemCommands are answered here; while paused only they and heartbeats are taken.
3. **Receives the results** on ``<prefix>/<agent>/input``: every chunk of an output it holds
   goes to the durable spool (``spool.py``) before the broker message is acknowledged;
   chunks of outputs it does not hold are another relay's (acknowledged, ignored).
4. **Answers** each output with one input record once a run is complete (``writeback.py``).

Every job goes to the bridge signed (Ed25519, ``bridge.wire.sealing.sign_record``) with the
relay's own key: a bridge with ``security.require_signatures`` and the relay's public key as
``security.platform_key`` runs only the jobs this relay took from the instance.

Leases: an output published but not answered within ``lease`` seconds is published again
(the bridge drops a repeat by ``sys_id``). At start the relay finishes what its spool
holds and takes back its outputs left ``processing``.
"""

from __future__ import annotations

import asyncio
import logging
import re
import time
from collections.abc import Coroutine
from contextlib import AsyncExitStack, suppress
from pathlib import Path
from typing import Any

import orjson
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from bridge import __version__
from bridge.relay.dialect.control import run_system_command
from bridge.relay.http import InstanceClient, Row
from bridge.relay.jobs import Job, prepare
from bridge.relay.pickup import TOKEN_PREFIX, Claimer, ours
from bridge.relay.registration import Registration
from bridge.relay.settings import (
    TABLE_PATH,
    MidProperties,
    RelayError,
    RelaySettings,
    read_config_xml,
)
from bridge.relay.spool import Chunk, Spool
from bridge.relay.writeback import Writeback
from bridge.wire.broker import BrokerConfig
from bridge.wire.errors import BridgeError
from bridge.wire.inflight import InFlight
from bridge.wire.keyfiles import public_key_b64, signing_key_file
from bridge.wire.outputs import batches, output_topic, records_of
from bridge.wire.sealing import sign_record
from bridge.wire.session import Delivery
from bridge.wire.sessions import platform_session
from bridge.wire.topics import Topics

log = logging.getLogger("midbridge.relay")

_NAME = re.compile(r"^[A-Za-z0-9_.\-]{1,64}$")
_SYS_ID = re.compile(r"^[A-Za-z0-9_.:\-]{1,64}$")
_SECRET = re.compile(r"pass|secret|key|token|credential", re.IGNORECASE)
CONTROL_TOPICS = frozenset({"SystemCommand", "HeartbeatProbe"})  # taken while paused
CLAIM_BATCHES = 4  # claim batches settling at once
SIGNING_KEY_FILE = "relay.signing.pem"


class Relay:
    """An async context manager: the instance's client, the spool, one MQTT session, tasks."""

    def __init__(
        self,
        settings: RelaySettings,
        broker: BrokerConfig,
        *,
        logger: logging.Logger | None = None,
    ) -> None:
        if not _NAME.match(settings.agent):
            raise RelayError("must be 1-64 of A-Za-z0-9_.-", field="agent")
        self.settings = settings
        self.broker = broker
        self._log = self.logger = logger or log
        self.agent_id = f"mid.server.{settings.agent}"
        self.base = settings.instance.rstrip("/")
        self.topics = Topics.for_agent(settings.prefix, settings.agent)
        self.client = InstanceClient(
            self.base, settings.user, settings.password, verify_tls=settings.verify_tls,
            ca_file=str(settings.ca_file) if settings.ca_file else None,
            timeout=settings.request_timeout, retries=settings.retries, logger=self._log,
        )  # fmt: skip
        self.spool = Spool(settings.state_dir)
        self.signing_key = signing_key_for(settings)
        self.public_key_b64 = public_key_b64(self.signing_key)  # the bridge's platform_key
        self.claimer = Claimer(
            self.client, self.agent_id, settings.relay_id, window=settings.claim_window,
            concurrency=settings.claim_concurrency, logger=self._log,
        )  # fmt: skip
        self.registration = Registration(
            self.client, settings.agent, instance_url=self.base, logger=self._log
        )
        self.props = MidProperties.merge(("command line", settings.properties))
        self.session = platform_session(  # MQTT or NATS JetStream (``broker.kind``)
            broker,
            client_id=settings.relay_id,
            prefix=settings.prefix,
            agent=settings.agent,
            status=settings.follow_bridge_status,
            on_message=self._on_message,
            receive_maximum=1000,
            logger=self._log,
        )
        self.writeback = Writeback(self)
        self.jobs: dict[str, Job] = {}
        self.bridge_status: dict[str, Any] | None = None
        self.paused = False
        self.registered = False
        self.started_at = time.time()
        self._claiming: set[str] = set()
        self._uncertain: dict[str, tuple[Row, str, float]] = {}  # sys_id → (row, token, when)
        self._claim_slots = asyncio.Semaphore(CLAIM_BATCHES)
        self._wake = asyncio.Event()
        self._refresh_now = asyncio.Event()
        self._stack = AsyncExitStack()
        self._group: asyncio.TaskGroup | None = None
        self._tasks: set[asyncio.Task[Any]] = set()
        self._handlers = InFlight()
        self._closing = False
        self._restored = False  # the spool's jobs checked against the instance
        self.stats: dict[str, int] = dict.fromkeys(
            ("claimed", "published", "republished", "inputs", "duplicates", "ignored",
             "closed", "refused", "lost", "uncertain", "attached", "oversized", "local"), 0,
        )  # fmt: skip

    # --- lifecycle ----------------------------------------------------------------------

    async def __aenter__(self) -> Relay:
        stack = self._stack
        try:
            await self.client.open()
            stack.push_async_callback(self.client.close)
            await self.client.request("GET", TABLE_PATH, params={
                "sysparm_limit": "1", "sysparm_query": f"agent={self.agent_id}",
                "sysparm_fields": "sys_id", "sysparm_exclude_reference_link": "true",
            })  # fmt: skip
            await self.spool.open()
            stack.push_async_callback(self.spool.close)
            config_xml = (
                read_config_xml(self.settings.mid_config) if self.settings.mid_config else {}
            )
            instance_props: dict[str, str] = {}
            if self.settings.register:
                await self.registration.register("Up")
                self.registered = True
                stack.push_async_callback(self._down)
                instance_props = await self.registration.properties()
            self.props = MidProperties.merge(
                ("config.xml", config_xml),
                ("instance", instance_props),
                ("command line", self.settings.properties),
            )
            self._group = await stack.enter_async_context(asyncio.TaskGroup())
            # Held before the session starts: results the broker kept for us while we were
            # stopped arrive at once, and must find their jobs.
            spooled = [Job.from_spool(s) for s in await self.spool.jobs()]
            self.jobs.update((job.sys_id, job) for job in spooled)
            await self.session.__aenter__()
            stack.push_async_callback(self._close_session)
            stack.push_async_callback(self._cancel_tasks)  # first: no new work while closing
            await self._restore(spooled)
            self._restored = True
            if self.settings.resume:
                await self._resume()
            self.spawn(self._poll_loop(), "relay-poll")
            self.spawn(self._lease_loop(), "relay-leases")
            if self.registered:
                self.spawn(self._refresh_loop(), "relay-refresh")
        except BaseException:
            await stack.aclose()
            raise
        self._log.info(
            "relay up: %s (%s) ↔ %s:%s as %s; poll %.3g s, batch %d; jobs signed with %s "
            "(the bridge's security.platform_key)",
            self.base, self.agent_id, self.broker.host, self.broker.port, self.settings.user,
            self.poll_interval, self.batch, self.public_key_b64,
        )  # fmt: skip
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self._stack.aclose()

    def spawn(self, coro: Coroutine[Any, Any, None], name: str) -> None:
        assert self._group is not None
        if self._closing:  # stopping: the spool keeps it for the next start
            coro.close()
            return
        task = self._group.create_task(coro, name=name)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _close_session(self) -> None:
        """Disconnect, then let the handlers already running finish their writes."""
        self._closing = True
        await self.session.__aexit__(None, None, None)
        await self._handlers.drain(5.0)

    async def _cancel_tasks(self) -> None:
        self._closing = True  # the handlers take nothing more; nothing new is spawned
        for task in list(self._tasks):
            task.cancel()

    async def _down(self) -> None:
        try:
            await self.registration.down()
            self._log.info("ecc_agent %s: Down", self.settings.agent)
        except RelayError as exc:
            self._log.warning("could not set ecc_agent %s Down: %s", self.settings.agent, exc)

    @property
    def poll_interval(self) -> float:
        given = self.settings.poll_interval
        return given if given is not None else self.props.poll_time

    @property
    def batch(self) -> int:
        return self.settings.batch or self.props.batch

    # --- status and the SystemCommands' controls ---------------------------------------------

    def mid_status(self) -> str:
        if self.paused:
            return "Paused"
        bridge = str((self.bridge_status or {}).get("status") or "")
        if bridge == "Down":
            return "Down"
        if bridge in ("Paused", "Draining", "Drained"):
            return "Paused"
        return "Up"

    async def pause(self) -> None:
        self.paused = True
        self._refresh_now.set()

    async def resume(self) -> None:
        self.paused = False
        self._refresh_now.set()
        self._wake.set()

    def stats_record(self) -> dict[str, Any]:
        record: dict[str, Any] = {
            "relay": {
                **self.stats,
                "held": len(self.jobs),
                "uptime_s": round(time.time() - self.started_at, 3),
            },
            "status": self.mid_status(),
            "version": __version__,
        }
        if self.bridge_status is not None:
            record["bridge"] = self.bridge_status
        return record

    def config(self) -> list[tuple[str, str]]:
        """The MID's configuration as ``config.xml`` parameters (never a password)."""
        pairs = [
            ("url", self.base),
            ("mid.instance.username", self.settings.user),
            ("name", self.settings.agent),
            ("midbridge.broker", f"{self.broker.host}:{self.broker.port}"),
            ("midbridge.topic_prefix", self.settings.prefix),
            ("midbridge.relay_id", self.settings.relay_id),
        ]
        pairs += [
            (name, self.props.values[name])
            for name in sorted(self.props.values)
            if not _SECRET.search(name)  # e.g. glide.http.proxy_password: never echoed
        ]
        return pairs

    # --- out: poll, claim, publish ------------------------------------------------------

    async def _poll_loop(self) -> None:
        while True:
            started = 0
            try:
                started = await self.poll_once()
            except asyncio.CancelledError:
                raise
            except RelayError as exc:
                self._log.warning("poll failed: %s", exc)
            except Exception:
                self._log.exception("poll failed")
            self._wake.clear()
            delay = self.settings.busy_interval if started else self.poll_interval
            with suppress(TimeoutError):
                async with asyncio.timeout(delay):
                    await self._wake.wait()

    async def poll_once(self) -> int:
        """Fetch ready outputs and start claiming them; how many were started."""
        topics = CONTROL_TOPICS if self.paused else None
        rows, checked_at = await self.claimer.fetch("ready", self.batch, topics=topics)
        fresh = [
            row for row in rows
            if _SYS_ID.match(row.get("sys_id", ""))
            and row["sys_id"] not in self._claiming and row["sys_id"] not in self.jobs
        ]  # fmt: skip
        if not fresh:
            return 0
        await self._claim_slots.acquire()
        self._claiming.update(row["sys_id"] for row in fresh)
        self.spawn(self._claim_batch(fresh, checked_at), "relay-claim")
        return len(fresh)

    async def _claim_batch(self, rows: list[Row], checked_at: float) -> None:
        try:
            outcome = await self.claimer.claim(rows, checked_at)
            self.stats["lost"] += outcome.lost
            self.stats["uncertain"] += len(outcome.uncertain)
            recheck = time.monotonic() + self.settings.lease
            for row, token in outcome.uncertain:
                self._uncertain[row["sys_id"]] = (row, token, recheck)
            await self._adopt([prepare(row, token) for row, token in outcome.won])
        except RelayError as exc:
            self._log.warning("claim failed: %s", exc)
        except Exception:  # a bug here must not end the relay's task group
            self._log.exception("claim failed")
        finally:
            self._claiming.difference_update(row["sys_id"] for row in rows)
            self._claim_slots.release()

    async def _adopt(self, jobs: list[Job]) -> None:
        """Hold claimed jobs: spooled, then published (or answered here)."""
        if not jobs:
            return
        lease_until = time.monotonic() + self.settings.lease
        for job in jobs:
            job.lease_until = lease_until
            self.jobs[job.sys_id] = job
        await self.spool.put_jobs([job.spooled() for job in jobs])
        self.stats["claimed"] += len(jobs)
        await self._publish([job for job in jobs if job.wire is not None])
        for job in jobs:
            if job.wire is None:
                await self._answer_here(job)

    async def _publish(self, jobs: list[Job]) -> None:
        if not jobs:
            return
        by_topic: dict[str, list[bytes]] = {}
        lease_until = time.monotonic() + self.settings.lease
        for job in jobs:
            assert job.wire is not None
            job.lease_until = lease_until
            topic = output_topic(self.settings.prefix, self.settings.agent, job.wire)
            signed = sign_record(self.signing_key, job.wire)  # fresh at every publish
            by_topic.setdefault(topic, []).append(orjson.dumps(signed))
        futures = []
        for topic, bodies in by_topic.items():
            for message in batches(bodies, 200, 1_000_000):
                futures.append(await self.session.publish_start(topic, message))
        results = await asyncio.gather(*futures, return_exceptions=True)
        failed = sum(1 for r in results if isinstance(r, BaseException))
        if failed:
            self._log.warning("%d message(s) not acknowledged by the broker; the lease will "
                              "publish them again", failed)  # fmt: skip
        self.stats["published"] += len(jobs)

    async def _answer_here(self, job: Job) -> None:
        """A job the bridge never sees: a refused one, or a ServiceNow SystemCommand."""
        started = time.perf_counter()
        error = ""
        if job.refusal is not None:
            payload: dict[str, Any] = {"error": job.refusal}
            error = f"{job.refusal['kind']}: {job.refusal['message']}"
        else:
            try:
                command = str(job.extra.get("command", ""))
                payload = await run_system_command(command, _Controls(self))
            except BridgeError as exc:
                payload = {"error": {"kind": exc.kind, "message": exc.message}}
                error = f"{exc.kind}: {exc.message}"
            self.stats["local"] += 1
        record = {"payload": payload, "error_string": error,
                  "probe_time": round((time.perf_counter() - started) * 1000.0, 3)}  # fmt: skip
        await self.spool.add_chunks([Chunk(job.sys_id, "relay", 0, True, record)])
        job.done = True
        self.writeback.finish(job)

    # --- start: the spool and the outputs left processing -----------------------------------

    async def _restore(self, spooled: list[Job]) -> None:
        """Finish what the spool holds, if the outputs are still ours."""
        if not spooled:
            return
        current: dict[str, Row] = {}
        for start in range(0, len(spooled), 100):
            part = spooled[start : start + 100]
            ids = ",".join(job.sys_id for job in part)
            for row in await self.client.query(
                "ecc_queue", f"agent={self.agent_id}^queue=output^sys_idIN{ids}",
                limit=len(part), fields="sys_id,state,error_string",
            ):  # fmt: skip
                current[row.get("sys_id", "")] = row
        now = time.monotonic()
        republish: list[Job] = []
        for job in spooled:
            now_row = current.get(job.sys_id)
            held = now_row is not None and (job.stage != "running" or (
                now_row.get("state") == "processing" and now_row.get("error_string") == job.token
            ))  # fmt: skip
            if not held:
                self._log.info("spooled output %s is no longer this relay's: dropped", job.sys_id)
                self.jobs.pop(job.sys_id, None)
                await self.spool.remove(job.sys_id)
                continue
            job.lease_until = now + self.settings.lease
            if job.stage != "running" or await self.spool.complete_run(job.sys_id) is not None:
                job.done = True
                self.writeback.finish(job)
            elif job.wire is None:
                await self._answer_here(job)
            else:
                republish.append(job)
        self._log.info("spool: %d output(s) taken up again", len(self.jobs))
        await self._publish(republish)

    async def _resume(self) -> None:
        """This relay's outputs left ``processing`` (and untokened ones): claimed again."""
        rows, checked_at = await self.claimer.fetch("processing", self.batch)
        mine = [
            row for row in rows
            if row.get("sys_id") not in self.jobs and _SYS_ID.match(row.get("sys_id", ""))
            and (ours(row.get("error_string", ""), self.settings.relay_id)
                 or not row.get("error_string", "").startswith(TOKEN_PREFIX))
        ]  # fmt: skip
        if mine:
            self._log.info("taking back %d output(s) left processing", len(mine))
            await self._claim_slots.acquire()
            self._claiming.update(row["sys_id"] for row in mine)
            await self._claim_batch(mine, checked_at)

    # --- in: the bridge's records --------------------------------------------------------

    async def _on_message(self, delivery: Delivery) -> bool:
        if self._closing:
            return False  # left unacknowledged: the broker keeps it for the next start
        with self._handlers.track():
            if delivery.topic == self.topics.status:
                self._on_status(delivery.payload)
                return True
            return await self._on_input(delivery)

    def _on_status(self, payload: bytes) -> None:
        try:
            record = orjson.loads(payload) if payload else None
        except orjson.JSONDecodeError:
            return
        if isinstance(record, dict):
            before = self.mid_status()
            self.bridge_status = record
            if self.mid_status() != before:
                self._refresh_now.set()

    async def _on_input(self, delivery: Delivery) -> bool:
        try:
            data = orjson.loads(delivery.payload)
        except orjson.JSONDecodeError:
            self._log.warning("dropped a message that is not JSON on %s", delivery.topic)
            return True
        chunks: list[Chunk] = []
        for record in records_of(data):
            if not isinstance(record, dict):
                continue
            job = self.jobs.get(str(record.get("response_to") or ""))
            seq = record.get("sequence")
            if (
                job is None or job.wire is None or isinstance(seq, bool)
                or not isinstance(seq, int) or seq < 0
            ):  # fmt: skip
                self.stats["ignored"] += 1  # another relay's output, or not an answer
                continue
            kept = {k: record.get(k) for k in ("payload", "error_string", "probe_time")}
            chunks.append(Chunk(job.sys_id, str(record.get("run") or "")[:64], seq,
                                record.get("complete") is True, kept))  # fmt: skip
        if not chunks:
            return True
        try:
            added = await self.spool.add_chunks(chunks)
        except Exception:
            self._log.exception("result chunks not spooled (left for redelivery)")
            return False
        self.stats["inputs"] += added
        self.stats["duplicates"] += len(chunks) - added
        lease_until = time.monotonic() + self.settings.lease
        for sys_id in {chunk.sys_id for chunk in chunks}:
            job = self.jobs.get(sys_id)
            if job is None or job.done:
                continue
            job.lease_until = lease_until
            if self._restored and await self.spool.complete_run(sys_id) is not None:
                job.done = True  # (before the start is over, _restore looks)
                self.writeback.finish(job)
        return True

    # --- leases, uncertain claims, retries, the ecc_agent refresh ------------------------------

    async def _lease_loop(self) -> None:
        tick = max(0.05, min(5.0, self.settings.lease / 4))
        while True:
            await asyncio.sleep(tick)
            try:
                await self._lease_tick()
            except asyncio.CancelledError:
                raise
            except Exception:
                self._log.exception("lease check failed")

    async def _lease_tick(self) -> None:
        now = time.monotonic()
        expired: list[Job] = []
        for job in list(self.jobs.values()):
            if job.done or job.wire is None or job.lease_until > now:
                continue
            if await self.spool.complete_run(job.sys_id) is not None:
                job.done = True  # its last chunk came while the relay was starting
            else:
                expired.append(job)
        if expired:
            self._log.info("%d output(s) not answered within the lease: published again",
                           len(expired))  # fmt: skip
            self.stats["republished"] += len(expired)
            await self._publish(expired)
        for job in list(self.jobs.values()):
            if job.done:
                self.writeback.finish(job)  # a no-op while one is running
        due = [(s, v) for s, v in self._uncertain.items() if v[2] <= now]
        adopted: list[Job] = []
        for sys_id, (row, token, _) in due:
            del self._uncertain[sys_id]
            if sys_id in self.jobs:
                continue
            try:
                current = await self.claimer.still_ours(sys_id, token)
            except RelayError as exc:
                self._log.warning("uncertain claim of %s not checked: %s", sys_id, exc)
                self._uncertain[sys_id] = (row, token, now + self.settings.lease)
                continue
            if current is not None:
                self._log.info("uncertain claim of %s is still ours: taken", sys_id)
                adopted.append(prepare(row, token))
        await self._adopt(adopted)

    async def _refresh_loop(self) -> None:
        while True:
            with suppress(TimeoutError):
                async with asyncio.timeout(self.settings.refresh_interval):
                    await self._refresh_now.wait()
            self._refresh_now.clear()
            try:
                await self.registration.refresh(self.mid_status())
            except RelayError as exc:
                self._log.warning("ecc_agent refresh failed: %s", exc)
            except Exception:
                self._log.exception("ecc_agent refresh failed")


class _Controls:
    """What a ServiceNow SystemCommand may ask of the relay (``dialect.control.Controls``)."""

    def __init__(self, relay: Relay) -> None:
        self.relay = relay

    def stats(self) -> dict[str, Any]:
        return self.relay.stats_record()

    def config(self) -> list[tuple[str, str]]:
        return self.relay.config()

    def mid_status(self) -> str:
        return self.relay.mid_status()

    async def pause(self) -> None:
        await self.relay.pause()

    async def resume(self) -> None:
        await self.relay.resume()


def signing_key_for(settings: RelaySettings) -> Ed25519PrivateKey:
    """The key the relay signs jobs with: ``signing_key``, else ``relay.signing.pem`` in
    the state directory (made owner-only on first use), else one in memory."""
    path = settings.signing_key
    if path is None and settings.state_dir is not None:
        path = settings.state_dir / SIGNING_KEY_FILE
    if path is None:
        return Ed25519PrivateKey.generate()
    new = not path.exists()
    key = signing_key_file(path)
    if new:
        log.warning(
            "made a new job signing key in %s: bridges that require signatures run this "
            "relay's jobs only with security.platform_key = %s (relays of one MID: give "
            "them all this one file, --signing-key)",
            path,
            public_key_b64(key),
        )
    return key


def state_dir_for(base: Path, relay_id: str) -> Path:
    """The relay's spool directory under a state directory (one a relay)."""
    safe = re.sub(r"[^A-Za-z0-9_.\-]", "_", relay_id)[:100]
    return base / f"relay-{safe}"
