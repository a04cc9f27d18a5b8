"""The instance's web dashboard (``bridge/instance/dashboard.py``).

Plain HTTP tests talk to a real instance on loopback with aiohttp's client and a cookie
jar, as a browser would (sign-in form, session cookie, CSRF tokens, escaping). The tests
in real Chromium are in tests/test_dashboard_browser.py.
"""

from __future__ import annotations

import asyncio
import base64
import re
import tomllib
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import Any, TypeVar
from urllib.parse import quote

import aiohttp
import orjson
import pytest
from yarl import URL

from bridge.instance import auth
from bridge.instance.dashboard import (
    CSRF_FIELD,
    LOGIN_COOKIE,
    SESSION_COOKIE,
    DashboardSettings,
    age_text,
    pretty_payload,
    safe_next,
)
from bridge.instance.server import Instance, InstanceConfig
from bridge.instance.store import Record
from tests.harness import REPO

pytestmark = pytest.mark.timeout(60)

ADMIN_PW = "admin-pass-123"
USER_PW = "user-pass-1234"
HOSTILE = "<script>alert('x')</script>"
HOSTILE_ATTR = '"><img src=x onerror=alert(1)>'
T = TypeVar("T")


def basic(user: str, password: str) -> str:
    return "Basic " + base64.b64encode(f"{user}:{password}".encode()).decode()


@dataclass
class Page:
    status: int
    text: str
    headers: Any
    location: str

    def token(self) -> str:
        found = re.search(r'name="csrf_token" value="([^"]+)"', self.text)
        assert found, self.text
        return found.group(1)


class Browser:
    """An HTTP client that keeps cookies and does not follow redirects."""

    def __init__(self, session: aiohttp.ClientSession, url: str) -> None:
        self.session = session
        self.url = url

    async def request(
        self,
        method: str,
        path: str,
        *,
        data: dict[str, str] | None = None,
        headers: dict[str, str] | None = None,
    ) -> Page:
        headers = {"Accept": "text/html,application/xhtml+xml", **(headers or {})}
        async with self.session.request(
            method, self.url + path, data=data, headers=headers, allow_redirects=False
        ) as resp:
            return Page(
                resp.status, await resp.text(), resp.headers, resp.headers.get("Location", "")
            )

    async def get(self, path: str, **kw: Any) -> Page:
        return await self.request("GET", path, **kw)

    async def post(self, path: str, data: dict[str, str], **kw: Any) -> Page:
        return await self.request("POST", path, data=data, **kw)

    def cookie(self, name: str) -> str | None:
        found = self.session.cookie_jar.filter_cookies(URL(self.url)).get(name)
        return found.value if found is not None else None

    async def sign_in(self, user: str, password: str, next_path: str = "/") -> Page:
        form = await self.get("/login?next=" + next_path)
        assert form.status == 200, form.text
        return await self.post(
            "/login",
            {"user_name": user, "password": password, "next": next_path, CSRF_FIELD: form.token()},
        )


@pytest.fixture
async def inst(tmp_path: Path) -> AsyncIterator[Instance]:
    config = InstanceConfig(db=tmp_path / "instance.db", admin_password=ADMIN_PW)
    async with Instance(config) as instance:
        yield instance


@pytest.fixture
async def http() -> AsyncIterator[aiohttp.ClientSession]:
    async with aiohttp.ClientSession(
        cookie_jar=aiohttp.CookieJar(unsafe=True),  # keep cookies for 127.0.0.1
        timeout=aiohttp.ClientTimeout(total=20),
    ) as session:
        yield session


@pytest.fixture
def browser(inst: Instance, http: aiohttp.ClientSession) -> Browser:
    return Browser(http, inst.url)


async def signed_in(inst: Instance, http: aiohttp.ClientSession, user: str = "admin") -> Browser:
    b = Browser(http, inst.url)
    page = await b.sign_in(user, ADMIN_PW if user == "admin" else USER_PW)
    assert page.status == 303, page.text
    return b


