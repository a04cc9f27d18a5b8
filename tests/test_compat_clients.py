"""ServiceNow client libraries from PyPI against the built-in instance, used as documented.

Each client is used exactly as its documentation says for a real instance: no shims, no
client-side settings. The only concession is the one every self-signed HTTPS server needs:
the test trusts the instance's certificate (made by ``bridge.instance.tls``) through the
standard ``REQUESTS_CA_BUNDLE`` environment variable, which ``requests`` (both clients'
transport) reads.

- ``pysnc`` (ServiceNow's own client, https only): GlideRecord query / get / insert /
  update / delete, add_query and add_encoded_query, pagination by batch_size, display
  values (it sends ``sysparm_display_value=all`` and ``sysparm_exclude_reference_link=true``
  on every request, writes included), update_multiple / delete_multiple (the Batch API).
- ``pysnow`` (resource API) over HTTP and HTTPS: get with dict / QueryBuilder / encoded
  queries, limit/offset pages, stream, create, update (GET then PUT with the query's
  parameters still on), delete, display values.
- Raw HTTP (``requests``): the Link, X-Total-Count, Location and Content-Type headers, and
  ServiceNow's error body ``{"error": {"message", "detail"}, "status": "failure"}``.

The instance runs in a thread of its own (the clients block: ``ServedInstance`` of
tests/test_instance_tls.py); a middleware records what it answered, and every failure
message says which ServiceNow behaviour is missing and shows the last requests with their
status and error body.
"""

from __future__ import annotations

import datetime as dt
import secrets
from collections.abc import Iterator
from typing import Any
from urllib.parse import urlsplit

import pysnc
import pysnow
import pytest
import requests

from tests.test_instance_tls import (
    ADMIN,
    ADMIN_PW,
    TABLE,
    ServedInstance,
    behaviour,
    check,
    https_served,
    same,
)

pytestmark = pytest.mark.timeout(120)


@pytest.fixture(scope="module")
def https_instance(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServedInstance]:
    served = https_served(tmp_path_factory.mktemp("compat-https") / "instance.db").start()
    assert served.url.startswith("https://127.0.0.1:"), served.url
    try:
        yield served
    finally:
        served.stop()


@pytest.fixture(scope="module")
def http_instance(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServedInstance]:
    served = ServedInstance(tmp_path_factory.mktemp("compat-http") / "instance.db").start()
    try:
        yield served
    finally:
        served.stop()


@pytest.fixture
def trusted(https_instance: ServedInstance, monkeypatch: pytest.MonkeyPatch) -> ServedInstance:
    """The HTTPS instance, its certificate trusted the standard way (REQUESTS_CA_BUNDLE)."""
    monkeypatch.setenv("REQUESTS_CA_BUNDLE", str(https_instance.cert))
    return https_instance


SESSIONS: list[requests.Session] = []  # the clients' sessions, closed after each test


@pytest.fixture(autouse=True)
def close_sessions() -> Iterator[None]:
    yield
    while SESSIONS:
        SESSIONS.pop().close()


def unique(prefix: str) -> str:
    return f"{prefix}{secrets.token_hex(4)}"


def make_users(served: ServedInstance, prefix: str, n: int) -> list[dict[str, Any]]:
    return [
        served.insert(
            "sys_user",
            {
                "user_name": f"{prefix}.{i:02d}",
                "first_name": f"First{i:02d}",
                "last_name": prefix,
                "email": f"{prefix}.{i:02d}@example.com",
                "active": i % 2 == 0,
            },
        )
        for i in range(n)
    ]


# --- pysnc: ServiceNow's own client (https only) --------------------------------------------


def pysnc_client(served: ServedInstance) -> pysnc.ServiceNowClient:
    # As its README: ServiceNowClient('https://<instance>', ('user', 'password')).
    client = pysnc.ServiceNowClient(served.url, (ADMIN, ADMIN_PW))
    SESSIONS.append(client.session)
    return client


