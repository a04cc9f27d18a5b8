"""The Attachment API, ecc_agent's ServiceNow fields and ecc_agent_property, over HTTP.

Written as an attacker with a MID's account would try them: attach to another agent's
input, to an output, to an agent record; read another agent's attachment; write another
agent's ecc_agent record, or fields a MID may not write; read another MID's properties.
"""

from __future__ import annotations

import hashlib
import io
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiohttp
import orjson

from bridge.instance import auth
from bridge.instance.server import Instance, InstanceConfig
from tests.test_connector import ADMIN_PASSWORD, MID_PASSWORD, basic

OTHER_PASSWORD = MID_PASSWORD + "-other"


@dataclass
class Site:
    inst: Instance
    http: aiohttp.ClientSession

    async def call(
        self, user: str, password: str, method: str, path: str, body: Any = None,
        *, data: bytes | None = None, content_type: str = "application/json",
    ) -> tuple[int, Any]:  # fmt: skip
        headers = {"Authorization": basic(user, password), "Accept": "application/json"}
        if body is not None:
            data = orjson.dumps(body)
        if data is not None:
            headers["Content-Type"] = content_type
        sent = io.BytesIO(data) if data is not None and len(data) > 1_000_000 else data
        async with self.http.request(
            method, self.inst.url + path, data=sent, headers=headers
        ) as response:
            raw = await response.read()
            try:
                return response.status, orjson.loads(raw) if raw else None
            except orjson.JSONDecodeError:
                return response.status, raw

    async def admin(self, method: str, path: str, body: Any = None) -> Any:
        status, answer = await self.call("admin", ADMIN_PASSWORD, method, path, body)
        assert status < 300, answer
        return answer["result"] if isinstance(answer, dict) else answer

    async def mid(self, method: str, path: str, body: Any = None, **kw: Any) -> tuple[int, Any]:
        return await self.call("mid.a", MID_PASSWORD, method, path, body, **kw)

    async def attach(self, sys_id: str, content: bytes, *, table: str = "ecc_queue",
                     name: str = "payload.xml", user: str = "mid.a",
                     password: str = MID_PASSWORD) -> tuple[int, Any]:  # fmt: skip
        path = f"/api/now/attachment/file?table_name={table}&table_sys_id={sys_id}&file_name={name}"
        return await self.call(user, password, "POST", path, data=content,
                               content_type="application/xml")  # fmt: skip


@asynccontextmanager
async def site(tmp_path: Path) -> AsyncIterator[Site]:
    inst = Instance(InstanceConfig(db=tmp_path / "i.sqlite3", admin_password=ADMIN_PASSWORD))
    async with aiohttp.ClientSession() as http, inst:
        await auth.create_user(inst.store, "mid.a", MID_PASSWORD, roles=["mid_server"],
                               web_service_access_only=True, mid_agents=["a"])  # fmt: skip
        await auth.create_user(inst.store, "mid.b", OTHER_PASSWORD, roles=["mid_server"],
                               web_service_access_only=True, mid_agents=["b"])  # fmt: skip
        yield Site(inst, http)


async def _ecc(s: Site, agent: str, queue: str, **fields: Any) -> str:
    row = await s.inst.store.insert(
        "ecc_queue",
        {"agent": f"mid.server.{agent}", "topic": "Echo", "queue": queue, "payload": "<x/>",
         **fields},
    )  # fmt: skip
    return str(row["sys_id"])


async def test_a_mid_attaches_to_its_own_input_and_reads_it_back(tmp_path: Path) -> None:
    async with site(tmp_path) as s:
        own = await _ecc(s, "a", "input", payload="<see_attachment/>")
        content = b"<results><result>" + b"x" * 700_000 + b"</result></results>"
        status, answer = await s.attach(own, content)
        assert status == 201, answer
        meta = answer["result"]
        assert meta["size_bytes"] == str(len(content))
        assert meta["hash"] == hashlib.sha256(content).hexdigest()
        assert (meta["table_name"], meta["table_sys_id"]) == ("ecc_queue", own)
        assert "content" not in meta
        status, raw = await s.mid("GET", f"/api/now/attachment/{meta['sys_id']}/file")
        assert (status, raw) == (200, content)
        status, listed = await s.mid("GET", f"/api/now/attachment?sysparm_query=table_sys_id={own}")
        assert [row["sys_id"] for row in listed["result"]] == [meta["sys_id"]]
        # The Table API never hands the content out, not even to admin.
        row = await s.admin("GET", f"/api/now/table/sys_attachment/{meta['sys_id']}")
        assert "content" not in row
        assert row["file_name"] == "payload.xml"
        status, _ = await s.mid("DELETE", f"/api/now/attachment/{meta['sys_id']}")
        assert status == 204
        assert await s.inst.store.count("sys_attachment") == 0