async def add_agent(inst: Instance, name: str = "dc1", **fields: Any) -> Record:
    row = {
        "name": name,
        "status": "Up",
        "host": "mid-host",
        "version": "0.1.0",
        "capabilities": "Echo,Shazzam",
        "last_heartbeat": "2026-01-02 03:04:05",
        "stats": orjson.dumps(
            {
                "in_flight": 2,
                "lanes_running": {"interactive": 0, "standard": 2},
                "lanes_waiting": {"interactive": 0, "standard": 5},
            }
        ).decode(),
        **fields,
    }
    return await inst.store.insert("ecc_agent", row)


# --- sign-in, sessions --------------------------------------------------------------------------


async def test_pages_require_sign_in(browser: Browser) -> None:
    for path in ("/", "/agents", "/ecc?state=error", "/ecc/abc", "/discovery", "/cmdb"):
        page = await browser.get(path)
        assert page.status == 303, (path, page.status)
        location = URL(page.location)
        assert location.path == "/login"
        assert location.query["next"] == path
    posted = await browser.post("/agents/dc1/pause", {CSRF_FIELD: "x"})
    assert (posted.status, URL(posted.location).path) == (303, "/login")
    runs = await browser.get("/discovery/runs.json")
    assert runs.status == 401
    assert orjson.loads(runs.text) == {"error": "sign in"}


async def test_sign_in_with_the_form_then_out(browser: Browser, inst: Instance) -> None:
    form = await browser.get("/login?next=/ecc%3Fstate%3Derror")
    assert form.status == 200
    assert 'type="password"' in form.text
    assert form.headers["Content-Security-Policy"].startswith("default-src 'none'")
    assert form.headers["X-Frame-Options"] == "DENY"
    assert browser.cookie(LOGIN_COOKIE)
    assert browser.cookie(SESSION_COOKIE) is None

    wrong = await browser.post(
        "/login",
        {"user_name": "admin", "password": "not-the-password", CSRF_FIELD: form.token()},
    )
    assert wrong.status == 401
    assert "Invalid user name or password." in wrong.text
    assert browser.cookie(SESSION_COOKIE) is None
    unknown = await browser.post(
        "/login", {"user_name": "nobody", "password": ADMIN_PW, CSRF_FIELD: wrong.token()}
    )
    assert unknown.status == 401
    assert "Invalid user name or password." in unknown.text  # the same words: no user oracle

    done = await browser.post(
        "/login",
        {
            "user_name": "admin",
            "password": ADMIN_PW,
            "next": "/ecc?state=error",
            CSRF_FIELD: unknown.token(),
        },
    )
    assert done.status == 303, done.text
    assert done.location == "/ecc?state=error"
    cookie = next(c for c in done.headers.getall("Set-Cookie") if c.startswith(SESSION_COOKIE))
    attributes = {part.strip().lower() for part in cookie.split(";")[1:]}
    assert {"httponly", "samesite=strict", "path=/"} <= attributes
    assert not any(a.startswith(("expires", "max-age")) for a in attributes)  # session cookie
    assert "secure" not in attributes  # plain HTTP on loopback; Secure over HTTPS
    session_id = browser.cookie(SESSION_COOKIE)
    assert session_id
    assert len(session_id) >= 40

    home = await browser.get("/")
    assert home.status == 200
    assert '<span class="user" id="signed-in-as">admin</span>' in home.text
    again = await browser.get("/login")  # signed in already: straight on
    assert (again.status, again.location) == (303, "/")

    refused = await browser.post("/logout", {})
    assert refused.status == 403  # no CSRF token
    assert (await browser.get("/agents")).status == 200
    out = await browser.post("/logout", {CSRF_FIELD: home.token()})
    assert (out.status, out.location) == (303, "/login")
    assert browser.cookie(SESSION_COOKIE) in (None, "")
    # The old session id is dead on the server too, not only forgotten by the client.
    browser.session.cookie_jar.update_cookies({SESSION_COOKIE: session_id}, URL(browser.url))
    assert (await browser.get("/agents")).status == 303


