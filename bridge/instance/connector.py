"""The instance's broker connector: ECC output records out, input records in.

One broker session, MQTT 5 or NATS JetStream (the platform's side of ``docs/wire-contract.md``):

- **Out.** The store tells us of every committed write (``Store.add_listener``); an output
  record that becomes ``ready`` wakes the pusher at once. It claims what is ready in one
  atomic statement (``update_query``: ``ready → processing``, a lease, ``attempts + 1``),
  attaches sealed credentials where a job needs them and the agent is validated, signs
  each record (Ed25519), and publishes them batched (a JSON array, at most
  ``batch_records`` a message and under ``max_message_bytes``) to
  ``<prefix>/<agent>/output``, or ``.../output/interactive`` for priority 0,
  ``HeartbeatProbe`` and ``SystemCommand``. A scan every ``sweep_interval`` catches what
  no event announced (records written before we started, or by another process).
- **Hold.** Work for an agent that is Down or has never reported stays ``ready`` (control
  jobs excepted) and goes out when its status record says it is up: nothing is pushed
  into a void.
- **Leases.** An output pushed but not answered by ``lease_until`` is pushed again
  (at-least-once; the bridge drops repeats by ``sys_id``). Each chunk that arrives for it
  moves the lease on, so a long sweep that streams results is not pushed again.
- **In.** Input records from ``<prefix>/+/input`` are stored once each
  (``insert_input_once``: same ``sys_id``, or same ``response_to``/``run``/``sequence``),
  only when the output they answer was sent to the agent whose topic they came on and
  still awaits its answer (``processing``). The output becomes ``processed`` (``error`` if
  the complete record has an ``error_string``) when one run's complete record and every
  sequence before it are stored; chunks of other runs arriving before that change nothing.
- **Refused.** Whatever cannot be stored (not JSON, too large, another agent's or a
  finished output, a value the table cannot hold) is acknowledged, counted, logged and
  kept in ``ecc_dead_letter``: no message stays unacknowledged for failing, and each
  agent's inputs have a line of their own, so one agent's traffic never holds another's.
- **Status.** Retained status records from ``<prefix>/+/status`` feed ``ecc_agent``
  (:class:`bridge.instance.agents.Agents`, which also runs the heartbeats).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import re
import time
from collections import OrderedDict
from collections.abc import AsyncIterator, Mapping
from contextlib import AsyncExitStack
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import orjson

from bridge.instance.agents import (
    NAME_PATTERN,
    Agents,
    StatusRefused,
    add_routes,
    agent_id,
    agent_name,
)
from bridge.instance.platform_credentials import (
    PlatformKeys,
    credential_hook,
    credentials_for_job,
    needs_credentials,
)
from bridge.instance.query import escape
from bridge.instance.store import Change, Record, Store
from bridge.wire.broker import BrokerConfig
from bridge.wire.errors import INSECURE_DEFAULT, BadRecord, BridgeError
from bridge.wire.inflight import InFlight
from bridge.wire.outputs import (
    EXPRESS_TOPICS,
    batches,
    output_topic,
    output_wire,
    parameters,
    priority_of,
    records_of,
    text_of,
)
from bridge.wire.records import now_text
from bridge.wire.sealing import encrypt_credential
from bridge.wire.session import Delivery, Publisher
from bridge.wire.sessions import platform_session

if TYPE_CHECKING:
    from bridge.instance.server import Instance

log = logging.getLogger("midbridge.instance.connector")

ECC = "ecc_queue"
DEAD_LETTERS = "ecc_dead_letter"
FINISHED = ("processed", "error")
_SYS_ID = re.compile(r"^[A-Za-z0-9_.:\-]{1,64}$")
_IN_CHUNK = 400  # sys_ids in one ``sys_idIN`` claim


@dataclass(frozen=True, slots=True)
class ConnectorSettings:
    prefix: str = "ecc"
    lease: float = 300.0  # seconds an output may stay unanswered before it is pushed again
    lease_margin: float = 30.0  # added to a record's own timeout, when it has one
    sweep_interval: float = 5.0  # scan for ready outputs no event announced
    lease_check_interval: float = 5.0  # scan for expired leases
    linger: float = 0.001  # seconds to let a burst of inserts gather into one batch
    batch_records: int = 200  # output records in one MQTT message
    max_message_bytes: int = 1_000_000  # below the bridge's limits.max_message_bytes
    max_input_bytes: int = 16 * 1024 * 1024  # an inbound message larger than this is refused
    max_status_bytes: int = 256 * 1024  # a status record larger than this is refused
    max_records_per_message: int = 10_000  # input records taken from one message; the rest refused
    dead_letter_excerpt: int = 2048  # characters of a refused message kept in ecc_dead_letter
    dead_letters_per_agent: int = 10_000  # rows kept per agent; past it refusals are counted
    heartbeat_interval: float = 300.0
    heartbeat_timeout: float = 60.0
    client_id: str | None = None  # default: midbridge-instance-<prefix>
    receive_maximum: int = 1000


@dataclass(slots=True)
class ConnectorStats:
    pushed: int = 0  # output records published (first time)
    repushed: int = 0  # pushed again after their lease ran out
    inputs: int = 0  # input records stored
    duplicates: int = 0  # input records already stored
    finished: int = 0  # outputs moved to processed or error
    refused_inputs: int = 0  # input records refused (another agent's output, not awaited, bad)
    refused_status: int = 0  # status records refused (not an object, too large, unusable)
    dead_letters: int = 0  # ecc_dead_letter rows written
    dead_letters_dropped: int = 0  # refusals not kept: the agent's dead letters were full

    def as_dict(self) -> dict[str, int]:
        return {
            "pushed": self.pushed,
            "repushed": self.repushed,
            "inputs": self.inputs,
            "duplicates": self.duplicates,
            "finished": self.finished,
            "refused_inputs": self.refused_inputs,
            "refused_status": self.refused_status,
            "dead_letters": self.dead_letters,
            "dead_letters_dropped": self.dead_letters_dropped,
        }


class _Refused(Exception):
    """A message, or one record of it, that the connector will not store: ``reason`` says
    why; the message is acknowledged and kept in ``ecc_dead_letter``."""

    def __init__(
        self, reason: str, *, response_to: str = "", excerpt: bytes = b"", records: int = 1
    ) -> None:
        super().__init__(reason)
        self.reason = reason
        self.response_to = response_to
        self.excerpt = excerpt  # b"": the message's own start is kept
        self.records = records  # records this refusal stands for


@dataclass(slots=True)
class _Turn:
    """One agent's place in line: its messages are handled one at a time."""

    lock: asyncio.Lock = field(default_factory=asyncio.Lock)
    users: int = 0