def test_pysnc_refuses_plain_http(http_instance: ServedInstance) -> None:
    """Why the instance must serve HTTPS: pysnc will not talk to an http:// URL."""
    with pytest.raises(pysnc.exceptions.InstanceException):
        pysnc.ServiceNowClient(http_instance.url, (ADMIN, ADMIN_PW))


def test_pysnc_query_pages_by_batch_size(trusted: ServedInstance) -> None:
    prefix = unique("pq")
    make_users(trusted, prefix, 7)
    client = pysnc_client(trusted)
    gr = client.GlideRecord("sys_user", batch_size=3)
    gr.add_query("user_name", "STARTSWITH", prefix)
    gr.order_by("user_name")
    with behaviour(
        trusted,
        "GET /api/now/table/sys_user with sysparm_display_value=all, "
        "sysparm_exclude_reference_link=true, sysparm_suppress_pagination_header=true, "
        "sysparm_limit/sysparm_offset pages and the X-Total-Count header",
    ):
        gr.query()
        names = [str(record.user_name) for record in gr]
        total = gr.get_row_count()
    want = [f"{prefix}.{i:02d}" for i in range(7)]
    same(trusted, names, want, "7 records over pages of 3, ordered by user_name")
    same(trusted, total, 7, "X-Total-Count = 7 (the whole query, not the page)")
    pages = [s for s in trusted.seen if s.method == "GET" and f"{prefix}" in s.path]
    check(trusted, len(pages) == 3, "three GETs for 7 records in batches of 3", pages)


def test_pysnc_queries(trusted: ServedInstance) -> None:
    prefix = unique("qq")
    make_users(trusted, prefix, 6)
    client = pysnc_client(trusted)

    gr = client.GlideRecord("sys_user")
    gr.add_query("user_name", "STARTSWITH", prefix)
    gr.add_active_query()
    with behaviour(trusted, "add_query(STARTSWITH) + add_active_query (active=true)"):
        gr.query()
        active = sorted(str(r.user_name) for r in gr)
    want = [f"{prefix}.{i:02d}" for i in (0, 2, 4)]
    same(trusted, active, want, "active=true selects the active users")

    gr = client.GlideRecord("sys_user")
    gr.add_encoded_query(f"last_name={prefix}^user_nameENDSWITH1^ORuser_nameENDSWITH3")
    with behaviour(trusted, "add_encoded_query with ^OR"):
        gr.query()
        either = sorted(str(r.user_name) for r in gr)
    same(trusted, either, [f"{prefix}.01", f"{prefix}.03"], "an ^OR encoded query")

    gr = client.GlideRecord("sys_user")
    condition = gr.add_query("user_name", f"{prefix}.00")
    condition.add_or_condition("user_name", f"{prefix}.05")
    gr.add_query("email", "CONTAINS", "@example.com")
    with behaviour(trusted, "add_or_condition (user_name=a^ORuser_name=b^emailCONTAINS...)"):
        gr.query()
        pair = sorted(str(r.user_name) for r in gr)
    same(trusted, pair, [f"{prefix}.00", f"{prefix}.05"], "add_or_condition")

    gr = client.GlideRecord("sys_user")
    gr.add_query("user_name", "IN", f"{prefix}.01,{prefix}.02,nobody")
    gr.add_not_null_query("email")
    gr.order_by_desc("user_name")
    with behaviour(trusted, "IN, ISNOTEMPTY and ORDERBYDESC"):
        gr.query()
        listed = [str(r.user_name) for r in gr]
    same(trusted, listed, [f"{prefix}.02", f"{prefix}.01"], "IN + ORDERBYDESC")

    gr = client.GlideRecord("sys_user")
    gr.add_query("user_name", f"{prefix}.04")
    gr.fields = ["user_name", "email"]
    with behaviour(trusted, "sysparm_fields (pysnc adds sys_id to the list)"):
        gr.query()
        assert gr.next()
        seen_fields = set(gr.serialize())
    same(
        trusted,
        seen_fields,
        {"sys_id", "user_name", "email"},
        "sysparm_fields: those fields only",
    )


