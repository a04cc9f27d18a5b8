"""Answering an output: one input record, an attachment when it is large, the output closed.

Once the spool holds a complete run of an output (``bridge/relay/spool.py``):

1. the answer is assembled in the output's dialect (``bridge/relay/jobs.py``);
2. a payload over ``mid.eccq.max_payload_size`` is not sent: an error saying so is, as a
   MID does ("MID Server properties": it discards the payload and returns an error);
3. the input is inserted (``POST /api/now/table/ecc_queue``): ``queue=input``,
   ``state=ready``, ``response_to`` the output, its ``agent``, ``topic``, ``name``,
   ``source``, ``agent_correlator``, ``error_string``, ``payload``; no ``sequence`` (the
   instance generates it), no ``complete`` or ``run``;
4. a payload over ``glide.soapprocessor.large_field_patch_max`` goes as an attachment, as
   the instance's own SOAP path stores it (KB0855595): the input's payload is
   ``<see_attachment/>`` and the XML is attached to it (``POST /api/now/attachment/file?
   table_name=ecc_queue&table_sys_id=<input>&file_name=payload.xml``);
5. the output is closed: ``state`` ``processed`` (or ``error`` with the error), and the
   claim token in ``error_string`` replaced.

Each step is recorded in the spool first, so a relay that stops between two steps goes on
from the right one at its next start (before inserting again it looks for an input
already answering the output). A transient failure (no answer, 5xx, 429) is tried again
by the lease loop; a refusal (another 4xx) ends the job: the output was closed or taken
meanwhile.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Coroutine
from typing import Any, Protocol

from bridge.relay.http import InstanceClient
from bridge.relay.jobs import Answer, Job, answer, error_answer, input_body
from bridge.relay.settings import ATTACHMENT_NAME, SEE_ATTACHMENT, MidProperties, RelayError
from bridge.relay.spool import Spool


class Host(Protocol):
    """What answering needs of the relay (``bridge.relay.core.Relay``)."""

    agent_id: str
    client: InstanceClient
    spool: Spool
    jobs: dict[str, Job]
    props: MidProperties
    stats: dict[str, int]
    logger: logging.Logger

    def spawn(self, coro: Coroutine[Any, Any, None], name: str) -> None: ...


class Writeback:
    def __init__(self, relay: Host) -> None:
        self.relay = relay
        self._running: set[str] = set()

    def finish(self, job: Job) -> None:
        """Answer ``job`` in the background (once at a time per job)."""
        if job.sys_id in self._running or job.sys_id not in self.relay.jobs:
            return
        self._running.add(job.sys_id)
        self.relay.spawn(self._finish(job), f"relay-answer-{job.sys_id[:16]}")

    async def _finish(self, job: Job) -> None:
        relay = self.relay
        try:
            await self._answer(job)
        except RelayError as exc:
            relay.logger.warning("answer to %s not written yet (tried again later): %s",
                               job.sys_id, exc)  # fmt: skip
        except asyncio.CancelledError:
            raise
        except Exception:
            relay.logger.exception("answer to %s failed", job.sys_id)
        finally:
            self._running.discard(job.sys_id)

    def _checked(self, job: Job, ans: Answer) -> Answer:
        limit = self.relay.props.max_payload
        size = len(ans.payload.encode())
        if size <= limit:
            return ans
        self.relay.stats["oversized"] += 1
        message = (f"the result of {size} bytes is over mid.eccq.max_payload_size ({limit}): "
                   "not sent")  # fmt: skip
        self.relay.logger.warning("%s: %s", job.sys_id, message)
        return error_answer(job, "payload_too_large", message)

    async def _answer(self, job: Job) -> None:
        relay = self.relay
        chunks = await relay.spool.complete_run(job.sys_id)
        if chunks is None:
            job.done = False
            return
        ans = self._checked(job, answer(job, chunks))
        content = ans.payload.encode()
        attach = len(content) > relay.props.attach_over
        client = relay.client
        if job.stage in ("running", "posting"):
            existing = None
            if job.stage == "posting":  # a stop between the insert and its record
                found = await client.query(
                    "ecc_queue", f"queue=input^response_to={job.sys_id}", limit=1,
                    fields="sys_id",
                )  # fmt: skip
                existing = found[0].get("sys_id") if found else None
            if existing is None:
                job.stage = "posting"
                await relay.spool.set_stage(job.sys_id, "posting")
                body = input_body(
                    job, relay.agent_id, SEE_ATTACHMENT if attach else ans.payload,
                    ans.error_string,
                )  # fmt: skip
                try:
                    row = await client.insert("ecc_queue", body)
                except RelayError as exc:
                    if exc.transient:
                        raise
                    relay.logger.warning("the answer to %s was refused, dropped: %s",
                                       job.sys_id, exc)  # fmt: skip
                    relay.stats["refused"] += 1
                    await self._drop(job)
                    return
                existing = row.get("sys_id", "")
            job.stage, job.input_sys_id = "written", existing or ""
            await relay.spool.set_stage(job.sys_id, "written", job.input_sys_id)
        error = ans.error_string
        if attach and job.stage == "written":
            kind = "application/xml" if job.xml else "application/json"
            try:
                await client.attach("ecc_queue", job.input_sys_id, ATTACHMENT_NAME, content, kind)
                relay.stats["attached"] += 1
            except RelayError as exc:
                if exc.transient:
                    raise
                relay.logger.error("the result of %s (%d bytes) could not be attached: %s",
                                 job.sys_id, len(content), exc)  # fmt: skip
                error = error or f"attachment_failed: {exc}"
            job.stage = "attached"
            await relay.spool.set_stage(job.sys_id, "attached", job.input_sys_id)
        state = "error" if error else "processed"
        try:
            await client.update("ecc_queue", job.sys_id, {"state": state, "error_string": error})
        except RelayError as exc:
            if exc.transient:
                raise
            relay.logger.info("output %s not closed by the relay (%s): closed already", job.sys_id,
                            exc)  # fmt: skip
        relay.stats["closed"] += 1
        await self._drop(job)

    async def _drop(self, job: Job) -> None:
        await self.relay.spool.remove(job.sys_id)
        self.relay.jobs.pop(job.sys_id, None)
