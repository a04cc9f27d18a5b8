"""Discovery runs on the built-in instance: schedule → Shazzam batches → classify → CMDB.

A run (``discovery_status``) of a schedule (``discovery_schedule``), ``docs/discovery.md``:

1. **Scanning.** The schedule's ranges, less its exclusions, are cut into batches of
   ``batch_size`` addresses (1000, as ServiceNow); each batch is one ``Shazzam`` output
   record for the schedule's MID (several MIDs: round robin). Up to ``parallel_batches``
   are in flight at once; when one finishes the next goes. Each result chunk that arrives
   counts its hosts (scanned, alive, open ports) at once: progress streams.
2. **Classification.** A host with an open port that a classifier handles gets one
   classify job, in ServiceNow's order: ``SSHCommand`` (an ``ssh_ports`` port open and an
   SSH credential to try), else ``SNMP`` (the host answered the Shazzam SNMP tap), else
   ``RESTProbe`` ``GET /`` (an ``https_ports`` port, then an ``http_ports`` one). A
   classifier that fails hands the host to the next one (and SSH to the next credential
   listed); a host that none could identify is recorded as a ``cmdb_ci_ip_address``.
3. **Identification and CMDB** (``bridge.instance.cmdb``): serial number, then MAC
   addresses, then name + IP; a match is updated, else a CI is made.

Trust: a result counts only from the agent that got the job and only about addresses
inside that job's targets (a Shazzam batch's range, a classify job's own host); anything
else is refused (not used), logged at WARNING and counted in ``discovery_status.refused``.
Credentials go where results point, so this holds for inputs written through the Table API
as much as for those the connector stores.

Everything is driven by the store's change events (``Store.add_listener``): an input
record answering one of the run's outputs, and the output becoming ``processed`` or
``error`` (the connector's doing, once every chunk is stored). Nothing polls. Events are
handled in commit order by one worker task per store, which writes the run's counts
once per group of events.

Entry points (``bridge.instance.discovery``): ``start_run`` (code),
``POST /api/midbridge/discovery/<schedule>/run`` (``install`` adds it), ``cancel_run``.
"""

from __future__ import annotations

import asyncio
import contextlib
import ipaddress
import logging
import time
import uuid
import weakref
from collections import deque
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import orjson

from bridge.instance import cmdb
from bridge.instance.agents import AgentActionError, admin_action, agent_id
from bridge.instance.discovery_plan import (
    SCHEDULES,
    SHAZZAM,
    Attempt,
    DiscoveryError,
    Plan,
    attempts_for,
    make_plan,
)
from bridge.instance.query import escape
from bridge.instance.store import Change, Record, Store
from bridge.wire.records import now_text
from bridge.wire.targets import Interval, parse_targets

log = logging.getLogger("midbridge.instance.discovery")

ECC = "ecc_queue"
STATUSES = "discovery_status"
RUNNING = ("Starting", "Scanning", "Classifying")
FINISHED = ("processed", "error")
LOG_LINES = 200  # lines of discovery_status.log kept (the latest)

_COUNTS = (
    "addresses", "scanned", "alive", "batches", "batches_done", "classify_total",
    "classified", "classify_failed", "cis_created", "cis_updated", "errors", "open_ports",
    "probes", "refused",
)  # fmt: skip


@dataclass(frozen=True, slots=True)
class DiscoverySettings:
    max_classify_in_flight: int = 256  # classify outputs waiting for an answer, per run
    ssh_connect_timeout: float = 10.0
    ssh_command_timeout: float = 30.0
    snmp_timeout: float = 2.0
    http_timeout: float = 15.0
    http_max_body: int = 65_536  # enough for a page's <title>
    priority: int = 2  # ECC priority of discovery's outputs (standard)


# --- a run's state ---------------------------------------------------------------------------


@dataclass(slots=True)
class _Host:
    ip: str
    agent: str
    ports: tuple[int, ...]
    attempts: list[Attempt]
    tried: int = 0  # attempts sent so far


