"""ServiceNow's XML both ways (docs: "Table API" Accept / Content-Type application/xml):
answers under <response>, lists as repeated <result>, errors in XML too; XML request
bodies parsed safely (no DTD, no entities, UTF-8 only). Real HTTP, real instance."""

from __future__ import annotations

import xml.etree.ElementTree as ET
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from bridge.instance import auth
from bridge.instance.server import Instance
from tests.table_api_client import TABLE, Client, output, serve

pytestmark = pytest.mark.timeout(60)

XML = {"Accept": "application/xml"}
XML_BODY = {"Content-Type": "application/xml", "Accept": "application/xml"}


@pytest.fixture
async def served(tmp_path: Path) -> AsyncIterator[tuple[Instance, Client]]:
    async with serve(tmp_path) as pair:
        yield pair


def parsed(text: str) -> ET.Element:
    assert text.startswith('<?xml version="1.0" encoding="UTF-8"?><response>'), text[:200]
    return ET.fromstring(text)


async def test_xml_answers(served: tuple[Instance, Client]) -> None:
    inst, client = served
    first = await output(inst, name="a<&>b", payload='{"x": 1}')
    await output(inst, name="second")
    listed = await client.get(
        f"{TABLE}/ecc_queue", headers=XML, params={"sysparm_query": "ORDERBYname"}
    )
    assert listed.status == 200
    assert listed.headers["Content-Type"].startswith("application/xml")
    assert listed.headers["X-Total-Count"] == "2"
    root = parsed(listed.text)
    results = root.findall("result")
    assert [r.findtext("name") for r in results] == ["a<&>b", "second"]
    assert results[0].findtext("sys_id") == first["sys_id"]
    assert results[0].findtext("payload") == '{"x": 1}'
    one = await client.get(f"{TABLE}/ecc_queue/{first['sys_id']}", headers={"Accept": "text/xml"})
    assert parsed(one.text).findtext("result/queue") == "output"
    empty = await client.get(f"{TABLE}/ecc_queue", headers=XML, params={"name": "none"})
    assert list(parsed(empty.text)) == []

    person = await auth.create_user(
        inst.store, "fred", "user-pass-1234", roles=["itil"], first_name="Fred", last_name="Ng"
    )
    grant = await client.get(
        f"{TABLE}/sys_user_has_role",
        headers=XML,
        params={"user": person["sys_id"], "sysparm_display_value": "all"},
    )
    user = parsed(grant.text).find("result/user")
    assert user is not None
    assert user.findtext("value") == person["sys_id"]
    assert user.findtext("link", "").endswith(f"/sys_user/{person['sys_id']}")
    assert user.findtext("display_value") == "Fred Ng"  # sys_user shows its name


async def test_xml_errors_and_negotiation(served: tuple[Instance, Client]) -> None:
    _inst, client = served
    missing = await client.get(f"{TABLE}/ecc_queue/nope", headers=XML)
    assert missing.status == 404
    root = parsed(missing.text)
    assert root.findtext("error/message") == "No Record found"
    assert root.findtext("status") == "failure"
    assert root.findtext("error/detail")
    anonymous = await client.get(f"{TABLE}/ecc_queue", headers=XML, user=None)
    assert anonymous.status == 401
    assert parsed(anonymous.text).findtext("error/message") == "User Not Authenticated"
    for accept, xml in [
        ("application/json", False),
        ("*/*", False),
        ("text/html", False),
        ("application/json;q=0.5, application/xml", True),
        ("application/xml;q=0.2, application/json;q=0.9", False),
        ("application/xml, application/json", True),
        ("application/json, application/xml", False),
        ("application/xml;q=0", False),
    ]:
        reply = await client.get(f"{TABLE}/ecc_queue", headers={"Accept": accept})
        is_xml = reply.headers["Content-Type"].startswith("application/xml")
        assert is_xml == xml, accept


async def test_xml_request_bodies(served: tuple[Instance, Client]) -> None:
    inst, client = served
    body = (
        '<?xml version="1.0" encoding="UTF-8"?><request><entry>'
        "<queue>output</queue><name>from &lt;xml&gt;</name><priority>1</priority>"
        "<bogus>ignored</bogus><payload><![CDATA[<x a='1'/>]]></payload>"
        "</entry></request>"
    )
    made = await client.call("POST", f"{TABLE}/ecc_queue", data=body, headers=XML_BODY)
    assert made.status == 201, made.text
    created = parsed(made.text)
    assert created.findtext("result/name") == "from <xml>"
    assert created.findtext("result/payload") == "<x a='1'/>"
    sys_id = created.findtext("result/sys_id")
    flat = "<record><state>processed</state></record>"
    changed = await client.call(
        "PATCH",
        f"{TABLE}/ecc_queue/{sys_id}",
        data=flat,
        headers={"Content-Type": "text/xml"},
    )
    assert changed.status == 200, changed.text
    assert changed.result["state"] == "processed"  # JSON answer: no XML Accept
    stored = await inst.store.get("ecc_queue", str(sys_id))
    assert stored is not None
    assert (stored["priority"], stored["name"]) == (1, "from <xml>")


BILLION_LAUGHS = (
    '<?xml version="1.0"?><!DOCTYPE lolz [<!ENTITY lol "lol">'
    '<!ENTITY lol2 "&lol;&lol;&lol;&lol;&lol;&lol;&lol;&lol;&lol;&lol;">]>'
    "<request><entry><name>&lol2;</name></entry></request>"
)
EXTERNAL = (
    '<?xml version="1.0"?><!DOCTYPE r [<!ENTITY x SYSTEM "file:///etc/passwd">]>'
    "<request><entry><name>&x;</name></entry></request>"
)


@pytest.mark.parametrize(
    ("body", "words"),
    [
        (BILLION_LAUGHS.encode(), "markup declarations are refused"),
        (EXTERNAL.encode(), "markup declarations are refused"),
        (b'<!DOCTYPE r SYSTEM "http://127.0.0.1:9/x"><r><name>x</name></r>', "refused"),
        (EXTERNAL.encode("utf-16"), "not UTF-8"),
        (b"<request><entry><name>x</entry></request>", "not well-formed"),
        (b"<request><entry><name><b>x</b></name></entry></request>", "holds XML elements"),
        (b"<r><name>&undefined;</name></r>", "not well-formed"),
    ],
)
async def test_hostile_xml_bodies_are_refused(
    served: tuple[Instance, Client], body: bytes, words: str
) -> None:
    """Entity expansion (billion laughs), external entities (file and network), a DTD
    smuggled in UTF-16, malformed XML: 400 naming the fault; nothing stored, nothing read."""
    inst, client = served
    reply = await client.call(
        "POST",
        f"{TABLE}/ecc_queue",
        data=body,
        headers={"Content-Type": "application/xml"},
    )
    fault = reply.fault(400)
    assert "Invalid XML in the request body" in fault
    assert words in fault, fault
    assert "root:" not in reply.text
    assert await inst.store.count("ecc_queue") == 0