@dataclass(slots=True)
class _Progress:
    """What is stored of one output's answers: sequences per run, complete records."""

    output: Record
    runs: dict[str, set[int]] = field(default_factory=dict)
    completes: dict[str, tuple[int, dict[str, Any]]] = field(default_factory=dict)
    finished: bool = False

    def has(self, run: str, seq: int) -> bool:
        return seq in self.runs.get(run, ())

    def add(self, run: str, seq: int, complete: bool, record: dict[str, Any]) -> None:
        self.runs.setdefault(run, set()).add(seq)
        if complete and run not in self.completes:
            self.completes[run] = (seq, record)

    def final(self) -> dict[str, Any] | None:
        """The complete record of the first run whose every chunk is stored."""
        for run, (last, record) in self.completes.items():
            seqs = self.runs.get(run, set())
            if all(i in seqs for i in range(last + 1)):
                return record
        return None


# Error answers of a bridge that refused a record's signature or its freshness.
_SIGNATURE_REFUSALS = tuple(
    f"bad_record: {field}:" for field in ("signature", "issued_at", "valid_until")
)


def _sequence(value: Any) -> int | None:
    if isinstance(value, bool):
        return None
    if isinstance(value, int) and 0 <= value < 2**31:
        return value
    return None


def input_row(record: Mapping[str, Any], agent: str, response_to: str) -> dict[str, Any]:
    """An input record from the wire as an ``ecc_queue`` row (payload as JSON text)."""
    payload = record.get("payload")
    row: dict[str, Any] = {
        "agent": agent,
        "topic": text_of(record.get("topic"))[:128],
        "name": text_of(record.get("name")),
        "source": text_of(record.get("source")),
        "queue": "input",
        "state": "ready",
        "response_to": response_to,
        "agent_correlator": text_of(record.get("agent_correlator")),
        "priority": priority_of(record.get("priority")),
        "error_string": text_of(record.get("error_string")),
        "payload": payload if isinstance(payload, str) else orjson.dumps(payload).decode(),
        "sequence": _sequence(record.get("sequence")),
        "complete": record.get("complete") is True,
        "run": text_of(record.get("run"))[:64],
    }
    sys_id = record.get("sys_id")
    if isinstance(sys_id, str) and _SYS_ID.match(sys_id):
        row["sys_id"] = sys_id
    return row


