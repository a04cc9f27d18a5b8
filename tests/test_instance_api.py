"""The built-in instance over real HTTP on loopback: Table API, users and roles, CLI, store.

Every test starts its own instance (a SQLite file in tmp_path, a free port on 127.0.0.1)
and talks to it with aiohttp's client; nothing is mocked.
"""

from __future__ import annotations

import asyncio
import base64
import os
import signal
import sqlite3
import subprocess
import sys
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from bridge.instance import auth
from bridge.instance.api import ApiError, ApiSettings, Write
from bridge.instance.server import Instance, InstanceConfig
from bridge.instance.sqlite_store import SQLiteStore
from bridge.instance.store import Change, Conflict, FieldError

pytestmark = pytest.mark.timeout(30)

REPO = Path(__file__).resolve().parent.parent
ADMIN_PW = "admin-pass-123"
MID_PW = "mid-pass-1234"
TABLE = "/api/now/table"


@dataclass
class Reply:
    status: int
    body: Any
    headers: Any
    text: str

    @property
    def result(self) -> Any:
        assert isinstance(self.body, dict), self.text
        return self.body["result"]

    def error(self, status: int) -> tuple[str, str]:
        """Assert a ServiceNow-shaped error with ``status``; (message, detail)."""
        assert self.status == status, (self.status, self.text)
        assert self.body["status"] == "failure", self.text
        assert set(self.body["error"]) == {"message", "detail"}, self.text
        return self.body["error"]["message"], self.body["error"]["detail"]


class Api:
    def __init__(self, session: aiohttp.ClientSession, url: str) -> None:
        self.session = session
        self.url = url

    async def call(
        self,
        method: str,
        path: str,
        *,
        user: str | None = "admin",
        password: str | None = None,
        json: Any = None,
        data: bytes | AsyncIterator[bytes] | None = None,
        headers: dict[str, str] | None = None,
        params: dict[str, str] | None = None,
    ) -> Reply:
        headers = dict(headers or {})
        if user is not None:
            secret = password if password is not None else _PASSWORDS.get(user, MID_PW)
            token = base64.b64encode(f"{user}:{secret}".encode()).decode()
            headers["Authorization"] = f"Basic {token}"
        async with self.session.request(
            method, self.url + path, json=json, data=data, headers=headers, params=params
        ) as resp:
            text = await resp.text()
            body: Any = None
            if resp.content_type == "application/json" and text:
                body = await resp.json()
            return Reply(resp.status, body, resp.headers, text)

    async def get(self, path: str, **kw: Any) -> Reply:
        return await self.call("GET", path, **kw)

    async def post(self, path: str, json: Any, **kw: Any) -> Reply:
        return await self.call("POST", path, json=json, **kw)

    async def patch(self, path: str, json: Any, **kw: Any) -> Reply:
        return await self.call("PATCH", path, json=json, **kw)


_PASSWORDS = {"admin": ADMIN_PW}


@pytest.fixture
async def inst(tmp_path: Path) -> AsyncIterator[Instance]:
    config = InstanceConfig(
        db=tmp_path / "instance.db",
        admin_password=ADMIN_PW,
        api=ApiSettings(max_body_bytes=64 * 1024, default_limit=100, max_limit=500),
    )
    async with Instance(config) as instance:
        assert instance.url.startswith("http://127.0.0.1:")
        yield instance


@pytest.fixture
async def api(inst: Instance) -> AsyncIterator[Api]:
    timeout = aiohttp.ClientTimeout(total=10)
    async with aiohttp.ClientSession(timeout=timeout) as session:
        yield Api(session, inst.url)


async def make_user(inst: Instance, name: str, *roles: str, **kw: Any) -> dict[str, Any]:
    return await auth.create_user(inst.store, name, MID_PW, roles=roles, **kw)


async def post_output(api: Api, agent: str = "mid.server.a", **fields: Any) -> dict[str, Any]:
    body = {"agent": agent, "queue": "output", "topic": "Echo", **fields}
    reply = await api.post(f"{TABLE}/ecc_queue", body)
    assert reply.status == 201, reply.text
    record: dict[str, Any] = reply.result
    return record


# --- the seed's user flow ------------------------------------------------------------------


