"""Attacks on the built-in instance's trust boundary (issue 12, the instance API part).

Each test is one attacker's attempt, through the real interfaces: a real instance served on
loopback (SQLite in tmp_path), real HTTP requests with aiohttp's client, the real CLI in a
subprocess. Nothing on the attacked path is mocked. Each test is named after its finding
(F2, F3, F7, F8, F10-F14 of issue 12) and its docstring says what the attacker tries.
"""

from __future__ import annotations

import asyncio
import base64
import hashlib
import os
import re
import signal
import stat
import subprocess
import sys
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any
from urllib.parse import quote

import aiohttp
import pytest

from bridge.instance import auth, discovery
from bridge.instance.api import TABLE_API, ApiSettings
from bridge.instance.cli import insecure_settings
from bridge.instance.connector import install, keys_for
from bridge.instance.query import MAX_TERMS
from bridge.instance.server import Instance, InstanceConfig
from bridge.wire.broker import BrokerConfig
from tests.table_api_client import ADMIN_PW, TABLE, USER_PW, Reply
from tests.table_api_client import Client as TableApiClient

pytestmark = pytest.mark.timeout(60)

REPO = Path(__file__).resolve().parent.parent
ATTACKER_KEY = base64.b64encode(b"\x66" * 32).decode()
ATTACKER_FINGERPRINT = hashlib.sha256(b"\x66" * 32).hexdigest()
GOOD_KEY = base64.b64encode(b"\x11" * 32).decode()
GOOD_FINGERPRINT = hashlib.sha256(b"\x11" * 32).hexdigest()


class Client(TableApiClient):
    """Real HTTP requests to the instance, as any API client (or attacker) sends them."""

    async def rows(
        self, table: str, query: str = "", *, refused_ok: bool = False, **kw: Any
    ) -> list[dict[str, Any]]:
        """The rows a list request answers (``refused_ok``: a 400 counts as none)."""
        reply = await self.call("GET", f"{TABLE}/{table}", params={"sysparm_query": query}, **kw)
        if refused_ok and reply.status == 400:
            return []
        assert reply.status == 200, reply.text
        rows: list[dict[str, Any]] = reply.result
        return rows


def config(tmp_path: Path, **api: Any) -> InstanceConfig:
    return InstanceConfig(
        db=tmp_path / "instance.db", admin_password=ADMIN_PW, api=ApiSettings(**api)
    )


@pytest.fixture
async def inst(tmp_path: Path) -> AsyncIterator[Instance]:
    instance = Instance(config(tmp_path))
    install(instance, keys_for(tmp_path / "instance.db"))  # the agent actions' routes
    discovery.install(instance)  # the discovery routes
    async with instance:
        yield instance


@pytest.fixture
async def client(inst: Instance) -> AsyncIterator[Client]:
    async with aiohttp.ClientSession(
        timeout=aiohttp.ClientTimeout(total=20), cookie_jar=aiohttp.CookieJar(unsafe=True)
    ) as http:
        yield Client(http, inst.url)


async def mid_user(inst: Instance, name: str = "mid.user", *agents: str) -> None:
    await auth.create_user(
        inst.store, name, USER_PW, roles=["mid_server"], mid_agents=agents,
        web_service_access_only=True,
    )  # fmt: skip


async def agent_row(inst: Instance, name: str, **fields: Any) -> dict[str, Any]:
    row = {"name": name, "status": "Up", "host": "h", **fields}
    record: dict[str, Any] = await inst.store.insert("ecc_agent", row)
    return record


async def output(inst: Instance, agent: str, **fields: Any) -> dict[str, Any]:
    row = {"agent": f"mid.server.{agent}", "queue": "output", "topic": "Echo", **fields}
    record: dict[str, Any] = await inst.store.insert("ecc_queue", row)
    return record


# --- F2: a mid_server account re-keys a validated agent ------------------------------------