async def test_sign_in_form_needs_its_token(browser: Browser) -> None:
    body = {"user_name": "admin", "password": ADMIN_PW}
    bare = await browser.post("/login", body)
    assert bare.status == 403
    assert "sign-in form expired" in bare.text
    assert browser.cookie(SESSION_COOKIE) is None
    # A token from another browser's form does not fit this browser's pre-login cookie.
    other = aiohttp.ClientSession(cookie_jar=aiohttp.CookieJar(unsafe=True))
    async with other:
        foreign = await Browser(other, browser.url).get("/login")
    forged = await browser.post("/login", {**body, CSRF_FIELD: foreign.token()})
    assert forged.status == 403
    assert browser.cookie(SESSION_COOKIE) is None
    ok = await browser.post("/login", {**body, CSRF_FIELD: forged.token()})
    assert ok.status == 303


async def test_web_service_only_users_are_refused(browser: Browser, inst: Instance) -> None:
    await auth.create_user(
        inst.store, "mid.user", USER_PW, roles=["mid_server"], web_service_access_only=True
    )
    page = await browser.sign_in("mid.user", USER_PW)
    assert page.status == 403
    assert "User mid.user may use web services only." in page.text
    assert browser.cookie(SESSION_COOKIE) is None
    # ...while the Table API still serves it.
    async with browser.session.get(
        browser.url + "/api/now/table/ecc_queue",
        headers={"Authorization": basic("mid.user", USER_PW)},
    ) as resp:
        assert resp.status == 200


async def test_non_admin_users_see_what_the_table_api_lets_them_read(
    inst: Instance, http: aiohttp.ClientSession
) -> None:
    await add_agent(inst)
    schedule = await inst.store.insert(
        "discovery_schedule", {"name": "lab", "ranges": "127.0.0.1", "agent": "dc1"}
    )
    started: list[str] = []

    async def start_run(schedule_id: str) -> str:
        started.append(schedule_id)
        row = await inst.store.insert("discovery_status", {"name": "lab", "state": "Scanning"})
        return str(row["sys_id"])

    assert inst.dashboard is not None
    inst.dashboard.set_start_run(start_run)

    # discovery_admin: reads everything the dashboard shows, starts discovery, no agent actions.
    await auth.create_user(inst.store, "disco", USER_PW, roles=["discovery_admin"])
    b = await signed_in(inst, http, "disco")
    home = await b.get("/")
    assert home.status == 200
    for path in ("/agents", "/ecc", "/discovery", "/cmdb"):
        assert f'href="{path}"' in home.text, path
        assert (await b.get(path)).status == 200, path
    agents = await b.get("/agents")
    assert "dc1" in agents.text
    assert "data-action=" not in agents.text  # no action buttons
    before = await inst.store.count("ecc_queue")
    action = await b.post("/agents/dc1/pause", {CSRF_FIELD: home.token()})
    assert action.status == 403
    assert "requires role admin" in action.text
    assert await inst.store.count("ecc_queue") == before
    page = await b.get("/discovery")
    assert 'data-run-schedule="lab"' in page.text
    go = await b.post(f"/discovery/{schedule['sys_id']}/run", {CSRF_FIELD: page.token()})
    assert go.status == 303
    assert started == [schedule["sys_id"]]
    assert (await b.get("/discovery/runs.json")).status == 200

    # mid_server (one that may use web pages): agents and the ECC queue only, no actions.
    await auth.create_user(inst.store, "mid.person", USER_PW, roles=["mid_server"])
    async with aiohttp.ClientSession(cookie_jar=aiohttp.CookieJar(unsafe=True)) as other:
        b2 = await signed_in(inst, other, "mid.person")
        home = await b2.get("/")
        assert 'href="/agents"' in home.text
        assert 'href="/discovery"' not in home.text
        assert 'href="/cmdb"' not in home.text
        assert (await b2.get("/ecc")).status == 200
        for path in ("/discovery", "/cmdb"):
            refused = await b2.get(path)
            assert refused.status == 403, path
            assert "may not read" in refused.text
        assert (await b2.get("/discovery/runs.json")).status == 403
        refused = await b2.post(f"/discovery/{schedule['sys_id']}/run", {CSRF_FIELD: home.token()})
        assert refused.status == 403
        assert started == [schedule["sys_id"]]

    # itil: signed in, nothing to read.
    await auth.create_user(inst.store, "fulfiller", USER_PW, roles=["itil"])
    async with aiohttp.ClientSession(cookie_jar=aiohttp.CookieJar(unsafe=True)) as other:
        b3 = await signed_in(inst, other, "fulfiller")
        home = await b3.get("/")
        assert home.status == 200
        assert "Your roles let you read none" in home.text
        assert (await b3.get("/agents")).status == 403
        assert (await b3.get("/ecc")).status == 403