async def test_admin_creates_mid_user_through_the_api(api: Api) -> None:
    created = await api.post(
        f"{TABLE}/sys_user",
        {
            "user_name": "mid.user",
            "first_name": "Mid",
            "last_name": "Server",
            "user_password": MID_PW,
            "web_service_access_only": True,
            "mid_agents": "a",
        },
    )
    assert created.status == 201, created.text
    user = created.result
    assert user["mid_agents"] == "a"
    assert "user_password" not in user
    assert user["web_service_access_only"] == "true"
    assert created.headers["Location"].endswith(f"{TABLE}/sys_user/{user['sys_id']}")

    # No role yet: the ECC queue is refused.
    message, detail = (await api.get(f"{TABLE}/ecc_queue", user="mid.user")).error(403)
    assert message == "User Not Authorized"
    assert "mid_server" in detail

    grant = await api.post(
        f"{TABLE}/sys_user_has_role",
        {"user": "mid.user", "role": "mid_server"},
        params={"sysparm_input_display_value": "true"},
    )
    assert grant.status == 201, grant.text
    roles = await api.get(f"{TABLE}/sys_user_role", params={"sysparm_query": "name=mid_server"})
    # References as ServiceNow answers them: {"link", "value"}.
    assert grant.result["role"]["value"] == roles.result[0]["sys_id"]
    assert grant.result["user"] == {
        "link": f"{created.headers['Location'].rsplit('/', 1)[0]}/{user['sys_id']}",
        "value": user["sys_id"],
    }

    listed = await api.get(f"{TABLE}/ecc_queue", user="mid.user")
    assert listed.status == 200, listed.text
    assert listed.result == []
    assert listed.headers["X-Total-Count"] == "0"
    output = await post_output(api, "mid.server.a")
    posted = await api.post(
        f"{TABLE}/ecc_queue",
        {"queue": "input", "topic": "Echo", "agent": "mid.server.a", "payload": {"ok": True},
         "response_to": output["sys_id"]},
        user="mid.user",
    )  # fmt: skip
    assert posted.status == 201, posted.text
    assert posted.result["payload"] == '{"ok":true}'

    # The password is never returned, whatever is asked for.
    for reply in (
        await api.get(f"{TABLE}/sys_user/{user['sys_id']}"),
        await api.get(f"{TABLE}/sys_user", params={"sysparm_fields": "user_name,user_password"}),
        await api.patch(f"{TABLE}/sys_user/{user['sys_id']}", {"email": "mid@example.com"}),
    ):
        assert reply.status == 200, reply.text
        assert "user_password" not in reply.text
        assert MID_PW not in reply.text


async def test_role_reference_by_sys_id_or_name(api: Api, inst: Instance) -> None:
    user = await make_user(inst, "u1")
    role = await auth.find_role(inst.store, "itil")
    assert role is not None
    by_name = await api.post(f"{TABLE}/sys_user_has_role", {"user": "u1", "role": "itil"})
    message, detail = by_name.error(400)
    assert message == "Invalid reference in field 'user'"
    assert "sysparm_input_display_value=true" in detail
    by_id = await api.post(
        f"{TABLE}/sys_user_has_role", {"user": user["sys_id"], "role": role["sys_id"]}
    )
    assert by_id.status == 201, by_id.text
    again = await api.post(
        f"{TABLE}/sys_user_has_role",
        {"user": "u1", "role": "itil"},
        params={"sysparm_input_display_value": "true"},
    )
    pair = f"user={user['sys_id']!r}, role={role['sys_id']!r}"
    assert again.error(409)[1] == f"sys_user_has_role: a record with {pair} already exists"
    unknown = await api.post(
        f"{TABLE}/sys_user_has_role",
        {"user": "u1", "role": "no_such_role"},
        params={"sysparm_input_display_value": "true"},
    )
    assert "no sys_user_role record with name or sys_id 'no_such_role'" in unknown.error(400)[1]


def midbridge(
    *args: str, stdin: str = "", env: dict[str, str] | None = None
) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "bridge", *args],
        input=stdin,
        capture_output=True,
        text=True,
        cwd=REPO,
        timeout=20,
        env={**os.environ, **(env or {})},
    )