async def test_f2_mid_server_cannot_rekey_a_validated_agent(inst: Instance, client: Client) -> None:
    """A mid_server account PATCHes its validated agent's public_key and fingerprint to the
    attacker's key (keeping validated true), so that the next credentials are sealed to it;
    it also tries validated itself and a new agent row carrying a key."""
    await mid_user(inst, "mid.user", "dc1")
    row = await agent_row(
        inst, "dc1", public_key=GOOD_KEY, fingerprint=GOOD_FINGERPRINT, validated=True
    )
    path = f"{TABLE}/ecc_agent/{row['sys_id']}"
    for body in (
        {"public_key": ATTACKER_KEY, "fingerprint": ATTACKER_FINGERPRINT},
        {"public_key": ATTACKER_KEY},
        {"fingerprint": ATTACKER_FINGERPRINT},
        {"validated": True},
    ):
        refused = await client.call("PATCH", path, user="mid.user", json=body)
        assert "User Not Authorized" in refused.fault(403), body
    created = await client.call(
        "POST", f"{TABLE}/ecc_agent", user="mid.user",
        json={"name": "dc1b", "public_key": ATTACKER_KEY, "fingerprint": ATTACKER_FINGERPRINT},
    )  # fmt: skip
    assert "written only from the agent's own status record" in created.fault(403)
    stored = await inst.store.get("ecc_agent", row["sys_id"])
    assert stored is not None
    assert (stored["public_key"], stored["validated"]) == (GOOD_KEY, True)
    # What its own agent reports about itself stays writable.
    ok = await client.call("PATCH", path, user="mid.user", json={"status": "Paused"})
    assert ok.status == 200, ok.text
    assert ok.result["validated"] == "true"


async def test_f2_a_new_key_always_clears_validation(inst: Instance, client: Client) -> None:
    """Any writer (an admin through the Table API, even sending validated true with it, or
    code through the store) swaps a validated agent's key and hopes the approval stays."""
    row = await agent_row(
        inst, "dc1", public_key=GOOD_KEY, fingerprint=GOOD_FINGERPRINT, validated=True
    )
    path = f"{TABLE}/ecc_agent/{row['sys_id']}"
    swapped = await client.call(
        "PATCH", path,
        json={"public_key": ATTACKER_KEY, "fingerprint": ATTACKER_FINGERPRINT, "validated": True},
    )  # fmt: skip
    assert swapped.status == 200, swapped.text
    assert swapped.result["validated"] == "false"
    same = await agent_row(
        inst, "dc2", public_key=GOOD_KEY, fingerprint=GOOD_FINGERPRINT, validated=True
    )
    updated = await inst.store.update("ecc_agent", same["sys_id"], {"fingerprint": "ab" * 32})
    assert updated is not None
    assert updated["validated"] is False
    claimed = await inst.store.update_query(
        "ecc_agent", "name=dc1", {"public_key": GOOD_KEY, "validated": True}
    )
    assert [r["validated"] for r in claimed] == [False]
    # The same key written again (a status record repeating itself) keeps the approval.
    third = await agent_row(
        inst, "dc3", public_key=GOOD_KEY, fingerprint=GOOD_FINGERPRINT, validated=True
    )
    again = await inst.store.update(
        "ecc_agent", third["sys_id"], {"public_key": GOOD_KEY, "fingerprint": GOOD_FINGERPRINT}
    )
    assert again is not None
    assert again["validated"] is True


# --- F3: discovery_admin validates an agent through the Table API --------------------------

SYSTEM_COMMAND_SPELLINGS = [
    "SystemCommand",
    "systemcommand",
    " SystemCommand ",
    "SYSTEMCOMMAND\t",
    "System Command",
    "System\u200bCommand",  # a zero-width space
    "\uff33ystemCommand",  # a fullwidth S (NFKC: S)
]


@pytest.mark.parametrize("topic", SYSTEM_COMMAND_SPELLINGS)
async def test_f3_table_api_refuses_system_command_outputs_to_non_admins(
    inst: Instance, client: Client, topic: str
) -> None:
    """A discovery_admin inserts a SystemCommand ``validate`` output (in any spelling a
    bridge might accept) through the Table API, bypassing the admin-only agent actions."""
    await auth.create_user(inst.store, "disco", USER_PW, roles=["discovery_admin"])
    await agent_row(inst, "dc1", public_key=GOOD_KEY, fingerprint=GOOD_FINGERPRINT)
    payload = {"command": "validate", "fingerprint": GOOD_FINGERPRINT}
    refused = await client.call(
        "POST", f"{TABLE}/ecc_queue", user="disco",
        json={"agent": "mid.server.dc1", "queue": "output", "topic": topic, "name": "validate",
              "priority": 0, "payload": payload},
    )  # fmt: skip
    detail = refused.fault(403)
    assert "SystemCommand outputs are sent only by the agent actions" in detail
    assert await inst.store.query("ecc_queue") == []


async def test_f3_the_admin_path_still_sends_system_commands(
    inst: Instance, client: Client
) -> None:
    """The attacker's way is closed, the administrator's stays open: the agent action
    endpoint (admin) queues the SystemCommand; a discovery_admin is refused there too."""
    await auth.create_user(inst.store, "disco", USER_PW, roles=["discovery_admin"])
    await agent_row(inst, "dc1", public_key=GOOD_KEY, fingerprint=GOOD_FINGERPRINT)
    path = "/api/midbridge/agents/dc1/validate"
    assert "admin" in (await client.call("POST", path, user="disco", json={})).fault(403)
    sent = await client.call("POST", path, json={})
    assert sent.status == 201, sent.text
    assert sent.result["topic"] == "SystemCommand"


