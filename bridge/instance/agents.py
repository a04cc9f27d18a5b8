"""Agents: ``ecc_agent`` rows from the bridges' status records, heartbeats, admin actions.

- **Status.** Each bridge keeps a retained status record on ``<prefix>/<agent>/status``
  (``bridge.agent.bridge.Bridge.status_record``; its last will says ``Down``).
  :meth:`Agents.on_status` turns it into the agent's ``ecc_agent`` row: name (from the
  topic, never from the record), host, status, version, capabilities, public key,
  fingerprint, last heartbeat, start time and a few statistics.
- **Validation is the platform's decision.** A status record cannot make an agent
  validated: only an administrator's ``validate`` action, confirmed by the bridge's answer
  for the very fingerprint the action named, sets ``validated``. The action records its
  output's sys_id in ``ecc_agent.validation_request`` before the job exists; an answer to
  any other validate job (one written straight into the store, say) validates nothing,
  and the request is closed once answered (it survives a restart). A new key (another
  fingerprint) or a bridge that reports itself not validated clears it; ``invalidate``
  clears it at once, before the bridge even answers. Credentials go only to agents with
  ``validated`` true, sealed to the public key whose SHA-256 is the stored fingerprint.
- **Heartbeats.** Every ``heartbeat_interval`` (300 s, as ServiceNow) each agent that is
  not Down gets a ``HeartbeatProbe`` output record; one not answered within
  ``heartbeat_timeout`` is closed as ``error`` and the agent marked Down. Status records
  do not lift that Down: they trigger a heartbeat at once instead, and its answer does.
  The other way round, a Down the agent's own status record said (a clean stop, its last
  will, silence on NATS) is lifted only by its next status record: an answer handled
  after it (a heartbeat answered just before the stop) does not make it Up again.
- **Admin actions** (:func:`admin_action`): validate, invalidate, pause, resume, drain
  (and cancel, stats) as ``SystemCommand`` output records, priority 0.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import hashlib
import logging
import re
import time
import uuid
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

import orjson
from aiohttp import web

from bridge.instance.api import (
    ApiError,
    authenticate,
    authenticator_of,
    json_object_body,
    to_wire,
)
from bridge.instance.auth import AGENT_PREFIX, MID_AGENT_NAME, AuthError, agent_of
from bridge.instance.query import escape
from bridge.instance.store import TABLES, Conflict, Record, Store
from bridge.wire.outputs import HEARTBEAT, SYSTEM_COMMAND
from bridge.wire.records import now_text
from bridge.wire.status import STATUSES

log = logging.getLogger("midbridge.instance.agents")

AGENT_TABLE = "ecc_agent"
ECC_TABLE = "ecc_queue"
ADMIN_ACTIONS = ("validate", "invalidate", "pause", "resume", "drain")
ACTIONS = (*ADMIN_ACTIONS, "cancel", "stats")
# A MID name: 1-100 of A-Za-z0-9_.- starting with a letter or digit (so never "." or "..",
# never a slash): what every entry point of a name checks (valid_agent_name).
NAME_PATTERN = MID_AGENT_NAME
_JOB_ID = re.compile(r"^[A-Za-z0-9_.:\-]{1,64}$")
_STATS_KEYS = (
    "in_flight",
    "lanes_running",
    "lanes_waiting",
    "outbox_records",
    "processed",
    "failed",
)


class StatusRefused(ValueError):
    """A status record that cannot be used (the connector keeps it as a dead letter)."""


class AgentActionError(ValueError):
    """An admin action that cannot be sent; ``status`` is the HTTP status to answer with."""

    def __init__(self, message: str, *, status: int = 400) -> None:
        super().__init__(message)
        self.message = message
        self.status = status


def valid_agent_name(name: object) -> bool:
    """Is ``name`` a MID name (without ``mid.server.``) in the safe alphabet? For every
    place a name enters: the Table API, the agent actions, status topics, URLs."""
    return isinstance(name, str) and MID_AGENT_NAME.match(name) is not None


def agent_id(name: str) -> str:
    """ServiceNow's ``agent`` field for a MID name: ``mid.server.<name>``."""
    return AGENT_PREFIX + name


