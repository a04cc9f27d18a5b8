"""A real HTTP client for the built-in instance's REST APIs (the tests/test_table_api_*.py
modules): a real ``Instance`` (SQLite in tmp_path, a free port on loopback) and aiohttp's
client; nothing is mocked."""

from __future__ import annotations

import base64
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiohttp
import orjson
from yarl import URL

from bridge.instance import auth
from bridge.instance.api import ApiSettings
from bridge.instance.server import Instance, InstanceConfig

TABLE = "/api/now/table"
ADMIN_PW = "admin-pass-123"
USER_PW = "user-pass-1234"


@dataclass
class Reply:
    status: int
    body: Any
    headers: Any
    text: str
    raw: bytes

    @property
    def result(self) -> Any:
        assert isinstance(self.body, dict), (self.status, self.text)
        return self.body["result"]

    def error(self, status: int) -> tuple[str, str]:
        """Assert a ServiceNow-shaped error with ``status``; (message, detail)."""
        assert self.status == status, (self.status, self.text)
        assert isinstance(self.body, dict), self.text
        assert self.body["status"] == "failure", self.text
        assert set(self.body["error"]) == {"message", "detail"}, self.text
        return self.body["error"]["message"], self.body["error"]["detail"]

    def fault(self, status: int) -> str:
        message, detail = self.error(status)
        return f"{message}: {detail}"


def basic(user: str, password: str) -> str:
    return "Basic " + base64.b64encode(f"{user}:{password}".encode()).decode()


class Client:
    def __init__(self, http: aiohttp.ClientSession, url: str) -> None:
        self.http = http
        self.url = url

    async def call(
        self,
        method: str,
        path: str,
        *,
        user: str | None = "admin",
        password: str | None = None,
        json: Any = None,
        data: Any = None,
        headers: dict[str, str] | None = None,
        params: Any = None,
        raw_query: str | None = None,
    ) -> Reply:
        headers = dict(headers or {})
        if user is not None:
            secret = (
                password if password is not None else (ADMIN_PW if user == "admin" else USER_PW)
            )
            headers["Authorization"] = basic(user, secret)
        url: str | URL = self.url + path
        if raw_query is not None:  # sent as it is (``^`` not %-encoded), as curl sends it
            url = URL(f"{self.url}{path}?{raw_query}", encoded=True)
        async with self.http.request(  # a redirect is an answer to check, not to follow
            method, url, json=json, data=data, headers=headers, params=params,
            allow_redirects=False,
        ) as resp:  # fmt: skip
            raw = await resp.read()
            text = raw.decode("utf-8", "replace")
            body = orjson.loads(raw) if resp.content_type == "application/json" and raw else None
            return Reply(resp.status, body, resp.headers, text, raw)

    async def get(self, path: str, **kw: Any) -> Reply:
        return await self.call("GET", path, **kw)

    async def post(self, path: str, json: Any, **kw: Any) -> Reply:
        return await self.call("POST", path, json=json, **kw)

    async def patch(self, path: str, json: Any, **kw: Any) -> Reply:
        return await self.call("PATCH", path, json=json, **kw)

    async def delete(self, path: str, **kw: Any) -> Reply:
        return await self.call("DELETE", path, **kw)


@asynccontextmanager
async def serve(tmp_path: Path, **api: Any) -> AsyncIterator[tuple[Instance, Client]]:
    """A running instance (``ApiSettings(**api)``) and a client for it."""
    config = InstanceConfig(
        db=tmp_path / "instance.db", admin_password=ADMIN_PW, api=ApiSettings(**api)
    )
    timeout = aiohttp.ClientTimeout(total=20)
    async with Instance(config) as inst, aiohttp.ClientSession(timeout=timeout) as http:
        yield inst, Client(http, inst.url)


async def user(inst: Instance, name: str, *roles: str, **kw: Any) -> dict[str, Any]:
    record: dict[str, Any] = await auth.create_user(inst.store, name, USER_PW, roles=roles, **kw)
    return record


async def output(inst: Instance, agent: str = "a", **fields: Any) -> dict[str, Any]:
    row = {"agent": f"mid.server.{agent}", "queue": "output", "topic": "Echo", **fields}
    record: dict[str, Any] = await inst.store.insert("ecc_queue", row)
    return record
