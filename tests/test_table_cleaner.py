"""The table cleaner (bridge/instance/table_cleaner.py): old records deleted by the
``sys_auto_flush`` rules, through the real store on SQLite and PostgreSQL, and through a
real instance's Table API. Records are made old by writing ``sys_created_on`` with SQL
(the store never lets a writer set it)."""

from __future__ import annotations

import asyncio
import base64
import contextlib
import logging
import os
import sqlite3
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiohttp
import orjson
import pytest

from bridge.instance import auth, schema
from bridge.instance.connector import install, keys_for
from bridge.instance.leader import cluster_leadership
from bridge.instance.server import Instance, InstanceConfig
from bridge.instance.store import Store
from bridge.instance.table_cleaner import RULES, TableCleaner
from tests.brokers import BrokerAddress
from tests.conftest import StoreBackend

pytestmark = pytest.mark.timeout(90)

REPO = Path(__file__).resolve().parent.parent
TABLE = "/api/now/table"
DAY = 86_400
ADMIN_PW = "admin-pass-123"
USER_PW = "user-pass-1234"
ECC_RULE = schema.record_id(RULES, "ecc_queue")
DEAD_RULE = schema.record_id(RULES, "ecc_dead_letter")
SYSLOG_RULE = schema.record_id(RULES, "syslog")
ATTACHMENT_RULE = schema.record_id(RULES, "sys_attachment.ecc_queue")


def ago(seconds: float) -> str:
    return time.strftime("%Y-%m-%d %H:%M:%S", time.gmtime(time.time() - seconds))


async def make_old(
    backend: StoreBackend, table: str, records: Iterable[dict[str, Any]], seconds: float
) -> None:
    """Set ``sys_created_on`` of ``records`` to ``seconds`` ago, in SQL."""
    when = ago(seconds)
    await backend.execute(
        [
            (f'UPDATE "{table}" SET "sys_created_on" = ? WHERE "sys_id" = ?', (when, r["sys_id"]))
            for r in records
        ]
    )


async def ids(store: Store, table: str, query: str = "") -> set[str]:
    return {str(r["sys_id"]) for r in await store.query(table, query)}


# --- the rules ---------------------------------------------------------------------------------


async def test_the_default_rules_exist_after_open_and_are_seeded_once(
    store: Store, backend: StoreBackend
) -> None:
    rules = {r["sys_id"]: r for r in await store.query(RULES)}
    shown = {
        sid: (r["tablename"], r["matchfield"], r["age"], r["conditions"], r["active"])
        for sid, r in rules.items()
    }
    assert shown == {
        ECC_RULE: (
            "ecc_queue", "sys_created_on", 7 * DAY,
            "queue=input^NQqueue=output^stateINprocessed,error", True,
        ),
        DEAD_RULE: ("ecc_dead_letter", "sys_created_on", 30 * DAY, "", True),
        SYSLOG_RULE: ("syslog", "sys_created_on", 30 * DAY, "", True),
        ATTACHMENT_RULE: (
            "sys_attachment", "sys_created_on", 7 * DAY, "table_name=ecc_queue", True,
        ),
    }  # fmt: skip
    for rule in rules.values():  # each names a table and a date-time field that exist
        table = store.schema[rule["tablename"]]
        assert table.fields[rule["matchfield"]].type.value == "glide_date_time"
        await store.count(rule["tablename"], rule["conditions"])  # the conditions compile
    # An admin's changes stay, and a deleted default is not made again on the next open.
    await store.update(RULES, SYSLOG_RULE, {"age": 90 * DAY, "active": False})
    assert await store.delete(RULES, DEAD_RULE)
    await store.close()
    async with backend.open() as again:
        after = {r["sys_id"]: r for r in await again.query(RULES)}
        assert set(after) == {ECC_RULE, SYSLOG_RULE, ATTACHMENT_RULE}
        assert (after[SYSLOG_RULE]["age"], after[SYSLOG_RULE]["active"]) == (90 * DAY, False)