agent_name = agent_of
"""The MID name in an ``agent`` field (``mid.server.<name>``), or None if it is not one."""


def _epoch_text(value: Any) -> str:
    if isinstance(value, bool) or not isinstance(value, int | float) or value <= 0:
        return ""
    try:
        return time.strftime("%Y-%m-%d %H:%M:%S", time.gmtime(float(value)))
    except (OverflowError, ValueError, OSError):
        return ""


def _text(value: Any, limit: int = 255) -> str:
    return value[:limit] if isinstance(value, str) else ""


def _truthy(value: Any) -> bool:
    if isinstance(value, str):
        return value.strip().lower() in ("true", "1")
    return bool(value)


def key_and_fingerprint(data: Mapping[str, Any]) -> tuple[str, str] | None:
    """(public key base64, fingerprint) if they belong together (SHA-256 of the raw key)."""
    key = data.get("public_key")
    fingerprint = data.get("fingerprint")
    if not isinstance(key, str) or not isinstance(fingerprint, str):
        return None
    try:
        raw = base64.b64decode(key, validate=True)
    except (binascii.Error, ValueError):
        return None
    if len(raw) != 32 or hashlib.sha256(raw).hexdigest() != fingerprint:
        return None
    return key, fingerprint


async def find_agent(store: Store, name: str) -> Record | None:
    rows = await store.query(AGENT_TABLE, "name=" + escape(name), limit=1)
    return rows[0] if rows else None


def control_output(
    name: str, topic: str, payload: Mapping[str, Any], *, command: str = ""
) -> Record:
    """An ``ecc_queue`` output row for a control job (priority 0: the express topic)."""
    return {
        "agent": agent_id(name),
        "topic": topic,
        "name": command or topic,
        "source": name,
        "queue": "output",
        "state": "ready",
        "priority": 0,
        "payload": orjson.dumps(dict(payload)).decode(),
    }


async def admin_action(
    store: Store, name: str, action: str, *, job_sys_id: str | None = None
) -> Record:
    """Queue a ``SystemCommand`` for one agent; returns the output record.

    ``validate`` names the fingerprint held in ``ecc_agent`` (the key the administrator
    sees and approves); ``invalidate`` clears ``validated`` at once, so no credential is
    sealed for that agent from now on; ``cancel`` needs ``job_sys_id``. The connector
    pushes the record like any other (it hears of the insert from the store).
    Raises ``AgentActionError`` (400 bad action, 404 unknown agent, 409 no key yet).
    """
    if action not in ACTIONS:
        raise AgentActionError(f"unknown action {action[:40]!r}; one of {', '.join(ACTIONS)}")
    if not valid_agent_name(name):
        raise AgentActionError(
            "agent name must be 1-100 of A-Za-z0-9_.- starting with a letter or digit",
            status=404,
        )
    agent = await find_agent(store, name)
    if agent is None:
        raise AgentActionError(f"no agent named {name!r}", status=404)
    payload: dict[str, Any] = {"command": action}
    output = {"sys_id": uuid.uuid4().hex}
    if action == "validate":
        pair = key_and_fingerprint(agent)
        if pair is None:
            raise AgentActionError(
                f"agent {name!r} has reported no usable public key yet", status=409
            )
        payload["fingerprint"] = pair[1]
        # Recorded before the job exists: only its answer may set validated (Agents).
        await store.update(AGENT_TABLE, agent["sys_id"], {"validation_request": output["sys_id"]})
    elif action == "invalidate":
        await store.update(
            AGENT_TABLE, agent["sys_id"], {"validated": False, "validation_request": ""}
        )
    elif action == "cancel":
        if not job_sys_id or not _JOB_ID.match(job_sys_id):
            raise AgentActionError("cancel needs sys_id: the output record to cancel")
        payload["sys_id"] = job_sys_id
    return await store.insert(
        ECC_TABLE, {**control_output(name, SYSTEM_COMMAND, payload, command=action), **output}
    )


@dataclass(slots=True)
class _Pending:
    sys_id: str
    sent: float  # monotonic


