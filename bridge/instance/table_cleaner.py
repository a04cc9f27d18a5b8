"""The Table Cleaner, as ServiceNow documents it: old records deleted by rules held in the
Auto Flush table ``sys_auto_flush`` (docs/instance.md, "Table cleaner").

ServiceNow: "The table cleaner job runs once per hour by default" and deletes records by
the rules in ``sys_auto_flush``; each rule has a table (``tablename``), a ``matchfield`` (a
date-time field) and an ``age`` in seconds: a record whose matchfield is older than that
goes, when it also matches the rule's ``conditions`` (an encoded query). The instance
seeds four rules when it creates the table (``bridge.instance.schema.INITIAL_RECORDS``):
ECC queue records (inputs, and outputs processed or in error) after 7 days, dead letters
and syslog after 30 days, attachments of ECC records after 7 days.

Each run (:meth:`TableCleaner.run_once`), per active rule: the cutoff is now - age
(``YYYY-MM-DD HH:MM:SS``, UTC, as the store writes ``sys_created_on``); the records whose
matchfield is before it (and not empty) and that match the conditions (AND-ed into each
``^NQ`` branch) are read ``batch`` at a time (their sys_ids only: never a payload or
a file), and deleted one by one
through ``Store.delete`` (so cascades and listeners run as for any delete), until none is
left, ``max_per_rule`` went, or the rule has run ``time_budget`` seconds (a WARNING; the
next run goes on). A rule that cannot run (unknown table or field, a matchfield that is
not a date-time, a bad condition, an age that is not a positive number of seconds) is
logged as a WARNING naming its sys_id and skipped; an error inside one rule never stops
the others nor the loop.

Where it runs: beside the connector and discovery, in ``midbridge instance`` (one
instance), in the leader's term on PostgreSQL (``bridge.instance.leader``);
``--table-cleaner-interval SECONDS`` (3600; 0: off).
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from bridge.instance.api_params import restrict
from bridge.instance.periodic import Periodic
from bridge.instance.query import QueryError, escape
from bridge.instance.schema import AUTO_FLUSH, META_TABLES
from bridge.instance.store import FieldType, Store, StoreError

log = logging.getLogger("midbridge.instance.table_cleaner")

RULES = AUTO_FLUSH
DEFAULT_INTERVAL = 3600.0  # ServiceNow's table cleaner job: once per hour
MAX_AGE = 100 * 366 * 86_400  # seconds: older than any record, within what dates can hold


class RuleFault(Exception):
    """A rule that cannot run (what is wrong with it, for the log)."""


@dataclass(frozen=True, slots=True)
class Rule:
    sys_id: str
    table: str
    matchfield: str
    age: int
    conditions: str


def _cutoff(now: float, age: int) -> str:
    return time.strftime("%Y-%m-%d %H:%M:%S", time.gmtime(now - age))


class TableCleaner:
    """``async with TableCleaner(store)``: a run at once, then one every ``interval``
    seconds, until left (or ``start()`` / ``await stop()``). ``on_deleted(table, count)``
    is told of each rule's deletions (the instance's metrics)."""

    def __init__(
        self,
        store: Store,
        interval: float = DEFAULT_INTERVAL,
        batch: int = 1000,
        max_per_rule: int = 100_000,
        time_budget: float = 30.0,
        *,
        on_deleted: Callable[[str, int], object] | None = None,
    ) -> None:
        if not interval > 0:
            raise ValueError(f"table cleaner interval: expected seconds > 0, not {interval!r}")
        if batch < 1 or max_per_rule < 1:
            raise ValueError("table cleaner: batch and max_per_rule must be at least 1")
        if not time_budget > 0:
            raise ValueError(
                f"table cleaner time budget: expected seconds > 0, not {time_budget!r}"
            )
        self.store = store
        self.interval = float(interval)
        self.batch = batch
        self.max_per_rule = max_per_rule
        self.time_budget = float(time_budget)
        self.on_deleted = on_deleted
        self.runs = 0
        self._loop = Periodic(
            self.run_once, lambda: self.interval, name="table cleaner", logger=log
        )

    # --- the loop ---------------------------------------------------------------------------

    def start(self) -> None:
        self._loop.start()

    async def stop(self) -> None:
        await self._loop.stop()

    async def __aenter__(self) -> TableCleaner:
        self.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.stop()

    # --- one run ----------------------------------------------------------------------------

    async def run_once(self) -> dict[str, int]:
        """Apply every active rule once; records deleted per table (a table whose rules
        ran and deleted nothing: 0; a rule skipped as faulty: not counted)."""
        now = time.time()
        deleted: dict[str, int] = {}
        for row in await self.store.query(RULES, "active=true"):
            sys_id = str(row.get("sys_id") or "")
            try:
                rule = self._rule(row)
            except RuleFault as fault:
                log.warning("table cleaner: rule %s skipped: %s", sys_id, fault)
                continue
            try:
                count = await self._apply(rule, now)
            except asyncio.CancelledError:
                raise
            except (QueryError, StoreError) as exc:  # a bad condition, a refused delete
                log.warning(
                    "table cleaner: rule %s (%s) skipped: %s", sys_id, rule.table, exc.message
                )
                continue
            except Exception:
                log.exception("table cleaner: rule %s (%s) failed", sys_id, rule.table)
                continue
            deleted[rule.table] = deleted.get(rule.table, 0) + count
        self.runs += 1
        done = {table: count for table, count in deleted.items() if count}
        if done:
            log.info(
                "table cleaner: deleted %s",
                ", ".join(f"{table}: {count}" for table, count in done.items()),
            )
        return deleted

    def _rule(self, row: dict[str, Any]) -> Rule:
        """The rule a ``sys_auto_flush`` record holds; RuleFault if it cannot run."""
        name = str(row.get("tablename") or "").strip()
        if not name:
            raise RuleFault("no tablename")
        table = self.store.schema.get(name)
        if table is None:
            raise RuleFault(f"unknown table {name[:80]!r}")
        if table.name in META_TABLES:
            raise RuleFault(f"table {name} is the schema: never cleaned")
        field = str(row.get("matchfield") or "").strip() or "sys_created_on"
        spec = table.fields.get(field)
        if spec is None:
            raise RuleFault(f"unknown field {field[:80]!r} in table {name}")
        if spec.type is not FieldType.DATETIME:
            raise RuleFault(f"matchfield {name}.{field} is not a date-time field")
        age = row.get("age")
        if not isinstance(age, int) or isinstance(age, bool) or not 0 < age <= MAX_AGE:
            raise RuleFault(
                f"age {str(age)[:40]!r}: expected a positive number of seconds, at most "
                f"{MAX_AGE} (100 years)"
            )
        return Rule(str(row["sys_id"]), name, field, age, str(row.get("conditions") or "").strip())

    async def _apply(self, rule: Rule, now: float) -> int:
        """Delete what ``rule`` matches, within this run's bounds; how many went."""
        cutoff = escape(_cutoff(now, rule.age))
        aged = f"{rule.matchfield}<{cutoff}^{rule.matchfield}ISNOTEMPTY"
        query = restrict(rule.conditions, aged) if rule.conditions else aged
        started = time.monotonic()
        deleted = 0
        try:
            while deleted < self.max_per_rule:
                if time.monotonic() - started >= self.time_budget:
                    log.warning(
                        "table cleaner: rule %s (%s) ran %.0f s: stopped for this run after "
                        "%d deletion(s); the next run goes on",
                        rule.sys_id, rule.table, self.time_budget, deleted,
                    )  # fmt: skip
                    break
                limit = min(self.batch, self.max_per_rule - deleted)
                ids = await self.store.sys_ids(rule.table, query, limit=limit)
                if not ids:
                    break
                went = 0
                for sys_id in ids:
                    if await self.store.delete(rule.table, sys_id):
                        went += 1
                    if time.monotonic() - started >= self.time_budget:
                        break
                deleted += went
                if not went:  # nothing of the batch could go (deleted meanwhile): next run
                    break
        finally:
            if deleted and self.on_deleted is not None:
                try:
                    self.on_deleted(rule.table, deleted)
                except Exception:
                    log.exception("table cleaner: on_deleted failed")
        return deleted


__all__ = ["DEFAULT_INTERVAL", "RULES", "Rule", "RuleFault", "TableCleaner"]