async def test_a_session_ends_with_the_user_or_its_password(
    inst: Instance, http: aiohttp.ClientSession
) -> None:
    user = await auth.create_user(inst.store, "ops", USER_PW, roles=["discovery_admin"])
    b = await signed_in(inst, http, "ops")
    assert (await b.get("/agents")).status == 200
    new_hash = auth.hash_password("another-pass-123")
    await inst.store.update("sys_user", user["sys_id"], {"user_password": new_hash})
    assert (await b.get("/agents")).status == 303  # a new password ends old sessions

    await inst.store.update(
        "sys_user", user["sys_id"], {"user_password": auth.hash_password(USER_PW)}
    )
    b = await signed_in(inst, http, "ops")
    assert (await b.get("/agents")).status == 200
    await inst.store.update("sys_user", user["sys_id"], {"active": False})
    assert (await b.get("/agents")).status == 303
    refused = await b.sign_in("ops", USER_PW)
    assert refused.status == 401  # inactive: no new session either

    await inst.store.update("sys_user", user["sys_id"], {"active": True})
    b = await signed_in(inst, http, "ops")
    await inst.store.update("sys_user", user["sys_id"], {"web_service_access_only": True})
    assert (await b.get("/agents")).status == 303


async def test_sessions_expire(tmp_path: Path, http: aiohttp.ClientSession) -> None:
    settings = DashboardSettings(session_idle=0.3, session_lifetime=60, login_form_ttl=1)
    config = InstanceConfig(db=tmp_path / "i.db", admin_password=ADMIN_PW, dashboard=settings)
    async with Instance(config) as inst:
        # A sign-in form older than login_form_ttl is refused, its cookie kept or not.
        b = Browser(http, inst.url)
        form = await b.get("/login")
        nonce = b.cookie(LOGIN_COOKIE)
        await asyncio.sleep(2.1)
        body = {"user_name": "admin", "password": ADMIN_PW, CSRF_FIELD: form.token()}
        late = await b.post("/login", body, headers={"Cookie": f"{LOGIN_COOKIE}={nonce}"})
        assert late.status == 403
        assert b.cookie(SESSION_COOKIE) is None
        b = await signed_in(inst, http)
        assert (await b.get("/agents")).status == 200
        await asyncio.sleep(0.5)
        assert (await b.get("/agents")).status == 303
        assert inst.dashboard is not None
        assert len(inst.dashboard.sessions) == 0


def test_only_local_paths_after_sign_in() -> None:
    assert safe_next("/ecc?state=error&agent=a") == "/ecc?state=error&agent=a"
    for hostile in (
        None,
        "",
        "//evil.example/",
        "/\\evil.example",
        "https://evil.example/",
        "evil",
        "/login",
        "/logout",
        "/ok\r\nSet-Cookie: x=1",
        "/" + "a" * 600,
    ):
        assert safe_next(hostile) == "/", hostile


# --- CSRF -----------------------------------------------------------------------------------------