@dataclass(slots=True)
class _Run:
    status_id: str
    plan: Plan
    started: float  # monotonic
    counts: dict[str, int]
    state: str = "Scanning"
    next_batch: int = 0
    scans: dict[str, int] = field(default_factory=dict)  # Shazzam output → batch index
    finished_addresses: int = 0  # addresses of the batches that are done
    queue: deque[_Host] = field(default_factory=deque)  # hosts waiting for a classify job
    classifying: set[str] = field(default_factory=set)  # classify outputs in flight
    seen: set[str] = field(default_factory=set)  # addresses counted (a repeat counts once)
    totals_seen: set[str] = field(default_factory=set)  # batches whose totals were counted
    failed_batches: int = 0
    progress: float = 0.0
    log: deque[str] = field(default_factory=lambda: deque(maxlen=LOG_LINES))
    scan_duration: float | None = None
    finished: bool = False

    def note(self, message: str) -> None:
        self.log.append(f"{time.strftime('%H:%M:%S', time.gmtime())} {message}")


@dataclass(frozen=True, slots=True)
class _Job:
    run: _Run
    kind: str  # "scan" or "classify"
    agent: str
    batch: int = -1
    host: _Host | None = None
    attempt: Attempt | None = None
    targets: tuple[Interval, ...] = ()  # a scan's batch: the only addresses it may report


def _address(text: Any) -> tuple[int, int, str] | None:
    """(IP version, number, canonical text) of an address, or None if it is not one."""
    if not isinstance(text, str):
        return None
    try:
        address = ipaddress.ip_address(text.strip())
    except ValueError:
        return None
    return address.version, int(address), str(address)


def _inside(targets: Sequence[Interval], version: int, number: int) -> bool:
    return any(i.version == version and i.first <= number <= i.last for i in targets)


def _json(value: Any) -> Any:
    if isinstance(value, dict | list):
        return value
    if not isinstance(value, str) or not value:
        return None
    try:
        return orjson.loads(value)
    except orjson.JSONDecodeError:
        return None


# --- the engine ------------------------------------------------------------------------------