def test_pysnc_get_by_sys_id_and_by_field(trusted: ServedInstance) -> None:
    prefix = unique("pg")
    [user] = make_users(trusted, prefix, 1)
    client = pysnc_client(trusted)
    gr = client.GlideRecord("sys_user")
    with behaviour(trusted, "GET /api/now/table/sys_user/<sys_id> with pysnc's parameters"):
        found = gr.get(user["sys_id"])
    check(trusted, found is True, "get(sys_id) finds the record", found)
    check(trusted, gr.user_name == f"{prefix}.00", "the record's user_name", str(gr.user_name))
    same(trusted, gr.get_value("sys_id"), user["sys_id"], "its sys_id")

    gr = client.GlideRecord("sys_user")
    with behaviour(trusted, "GET of an unknown sys_id: 404 with an error body"):
        missing = gr.get("0" * 32)
    check(trusted, missing is False, "get(unknown sys_id) is False (HTTP 404)", missing)

    gr = client.GlideRecord("sys_user")
    with behaviour(trusted, "get(field, value): a query"):
        by_name = gr.get("email", f"{prefix}.00@example.com")
    check(trusted, by_name is True, "get('email', value) finds it", by_name)
    check(trusted, gr.sys_id == user["sys_id"], "the same record", str(gr.sys_id))


def test_pysnc_insert_update_delete(trusted: ServedInstance) -> None:
    name = unique("crud")
    client = pysnc_client(trusted)
    gr = client.GlideRecord("sys_user")
    gr.initialize()
    gr.user_name = name
    gr.first_name = "Ada"
    gr.last_name = "Lovelace"
    with behaviour(
        trusted,
        "POST with sysparm_display_value=all, sysparm_exclude_reference_link=true and "
        "sysparm_suppress_pagination_header=true: 201 and the record",
    ):
        sys_id = gr.insert()
    check(trusted, bool(sys_id) and len(str(sys_id)) == 32, "insert() returns a sys_id", sys_id)
    stored = trusted.get("sys_user", str(sys_id))
    check(trusted, stored is not None and stored["first_name"] == "Ada", "stored", stored)

    gr = client.GlideRecord("sys_user")
    assert gr.get(str(sys_id))
    gr.first_name = "Augusta"
    with behaviour(trusted, "PATCH /api/now/table/sys_user/<sys_id> with pysnc's parameters"):
        updated = gr.update()
    same(trusted, updated, sys_id, "update() returns the sys_id")
    stored = trusted.get("sys_user", str(sys_id))
    check(trusted, stored is not None and stored["first_name"] == "Augusta", "updated", stored)
    check(trusted, gr.first_name == "Augusta", "the answer is spliced in", str(gr.first_name))

    with behaviour(trusted, "DELETE /api/now/table/sys_user/<sys_id>: 204"):
        deleted = gr.delete()
    check(trusted, deleted is True, "delete() is True (HTTP 204)", deleted)
    check(trusted, trusted.get("sys_user", str(sys_id)) is None, "gone", sys_id)


def test_pysnc_display_values_of_references(trusted: ServedInstance) -> None:
    """sys_user_has_role.user and .role are references: display_value=all gives each
    field {"display_value", "value"}; a reference's display value is the referenced
    record's display field (sys_user.name, sys_user_role.name)."""
    prefix = unique("dv")
    [user] = make_users(trusted, prefix, 1)
    client = pysnc_client(trusted)
    roles = client.GlideRecord("sys_user_role")
    roles.add_query("name", "mid_server")
    with behaviour(trusted, "query sys_user_role"):
        roles.query()
        assert roles.next(), "no mid_server role"
    grant = client.GlideRecord("sys_user_has_role")
    grant.initialize()
    grant.user = user["sys_id"]
    grant.role = roles.sys_id
    with behaviour(trusted, "POST sys_user_has_role with reference values (sys_ids)"):
        grant_id = grant.insert()

    gr = client.GlideRecord("sys_user_has_role")
    with behaviour(trusted, "GET sys_user_has_role/<sys_id>?sysparm_display_value=all"):
        assert gr.get(str(grant_id))
    same(trusted, gr.get_value("user"), user["sys_id"], "value = sys_id")
    same(
        trusted,
        gr.get_display_value("role"),
        "mid_server",
        "role's display_value: sys_user_role.name",
    )
    user_display = gr.get_display_value("user")

    gr = client.GlideRecord("sys_user_has_role")
    gr.exclude_reference_link = False
    with behaviour(trusted, "sysparm_exclude_reference_link=false: {link, value}"):
        assert gr.get(str(grant_id))
    link = gr.user.get_link()
    same(
        trusted,
        link,
        f"{trusted.url}/api/now/table/sys_user/{user['sys_id']}",
        "reference link <instance>/api/now/table/...",
    )
    # Last: sys_user's display field is name (the full name) in ServiceNow.
    same(trusted, user_display, f"First00 {prefix}", "a sys_user reference displays its name")