# --- F10: mid_server is scoped to its own agents ------------------------------------------


async def test_f10_mid_server_reads_only_its_own_agents(inst: Instance, client: Client) -> None:
    """mid.user (agent a) lists every ECC payload and agent, asks for agent b's records by
    query, by an ^NQ branch and by sys_id."""
    await mid_user(inst, "mid.user", "a")
    mine = await output(inst, "a", payload="mine")
    theirs = await output(inst, "b", payload="secret of b")
    await agent_row(inst, "a")
    await agent_row(inst, "b")
    listed = await client.rows("ecc_queue", user="mid.user")
    assert [r["sys_id"] for r in listed] == [mine["sys_id"]]
    for query in (
        "agent=mid.server.b",
        "agent=mid.server.a^NQagent=mid.server.b",
        "agentLIKEb^ORagentLIKEa",
        "sys_id=" + theirs["sys_id"],
        # An empty first term: the scope's last value must not swallow the query's first.
        "^name=x,mid.server.b",
        "^^name=x,mid.server.b",
        "^NQ^name=x,mid.server.b",
        "^NQname=x,mid.server.b",
        "NQ^name=x,mid.server.b",
        "^ORname=x,mid.server.b",
    ):
        found = await client.rows("ecc_queue", query, user="mid.user", refused_ok=True)
        assert theirs["sys_id"] not in [r["sys_id"] for r in found], query
    one = await client.call("GET", f"{TABLE}/ecc_queue/{theirs['sys_id']}", user="mid.user")
    assert one.status == 404
    agents = await client.rows("ecc_agent", user="mid.user")
    assert [r["name"] for r in agents] == ["a"]
    for query in ("^host=x,b", "^NQ^host=x,b"):  # ecc_agent's scope ends in an IN list too
        found = await client.rows("ecc_agent", query, user="mid.user", refused_ok=True)
        assert "b" not in [r["name"] for r in found], query
    assert "secret of b" not in str(listed)
    # Unbound: nothing at all.
    await mid_user(inst, "loose.user")
    assert await client.rows("ecc_queue", user="loose.user") == []
    assert await client.rows("ecc_agent", user="loose.user") == []


async def test_f10_mid_server_cannot_change_another_agents_rows(
    inst: Instance, client: Client
) -> None:
    """mid.user (agent a) claims and closes agent b's output, renames agent b, renames its
    own agent to b's name, and creates an agent row for b."""
    await mid_user(inst, "mid.user", "a")
    theirs = await output(inst, "b")
    row_a = await agent_row(inst, "a")
    row_b = await agent_row(inst, "b")
    state = await client.call(
        "PATCH", f"{TABLE}/ecc_queue/{theirs['sys_id']}", user="mid.user",
        json={"state": "processed"},
    )  # fmt: skip
    assert state.status == 404
    rename_b = await client.call(
        "PATCH", f"{TABLE}/ecc_agent/{row_b['sys_id']}", user="mid.user", json={"name": "x"}
    )
    assert rename_b.status == 404
    rename_a = await client.call(
        "PATCH", f"{TABLE}/ecc_agent/{row_a['sys_id']}", user="mid.user", json={"name": "b2"}
    )
    assert "refused field: name" in rename_a.fault(403)
    create_b = await client.call(
        "POST", f"{TABLE}/ecc_agent", user="mid.user", json={"name": "c", "status": "Up"}
    )
    assert "acts for agents a only" in create_b.fault(403)
    stored = await inst.store.get("ecc_queue", theirs["sys_id"])
    assert stored is not None
    assert stored["state"] == "ready"
    names = sorted(r["name"] for r in await inst.store.query("ecc_agent"))
    assert names == ["a", "b"]