async def test_attacks_on_attachments(tmp_path: Path) -> None:
    async with site(tmp_path) as s:
        theirs = await _ecc(s, "b", "input")
        output = await _ecc(s, "a", "output", state="ready")
        agent = await s.inst.store.insert("ecc_agent", {"name": "a", "status": "Up"})
        own = await _ecc(s, "a", "input")

        # Another agent's input: not even its existence is told.
        status, answer = await s.attach(theirs, b"<evil/>")
        assert status == 404, answer
        # Its own agent's output (what the bridge would run), its agent record, a user.
        for table, sys_id in (("ecc_queue", output), ("ecc_agent", agent["sys_id"]),
                              ("sys_user", "whatever")):  # fmt: skip
            status, answer = await s.attach(sys_id, b"<evil/>", table=table)
            assert status == 403, (table, answer)
        # Names that are paths, control characters, missing parameters.
        for name in ("../../etc/passwd", "a/b.xml", "x\\y", "bad%0aname", "", "."):
            status, answer = await s.attach(own, b"<x/>", name=name)
            assert status == 400, (name, answer)
        status, answer = await s.mid(
            "POST",
            f"/api/now/attachment/file?table_sys_id={own}&file_name=a.xml",
            data=b"x",
            content_type="text/plain",
        )
        assert status == 400
        assert "table_name" in answer["error"]["message"]
        # Too large, and too many on one record.
        status, _ = await s.attach(own, b"x" * (32 * 1024 * 1024 + 1))
        assert status == 413
        for n in range(16):
            status, _ = await s.attach(own, b"<x/>", name=f"f{n}.xml")
            assert status == 201
        status, answer = await s.attach(own, b"<x/>", name="f17.xml")
        assert status == 403
        assert "Too many" in answer["error"]["message"]

        # Another MID's attachment: invisible, undeletable, unreadable.
        fresh = await _ecc(s, "a", "input")
        status, answer = await s.attach(fresh, b"<mine/>", name="payload.xml", user="admin",
                                        password=ADMIN_PASSWORD)  # fmt: skip
        assert status == 201
        mine = answer["result"]["sys_id"]
        bad = ("mid.b", OTHER_PASSWORD)
        for method, path in (("GET", f"/api/now/attachment/{mine}"),
                             ("GET", f"/api/now/attachment/{mine}/file"),
                             ("DELETE", f"/api/now/attachment/{mine}")):  # fmt: skip
            status, _ = await s.call(*bad, method, path)
            assert status == 404, (method, path)
        status, listed = await s.call(*bad, "GET", "/api/now/attachment")
        assert listed["result"] == []
        # Nor through the Table API.
        status, _ = await s.call(*bad, "GET", "/api/now/table/sys_attachment")
        assert status == 403
        # No authentication at all.
        async with s.http.get(s.inst.url + f"/api/now/attachment/{mine}/file") as response:
            assert response.status == 401


async def test_attacks_on_ecc_agent_fields_and_properties(tmp_path: Path) -> None:
    async with site(tmp_path) as s:
        a = await s.inst.store.insert("ecc_agent", {"name": "a", "status": "Up"})
        b = await s.inst.store.insert("ecc_agent", {"name": "b", "status": "Up"})
        fields = {"host_name": "h", "ip_address": "10.0.0.1", "url": "https://x",
                  "started": "2026-01-01 00:00:00", "stopped": "", "last_refreshed":
                  "2026-01-01 00:00:01", "status": "Up", "version": "v"}  # fmt: skip
        status, answer = await s.mid("PATCH", f"/api/now/table/ecc_agent/{a['sys_id']}", fields)
        assert status == 200, answer
        assert answer["result"]["ip_address"] == "10.0.0.1"
        # Another agent's record: not found (it cannot even see it), record unchanged.
        status, _ = await s.mid("PATCH", f"/api/now/table/ecc_agent/{b['sys_id']}",
                                {"status": "Down", "url": "https://evil"})  # fmt: skip
        assert status == 404
        assert (await s.inst.store.get("ecc_agent", b["sys_id"]))["status"] == "Up"  # type: ignore[index]
        # Fields a MID may not write on its own record, one at a time.
        for field, value in (("validated", True), ("public_key", "k"), ("fingerprint", "f"),
                             ("name", "b"), ("validation_request", "x")):  # fmt: skip
            status, answer = await s.mid("PATCH", f"/api/now/table/ecc_agent/{a['sys_id']}",
                                         {"url": "https://ok", field: value})  # fmt: skip
            assert status == 403, (field, answer)
        assert (await s.inst.store.get("ecc_agent", a["sys_id"]))["url"] == "https://x"  # type: ignore[index]
        # Creating a record for another agent.
        status, _ = await s.mid("POST", "/api/now/table/ecc_agent", {"name": "c", "status": "Up"})
        assert status == 403

        # Properties: every MID's and its own, never another MID's; never written by a MID.
        store = s.inst.store
        every = await store.insert("ecc_agent_property", {"name": "mid.poll.time", "value": "7"})
        await store.insert(
            "ecc_agent_property", {"name": "threads.max", "value": "3", "ecc_agent": a["sys_id"]}
        )
        other = await store.insert("ecc_agent_property", {"name": "secret.b", "value": "s",
                                                          "ecc_agent": b["sys_id"]})  # fmt: skip
        status, answer = await s.mid("GET", "/api/now/table/ecc_agent_property")
        assert status == 200, answer
        assert sorted(r["name"] for r in answer["result"]) == ["mid.poll.time", "threads.max"]
        query = "/api/now/table/ecc_agent_property?sysparm_query=nameSTARTSWITHsecret^ORname=x"
        status, answer = await s.mid("GET", query)
        assert answer["result"] == []
        status, _ = await s.mid("GET", f"/api/now/table/ecc_agent_property/{other['sys_id']}")
        assert status == 404
        status, _ = await s.mid("POST", "/api/now/table/ecc_agent_property",
                                {"name": "mid.poll.time", "value": "0"})  # fmt: skip
        assert status == 403
        status, _ = await s.mid("PATCH", f"/api/now/table/ecc_agent_property/{other['sys_id']}",
                                {"value": "0"})  # fmt: skip
        assert status == 404  # not even seen
        status, _ = await s.mid("PATCH", f"/api/now/table/ecc_agent_property/{every['sys_id']}",
                                {"value": "0"})  # fmt: skip
        assert status == 403
        assert [r["value"] for r in await store.query("ecc_agent_property", "value=0")] == []
