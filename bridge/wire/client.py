"""The platform's end of the broker contract, small: send output records, collect answers.

Used by ``midbridge sweep``, the demo, the benchmarks and the tests. Answers are
de-duplicated by ``(response_to, sequence)`` (a republished record is identical), and a
job is finished when its ``complete`` record and every sequence before it arrived.
"""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any

import orjson

from bridge.wire.broker import BrokerConfig
from bridge.wire.records import new_sys_id, now_text
from bridge.wire.session import Delivery, Publisher
from bridge.wire.sessions import platform_session
from bridge.wire.topics import Topics


@dataclass
class JobResult:
    """The answers to one job, kept per run (a job re-run after a crash has two runs)."""

    sys_id: str
    runs: dict[str, dict[int, dict[str, Any]]] = field(default_factory=dict)  # run → seq → rec
    complete_run: str | None = None
    complete_at: int | None = None  # sequence of the complete record
    duplicates: int = 0
    complete_ids: set[str] = field(default_factory=set)  # input sys_ids marked complete
    finished: asyncio.Event = field(default_factory=asyncio.Event)

    @property
    def chunks(self) -> dict[int, dict[str, Any]]:
        """The chunks of the run that completed (before that: of the latest run)."""
        if self.complete_run is not None:
            return self.runs.get(self.complete_run, {})
        if not self.runs:
            return {}
        return self.runs[next(reversed(self.runs))]

    @property
    def done(self) -> bool:
        return self.complete_at is not None and len(self.chunks) == self.complete_at + 1

    @property
    def records(self) -> list[dict[str, Any]]:
        chunks = self.chunks
        return [chunks[i] for i in sorted(chunks)]

    @property
    def final(self) -> dict[str, Any]:
        assert self.complete_at is not None
        return self.chunks[self.complete_at]

    @property
    def error_string(self) -> str:
        return str(self.final.get("error_string") or "") if self.complete_at is not None else ""

    def add(self, record: dict[str, Any]) -> bool:
        """Keep one copy of each (run, sequence); True if it was new."""
        run = str(record.get("run", ""))
        seq = int(record.get("sequence", 0))
        if record.get("complete"):
            self.complete_ids.add(str(record.get("sys_id")))
        chunks = self.runs.setdefault(run, {})
        if seq in chunks:
            self.duplicates += 1
            return False
        chunks[seq] = record
        if record.get("complete") and self.complete_run is None:
            self.complete_run = run
            self.complete_at = seq
        if self.done:
            self.finished.set()
        return True


def output_record(
    topic: str,
    *,
    agent: str,
    payload: dict[str, Any] | str | None = None,
    name: str = "",
    source: str = "",
    priority: int = 2,
    sys_id: str | None = None,
    **extra: Any,
) -> dict[str, Any]:
    record: dict[str, Any] = {
        "sys_id": sys_id or new_sys_id(),
        "agent": agent,
        "topic": topic,
        "name": name,
        "source": source,
        "queue": "output",
        "state": "ready",
        "response_to": "",
        "agent_correlator": "",
        "priority": priority,
        "error_string": "",
        "payload": payload if payload is not None else {},
        "sys_created_on": now_text(),
    }
    record.update(extra)
    return record


class EccClient:
    """An async context manager: one session on the platform's side (MQTT or NATS)."""

    def __init__(
        self,
        broker: BrokerConfig,
        *,
        agent: str,
        prefix: str = "ecc",
        on_record: Callable[[dict[str, Any]], None] | None = None,
        client_id: str | None = None,
    ) -> None:
        self.topics = Topics.for_agent(prefix, agent)
        self.results: dict[str, JobResult] = {}
        self.stray: list[dict[str, Any]] = []  # answers to jobs this client did not send
        self.received_records = 0
        self._on_record = on_record
        # A persistent MQTT session: answers published while this client reconnects (or
        # while the broker restarts) wait for it instead of being dropped. On NATS the
        # answers wait in the inputs stream; the client's consumer is its own, ephemeral.
        self.session: Publisher = platform_session(
            broker,
            client_id=client_id or f"midbridge-platform-{uuid.uuid4().hex[:12]}",
            prefix=prefix,
            agent=agent,
            on_message=self._on_message,
            durable=False,
            receive_maximum=65535,
        )

    async def __aenter__(self) -> EccClient:
        await self.session.__aenter__()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.session.__aexit__(*exc)

    def expect(self, sys_ids: Iterable[str]) -> None:
        for sys_id in sys_ids:
            self.results.setdefault(sys_id, JobResult(sys_id))

    async def _on_message(self, delivery: Delivery) -> bool:
        data = orjson.loads(delivery.payload)
        records = data if isinstance(data, list) else [data]
        for record in records:
            self.received_records += 1
            result = self.results.get(str(record.get("response_to")))
            if result is None:
                self.stray.append(record)
                continue
            if result.add(record) and self._on_record is not None:
                self._on_record(record)
        return True

    async def send(
        self, records: list[dict[str, Any]], *, batch: int = 1, express: bool = False
    ) -> None:
        """Publish output records (``batch`` to a message) and wait for the broker's PUBACKs."""
        self.expect(r["sys_id"] for r in records if isinstance(r, dict) and "sys_id" in r)
        topic = self.topics.express if express else self.topics.output
        futures = []
        for start in range(0, len(records), batch):
            part = records[start : start + batch]
            body = orjson.dumps(part[0]) if batch == 1 else orjson.dumps(part)
            futures.append(await self.session.publish_start(topic, body))
        await asyncio.gather(*futures)

    async def send_raw(self, body: bytes, *, express: bool = False) -> None:
        topic = self.topics.express if express else self.topics.output
        await self.session.publish(topic, body)

    async def wait(self, sys_ids: Iterable[str], timeout: float) -> list[JobResult]:
        wanted = [self.results.setdefault(s, JobResult(s)) for s in sys_ids]
        async with asyncio.timeout(timeout):
            for result in wanted:
                await result.finished.wait()
        return wanted