def test_pysnc_update_multiple_and_delete_multiple(trusted: ServedInstance) -> None:
    """update_multiple and delete_multiple go through the Batch API (/api/now/v1/batch)."""
    prefix = unique("bt")
    make_users(trusted, prefix, 5)
    client = pysnc_client(trusted)
    gr = client.GlideRecord("sys_user")
    gr.add_query("last_name", prefix)
    with behaviour(trusted, "POST /api/now/v1/batch with PATCH sub-requests (update_multiple)"):
        gr.query()
        for record in gr:
            record.email = f"{record.user_name}@batch.example.com"
        ok = gr.update_multiple()
    check(trusted, ok is True, "every batched PATCH answered 200", ok)
    changed = trusted.count("sys_user", f"last_name={prefix}^emailENDSWITH@batch.example.com")
    same(trusted, changed, 5, "the 5 records updated")

    gr = client.GlideRecord("sys_user")
    gr.add_query("last_name", prefix)
    with behaviour(trusted, "POST /api/now/v1/batch with DELETE sub-requests (delete_multiple)"):
        ok = gr.delete_multiple()
    check(trusted, ok is True, "every batched DELETE answered 204", ok)
    left = trusted.count("sys_user", f"last_name={prefix}")
    same(trusted, left, 0, "the 5 records deleted")


def test_pysnc_cmdb_class_hierarchy(trusted: ServedInstance) -> None:
    """cmdb_ci_linux_server extends cmdb_ci: insert into the child, read from the parent."""
    name = unique("srv")
    client = pysnc_client(trusted)
    gr = client.GlideRecord("cmdb_ci_linux_server")
    gr.initialize()
    gr.name = name
    gr.ip_address = "192.0.2.10"
    with behaviour(trusted, "POST /api/now/table/cmdb_ci_linux_server (a CI class table)"):
        sys_id = gr.insert()
    parent = client.GlideRecord("cmdb_ci")
    parent.add_query("name", name)
    with behaviour(trusted, "GET /api/now/table/cmdb_ci returns records of its child classes"):
        parent.query()
        assert parent.next(), "the server is not listed in cmdb_ci"
    check(trusted, parent.sys_id == sys_id, "the same record", str(parent.sys_id))
    same(
        trusted,
        parent.get_value("sys_class_name"),
        "cmdb_ci_linux_server",
        "sys_class_name from the table",
    )


def test_pysnc_groups_and_members(trusted: ServedInstance) -> None:
    name = unique("grp")
    [user] = make_users(trusted, name, 1)
    client = pysnc_client(trusted)
    group = client.GlideRecord("sys_user_group")
    group.initialize()
    group.name = name
    group.description = "compat test group"
    with behaviour(trusted, "POST /api/now/table/sys_user_group (a standard table)"):
        group_id = group.insert()
    member = client.GlideRecord("sys_user_grmember")
    member.initialize()
    member.group = group_id
    member.user = user["sys_id"]
    with behaviour(trusted, "POST /api/now/table/sys_user_grmember"):
        member.insert()
    gr = client.GlideRecord("sys_user_grmember")
    gr.add_query("group", group_id)
    with behaviour(trusted, "query sys_user_grmember by group"):
        gr.query()
        assert gr.next(), "no membership found"
    check(trusted, gr.get_display_value("group") == name, "group display value", gr.group)


