"""Work pick-up as a MID does it: the fetch, and a claim another relay cannot share.

**Fetch** ("How the ECC Queue ... gets processed", KB0855595): this MID's outputs in state
``ready``, ``ORDERBYpriority^ORDERBYsys_created_on`` (the highest priority first, the oldest
of those first), a batch at a time. At start also those left ``processing`` by this relay
(a MID "also queries for Processing state outputs, on the assumption that the MID Server
may have died while processing them").

**Claim.** The Table API has no compare-and-set: a PATCH is last-writer-wins. Two relays
of one MID that both fetched a ready output would both PATCH it ``processing`` and both
run it. The claim is therefore Fischer's timed mutual exclusion (L. Lamport, "A Fast
Mutual Exclusion Algorithm", 1987, crediting M. Fischer) over fields a plain Table API
offers:

1. the fetch is the *check*: the output was ``ready`` when read (at ``checked_at``);
2. *write* a token of our own: ``PATCH {"state": "processing", "error_string": <token>,
   "processed": <now>}`` (``error_string`` is the one field an output does not use before
   it is answered, and the one a ``mid_server`` account may write besides ``state`` and
   ``processed`` on every instance we know), but only if the write can be *sent* within
   ``window / 2`` of the check, and it counts only if its answer came back within
   ``window`` of the check;
3. *wait* ``window`` after our write's answer, then *re-read*: the output is ours if its
   ``error_string`` is still our token.

Every relay whose check saw ``ready`` did so before the first write landed, so every such
write lands within ``window`` of that first write; every re-read comes ``window`` after its
own write: all writes have landed when anyone re-reads, everyone reads the same last token,
and exactly one relay wins. A write whose answer came late (or never: a timeout) is
*uncertain*: it may have landed after the winner's re-read. Such a claim is not run now;
the relay checks the output again after the lease (``Relay``): still ``processing`` with
its token, it is taken (the bridge drops a repeat it is running or has run by sys_id).
"""

from __future__ import annotations

import asyncio
import logging
import time
import uuid
from dataclasses import dataclass, field

from bridge.relay.http import InstanceClient, Row
from bridge.relay.settings import RelayError
from bridge.wire.records import now_text

TOKEN_PREFIX = "midbridge-claim:"


@dataclass
class ClaimOutcome:
    won: list[tuple[Row, str]] = field(default_factory=list)  # (row, token)
    uncertain: list[tuple[Row, str]] = field(default_factory=list)
    lost: int = 0
    skipped: int = 0  # too late to send the write: left for the next poll


def ours(error_string: str, relay_id: str) -> bool:
    """A token this relay wrote (before a restart too)."""
    return error_string.startswith(f"{TOKEN_PREFIX}{relay_id}:")


class Claimer:
    def __init__(
        self,
        client: InstanceClient,
        agent_id: str,
        relay_id: str,
        *,
        window: float,
        concurrency: int = 8,
        logger: logging.Logger | None = None,
    ) -> None:
        self.client = client
        self.agent_id = agent_id
        self.relay_id = relay_id
        self.window = window
        self._slots = asyncio.Semaphore(max(1, concurrency))
        self._log = logger or logging.getLogger("midbridge.relay")

    def query(self, state: str, *, topics: frozenset[str] | None = None) -> str:
        """This MID's outputs in ``state``, by priority then age (``topics``: only those)."""
        query = f"agent={self.agent_id}^queue=output^state={state}"
        if topics:
            query += "^topicIN" + ",".join(sorted(topics))
        return query + "^ORDERBYpriority^ORDERBYsys_created_on"

    async def fetch(
        self, state: str, limit: int, *, topics: frozenset[str] | None = None
    ) -> tuple[list[Row], float]:
        """(the rows, when they were checked: the monotonic time the request was sent)."""
        checked_at = time.monotonic()
        rows = await self.client.query("ecc_queue", self.query(state, topics=topics), limit=limit)
        return rows, checked_at

    def new_token(self) -> str:
        return f"{TOKEN_PREFIX}{self.relay_id}:{uuid.uuid4().hex[:16]}"

    async def claim(self, rows: list[Row], checked_at: float) -> ClaimOutcome:
        outcome = ClaimOutcome()
        pending: list[tuple[Row, str, float]] = []

        async def write(row: Row) -> None:
            async with self._slots:
                if time.monotonic() - checked_at > self.window / 2:
                    outcome.skipped += 1
                    return
                token = self.new_token()
                body = {"state": "processing", "error_string": token, "processed": now_text()}
                try:
                    await self.client.update("ecc_queue", row["sys_id"], body, retry=False)
                except RelayError as exc:
                    if exc.transient:
                        outcome.uncertain.append((row, token))
                    else:  # refused: taken and closed meanwhile, or not ours to take
                        self._log.debug("claim of %s refused: %s", row["sys_id"], exc)
                        outcome.lost += 1
                    return
                answered = time.monotonic()
                if answered - checked_at > self.window:
                    outcome.uncertain.append((row, token))
                else:
                    pending.append((row, token, answered))

        await asyncio.gather(*(write(row) for row in rows))
        if pending:
            settle = max(answered for _, _, answered in pending) + self.window - time.monotonic()
            if settle > 0:
                await asyncio.sleep(settle)
            ids = ",".join(row["sys_id"] for row, _, _ in pending)
            try:
                now = await self.client.query(
                    "ecc_queue",
                    f"agent={self.agent_id}^queue=output^sys_idIN{ids}",
                    limit=len(pending),
                    fields="sys_id,state,error_string",
                )
            except RelayError as exc:
                self._log.warning("claim re-read failed (%s): checked again later", exc)
                outcome.uncertain.extend((row, token) for row, token, _ in pending)
                return outcome
            by_id = {row.get("sys_id"): row for row in now}
            for row, token, _ in pending:
                seen = by_id.get(row["sys_id"], {})
                if seen.get("state") == "processing" and seen.get("error_string") == token:
                    outcome.won.append((row, token))
                else:
                    outcome.lost += 1
        if outcome.uncertain:
            self._log.info("%d claim(s) uncertain (late or no answer): checked again later",
                           len(outcome.uncertain))  # fmt: skip
        return outcome

    async def still_ours(self, sys_id: str, token: str) -> Row | None:
        """The output if it is still ``processing`` under ``token``; else ``None``."""
        row = await self.client.get("ecc_queue", sys_id)
        if row is None or row.get("state") != "processing" or row.get("error_string") != token:
            return None
        return row