async def test_ecc_queue_ages_out_but_never_an_output_awaiting_its_answer(
    store: Store, backend: StoreBackend
) -> None:
    def ecc(queue: str, state: str) -> dict[str, Any]:
        return {"agent": "mid.server.a", "topic": "Echo", "queue": queue, "state": state}

    old_gone = await store.insert_many(
        "ecc_queue",
        [ecc("input", "ready"), ecc("input", "processed"), ecc("output", "processed"),
         ecc("output", "error")],
    )  # fmt: skip
    old_kept = await store.insert_many(
        "ecc_queue", [ecc("output", "ready"), ecc("output", "processing")]
    )
    recent = await store.insert_many(
        "ecc_queue", [ecc("input", "processed"), ecc("output", "processed")]
    )
    await make_old(backend, "ecc_queue", [*old_gone, *old_kept], 8 * DAY)
    await make_old(backend, "ecc_queue", recent, 6 * DAY)
    # Attachments: of old ECC records (gone), of another table (kept), recent (kept).
    files = [
        {"file_name": name, "table_name": table, "table_sys_id": "x", "content": ""}
        for name, table in (("old.xml", "ecc_queue"), ("mine.txt", "u_x"), ("new.xml", "ecc_queue"))
    ]
    old_file, other_file, new_file = await store.insert_many("sys_attachment", files)
    await make_old(backend, "sys_attachment", [old_file, other_file], 8 * DAY)

    deleted = await TableCleaner(store).run_once()

    assert deleted == {"ecc_queue": 4, "ecc_dead_letter": 0, "syslog": 0, "sys_attachment": 1}
    assert await ids(store, "ecc_queue") == {r["sys_id"] for r in (*old_kept, *recent)}
    assert await ids(store, "sys_attachment") == {other_file["sys_id"], new_file["sys_id"]}
    assert await TableCleaner(store).run_once() == dict.fromkeys(deleted, 0)  # nothing left


async def test_dead_letters_and_syslog_age_out_at_30_days(
    store: Store, backend: StoreBackend
) -> None:
    for table, row in (("ecc_dead_letter", {"reason": "bad"}), ("syslog", {"message": "m"})):
        old = await store.insert_many(table, [row, row])
        young = await store.insert_many(table, [row])
        await make_old(backend, table, old, 31 * DAY)
        await make_old(backend, table, young, 29 * DAY)
    deleted = await TableCleaner(store).run_once()
    assert (deleted["ecc_dead_letter"], deleted["syslog"]) == (2, 2)
    assert await store.count("ecc_dead_letter") == await store.count("syslog") == 1


async def test_an_inactive_rule_deletes_nothing(store: Store, backend: StoreBackend) -> None:
    old = await store.insert_many("syslog", [{"message": "old"}] * 3)
    await make_old(backend, "syslog", old, 60 * DAY)
    await store.update(RULES, SYSLOG_RULE, {"active": False})
    deleted = await TableCleaner(store).run_once()
    assert "syslog" not in deleted
    assert await store.count("syslog") == 3
    await store.update(RULES, SYSLOG_RULE, {"active": True})
    assert (await TableCleaner(store).run_once())["syslog"] == 3


async def test_broken_rules_are_skipped_by_name_and_the_others_still_run(
    store: Store, backend: StoreBackend, caplog: pytest.LogCaptureFixture
) -> None:
    old = await store.insert_many("syslog", [{"message": "old"}] * 2)
    await make_old(backend, "syslog", old, 60 * DAY)
    broken: dict[str, dict[str, Any]] = {
        "unknown table": {"tablename": "u_no_such_table", "age": 60},
        "unknown field": {"tablename": "syslog", "matchfield": "u_when", "age": 60},
        "not a date-time": {"tablename": "syslog", "matchfield": "message", "age": 60},
        "bad condition": {"tablename": "sys_user", "age": 1, "conditions": "u_nothing=1"},
        "bad syntax": {"tablename": "sys_user", "age": 1, "conditions": "user_nameBETWEENx"},
        "age 0": {"tablename": "sys_user", "age": 0},
        "no age": {"tablename": "sys_user"},
        "negative age": {"tablename": "sys_user", "age": -5},
        "age past any date": {"tablename": "sys_user", "age": 10**15},
        "the schema": {"tablename": "sys_dictionary", "age": 1, "conditions": "name=u_kept"},
        "the tables": {"tablename": "sys_db_object", "age": 1, "conditions": "name=u_kept"},
    }
    await store.insert("sys_db_object", {"name": "u_kept"})
    await store.insert("sys_dictionary", {"name": "u_kept", "element": "u_note"})
    for meta in ("sys_db_object", "sys_dictionary"):
        await make_old(backend, meta, await store.query(meta, "name=u_kept"), 60 * DAY)
    made = {what: (await store.insert(RULES, fields))["sys_id"] for what, fields in broken.items()}
    await store.insert("sys_user", {"user_name": "old.user"})
    await make_old(backend, "sys_user", await store.query("sys_user"), 60 * DAY)
    users = await ids(store, "sys_user")
    entries = await store.count("sys_dictionary")
    with caplog.at_level(logging.WARNING, logger="midbridge.instance.table_cleaner"):
        deleted = await TableCleaner(store).run_once()
    assert deleted["syslog"] == 2
    assert await store.count("syslog") == 0
    assert await ids(store, "sys_user") == users  # no broken rule deleted a thing
    assert await store.count("sys_dictionary") == entries
    assert "u_note" in store.schema["u_kept"].fields
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    for what, sys_id in made.items():
        assert any(sys_id in line for line in warnings), (what, warnings)
    assert any("unknown table 'u_no_such_table'" in line for line in warnings)
    assert any("unknown field 'u_when'" in line for line in warnings)


