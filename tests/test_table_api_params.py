"""The Table API's parameters and bodies as ServiceNow reads them (docs: "Table API",
"REST API"): display values, reference links, dot-walked sysparm_fields, parameters that
do not apply or are unknown (ignored), unknown and system fields in bodies (ignored),
versioned paths, CI class tables. Real HTTP against a real instance (SQLite)."""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest

from bridge.instance import auth
from bridge.instance.api import Write
from bridge.instance.server import Instance
from tests.table_api_client import TABLE, Client, output, serve, user

pytestmark = pytest.mark.timeout(60)


@pytest.fixture
async def served(tmp_path: Path) -> AsyncIterator[tuple[Instance, Client]]:
    async with serve(tmp_path, default_limit=100, max_limit=500) as pair:
        yield pair


async def grant(inst: Instance, client: Client) -> tuple[dict[str, Any], dict[str, Any], str]:
    """A user with role itil, the grant's sys_id; (user, role, grant sys_id)."""
    person = await user(inst, "fred", "itil", first_name="Fred", last_name="Ng")
    role = await auth.find_role(inst.store, "itil")
    assert role is not None
    rows = await inst.store.query("sys_user_has_role", f"user={person['sys_id']}")
    return person, role, rows[0]["sys_id"]


def display_of(inst: Instance, table: str, record: dict[str, Any]) -> str:
    return str(record[inst.store.schema[table].display_field])


async def test_references_are_links_by_default_and_values_on_request(
    served: tuple[Instance, Client],
) -> None:
    inst, client = served
    person, role, grant_id = await grant(inst, client)
    path = f"{TABLE}/sys_user_has_role/{grant_id}"
    plain = (await client.get(path)).result
    assert plain["user"] == {
        "link": f"{client.url}{TABLE}/sys_user/{person['sys_id']}",
        "value": person["sys_id"],
    }
    bare = (await client.get(path, params={"sysparm_exclude_reference_link": "true"})).result
    assert bare["user"] == person["sys_id"]
    assert bare["role"] == role["sys_id"]

    shown = (await client.get(path, params={"sysparm_display_value": "true"})).result
    assert shown["user"] == {
        "display_value": display_of(inst, "sys_user", person),
        "link": f"{client.url}{TABLE}/sys_user/{person['sys_id']}",
    }
    assert shown["sys_id"] == grant_id
    both = (
        await client.get(
            path,
            params={"sysparm_display_value": "ALL", "sysparm_exclude_reference_link": "true"},
        )
    ).result
    assert both["role"] == {"display_value": "itil", "value": role["sys_id"]}
    assert both["sys_id"] == {"display_value": grant_id, "value": grant_id}
    linked = (await client.get(path, params={"sysparm_display_value": "all"})).result
    assert set(linked["role"]) == {"display_value", "link", "value"}

    users = await client.get(
        f"{TABLE}/sys_user",
        params={"sysparm_display_value": "true", "sysparm_query": "user_name=fred"},
    )
    assert users.result[0]["active"] == "true"  # booleans: "true"/"false" either way
    assert "user_password" not in users.text


async def test_dot_walked_fields_and_unknown_names(served: tuple[Instance, Client]) -> None:
    inst, client = served
    person, _role, grant_id = await grant(inst, client)
    fields = "user.user_name,role.name,user,nonsense,user.nonsense,role.name.x,user.user_password"
    reply = await client.get(
        f"{TABLE}/sys_user_has_role/{grant_id}",
        params={"sysparm_fields": fields, "sysparm_exclude_reference_link": "true"},
    )
    assert reply.result == {
        "user.user_name": "fred",
        "role.name": "itil",
        "user": person["sys_id"],
    }
    listed = await client.get(
        f"{TABLE}/sys_user_has_role",
        params={"sysparm_fields": "role.name", "sysparm_query": f"user={person['sys_id']}"},
    )
    assert listed.result == [{"role.name": "itil"}]
    nothing = await client.get(f"{TABLE}/sys_user", params={"sysparm_fields": "bogus"})
    assert nothing.status == 200
    assert all(row == {} for row in nothing.result)