def test_pysnc_user_made_table(trusted: ServedInstance) -> None:
    """A table made as ServiceNow makes one: a sys_db_object record, then a field as a
    sys_dictionary record; then the table is used like any other."""
    table = f"u_compat_{secrets.token_hex(3)}"
    client = pysnc_client(trusted)
    definition = client.GlideRecord("sys_db_object")
    definition.initialize()
    definition.name = table
    definition.label = "Compat widget"
    with behaviour(trusted, "POST /api/now/table/sys_db_object makes a table"):
        definition.insert()
    column = client.GlideRecord("sys_dictionary")
    column.initialize()
    column.name = table
    column.element = "u_size"
    column.column_label = "Size"
    column.internal_type = "integer"
    with behaviour(trusted, "POST /api/now/table/sys_dictionary adds a field"):
        column.insert()
    widget = client.GlideRecord(table)
    widget.initialize()
    widget.u_size = 42
    with behaviour(trusted, f"POST /api/now/table/{table} (the new table)"):
        sys_id = widget.insert()
    gr = client.GlideRecord(table)
    gr.add_query("u_size", ">", "40")
    with behaviour(trusted, f"GET /api/now/table/{table}?sysparm_query=u_size>40"):
        gr.query()
        rows = [(str(r.sys_id), str(r.u_size)) for r in gr]
    same(trusted, rows, [(str(sys_id), "42")], "the record in the new table")


# --- pysnow: an independent client, over HTTP and HTTPS -------------------------------------


def pysnow_client(served: ServedInstance) -> pysnow.Client:
    # As its docs: Client(host=..., user=..., password=..., use_ssl=...).
    host = served.url.split("://", 1)[1]
    client = pysnow.Client(
        host=host, user=ADMIN, password=ADMIN_PW, use_ssl=served.url.startswith("https:")
    )
    SESSIONS.append(client.session)
    return client


@pytest.fixture(params=["http", "https"])
def snow(
    request: pytest.FixtureRequest, http_instance: ServedInstance, monkeypatch: pytest.MonkeyPatch
) -> ServedInstance:
    if request.param == "http":
        return http_instance
    served: ServedInstance = request.getfixturevalue("https_instance")
    monkeypatch.setenv("REQUESTS_CA_BUNDLE", str(served.cert))
    return served