class Agents:
    """The agents' rows, their heartbeats, and what their answers say about them."""

    def __init__(
        self,
        store: Store,
        *,
        heartbeat_interval: float = 300.0,
        heartbeat_timeout: float = 60.0,
        on_up: Callable[[str], None] | None = None,
        logger: logging.Logger | None = None,
    ) -> None:
        self.store = store
        self.heartbeat_interval = heartbeat_interval
        self.heartbeat_timeout = heartbeat_timeout
        self._on_up = on_up
        self._log = logger or log
        self.statuses: dict[str, str] = {}  # name → status, as in ecc_agent
        self._missed: set[str] = set()  # marked Down here for a heartbeat not answered
        # Down by its own status record (a clean stop, its last will, NATS silence): only
        # its next status record lifts that, never an answer that was on its way before.
        self._said_down: set[str] = set()
        self._pending: dict[str, _Pending] = {}  # name → the heartbeat awaiting its answer
        self._due: dict[str, float] = {}  # name → when the next heartbeat goes (monotonic)
        self._wake = asyncio.Event()
        self._lock = asyncio.Lock()  # one writer of ecc_agent at a time
        self.heartbeats_sent = 0
        self.heartbeats_missed = 0
        self.refused_validations = 0  # validate answers no administrator asked for

    async def load(self) -> None:
        for row in await self.store.query(AGENT_TABLE):
            name = row.get("name")
            if isinstance(name, str) and NAME_PATTERN.match(name):
                self.statuses[name] = str(row.get("status") or "Down")
                if self.statuses[name] == "Down":
                    self._said_down.add(name)

    def status_of(self, name: str) -> str | None:
        return self.statuses.get(name)

    async def sealing_key(self, name: str) -> bytes | None:
        """The raw X25519 public key to seal credentials to; None unless validated."""
        row = await find_agent(self.store, name)
        if row is None or not _truthy(row.get("validated")):
            return None
        pair = key_and_fingerprint(row)
        if pair is None:
            return None
        return base64.b64decode(pair[0])

    # --- status records --------------------------------------------------------------

    async def on_status(self, name: str, data: Mapping[str, Any]) -> None:
        """One status record from ``<prefix>/<name>/status``. Raises ``StatusRefused`` for
        a record that cannot be used (the connector dead-letters the message)."""
        if not isinstance(data, Mapping):
            raise StatusRefused(f"a status record is a JSON object, not {type(data).__name__}")
        status = data.get("status", "Up")
        if not isinstance(status, str) or status not in STATUSES:
            raise StatusRefused(
                f"status must be one of {', '.join(STATUSES)}, not {str(status)[:40]!r}"
            )
        async with self._lock:
            if status == "Down":
                self._said_down.add(name)
            else:
                self._said_down.discard(name)
            await self._apply(name, data, confirm_fingerprint=None)

    async def _apply(
        self,
        name: str,
        data: Mapping[str, Any],
        *,
        confirm_fingerprint: str | None,
        answered: bool = False,
    ) -> None:
        """``answered``: ``data`` is the status an answer carried (heartbeat, validate),
        made before the answer went out; if the agent's own status record said Down since,
        the answer is older news and the agent stays Down (its other fields still count)."""
        status = data.get("status")
        if not isinstance(status, str) or status not in STATUSES:
            status = "Up"
        if answered and name in self._said_down:
            status = "Down"
        if name in self._missed and status != "Down":
            # Alive by its own word, but our heartbeat went unanswered: ask again now.
            status = "Down"
            self._due[name] = 0.0
            self._wake.set()
        existing = await find_agent(self.store, name)
        fields: dict[str, Any] = {
            "status": status,
            "host": _text(data.get("host")),
            "version": _text(data.get("version"), 64),
        }
        caps = data.get("capabilities")
        if isinstance(caps, list):
            fields["capabilities"] = ",".join(str(c)[:64] for c in caps[:64])
        started = _epoch_text(data.get("started_at"))
        if started:
            fields["started_at"] = started
        beat = _epoch_text(data.get("last_heartbeat"))
        if beat and (existing is None or beat > str(existing.get("last_heartbeat") or "")):
            fields["last_heartbeat"] = beat
        stats = {k: data[k] for k in _STATS_KEYS if k in data}
        if stats:
            fields["stats"] = orjson.dumps(stats).decode()
        pair = key_and_fingerprint(data)
        if pair is None and (data.get("public_key") or data.get("fingerprint")):
            self._log.warning("agent %s: public key and fingerprint do not match; ignored", name)
        reports_validated = data.get("validated") is True
        if pair is not None:
            fields["public_key"], fields["fingerprint"] = pair
        if existing is None:
            validated = False
        else:
            validated = _truthy(existing.get("validated"))
            if pair is not None and pair[1] != existing.get("fingerprint"):
                validated = False  # a new key: the old approval does not carry over
        if pair is None or not reports_validated:
            validated = False
        if confirm_fingerprint is not None and pair is not None and reports_validated:
            validated = validated or pair[1] == confirm_fingerprint
        fields["validated"] = validated
        if existing is None:
            try:
                await self.store.insert(AGENT_TABLE, {"name": name, **fields})
            except Conflict:  # another writer (the API) made it meanwhile
                again = await find_agent(self.store, name)
                if again is not None:
                    await self.store.update(AGENT_TABLE, again["sys_id"], fields)
        else:
            await self.store.update(AGENT_TABLE, existing["sys_id"], fields)
        self._set_status(name, status)

    def _set_status(self, name: str, status: str) -> None:
        before = self.statuses.get(name)
        self.statuses[name] = status
        if status != "Down" and before in (None, "Down"):
            self._due.setdefault(name, 0.0)
            self._wake.set()
            if self._on_up is not None:
                self._on_up(name)

    # --- answers ---------------------------------------------------------------------

    async def on_answer(self, output: Mapping[str, Any], final: Mapping[str, Any]) -> None:
        """An output of ours was finished by its complete input record ``final``."""
        topic = output.get("topic")
        if topic not in (HEARTBEAT, SYSTEM_COMMAND):
            return
        name = agent_name(output.get("agent"))
        if name is None:
            return
        payload = final.get("payload")
        if isinstance(payload, str):
            try:
                payload = orjson.loads(payload)
            except orjson.JSONDecodeError:
                payload = {}
        status = payload.get("status") if isinstance(payload, dict) else None
        failed = bool(final.get("error_string"))
        async with self._lock:
            if topic == HEARTBEAT:
                pending = self._pending.get(name)
                if pending is not None and pending.sys_id == output.get("sys_id"):
                    del self._pending[name]
                self._missed.discard(name)
                if isinstance(status, dict):
                    await self._apply(name, status, confirm_fingerprint=None, answered=True)
                elif name not in self._said_down:
                    row = await find_agent(self.store, name)
                    if row is not None:
                        await self.store.update(AGENT_TABLE, row["sys_id"], {"status": "Up"})
                    self._set_status(name, "Up")
                row = await find_agent(self.store, name)
                if row is not None:
                    await self.store.update(
                        AGENT_TABLE, row["sys_id"], {"last_heartbeat": now_text()}
                    )
                return
            confirm = await self._admin_validation(name, output)
            if failed or not isinstance(status, dict):
                return
            await self._apply(name, status, confirm_fingerprint=confirm, answered=True)

    async def _admin_validation(self, name: str, output: Mapping[str, Any]) -> str | None:
        """The fingerprint an answer to ``output`` confirms: only for the validate job an
        administrator started (``ecc_agent.validation_request``), which it then closes."""
        if output.get("name") != "validate" and _command(output) != "validate":
            return None
        row = await find_agent(self.store, name)
        requested = str((row or {}).get("validation_request") or "")
        if row is None or not requested or requested != output.get("sys_id"):
            self.refused_validations += 1
            self._log.warning(
                "agent %s: answer to validate output %s, which no administrator started "
                "or which is no longer awaited: it does not validate the agent",
                name,
                output.get("sys_id"),
            )
            return None
        await self.store.update(AGENT_TABLE, row["sys_id"], {"validation_request": ""})
        return _command_field(output, "fingerprint")

    # --- heartbeats ------------------------------------------------------------------

    async def run(self) -> None:
        """The heartbeat schedule; runs until cancelled."""
        tick = max(0.05, min(1.0, self.heartbeat_interval / 4, self.heartbeat_timeout / 4))
        while True:
            try:
                await self._heartbeat_round()
            except asyncio.CancelledError:
                raise
            except Exception:
                self._log.exception("heartbeat round failed")
            self._wake.clear()
            try:
                async with asyncio.timeout(tick):
                    await self._wake.wait()
            except TimeoutError:
                pass

    async def _heartbeat_round(self) -> None:
        now = time.monotonic()
        for name, status in list(self.statuses.items()):
            pending = self._pending.get(name)
            if pending is not None:
                if now - pending.sent >= self.heartbeat_timeout:
                    await self._missed_heartbeat(name, pending)
                continue
            if status == "Down" and name not in self._missed:
                continue  # it said so itself (or never came up): nothing to ask
            if now < self._due.get(name, 0.0):
                continue
            row = await self.store.insert(ECC_TABLE, control_output(name, HEARTBEAT, {}))
            self._pending[name] = _Pending(row["sys_id"], now)
            self._due[name] = now + self.heartbeat_interval
            self.heartbeats_sent += 1

    async def _missed_heartbeat(self, name: str, pending: _Pending) -> None:
        async with self._lock:
            if self._pending.get(name) is not pending:
                return
            del self._pending[name]
            self._missed.add(name)
            self.heartbeats_missed += 1
            message = f"timeout: no answer to the heartbeat within {self.heartbeat_timeout:g} s"
            await self.store.update_query(
                ECC_TABLE,
                f"sys_id={escape(pending.sys_id)}^stateINready,processing",
                {"state": "error", "error_string": message, "processed": now_text(),
                 "lease_until": None},
            )  # fmt: skip
            row = await find_agent(self.store, name)
            if row is not None and row.get("status") != "Down":
                await self.store.update(AGENT_TABLE, row["sys_id"], {"status": "Down"})
            self.statuses[name] = "Down"
            self._log.warning("agent %s: %s; marked Down", name, message)