async def test_max_per_rule_bounds_a_run_and_the_next_run_goes_on(
    store: Store, backend: StoreBackend
) -> None:
    old = await store.insert_many("syslog", [{"message": str(i)} for i in range(7)])
    await make_old(backend, "syslog", old, 60 * DAY)
    cleaner = TableCleaner(store, batch=2, max_per_rule=5)
    assert (await cleaner.run_once())["syslog"] == 5
    assert await store.count("syslog") == 2
    assert (await cleaner.run_once())["syslog"] == 2
    assert await store.count("syslog") == 0


@dataclass
class SlowDeletes:
    """The store, with each delete taking ``delay`` seconds (a big table's deletes)."""

    store: Store
    delay: float

    @property
    def schema(self) -> Any:
        return self.store.schema

    async def query(self, table: str, query: str = "", **kw: Any) -> Any:
        return await self.store.query(table, query, **kw)

    async def sys_ids(self, table: str, query: str = "", *, limit: int) -> list[str]:
        return await self.store.sys_ids(table, query, limit=limit)

    async def delete(self, table: str, sys_id: str) -> bool:
        await asyncio.sleep(self.delay)
        return await self.store.delete(table, sys_id)


async def test_a_rule_out_of_time_stops_for_this_run_only(
    store: Store, backend: StoreBackend, caplog: pytest.LogCaptureFixture
) -> None:
    old = await store.insert_many("syslog", [{"message": str(i)} for i in range(4)])
    await make_old(backend, "syslog", old, 60 * DAY)
    slow: Any = SlowDeletes(store, 0.2)
    cleaner = TableCleaner(slow, time_budget=0.3)
    with caplog.at_level(logging.WARNING, logger="midbridge.instance.table_cleaner"):
        first = (await cleaner.run_once())["syslog"]
    assert 1 <= first < 4
    assert any(
        SYSLOG_RULE in r.getMessage() and "stopped" in r.getMessage() for r in caplog.records
    )
    total = first
    for _ in range(4):
        total += (await cleaner.run_once())["syslog"]
    assert total == 4
    assert await store.count("syslog") == 0


async def test_the_loop_runs_at_start_and_every_interval(
    store: Store, backend: StoreBackend
) -> None:
    told: list[tuple[str, int]] = []
    first = await store.insert_many("syslog", [{"message": "a"}])
    await make_old(backend, "syslog", first, 60 * DAY)
    async with TableCleaner(store, interval=0.2, on_deleted=lambda t, n: told.append((t, n))) as c:
        for _ in range(100):
            if told:
                break
            await asyncio.sleep(0.05)
        assert told == [("syslog", 1)]
        # A rule that fails on a run does not stop the loop.
        await store.insert(RULES, {"tablename": "u_gone", "age": 1})
        second = await store.insert_many("syslog", [{"message": "b"}, {"message": "c"}])
        await make_old(backend, "syslog", second, 60 * DAY)
        for _ in range(100):
            if len(told) > 1 and c.runs >= 2:  # told during a run, counted at its end
                break
            await asyncio.sleep(0.05)
        assert told == [("syslog", 1), ("syslog", 2)]
        assert c.runs >= 2
    assert await store.count("syslog") == 0


# --- through a real instance ------------------------------------------------------------------


@dataclass
class Reply:
    status: int
    body: Any
    text: str


class Client:
    def __init__(self, http: aiohttp.ClientSession, url: str) -> None:
        self.http = http
        self.url = url

    async def call(self, method: str, path: str, *, user: str = "admin", json: Any = None) -> Reply:
        secret = ADMIN_PW if user == "admin" else USER_PW
        token = base64.b64encode(f"{user}:{secret}".encode()).decode()
        async with self.http.request(
            method, self.url + path, json=json, headers={"Authorization": f"Basic {token}"}
        ) as resp:
            text = await resp.text()
            body = orjson.loads(text) if resp.content_type == "application/json" and text else None
            return Reply(resp.status, body, text)