def test_pysnow_queries_and_pages(snow: ServedInstance) -> None:
    prefix = unique("sq")
    make_users(snow, prefix, 7)
    users = pysnow_client(snow).resource(api_path="/table/sys_user")
    with behaviour(
        snow,
        "GET with pysnow's parameters: sysparm_display_value=False, "
        "sysparm_exclude_reference_link=False, sysparm_suppress_pagination_header=False, "
        "empty sysparm_view and sysparm_fields, sysparm_limit=10000",
    ):
        one = users.get(query={"user_name": f"{prefix}.03"}).one()
    check(snow, one["email"] == f"{prefix}.03@example.com", "a dict query", one)

    qb = (
        pysnow.QueryBuilder()
        .field("last_name")
        .equals(prefix)
        .AND()
        .field("active")
        .equals("true")
        .AND()
        .field("user_name")
        .order_ascending()
    )
    with behaviour(snow, "a QueryBuilder query (=, ^, ORDERBY)"):
        active = [r["user_name"] for r in users.get(query=qb).all()]
    want = [f"{prefix}.{i:02d}" for i in (0, 2, 4, 6)]
    same(snow, active, want, "the active users, in user_name order")

    recent = (
        pysnow.QueryBuilder()
        .field("last_name")
        .equals(prefix)
        .AND()
        .field("sys_created_on")
        .greater_than(dt.datetime.now(dt.UTC) - dt.timedelta(hours=1))
    )
    with behaviour(snow, "sys_created_on>YYYY-MM-DD HH:MM:SS (QueryBuilder with a datetime)"):
        created = users.get(query=recent).all()
    same(snow, len(created), 7, "created within the hour")

    with behaviour(snow, "an encoded query string with ^OR and ORDERBYDESC"):
        rows = users.get(
            query=f"user_name={prefix}.01^ORuser_name={prefix}.05^ORDERBYDESCuser_name"
        ).all()
    got = [r["user_name"] for r in rows]
    same(snow, got, [f"{prefix}.05", f"{prefix}.01"], "^OR + ORDERBYDESC")

    pages = []
    for offset in (0, 3, 6):
        with behaviour(snow, "sysparm_limit / sysparm_offset pages"):
            page = users.get(
                query=f"last_name={prefix}^ORDERBYuser_name", limit=3, offset=offset
            ).all()
        pages.append([r["user_name"] for r in page])
    want_pages = [[f"{prefix}.{i:02d}" for i in range(s, min(s + 3, 7))] for s in (0, 3, 6)]
    same(snow, pages, want_pages, "pages of 3 in order")

    with behaviour(snow, "stream=True: the answer parsed as it streams"):
        streamed = [
            r["user_name"]
            for r in users.get(
                query=f"last_name={prefix}^ORDERBYuser_name", stream=True, fields=["user_name"]
            ).all()
        ]
    same(snow, streamed, [f"{prefix}.{i:02d}" for i in range(7)], "streamed")

    with behaviour(snow, "sysparm_fields as a list"):
        record = users.get(query={"user_name": f"{prefix}.02"}, fields=["user_name", "email"])
        fields = set(record.one())
    same(snow, fields, {"user_name", "email"}, "just the fields asked for")


def test_pysnow_create_update_delete(snow: ServedInstance) -> None:
    name = unique("sc")
    users = pysnow_client(snow).resource(api_path="/table/sys_user")
    with behaviour(snow, "POST with the query parameters pysnow keeps on every request"):
        created = users.create(payload={"user_name": name, "first_name": "Grace"})
        sys_id = created["sys_id"]
    check(snow, created["first_name"] == "Grace", "the created record", created.one())
    with behaviour(
        snow,
        "PUT /api/now/table/sys_user/<sys_id> with sysparm_query, sysparm_limit, "
        "sysparm_offset ... still on it (ServiceNow ignores what does not apply)",
    ):
        updated = users.update(query={"sys_id": sys_id}, payload={"last_name": "Hopper"})
        last_name = updated["last_name"]
    same(snow, last_name, "Hopper", "the updated record")
    stored = snow.get("sys_user", sys_id)
    check(snow, stored is not None and stored["last_name"] == "Hopper", "stored", stored)
    with behaviour(snow, "DELETE with pysnow's query parameters: 204"):
        result = users.delete(query={"sys_id": sys_id})
    same(snow, result, {"status": "record deleted"}, "204 -> 'record deleted'")
    check(snow, snow.get("sys_user", sys_id) is None, "gone", sys_id)


def test_pysnow_display_values(snow: ServedInstance) -> None:
    prefix = unique("sd")
    [user] = make_users(snow, prefix, 1)
    client = pysnow_client(snow)
    grants = client.resource(api_path="/table/sys_user_has_role")
    with behaviour(snow, "POST a reference field by sys_id"):
        role = client.resource(api_path="/table/sys_user_role").get(query={"name": "admin"}).one()
        grant = grants.create(payload={"user": user["sys_id"], "role": role["sys_id"]})
        grant_id = grant["sys_id"]
    with behaviour(snow, "sysparm_display_value=True"):
        shown = grants.get(query={"sys_id": grant_id}, display_value=True).one()
    same(
        snow,
        shown["role"],
        {"display_value": "admin", "link": f"{snow.url}{TABLE}/sys_user_role/{role['sys_id']}"},
        "display_value=true, exclude_reference_link=false: {display_value, link}",
    )
    with behaviour(snow, "sysparm_display_value=all with sysparm_exclude_reference_link=True"):
        both = grants.get(
            query={"sys_id": grant_id}, display_value="all", exclude_reference_link=True
        ).one()
    same(
        snow,
        both["role"],
        {"display_value": "admin", "value": role["sys_id"]},
        "display_value=all",
    )
    # A new resource: pysnow keeps display_value / exclude_reference_link on the one used.
    fresh = client.resource(api_path="/table/sys_user_has_role")
    with behaviour(snow, "the default (display_value=false): {link, value} for a reference"):
        plain = fresh.get(query={"sys_id": grant_id}).one()
    link = f"{snow.url}{TABLE}/sys_user_role/{role['sys_id']}"
    want = {"link": link, "value": role["sys_id"]}
    check(snow, plain["role"] == want, "exclude_reference_link=false: {link, value}", plain)
    # Last: sys_user's display field is name (the full name) in ServiceNow.
    same(snow, shown["user"]["display_value"], f"First00 {prefix}", "a sys_user displays its name")


