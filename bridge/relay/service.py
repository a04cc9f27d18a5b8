"""Relay: a ServiceNow instance's ECC queue ↔ the broker, for one MID (``midbridge relay``).

The relay does what a MID Server does with the ECC queue, through the REST Table API as
``mid.user`` (role ``mid_server``), and hands the work to a bridge over the broker:

1. **Poll** ``/api/now/table/ecc_queue`` with
   ``agent=mid.server.<NAME>^queue=output^state=ready^ORDERBYsys_created_on`` every
   ``poll_interval`` seconds (at once again while records keep coming).
2. **Claim** each record (``PATCH state=processing``) and **publish** it to
   ``<prefix>/<NAME>/output`` (``.../output/interactive`` for priority 0, heartbeats and
   SystemCommand), batched.
3. **Write back** every input record from ``<prefix>/<NAME>/input`` (``POST ecc_queue``,
   ``queue=input``, ``response_to``, ``agent``, ``topic``, ``name``, ``source``...), the
   payload as JSON text, or, when the output's payload was XML, as ServiceNow's envelope
   ``<results probe_time=".." result_code=".." [error=".."]><result>..</result>
   <parameters>..</parameters></results>``. A message is acknowledged to the broker only
   once its records are written, so nothing is lost if the instance is unreachable.
4. **Close** the output (``PATCH state=processed``, or ``error`` with the complete
   record's ``error_string``) when one run's complete record and every sequence before it
   are written.

Leases: an output published but not answered within ``lease`` seconds is published again
(the bridge drops repeats by ``sys_id``); at start the relay also takes back the outputs
of its agent left ``processing`` (a relay that stopped mid-way). Repeated chunks (same
``response_to``, ``run``, ``sequence``) are written once.

Tested against the built-in instance only (``tests/test_relay.py``); not verified against
a live ServiceNow instance (``docs/relay.md``).
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import logging
import os
import re
import sys
import time
from collections import OrderedDict
from collections.abc import Mapping
from contextlib import AsyncExitStack
from dataclasses import dataclass, field
from typing import Any
from xml.etree import ElementTree

import aiohttp
import orjson

from bridge.cli_errors import fail
from bridge.signals import StopSignals
from bridge.wire.address import AddressError, parse_host_port
from bridge.wire.broker import BrokerConfig
from bridge.wire.errors import BridgeError
from bridge.wire.inflight import InFlight
from bridge.wire.outputs import batches, output_topic, output_wire, parameters, records_of
from bridge.wire.records import now_text
from bridge.wire.transport import Delivery, MqttSession

log = logging.getLogger("midbridge.relay")

TABLE_PATH = "/api/now/table/ecc_queue"
PASSWORD_ENV = "MIDBRIDGE_RELAY_PASSWORD"
_NAME = re.compile(r"^[A-Za-z0-9_.\-]{1,64}$")
_SYS_ID = re.compile(r"^[A-Za-z0-9_.:\-]{1,64}$")
_XML_NAME = re.compile(r"^[A-Za-z_][A-Za-z0-9_.\-]{0,127}$")
# Characters XML 1.0 cannot carry (control characters, lone surrogates, U+FFFE/U+FFFF).
QueryParams = Mapping[str, str]  # a request's query string, name → value
_XML_BAD = re.compile("[^\t\n\r\u0020-\ud7ff\ue000-\ufffd\U00010000-\U0010ffff]")


class RelayError(BridgeError):
    """The instance refused or failed a request (``status`` is the HTTP status, 0 if none)."""

    kind = "relay_error"

    def __init__(self, message: str, *, status: int = 0, field: str | None = None) -> None:
        super().__init__(message, field=field)
        self.status = status


@dataclass(frozen=True)
class RelaySettings:
    instance: str  # https://<name>.service-now.com (or the built-in instance's URL)
    user: str
    password: str = field(repr=False)
    agent: str = "midbridge"  # the MID's name, without mid.server.
    prefix: str = "ecc"
    poll_interval: float = 5.0  # seconds between polls when the last one found nothing
    busy_interval: float = 0.05  # seconds between polls while work keeps coming
    batch: int = 100  # records fetched (and claimed) by one poll
    lease: float = 300.0  # seconds before an unanswered output is published again
    resume: bool = True  # at start, take back this agent's outputs left processing
    verify_tls: bool = True
    request_timeout: float = 30.0
    retries: int = 4  # attempts for one write before the broker message is left unacked
    client_id: str | None = None  # MQTT client id; default midbridge-relay-<agent>


@dataclass(slots=True)
class _Job:
    """One output the relay published: how to answer it and what came back."""

    record: dict[str, Any]  # the output as published (wire form)
    xml: bool
    parameters: dict[str, Any]
    lease_until: float = 0.0  # monotonic
    runs: dict[str, set[int]] = field(default_factory=dict)
    completes: dict[str, tuple[int, dict[str, Any]]] = field(default_factory=dict)
    finished: bool = False

    def has(self, run: str, seq: int) -> bool:
        return seq in self.runs.get(run, ())

    def add(self, run: str, seq: int, record: dict[str, Any]) -> None:
        self.runs.setdefault(run, set()).add(seq)
        if record.get("complete") is True and run not in self.completes:
            self.completes[run] = (seq, record)

    def final(self) -> dict[str, Any] | None:
        for run, (last, record) in self.completes.items():
            if all(i in self.runs.get(run, ()) for i in range(last + 1)):
                return record
        return None


def basic_auth(user: str, password: str) -> str:
    """An ``Authorization: Basic`` header value (UTF-8)."""
    token = base64.b64encode(f"{user}:{password}".encode()).decode("ascii")
    return f"Basic {token}"


# --- the XML envelope ---------------------------------------------------------------------


def _xml_text(value: Any) -> str:
    if isinstance(value, bool):
        text = "true" if value else "false"
    elif value is None:
        text = ""
    else:
        text = str(value)
    return _XML_BAD.sub("\ufffd", text)


def _add(parent: ElementTree.Element, key: str, value: Any) -> None:
    if _XML_NAME.match(key) and not key.lower().startswith("xml"):
        element = ElementTree.SubElement(parent, key)
    else:
        element = ElementTree.SubElement(parent, "entry", {"name": _xml_text(key)})
    if isinstance(value, dict):
        for k, v in value.items():
            _add(element, str(k), v)
    elif isinstance(value, list):
        for item in value:
            _add(element, "item", item)
    else:
        element.text = _xml_text(value)


def results_envelope(record: Mapping[str, Any], params: Mapping[str, Any]) -> str:
    """One input record's payload in ServiceNow's XML form.

    ``<results probe_time=".." result_code=".." [error=".."]>`` holding ``<result>`` (the
    payload: an object's keys as elements, a list's items as ``<item>``, a key that is
    not an XML name as ``<entry name="..">``) and the job's ``<parameters>``.
    """
    attrs = {
        "probe_time": _xml_text(record.get("probe_time", 0)),
        "result_code": _xml_text(record.get("result_code", 1 if record.get("error_string") else 0)),
    }
    error = record.get("error_string")
    if error:
        attrs["error"] = _xml_text(error)
    root = ElementTree.Element("results", attrs)
    result = ElementTree.SubElement(root, "result")
    payload = record.get("payload")
    if isinstance(payload, dict):
        for key, value in payload.items():
            _add(result, str(key), value)
    elif payload is not None:
        result.text = _xml_text(payload)
    plist = ElementTree.SubElement(root, "parameters")
    for name, value in params.items():
        ElementTree.SubElement(
            plist, "parameter", {"name": _xml_text(name), "value": _xml_text(value)}
        )
    return ElementTree.tostring(root, encoding="unicode")


def _is_xml(payload: Any) -> bool:
    return isinstance(payload, str) and payload.lstrip().startswith("<")


# --- the relay ----------------------------------------------------------------------------


class Relay:
    """An async context manager: the instance's HTTP client, one MQTT session, two tasks."""

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
        self._log = logger or log
        self.agent_id = f"mid.server.{settings.agent}"
        self.base = settings.instance.rstrip("/")
        self.input_topic = f"{settings.prefix}/{settings.agent}/input"
        self.session = MqttSession(
            broker,
            client_id=settings.client_id or f"midbridge-relay-{settings.agent}",
            subscriptions=[self.input_topic],
            on_message=self._on_input,
            receive_maximum=1000,
            logger=self._log,
        )
        self._http: aiohttp.ClientSession | None = None
        self._jobs: OrderedDict[str, _Job] = OrderedDict()
        self._lock = asyncio.Lock()
        self._stack = AsyncExitStack()
        self._tasks: list[asyncio.Task[None]] = []
        self._handlers = InFlight()  # message handlers running
        self._closing = False
        self.stats = {"claimed": 0, "published": 0, "republished": 0, "inputs": 0,
                      "duplicates": 0, "closed": 0, "refused": 0}  # fmt: skip

    async def __aenter__(self) -> Relay:
        try:
            self._http = await self._stack.enter_async_context(
                aiohttp.ClientSession(
                    timeout=aiohttp.ClientTimeout(total=self.settings.request_timeout),
                    connector=aiohttp.TCPConnector(ssl=self.settings.verify_tls),
                    headers={
                        "Accept": "application/json",
                        "Authorization": basic_auth(self.settings.user, self.settings.password),
                    },
                )
            )
            await self._request("GET", TABLE_PATH, params={"sysparm_limit": "1",
                                "sysparm_query": f"agent={self.agent_id}"})  # fmt: skip
            tasks = await self._stack.enter_async_context(asyncio.TaskGroup())
            self._stack.push_async_callback(self._cancel_tasks)
            await self.session.__aenter__()
            self._stack.push_async_callback(self._close_session)
            if self.settings.resume:
                await self._resume()
            self._tasks = [
                tasks.create_task(self._poll_loop(), name="relay-poll"),
                tasks.create_task(self._lease_loop(), name="relay-leases"),
            ]
        except BaseException:
            await self._stack.aclose()
            raise
        self._log.info(
            "relay up: %s (%s) ↔ %s:%s as %s",
            self.base,
            self.agent_id,
            self.broker.host,
            self.broker.port,
            self.settings.user,
        )
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self._stack.aclose()

    async def _close_session(self) -> None:
        """Disconnect, then let the handlers already running finish their writes."""
        self._closing = True
        await self.session.__aexit__(None, None, None)
        await self._handlers.drain(5.0)

    async def _cancel_tasks(self) -> None:
        for task in self._tasks:
            task.cancel()

    # --- HTTP -------------------------------------------------------------------------

    async def _request(
        self,
        method: str,
        path: str,
        *,
        body: Mapping[str, Any] | None = None,
        params: QueryParams | None = None,
    ) -> Any:
        assert self._http is not None
        url = self.base + path
        data = orjson.dumps(dict(body)) if body is not None else None
        headers = {"Content-Type": "application/json"} if data is not None else None
        try:
            async with self._http.request(
                method, url, params=params, data=data, headers=headers
            ) as response:
                raw = await response.read()
                status = response.status
        except (aiohttp.ClientError, TimeoutError) as exc:
            raise RelayError(f"{method} {path}: {type(exc).__name__}: {exc}") from None
        if status >= 400:
            detail = ""
            try:
                error = orjson.loads(raw).get("error", {})
                detail = f"{error.get('message', '')} {error.get('detail', '')}".strip()
            except (orjson.JSONDecodeError, AttributeError):
                detail = raw[:200].decode(errors="replace")
            raise RelayError(f"{method} {path}: HTTP {status}: {detail}", status=status)
        if not raw:
            return None
        try:
            return orjson.loads(raw).get("result")
        except (orjson.JSONDecodeError, AttributeError):
            raise RelayError(f"{method} {path}: the answer is not JSON", status=status) from None

    async def _write(self, method: str, path: str, body: Mapping[str, Any]) -> Any:
        """A write, retried with back-off on transient failures (not on 4xx)."""
        delay = 0.2
        for attempt in range(self.settings.retries):
            try:
                return await self._request(method, path, body=body)
            except RelayError as exc:
                if 400 <= exc.status < 500 and exc.status != 429:
                    raise
                if attempt == self.settings.retries - 1:
                    raise
                self._log.warning("%s; retrying in %.1f s", exc, delay)
                await asyncio.sleep(delay)
                delay = min(delay * 2, 5.0)
        return None

    # --- out: poll, claim, publish ----------------------------------------------------

    def _query(self, state: str) -> str:
        return f"agent={self.agent_id}^queue=output^state={state}^ORDERBYsys_created_on"

    async def _fetch(self, state: str) -> list[dict[str, Any]]:
        result = await self._request(
            "GET",
            TABLE_PATH,
            params={
                "sysparm_query": self._query(state),
                "sysparm_limit": str(self.settings.batch),
                "sysparm_exclude_reference_link": "true",
            },
        )
        return [r for r in result or [] if isinstance(r, dict)]

    async def _poll_loop(self) -> None:
        while True:
            found = 0
            try:
                found = await self.poll_once()
            except asyncio.CancelledError:
                raise
            except RelayError as exc:
                self._log.warning("poll failed: %s", exc)
            except Exception:
                self._log.exception("poll failed")
            await asyncio.sleep(
                self.settings.busy_interval if found else self.settings.poll_interval
            )

    async def poll_once(self) -> int:
        """Fetch ready outputs, claim them, publish them; how many were claimed."""
        claimed: list[_Job] = []
        for record in await self._fetch("ready"):
            sys_id = record.get("sys_id")
            if not isinstance(sys_id, str) or not _SYS_ID.match(sys_id):
                continue
            try:
                after = await self._write(
                    "PATCH", f"{TABLE_PATH}/{sys_id}", {"state": "processing"}
                )
            except RelayError as exc:
                self._log.warning("could not claim %s: %s", sys_id, exc)
                continue
            if isinstance(after, dict) and after.get("state") not in (None, "processing"):
                continue
            claimed.append(self._job(record))
        self.stats["claimed"] += len(claimed)
        await self._publish(claimed)
        return len(claimed)

    def _job(self, record: Mapping[str, Any]) -> _Job:
        wire = output_wire(record)
        wire["state"] = "processing"
        job = _Job(
            wire,
            _is_xml(record.get("payload")),
            parameters(record.get("payload")),
            lease_until=time.monotonic() + self.settings.lease,
        )
        self._jobs[wire["sys_id"]] = job
        while len(self._jobs) > 50_000:  # finished ones first; a bound either way
            oldest = next(iter(self._jobs))
            self._jobs.pop(oldest)
        return job

    async def _resume(self) -> None:
        """Outputs of this agent left ``processing``: published again (the bridge dedupes)."""
        records = await self._fetch("processing")
        jobs = [self._job(r) for r in records if isinstance(r.get("sys_id"), str)]
        if jobs:
            self._log.info("taking back %d output(s) left processing", len(jobs))
            await self._publish(jobs)

    async def _publish(self, jobs: list[_Job]) -> None:
        by_topic: dict[str, list[bytes]] = {}
        lease_until = time.monotonic() + self.settings.lease
        for job in jobs:
            job.lease_until = lease_until
            topic = output_topic(self.settings.prefix, self.settings.agent, job.record)
            by_topic.setdefault(topic, []).append(orjson.dumps(job.record))
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

    async def _lease_loop(self) -> None:
        tick = max(0.05, min(5.0, self.settings.lease / 4))
        while True:
            await asyncio.sleep(tick)
            now = time.monotonic()
            expired = [j for j in self._jobs.values() if not j.finished and j.lease_until <= now]
            if expired:
                self._log.info("%d output(s) not answered within the lease: published again",
                               len(expired))  # fmt: skip
                self.stats["republished"] += len(expired)
                try:
                    await self._publish(expired)
                except Exception:
                    self._log.exception("publishing again failed")

    # --- in: input records --------------------------------------------------------------

    async def _job_for(self, response_to: str) -> _Job | None:
        job = self._jobs.get(response_to)
        if job is not None:
            return job
        try:
            record = await self._request("GET", f"{TABLE_PATH}/{response_to}")
        except RelayError as exc:
            if exc.status == 404:
                return None
            raise
        if not isinstance(record, dict) or record.get("agent") != self.agent_id:
            return None
        if record.get("queue") != "output":
            return None
        job = self._job(record)
        job.finished = record.get("state") in ("processed", "error")
        return job

    def _input_body(self, record: Mapping[str, Any], job: _Job | None) -> dict[str, Any]:
        payload = record.get("payload")
        if job is not None and job.xml:
            text = results_envelope(record, job.parameters)
        elif isinstance(payload, str):
            text = payload
        else:
            text = orjson.dumps(payload).decode()
        body: dict[str, Any] = {
            "agent": self.agent_id,
            "topic": str(record.get("topic") or ""),
            "name": str(record.get("name") or ""),
            "source": str(record.get("source") or ""),
            "queue": "input",
            "state": "ready",
            "response_to": job.record["sys_id"] if job is not None else "",
            "agent_correlator": str(record.get("agent_correlator") or ""),
            "error_string": str(record.get("error_string") or ""),
            "payload": text,
        }
        seq = record.get("sequence")
        if isinstance(seq, int) and not isinstance(seq, bool):
            body["sequence"] = seq
            body["complete"] = record.get("complete") is True
            body["run"] = str(record.get("run") or "")[:64]
        return body

    async def _on_input(self, delivery: Delivery) -> bool:
        if self._closing:
            return False  # left unacknowledged: the broker keeps it for the next start
        with self._handlers.track():
            return await self._handle_input(delivery)

    async def _handle_input(self, delivery: Delivery) -> bool:
        try:
            data = orjson.loads(delivery.payload)
        except orjson.JSONDecodeError:
            self._log.warning("dropped a message that is not JSON on %s", delivery.topic)
            return True
        records = [r for r in records_of(data) if isinstance(r, dict)]
        async with self._lock:
            try:
                await self._write_inputs(records)
            except RelayError as exc:
                self._log.error("input records not written (left for redelivery): %s", exc)
                return False
        return True

    async def _write_inputs(self, records: list[dict[str, Any]]) -> None:
        touched: dict[str, _Job] = {}
        for record in records:
            response_to = record.get("response_to")
            job = None
            if isinstance(response_to, str) and _SYS_ID.match(response_to):
                job = await self._job_for(response_to)
                if job is None:
                    self._log.warning("an answer to %s, not an output of %s: dropped",
                                      response_to, self.agent_id)  # fmt: skip
                    continue
            run = str(record.get("run") or "")
            seq = record.get("sequence")
            seq = seq if isinstance(seq, int) and not isinstance(seq, bool) else None
            if job is not None and seq is not None and job.has(run, seq):
                self.stats["duplicates"] += 1
                continue
            try:
                await self._write("POST", TABLE_PATH, self._input_body(record, job))
            except RelayError as exc:
                if not 400 <= exc.status < 500 or exc.status == 429:
                    raise  # transient: left for redelivery
                # Refused for good (e.g. an answer to nothing): redelivery cannot change it.
                self._log.warning("input record refused by the instance, dropped: %s", exc)
                self.stats["refused"] += 1
                continue
            self.stats["inputs"] += 1
            if job is not None and seq is not None:
                job.add(run, seq, record)
                touched[job.record["sys_id"]] = job
        for sys_id, job in touched.items():
            final = job.final()
            if job.finished or final is None:
                if not job.finished:
                    job.lease_until = time.monotonic() + self.settings.lease
                continue
            error = str(final.get("error_string") or "")
            await self._write(
                "PATCH",
                f"{TABLE_PATH}/{sys_id}",
                {"state": "error" if error else "processed", "error_string": error,
                 "processed": now_text()},
            )  # fmt: skip
            job.finished = True
            self.stats["closed"] += 1