@pytest.fixture
async def served(backend: StoreBackend) -> AsyncIterator[tuple[Instance, Client, StoreBackend]]:
    timeout = aiohttp.ClientTimeout(total=20)
    async with (
        Instance(InstanceConfig(db=backend.db, admin_password=ADMIN_PW)) as inst,
        aiohttp.ClientSession(timeout=timeout) as http,
    ):
        yield inst, Client(http, inst.url), backend


async def test_an_admin_rule_cleans_a_table_made_through_the_table_api(
    served: tuple[Instance, Client, StoreBackend],
) -> None:
    inst, client, backend = served
    listed = await client.call("GET", f"{TABLE}/{RULES}")
    assert listed.status == 200, listed.text
    assert {r["sys_id"] for r in listed.body["result"]} >= {ECC_RULE, SYSLOG_RULE}
    made = await client.call("POST", f"{TABLE}/sys_db_object", json={"name": "u_load_sample"})
    assert made.status == 201, made.text
    column = await client.call(
        "POST", f"{TABLE}/sys_dictionary", json={"name": "u_load_sample", "element": "u_run"}
    )
    assert column.status == 201, column.text
    rows = []
    for run in ("1", "2", "3"):
        row = await client.call("POST", f"{TABLE}/u_load_sample", json={"u_run": run})
        assert row.status == 201, row.text
        rows.append(row.body["result"])
    await make_old(backend, "u_load_sample", rows[:2], 2 * 3600)
    rule = await client.call(
        "POST",
        f"{TABLE}/{RULES}",
        json={"tablename": "u_load_sample", "age": "3600", "conditions": "u_runIN1,2,3"},
    )
    assert rule.status == 201, rule.text
    assert (rule.body["result"]["matchfield"], rule.body["result"]["active"]) == (
        "sys_created_on",
        "true",
    )
    deleted = await TableCleaner(inst.store, on_deleted=inst.metrics.table_cleaned).run_once()
    assert deleted["u_load_sample"] == 2
    left = await client.call("GET", f"{TABLE}/u_load_sample")
    assert [r["u_run"] for r in left.body["result"]] == ["3"]
    async with client.http.get(inst.url + "/metrics") as resp:
        metrics = await resp.text()
    assert 'midbridge_instance_table_cleaner_deleted_total{table="u_load_sample"} 2.0' in metrics


async def test_attack_a_non_admin_cannot_read_or_write_the_cleaner_rules(
    served: tuple[Instance, Client, StoreBackend],
) -> None:
    """An itil user and a mid_server account try to make the cleaner their weapon: a rule
    that deletes every user older than a second, the ECC rule's age set to 1 (every
    answer gone before it is read), the dead-letter rule deleted (evidence kept forever
    ... or not), and a look at the rules to learn what ages out when."""
    inst, client, _backend = served
    await auth.create_user(inst.store, "fulfiller", USER_PW, roles=["itil"])
    await auth.create_user(
        inst.store, "mid.user", USER_PW, roles=["mid_server"], mid_agents=["dc1"],
        web_service_access_only=True,
    )  # fmt: skip
    before = {r["sys_id"]: r for r in await inst.store.query(RULES)}
    weapon = {"tablename": "sys_user", "matchfield": "sys_created_on", "age": 1}
    for who in ("fulfiller", "mid.user"):
        attempts = [
            await client.call("GET", f"{TABLE}/{RULES}", user=who),
            await client.call("GET", f"{TABLE}/{RULES}/{ECC_RULE}", user=who),
            await client.call("POST", f"{TABLE}/{RULES}", user=who, json=weapon),
            await client.call("PATCH", f"{TABLE}/{RULES}/{ECC_RULE}", user=who, json={"age": 1}),
            await client.call("PUT", f"{TABLE}/{RULES}/{ECC_RULE}", user=who, json={"age": 1}),
            await client.call("DELETE", f"{TABLE}/{RULES}/{DEAD_RULE}", user=who),
            await client.call("GET", f"/api/now/stats/{RULES}?sysparm_count=true", user=who),
        ]
        for reply in attempts:
            assert reply.status == 403, (who, reply.status, reply.text)
            assert "requires role admin" in reply.text, reply.text
    after = {r["sys_id"]: r for r in await inst.store.query(RULES)}
    assert after == before  # nothing made, changed or deleted
    users = await ids(inst.store, "sys_user")
    await TableCleaner(inst.store).run_once()
    assert await ids(inst.store, "sys_user") == users