async def test_parameters_that_do_not_apply_or_are_unknown_are_ignored(
    served: tuple[Instance, Client],
) -> None:
    """pysnow sends sysparm_query and sysparm_limit on every call; PySNC sends
    sysparm_display_value=all on writes. ServiceNow ignores what does not apply."""
    inst, client = served
    noise = {
        "sysparm_query": "name=nothing",
        "sysparm_limit": "1",
        "sysparm_offset": "7",
        "sysparm_bogus": "x",
        "sysparm_view": "desktop",
        "sysparm_query_no_domain": "true",
        "sysparm_query_category": "x",
        "sysparm_suppress_pagination_header": "true",
    }
    made = await client.post(f"{TABLE}/ecc_queue", {"queue": "output", "name": "n1"}, params=noise)
    assert made.status == 201, made.text
    one = f"{TABLE}/ecc_queue/{made.result['sys_id']}"
    assert (await client.get(one, params=noise)).result["name"] == "n1"
    patched = await client.patch(
        one, {"name": "n2"}, params={**noise, "sysparm_display_value": "all"}
    )
    assert patched.result["name"] == {"display_value": "n2", "value": "n2"}
    listed = await client.get(f"{TABLE}/ecc_queue", params={"sysparm_bogus": "1", "callback": "x"})
    assert listed.status == 200  # an unknown field=value filter: ignored, as a bad query term
    assert [r["name"] for r in listed.result] == ["n2"]
    assert (await client.delete(one, params=noise)).status == 204
    await output(inst, name="m1")
    await output(inst, name="m2")
    first = await client.get(
        f"{TABLE}/ecc_queue", raw_query="sysparm_query=name%3Dm2&sysparm_query=name%3Dm1"
    )
    assert [r["name"] for r in first.result] == ["m2"]  # a repeated parameter: the first


async def test_unknown_fields_in_queries_and_bodies_are_ignored(
    served: tuple[Instance, Client],
) -> None:
    inst, client = served
    await output(inst, name="q1")
    await output(inst, name="q2")
    rows = await client.get(f"{TABLE}/ecc_queue", params={"sysparm_query": "bogus=1^name=q2"})
    assert [r["name"] for r in rows.result] == ["q2"]
    by_pair = await client.get(f"{TABLE}/ecc_queue", params={"bogus": "1", "name": "q1"})
    assert [r["name"] for r in by_pair.result] == ["q1"]
    ordered = await client.get(f"{TABLE}/ecc_queue", params={"sysparm_query": "ORDERBYDESCbogus"})
    assert ordered.status == 200

    made = await client.post(
        f"{TABLE}/ecc_queue",
        {"queue": "output", "name": "b1", "bogus": "x", "sys_created_on": "2001-01-01 00:00:00",
         "sys_updated_by": "mallory", "sys_mod_count": 99},
    )  # fmt: skip
    assert made.status == 201, made.text
    record = made.result
    assert "bogus" not in record
    assert record["sys_created_on"] != "2001-01-01 00:00:00"
    assert record["sys_created_by"] == record["sys_updated_by"] == "admin"
    assert record["sys_mod_count"] == "0"
    one = f"{TABLE}/ecc_queue/{record['sys_id']}"
    patched = await client.patch(one, {"state": "processed", "sys_id": "other", "nope": 1})
    assert patched.status == 200, patched.text
    assert patched.result["sys_id"] == record["sys_id"]
    assert patched.result["state"] == "processed"
    assert patched.result["sys_mod_count"] == "1"
    listed = await client.post(f"{TABLE}/ecc_queue", [{"queue": "output", "name": "l1"}, {"x": 1}])
    assert listed.status == 201  # a list: the first record, as ServiceNow
    assert listed.result["name"] == "l1"


async def test_writes_record_who_made_them(served: tuple[Instance, Client]) -> None:
    inst, client = served
    await user(inst, "disco", "discovery_admin")
    made = await client.post(f"{TABLE}/discovery_schedule", {"name": "s1"}, user="disco")
    assert made.status == 201, made.text
    assert made.result["sys_created_by"] == "disco"
    changed = await client.patch(
        f"{TABLE}/discovery_schedule/{made.result['sys_id']}", {"ranges": "10.0.0.0/30"}
    )
    assert (changed.result["sys_created_by"], changed.result["sys_updated_by"]) == (
        "disco",
        "admin",
    )


async def test_invalid_values_of_known_parameters_name_them(
    served: tuple[Instance, Client],
) -> None:
    _inst, client = served
    cases = {
        "sysparm_limit": "ten",
        "sysparm_offset": "-1",
        "sysparm_display_value": "maybe",
        "sysparm_exclude_reference_link": "perhaps",
        "sysparm_no_count": "2",
    }
    for name, value in cases.items():
        fault = (await client.get(f"{TABLE}/ecc_queue", params={name: value})).fault(400)
        assert name in fault, fault
    big = await client.get(f"{TABLE}/ecc_queue", params={"sysparm_limit": "100000"})
    assert big.status == 200  # above ApiSettings.max_limit: lowered to it
    bad_query = await client.get(f"{TABLE}/ecc_queue", params={"sysparm_query": "stateFOO"})
    assert "sysparm_query" in bad_query.fault(400)