async def test_f10_mid_server_inputs_answer_only_its_own_pending_outputs(
    inst: Instance, client: Client, caplog: pytest.LogCaptureFixture
) -> None:
    """mid.user (agent a) forges results: an input for agent b's output, an input under
    agent b's name, an input answering nothing, one answering an output already closed,
    and one answering an input record."""
    await mid_user(inst, "mid.user", "a")
    mine = await output(inst, "a", state="processing")
    theirs = await output(inst, "b", state="processing")
    closed = await output(inst, "a", state="processed")
    answer = {"queue": "input", "topic": "Echo", "payload": {"forged": True}}
    attempts = [
        ({**answer, "response_to": theirs["sys_id"]}, 403, "is not an output sent to an agent"),
        ({**answer, "response_to": mine["sys_id"], "agent": "mid.server.b"}, 403, "acts for"),
        ({**answer}, 400, "'response_to' is required"),
        ({**answer, "response_to": closed["sys_id"]}, 403, "awaits no answer"),
        ({**answer, "response_to": "no-such-record"}, 403, "is not an output"),
    ]
    with caplog.at_level("WARNING", logger="midbridge.instance.api"):
        for body, status, words in attempts:
            reply = await client.call("POST", f"{TABLE}/ecc_queue", user="mid.user", json=body)
            assert words in reply.fault(status), body
    assert "refused an ecc_queue input from mid.user" in caplog.text
    assert await inst.store.query("ecc_queue", "queue=input") == []
    inputs = await inst.store.query("ecc_queue", "queue=input")
    ok = await client.call(
        "POST", f"{TABLE}/ecc_queue", user="mid.user",
        json={**answer, "response_to": mine["sys_id"], "sequence": 0, "run": "r"},
    )  # fmt: skip
    assert ok.status == 201, ok.text
    assert ok.result["agent"] == "mid.server.a"
    refused_on_input = await client.call(
        "POST", f"{TABLE}/ecc_queue", user="mid.user",
        json={**answer, "response_to": ok.result["sys_id"]},
    )  # fmt: skip
    assert refused_on_input.status == 403
    assert len(await inst.store.query("ecc_queue", "queue=input")) == len(inputs) + 1


@pytest.mark.parametrize("name", ["x/../dc1", "..", ".", ".hidden", "a b", "dc1\n", "a" * 101])
async def test_f10_agent_names_outside_the_safe_alphabet_are_refused(
    inst: Instance, client: Client, name: str
) -> None:
    """An agent name with a path (``x/../dc1``), a dot-only name, spaces or a newline is
    created or renamed through the Table API, so that URLs built from it reach another
    agent; the agent action endpoint is asked for such a name."""
    created = await client.call("POST", f"{TABLE}/ecc_agent", json={"name": name})
    assert "Invalid value for field 'name'" in created.fault(400)
    row = await agent_row(inst, "dc1")
    renamed = await client.call("PATCH", f"{TABLE}/ecc_agent/{row['sys_id']}", json={"name": name})
    assert renamed.status == 400
    assert [r["name"] for r in await inst.store.query("ecc_agent")] == ["dc1"]
    action = await client.call(
        "POST", "/api/midbridge/agents/" + quote(name, safe="") + "/pause", json={}
    )
    assert action.status in (404, 405)
    assert await inst.store.query("ecc_queue") == []


async def test_f10_dashboard_buttons_cannot_act_on_another_agent(
    inst: Instance, client: Client
) -> None:
    """An agent row named ``x/../dc1`` (written before names were checked) makes the
    dashboard's buttons post to ``/agents/x/../dc1/<action>``, which a browser normalises
    to ``/agents/dc1/<action>``: another agent."""
    await agent_row(inst, "dc1")
    await inst.store.insert("ecc_agent", {"name": "x/../dc1", "status": "Up"})
    signed = await dashboard_sign_in(client, "admin", ADMIN_PW)
    assert signed.status == 303, signed.text
    page = await client.call("GET", "/agents", user=None, headers={"Accept": "text/html"})
    assert page.status == 200
    actions = re.findall(r'<form method="post" action="([^"]+)"', page.text)
    assert "/agents/dc1/pause" in actions
    assert not [a for a in actions if "x/" in a or "/../" in a or "%2F" in a], actions


async def test_f10_cli_binds_a_mid_user_to_its_agents(tmp_path: Path) -> None:
    """The administrator's way to scope an account: ``user create --agent`` and
    ``user set-agents``; a name outside the alphabet is refused with one line."""
    db = str(tmp_path / "cli.db")
    made = await asyncio.to_thread(
        midbridge, "instance", "user", "create", "mid.user", "--db", db, "--role", "mid_server",
        "--agent", "dc1", "--password-stdin", stdin=USER_PW + "\n",
    )  # fmt: skip
    assert made.returncode == 0, made.stderr
    assert "acts for agents: dc1" in made.stdout
    moved = await asyncio.to_thread(
        midbridge, "instance", "user", "set-agents", "mid.user", "dc2", "dc3", "--db", db
    )
    assert moved.returncode == 0, moved.stderr
    bad = await asyncio.to_thread(
        midbridge, "instance", "user", "set-agents", "mid.user", "x/../dc1", "--db", db
    )
    assert bad.returncode == 2
    assert len(bad.stderr.strip().splitlines()) == 1
    assert "Traceback" not in bad.stderr
    listing = await asyncio.to_thread(midbridge, "instance", "user", "list", "--db", db)
    line = next(row for row in listing.stdout.splitlines() if row.startswith("mid.user"))
    assert line.split()[-1] == "dc2,dc3"