async def test_the_leader_runs_the_cleaner_in_its_term(pg_url: str, tmp_path: Path) -> None:
    """On PostgreSQL the leader's term runs the cleaner (``cluster_leadership``, as
    ``midbridge instance --db postgresql://...`` builds it); an interval of 0 runs none."""
    backend = StoreBackend("postgresql", pg_url)
    keys = keys_for(tmp_path / "keys")

    async def term(interval: float, wait_for_empty: bool) -> int:
        instance = Instance(InstanceConfig(db=pg_url, admin_password=ADMIN_PW))
        install(instance, keys)
        leadership = cluster_leadership(
            instance, pg_url, None, keys, retry=0.1, table_cleaner_interval=interval
        )
        async with instance:
            old = await instance.store.insert_many("syslog", [{"message": "old"}] * 2)
            await make_old(backend, "syslog", old, 60 * DAY)
            async with leadership:
                for _ in range(200):
                    if leadership.is_leader and not wait_for_empty:
                        await asyncio.sleep(0.5)  # time enough for a run, were there one
                        break
                    if wait_for_empty and not await instance.store.count("syslog"):
                        break
                    await asyncio.sleep(0.05)
                assert leadership.is_leader
            return await instance.store.count("syslog")

    assert await term(3600, wait_for_empty=True) == 0
    assert await term(0, wait_for_empty=False) == 2


def test_cli_refuses_a_negative_interval_in_one_line(tmp_path: Path) -> None:
    done = subprocess.run(
        [sys.executable, "-m", "bridge", "instance", "--db", str(tmp_path / "i.db"),
         "--port", "0", "--table-cleaner-interval", "-1"],
        capture_output=True, text=True, cwd=REPO, timeout=60, stdin=subprocess.DEVNULL,
    )  # fmt: skip
    assert done.returncode == 2, (done.returncode, done.stderr)
    lines = done.stderr.splitlines()
    assert len(lines) == 1, done.stderr
    assert lines[0].startswith("midbridge: error: --table-cleaner-interval: "), lines[0]
    assert not (tmp_path / "i.db").exists()  # refused before anything was opened


async def test_a_rule_on_another_date_time_field_leaves_empty_dates_alone(store: Store) -> None:
    await store.insert("sys_db_object", {"name": "u_job"})
    await store.insert(
        "sys_dictionary",
        {"name": "u_job", "element": "u_finished", "internal_type": "glide_date_time"},
    )
    _old, new, unfinished = await store.insert_many(
        "u_job", [{"u_finished": ago(2 * DAY)}, {"u_finished": ago(3600)}, {}]
    )
    await store.insert(RULES, {"tablename": "u_job", "matchfield": "u_finished", "age": DAY})
    assert (await TableCleaner(store).run_once())["u_job"] == 1
    assert await ids(store, "u_job") == {new["sys_id"], unfinished["sys_id"]}


async def _old_syslog(backend: StoreBackend) -> None:
    """Three syslog records 60 days old and one new one."""
    async with backend.open() as store:
        old = await store.insert_many("syslog", [{"message": "old"}] * 3)
        await make_old(backend, "syslog", old, 60 * DAY)
        await store.insert("syslog", {"message": "new"})


def test_midbridge_instance_runs_the_cleaner_beside_its_connector(
    broker: BrokerAddress, tmp_path: Path
) -> None:
    """``midbridge instance`` (one instance, SQLite) with a broker: the connector starts
    and the cleaner's first run deletes the old records already in the database."""
    db = tmp_path / "i.db"
    asyncio.run(_old_syslog(StoreBackend("sqlite", str(db))))
    env = {k: v for k, v in os.environ.items() if not k.startswith("MIDBRIDGE_")}
    proc = subprocess.Popen(
        [sys.executable, "-m", "bridge", "instance", "--port", "0", "--db", str(db),
         "--broker", f"{broker.host}:{broker.port}", "--table-cleaner-interval", "600"],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=REPO,
        env={**env, "MIDBRIDGE_ADMIN_PASSWORD": ADMIN_PW},
    )  # fmt: skip
    try:
        assert proc.stdout is not None
        lines: list[str] = []
        while len(lines) < 10 and not (lines and lines[-1].startswith("connector:")):
            lines.append(proc.stdout.readline())
        assert any(line.startswith("connector: ECC queue on mqtt://") for line in lines), lines
        left = -1
        for _ in range(200):
            with contextlib.closing(sqlite3.connect(db)) as conn:
                left = conn.execute("SELECT COUNT(*) FROM syslog").fetchone()[0]
            if left == 1:
                break
            time.sleep(0.05)
        assert left == 1
    finally:
        proc.terminate()
        _out, err = proc.communicate(timeout=20)
    assert proc.returncode == 0, err[-2000:]
    assert "Traceback" not in err
