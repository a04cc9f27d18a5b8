"""Every 400 the REST APIs give names the parameter, term or field at fault (issue 14's
acceptance; the audit is in docs/instance.md, "Errors" and "Differences from ServiceNow").
Real HTTP against a real instance (SQLite); nothing mocked."""

from __future__ import annotations

import base64
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest

from bridge.instance.server import Instance
from tests.table_api_client import TABLE, Client, output, serve

pytestmark = pytest.mark.timeout(60)

STATS = "/api/now/stats"
BATCH = "/api/now/v1/batch"


@pytest.fixture
async def served(tmp_path: Path) -> AsyncIterator[tuple[Instance, Client]]:
    async with serve(tmp_path) as pair:
        yield pair


# --- the messages fixed by the audit --------------------------------------------------------


@pytest.mark.parametrize("path", [f"{TABLE}/ecc_queue", f"{STATS}/ecc_queue"])
async def test_a_value_that_does_not_fit_names_sysparm_query_and_the_field(
    served: tuple[Instance, Client], path: str
) -> None:
    _, client = served
    reply = await client.get(path, params={"sysparm_query": "state=ready^priority=high"})
    message, detail = reply.error(400)
    assert message == "Invalid sysparm_query: field 'priority': 'high' is not an integer"
    assert detail == "invalid encoded query"


async def test_a_filter_value_that_does_not_fit_names_the_field_value_parameters(
    served: tuple[Instance, Client],
) -> None:
    _, client = served
    reply = await client.get(f"{TABLE}/ecc_queue", params={"priority": "high"})
    message, _ = reply.error(400)
    assert message == "Invalid field=value parameters: field 'priority': 'high' is not an integer"


async def test_an_unsupported_javascript_value_names_sysparm_query_and_the_value(
    served: tuple[Instance, Client],
) -> None:
    _, client = served
    query = "sys_created_on>javascript:gs.getMyGroups()"
    reply = await client.get(f"{TABLE}/ecc_queue", params={"sysparm_query": query})
    message, _ = reply.error(400)
    assert message.startswith("Invalid sysparm_query: field 'sys_created_on': ")
    assert "'javascript:gs.getMyGroups()'" in message


async def test_an_operator_its_field_cannot_take_names_sysparm_query_operator_and_field(
    served: tuple[Instance, Client],
) -> None:
    _, client = served
    for query, words in (
        ("priorityLIKE1", ("LIKE", "'priority'")),
        ("stateINSTANCEOFcmdb_ci", ("INSTANCEOF", "'state'")),
        ("prioritySAMEASsys_created_on", ("SAMEAS", "'priority'", "'sys_created_on'")),
        ("priority>", (">", "'priority'")),
    ):
        reply = await client.get(f"{TABLE}/ecc_queue", params={"sysparm_query": query})
        message, _ = reply.error(400)
        assert message.startswith("Invalid sysparm_query: "), (query, message)
        assert all(word in message for word in words), (query, message)


async def test_a_relative_count_too_long_says_how_long_it_may_be(
    served: tuple[Instance, Client],
) -> None:
    _, client = served
    query = "sys_created_onRELATIVEGT@day@ago@1234567"
    reply = await client.get(f"{TABLE}/ecc_queue", params={"sysparm_query": query})
    message, _ = reply.error(400)
    assert message.startswith(f"Invalid sysparm_query: term '{query}': RELATIVEGT needs")
    assert "n: 1 to 6 digits" in message


async def test_a_valid_query_still_answers(served: tuple[Instance, Client]) -> None:
    """The check that names sysparm_query refuses nothing a query may hold: helpers,
    invalid fields (ignored), dot-walks."""
    inst, client = served
    await output(inst, priority=1)
    for query in (
        "sys_created_on>javascript:gs.daysAgoStart(1)^priority=1",
        "nope=1^priority=1",
        "sys_created_by.user_name=x^ORpriority=1",
    ):
        reply = await client.get(f"{TABLE}/ecc_queue", params={"sysparm_query": query})
        assert reply.status == 200, (query, reply.text)
        assert len(reply.result) == 1, (query, reply.text)


async def test_a_bad_pagination_flag_is_refused_even_when_one_page_holds_everything(
    served: tuple[Instance, Client],
) -> None:
    """It was read only when a Link header was due: the same request answered 200 or 400
    depending on how many records there were."""
    _, client = served
    params = {"sysparm_suppress_pagination_header": "yes"}
    reply = await client.get(f"{TABLE}/ecc_queue", params=params)
    message, _ = reply.error(400)
    assert message == "Invalid sysparm_suppress_pagination_header: 'yes'"