# --- F11: query and body bombs -------------------------------------------------------------


async def test_f11_a_thousand_or_terms_is_a_400_naming_the_parameter(
    inst: Instance, client: Client
) -> None:
    """About 1,000 ``^OR`` (or ``^``, or ``^NQ``) terms in one list request, short enough
    for one request line, which used to reach SQLite and come back as HTTP 500 with a
    traceback in the log."""
    for joiner in ("^OR", "^", "^NQ"):
        terms = joiner.join(["run="] * 1000)
        reply = await client.call("GET", f"{TABLE}/ecc_queue", raw_query=f"sysparm_query={terms}")
        assert "Invalid sysparm_query: query has more than 100 terms" in reply.fault(400)
    over = "^".join(f"name!=a{i}" for i in range(MAX_TERMS + 1))
    reply = await client.call("GET", f"{TABLE}/ecc_agent", params={"sysparm_query": over})
    assert "sysparm_query" in reply.fault(400)
    within = "^OR".join(f"name=a{i}" for i in range(MAX_TERMS))
    fits = await client.call("GET", f"{TABLE}/ecc_agent", params={"sysparm_query": within})
    assert fits.status == 200, fits.text


@pytest.mark.parametrize("depth", [255, 300, 1024])
async def test_f11_deeply_nested_json_bodies_are_a_400(
    inst: Instance, client: Client, depth: int
) -> None:
    """A JSON body nested 255-1,024 deep: orjson reads it, but storing the payload (orjson
    writes ~254 levels) failed with HTTP 500 and a traceback."""
    await mid_user(inst, "mid.user", "a")
    pending = await output(inst, "a", state="processing")
    nested = "[" * depth + "]" * depth
    raw = '{"queue": "output", "agent": "mid.server.a", "topic": "Echo", "payload": ' + nested + "}"
    headers = {"Content-Type": "application/json"}
    reply = await client.call("POST", f"{TABLE}/ecc_queue", data=raw, headers=headers)
    assert too_deep(reply)
    answer = (
        '{"queue": "input", "response_to": "' + pending["sys_id"] + '", "payload": ' + nested + "}"
    )
    reply = await client.call(
        "POST", f"{TABLE}/ecc_queue", user="mid.user", data=answer, headers=headers
    )
    assert too_deep(reply)
    action = await client.call(
        "POST", "/api/midbridge/agents/a/pause", data='{"x": ' + nested + "}", headers=headers
    )
    assert too_deep(action)
    assert [r["sys_id"] for r in await inst.store.query("ecc_queue")] == [pending["sys_id"]]


def too_deep(reply: Reply) -> bool:
    """400 for a body nested too deeply (orjson itself stops reading at 1,024 levels)."""
    detail = reply.fault(400)
    return "nested too deeply" in detail or "depth limit exceeded" in detail


# --- F12: the inactive-user oracle ---------------------------------------------------------


async def test_f12_an_inactive_user_answers_as_a_wrong_password(
    inst: Instance, client: Client
) -> None:
    """Guessing an inactive account's password: the inactive message used to appear only
    when the password was right."""
    await auth.create_user(inst.store, "sleepy", USER_PW, roles=["mid_server"], active=False)
    right = await client.call("GET", f"{TABLE}/ecc_queue", user="sleepy", password=USER_PW)
    wrong = await client.call("GET", f"{TABLE}/ecc_queue", user="sleepy", password="not-it-123")
    nobody = await client.call("GET", f"{TABLE}/ecc_queue", user="nobody", password="not-it-123")
    assert right.status == wrong.status == nobody.status == 401
    assert right.body == wrong.body == nobody.body
    assert "inactive" not in right.text
    form_right = await dashboard_sign_in(client, "sleepy", USER_PW)
    form_wrong = await dashboard_sign_in(client, "sleepy", "not-it-123")
    assert form_right.status == form_wrong.status == 401
    assert "Invalid user name or password." in form_right.text


# --- F7: sign-in throttling ----------------------------------------------------------------