async def test_versioned_paths_and_v1_empty_lists(served: tuple[Instance, Client]) -> None:
    inst, client = served
    for prefix in ("/api/now/v1/table", "/api/now/v2/table"):
        made = await client.post(f"{prefix}/ecc_queue", {"queue": "output", "name": prefix})
        assert made.status == 201, made.text
        assert made.headers["Location"] == f"{client.url}{prefix}/ecc_queue/{made.result['sys_id']}"
        got = await client.get(f"{prefix}/ecc_queue/{made.result['sys_id']}")
        assert got.result["name"] == prefix
    empty = {"sysparm_query": "name=none"}
    assert (await client.get("/api/now/v2/table/ecc_queue", params=empty)).result == []
    assert (await client.get(f"{TABLE}/ecc_queue", params=empty)).result == []
    message, _ = (await client.get("/api/now/v1/table/ecc_queue", params=empty)).error(404)
    assert message == "No Record found"
    assert (await client.get("/api/now/v3/table/ecc_queue")).status == 404
    assert await inst.store.count("ecc_queue") == 2


async def test_no_response_body_header(served: tuple[Instance, Client]) -> None:
    _inst, client = served
    quiet = {"X-no-response-body": "true"}
    made = await client.post(f"{TABLE}/ecc_queue", {"queue": "output"}, headers=quiet)
    assert made.status == 201
    assert made.raw == b""
    assert made.headers["Location"].startswith(f"{client.url}{TABLE}/ecc_queue/")


async def test_ci_class_tables_read_and_write_like_servicenow(
    served: tuple[Instance, Client],
) -> None:
    inst, client = served
    server = await client.post(
        f"{TABLE}/cmdb_ci_linux_server", {"name": "web1", "ip_address": "10.0.0.5"}
    )
    assert server.status == 201, server.text
    assert server.result["sys_class_name"] == "cmdb_ci_linux_server"
    address = await client.post(f"{TABLE}/cmdb_ci_ip_address", {"name": "10.0.0.9"})
    assert address.status == 201, address.text
    servers = await client.get(f"{TABLE}/cmdb_ci_server")
    assert [r["name"] for r in servers.result] == ["web1"]
    every = await client.get(f"{TABLE}/cmdb_ci", params={"sysparm_query": "ORDERBYname"})
    assert [r["name"] for r in every.result] == ["10.0.0.9", "web1"]
    wrong_class = await client.get(f"{TABLE}/cmdb_ci_linux_server/{address.result['sys_id']}")
    assert wrong_class.status == 404
    labelled = await client.get(
        f"{TABLE}/cmdb_ci/{server.result['sys_id']}", params={"sysparm_display_value": "all"}
    )
    assert labelled.result["sys_class_name"]["value"] == "cmdb_ci_linux_server"
    await user(inst, "disco", "discovery_admin")
    await user(inst, "mid", "mid_server")
    assert (await client.get(f"{TABLE}/cmdb_ci_linux_server", user="disco")).status == 200
    refused = await client.post(f"{TABLE}/cmdb_ci_linux_server", {"name": "x"}, user="disco")
    assert refused.status == 403
    assert (await client.get(f"{TABLE}/cmdb_ci_linux_server", user="mid")).status == 403
    assert await inst.store.count("cmdb_ci") == 2


async def test_schema_tables_and_new_tables_are_admin_only(
    served: tuple[Instance, Client],
) -> None:
    inst, client = served
    await user(inst, "mid", "mid_server", mid_agents=["a"])
    await user(inst, "disco", "discovery_admin")
    for table in ("sys_db_object", "sys_dictionary"):
        assert (await client.get(f"{TABLE}/{table}")).status == 200
        for who in ("mid", "disco"):
            assert "requires role admin" in (await client.get(f"{TABLE}/{table}", user=who)).fault(
                403
            )
    made = await client.post(f"{TABLE}/sys_db_object", {"name": "u_asset", "label": "Asset"})
    assert made.status == 201, made.text
    column = await client.post(
        f"{TABLE}/sys_dictionary",
        {"name": "u_asset", "element": "u_tag", "internal_type": "string"},
    )
    assert column.status == 201, column.text
    row = await client.post(f"{TABLE}/u_asset", {"u_tag": "T-1", "u_nonsense": "x"})
    assert row.status == 201, row.text
    assert row.result["u_tag"] == "T-1"
    for who in ("mid", "disco"):
        assert (await client.get(f"{TABLE}/u_asset", user=who)).status == 403
        assert (await client.post(f"{TABLE}/u_asset", {"u_tag": "x"}, user=who)).status == 403
    assert [r["u_tag"] for r in (await client.get(f"{TABLE}/u_asset")).result] == ["T-1"]