async def test_cli_creates_mid_user_who_can_use_the_api(tmp_path: Path) -> None:
    db = tmp_path / "cli.db"
    args = ["instance", "user", "create", "mid.user", "--db", str(db), "--role", "mid_server"]
    extra = ["--first-name", "Mid", "--last-name", "User", "--web-service-only", "--password-stdin"]
    done = await asyncio.to_thread(midbridge, *args, *extra, stdin=MID_PW + "\n")
    assert done.returncode == 0, done.stderr
    assert "created user mid.user" in done.stdout
    assert "roles: mid_server" in done.stdout

    again = await asyncio.to_thread(midbridge, *args, *extra, stdin=MID_PW + "\n")
    assert again.returncode == 2
    assert "user mid.user already exists" in again.stderr
    bad_role = await asyncio.to_thread(
        midbridge,
        "instance",
        "--db",
        str(db),
        "user",
        "create",
        "x",
        "--role",
        "root",
        "--password-stdin",
        stdin=MID_PW + "\n",
    )
    assert bad_role.returncode == 2
    assert "no role named 'root'" in bad_role.stderr
    short = await asyncio.to_thread(
        midbridge,
        "instance",
        "user",
        "create",
        "y",
        "--db",
        str(db),
        "--password-stdin",
        stdin="short\n",
    )
    assert short.returncode == 2
    assert "8 to 1024 characters" in short.stderr
    for result in (again, bad_role, short):
        assert "Traceback" not in result.stderr

    listing = await asyncio.to_thread(midbridge, "instance", "user", "list", "--db", str(db))
    assert listing.returncode == 0, listing.stderr
    line = next(row for row in listing.stdout.splitlines() if row.startswith("mid.user"))
    assert line.split() == ["mid.user", "Mid", "User", "true", "true", "mid_server"]

    config = InstanceConfig(db=db, admin_password=ADMIN_PW)
    async with Instance(config) as inst, aiohttp.ClientSession() as session:
        api = Api(session, inst.url)
        assert (await api.get(f"{TABLE}/ecc_queue", user="mid.user")).status == 200
        page = await api.get("/", user="mid.user")
        assert page.status == 403
        assert "web services only" in page.text


async def _read_line(stream: asyncio.StreamReader) -> str:
    line = await asyncio.wait_for(stream.readline(), 15)
    return line.decode()


async def test_cli_serves_and_prints_a_generated_admin_password_once(tmp_path: Path) -> None:
    db = tmp_path / "served.db"
    env = {k: v for k, v in os.environ.items() if k != "MIDBRIDGE_ADMIN_PASSWORD"}
    passwords: list[str] = []
    for _start in range(2):
        proc = await asyncio.create_subprocess_exec(
            sys.executable,
            "-m",
            "bridge",
            "instance",
            "--port",
            "0",
            "--db",
            str(db),
            cwd=REPO,
            env=env,
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.PIPE,
        )
        try:
            assert proc.stdout is not None
            first = await _read_line(proc.stdout)
            assert first.startswith("midbridge instance on http://127.0.0.1:"), first
            url = first.split()[3]
            if not passwords:
                second = await _read_line(proc.stdout)
                assert second.startswith("admin password (first start, shown only now): ")
                passwords.append(second.rsplit(" ", 1)[1].strip())
            async with aiohttp.ClientSession() as session:
                api = Api(session, url)
                reply = await api.get(f"{TABLE}/sys_user", password=passwords[0])
                assert reply.status == 200, reply.text
                assert [u["user_name"] for u in reply.result] == ["admin"]
            proc.send_signal(signal.SIGTERM)
            out, err = await asyncio.wait_for(proc.communicate(), 15)
            assert proc.returncode == 0, err
            assert b"admin password" not in out  # nothing more after the start lines
            assert passwords[0].encode() not in err
        finally:
            if proc.returncode is None:
                proc.kill()
                await proc.wait()
    assert len(passwords) == 1


# --- authentication and roles --------------------------------------------------------------


async def test_credentials_refused_with_401(api: Api, inst: Instance) -> None:
    await make_user(inst, "mid.user", "mid_server")
    cases = [
        await api.get(f"{TABLE}/ecc_queue", user=None),
        await api.get(f"{TABLE}/ecc_queue", user="mid.user", password="wrong-password"),
        await api.get(f"{TABLE}/ecc_queue", user="nobody", password="whatever-pw"),
        await api.get(f"{TABLE}/ecc_queue", user=None, headers={"Authorization": "Basic !!!"}),
        await api.get(f"{TABLE}/ecc_queue", user=None, headers={"Authorization": "Bearer x"}),
    ]
    for reply in cases:
        message, _detail = reply.error(401)
        assert message == "User Not Authenticated"
        assert reply.headers["WWW-Authenticate"] == 'Basic realm="midbridge"'
    assert cases[0].error(401)[1] == "Required to provide Auth information"
    assert cases[1].error(401)[1] == cases[2].error(401)[1] == "Invalid user name or password"
    # 401 comes before anything else is looked at.
    assert (await api.get(f"{TABLE}/no_table", user=None)).status == 401
    assert (await api.post(f"{TABLE}/ecc_queue", {"nope": 1}, user=None)).status == 401


async def test_inactive_user_refused_until_reactivated(api: Api, inst: Instance) -> None:
    user = await make_user(inst, "sleepy", "mid_server", active=False)
    _message, detail = (await api.get(f"{TABLE}/ecc_queue", user="sleepy")).error(401)
    assert detail == "Invalid user name or password"  # as a wrong password: no oracle
    assert (await api.patch(f"{TABLE}/sys_user/{user['sys_id']}", {"active": "true"})).status == 200
    assert (await api.get(f"{TABLE}/ecc_queue", user="sleepy")).status == 200
    assert (await api.patch(f"{TABLE}/sys_user/{user['sys_id']}", {"active": False})).status == 200
    assert (await api.get(f"{TABLE}/ecc_queue", user="sleepy")).status == 401