async def test_f7_failed_sign_ins_back_off_before_any_password_work(tmp_path: Path) -> None:
    """Password guessing (and the scrypt CPU it costs the instance) from one address: after
    a few failures even the right password is refused at once with 429 and Retry-After
    (so no password was checked); another address (trusted proxy header) still signs in."""
    throttle = auth.ThrottleSettings(free_per_user=3, first_delay=60.0)
    async with (
        Instance(config(tmp_path, trust_forwarded=True, throttle=throttle)) as inst,
        aiohttp.ClientSession(cookie_jar=aiohttp.CookieJar(unsafe=True)) as http,
    ):
        client = Client(http, inst.url)
        attacker = {"X-Forwarded-For": "203.0.113.9"}
        path = f"{TABLE}/sys_user"
        for _ in range(4):
            guess = await client.call("GET", path, password="guess-1234", headers=attacker)
            assert guess.status == 401
        authenticator = inst.app[TABLE_API].authenticator
        refused_before = authenticator.throttle.refused
        blocked = await client.call("GET", path, headers=attacker)  # the right password
        assert "Too many failed sign-ins" in blocked.fault(429)
        assert 1 <= int(blocked.headers["Retry-After"]) <= 60
        assert authenticator.throttle.refused == refused_before + 1
        elsewhere = await client.call("GET", path, headers={"X-Forwarded-For": "198.51.100.7"})
        assert elsewhere.status == 200, elsewhere.text
        form = await dashboard_sign_in(client, "admin", ADMIN_PW, headers=attacker)
        assert form.status == 429
        assert "Retry-After" in form.headers


async def test_f7_address_spraying_is_throttled_and_memory_stays_bounded() -> None:
    """Many user names from one address, then many addresses: the per-address count stops
    the spray; the tables never hold more than their bound."""
    clock = [0.0]
    settings = auth.ThrottleSettings(free_per_address=10, max_entries=50)
    throttle = auth.SignInThrottle(settings, clock=lambda: clock[0])
    for i in range(11):
        throttle.failed(f"user{i}", "203.0.113.9")
    assert throttle.retry_after("someone-new", "203.0.113.9") > 0
    assert throttle.retry_after("someone-new", "198.51.100.7") == 0
    for i in range(5000):
        throttle.failed(f"u{i}", f"10.0.{i // 256}.{i % 256}")
    assert len(throttle) <= 2 * settings.max_entries
    clock[0] += settings.forget_after + 1
    assert throttle.retry_after("user0", "203.0.113.9") == 0


# --- F8: CSRF on the action endpoints ------------------------------------------------------


async def test_f8_cross_site_posts_to_agent_actions_are_refused(
    inst: Instance, client: Client
) -> None:
    """A page on another site makes the admin's browser (Basic credentials cached) post a
    form, a text/plain body or an empty body to ``/api/midbridge/agents/dc1/pause``, or a
    JSON body with its own Origin."""
    await agent_row(inst, "dc1")
    path = "/api/midbridge/agents/dc1/pause"
    form = await client.call("POST", path, data={"sys_id": "x"})
    assert "Unsupported Media Type" in form.fault(415)
    plain = await client.call(
        "POST", path, data=b'{"x": 1}', headers={"Content-Type": "text/plain"}
    )
    assert plain.status == 415
    empty = await client.call("POST", path)
    assert empty.status == 415
    foreign = await client.call("POST", path, json={}, headers={"Origin": "https://evil.example"})
    assert "Cross-origin request refused" in foreign.fault(403)
    null_origin = await client.call("POST", path, json={}, headers={"Origin": "null"})
    assert null_origin.status == 403
    assert await inst.store.query("ecc_queue") == []
    own = await client.call("POST", path, json={}, headers={"Origin": inst.url})
    assert own.status == 201, own.text


async def test_f8_cross_site_posts_to_discovery_and_tables_are_refused(
    inst: Instance, client: Client
) -> None:
    """The same from another site against the discovery endpoints, a Table API write and
    a dashboard form (which carries a valid CSRF token from a signed-in session)."""
    for path in ("/api/midbridge/discovery/any/run", "/api/midbridge/discovery/any/cancel"):
        form = await client.call("POST", path, data={"a": "b"})
        assert form.status == 415, (path, form.text)
        foreign = await client.call(
            "POST", path, json={}, headers={"Origin": "http://evil.example"}
        )
        assert foreign.status == 403, path
    table = await client.call(
        "POST", f"{TABLE}/sys_user", json={"user_name": "evil", "user_password": "evil-pass-1"},
        headers={"Origin": "http://evil.example"},
    )  # fmt: skip
    assert table.status == 403
    assert await auth.find_user(inst.store, "evil") is None
    await agent_row(inst, "dc1")
    assert (await dashboard_sign_in(client, "admin", ADMIN_PW)).status == 303
    page = await client.call("GET", "/agents", user=None, headers={"Accept": "text/html"})
    token = re.search(r'name="csrf_token" value="([^"]+)"', page.text)
    assert token is not None
    forged = await client.call(
        "POST", "/agents/dc1/pause", user=None, data={"csrf_token": token.group(1)},
        headers={"Origin": "https://evil.example"},
    )  # fmt: skip
    assert forged.status == 403
    assert await inst.store.query("ecc_queue") == []
    own = await client.call(
        "POST", "/agents/dc1/pause", user=None, data={"csrf_token": token.group(1)},
        headers={"Origin": inst.url},
    )  # fmt: skip
    assert own.status == 303
    assert len(await inst.store.query("ecc_queue")) == 1


