"""ServiceNow's Aggregate API (docs: "Aggregate API"): GET /api/now/stats/<table> with
count, group by, avg/min/max/sum, having, order by and display values; the Table API's
read access (roles, agent scope, write-only fields). Real HTTP, real instance."""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest

from bridge.instance import auth
from bridge.instance.server import Instance
from tests.table_api_client import Client, output, serve, user

pytestmark = pytest.mark.timeout(60)

STATS = "/api/now/stats"


@pytest.fixture
async def served(tmp_path: Path) -> AsyncIterator[tuple[Instance, Client]]:
    async with serve(tmp_path) as (inst, client):
        for agent, priority, attempts in [("a", 1, 0), ("a", 2, 3), ("a", 2, 5), ("b", 0, 1)]:
            await output(inst, agent, priority=priority, attempts=attempts, lease_until=1.5)
        yield inst, client


async def stats(
    client: Client, table: str = "ecc_queue", *, as_user: str = "admin", **params: str
) -> Any:
    reply = await client.get(f"{STATS}/{table}", params=params, user=as_user)
    assert reply.status == 200, reply.text
    return reply.result


async def test_count_and_statistics(served: tuple[Instance, Client]) -> None:
    _inst, client = served
    assert await stats(client, sysparm_count="true") == {"stats": {"count": "4"}}
    assert await stats(client, sysparm_count="true", sysparm_query="agent=mid.server.a") == {
        "stats": {"count": "3"}
    }
    assert await stats(client, sysparm_count="true", agent="mid.server.b") == {
        "stats": {"count": "1"}
    }
    result = await stats(
        client,
        sysparm_avg_fields="priority,attempts",
        sysparm_min_fields="priority,agent",
        sysparm_max_fields="priority,bogus",
        sysparm_sum_fields="attempts,lease_until",
    )
    assert result == {
        "stats": {
            "avg": {"priority": "1.2500", "attempts": "2.2500"},
            "min": {"priority": "0", "agent": "mid.server.a"},
            "max": {"priority": "2"},
            "sum": {"attempts": "9", "lease_until": "6.0000"},
        }
    }
    assert await stats(client) == {"stats": {}}
    versioned = await client.get("/api/now/v1/stats/ecc_queue", params={"sysparm_count": "true"})
    assert versioned.result == {"stats": {"count": "4"}}


async def test_group_by_having_and_order(served: tuple[Instance, Client]) -> None:
    _inst, client = served
    groups = await stats(
        client, sysparm_count="true", sysparm_group_by="agent", sysparm_avg_fields="priority"
    )
    assert groups == [
        {
            "stats": {"count": "3", "avg": {"priority": "1.6667"}},
            "groupby_fields": [{"field": "agent", "value": "mid.server.a"}],
        },
        {
            "stats": {"count": "1", "avg": {"priority": "0.0000"}},
            "groupby_fields": [{"field": "agent", "value": "mid.server.b"}],
        },
    ]
    having = await stats(
        client, sysparm_count="true", sysparm_group_by="agent", sysparm_having="count^agent^>^1"
    )
    assert [g["groupby_fields"][0]["value"] for g in having] == ["mid.server.a"]
    by_avg = await stats(
        client,
        sysparm_group_by="agent",
        sysparm_having="avg^priority^<^1",
        sysparm_count="true",
    )
    assert [g["groupby_fields"][0]["value"] for g in by_avg] == ["mid.server.b"]
    assert "avg" not in by_avg[0]["stats"]
    ordered = await stats(
        client,
        sysparm_count="true",
        sysparm_group_by="agent,priority",
        sysparm_order_by="COUNT^DESC",
    )
    assert ordered[0]["stats"]["count"] == "2"
    assert ordered[0]["groupby_fields"] == [
        {"field": "agent", "value": "mid.server.a"},
        {"field": "priority", "value": "2"},
    ]
    descending = await stats(
        client, sysparm_count="true", sysparm_group_by="agent", sysparm_order_by="agent^DESC"
    )
    assert [g["groupby_fields"][0]["value"] for g in descending] == ["mid.server.b", "mid.server.a"]


async def test_display_values_of_grouped_references(served: tuple[Instance, Client]) -> None:
    inst, client = served
    await user(inst, "fred", "itil", "mid_server")
    person = await auth.find_user(inst.store, "fred")
    assert person is not None
    shown = str(person[inst.store.schema["sys_user"].display_field])
    params = {"sysparm_count": "true", "sysparm_group_by": "user", "user": person["sys_id"]}
    plain = await stats(client, "sys_user_has_role", **params)
    assert plain == [
        {"stats": {"count": "2"}, "groupby_fields": [{"field": "user", "value": person["sys_id"]}]}
    ]
    both = await stats(client, "sys_user_has_role", **params, sysparm_display_value="all")
    assert both[0]["groupby_fields"] == [
        {"field": "user", "value": person["sys_id"], "display_value": shown}
    ]
    names = await stats(client, "sys_user_has_role", **params, sysparm_display_value="true")
    assert names[0]["groupby_fields"] == [{"field": "user", "value": shown}]


async def test_read_access_scope_and_write_only_fields(served: tuple[Instance, Client]) -> None:
    inst, client = served
    await user(inst, "mid", "mid_server", mid_agents=["b"])
    await user(inst, "fulfiller", "itil")
    assert await stats(client, sysparm_count="true", as_user="mid") == {"stats": {"count": "1"}}
    grouped = await stats(client, sysparm_count="true", sysparm_group_by="agent", as_user="mid")
    assert [g["groupby_fields"][0]["value"] for g in grouped] == ["mid.server.b"]
    refused = await client.get(f"{STATS}/ecc_queue", user="fulfiller")
    assert "requires role" in refused.fault(403)
    assert (await client.get(f"{STATS}/sys_user", user="mid")).status == 403
    assert (await client.get(f"{STATS}/ecc_queue", user=None)).status == 401
    hashes = await stats(
        client,
        "sys_user",
        sysparm_min_fields="user_password",
        sysparm_max_fields="user_password,user_name",
        sysparm_group_by="user_password",
    )
    assert "scrypt" not in str(hashes)
    assert hashes == {"stats": {"max": {"user_name": "mid"}}}


async def test_faults_name_the_parameter(served: tuple[Instance, Client]) -> None:
    _inst, client = served
    for params, words in [
        ({"sysparm_avg_fields": "agent"}, "sysparm_avg_fields"),
        ({"sysparm_sum_fields": "state"}, "sysparm_sum_fields"),
        ({"sysparm_having": "count^x^>"}, "sysparm_having"),
        ({"sysparm_having": "median^priority^>^1"}, "sysparm_having"),
        ({"sysparm_having": "count^priority^~^1"}, "sysparm_having"),
        ({"sysparm_count": "yes"}, "sysparm_count"),
        ({"sysparm_query": "priorityFOO1"}, "sysparm_query"),
    ]:
        reply = await client.get(f"{STATS}/ecc_queue", params=params)
        assert words in reply.fault(400), params
    assert (await client.get(f"{STATS}/no_table")).fault(400).startswith("Invalid table")