async def test_reference_filters_take_display_values(served: tuple[Instance, Client]) -> None:
    inst, client = served
    person, _role, grant_id = await grant(inst, client)
    shown = display_of(inst, "sys_user", person)
    assert shown == "Fred Ng"  # ServiceNow shows a user by name; user_name is matched too
    for value in (person["sys_id"], shown, person["user_name"]):
        rows = await client.get(f"{TABLE}/sys_user_has_role", params={"user": value})
        assert [r["sys_id"] for r in rows.result] == [grant_id], value
    made = await client.post(
        f"{TABLE}/sys_user_has_role",
        {"user": shown, "role": "mid_server"},
        params={"sysparm_input_display_value": "true"},
    )
    assert made.status == 201, made.text
    assert made.result["user"]["value"] == person["sys_id"]


async def test_dot_walks_stop_at_tables_the_user_may_not_read(
    served: tuple[Instance, Client],
) -> None:
    """An admin adds a reference from the CMDB (readable by discovery_admin) to sys_user
    (admin-only): a discovery_admin then tries to read or query sys_user through it."""
    inst, client = served
    await user(inst, "disco", "discovery_admin")
    column = await client.post(
        f"{TABLE}/sys_dictionary",
        {"name": "cmdb_ci", "element": "u_owner", "internal_type": "reference",
         "reference": "sys_user"},
    )  # fmt: skip
    assert column.status == 201, column.text
    admin = await auth.find_user(inst.store, "admin")
    assert admin is not None
    made = await client.post(f"{TABLE}/cmdb_ci", {"name": "ci1", "u_owner": admin["sys_id"]})
    assert made.status == 201, made.text
    one = f"{TABLE}/cmdb_ci/{made.result['sys_id']}"
    assert (await client.get(one, params={"sysparm_fields": "u_owner.user_name"})).result == {
        "u_owner.user_name": "admin"
    }
    seen = await client.get(
        one,
        user="disco",
        params={"sysparm_fields": "name,u_owner,u_owner.user_name", "sysparm_display_value": "all"},
    )
    assert seen.result["name"]["value"] == "ci1"
    assert "u_owner.user_name" not in seen.result
    assert seen.result["u_owner"]["display_value"] == ""
    assert seen.result["u_owner"]["value"] == admin["sys_id"]
    for query in ("u_owner.user_name=admin", "ORDERBYu_owner.email", "nameSAMEASu_owner.name"):
        refused = await client.get(
            f"{TABLE}/cmdb_ci", user="disco", params={"sysparm_query": query}
        )
        assert "reaches table sys_user" in refused.fault(403), query
    by_pair = await client.get(f"{TABLE}/cmdb_ci", user="disco", params={"u_owner": "admin"})
    assert by_pair.result == []  # no display-value match through an unreadable table


async def test_hooks_of_a_table_run_for_tables_extending_it(
    served: tuple[Instance, Client],
) -> None:
    """A before-write hook of cmdb_ci (e.g. one that refuses or rewrites a field) runs for
    writes to cmdb_ci_linux_server too: a class table is no way around it."""
    inst, client = served
    seen: list[tuple[str, str]] = []

    def hook(write: Write) -> None:
        seen.append((write.table, write.op))
        if write.fields.get("name") == "forbidden":
            raise ValueError("that name is not allowed")
        write.fields["os"] = "checked"

    inst.before_write("cmdb_ci", hook)
    made = await client.post(f"{TABLE}/cmdb_ci_linux_server", {"name": "web1"})
    assert made.status == 201, made.text
    assert made.result["os"] == "checked"
    changed = await client.patch(f"{TABLE}/cmdb_ci_server/{made.result['sys_id']}", {"os": "other"})
    assert changed.result["os"] == "checked"
    refused = await client.post(f"{TABLE}/cmdb_ci_web_server", {"name": "forbidden"})
    assert "that name is not allowed" in refused.fault(400)
    assert seen == [
        ("cmdb_ci_linux_server", "insert"),
        ("cmdb_ci_server", "update"),
        ("cmdb_ci_web_server", "insert"),
    ]