@pytest.mark.production_password_cost
async def test_password_is_stored_as_scrypt_and_can_be_changed(
    api: Api, inst: Instance, tmp_path: Path
) -> None:
    user = await make_user(inst, "mid.user", "mid_server")
    assert (await api.get(f"{TABLE}/ecc_queue", user="mid.user")).status == 200
    new = "another-password"
    changed = await api.patch(f"{TABLE}/sys_user/{user['sys_id']}", {"user_password": new})
    assert changed.status == 200
    assert (await api.get(f"{TABLE}/ecc_queue", user="mid.user")).status == 401  # old one
    assert (await api.get(f"{TABLE}/ecc_queue", user="mid.user", password=new)).status == 200
    with sqlite3.connect(tmp_path / "instance.db") as db:
        rows = db.execute("SELECT user_name, user_password FROM sys_user").fetchall()
    for name, stored in rows:
        assert stored.startswith("scrypt$32768$8$1$"), name
        assert new not in stored
        assert ADMIN_PW not in stored
    weak = await api.patch(f"{TABLE}/sys_user/{user['sys_id']}", {"user_password": "short"})
    assert weak.error(400) == (
        "Invalid user_password",
        "a password must be 8 to 1024 characters long",
    )
    assert (await api.post(f"{TABLE}/sys_user", {"user_password": ["x"]})).status == 400
    # A condition on the hash is ignored (as ServiceNow ignores a field it may not use):
    # no oracle, whatever the condition says.
    everyone = await api.get(f"{TABLE}/sys_user")
    for condition in ("user_passwordSTARTSWITHscrypt", "user_passwordSTARTSWITHnothing"):
        by_query = await api.get(f"{TABLE}/sys_user", params={"sysparm_query": condition})
        assert by_query.status == 200, by_query.text
        assert by_query.result == everyone.result


async def test_user_without_the_role_gets_403(api: Api, inst: Instance) -> None:
    await make_user(inst, "fulfiller", "itil")
    output = await post_output(api)
    for method, path, body in [
        ("GET", f"{TABLE}/ecc_queue", None),
        ("GET", f"{TABLE}/ecc_queue/{output['sys_id']}", None),
        ("GET", f"{TABLE}/ecc_queue/no-such-record", None),  # 403, not 404
        ("POST", f"{TABLE}/ecc_queue", {"queue": "input"}),
        ("PATCH", f"{TABLE}/ecc_queue/{output['sys_id']}", {"state": "processing"}),
        ("GET", f"{TABLE}/ecc_agent", None),
        ("GET", f"{TABLE}/sys_user", None),
        ("POST", f"{TABLE}/sys_user_has_role", {"user": "x", "role": "y"}),
        ("GET", f"{TABLE}/discovery_credentials", None),
    ]:
        reply = await api.call(method, path, user="fulfiller", json=body)
        message, detail = reply.error(403)
        assert message == "User Not Authorized", (method, path)
        assert "requires role" in detail


async def test_mid_server_reads_outputs_writes_inputs_and_claims(api: Api, inst: Instance) -> None:
    await make_user(inst, "mid.user", "mid_server", mid_agents=["a"])
    output = await post_output(api, priority=1)
    path = f"{TABLE}/ecc_queue/{output['sys_id']}"
    got = await api.get(path, user="mid.user")
    assert got.result["state"] == "ready"
    claimed = await api.patch(path, {"state": "processing"}, user="mid.user")
    assert claimed.status == 200, claimed.text
    assert claimed.result["state"] == "processing"
    answer = {"queue": "input", "response_to": output["sys_id"], "sequence": 0, "run": "r1"}
    inp = await api.post(f"{TABLE}/ecc_queue", answer, user="mid.user")
    assert inp.status == 201
    assert inp.result["agent"] == "mid.server.a"  # the output's agent
    put = await api.call(
        "PUT",
        path,
        user="mid.user",
        json={"state": "processed", "processed": "2026-11-27 13:00:00"},
    )
    assert put.result["state"] == "processed"

    refused = await api.patch(path, {"payload": "<x/>"}, user="mid.user")
    assert refused.error(403)[1].endswith("refused field: payload")
    new_output = await api.post(
        f"{TABLE}/ecc_queue", {"queue": "output", "topic": "Echo"}, user="mid.user"
    )
    assert (
        "creating an ecc_queue output record requires role discovery_admin"
        in new_output.error(403)[1]
    )
    again = await api.post(f"{TABLE}/ecc_queue", answer, user="mid.user")
    assert again.status == 200  # a repeated chunk, after the output closed: the stored one
    assert again.result["sys_id"] == inp.result["sys_id"]
    inp_path = f"{TABLE}/ecc_queue/{inp.result['sys_id']}"
    assert (await api.patch(inp_path, {"state": "processed"}, user="mid.user")).status == 403
    assert (await api.call("DELETE", path, user="mid.user")).error(403)[
        1
    ] == "delete on ecc_queue requires role admin"
    assert (await api.call("DELETE", path)).status == 204
    assert (await api.get(path)).error(404) == (
        "No Record found",
        "Record doesn't exist or ACL restricts the record retrieval",
    )


