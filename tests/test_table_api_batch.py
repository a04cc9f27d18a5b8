"""ServiceNow's Batch API (docs: "Batch API"): POST /api/now/v1/batch runs each
sub-request, in order, as the batch's user, through the same handlers and middlewares as a
request of its own. Mixed methods, sub-request errors, inherited authorization, limits,
and what an attacker tries through it. Real HTTP, real instance."""

from __future__ import annotations

import base64
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import orjson
import pytest

from bridge.instance.server import Instance
from tests.table_api_client import ADMIN_PW, TABLE, Client, basic, output, serve, user

pytestmark = pytest.mark.timeout(60)

BATCH = "/api/now/v1/batch"
JSON = [
    {"name": "Content-Type", "value": "application/json"},
    {"name": "Accept", "value": "application/json"},
]


@pytest.fixture
async def served(tmp_path: Path) -> AsyncIterator[tuple[Instance, Client]]:
    async with serve(tmp_path, batch_max_requests=20) as pair:
        yield pair


def item(sub_id: str, method: str, url: str, body: Any = None, **extra: Any) -> dict[str, Any]:
    request: dict[str, Any] = {"id": sub_id, "method": method, "url": url, "headers": JSON}
    if body is not None:
        request["body"] = base64.b64encode(orjson.dumps(body)).decode()
    return {**request, **extra}


def decoded(serviced: dict[str, Any]) -> Any:
    raw = base64.b64decode(serviced["body"])
    return orjson.loads(raw) if raw else None


def by_id(reply: Any) -> dict[str, dict[str, Any]]:
    return {s["id"]: s for s in reply.body["serviced_requests"]}


async def test_mixed_methods_in_order(served: tuple[Instance, Client]) -> None:
    inst, client = served
    existing = await output(inst, name="old")
    one = f"{TABLE}/ecc_queue/{existing['sys_id']}"
    batch = {
        "batch_request_id": 7,
        "enforce_order": True,
        "rest_requests": [
            item("c", "POST", f"{TABLE}/ecc_queue", {"queue": "output", "name": "new"}),
            item("u", "PATCH", one, {"state": "processed"}),
            item("l", "GET", f"{TABLE}/ecc_queue?sysparm_query=ORDERBYname&sysparm_fields=name"),
            item("s", "GET", "/api/now/stats/ecc_queue?sysparm_count=true"),
            item("d", "DELETE", one, exclude_response_headers=True),
            item("g", "GET", one),
        ],
    }
    reply = await client.post(BATCH, batch)
    assert reply.status == 200, reply.text
    assert reply.body["batch_request_id"] == "7"
    assert reply.body["unserviced_requests"] == []
    assert [s["id"] for s in reply.body["serviced_requests"]] == ["c", "u", "l", "s", "d", "g"]
    served_ = by_id(reply)
    created = served_["c"]
    assert (created["status_code"], created["status_text"]) == (201, "Created")
    assert decoded(created)["result"]["sys_created_by"] == "admin"
    headers = {h["name"]: h["value"] for h in created["headers"]}
    assert headers["Location"].startswith(f"{client.url}{TABLE}/ecc_queue/")
    assert headers["Content-Type"].startswith("application/json")
    assert isinstance(created["execution_time"], int)
    assert decoded(served_["u"])["result"]["state"] == "processed"
    assert decoded(served_["l"])["result"] == [{"name": "new"}, {"name": "old"}]
    assert decoded(served_["s"])["result"]["stats"]["count"] == "2"
    assert (served_["d"]["status_code"], served_["d"]["headers"], served_["d"]["body"]) == (
        204,
        [],
        "",
    )
    missing = served_["g"]
    assert missing["status_code"] == 404
    assert decoded(missing)["error"]["message"] == "No Record found"
    assert [r["name"] for r in await inst.store.query("ecc_queue")] == ["new"]
    unversioned = await client.post("/api/now/batch", {"rest_requests": []})
    assert unversioned.body == {
        "batch_request_id": "",
        "serviced_requests": [],
        "unserviced_requests": [],
    }


async def test_sub_request_errors_stay_in_their_item(served: tuple[Instance, Client]) -> None:
    _inst, client = served
    xml = [{"name": "Accept", "value": "application/xml"}]
    batch = {
        "batch_request_id": "b",
        "rest_requests": [
            item("bad-query", "GET", f"{TABLE}/ecc_queue?sysparm_query=stateFOO"),
            item("no-table", "GET", f"{TABLE}/no_such_table"),
            item("bad-json", "POST", f"{TABLE}/ecc_queue") | {"body": "bm90IGpzb24="},
            item("xml", "GET", f"{TABLE}/ecc_queue/nope", headers=xml),
            item("405", "DELETE", f"{TABLE}/ecc_queue"),
            item("ok", "GET", f"{TABLE}/ecc_queue"),
        ],
    }
    reply = await client.post(BATCH, batch)
    assert reply.status == 200, reply.text
    items = by_id(reply)
    assert items["bad-query"]["status_code"] == 400
    assert "sysparm_query" in decoded(items["bad-query"])["error"]["message"]
    assert items["no-table"]["status_code"] == 400
    assert items["bad-json"]["status_code"] == 400
    assert base64.b64decode(items["xml"]["body"]).startswith(b"<?xml")
    assert items["405"]["status_code"] == 405
    assert items["ok"]["status_code"] == 200