def test_pysnow_between_on_an_integer_field(snow: ServedInstance) -> None:
    prefix = unique("sb")
    make_users(snow, prefix, 2)
    users = pysnow_client(snow).resource(api_path="/table/sys_user")
    qb = (
        pysnow.QueryBuilder()
        .field("last_name")
        .equals(prefix)
        .AND()
        .field("sys_mod_count")
        .between(0, 3)
    )
    with behaviour(snow, "BETWEEN on an integer field (sys_mod_count BETWEEN0@3)"):
        rows = users.get(query=qb).all()
    check(snow, len(rows) == 2, "both records (sys_mod_count 0)", rows)


# --- raw HTTP: headers and error bodies -----------------------------------------------------


def raw(served: ServedInstance, method: str, path: str, **kwargs: Any) -> requests.Response:
    kwargs.setdefault("auth", (ADMIN, ADMIN_PW))
    kwargs.setdefault("headers", {"Accept": "application/json"})
    return requests.request(method, served.url + path, timeout=30, **kwargs)


def assert_error(served: ServedInstance, reply: requests.Response, status: int, what: str) -> str:
    """ServiceNow's error body: {"error": {"message", "detail"}, "status": "failure"}."""
    same(served, reply.status_code, status, f"{what}: HTTP {status}")
    try:
        body = reply.json()
    except ValueError:
        body = reply.text
    ok = (
        isinstance(body, dict)
        and body.get("status") == "failure"
        and isinstance(body.get("error"), dict)
        and set(body["error"]) == {"message", "detail"}
        and bool(body["error"]["message"])
    )
    check(served, ok, f'{what}: {{"error": {{"message", "detail"}}, "status": "failure"}}', body)
    content_type = reply.headers.get("Content-Type", "")
    check(served, content_type.startswith("application/json"), f"{what}: JSON", content_type)
    return str(body["error"]["message"])


def test_raw_headers_of_a_list(trusted: ServedInstance) -> None:
    prefix = unique("rh")
    make_users(trusted, prefix, 5)
    query = f"last_name={prefix}^ORDERBYuser_name"
    reply = raw(
        trusted,
        "GET",
        f"{TABLE}/sys_user",
        params={"sysparm_query": query, "sysparm_limit": "2", "sysparm_offset": "2"},
    )
    check(trusted, reply.status_code == 200, "GET a page: 200", reply.text[:300])
    content_type = reply.headers.get("Content-Type", "").replace(" ", "").lower()
    same(
        trusted,
        content_type,
        "application/json;charset=utf-8",
        "Content-Type",
    )
    check(trusted, reply.headers.get("X-Total-Count") == "5", "X-Total-Count", reply.headers)
    links = {rel: value["url"] for rel, value in reply.links.items()}
    check(
        trusted,
        set(links) == {"first", "prev", "next", "last"},
        "Link: first, prev, next and last",
        reply.headers.get("Link"),
    )
    base = f"{trusted.url}{TABLE}/sys_user"
    for rel, offset in (("first", "0"), ("prev", "0"), ("next", "4"), ("last", "4")):
        url = links.get(rel, "")
        check(trusted, url.startswith(base + "?"), f"Link {rel} on {base}", url)
        params = urlsplit(url).query
        check(trusted, f"sysparm_offset={offset}" in params, f"Link {rel} offset {offset}", url)
        check(trusted, "sysparm_limit=2" in params, f"Link {rel} keeps sysparm_limit", url)

    suppressed = raw(
        trusted,
        "GET",
        f"{TABLE}/sys_user",
        params={
            "sysparm_query": query,
            "sysparm_limit": "2",
            "sysparm_suppress_pagination_header": "true",
        },
    )
    check(
        trusted,
        "Link" not in suppressed.headers,
        "sysparm_suppress_pagination_header=true: no Link header",
        suppressed.headers.get("Link"),
    )
    check(
        trusted,
        suppressed.headers.get("X-Total-Count") == "5",
        "X-Total-Count even with the Link header suppressed",
        suppressed.headers,
    )