async def test_agent_record_rules(api: Api, inst: Instance) -> None:
    await make_user(inst, "mid.user", "mid_server", mid_agents=["a"])
    agent = await api.post(
        f"{TABLE}/ecc_agent", {"name": "a", "host": "h", "status": "Up"}, user="mid.user"
    )
    assert agent.status == 201
    assert agent.result["validated"] == "false"
    path = f"{TABLE}/ecc_agent/{agent.result['sys_id']}"
    assert (await api.patch(path, {"validated": True}, user="mid.user")).error(403)[
        1
    ] == "only admin may set ecc_agent.validated"
    assert (
        await api.patch(path, {"last_heartbeat": "2026-11-27 13:00:00"}, user="mid.user")
    ).status == 200
    assert (await api.patch(path, {"validated": "true"})).result["validated"] == "true"
    duplicate = await api.post(f"{TABLE}/ecc_agent", {"name": "a"}, user="mid.user")
    assert duplicate.error(409)[1] == "ecc_agent: a record with name='a' already exists"


async def test_web_page_refuses_web_service_only_users(api: Api, inst: Instance) -> None:
    await make_user(inst, "mid.user", "mid_server", web_service_access_only=True)
    await make_user(inst, "person", "mid_server")
    page = await api.get("/", user="mid.user")
    assert page.status == 403
    assert page.headers["Content-Type"].startswith("text/html")
    assert (await api.get(f"{TABLE}/ecc_queue", user="mid.user")).status == 200
    ok = await api.get("/nav", user="person")
    assert ok.status == 200
    assert "Signed in as <b>person</b>" in ok.text
    assert "ecc_queue" in ok.text
    assert "sys_user" not in ok.text
    admin = await api.get("/")
    assert admin.status == 200
    assert "sys_user" in admin.text
    anonymous = await api.get("/", user=None)
    assert anonymous.status == 401
    assert anonymous.headers["WWW-Authenticate"] == 'Basic realm="midbridge"'


# --- lists: filtering, ordering, paging, fields ----------------------------------------------


async def test_list_filter_order_limit_offset_fields(api: Api) -> None:
    made = [
        await post_output(api, "mid.server.a", priority=2, name="n0"),
        await post_output(api, "mid.server.a", priority=0, name="n1"),
        await post_output(api, "mid.server.b", priority=1, name="n2"),
        await post_output(api, "mid.server.a", priority=1, name="n3", state="processing"),
        await post_output(api, "mid.server.a", priority=1, name="n4"),
    ]
    ids = [m["sys_id"] for m in made]

    async def names(params: dict[str, str]) -> list[str]:
        reply = await api.get(f"{TABLE}/ecc_queue", params=params)
        assert reply.status == 200, reply.text
        return [r["name"] for r in reply.result]

    ready_a = "agent=mid.server.a^queue=output^state=ready"
    assert await names({"sysparm_query": ready_a}) == ["n0", "n1", "n4"]
    assert await names({"sysparm_query": ready_a + "^ORDERBYpriority"}) == ["n1", "n4", "n0"]
    assert await names({"sysparm_query": "ORDERBYDESCpriority^ORDERBYname"}) == [
        "n0",
        "n2",
        "n3",
        "n4",
        "n1",
    ]
    assert await names({"sysparm_query": "agent=mid.server.b^ORstate=processing"}) == ["n2", "n3"]
    assert await names({"sysparm_query": "nameINn1,n3"}) == ["n1", "n3"]
    assert await names({"sysparm_query": "nameSTARTSWITHn^priority>=1^ORDERBYname"}) == [
        "n0",
        "n2",
        "n3",
        "n4",
    ]
    assert await names({"agent": "mid.server.b"}) == ["n2"]  # name=value pairs filter too
    assert await names(
        {"sysparm_query": "ORDERBYname", "sysparm_limit": "2", "sysparm_offset": "2"}
    ) == ["n2", "n3"]

    page = await api.get(
        f"{TABLE}/ecc_queue",
        params={
            "sysparm_query": "ORDERBYname",
            "sysparm_limit": "2",
            "sysparm_fields": "sys_id,priority",
        },
    )
    assert page.result == [{"sys_id": ids[0], "priority": "2"}, {"sys_id": ids[1], "priority": "0"}]
    assert page.headers["X-Total-Count"] == "5"
    assert 'rel="next"' in page.headers["Link"]
    assert "sysparm_offset=2" in page.headers["Link"]
    assert 'rel="prev"' not in page.headers["Link"]
    no_count = await api.get(f"{TABLE}/ecc_queue", params={"sysparm_no_count": "true"})
    assert "X-Total-Count" not in no_count.headers
    one = await api.get(f"{TABLE}/ecc_queue/{ids[2]}", params={"sysparm_fields": "agent"})
    assert one.result == {"agent": "mid.server.b"}