class DiscoveryEngine:
    """Discovery runs on one store. Get it with :func:`engine_for` (one per store)."""

    def __init__(self, store: Store, settings: DiscoverySettings | None = None) -> None:
        self.store = store
        self.settings = settings or DiscoverySettings()
        self._runs: dict[str, _Run] = {}  # status sys_id → run
        self._jobs: dict[str, _Job] = {}  # output sys_id → what it is for
        self._events: deque[Change] = deque()
        self._wake = asyncio.Event()
        self._lock = asyncio.Lock()  # one writer of run state: the worker, start, cancel
        self._dirty: dict[str, _Run] = {}
        self._completed: dict[str, tuple[str, float]] = {}  # status → (completed, duration)
        self._worker: asyncio.Task[None] | None = None
        self._remove_listener: Callable[[], None] | None = store.add_listener(self._on_change)
        self.closed = False
        self.refused_results = 0  # results from another agent, or for addresses not asked

    # --- lifecycle ------------------------------------------------------------------------

    @property
    def active_runs(self) -> list[str]:
        return list(self._runs)

    async def aclose(self) -> None:
        """Stop handling events (runs in progress stay as they are in the store)."""
        self.closed = True
        if self._remove_listener is not None:
            self._remove_listener()
            self._remove_listener = None
        worker, self._worker = self._worker, None
        if worker is not None and not worker.done():
            worker.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await worker
        _ENGINES.pop(self.store, None)

    async def recover(self) -> int:
        """Close, as ``Error``, the runs a previous process left unfinished; how many."""
        rows = await self.store.query(STATUSES, "stateIN" + ",".join(RUNNING))
        closed = 0
        for row in rows:
            if row["sys_id"] in self._runs:
                continue
            text = str(row.get("log") or "")
            line = f"{time.strftime('%H:%M:%S', time.gmtime())} the instance stopped during the run"
            await self.store.update(
                STATUSES,
                row["sys_id"],
                {"state": "Error", "completed": now_text(), "log": (text + "\n" + line).strip()},
            )
            closed += 1
        return closed

    # --- starting and cancelling -------------------------------------------------------------

    async def _schedule(self, ref: str) -> Record:
        row = await self.store.get(SCHEDULES, ref) if ref else None
        if row is None and ref:
            rows = await self.store.query(SCHEDULES, "name=" + escape(ref), limit=1)
            row = rows[0] if rows else None
        if row is None:
            raise DiscoveryError(f"no discovery schedule with sys_id or name {ref[:80]!r}", 404)
        return row

    async def start_run(self, schedule: str) -> str:
        """Start a run of a schedule (sys_id or name); the new ``discovery_status`` sys_id."""
        if self.closed:
            raise DiscoveryError("discovery is stopped", 503)
        row = await self._schedule(schedule)
        if not row.get("active", True):
            raise DiscoveryError(f"schedule {row.get('name')!r} is not active", 409)
        async with self._lock:
            for run in self._runs.values():
                if run.plan.schedule["sys_id"] == row["sys_id"]:
                    raise DiscoveryError(
                        f"schedule {row.get('name')!r} is running already "
                        f"(discovery_status {run.status_id})",
                        409,
                    )
            plan = await make_plan(self.store, row)
            counts = dict.fromkeys(_COUNTS, 0)
            counts["addresses"] = plan.addresses
            counts["batches"] = len(plan.batches)
            status = await self.store.insert(
                STATUSES,
                {
                    "schedule": row["sys_id"],
                    "name": str(row.get("name") or ""),
                    "agent": ",".join(plan.agents),
                    "state": "Scanning",
                    "started": now_text(),
                    **counts,
                },
            )
            run = _Run(status["sys_id"], plan, time.monotonic(), counts)
            self._runs[run.status_id] = run
            run.note(
                f"run of {row.get('name')!r}: {plan.addresses} addresses in "
                f"{len(plan.batches)} batch(es), up to {plan.parallel} at once, "
                f"on {', '.join(plan.agents)}"
            )
            for note in plan.notes:
                run.note(note)
            await self._warn_agents(run)
            try:
                await self._launch_batches(run)
            except Exception as exc:  # the store refused: the run cannot go on
                run.note(f"could not send the Shazzam jobs: {exc}")
                run.next_batch = len(plan.batches)
                self._finish(run, "Error")
                raise
            finally:
                self._dirty[run.status_id] = run
                await self._flush()
        self._ensure_worker()
        return run.status_id

    async def _warn_agents(self, run: _Run) -> None:
        for name in run.plan.agents:
            rows = await self.store.query("ecc_agent", "name=" + escape(name), limit=1)
            if not rows:
                run.note(f"MID {name!r} has never reported: its jobs wait for it")
            elif rows[0].get("status") == "Down":
                run.note(f"MID {name!r} is Down: its jobs wait for it")

    async def cancel_run(self, status_sys_id: str) -> Record:
        """Cancel a run: nothing more is sent, ready outputs are closed, running ones get a
        ``SystemCommand`` cancel. Returns the status record."""
        async with self._lock:
            run = self._runs.get(status_sys_id)
            if run is None:
                row = await self.store.get(STATUSES, status_sys_id)
                if row is None:
                    raise DiscoveryError(f"no discovery_status {status_sys_id[:80]!r}", 404)
                if row.get("state") not in RUNNING:
                    raise DiscoveryError(f"the run is {row.get('state')}, not running", 409)
                done = await self.store.update(
                    STATUSES, status_sys_id, {"state": "Cancelled", "completed": now_text()}
                )
                assert done is not None
                return done
            run.next_batch = len(run.plan.batches)
            run.queue.clear()
            outputs = [*run.scans, *run.classifying]
            for sys_id in outputs:
                job = self._jobs.pop(sys_id, None)
                closed = await self.store.update_query(
                    ECC,
                    f"sys_id={escape(sys_id)}^state=ready",
                    {"state": "error", "error_string": "cancelled: the discovery run was cancelled",
                     "processed": now_text()},
                )  # fmt: skip
                if not closed and job is not None:
                    with contextlib.suppress(AgentActionError):
                        await admin_action(self.store, job.agent, "cancel", job_sys_id=sys_id)
            run.scans.clear()
            run.classifying.clear()
            run.note(f"cancelled; {len(outputs)} job(s) in flight were cancelled")
            self._finish(run, "Cancelled")
            await self._flush()
            row = await self.store.get(STATUSES, status_sys_id)
            assert row is not None
            return row

    # --- events --------------------------------------------------------------------------

    def _on_change(self, change: Change) -> None:
        """Store listener (must not block): keep the events about our outputs."""
        if change.table != ECC or not self._jobs:
            return
        record = change.record
        if change.op == "insert":
            if record.get("queue") == "input" and record.get("response_to") in self._jobs:
                self._events.append(change)
                self._wake.set()
                self._ensure_worker()
        elif change.op == "update" and (
            record.get("sys_id") in self._jobs
            and record.get("queue") == "output"
            and record.get("state") in FINISHED
            and (change.previous or {}).get("state") not in FINISHED
        ):
            self._events.append(change)
            self._wake.set()
            self._ensure_worker()

    def _ensure_worker(self) -> None:
        if self.closed or (self._worker is not None and not self._worker.done()):
            return
        self._worker = asyncio.get_running_loop().create_task(self._work(), name="discovery-worker")

    async def _work(self) -> None:
        while self._runs or self._events:
            if not self._events:
                self._wake.clear()
                await self._wake.wait()
                continue
            async with self._lock:
                handled = 0
                while self._events and handled < 1000:
                    change = self._events.popleft()
                    handled += 1
                    try:
                        await self._handle(change)
                    except asyncio.CancelledError:
                        raise
                    except Exception:
                        log.exception("discovery: handling %s of %s failed", change.op,
                                      change.record.get("sys_id"))  # fmt: skip
                await self._flush()

    async def _handle(self, change: Change) -> None:
        record = change.record
        if change.op == "insert":
            job = self._jobs.get(str(record.get("response_to")))
            if job is None or job.kind != "scan" or job.run.finished:
                return
            if record.get("agent") != agent_id(job.agent):
                self._refuse(job, record, f"from {record.get('agent')!r}, not the job's agent")
                return
            self._scan_chunk(job, record)
            await self._launch_classify(job.run)
            return
        job = self._jobs.pop(str(record["sys_id"]), None)
        if job is None or job.run.finished:
            return
        if job.kind == "scan":
            await self._scan_done(job, record)
        else:
            await self._classify_done(job, record)

    # --- scanning ------------------------------------------------------------------------

    async def _launch_batches(self, run: _Run) -> None:
        plan = run.plan
        rows = []
        while len(run.scans) < plan.parallel and run.next_batch < len(plan.batches):
            index = run.next_batch
            run.next_batch += 1
            targets, _count = plan.batches[index]
            agent = plan.agents[index % len(plan.agents)]
            payload: dict[str, Any] = {"targets": targets, "chunk_hosts": plan.chunk_hosts}
            if plan.ports is not None:
                payload["ports"] = list(plan.ports)
            if plan.snmp:
                payload.update(snmp=True, snmp_port=plan.snmp_port)
                if plan.snmp_credential_ids:
                    payload["snmp_credential_ids"] = list(plan.snmp_credential_ids)
            sys_id = uuid.uuid4().hex
            name = f"Discovery {plan.schedule.get('name')}: batch {index + 1}/{len(plan.batches)}"
            rows.append(self._output(run, sys_id, agent, SHAZZAM, name, targets, payload))
            bounds = parse_targets(targets).intervals
            self._jobs[sys_id] = _Job(run, "scan", agent, batch=index, targets=bounds)
            run.scans[sys_id] = index
        if rows:
            await self._insert(rows)

    def _output(
        self, run: _Run, sys_id: str, agent: str, topic: str, name: str, source: str,
        payload: Mapping[str, Any],
    ) -> dict[str, Any]:  # fmt: skip
        return {
            "sys_id": sys_id,
            "agent": agent_id(agent),
            "topic": topic,
            "name": name[:255],
            "source": source,
            "queue": "output",
            "state": "ready",
            "priority": self.settings.priority,
            "agent_correlator": run.status_id,
            "payload": orjson.dumps(dict(payload)).decode(),
        }

    async def _insert(self, rows: list[dict[str, Any]]) -> None:
        try:
            await self.store.insert_many(ECC, rows)
        except BaseException:
            for row in rows:  # never sent: nothing will answer them
                job = self._jobs.pop(row["sys_id"], None)
                if job is not None:
                    job.run.scans.pop(row["sys_id"], None)
                    job.run.classifying.discard(row["sys_id"])
            raise

    def _scan_chunk(self, job: _Job, record: Record) -> None:
        """One Shazzam result chunk: count its hosts, queue the ones to classify."""
        run = job.run
        payload = _json(record.get("payload"))
        if not isinstance(payload, dict):
            return
        counts = run.counts
        hosts = payload.get("hosts")
        outside: list[str] = []
        for host in hosts if isinstance(hosts, list) else ():
            address = _address(host.get("ip") if isinstance(host, dict) else None)
            if address is None:
                continue
            if not _inside(job.targets, address[0], address[1]):
                outside.append(address[2])
                continue
            ip = address[2]
            if ip in run.seen:
                continue
            run.seen.add(ip)
            counts["scanned"] += 1
            if host.get("alive") is True:
                counts["alive"] += 1
            ports = sorted(
                {
                    item["port"]
                    for item in host.get("open") or ()
                    if isinstance(item, dict) and isinstance(item.get("port"), int)
                }
            )
            counts["open_ports"] += len(ports)
            attempts = attempts_for(run.plan, ports, host.get("snmp"))
            if attempts:
                counts["classify_total"] += 1
                run.queue.append(_Host(ip, job.agent, tuple(ports), attempts))
        if outside:
            self._refuse(job, record, f"{len(outside)} host(s) outside the batch, e.g. "
                         f"{outside[0]}")  # fmt: skip
        totals = payload.get("totals")
        response_to = str(record.get("response_to"))
        if isinstance(totals, dict) and response_to not in run.totals_seen:
            run.totals_seen.add(response_to)
            probes = totals.get("probes")
            if isinstance(probes, int) and not isinstance(probes, bool):
                counts["probes"] += probes
        self._dirty[run.status_id] = run

    async def _scan_done(self, job: _Job, output: Record) -> None:
        run = job.run
        plan = run.plan
        run.scans.pop(output["sys_id"], None)
        run.counts["batches_done"] += 1
        run.finished_addresses += plan.batches[job.batch][1]
        if output.get("state") == "error":
            run.counts["errors"] += 1
            run.failed_batches += 1
            run.note(
                f"batch {job.batch + 1}/{len(plan.batches)} ({plan.batches[job.batch][0][:80]}) "
                f"failed: {str(output.get('error_string') or 'error')[:300]}"
            )
        await self._launch_batches(run)
        if not run.scans and run.next_batch >= len(plan.batches) and run.scan_duration is None:
            run.scan_duration = time.monotonic() - run.started
            run.state = "Classifying"
            run.note(
                f"scan done in {run.scan_duration:.2f} s: {run.counts['scanned']} scanned, "
                f"{run.counts['alive']} alive, {run.counts['classify_total']} to classify"
            )
        self._dirty[run.status_id] = run
        await self._launch_classify(run)
        self._finish_if_done(run)

    # --- classification --------------------------------------------------------------------

    async def _launch_classify(self, run: _Run) -> None:
        rows = []
        while run.queue and len(run.classifying) < self.settings.max_classify_in_flight:
            host = run.queue.popleft()
            attempt = host.attempts[host.tried]
            host.tried += 1
            sys_id = uuid.uuid4().hex
            rows.append(self._classify_output(run, sys_id, host, attempt))
            self._jobs[sys_id] = _Job(run, "classify", host.agent, host=host, attempt=attempt)
            run.classifying.add(sys_id)
        if rows:
            await self._insert(rows)

    def _classify_output(
        self, run: _Run, sys_id: str, host: _Host, attempt: Attempt
    ) -> dict[str, Any]:
        settings = self.settings
        payload: dict[str, Any]
        target = {"host": host.ip, "port": attempt.port}
        if attempt.kind == "ssh":
            payload = {
                **target,
                "command": cmdb.SSH_COMMAND,
                "connect_timeout": settings.ssh_connect_timeout,
                "command_timeout": settings.ssh_command_timeout,
                "max_output": 65_536,
            }
        elif attempt.kind == "snmp":
            payload = {
                **target,
                "oid_spec_list": cmdb.SNMP_OIDS,
                "timeout": settings.snmp_timeout,
                "retries": 1,
            }
        else:
            payload = {
                "url": f"{attempt.kind}://{cmdb.host_port(host.ip, attempt.port)}/",
                "verify": False,  # discovery records the certificate, trusted or not
                "timeout": settings.http_timeout,
                "max_body": settings.http_max_body,
            }
        if attempt.credential_id:
            payload["credential_id"] = attempt.credential_id
        name = f"Discovery {run.plan.schedule.get('name')}: classify {attempt.kind}"
        return self._output(run, sys_id, host.agent, attempt.topic, name, host.ip, payload)

    async def _answer(self, job: _Job, output_id: str) -> list[dict[str, Any]]:
        """The payloads of the run of answers that completed the output, in sequence order:
        only the job's agent's, and only about the job's host."""
        rows = await self.store.query(
            ECC, f"queue=input^response_to={escape(output_id)}^ORDERBYsequence"
        )
        by_run: dict[str, dict[int, Record]] = {}
        for row in rows:
            if not self._answer_usable(job, row):
                continue
            seq = row.get("sequence")
            chunks = by_run.setdefault(str(row.get("run") or ""), {})
            chunks[seq if isinstance(seq, int) else 0] = row
        for chunks in by_run.values():
            last = next((s for s, r in chunks.items() if r.get("complete")), None)
            if last is not None and all(i in chunks for i in range(last + 1)):
                payloads = [_json(chunks[i].get("payload")) for i in range(last + 1)]
                return [p for p in payloads if isinstance(p, dict)]
        return []

    def _answer_usable(self, job: _Job, row: Record) -> bool:
        """An answer to a classify job counts only from the job's agent, about its host."""
        if row.get("agent") != agent_id(job.agent):
            self._refuse(job, row, f"from {row.get('agent')!r}, not the job's agent")
            return False
        payload = _json(row.get("payload"))
        named = payload.get("host") if isinstance(payload, dict) else None
        if named is None or job.host is None:
            return True
        address = _address(named)
        if address is None or address[2] != job.host.ip:
            self._refuse(job, row, f"about {str(named)[:80]!r}, not the job's host {job.host.ip}")
            return False
        return True

    def _refuse(self, job: _Job, record: Mapping[str, Any], reason: str) -> None:
        """A result discovery will not use: logged, counted in the run, said in its log."""
        run = job.run
        output = record.get("response_to") or record.get("sys_id")
        run.counts["refused"] += 1
        self.refused_results += 1
        run.note(f"refused a result for output {output}: {reason[:200]}")
        self._dirty[run.status_id] = run
        log.warning(
            "discovery: refused a result of agent %r for output %s (run %s): %s",
            str(record.get("agent"))[:80], output, run.status_id, reason[:300],
        )  # fmt: skip

    def _observe(self, attempt: Attempt, host: _Host, payloads: list[dict[str, Any]]) -> Any:
        if not payloads:
            return None
        if attempt.kind == "ssh":
            return cmdb.parse_ssh(host.ip, payloads[-1], host.ports)
        if attempt.kind == "snmp":
            return cmdb.parse_snmp(host.ip, payloads, host.ports)
        return cmdb.parse_http(host.ip, attempt.port, payloads[-1], host.ports)

    async def _classify_done(self, job: _Job, output: Record) -> None:
        run = job.run
        host, attempt = job.host, job.attempt
        assert host is not None
        assert attempt is not None
        run.classifying.discard(output["sys_id"])
        observation: cmdb.Observation | None = None
        error = ""
        if output.get("state") == "processed":
            answer = await self._answer(job, output["sys_id"])
            observation = self._observe(attempt, host, answer)
            if observation is None:
                error = "the answer does not tell what the host is"
        else:
            error = str(output.get("error_string") or "error")
        if observation is not None:
            await self._record(run, observation)
            run.counts["classified"] += 1
        else:
            run.counts["errors"] += 1
            if host.tried < len(host.attempts):
                following = host.attempts[host.tried]
                run.note(f"{host.ip}: {attempt.kind} classification failed ({error[:200]}); "
                         f"next: {following.kind}")  # fmt: skip
                run.queue.appendleft(host)
            else:
                run.note(f"{host.ip}: {attempt.kind} classification failed ({error[:200]}); "
                         "no classifier left: recorded as an IP address")  # fmt: skip
                run.counts["classify_failed"] += 1
                await self._record(run, cmdb.ip_only(host.ip, host.ports))
        self._dirty[run.status_id] = run
        await self._launch_classify(run)
        self._finish_if_done(run)

    async def _record(self, run: _Run, observation: cmdb.Observation) -> None:
        _ci, created = await cmdb.upsert(self.store, observation, status_sys_id=run.status_id)
        run.counts["cis_created" if created else "cis_updated"] += 1

    # --- the end and the status record ------------------------------------------------------

    def _finish_if_done(self, run: _Run) -> None:
        if run.finished or run.scans or run.classifying or run.queue:
            return
        if run.next_batch < len(run.plan.batches):
            return
        failed_all = run.failed_batches == len(run.plan.batches)
        self._finish(run, "Error" if failed_all else "Completed")

    def _finish(self, run: _Run, state: str) -> None:
        run.finished = True
        run.state = state
        duration = time.monotonic() - run.started
        if run.scan_duration is None:
            run.scan_duration = duration
        counts = run.counts
        run.note(
            f"{state.lower()} in {duration:.2f} s: {counts['classified']} classified, "
            f"{counts['cis_created']} CI(s) created, {counts['cis_updated']} updated, "
            f"{counts['errors']} error(s)"
        )
        self._runs.pop(run.status_id, None)
        for sys_id in [*run.scans, *run.classifying]:
            self._jobs.pop(sys_id, None)
        self._dirty[run.status_id] = run
        self._completed[run.status_id] = (now_text(), duration)

    def _progress(self, run: _Run) -> float:
        if run.finished:
            return 100.0
        counts = run.counts
        scanned = min(counts["addresses"], max(counts["scanned"], run.finished_addresses))
        classified = counts["classified"] + counts["classify_failed"]
        total = counts["addresses"] + counts["classify_total"]
        value = 100.0 * (scanned + classified) / total if total else 0.0
        run.progress = max(run.progress, min(99.99, round(value, 2)))
        return run.progress

    async def _flush(self) -> None:
        """Write the counts of the runs that changed (once per group of events)."""
        dirty, self._dirty = self._dirty, {}
        for status_id, run in dirty.items():
            fields: dict[str, Any] = {
                **run.counts,
                "state": run.state,
                "progress": self._progress(run),
                "log": "\n".join(run.log),
            }
            if run.scan_duration is not None:
                fields["scan_duration"] = round(run.scan_duration, 3)
            done = self._completed.pop(status_id, None)
            if done is not None:
                fields["completed"], duration = done
                fields["duration"] = round(duration, 3)
            try:
                await self.store.update(STATUSES, status_id, fields)
            except Exception:
                log.exception("discovery: writing discovery_status %s failed", status_id)


# One engine per store: the store's listener and the runs' state live in it.
_ENGINES: weakref.WeakKeyDictionary[Any, DiscoveryEngine] = weakref.WeakKeyDictionary()


EngineFactory = Callable[[Store, DiscoverySettings | None], DiscoveryEngine]


def engine_for(
    store: Store,
    settings: DiscoverySettings | None = None,
    factory: EngineFactory | None = None,
) -> DiscoveryEngine:
    """The discovery engine of ``store`` (made on first use; ``settings`` and ``factory``,
    the engine's class, e.g. ``bridge.instance.discovery_xml.XmlDiscoveryEngine`` in
    ServiceNow-compatibility mode, then apply)."""
    engine = _ENGINES.get(store)
    if engine is None or engine.closed:
        engine = (factory or DiscoveryEngine)(store, settings)
        _ENGINES[store] = engine
    return engine