async def test_posts_need_the_sessions_csrf_token(
    inst: Instance, http: aiohttp.ClientSession
) -> None:
    await add_agent(inst)
    b = await signed_in(inst, http)
    page = await b.get("/agents")
    token = page.token()
    assert 'action="/agents/dc1/pause"' in page.text
    before = await inst.store.count("ecc_queue")
    for data in ({}, {CSRF_FIELD: ""}, {CSRF_FIELD: "forged-" + token[7:]}):
        refused = await b.post("/agents/dc1/pause", data)
        assert refused.status == 403, data
        assert "security token" in refused.text
    # The token of another session does not do either.
    other = aiohttp.ClientSession(cookie_jar=aiohttp.CookieJar(unsafe=True))
    async with other:
        other_token = (await (await signed_in(inst, other)).get("/agents")).token()
    assert other_token != token
    assert (await b.post("/agents/dc1/pause", {CSRF_FIELD: other_token})).status == 403
    assert await inst.store.count("ecc_queue") == before

    done = await b.post("/agents/dc1/pause", {CSRF_FIELD: token})
    assert (done.status, done.location) == (303, "/agents")
    [command] = await inst.store.query("ecc_queue", "topic=SystemCommand")
    assert command["name"] == "pause"
    assert command["agent"] == "mid.server.dc1"
    shown = await b.get("/agents")
    assert f"pause sent to dc1 (SystemCommand {command['sys_id']})." in shown.text
    assert "pause sent" not in (await b.get("/agents")).text  # a flash is shown once

    # validate needs a key the agent reported: the connector's refusal is shown, not a 500.
    refused = await b.post("/agents/dc1/validate", {CSRF_FIELD: token})
    assert refused.status == 303
    assert "has reported no usable public key yet" in (await b.get("/agents")).text
    unknown = await b.post("/agents/dc1/explode", {CSRF_FIELD: token})
    assert unknown.status == 400


# --- pages and escaping ---------------------------------------------------------------------


async def test_hostile_record_content_is_shown_escaped(
    inst: Instance, http: aiohttp.ClientSession
) -> None:
    await add_agent(inst, name="evil", host=HOSTILE, capabilities=f"Echo,{HOSTILE_ATTR}")
    record = await inst.store.insert(
        "ecc_queue",
        {
            "agent": "mid.server.evil",
            "queue": "input",
            "topic": HOSTILE_ATTR,
            "name": HOSTILE,
            "error_string": HOSTILE,
            "payload": {"output": HOSTILE, "nested": {"a": [1, HOSTILE_ATTR]}},
        },
    )
    await inst.store.insert(
        "cmdb_ci",
        {"name": HOSTILE, "sys_class_name": "cmdb_ci_linux_server", "ip_address": HOSTILE_ATTR},
    )
    b = await signed_in(inst, http)
    pages = [
        await b.get("/agents"),
        await b.get("/ecc"),
        await b.get("/ecc?topic=" + quote(HOSTILE_ATTR, safe="")),
        await b.get(f"/ecc/{record['sys_id']}"),
        await b.get("/cmdb"),
    ]
    for page in pages:
        assert page.status == 200, page.text
        assert "<script>alert" not in page.text
        assert "<img src=x" not in page.text
        assert "&lt;script&gt;alert(&#39;x&#39;)&lt;/script&gt;" in page.text
    detail = pages[3].text
    pretty = pretty_payload(record["payload"])
    assert '\n  "output": ' in pretty  # indented JSON
    escaped = pretty.replace("&", "&amp;").replace("<", "&lt;").replace(">", "&gt;")
    escaped = escaped.replace('"', "&#34;").replace("'", "&#39;")
    assert f'<pre class="payload" id="payload">{escaped}</pre>' in detail
    filtered = pages[2].text
    assert filtered.count("<tr>") == 2  # the header row and the one record