async def test_values_are_strings_out_and_typed_or_strings_in(api: Api) -> None:
    typed = await post_output(api, priority=0, complete=True, sequence=3, lease_until=12.5)
    text = await post_output(api, priority="0", complete="true", sequence="3", lease_until="12.5")
    for record in (typed, text):
        assert all(isinstance(v, str) for v in record.values())
        assert (record["priority"], record["complete"], record["sequence"]) == ("0", "true", "3")
        assert record["lease_until"] == "12.5"
        assert record["error_string"] == ""
    assert typed["sys_created_on"][4] == "-"
    assert len(typed["sys_created_on"]) == 19
    nulls = await post_output(api)
    assert (nulls["sequence"], nulls["lease_until"], nulls["priority"]) == ("", "", "2")


# --- errors ------------------------------------------------------------------------------------


async def test_errors_name_the_fault(api: Api, inst: Instance) -> None:
    output = await post_output(api)
    one = f"{TABLE}/ecc_queue/{output['sys_id']}"
    cases: list[tuple[Reply, int, str]] = [
        (
            await api.get(f"{TABLE}/ecc_queue", params={"sysparm_query": "stateFOOready"}),
            400,
            "Invalid sysparm_query",
        ),
        (
            await api.get(f"{TABLE}/ecc_queue", params={"sysparm_limit": "ten"}),
            400,
            "Invalid sysparm_limit: 'ten'",
        ),
        (
            await api.get(f"{TABLE}/ecc_queue", params={"sysparm_offset": "-1"}),
            400,
            "Invalid sysparm_offset: -1",
        ),
        (
            await api.get(f"{TABLE}/ecc_queue", params={"sysparm_display_value": "maybe"}),
            400,
            "Invalid sysparm_display_value",
        ),
        (await api.get(f"{TABLE}/incident"), 400, "Invalid table incident"),
        (
            await api.patch(one, {"priority": "high"}),
            400,
            "ecc_queue.priority",
        ),
        (
            await api.patch(one, {"complete": "maybe"}),
            400,
            "ecc_queue.complete",
        ),
        (
            await api.patch(one, {"name": {"a": 1}}),
            400,
            "Field 'name': expected a string, number or boolean",
        ),
        (
            await api.call(
                "POST",
                f"{TABLE}/ecc_queue",
                data=b"{not json",
                headers={"Content-Type": "application/json"},
            ),
            400,
            "Invalid JSON in the request body",
        ),
        (
            await api.post(f"{TABLE}/ecc_queue", ["not a record"]),
            400,
            "The request body must be a JSON object",
        ),
        (
            await api.post(f"{TABLE}/ecc_queue", {"sys_id": "bad id!"}),
            400,
            "ecc_queue.sys_id",
        ),
        (
            await api.post(f"{TABLE}/ecc_queue", {"sys_id": output["sys_id"], "queue": "output"}),
            409,
            "already exists",
        ),
        (await api.get(f"{TABLE}/ecc_queue/nope"), 404, "No Record found"),
        (await api.patch(f"{TABLE}/ecc_queue/nope", {"state": "ready"}), 404, "No Record found"),
        (await api.call("DELETE", f"{TABLE}/ecc_queue/nope"), 404, "No Record found"),
        (
            await api.call("DELETE", f"{TABLE}/ecc_queue"),
            405,
            "DELETE is not allowed on /api/now/table/ecc_queue",
        ),
        (await api.call("POST", one, json={}), 405, "Method not Supported"),
        (await api.get("/api/now/table"), 404, "no resource at /api/now/table"),
        (
            await api.call(
                "POST",
                f"{TABLE}/ecc_queue",
                data=b"queue=output",
                headers={"Content-Type": "application/x-www-form-urlencoded"},
            ),
            415,
            "send application/json or application/xml, not application/x-www-form-urlencoded",
        ),
        (
            await api.call(
                "POST",
                f"{TABLE}/ecc_queue",
                data=b'{"payload": "' + b"x" * 70_000 + b'"}',
                headers={"Content-Type": "application/json"},
            ),
            413,
            "the limit is 65536 bytes",
        ),
    ]
    for reply, status, fault in cases:
        message, detail = reply.error(status)
        assert fault in f"{message} {detail}", (status, fault, reply.text)
    assert "Allow" in cases[-5][0].headers
    assert await inst.store.count("ecc_queue") == 1