def _awaiting(progress: _Progress) -> bool:
    """The output was sent (claimed) and its answer is not complete yet."""
    return not progress.finished and progress.output.get("state") == "processing"


def _record_excerpt(record: Any, limit: int = 4096) -> bytes:
    """The start of one record as JSON, or b"" if it cannot be written (the message's
    own text is kept then)."""
    try:
        return orjson.dumps(record)[:limit]
    except (TypeError, RecursionError):
        return b""


class Connector:
    """An async context manager: the instance's session on the broker and its tasks."""

    def __init__(
        self,
        store: Store,
        broker: BrokerConfig,
        *,
        settings: ConnectorSettings | None = None,
        keys: PlatformKeys | None = None,
        logger: logging.Logger | None = None,
    ) -> None:
        self.store = store
        self.settings = settings or ConnectorSettings()
        self.keys = keys
        self._log = logger or log
        prefix = self.settings.prefix
        self.agents = Agents(
            store,
            heartbeat_interval=self.settings.heartbeat_interval,
            heartbeat_timeout=self.settings.heartbeat_timeout,
            on_up=self._agent_up,
            logger=self._log,
        )
        client_id = self.settings.client_id or "midbridge-instance-" + re.sub(
            r"[^A-Za-z0-9_.-]", "-", prefix
        )
        self.session: Publisher = platform_session(  # MQTT or NATS (``broker.kind``)
            broker,
            client_id=client_id,
            prefix=prefix,
            status=True,
            on_message=self._on_message,
            receive_maximum=self.settings.receive_maximum,
            logger=self._log,
        )
        self.stats = ConnectorStats()
        self._pending: dict[str, Record] = {}
        self._wake = asyncio.Event()
        self._scan_now = False
        self._progress: OrderedDict[str, _Progress] = OrderedDict()
        self._turns: dict[str, _Turn] = {}  # agent name → its line (only while in use)
        self._stack = AsyncExitStack()
        self._dead_letter_lock = asyncio.Lock()
        self._tasks: list[asyncio.Task[None]] = []
        self._handlers = InFlight()  # message handlers running
        self.running = False

    # --- lifecycle --------------------------------------------------------------------

    async def __aenter__(self) -> Connector:
        try:
            await self.agents.load()
            remove = self.store.add_listener(self._on_change)
            self._stack.callback(remove)
            tasks = await self._stack.enter_async_context(asyncio.TaskGroup())
            self._stack.push_async_callback(self._cancel_tasks)
            self.running = True  # before connecting: retained status records come at once
            await self.session.__aenter__()
            self._stack.push_async_callback(self._close_session)
            self._tasks = [
                tasks.create_task(self._push_loop(), name="connector-push"),
                tasks.create_task(self.agents.run(), name="connector-heartbeats"),
            ]
        except BaseException:
            self.running = False
            await self._stack.aclose()
            raise
        self._log.info(
            "connector up: %s/+/output from ecc_queue, inputs from %s/+/input",
            self.settings.prefix,
            self.settings.prefix,
        )
        self._warn_if_anonymous()
        return self

    def _warn_if_anonymous(self) -> None:
        cfg = self.session.cfg
        if cfg.username is None:
            self._log.warning(
                "connector: logged in to the broker at %s:%s without a user name "
                "(anonymous): any client that reaches the broker can read every agent's "
                "jobs and forge its results and status. Give the platform a broker user "
                "and the agents per-agent ACLs (docs/security.md)",
                cfg.host,
                cfg.port,
                extra={INSECURE_DEFAULT: True},
            )

    async def __aexit__(self, *exc: object) -> None:
        self.running = False
        await self._stack.aclose()

    async def _close_session(self) -> None:
        """Disconnect, then let the handlers already running finish their store writes."""
        await self.session.__aexit__(None, None, None)
        await self._handlers.drain(5.0)

    async def _cancel_tasks(self) -> None:
        for task in self._tasks:
            task.cancel()

    # --- events -----------------------------------------------------------------------

    def _on_change(self, change: Change) -> None:
        """Store listener: a ``ready`` output was written: push it now."""
        if change.table != ECC:
            return
        record = change.record
        self._follow_output(change)
        if change.op == "delete":
            return
        if record.get("queue") == "output" and record.get("state") == "ready":
            self._pending[record["sys_id"]] = record
            self._wake.set()

    def _follow_output(self, change: Change) -> None:
        """Keep what is cached of an output's answers in step with the output's row."""
        sys_id = change.record.get("sys_id")
        progress = self._progress.get(sys_id) if isinstance(sys_id, str) else None
        if progress is None or change.op == "insert":
            return
        if change.op == "delete" or change.record.get("state") == "ready":
            del self._progress[str(sys_id)]  # gone, or handed out anew: read it again
            return
        progress.output = change.record
        if change.record.get("state") in FINISHED:
            progress.finished = True

    def _agent_up(self, name: str) -> None:
        """An agent came up: what waited for it (ready or leased out) goes now."""
        self._scan_now = True
        self._wake.set()

    def notify(self) -> None:
        """Scan for ready and expired work now (for writers the store does not announce)."""
        self._scan_now = True
        self._wake.set()

    # --- pushing ----------------------------------------------------------------------

    async def _push_loop(self) -> None:
        settings = self.settings
        next_sweep = 0.0
        next_lease = 0.0
        while True:
            now = time.monotonic()
            wait = min(next_sweep, next_lease) - now
            if not self._pending and not self._scan_now and wait > 0:
                with contextlib.suppress(TimeoutError):
                    async with asyncio.timeout(wait):
                        await self._wake.wait()
            self._wake.clear()
            if self._pending and settings.linger > 0:
                await asyncio.sleep(settings.linger)
            await self.session.connected.wait()
            try:
                rows = list(self._pending.values())
                self._pending.clear()
                now = time.monotonic()
                scan = self._scan_now
                self._scan_now = False
                if scan or now >= next_sweep:
                    rows += await self._ready_rows()
                    next_sweep = now + settings.sweep_interval
                if rows:
                    await self._push_ready(rows)
                if scan or now >= next_lease:
                    await self._push_expired()
                    next_lease = now + settings.lease_check_interval
            except asyncio.CancelledError:
                raise
            except Exception:
                self._log.exception("pushing output records failed; retrying")
                await asyncio.sleep(0.5)

    async def _ready_rows(self) -> list[Record]:
        """Ready outputs that may go now: control jobs, and work for agents that are up."""
        ready = "queue=output^state=ready^ORDERBYsys_created_on"
        control = ",".join(sorted(EXPRESS_TOPICS))
        rows = await self.store.query(ECC, f"topicIN{control}^{ready}", limit=10_000)
        up = sorted(agent_id(n) for n, s in self.agents.statuses.items() if s != "Down")
        for start in range(0, len(up), _IN_CHUNK):
            agents = ",".join(up[start : start + _IN_CHUNK])
            rows += await self.store.query(ECC, f"agentIN{agents}^{ready}", limit=10_000)
        return rows

    def _routable(self, row: Mapping[str, Any]) -> str | None:
        """The agent's name if its work may go out now (held while it is Down)."""
        name = agent_name(row.get("agent"))
        if name is None:
            return None
        if row.get("topic") in EXPRESS_TOPICS:
            return name
        status = self.agents.status_of(name)
        return name if status is not None and status != "Down" else None

    async def _push_ready(self, rows: list[Record]) -> None:
        """Claim the ready ones among ``rows`` (atomically) and publish them."""
        order: dict[str, int] = {}
        groups: dict[tuple[int, float], list[str]] = {}
        for row in rows:
            sys_id = row.get("sys_id")
            if not isinstance(sys_id, str) or sys_id in order:
                continue
            if row.get("queue") != "output" or row.get("state") != "ready":
                continue
            if agent_name(row.get("agent")) is None:
                await self._fail(row, BadRecord("must be mid.server.<name>", field="agent"))
                continue
            if self._routable(row) is None:
                continue
            order[sys_id] = len(order)
            key = (int(row.get("attempts") or 0), self._lease_for(row))
            groups.setdefault(key, []).append(sys_id)
        if not order:
            return
        now = time.time()
        claimed: list[Record] = []
        for (attempts, lease), ids in groups.items():
            for start in range(0, len(ids), _IN_CHUNK):
                part = ",".join(ids[start : start + _IN_CHUNK])
                claimed += await self.store.update_query(
                    ECC,
                    f"sys_idIN{part}^state=ready",
                    {"state": "processing", "lease_until": now + lease, "attempts": attempts + 1},
                )
        claimed.sort(key=lambda r: order.get(r["sys_id"], 0))
        self.stats.pushed += await self._publish(claimed)

    def _lease_for(self, row: Mapping[str, Any]) -> float:
        """``lease``, or the record's own ``timeout`` plus ``lease_margin`` if longer."""
        try:
            timeout = float(row.get("timeout") or 0)
        except (TypeError, ValueError):
            timeout = 0.0
        if timeout <= 0:
            return self.settings.lease
        return max(self.settings.lease, timeout + self.settings.lease_margin)

    async def _push_expired(self) -> None:
        """Push again what was pushed and not answered within its lease."""
        now = time.time()
        rows = await self.store.query(
            ECC,
            f"queue=output^state=processing^lease_until<{now:.3f}^ORDERBYsys_created_on",
            limit=10_000,
        )
        again: list[Record] = []
        for row in rows:
            if self._routable(row) is None:
                continue  # its agent is Down: it goes when the agent is back
            attempts = int(row.get("attempts") or 0)
            claim = f"sys_id={escape(row['sys_id'])}^state=processing^" + (
                f"attempts={attempts}" if row.get("attempts") is not None else "attemptsISEMPTY"
            )
            again += await self.store.update_query(
                ECC, claim, {"lease_until": now + self._lease_for(row), "attempts": attempts + 1}
            )
        if again:
            self._log.info("%d output record(s) not answered within their lease: pushed again",
                           len(again))  # fmt: skip
            self.stats.repushed += await self._publish(again)

    async def _wire(self, row: Record, name: str) -> dict[str, Any]:
        record = output_wire(row)
        params = parameters(row.get("payload"))
        topic = record["topic"]
        if self.keys is not None and needs_credentials(topic, params):
            key = await self.agents.sealing_key(name)
            if key is not None:  # never to an agent that is not validated
                clear = await credentials_for_job(self.store, self.keys, topic, params)
                if clear:
                    record["credentials"] = [
                        encrypt_credential(key, cred, sys_id=record["sys_id"]) for cred in clear
                    ]
                del clear
        if self.keys is not None:
            record = self.keys.sign(record)
        return record

    async def _publish(self, rows: list[Record]) -> int:
        """Publish claimed rows, batched per topic; the count sent. Failures wait for the lease."""
        settings = self.settings
        by_topic: dict[str, list[bytes]] = {}
        for row in rows:
            name = agent_name(row.get("agent"))
            if name is None:
                continue
            try:
                body = orjson.dumps(await self._wire(row, name))
            except BridgeError as exc:
                await self._fail(row, exc)
                continue
            if len(body) > settings.max_message_bytes:
                await self._fail(
                    row,
                    BadRecord(
                        f"record of {len(body)} bytes is over the limit of "
                        f"{settings.max_message_bytes}"
                    ),
                )
                continue
            by_topic.setdefault(output_topic(settings.prefix, name, row), []).append(body)
            self._log.debug("output %s %s pushed to agent %s (attempt %s)", row.get("sys_id"),
                            row.get("topic"), name, row.get("attempts"))  # fmt: skip
        futures = []
        sent = 0
        for topic, bodies in by_topic.items():
            for message in batches(bodies, settings.batch_records, settings.max_message_bytes):
                futures.append(await self.session.publish_start(topic, message))
            sent += len(bodies)
        results = await asyncio.gather(*futures, return_exceptions=True)
        failures = [r for r in results if isinstance(r, BaseException)]
        if failures:
            self._log.warning(
                "%d message(s) of output records not acknowledged by the broker (%s); "
                "their lease will push them again",
                len(failures),
                type(failures[0]).__name__,
            )
        return sent

    async def _fail(self, row: Mapping[str, Any], error: BridgeError) -> None:
        """Close an output that cannot be sent (bad agent, too large, bad credential row)."""
        self._log.warning("output %s cannot be sent: %s", row.get("sys_id"), error)
        await self.store.update_query(
            ECC,
            f"sys_id={escape(str(row['sys_id']))}^stateINready,processing",
            {"state": "error", "error_string": f"{error.kind}: {error}", "processed": now_text(),
             "lease_until": None},
        )  # fmt: skip

    # --- inbound ----------------------------------------------------------------------

    async def _on_message(self, delivery: Delivery) -> bool:
        if not self.running:
            return False  # stopping: left unacknowledged, the broker keeps it for us
        with self._handlers.track():
            return await self._handle(delivery)

    async def _handle(self, delivery: Delivery) -> bool:
        """Every message ends stored, or refused and kept in ``ecc_dead_letter``, and is
        acknowledged; only a store that cannot even keep the dead letter leaves it
        unacknowledged (the broker delivers it again). Nothing one agent sends waits for
        another agent's messages: each agent's inputs have their own line."""
        prefix = self.settings.prefix + "/"
        parts = delivery.topic.removeprefix(prefix).split("/")
        name, kind = [*parts, "", ""][:2]
        if not delivery.topic.startswith(prefix) or len(parts) != 2 or kind not in (
            "input", "status"
        ) or not NAME_PATTERN.match(name):  # fmt: skip
            return await self._keep(delivery, name, kind, [_Refused("not an agent's topic")])
        try:
            if kind == "status":
                await self._take_status(name, delivery)
                return True
            async with self._turn(name):
                refused = await self._take_inputs(name, delivery)
        except _Refused as exc:
            refused = [exc]
            self._count_refused(kind)
        except Exception as exc:  # a bug or a store fault: still answered, never stuck
            self._log.warning("handling a message on %s failed: %s: %s", delivery.topic,
                              type(exc).__name__, str(exc)[:300])  # fmt: skip
            refused = [_Refused(f"internal error: {type(exc).__name__}: {str(exc)[:300]}")]
            self._count_refused(kind)
        return await self._keep(delivery, name, kind, refused) if refused else True

    def _count_refused(self, kind: str) -> None:
        if kind == "status":
            self.stats.refused_status += 1
        else:
            self.stats.refused_inputs += 1

    @contextlib.asynccontextmanager
    async def _turn(self, name: str) -> AsyncIterator[None]:
        """One message of agent ``name`` at a time; other agents do not wait for it."""
        turn = self._turns.get(name)
        if turn is None:
            turn = self._turns[name] = _Turn()
        turn.users += 1
        try:
            async with turn.lock:
                yield
        finally:
            turn.users -= 1
            if not turn.users:
                del self._turns[name]

    def _decode(self, delivery: Delivery, limit: int) -> Any:
        if len(delivery.payload) > limit:
            raise _Refused(f"message of {len(delivery.payload)} bytes is over the limit of {limit}")
        try:
            return orjson.loads(delivery.payload)
        except orjson.JSONDecodeError as exc:
            raise _Refused(f"not JSON: {str(exc)[:200]}") from None

    async def _take_status(self, name: str, delivery: Delivery) -> None:
        data = self._decode(delivery, self.settings.max_status_bytes)
        if not isinstance(data, dict):
            raise _Refused(f"a status record is a JSON object, not {type(data).__name__}")
        try:
            await self.agents.on_status(name, data)
        except StatusRefused as exc:
            raise _Refused(str(exc)) from None

    async def _take_inputs(self, name: str, delivery: Delivery) -> list[_Refused]:
        data = self._decode(delivery, self.settings.max_input_bytes)
        records = records_of(data)
        limit = self.settings.max_records_per_message
        refused = await self._store_inputs(name, records[:limit])
        if len(records) > limit:
            extra = len(records) - limit
            self.stats.refused_inputs += extra
            reason = f"{extra} record(s) past the limit of {limit} a message"
            refused.append(_Refused(reason, records=extra))
        return refused

    async def _keep(
        self, delivery: Delivery, name: str, kind: str, refused: list[_Refused]
    ) -> bool:
        """Write the dead letters of one message; False (do not acknowledge) if the store
        cannot take them."""
        received = now_text()
        size = self.settings.dead_letter_excerpt
        rows = [
            {"agent": name[:64], "topic": delivery.topic[:255], "kind": kind[:16],
             "reason": r.reason[:1000], "received": received,
             "records": r.records, "response_to": r.response_to,
             "excerpt": (r.excerpt or delivery.payload)[:size].decode("utf-8", "replace")}
            for r in refused
        ]  # fmt: skip
        try:
            async with self._dead_letter_lock:  # the budget's count and the insert as one
                rows = await self._within_budget(name[:64], rows)
                await self.store.insert_many(DEAD_LETTERS, rows)
        except Exception as exc:
            self._log.error("could not keep %d refused record(s) from %s (%s: %s): left "
                            "unacknowledged, the broker delivers them again", len(rows),
                            delivery.topic, type(exc).__name__, exc)  # fmt: skip
            return False
        self.stats.dead_letters += len(rows)
        self._log.warning(
            "refused %d record(s) from agent %s on %s: %s (%d kept in %s)",
            len(refused), name[:64], delivery.topic[:255], refused[0].reason[:300], len(rows),
            DEAD_LETTERS,
        )  # fmt: skip
        return True

    async def _within_budget(self, agent: str, rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
        """The rows the agent's dead-letter budget still has room for: a MID that keeps
        sending what is refused fills its own share, never the instance's disk; the rest
        is counted and logged (its messages are still acknowledged)."""
        kept = await self.store.count(DEAD_LETTERS, "agent=" + escape(agent))
        room = max(0, self.settings.dead_letters_per_agent - kept)
        if len(rows) > room:
            self.stats.dead_letters_dropped += len(rows) - room
            self._log.warning("dead letters of agent %s full (%d kept): %d refused record(s) "
                              "counted, not kept", agent, kept, len(rows) - room)  # fmt: skip
        return rows[:room]

    async def _progress_for(self, response_to: str) -> _Progress | None:
        """What is stored of the answers to output ``response_to`` (None: no such output)."""
        progress = self._progress.get(response_to)
        if progress is not None:
            self._progress.move_to_end(response_to)
            return progress
        output = await self.store.get(ECC, response_to)
        if output is None or output.get("queue") != "output":
            return None
        built = _Progress(output, finished=output.get("state") in FINISHED)
        stored = await self.store.query(ECC, f"queue=input^response_to={escape(response_to)}")
        for row in stored:
            seq = _sequence(row.get("sequence"))
            if seq is not None and row.get("agent") == output.get("agent"):
                built.add(text_of(row.get("run")), seq, bool(row.get("complete")), row)
        progress = self._progress.get(response_to)  # made meanwhile by another handler
        if progress is not None:
            return progress
        self._progress[response_to] = built
        while len(self._progress) > 20_000:
            self._progress.popitem(last=False)
        return built

    async def _store_inputs(self, name: str, records: list[Any]) -> list[_Refused]:
        """Store each record that answers an output this agent was sent and that still
        awaits its answer; the others are refused, one by one."""
        agent = agent_id(name)
        touched: dict[str, _Progress] = {}
        refused: list[_Refused] = []
        for record in records:
            try:
                await self._store_input(agent, record, touched)
            except _Refused as exc:
                refused.append(exc)
            except Exception as exc:  # e.g. a payload nested deeper than JSON text may be
                reason = f"cannot be stored: {type(exc).__name__}: {str(exc)[:200]}"
                refused.append(_Refused(reason, excerpt=_record_excerpt(record)))
        self.stats.refused_inputs += len(refused)
        try:
            await self._settle(touched)
        except Exception as exc:  # the inputs are stored: the lease covers the rest
            self._log.warning("closing outputs answered by %s failed: %s: %s", name,
                              type(exc).__name__, str(exc)[:300])  # fmt: skip
        return refused

    async def _store_input(self, agent: str, record: Any, touched: dict[str, _Progress]) -> None:
        if not isinstance(record, dict):
            raise _Refused(f"an input record is a JSON object, not {type(record).__name__}",
                           excerpt=_record_excerpt(record))  # fmt: skip
        response_to = record.get("response_to")
        if response_to in (None, ""):  # the Table API refuses these too
            raise _Refused("an input record answers an output: response_to is required",
                           excerpt=_record_excerpt(record))  # fmt: skip
        if not isinstance(response_to, str) or not _SYS_ID.match(response_to):
            raise _Refused("response_to is not a sys_id", excerpt=_record_excerpt(record))
        progress = await self._answerable(agent, response_to, record)
        if self.keys is not None:
            self._refuse_signature_refusal(record, response_to)
        row = input_row(record, agent, response_to)
        seq = row["sequence"]
        if seq is not None and progress.has(row["run"], seq):
            self.stats.duplicates += 1
            # A repeat of an answer already stored: close its output if a crash between
            # storing the answer and closing the output left it open.
            touched[response_to] = progress
            return
        if not _awaiting(progress):
            raise _Refused(
                f"output {response_to} is not awaiting an answer "
                f"(state {progress.output.get('state') or 'unknown'})",
                response_to=response_to, excerpt=_record_excerpt(record),
            )  # fmt: skip
        _stored, inserted = await self.store.insert_input_once(row)
        if inserted:
            self.stats.inputs += 1
        else:
            self.stats.duplicates += 1
        self._log.debug("input for output %s from %s: sequence %s%s%s", response_to, agent, seq,
                        " complete" if row["complete"] else "",
                        "" if inserted else " (duplicate)")  # fmt: skip
        if seq is not None:
            progress.add(row["run"], seq, row["complete"], record)
            touched[response_to] = progress

    def _refuse_signature_refusal(self, record: Mapping[str, Any], response_to: str) -> None:
        """A bridge's refusal of a signature never closes an output this instance signed.

        Whoever may publish on an agent's output topic can send an unsigned or stale record
        with a real job's sys_id; the bridge refuses it and answers with that sys_id. Taken
        as the job's answer, it would close the job as an error before its real answer came.
        The refusal is kept as a dead letter instead and the output stays leased: the real
        answer closes it, or the lease pushes it again, freshly signed (which also cures a
        record that went stale while the bridge was away).
        """
        error = text_of(record.get("error_string"))
        if error.startswith(_SIGNATURE_REFUSALS):
            raise _Refused(
                f"a refusal of this instance's signature does not answer output {response_to} "
                "(a forged or replayed record used its sys_id, or the bridge's "
                "security.platform_key is not this instance's key)",
                response_to=response_to,
                excerpt=_record_excerpt(record),
            )

    async def _answerable(
        self, agent: str, response_to: str, record: Mapping[str, Any]
    ) -> _Progress:
        """The progress of the output ``record`` answers, if ``agent`` was sent it."""
        progress = await self._progress_for(response_to)
        if progress is None:
            raise _Refused(f"output {response_to} does not exist", response_to=response_to,
                           excerpt=_record_excerpt(record))  # fmt: skip
        if progress.output.get("agent") != agent:
            raise _Refused(f"output {response_to} was sent to another agent",
                           response_to=response_to, excerpt=_record_excerpt(record))  # fmt: skip
        return progress

    async def _settle(self, touched: Mapping[str, _Progress]) -> None:
        for progress in touched.values():
            if progress.finished:
                continue
            final = progress.final()
            if final is not None:
                await self._finish(progress, final)
            else:
                await self._extend_lease(progress)

    async def _finish(self, progress: _Progress, final: Mapping[str, Any]) -> None:
        sys_id = progress.output["sys_id"]
        error = text_of(final.get("error_string"))
        done = await self.store.update_query(
            ECC,
            f"sys_id={escape(sys_id)}^stateINready,processing",
            {"state": "error" if error else "processed", "processed": now_text(),
             "error_string": error, "lease_until": None},
        )  # fmt: skip
        progress.finished = True
        if not done:
            return  # closed meanwhile (a heartbeat given up on, an administrator)
        self.stats.finished += 1
        progress.output = done[0]
        # One line per job the instance closes; the error's kind only (no payload).
        self._log.info("output %s %s of %s: %s%s", sys_id, done[0].get("topic"),
                       done[0].get("agent"), "error" if error else "processed",
                       f" ({error.split(':', 1)[0][:60]})" if error else "")  # fmt: skip
        try:
            await self.agents.on_answer(done[0], final)
        except Exception:
            self._log.exception("handling the answer to %s failed", sys_id)

    async def _extend_lease(self, progress: _Progress) -> None:
        """Chunks are arriving: the job is alive, do not push it again yet."""
        lease_until = progress.output.get("lease_until")
        now = time.time()
        lease = self._lease_for(progress.output)
        if not isinstance(lease_until, int | float) or lease_until - now > lease / 2:
            return
        sys_id = progress.output["sys_id"]
        moved = await self.store.update_query(
            ECC,
            f"sys_id={escape(sys_id)}^state=processing",
            {"lease_until": now + lease},
        )
        if moved:
            progress.output = moved[0]


def install(instance: Instance, keys: PlatformKeys) -> None:
    """Before ``async with instance``: seal credentials written through the Table API, and
    serve the agent actions and the platform key (``bridge.instance.agents.add_routes``)."""
    instance.before_write("discovery_credentials", credential_hook(keys))
    add_routes(instance.app, instance.store, platform_key=keys.public_key_b64)


def keys_for(db: Path | str) -> PlatformKeys:
    """The instance's keys beside its database file (in memory for ``":memory:"``)."""
    if str(db) == ":memory:":
        return PlatformKeys.ephemeral()
    return PlatformKeys.load_or_create(Path(db))