async def test_ecc_filters_latest_first_and_a_record(
    inst: Instance, http: aiohttp.ClientSession
) -> None:
    await add_agent(inst, name="a")
    await add_agent(inst, name="b")
    outputs = []
    for i in range(6):
        outputs.append(
            await inst.store.insert(
                "ecc_queue",
                {
                    "agent": f"mid.server.{'a' if i % 2 else 'b'}",
                    "queue": "output",
                    "topic": "Echo" if i < 4 else "Shazzam",
                    "name": f"job-{i}",
                    "state": "error" if i == 5 else "processed",
                    "error_string": "boom" if i == 5 else "",
                    "payload": '<parameters><parameter name="x" value="1"/></parameters>',
                },
            )
        )
    answer = await inst.store.insert(
        "ecc_queue",
        {
            "agent": "mid.server.a",
            "queue": "input",
            "topic": "Echo",
            "name": "job-1",
            "response_to": outputs[1]["sys_id"],
            "sequence": 0,
            "complete": True,
            "payload": '{"message":"hi"}',
        },
    )
    b = await signed_in(inst, http)

    def names(text: str) -> list[str]:
        return re.findall(r"<td>(job-\d)</td>", text)

    everything = await b.get("/ecc")
    assert names(everything.text) == ["job-1", "job-5", "job-4", "job-3", "job-2", "job-1", "job-0"]
    assert "7 latest of 7 records" in everything.text
    assert names((await b.get("/ecc?agent=a&queue=output")).text) == ["job-5", "job-3", "job-1"]
    assert names((await b.get("/ecc?agent=mid.server.b")).text) == ["job-4", "job-2", "job-0"]
    assert names((await b.get("/ecc?state=error")).text) == ["job-5"]
    assert names((await b.get("/ecc?topic=Shazzam&agent=b")).text) == ["job-4"]
    assert names((await b.get("/ecc?queue=input")).text) == ["job-1"]
    assert names((await b.get("/ecc?limit=2")).text) == ["job-1", "job-5"]
    assert names((await b.get("/ecc?state=nonsense&queue=x")).text) == names(everything.text)
    assert 'value="b" selected' in (await b.get("/ecc?agent=b")).text

    output = await b.get(f"/ecc/{outputs[1]['sys_id']}")
    assert output.status == 200
    assert "&lt;parameters&gt;&lt;parameter name=&#34;x&#34;" in output.text  # XML as it is
    assert f'href="/ecc/{answer["sys_id"]}"' in output.text  # its answers
    shown = await b.get(f"/ecc/{answer['sys_id']}")
    assert f'<a href="/ecc/{outputs[1]["sys_id"]}">' in shown.text  # the output it answers
    assert '"message": "hi"' in shown.text.replace("&#34;", '"')
    missing = await b.get("/ecc/no-such-record")
    assert missing.status == 404


async def test_inputs_show_processed_once_their_output_is_closed(
    inst: Instance, http: aiohttp.ClientSession
) -> None:
    """Inputs are stored ``ready``; as ServiceNow shows them, one is ``processed`` once the
    instance has handled it (the output it answers is closed), ``ready`` until then."""
    await add_agent(inst, name="a")
    out = await inst.store.insert(
        "ecc_queue",
        {"agent": "mid.server.a", "queue": "output", "topic": "Echo", "state": "processing"},
    )
    answer = await inst.store.insert(
        "ecc_queue",
        {"agent": "mid.server.a", "queue": "input", "topic": "Echo", "name": "in-1",
         "response_to": out["sys_id"], "sequence": 0, "complete": False},
    )  # fmt: skip
    assert answer["state"] == "ready"
    b = await signed_in(inst, http)

    def input_badge(text: str) -> str:
        row = text.split("<td>in-1</td>")[1].split("</tr>")[0]
        found = re.search(r'<span class="badge (\w+)">(\w+)</span>', row)
        assert found, row
        return f"{found[1]} {found[2]}"

    assert input_badge((await b.get("/ecc?queue=input")).text) == "warn ready"
    await inst.store.update("ecc_queue", out["sys_id"], {"state": "processed"})
    assert input_badge((await b.get("/ecc?queue=input")).text) == "ok processed"
    record = (await b.get(f"/ecc/{answer['sys_id']}")).text
    assert re.search(r"<tr><th>state</th><td>\s*processed\s*</td></tr>", record), record
    assert re.search(r"<th>sys_created_on</th><td>\s*\d{4}-\d\d-\d\d [\d:]{8} UTC", record)