async def test_what_servicenow_ignores_is_ignored(api: Api, inst: Instance) -> None:
    """Unknown fields in queries, filters, sysparm_fields and bodies, unknown parameters,
    system fields in a body, a sys_id in an update: ServiceNow ignores them (no 400)."""
    output = await post_output(api, name="o1")
    one = f"{TABLE}/ecc_queue/{output['sys_id']}"
    for params in (
        {"sysparm_query": "agnet=x^name=o1"},
        {"agnet": "x", "name": "o1"},
        {"sysparm_bogus": "1"},
        {"sysparm_display_value": "true"},
        {"sysparm_limit": "501"},  # above max_limit: lowered to it
    ):
        reply = await api.get(f"{TABLE}/ecc_queue", params=params)
        assert reply.status == 200, (params, reply.text)
        assert [r["sys_id"] for r in reply.result] == [output["sys_id"]], params
    fields = await api.get(f"{TABLE}/ecc_queue", params={"sysparm_fields": "sys_id,agnet"})
    assert fields.result == [{"sys_id": output["sys_id"]}]
    for body in (
        {"stat": "ready"},
        {"sys_created_on": "2020-01-01 00:00:00"},
        {"sys_id": "x"},
    ):
        patched = await api.patch(one, body)
        assert patched.status == 200, (body, patched.text)
        assert patched.result["sys_id"] == output["sys_id"]
        assert patched.result["sys_created_on"] == output["sys_created_on"]
    made = await api.post(f"{TABLE}/ecc_queue", {"queue": "output", "agnet": "x"})
    assert made.status == 201, made.text
    assert "agnet" not in made.result
    assert await inst.store.count("ecc_queue") == 2


async def test_chunked_body_over_the_limit_is_refused(api: Api) -> None:
    async def body() -> AsyncIterator[bytes]:
        yield b'{"payload": "'
        for _ in range(20):
            yield b"x" * 8192
        yield b'"}'

    reply = await api.call(
        "POST", f"{TABLE}/ecc_queue", data=body(), headers={"Content-Type": "application/json"}
    )
    assert reply.error(413)[0] == "Request body too large"


# --- ECC inputs, hooks and events ------------------------------------------------------------


async def test_repeated_input_chunks_are_stored_once(api: Api, inst: Instance) -> None:
    output = await post_output(api)
    chunk = {"queue": "input", "response_to": output["sys_id"], "run": "r1", "sequence": 0}
    first = await api.post(f"{TABLE}/ecc_queue", {**chunk, "payload": {"n": 1}})
    again = await api.post(f"{TABLE}/ecc_queue", {**chunk, "payload": {"n": 1}})
    assert (first.status, again.status) == (201, 200)
    assert first.result["sys_id"] == again.result["sys_id"]
    other_run = await api.post(f"{TABLE}/ecc_queue", {**chunk, "run": "r2"})
    assert other_run.status == 201
    same_id = await api.post(
        f"{TABLE}/ecc_queue", {**chunk, "sys_id": first.result["sys_id"], "sequence": 5}
    )
    assert same_id.status == 200
    assert same_id.result["sequence"] == "0"
    record, inserted = await inst.store.insert_input_once({**chunk, "sequence": "0"})
    assert not inserted
    assert record["sys_id"] == first.result["sys_id"]
    assert await inst.store.count("ecc_queue", "queue=input") == 2
    with pytest.raises(Conflict, match="response_to, run and sequence"):
        await inst.store.insert("ecc_queue", chunk)


async def test_listeners_are_told_before_the_api_answers(api: Api, inst: Instance) -> None:
    seen: list[Change] = []
    outputs = asyncio.Event()

    def on_output(change: Change) -> None:
        if change.record["queue"] == "output":
            outputs.set()

    inst.on_insert("ecc_queue", on_output)
    remove = inst.on_change(seen.append)
    output = await post_output(api)
    assert outputs.is_set()  # no waiting, no polling: set by the time the POST returned
    assert [(c.table, c.op) for c in seen] == [("ecc_queue", "insert")]
    await api.patch(f"{TABLE}/ecc_queue/{output['sys_id']}", {"state": "processing"})
    assert seen[-1].op == "update"
    assert seen[-1].previous is not None
    assert seen[-1].previous["state"] == "ready"
    assert seen[-1].record["state"] == "processing"

    user = await make_user(inst, "temp", "itil", "mid_server")
    seen.clear()
    assert (await api.call("DELETE", f"{TABLE}/sys_user/{user['sys_id']}")).status == 204
    assert sorted((c.table, c.op) for c in seen) == [
        ("sys_user", "delete"),
        ("sys_user_has_role", "delete"),
        ("sys_user_has_role", "delete"),
    ]
    assert await inst.store.count("sys_user_has_role", f"user={user['sys_id']}") == 0
    remove()
    await post_output(api)
    assert len(seen) == 3


