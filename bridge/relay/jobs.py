"""One output the relay holds: how it goes to the bridge, and the one input that answers it.

An output whose payload is ServiceNow's XML ``<parameters>`` goes through its probe's
dialect (``bridge/relay/dialect``): the bridge gets the probe's JSON parameters, and the
answer is ``<results>`` in that probe's shape with the output's parameters echoed. An
output with a JSON payload speaks the bridge's own wire: it goes as it is, and its answer
is the result as JSON text (the one chunk's object, or a JSON array of the chunks'
objects when the job streamed several). Either way: one input record per output, and no
``sequence`` (the instance numbers its records itself).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import orjson

from bridge.relay.dialect import LOCAL_TOPICS, ParamReader, dialect_for
from bridge.relay.dialect.base import error_of
from bridge.relay.envelope import (
    Element,
    Parameters,
    generic_result,
    is_xml,
    parse_parameters,
    results_document,
)
from bridge.relay.http import Row
from bridge.relay.spool import SpooledJob
from bridge.wire.errors import BridgeError
from bridge.wire.outputs import output_wire, priority_of


@dataclass
class Job:
    """An output this relay claimed (persisted in the spool as :meth:`doc`)."""

    sys_id: str
    token: str
    row: Row  # the output as fetched (every field text)
    xml: bool  # ServiceNow's <parameters>: answered in its dialect
    params: Parameters = field(default_factory=list)  # the output's, as the dialect read them
    extra: dict[str, Any] = field(default_factory=dict)  # the dialect's, for the answer
    wire: dict[str, Any] | None = None  # what goes to the bridge; None: answered here
    refusal: dict[str, Any] | None = None  # an error found here: {"kind", "message", "field"}
    stage: str = "running"
    input_sys_id: str = ""
    lease_until: float = 0.0  # monotonic: not answered by then, published again
    done: bool = False  # a complete run is spooled: the answer is due

    @property
    def topic(self) -> str:
        return str(self.row.get("topic", ""))

    @property
    def local(self) -> bool:
        """Answered by the relay itself (a ServiceNow SystemCommand)."""
        return self.xml and self.topic in LOCAL_TOPICS and self.refusal is None

    def doc(self) -> dict[str, Any]:
        return {"row": self.row, "xml": self.xml, "params": self.params, "extra": self.extra,
                "wire": self.wire, "refusal": self.refusal}  # fmt: skip

    def spooled(self) -> SpooledJob:
        return SpooledJob(self.sys_id, self.token, self.doc(), self.stage, self.input_sys_id)

    @classmethod
    def from_spool(cls, spooled: SpooledJob) -> Job:
        doc = spooled.doc
        return cls(
            spooled.sys_id,
            spooled.token,
            dict(doc.get("row") or {}),
            bool(doc.get("xml")),
            [(str(n), str(v)) for n, v in doc.get("params") or []],
            dict(doc.get("extra") or {}),
            doc.get("wire"),
            doc.get("refusal"),
            spooled.stage,
            spooled.input_sys_id,
        )


def prepare(row: Row, token: str) -> Job:
    """A claimed output as a :class:`Job`: its parameters through its dialect (an error
    there is kept in ``refusal`` and answered without the bridge)."""
    payload = row.get("payload", "")
    job = Job(row["sys_id"], token, row, is_xml(payload))
    if not job.xml:
        job.wire = {**output_wire(row), "state": "processing"}
        return job
    try:
        job.params = parse_parameters(payload)
        reader = ParamReader(job.params, row)
        mapped = dialect_for(job.topic).map(reader)
        reader.finish(job.topic, job.sys_id)
    except BridgeError as exc:
        job.refusal = {"kind": exc.kind, "message": exc.message}
        if exc.field:
            job.refusal["field"] = exc.field
        return job
    job.extra = mapped.extra
    if not job.local:
        job.wire = {**output_wire({**row, "payload": mapped.params}), "state": "processing"}
    return job


@dataclass(frozen=True)
class Answer:
    """The one input record answering a job (before the size checks)."""

    payload: str
    error_string: str


def answer(job: Job, chunks: list[dict[str, Any]]) -> Answer:
    """The input that answers ``job`` from the chunks of its one complete run."""
    final = chunks[-1] if chunks else {}
    error = str(final.get("error_string") or "")
    payloads = [chunk.get("payload") for chunk in chunks]
    if not job.xml:
        body = payloads[0] if len(payloads) == 1 else payloads
        return Answer(orjson.dumps(body).decode(), error)
    data = [p for p in payloads if not error_of(p)]
    results: list[Element] = dialect_for(job.topic).results(data, job.extra) if data else []
    results += [generic_result(p) for p in payloads if error_of(p)]
    echo = _echo_of(job)
    text = results_document(results, echo, probe_time=final.get("probe_time", 0), error=error)
    return Answer(text, error)


def error_answer(job: Job, kind: str, message: str) -> Answer:
    """An answer that is only an error (the relay's own: a refusal, an oversized result)."""
    error = f"{kind}: {message}"
    if not job.xml:
        return Answer(orjson.dumps({"error": {"kind": kind, "message": message}}).decode(), error)
    result = generic_result({"error": {"kind": kind, "message": message}})
    return Answer(results_document([result], _echo_of(job), error=error), error)


def _echo_of(job: Job) -> Parameters | str:
    """The output's ``<parameters>`` as it came, or (unparsable) the pairs read (none)."""
    return job.row.get("payload", "") if job.params else job.params


def input_body(job: Job, agent_id: str, payload: str, error_string: str) -> dict[str, Any]:
    """The Table API body of the input record: no ``sequence``, ``complete`` or ``run``."""
    row = job.row
    return {
        "agent": agent_id,
        "topic": row.get("topic", ""),
        "name": row.get("name", ""),
        "source": row.get("source", ""),
        "queue": "input",
        "state": "ready",
        "response_to": job.sys_id,
        "agent_correlator": row.get("agent_correlator", ""),
        "priority": priority_of(row.get("priority")),  # the sensor's job runs at it
        "error_string": error_string,
        "payload": payload,
    }