async def test_agents_page_shows_status_validation_lanes(
    inst: Instance, http: aiohttp.ClientSession
) -> None:
    await add_agent(inst, name="dc1", validated=True, fingerprint="ab" * 32)
    await add_agent(inst, name="dc2", status="Down", capabilities="", stats="")
    b = await signed_in(inst, http)
    page = await b.get("/agents")
    assert page.status == 200
    dc1 = page.text.split('data-agent="dc1"')[1].split("</tr>")[0]
    assert '<span class="badge ok" data-field="status">Up</span>' in dc1
    assert '<span class="badge ok">validated</span>' in dc1
    assert "abababababababab…" in dc1
    assert "<small>standard 2/5</small>" in dc1
    assert "in flight 2" in dc1
    assert '<span class="tag">Shazzam</span>' in dc1
    assert "2026-01-02 03:04:05 UTC" in dc1  # stored in UTC, shown with its zone

    def actions(row: str) -> list[str]:
        return re.findall(r'action="/agents/[^/"]+/(\w+)"', row)

    # Only what makes sense in the agent's state: validated and Up.
    assert actions(dc1) == ["invalidate", "pause", "drain"]
    dc2 = page.text.split('data-agent="dc2"')[1].split("</tr>")[0]
    assert '<span class="badge bad" data-field="status">Down</span>' in dc2
    assert "not validated" in dc2
    assert actions(dc2) == ["validate"]  # nothing to send a Down agent but validation
    await add_agent(inst, name="dc3", status="Paused")
    await add_agent(inst, name="dc4", status="Drained", validated=True)
    page = await b.get("/agents")
    dc3 = page.text.split('data-agent="dc3"')[1].split("</tr>")[0]
    assert actions(dc3) == ["validate", "resume", "drain"]
    dc4 = page.text.split('data-agent="dc4"')[1].split("</tr>")[0]
    assert actions(dc4) == ["invalidate", "resume"]
    assert age_text("2026-01-02 03:04:05", now=1767323045 + 90) == "90 s ago"


async def test_discovery_page_runs_and_progress_json(
    inst: Instance, http: aiohttp.ClientSession
) -> None:
    schedule = await inst.store.insert(
        "discovery_schedule", {"name": "lab", "ranges": "127.0.0.1/32", "agent": "dc1"}
    )
    await inst.store.insert(
        "discovery_status", {"name": "old", "schedule": schedule["sys_id"], "state": "Completed",
                             "progress": 100.0},
    )  # fmt: skip
    started: list[str] = []

    async def start_run(schedule_id: str) -> str:
        if started:
            raise ValueError("a run of this schedule is already in progress")
        started.append(schedule_id)
        row = await inst.store.insert(
            "discovery_status",
            {"name": "lab run", "schedule": schedule_id, "state": "Scanning", "progress": 12.5,
             "addresses": 1, "scanned": 0},
        )  # fmt: skip
        return str(row["sys_id"])

    assert inst.dashboard is not None
    b = await signed_in(inst, http)
    inst.dashboard.set_start_run(None)
    page = await b.get("/discovery")
    assert "data-run-schedule" not in page.text  # no engine: no Run button
    assert "No discovery engine runs in this instance" in page.text
    refused = await b.post(f"/discovery/{schedule['sys_id']}/run", {CSRF_FIELD: page.token()})
    assert refused.status == 503

    inst.dashboard.set_start_run(start_run)
    page = await b.get("/discovery")
    assert 'data-run-schedule="lab"' in page.text
    assert (await b.post(f"/discovery/{schedule['sys_id']}/run", {})).status == 403
    assert started == []
    go = await b.post(f"/discovery/{schedule['sys_id']}/run", {CSRF_FIELD: page.token()})
    assert (go.status, go.location) == (303, "/discovery")
    assert started == [schedule["sys_id"]]
    page = await b.get("/discovery")
    assert "Discovery lab started (run " in page.text
    rows = re.findall(r'<tr data-run="([^"]+)">', page.text)
    assert len(rows) == 2  # newest first
    assert '<progress max="100" value="12">' in page.text  # whole percent
    assert '<progress max="100" value="100">' in page.text
    again = await b.post(f"/discovery/{schedule['sys_id']}/run", {CSRF_FIELD: page.token()})
    assert again.status == 303
    assert "already in progress" in (await b.get("/discovery")).text
    assert (await b.post("/discovery/nope/run", {CSRF_FIELD: page.token()})).status == 404

    polled = await b.get("/discovery/runs.json", headers={"Accept": "application/json"})
    assert polled.status == 200
    data = orjson.loads(polled.text)
    assert [r["sys_id"] for r in data["runs"]] == rows
    assert data["runs"][0]["state"] == "Scanning"
    assert data["runs"][0]["final"] is False
    assert data["runs"][1]["final"] is True
    assert data["cis"] == 0
    # The live page: the script is served (no inline script: the CSP forbids it).
    script = await b.get("/static/dashboard.js")
    assert script.status == 200
    assert script.headers["Content-Type"].startswith("text/javascript")
    assert "textContent" in script.text
    assert "innerHTML" not in script.text
    assert "<script>" not in page.text
    assert (await b.get("/static/nothing.js")).status == 404