async def test_before_write_hook_changes_or_refuses_writes(api: Api, inst: Instance) -> None:
    def seal(write: Write) -> None:
        secret = write.fields.get("secret")
        if secret == "forbidden":
            raise ValueError("this secret is not allowed")
        if secret is not None:
            write.fields["secret"] = "sealed:" + str(secret)[::-1]

    inst.before_write("discovery_credentials", seal)
    made = await api.post(
        f"{TABLE}/discovery_credentials", {"name": "ssh", "type": "ssh", "secret": "hunter22"}
    )
    assert made.status == 201
    assert "secret" not in made.result
    assert "hunter22" not in made.text
    stored = await inst.store.get("discovery_credentials", made.result["sys_id"])
    assert stored is not None
    assert stored["secret"] == "sealed:22retnuh"
    refused = await api.post(f"{TABLE}/discovery_credentials", {"name": "x", "secret": "forbidden"})
    assert refused.error(400)[0] == "this secret is not allowed"

    async def api_error(write: Write) -> None:
        raise ApiError(403, "User Not Authorized", "frozen")

    remove = inst.before_write("ecc_agent", api_error)
    assert (await api.post(f"{TABLE}/ecc_agent", {"name": "a"})).error(403)[1] == "frozen"
    remove()
    assert (await api.post(f"{TABLE}/ecc_agent", {"name": "a"})).status == 201


# --- the store -----------------------------------------------------------------------------------


async def test_update_query_claims_each_record_once(tmp_path: Path) -> None:
    async with SQLiteStore(tmp_path / "s.db") as store:
        await store.insert_many(
            "ecc_queue",
            [{"queue": "output", "agent": "mid.server.a", "priority": i % 3} for i in range(10)],
        )
        claim = "agent=mid.server.a^queue=output^state=ready^ORDERBYpriority"
        first, second = await asyncio.gather(
            store.update_query(
                "ecc_queue", claim, {"state": "processing", "lease_until": 99.5}, limit=6
            ),
            store.update_query(
                "ecc_queue", claim, {"state": "processing", "lease_until": 99.5}, limit=6
            ),
        )
        ids = [r["sys_id"] for r in first + second]
        assert len(ids) == len(set(ids)) == 10
        assert sorted([len(first), len(second)]) == [4, 6]
        assert [r["priority"] for r in first if len(first) == 6] in ([0, 0, 0, 0, 1, 1], [])
        assert all(r["state"] == "processing" and r["lease_until"] == 99.5 for r in first + second)
        one = ids[0]
        assert (
            await store.update_query("ecc_queue", f"sys_id={one}^state=ready", {"state": "x"}) == []
        )
        expired = await store.update_query(
            "ecc_queue", "state=processing^lease_until<100", {"state": "ready"}
        )
        assert len(expired) == 10
        with pytest.raises(FieldError, match=r"ecc_queue\.nope: no such field"):
            await store.update_query("ecc_queue", "", {"nope": 1})


async def test_store_reopens_and_adds_missing_columns(tmp_path: Path) -> None:
    path = tmp_path / "old.db"
    with sqlite3.connect(path) as db:
        db.execute(
            'CREATE TABLE ecc_agent ("sys_id" TEXT NOT NULL PRIMARY KEY, '
            '"sys_created_on" TEXT NOT NULL, "sys_updated_on" TEXT NOT NULL, '
            "\"name\" TEXT NOT NULL DEFAULT '')"
        )
        stamp = "2026-01-01 00:00:00"
        db.execute("INSERT INTO ecc_agent VALUES ('a1', ?, ?, 'old')", (stamp, stamp))
    async with SQLiteStore(path) as store:
        record = await store.get("ecc_agent", "a1")
        assert record is not None
        assert (record["name"], record["validated"], record["status"]) == ("old", False, "Down")
        await store.update("ecc_agent", "a1", {"validated": True})
    async with SQLiteStore(path) as store:
        again = await store.get("ecc_agent", "a1")
        assert again is not None
        assert again["validated"] is True
        mode = (await store.query("ecc_agent"))[0]["name"]
        assert mode == "old"
    with sqlite3.connect(path) as db:
        assert db.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
