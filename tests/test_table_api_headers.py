"""Link, X-Total-Count and Location headers, and reference links, as ServiceNow builds them
(docs: "Table API" response headers, "Pagination"): from ApiSettings.public_url when set,
else from trusted proxy headers (X-Forwarded-Proto / X-Forwarded-Host), else from the
request itself; a forged or malformed host is never echoed. Real HTTP, real instance."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from bridge.instance import auth
from bridge.instance.api import ApiSettings
from tests.table_api_client import TABLE, Client, output, serve

pytestmark = pytest.mark.timeout(60)


def links(header: str) -> dict[str, str]:
    """rel -> URL of a Link header."""
    return {rel: url for url, rel in re.findall(r'<([^>]+)>;rel="(\w+)"', header)}


async def fill(client: Client, count: int) -> None:
    for i in range(count):
        made = await client.post(f"{TABLE}/ecc_queue", {"queue": "output", "name": f"n{i}"})
        assert made.status == 201


async def test_pagination_headers(tmp_path: Path) -> None:
    async with serve(tmp_path) as (_inst, client):
        await fill(client, 5)
        page = await client.get(
            f"{TABLE}/ecc_queue",
            params={"sysparm_limit": "2", "sysparm_offset": "2", "sysparm_query": "ORDERBYname"},
        )
        assert [r["name"] for r in page.result] == ["n2", "n3"]
        assert page.headers["X-Total-Count"] == "5"
        found = links(page.headers["Link"])
        assert set(found) == {"first", "prev", "next", "last"}
        base = f"{client.url}{TABLE}/ecc_queue?"
        assert all(url.startswith(base) for url in found.values()), found
        assert "sysparm_offset=4" in found["next"]
        assert "sysparm_offset=0" in found["prev"]
        assert "sysparm_offset=4" in found["last"]
        assert "sysparm_query=ORDERBYname" in found["next"]
        followed = await client.call("GET", found["next"][len(client.url) :])
        assert [r["name"] for r in followed.result] == ["n4"]
        suppressed = await client.get(
            f"{TABLE}/ecc_queue",
            params={"sysparm_limit": "2", "sysparm_suppress_pagination_header": "true"},
        )
        assert "Link" not in suppressed.headers
        assert suppressed.headers["X-Total-Count"] == "5"
        uncounted = await client.get(
            f"{TABLE}/ecc_queue", params={"sysparm_limit": "2", "sysparm_no_count": "true"}
        )
        assert "X-Total-Count" not in uncounted.headers
        assert set(links(uncounted.headers["Link"])) == {"first", "next"}  # no count: no last
        end = await client.get(
            f"{TABLE}/ecc_queue",
            params={"sysparm_limit": "2", "sysparm_offset": "4", "sysparm_no_count": "true"},
        )
        assert set(links(end.headers["Link"])) == {"first", "prev"}


async def test_public_url_is_the_base_of_every_link(tmp_path: Path) -> None:
    public = "https://instance.example.com"
    async with serve(tmp_path, public_url=public + "/") as (inst, client):
        await fill(client, 3)
        made = await client.post(f"{TABLE}/ecc_queue", {"queue": "output"})
        assert made.headers["Location"] == f"{public}{TABLE}/ecc_queue/{made.result['sys_id']}"
        page = await client.get(f"{TABLE}/ecc_queue", params={"sysparm_limit": "1"})
        assert all(url.startswith(public + TABLE) for url in links(page.headers["Link"]).values())
        person = await auth.create_user(inst.store, "fred", "user-pass-1234", roles=["itil"])
        grants = await client.get(f"{TABLE}/sys_user_has_role", params={"user": person["sys_id"]})
        assert grants.result[0]["user"]["link"] == f"{public}{TABLE}/sys_user/{person['sys_id']}"
        forged = {"X-Forwarded-Host": "evil.example", "X-Forwarded-Proto": "http"}
        again = await client.post(f"{TABLE}/ecc_queue", {"queue": "output"}, headers=forged)
        assert again.headers["Location"].startswith(public + "/")


async def test_forwarded_headers_count_only_when_trusted(tmp_path: Path) -> None:
    proxy = {"X-Forwarded-Proto": "https", "X-Forwarded-Host": "sn.example.org:8443"}
    async with serve(tmp_path / "trusted", trust_forwarded=True) as (_inst, client):
        made = await client.post(f"{TABLE}/ecc_queue", {"queue": "output"}, headers=proxy)
        assert made.headers["Location"].startswith("https://sn.example.org:8443/api/now/table/")
        chained = {"X-Forwarded-Proto": "http, https", "X-Forwarded-Host": "a.example, b.example"}
        made = await client.post(f"{TABLE}/ecc_queue", {"queue": "output"}, headers=chained)
        assert made.headers["Location"].startswith("https://b.example/api/now/table/")
        for host in ("evil.example/path", "x y", "a@b", "<script>", "h:99999999"):
            bad = {"X-Forwarded-Proto": "https", "X-Forwarded-Host": host}
            made = await client.post(f"{TABLE}/ecc_queue", {"queue": "output"}, headers=bad)
            location = made.headers["Location"]
            assert location.startswith("https://127.0.0.1:"), (host, location)
    async with serve(tmp_path / "direct") as (_inst, client):
        made = await client.post(f"{TABLE}/ecc_queue", {"queue": "output"}, headers=proxy)
        assert made.headers["Location"].startswith(f"{client.url}/api/now/table/")


def test_public_url_must_be_a_url() -> None:
    for bad in ("instance.example.com", "ftp://x", "https://", "https://h/?q=1"):
        with pytest.raises(ValueError, match="public_url"):
            ApiSettings(public_url=bad)
    assert ApiSettings(public_url="https://h.example:8443/sn").public_url


async def test_a_malformed_host_header_is_not_echoed(tmp_path: Path) -> None:
    async with serve(tmp_path) as (inst, client):
        await output(inst)
        made = await client.post(
            f"{TABLE}/ecc_queue", {"queue": "output"}, headers={"Host": "evil.example/x?"}
        )
        assert made.status == 201, made.text
        assert made.headers["Location"].startswith("http://127.0.0.1:")