async def test_a_batch_item_url_that_may_not_run_names_its_index(
    served: tuple[Instance, Client],
) -> None:
    _, client = served
    body = {
        "batch_request_id": "b1",
        "rest_requests": [
            {"id": "ok", "method": "GET", "url": f"{TABLE}/ecc_queue"},
            {"id": "page", "method": "GET", "url": "/nav"},
        ],
    }
    reply = await client.post(BATCH, body)
    assert reply.status == 200, reply.text
    served_items = {item["id"]: item for item in reply.body["serviced_requests"]}
    assert served_items["ok"]["status_code"] == 200
    assert served_items["page"]["status_code"] == 400
    error = base64.b64decode(served_items["page"]["body"]).decode()
    assert '"message":"Invalid rest_requests[1].url"' in error, error


# --- every other 400 still names its fault (the audit's table) -------------------------------


async def test_every_400_names_the_parameter_term_or_field(
    served: tuple[Instance, Client],
) -> None:
    inst, client = served
    record = await output(inst)
    one = f"{TABLE}/ecc_queue/{record['sys_id']}"
    cases: list[tuple[str, str, dict[str, Any], str]] = [
        ("GET", f"{TABLE}/nope", {}, "Invalid table nope"),
        ("GET", f"{TABLE}/ecc_queue?sysparm_limit=ten", {}, "sysparm_limit"),
        ("GET", f"{TABLE}/ecc_queue?sysparm_offset=-1", {}, "sysparm_offset"),
        ("GET", f"{one}?sysparm_display_value=yes", {}, "sysparm_display_value"),
        ("GET", f"{TABLE}/ecc_queue?sysparm_no_count=maybe", {}, "sysparm_no_count"),
        ("GET", f"{one}?sysparm_exclude_reference_link=1", {}, "sysparm_exclude_reference_link"),
        ("GET", f"{TABLE}/ecc_queue?sysparm_query=stateFOO1", {}, "term 'stateFOO1'"),
        ("GET", f"{TABLE}/ecc_queue?sysparm_query=Priority=1", {}, "term 'Priority=1'"),
        ("GET", f"{TABLE}/ecc_queue?sysparm_query=priorityVALCHANGES", {}, "VALCHANGES"),
        ("GET", f"{TABLE}/ecc_queue?sysparm_query=RLQUERYx", {}, "term 'RLQUERYx'"),
        ("GET", f"{TABLE}/ecc_queue?sysparm_query=priorityBETWEEN1@", {}, "BETWEEN"),
        ("GET", f"{TABLE}/ecc_queue?sysparm_query=sys_created_on>x", {}, "'sys_created_on'"),
        ("GET", f"{TABLE}/ecc_queue?" + "&".join(f"f{i}=1" for i in range(51)), {}, "field=value"),
        ("POST", f"{TABLE}/ecc_queue", {"json": {"priority": "high"}}, "ecc_queue.priority"),
        ("POST", f"{TABLE}/ecc_queue", {"json": {"topic": {"a": 1}}}, "'topic'"),
        ("POST", f"{TABLE}/ecc_queue", {"json": {"sys_id": "a b"}}, "ecc_queue.sys_id"),
        ("POST", f"{TABLE}/sys_user_has_role", {"json": {"user": "admin"}}, "'user'"),
        ("POST", f"{TABLE}/sys_user", {"json": {"user_password": "short"}}, "user_password"),
        ("POST", f"{TABLE}/ecc_agent", {"json": {"name": "a b"}}, "'name'"),
        ("POST", f"{TABLE}/cmdb_ci_server", {"json": {"sys_class_name": "x"}}, "sys_class_name"),
        ("POST", f"{TABLE}/sys_db_object", {"json": {"name": "Bad"}}, "sys_db_object.name"),
        ("PATCH", f"{one}?sysparm_input_display_value=x", {"json": {}}, "input_display_value"),
        ("GET", f"{STATS}/ecc_queue?sysparm_avg_fields=state", {}, "sysparm_avg_fields"),
        ("GET", f"{STATS}/ecc_queue?sysparm_having=count^state", {}, "sysparm_having"),
        ("GET", f"{STATS}/ecc_queue?sysparm_count=yes", {}, "sysparm_count"),
        ("POST", BATCH, {"json": {"rest_requests": {}}}, "rest_requests"),
        ("POST", BATCH, {"json": {"rest_requests": [{"id": "1"}]}}, "rest_requests[0].method"),
    ]
    wrong = []
    for method, path, kw, named in cases:
        reply = await client.call(method, path, **kw)
        fault = reply.fault(400) if reply.status == 400 else f"status {reply.status}"
        if reply.status != 400 or named not in fault:
            wrong.append((method, path[:80], named, fault))
    assert not wrong, wrong