def _command(output: Mapping[str, Any]) -> str:
    value = _command_field(output, "command")
    return value or ""


def _command_field(output: Mapping[str, Any], key: str) -> str | None:
    payload = output.get("payload")
    if isinstance(payload, str):
        try:
            payload = orjson.loads(payload)
        except orjson.JSONDecodeError:
            return None
    if isinstance(payload, dict) and isinstance(payload.get(key), str):
        return str(payload[key])
    return None


# --- HTTP: admin actions and the platform key ---------------------------------------------

ACTION_ROUTE = "/api/midbridge/agents/{name}/{action}"
PLATFORM_KEY_ROUTE = "/api/midbridge/platform_key"


def add_routes(app: web.Application, store: Store, *, platform_key: str | None = None) -> None:
    """``POST /api/midbridge/agents/<name>/<action>`` (admin only; body ``{"sys_id"}`` for
    cancel) answers 201 with the SystemCommand output record; ``GET
    /api/midbridge/platform_key`` gives the Ed25519 public key bridges verify jobs with."""
    authenticator = authenticator_of(app, store)
    ecc = TABLES[ECC_TABLE]

    async def action(request: web.Request) -> web.Response:
        who = await authenticate(request, authenticator)
        if not who.is_admin:
            raise AuthError(403, "agent actions require role admin")
        body = await json_object_body(request)  # JSON only: no cross-site form can send it
        job = body.get("sys_id")
        try:
            row = await admin_action(
                store,
                request.match_info["name"],
                request.match_info["action"],
                job_sys_id=job if isinstance(job, str) else None,
            )
        except AgentActionError as exc:
            raise ApiError(exc.status, exc.message) from None
        return web.json_response({"result": to_wire(ecc, row)}, status=201, dumps=_dumps)

    async def key(request: web.Request) -> web.Response:
        return web.json_response(
            {
                "result": {
                    "algorithm": "Ed25519",
                    "public_key": platform_key,
                    "bridge_config": f'[security]\nplatform_key = "{platform_key}"',
                }
            },
            dumps=_dumps,
        )

    app.router.add_post(ACTION_ROUTE, action)
    if platform_key is not None:
        app.router.add_get(PLATFORM_KEY_ROUTE, key)


def _dumps(data: Any) -> str:
    return orjson.dumps(data).decode()