async def test_cmdb_page_groups_cis_by_class(inst: Instance, http: aiohttp.ClientSession) -> None:
    for name, cls, ip in (
        ("web1", "cmdb_ci_linux_server", "10.0.0.2"),
        ("web0", "cmdb_ci_linux_server", "10.0.0.1"),
        ("sw1", "cmdb_ci_netgear", "10.0.0.3"),
        ("10.0.0.9", "cmdb_ci_ip_address", "10.0.0.9"),
    ):
        await inst.store.insert(
            "cmdb_ci",
            {"name": name, "sys_class_name": cls, "ip_address": ip,
             "last_discovered": "2026-01-02 03:04:05",
             "mac_address": "00:11:22:33:44:01,00:11:22:33:44:02" if name == "sw1" else ""},
        )  # fmt: skip
    b = await signed_in(inst, http)
    page = await b.get("/cmdb")
    assert page.status == 200
    assert "4 CIs." in page.text
    assert "2026-01-02 03:04:05 UTC" in page.text
    # One MAC a line (the column wraps; docs/dashboard.md).
    assert "<br>00:11:22:33:44:01<br>00:11:22:33:44:02</td>" in page.text
    classes = re.findall(
        r'<a href="/cmdb\?class=([a-z_]+)"[^>]*>[a-z_]+</a> <small>\((\d+)\)', page.text
    )
    assert classes == [
        ("cmdb_ci_ip_address", "1"),
        ("cmdb_ci_linux_server", "2"),
        ("cmdb_ci_netgear", "1"),
    ]
    assert page.text.index(">web0<") < page.text.index(">web1<")
    assert 'http-equiv="refresh"' not in page.text  # no run in progress
    linux = await b.get("/cmdb?class=cmdb_ci_linux_server")
    assert "2 CIs." in linux.text
    assert ">sw1<" not in linux.text
    assert "1 CI." in (await b.get("/cmdb?class=cmdb_ci_netgear")).text
    await inst.store.insert("discovery_status", {"name": "r", "state": "Classifying"})
    assert 'http-equiv="refresh"' in (await b.get("/cmdb")).text


async def test_api_clients_keep_the_basic_page_at_root(
    inst: Instance, http: aiohttp.ClientSession, tmp_path: Path
) -> None:
    async with http.get(
        inst.url + "/", headers={"Authorization": basic("admin", ADMIN_PW)}
    ) as resp:
        assert resp.status == 200
        assert "Signed in as <b>admin</b>" in await resp.text()
    async with http.get(inst.url + "/", allow_redirects=False) as resp:  # Accept: */*
        assert resp.status == 401
        assert resp.headers["WWW-Authenticate"] == 'Basic realm="midbridge"'
    async with http.get(
        inst.url + "/", headers={"Accept": "text/html"}, allow_redirects=False
    ) as resp:
        assert resp.status == 303
    config = InstanceConfig(db=tmp_path / "off.db", admin_password=ADMIN_PW, dashboard=None)
    async with Instance(config) as off:
        assert off.dashboard is None
        async with http.get(off.url + "/", headers={"Accept": "text/html"}) as resp:
            assert resp.status == 401  # no dashboard: the Basic page at /
        async with http.get(off.url + "/login") as resp:
            assert resp.status == 404


def test_templates_ship_in_the_wheel() -> None:
    """Every template and static file matches the package-data globs of pyproject.toml."""
    data = tomllib.loads((REPO / "pyproject.toml").read_text())
    globs = data["tool"]["setuptools"]["package-data"]["bridge"]
    files = [
        p.relative_to(REPO / "bridge").as_posix()
        for p in (REPO / "bridge" / "instance" / "templates").rglob("*")
        if p.is_file()
    ]
    assert "instance/templates/static/dashboard.js" in files
    unshipped = [f for f in files if not any(PurePosixPath(f).match(g) for g in globs)]
    assert not unshipped, unshipped