# --- F13: the database file and the session cookie -----------------------------------------


def _mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


async def test_f13_database_files_are_owner_only(tmp_path: Path) -> None:
    """Another local user reads the instance's database (password hashes, every payload),
    created 0644 under the usual umask, or an older file left 0644."""
    old = os.umask(0o022)
    try:
        async with Instance(config(tmp_path)) as inst:
            await inst.store.insert("ecc_queue", {"payload": "x"})
            db = tmp_path / "instance.db"
            for part in (db, tmp_path / "instance.db-wal", tmp_path / "instance.db-shm"):
                assert part.exists(), part
                assert _mode(part) == 0o600, (part, oct(_mode(part)))
        os.chmod(db, 0o644)
        async with Instance(config(tmp_path)):
            assert _mode(db) == 0o600
    finally:
        os.umask(old)


async def test_f13_read_only_commands_refuse_a_missing_database(tmp_path: Path) -> None:
    """``user list`` on a mistyped path silently creates an empty database (and hides the
    mistake)."""
    missing = tmp_path / "no-such" / "instance.db"
    done = await asyncio.to_thread(midbridge, "instance", "user", "list", "--db", str(missing))
    assert done.returncode == 2
    assert len(done.stderr.strip().splitlines()) == 1, done.stderr
    assert "no database at" in done.stderr
    assert not missing.exists()
    assert not missing.parent.exists()


async def test_f13_session_cookie_is_secure_behind_a_trusted_tls_proxy(tmp_path: Path) -> None:
    """The dashboard's session cookie sent without ``Secure`` behind a TLS proxy (so a
    plain-HTTP request leaks it); and a client forging ``X-Forwarded-Proto`` when no proxy
    is configured."""
    https = {"X-Forwarded-Proto": "https"}
    async with aiohttp.ClientSession(cookie_jar=aiohttp.CookieJar(unsafe=True)) as http:
        async with Instance(config(tmp_path / "proxied", trust_forwarded=True)) as inst:
            signed = await dashboard_sign_in(
                Client(http, inst.url), "admin", ADMIN_PW, headers=https
            )
            assert signed.status == 303
            cookie = signed.headers.getall("Set-Cookie")
            assert any("midbridge_session=" in c and "Secure" in c for c in cookie), cookie
        http.cookie_jar.clear()
        async with Instance(config(tmp_path / "direct")) as inst:
            signed = await dashboard_sign_in(
                Client(http, inst.url), "admin", ADMIN_PW, headers=https
            )
            assert signed.status == 303
            cookie = signed.headers.getall("Set-Cookie")
            assert not any("Secure" in c for c in cookie if "midbridge_session=" in c), cookie


# --- F14: insecure defaults are loud -------------------------------------------------------


async def test_f14_insecure_settings_are_warned_at_start(tmp_path: Path) -> None:
    """An instance reachable from the network over plain HTTP, or its connector on an
    anonymous broker, starts silently."""
    warnings = insecure_settings("0.0.0.0", BrokerConfig(host="broker.lan", port=1883))
    assert any("plain HTTP" in w for w in warnings)
    assert any("without a broker user" in w for w in warnings)
    assert insecure_settings("127.0.0.1", None) == []
    env = {**os.environ, "MIDBRIDGE_ADMIN_PASSWORD": ADMIN_PW}
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "bridge", "instance", "--host", "0.0.0.0", "--port", "0",
        "--db", str(tmp_path / "loud.db"), cwd=REPO, env=env,
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
    )  # fmt: skip
    try:
        assert proc.stdout is not None
        first = await asyncio.wait_for(proc.stdout.readline(), 15)
        assert first.startswith(b"midbridge instance on "), first
    finally:
        proc.send_signal(signal.SIGTERM)
        _out, err = await asyncio.wait_for(proc.communicate(), 15)
    assert b"warning: listening on 0.0.0.0 over plain HTTP" in err


# --- helpers -------------------------------------------------------------------------------