def test_raw_location_of_a_new_record(trusted: ServedInstance) -> None:
    name = unique("rl")
    reply = raw(trusted, "POST", f"{TABLE}/sys_user", json={"user_name": name})
    check(trusted, reply.status_code == 201, "POST: 201 Created", reply.text[:300])
    sys_id = reply.json()["result"]["sys_id"]
    location = reply.headers.get("Location")
    same(
        trusted,
        location,
        f"{trusted.url}{TABLE}/sys_user/{sys_id}",
        "Location",
    )
    fetched = raw(trusted, "GET", f"{TABLE}/sys_user/{sys_id}")
    same(trusted, fetched.status_code, 200, "the Location can be fetched")


def test_raw_error_bodies(http_instance: ServedInstance) -> None:
    served = http_instance
    message = assert_error(
        served, raw(served, "GET", f"{TABLE}/sys_user/{'0' * 32}"), 404, "an unknown sys_id"
    )
    same(served, message, "No Record found", "404 message 'No Record found'")
    message = assert_error(
        served, raw(served, "GET", f"{TABLE}/sys_user", auth=None), 401, "no credentials"
    )
    same(served, message, "User Not Authenticated", "401 'User Not Authenticated'")
    message = assert_error(
        served, raw(served, "GET", f"{TABLE}/u_no_such_table"), 400, "an unknown table"
    )
    check(served, "u_no_such_table" in message, "400 names the table", message)
    bad_json = raw(
        served,
        "POST",
        f"{TABLE}/sys_user",
        data=b"{not json",
        headers={"Accept": "application/json", "Content-Type": "application/json"},
    )
    assert_error(served, bad_json, 400, "a body that is not JSON")


def test_raw_what_servicenow_ignores(http_instance: ServedInstance) -> None:
    """Parameters that do not apply, unknown sysparm_* names and unknown fields: ignored."""
    served = http_instance
    prefix = unique("ri")
    [user] = make_users(served, prefix, 1)
    path = f"{TABLE}/sys_user/{user['sys_id']}"
    ignored = {
        "sysparm_query": "active=true",
        "sysparm_limit": "10",
        "sysparm_offset": "0",
        "sysparm_no_such_thing": "x",
        "sysparm_fields": "user_name,u_no_such_field",
    }
    reply = raw(served, "GET", path, params=ignored)
    check(served, reply.status_code == 200, "GET by sys_id ignores list parameters", reply.text)
    check(
        served,
        reply.json()["result"] == {"user_name": f"{prefix}.00"},
        "an unknown field in sysparm_fields is left out",
        reply.json(),
    )
    reply = raw(served, "PATCH", path, params=ignored, json={"first_name": "X", "u_nope": "1"})
    check(
        served,
        reply.status_code == 200,
        "PATCH ignores list parameters and unknown fields",
        reply.text,
    )
    reply = raw(served, "DELETE", path, params=ignored)
    check(served, reply.status_code == 204, "DELETE ignores list parameters", reply.text)
    reply = raw(served, "GET", f"{TABLE}/sys_user", params={"sysparm_query": "u_no_such_field=1"})
    check(served, reply.status_code == 200, "a query on an unknown field is ignored", reply.text)