# --- the command ---------------------------------------------------------------------------


def add_relay_parser(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """Add ``midbridge relay`` to the command's parser."""
    parser = sub.add_parser(
        "relay", help="relay a ServiceNow instance's ECC queue to the broker (one MID)"
    )
    parser.add_argument("--instance", required=True, help="https://<name>.service-now.com")
    parser.add_argument("--user", required=True, help="the MID's user (role mid_server)")
    parser.add_argument(
        "--password-stdin",
        action="store_true",
        help=f"read the password from the first line of stdin (else ${PASSWORD_ENV})",
    )
    parser.add_argument("--agent", required=True, help="the MID's name, without mid.server.")
    parser.add_argument("--broker", default=None, help="HOST:PORT (default: from the config)")
    parser.add_argument("--config", "-c", default=None, help="bridge config (broker, prefix)")
    parser.add_argument("--prefix", default=None, help="topic prefix (default: from config)")
    parser.add_argument("--poll-interval", type=float, default=5.0)
    parser.add_argument("--lease", type=float, default=300.0)
    parser.add_argument("--batch", type=int, default=100)
    parser.add_argument("--insecure", action="store_true", help="do not verify TLS certificates")
    parser.add_argument("--client-id", default=None, help="MQTT client id (default per agent)")


async def run_command(args: argparse.Namespace) -> int:
    """Run ``midbridge relay`` until SIGTERM/SIGINT; the exit status."""
    from pathlib import Path

    from bridge.agent.config import Config, load_config

    if args.password_stdin:
        password = sys.stdin.readline().rstrip("\r\n")
    else:
        password = os.environ.get(PASSWORD_ENV, "")
    if not password:
        return fail("relay", f"no password (--password-stdin or ${PASSWORD_ENV})")
    config = load_config(Path(args.config)) if args.config else Config()
    broker = config.broker
    if args.broker:
        try:
            host, port = parse_host_port(str(args.broker), option="--broker")
        except AddressError as exc:
            return fail("relay", exc)
        broker = BrokerConfig(**{**broker.model_dump(), "host": host, "port": port})
    settings = RelaySettings(
        instance=args.instance,
        user=args.user,
        password=password,
        agent=args.agent,
        prefix=args.prefix or config.bridge.topic_prefix,
        poll_interval=args.poll_interval,
        lease=args.lease,
        batch=args.batch,
        verify_tls=not args.insecure,
        client_id=args.client_id,
    )
    with StopSignals() as stop:
        async with Relay(settings, broker):
            await stop.wait()
    log.info("relay stopped")
    return 0