def midbridge(*args: str, stdin: str | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "bridge", *args],
        input=stdin,
        capture_output=True,
        text=True,
        cwd=REPO,
        timeout=30,
        check=False,
    )


async def dashboard_sign_in(
    client: Client, user: str, password: str, headers: dict[str, str] | None = None
) -> Reply:
    """The dashboard's sign-in form, as a browser fills it (its cookie jar keeps cookies)."""
    html = {"Accept": "text/html", **(headers or {})}
    form = await client.call("GET", "/login", user=None, headers=html)
    token = re.search(r'name="csrf_token" value="([^"]+)"', form.text)
    assert token is not None, form.text
    # The pre-login cookie, sent as a browser would even when it is marked Secure.
    nonce = form.headers.get("Set-Cookie", "").partition("midbridge_login=")[2].partition(";")[0]
    data = {"csrf_token": token.group(1), "user_name": user, "password": password, "next": "/"}
    cookie = {"Cookie": f"midbridge_login={nonce}"}
    return await client.call("POST", "/login", user=None, data=data, headers={**html, **cookie})


# --- found by the independent review ----------------------------------------------------------


async def test_review_an_input_naming_another_records_sys_id_reveals_nothing(
    inst: Instance, client: Client
) -> None:
    """mid.user (agent a) posts an input answering its own pending output, but with the
    sys_id of agent b's output: the store ignores the insert, and the answer must not hand
    back b's record (its payload) nor say that it exists beyond a 409."""
    await mid_user(inst, "mid.user", "a")
    mine = await output(inst, "a", state="processing")
    secret = await output(inst, "b", state="ready", payload={"command": "cat /etc/secret-of-b"})
    reply = await client.call(
        "POST", f"{TABLE}/ecc_queue", user="mid.user",
        json={"queue": "input", "topic": "Echo", "response_to": mine["sys_id"],
              "sys_id": secret["sys_id"], "payload": {}},
    )  # fmt: skip
    assert reply.status == 409, reply.text
    assert "secret-of-b" not in reply.text
    assert "mid.server.b" not in reply.text
    stored = await inst.store.get("ecc_queue", secret["sys_id"])
    assert stored is not None
    assert stored["queue"] == "output"


async def test_review_mid_server_cannot_reopen_a_finished_output(
    inst: Instance, client: Client
) -> None:
    """mid.user moves its own processed output back to processing (to slip an input past
    the closed-output rule) or to ready (so the connector signs and pushes it again: a
    replay the dedupe window no longer covers). A MID claims and closes; it never reopens."""
    await mid_user(inst, "mid.user", "a")
    done = await output(inst, "a", state="processed")
    for state in ("processing", "ready", "anything"):
        reply = await client.call(
            "PATCH", f"{TABLE}/ecc_queue/{done['sys_id']}", user="mid.user", json={"state": state}
        )
        assert "may move an output" in reply.fault(403), state
    pending = await output(inst, "a", state="ready")
    path = f"{TABLE}/ecc_queue/{pending['sys_id']}"
    for state in ("ready", "bogus"):
        reply = await client.call("PATCH", path, user="mid.user", json={"state": state})
        assert reply.status == 403, state
    for state in ("processing", "processed"):  # the legitimate claim, then the close
        reply = await client.call("PATCH", path, user="mid.user", json={"state": state})
        assert reply.status == 200, reply.text
    assert (await inst.store.get("ecc_queue", done["sys_id"]) or {})["state"] == "processed"


async def test_review_a_burst_of_concurrent_guesses_costs_only_the_free_attempts(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """200 wrong passwords for admin sent at once from one address: every request passes
    the throttle's check before any failure is counted, so each used to get its own scrypt
    (129 of 200 measured). Attempts for one (user, address) now take turns and ask the
    throttle again: the scrypt runs stay near the free attempts."""
    throttle = auth.ThrottleSettings(free_per_user=3, first_delay=60.0)
    runs = [0]
    verify = auth.verify_password

    def counted(password: str, stored: str) -> bool:
        runs[0] += 1
        return verify(password, stored)

    monkeypatch.setattr(auth, "verify_password", counted)
    async with (
        Instance(config(tmp_path, throttle=throttle)) as inst,
        aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=120)) as http,
    ):
        client = Client(http, inst.url)
        path = f"{TABLE}/sys_user"
        replies = await asyncio.gather(
            *(client.call("GET", path, password="guess-1234") for _ in range(200))
        )
        assert {reply.status for reply in replies} <= {401, 429}
        assert runs[0] <= throttle.free_per_user + 1, f"{runs[0]} password checks"
        right = await client.call("GET", path)  # still throttled: refused before any work
        assert right.status == 429