async def test_sub_requests_run_as_the_batch_user_only(served: tuple[Instance, Client]) -> None:
    """A mid_server account batches reads of sys_user and of another agent's outputs, with
    the admin's credentials (or a cookie, another Host, a forwarded address) in the
    sub-request's own headers: every sub-request runs as the mid_server account."""
    inst, client = served
    await user(inst, "mid", "mid_server", mid_agents=["a"])
    mine = await output(inst, "a")
    theirs = await output(inst, "b", payload="secret of b")
    stolen = [
        {"name": "Authorization", "value": basic("admin", ADMIN_PW)},
        {"name": "Cookie", "value": "midbridge_session=x"},
        {"name": "Host", "value": "evil.example"},
        {"name": "X-Forwarded-For", "value": "10.9.9.9"},
    ]
    batch = {
        "rest_requests": [
            item("users", "GET", f"{TABLE}/sys_user", headers=stolen),
            item("theirs", "GET", f"{TABLE}/ecc_queue/{theirs['sys_id']}", headers=stolen),
            item("all", "GET", f"{TABLE}/ecc_queue", headers=stolen),
            item("mine", "GET", f"{TABLE}/ecc_queue/{mine['sys_id']}", headers=stolen),
            item("grant", "POST", f"{TABLE}/sys_user_has_role", {"user": "mid", "role": "admin"}),
        ]
    }
    reply = await client.post(BATCH, batch, user="mid")
    assert reply.status == 200, reply.text
    items = by_id(reply)
    assert items["users"]["status_code"] == 403
    assert items["theirs"]["status_code"] == 404
    assert [r["sys_id"] for r in decoded(items["all"])["result"]] == [mine["sys_id"]]
    assert items["mine"]["status_code"] == 200
    assert items["grant"]["status_code"] == 403
    assert "secret of b" not in str([decoded(i) for i in items.values()])
    assert await inst.store.count("sys_user_has_role", "role.name=admin") == 1  # admin's own
    assert (await client.post(BATCH, batch, user=None)).status == 401
    assert (await client.post(BATCH, batch, user="mid", password="wrong-pw-12")).status == 401


async def test_refused_urls_batches_in_batches_and_limits(
    served: tuple[Instance, Client],
) -> None:
    inst, client = served
    inner = {"rest_requests": [item("x", "GET", f"{TABLE}/ecc_queue")]}
    urls = {
        "nested": ("POST", BATCH, inner),
        "nested-plain": ("POST", "/api/now/batch", inner),
        "page": ("GET", "/login", None),
        "dots": ("GET", "/api/../login", None),
        "double": ("GET", "/api//now/table/ecc_queue", None),
        "relative": ("GET", "api/now/table/ecc_queue", None),
    }
    batch = {"rest_requests": [item(k, m, u, b) for k, (m, u, b) in urls.items()]}
    reply = await client.post(BATCH, batch)
    assert reply.status == 200, reply.text
    for sub_id, served_ in by_id(reply).items():
        assert served_["status_code"] == 400, (sub_id, decoded(served_))
    assert await inst.store.count("ecc_queue") == 0

    too_many = {"rest_requests": [item(str(i), "GET", f"{TABLE}/ecc_queue") for i in range(21)]}
    assert "at most 20 requests" in (await client.post(BATCH, too_many)).fault(400)
    for bad, words in [
        ({"rest_requests": "x"}, "rest_requests"),
        ({"rest_requests": [{"method": "GET", "url": "/api/now/table/x"}]}, "rest_requests[0].id"),
        ({"rest_requests": [item("1", "TRACE", "/api/now/table/x")]}, "rest_requests[0].method"),
        ({"rest_requests": [item("1", "POST", "/api/x") | {"body": "!!"}]}, "].body"),
        ({"rest_requests": [item("1", "GET", "/api/x", headers=[{"name": "a b"}])]}, "headers"),
    ]:
        assert words in (await client.post(BATCH, bad)).fault(400), bad
    form = await client.call("POST", BATCH, data=b"x=1", headers={"Content-Type": "text/plain"})
    assert form.status == 415
    foreign = await client.post(BATCH, inner, headers={"Origin": "https://evil.example"})
    assert "Cross-origin request refused" in foreign.fault(403)


async def test_output_and_time_limits_leave_requests_unserviced(tmp_path: Path) -> None:
    async with serve(tmp_path, batch_max_output_bytes=3000) as (inst, client):
        for i in range(5):
            await output(inst, name=f"n{i}", payload="x" * 500)
        reads = [item(f"r{i}", "GET", f"{TABLE}/ecc_queue?sysparm_limit=2") for i in range(4)]
        reply = await client.post(BATCH, {"rest_requests": reads})
        assert reply.status == 200
        serviced = [s["id"] for s in reply.body["serviced_requests"]]
        assert 1 <= len(serviced) < 4
        assert reply.body["unserviced_requests"] == [f"r{i}" for i in range(len(serviced), 4)]
    async with serve(tmp_path / "slow", batch_timeout=0.0) as (inst, client):
        write = item("w", "POST", f"{TABLE}/ecc_queue", {"queue": "output"})
        reply = await client.post(BATCH, {"rest_requests": [write]})
        assert reply.body["unserviced_requests"] == ["w"]
        assert await inst.store.count("ecc_queue") == 0
