"""RESTProbe's ``urls`` form: one job, the same request to many URLs, against real servers.

The target app, the PKI, the credentials and the probe context come from tests/test_http.py;
a small app of this module's own counts the requests it is serving at once.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import orjson
import pytest
from aiohttp import web

from bridge.wire.client import output_record
from bridge.wire.errors import BadParameter, Refused
from bridge.wire.records import OutputRecord
from probes.contract import Job, ProbeContext
from probes.http import SPEC, TOPIC, HttpClient, RESTParams
from tests.brokers import BrokerAddress
from tests.harness import bridge_and_client, make_config, probe_settings
from tests.test_http import (
    BASIC_HEADER,
    SECRETS,
    SESSION_COOKIE,
    Pki,
    Target,
    closed_port,
    credentials_file,
    ctx,
    header_values,
    http_context,
    pki,
    target,
)

# The fixtures of tests/test_http.py, used here by name: importing them is what makes pytest
# offer them to this module's tests (and naming them here keeps them from looking unused).
FIXTURES = (pki, target, ctx, credentials_file)

JOB_TIMEOUT = 10.0  # no test here needs more than a fraction of it


# --- helpers -----------------------------------------------------------------------------------


async def run_chunks(
    ctx: ProbeContext, payload: dict[str, Any], *, sys_id: str = "urls-1"
) -> list[dict[str, Any]]:
    """Build the parameters as the bridge does and run the job to its last chunk."""
    record = OutputRecord(sys_id=sys_id, topic=TOPIC, payload=payload)
    params = SPEC.build_params(record, ctx.settings)
    async with asyncio.timeout(JOB_TIMEOUT):
        return [chunk async for chunk in SPEC.run(Job(record, params), ctx)]


def all_responses(chunks: list[dict[str, Any]]) -> list[dict[str, Any]]:
    return [entry for chunk in chunks for entry in chunk["responses"]]


def by_index(chunks: list[dict[str, Any]]) -> dict[int, dict[str, Any]]:
    entries = all_responses(chunks)
    indexed = {entry["index"]: entry for entry in entries}
    assert len(indexed) == len(entries), "an index answered twice"
    return indexed


def client_of(ctx: ProbeContext) -> HttpClient:
    client = ctx.resource
    assert isinstance(client, HttpClient)
    return client


async def eventually(check: Callable[[], bool], within: float = 3.0) -> bool:
    """Whether ``check()`` holds within ``within`` seconds (polled)."""
    deadline = time.monotonic() + within
    while not check():
        if time.monotonic() > deadline:
            return False
        await asyncio.sleep(0.01)
    return True


# --- a server that counts the requests it serves at once ----------------------------------------


@dataclass
class Counter:
    base: str = ""  # http://127.0.0.1:<port>
    in_flight: int = 0  # /count handlers running
    peak: int = 0
    seen: list[str] = field(default_factory=list)  # /count names, in arrival order
    held: int = 0  # /hold handlers running (cancelled when the client goes away)
    held_peak: int = 0
    held_answered: int = 0  # /hold handlers that ran to their answer
    release: asyncio.Event = field(default_factory=asyncio.Event)


def make_counter_app(counter: Counter) -> web.Application:
    routes = web.RouteTableDef()

    @routes.get("/count/{name}")
    async def count(request: web.Request) -> web.Response:
        name = request.match_info["name"]
        counter.seen.append(name)
        counter.in_flight += 1
        counter.peak = max(counter.peak, counter.in_flight)
        try:
            await asyncio.sleep(0.03)
        finally:
            counter.in_flight -= 1  # before the answer leaves: the client cannot overlap it
        return web.Response(text=name)

    @routes.get("/hold/{name}")
    async def hold(request: web.Request) -> web.Response:
        counter.held += 1
        counter.held_peak = max(counter.held_peak, counter.held)
        try:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(counter.release.wait(), 5.0)
        finally:
            counter.held -= 1
        counter.held_answered += 1
        return web.Response(text="released")

    app = web.Application()
    app.add_routes(routes)
    return app


@pytest.fixture
async def counter() -> AsyncIterator[Counter]:
    state = Counter()
    # handler_cancellation: a handler whose client went away is cancelled, so the count of
    # running /hold handlers falls when the probe drops its requests.
    runner = web.AppRunner(
        make_counter_app(state), access_log=None, handler_cancellation=True, shutdown_timeout=1.0
    )
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    port = runner.addresses[0][1]
    state.base = f"http://127.0.0.1:{port}"
    yield state
    state.release.set()
    await runner.cleanup()


# --- answers -----------------------------------------------------------------------------------


async def test_every_url_answers_with_its_index_in_chunks(
    ctx: ProbeContext, target: Target
) -> None:
    urls = [
        f"{target.http}/hello",
        f"{target.http}/echo",
        f"{target.http}/hello",  # listed twice: asked twice, answered twice
        f"{target.http}/status/503",
        f"{target.http}/no-such-path",
        f"{target.http}/empty",
        f"{target.http}/json",
    ]
    chunks = await run_chunks(
        ctx,
        {
            "urls": urls,
            "chunk_responses": 2,
            "query": {"q": "1"},
            "headers": {"X-Test": "yes", "Cookie": "c=1"},
        },
    )
    assert [len(chunk["responses"]) for chunk in chunks] == [2, 2, 2, 1]
    for chunk in chunks:
        assert chunk["method"] == "GET"
        assert chunk["request"] == {
            "headers": {"X-Test": "yes", "Cookie": "<redacted>"},
            "credential_id": None,
            "credential_type": None,
        }
    assert all("summary" not in chunk for chunk in chunks[:-1])
    assert chunks[-1]["summary"] == {
        "requests": 7,
        "answered": 7,
        "failed": 0,
        "statuses": {"200": 4, "503": 1, "404": 1, "204": 1},
    }
    entries = by_index(chunks)
    assert sorted(entries) == list(range(7))
    expected = {
        0: (200, "hello"),
        2: (200, "hello"),
        3: (503, "status"),
        4: (404, "404: Not Found"),
        5: (204, ""),
    }
    for index, (status, body) in expected.items():
        assert (entries[index]["status"], entries[index]["body"]) == (status, body), index
    assert entries[1]["json"]["x_test"] == "yes"  # the job's headers and query went along
    assert entries[1]["json"]["cookie"] == "c=1"
    assert entries[1]["json"]["query"] == [["q", "1"]]
    assert entries[6]["json"] == {"a": 1, "items": [1, 2, 3], "name": "ünï"}
    assert header_values(entries[0], "X-Multi") == ["a", "b"]
    for index, entry in entries.items():
        assert list(entry)[:2] == ["index", "url"]
        assert entry["url"] == urls[index]
        assert entry["reason"]
        assert entry["http_version"] == "1.1"
        assert entry["truncated"] is False
        assert entry["timings_ms"]["total"] > 0
        for absent in ("method", "request", "final_url", "redirects", "tls", "error"):
            assert absent not in entry, (index, absent)
    orjson.dumps(chunks)  # the chunks travel as JSON


async def test_response_headers_false_leaves_the_headers_out(
    ctx: ProbeContext, target: Target
) -> None:
    urls = [f"{target.http}/hello", f"{target.http}/json"]
    chunks = await run_chunks(ctx, {"urls": urls, "response_headers": "false"})
    entries = by_index(chunks)
    assert [entries[i]["status"] for i in (0, 1)] == [200, 200]
    assert entries[0]["body"] == "hello"
    assert entries[1]["content_type"] == "application/json"  # kept: it says how to read body
    assert entries[1]["json"]["items"] == [1, 2, 3]
    assert all("headers" not in entry for entry in entries.values())
    with_headers = by_index(await run_chunks(ctx, {"urls": urls}))
    assert all("headers" in entry for entry in with_headers.values())


async def test_a_timed_out_request_does_not_cancel_the_next_one_of_its_worker(
    ctx: ProbeContext, target: Target
) -> None:
    # One worker: the slow URL's deadline fires, then the same task runs the fast ones.
    urls = [f"{target.http}/slow", f"{target.http}/hello", f"{target.http}/hello"]
    chunks = await run_chunks(ctx, {"urls": urls, "timeout": 0.2, "concurrency": 1})
    entries = by_index(chunks)
    assert entries[0]["error"]["kind"] == "timeout"
    assert [entries[i]["body"] for i in (1, 2)] == ["hello", "hello"]
    client = ctx.resource
    assert isinstance(client, HttpClient)
    assert len(client.deadlines) == 0  # every request's deadline was taken back


async def test_failed_requests_are_entries_not_a_failed_job(
    ctx: ProbeContext, target: Target
) -> None:
    port = closed_port()
    urls = [
        f"{target.http}/hello",
        f"http://127.0.0.1:{port}/x",
        f"{target.http}/slow",
        f"{target.http}/json",
    ]
    started = time.monotonic()
    chunks = await run_chunks(ctx, {"urls": urls, "timeout": 0.3})
    assert time.monotonic() - started < 3.0
    assert len(chunks) == 1
    entries = by_index(chunks)
    assert entries[1] == {
        "index": 1,
        "url": urls[1],
        "error": {
            "kind": "connection_refused",
            "message": f"connection refused by 127.0.0.1:{port}",
        },
    }
    assert entries[2] == {
        "index": 2,
        "url": urls[2],
        "error": {"kind": "timeout", "message": "no complete answer within 0.3 s (timeout)"},
    }
    assert (entries[0]["status"], entries[0]["body"]) == (200, "hello")
    assert entries[3]["json"]["a"] == 1
    assert all_responses(chunks)[-1]["index"] == 2  # completion order: the timeout comes last
    assert chunks[0]["summary"] == {
        "requests": 4,
        "answered": 2,
        "failed": 2,
        "statuses": {"200": 2},
    }


async def test_only_redirected_entries_carry_final_url_and_redirects(
    ctx: ProbeContext, target: Target
) -> None:
    urls = [f"{target.http}/redirect/2", f"{target.http}/hello", f"{target.http}/loop"]
    entries = by_index(await run_chunks(ctx, {"urls": urls}))
    moved = entries[0]
    assert (moved["status"], moved["body"]) == (200, "landed")
    assert moved["final_url"] == f"{target.http}/redirect/0"
    assert moved["redirects"] == [
        {"status": 302, "url": f"{target.http}/redirect/2", "location": "/redirect/1"},
        {"status": 302, "url": f"{target.http}/redirect/1", "location": "/redirect/0"},
    ]
    assert "final_url" not in entries[1]
    assert "redirects" not in entries[1]
    assert entries[2]["error"] == {
        "kind": "protocol_error",
        "message": "too many redirects: more than 5",
    }


# --- TLS ---------------------------------------------------------------------------------------


async def test_https_urls_report_tls_with_the_ca_bundle(
    ctx: ProbeContext, target: Target, pki: Pki
) -> None:
    urls = [
        f"{target.https}/hello",
        f"https://localhost:{target.tls_port}/json",
        f"{target.http}/hello",
    ]
    entries = by_index(await run_chunks(ctx, {"urls": urls, "ca_file": str(pki.ca_file)}))
    for index in (0, 1):
        entry = entries[index]
        assert entry["status"] == 200
        tls = entry["tls"]
        assert tls["verified"] is True
        assert tls["version"].startswith("TLSv1.")
        cert = tls["peer_certificate"]
        assert cert["subject"] == "CN=target.test,O=midbridge tests"
        assert cert["serial"] == format(pki.server.serial_number, "x")
        assert cert["san_ip"] == ["127.0.0.1"]
    assert entries[1]["json"]["a"] == 1
    assert entries[2]["body"] == "hello"
    assert "tls" not in entries[2]


async def test_unverifiable_https_is_a_tls_error_entry(ctx: ProbeContext, target: Target) -> None:
    urls = [f"{target.https}/hello", f"{target.http}/hello"]
    chunks = await run_chunks(ctx, {"urls": urls})  # verify on, no CA: the job still succeeds
    entries = by_index(chunks)
    assert set(entries[0]) == {"index", "url", "error"}
    assert entries[0]["error"]["kind"] == "tls_error"
    assert entries[0]["error"]["message"].startswith("tls: certificate verify failed")
    assert f"127.0.0.1:{target.tls_port}" in entries[0]["error"]["message"]
    assert entries[1]["status"] == 200
    assert chunks[-1]["summary"] == {
        "requests": 2,
        "answered": 1,
        "failed": 1,
        "statuses": {"200": 1},
    }


# --- credentials -------------------------------------------------------------------------------


async def test_credential_goes_to_every_url_and_no_secret_comes_back(
    ctx: ProbeContext, target: Target, pki: Pki
) -> None:
    urls = [
        f"{target.http}/auth",
        f"https://127.0.0.1:{target.tls_port}/auth",
        f"http://localhost:{target.port}/auth",
    ]
    chunks = await run_chunks(
        ctx,
        {
            "urls": urls,
            "credential_id": "web-basic",
            "ca_file": str(pki.ca_file),
            "chunk_responses": 1,
        },
    )
    assert len(chunks) == 3
    assert target.seen_auth == [BASIC_HEADER] * 3
    for chunk in chunks:
        assert chunk["request"] == {
            "headers": {},
            "credential_id": "web-basic",
            "credential_type": "http_basic",
        }
    entries = by_index(chunks)
    assert sorted(entries) == [0, 1, 2]
    for entry in entries.values():
        assert entry["status"] == 200
        assert entry["json"] == {"authorized": True}
        assert header_values(entry, "Set-Cookie") == ["session=<redacted>; HttpOnly; Path=/"]
    assert chunks[-1]["summary"]["statuses"] == {"200": 3}
    text = orjson.dumps(chunks).decode()
    for secret in (*SECRETS, SESSION_COOKIE):
        assert secret not in text


# --- concurrency and the shared budget -----------------------------------------------------------


async def test_concurrency_caps_requests_at_once(ctx: ProbeContext, counter: Counter) -> None:
    urls = [f"{counter.base}/count/{n}" for n in range(8)]
    chunks = await run_chunks(ctx, {"urls": urls, "concurrency": 2})
    assert counter.peak == 2
    entries = by_index(chunks)
    assert [entries[n]["body"] for n in range(8)] == [str(n) for n in range(8)]
    assert sorted(counter.seen) == sorted(str(n) for n in range(8))
    assert client_of(ctx).budget._value == 100  # the pool's limit: every slot back
    # The cap is the parameter, not the server or the pool: with more, more at once.
    counter.peak = 0
    await run_chunks(ctx, {"urls": urls, "concurrency": 8})
    assert counter.peak > 2


async def test_max_in_flight_is_shared_by_all_urls_jobs(
    credentials_file: Path, counter: Counter
) -> None:
    async with http_context(credentials_file, {"timings": True, "max_in_flight": 1}) as ctx:
        first = [f"{counter.base}/count/a{n}" for n in range(4)]
        second = [f"{counter.base}/count/b{n}" for n in range(4)]
        a, b = await asyncio.gather(
            run_chunks(ctx, {"urls": first, "concurrency": 4}, sys_id="job-a"),
            run_chunks(ctx, {"urls": second, "concurrency": 4}, sys_id="job-b"),
        )
        assert counter.peak == 1
        assert [entry["body"] for entry in sorted(all_responses(a), key=lambda e: e["index"])] == [
            f"a{n}" for n in range(4)
        ]
        assert [entry["body"] for entry in sorted(all_responses(b), key=lambda e: e["index"])] == [
            f"b{n}" for n in range(4)
        ]
        assert a[-1]["summary"]["answered"] == b[-1]["summary"]["answered"] == 4
        # The one slot's worker keeps it while its job has URLs: jobs are served in turn.
        assert {name[0] for name in counter.seen[:4]} in ({"a"}, {"b"})
        assert len(counter.seen) == 8
        assert client_of(ctx).budget._value == 1


async def test_closing_the_job_cancels_its_requests_and_frees_the_budget(
    credentials_file: Path, counter: Counter
) -> None:
    async with http_context(credentials_file, {"max_in_flight": 7}) as ctx:
        urls = [
            f"{counter.base}/count/a",
            f"{counter.base}/count/b",
            f"{counter.base}/hold/1",
            f"{counter.base}/hold/2",
            f"{counter.base}/hold/3",
        ]
        record = OutputRecord(
            sys_id="cancel-1", topic=TOPIC, payload={"urls": urls, "chunk_responses": 1}
        )
        gen = SPEC.run(Job(record, SPEC.build_params(record, ctx.settings)), ctx)
        try:
            async with asyncio.timeout(JOB_TIMEOUT):
                first = await anext(gen)
            assert "summary" not in first
            [entry] = first["responses"]
            assert entry["index"] in (0, 1)
            assert entry["status"] == 200
            assert await eventually(lambda: counter.held == 3)
            budget = client_of(ctx).budget
            # One slot per request still running (the finished ones' slots come back a loop
            # iteration after their answers).
            assert await eventually(lambda: budget._value == 7 - 3), budget._value
        finally:
            closing = time.monotonic()
            async with asyncio.timeout(JOB_TIMEOUT):
                await gen.aclose()  # type: ignore[attr-defined]
        # Closed at once (the held requests would take 5 s), every slot back.
        assert time.monotonic() - closing < 1.0
        assert budget._value == 7
        assert await eventually(lambda: counter.held == 0), f"{counter.held} still served"
        assert counter.held_peak == 3
        assert counter.held_answered == 0  # they ended because the probe went away


# --- parameters --------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("payload", "words"),
    [
        (
            {"url": "http://127.0.0.1/", "urls": ["http://127.0.0.1/"]},
            "give either url or urls, not both",
        ),
        ({"urls": []}, "is empty: give at least one URL"),
        ({"urls": " \n\t "}, "is empty: give at least one URL"),
        (
            {"urls": ["http://127.0.0.1/", "ftp://127.0.0.1/file"]},
            "entry 1: scheme must be http or https, got 'ftp'",
        ),
        ({"urls": ["http://127.0.0.1/", 5]}, "entry 1: is not text"),
        ({"urls": ["http://user:pw@127.0.0.1/"]}, "entry 0: may not carry user:password@"),
        ({"urls": "http://127.0.0.1/a ftp://127.0.0.1/b"}, "entry 1: scheme must be http"),
    ],
    ids=["url-and-urls", "empty-list", "blank-text", "ftp", "not-text", "userinfo", "text-ftp"],
)
def test_bad_urls_name_urls(payload: dict[str, Any], words: str) -> None:
    record = OutputRecord(sys_id="bad-1", topic=TOPIC, payload=payload)
    with pytest.raises(BadParameter) as info:
        SPEC.build_params(record, probe_settings(SPEC))
    assert info.value.field == "urls"
    assert info.value.kind == "bad_parameter"
    assert words in info.value.message


def test_more_urls_than_max_urls_is_refused() -> None:
    urls = [f"http://127.0.0.1/{n}" for n in range(4)]
    at_limit = OutputRecord(sys_id="max-1", topic=TOPIC, payload={"urls": urls[:3]})
    params = SPEC.build_params(at_limit, probe_settings(SPEC, {"max_urls": 3}))
    assert isinstance(params, RESTParams)
    assert params.urls == tuple(urls[:3])
    over = OutputRecord(sys_id="max-2", topic=TOPIC, payload={"urls": urls})
    with pytest.raises(Refused) as info:
        SPEC.build_params(over, probe_settings(SPEC, {"max_urls": 3}))
    assert info.value.field == "urls"
    assert info.value.kind == "refused"
    assert (
        info.value.message == "4 URLs is over the limit of 3 (probes.settings.RESTProbe.max_urls)"
    )
    SPEC.build_params(over, probe_settings(SPEC))  # the default (10,000) lets them through


async def test_urls_as_text_separated_by_white_space(ctx: ProbeContext, target: Target) -> None:
    text = f"\n  {target.http}/hello\n\t{target.http}/json   {target.http}/status/404 \n"
    record = OutputRecord(sys_id="xml-1", topic=TOPIC, payload={"urls": text})
    params = SPEC.build_params(record, probe_settings(SPEC))
    assert isinstance(params, RESTParams)
    assert params.urls == (
        f"{target.http}/hello",
        f"{target.http}/json",
        f"{target.http}/status/404",
    )
    # As XML parameters arrive: every value text.
    chunks = await run_chunks(
        ctx, {"urls": text, "concurrency": "2", "chunk_responses": "2", "timeout": "5"}
    )
    assert len(chunks) == 2
    entries = by_index(chunks)
    assert [entries[n]["status"] for n in range(3)] == [200, 200, 404]
    assert chunks[-1]["summary"]["statuses"] == {"200": 2, "404": 1}


def test_a_urls_job_has_no_host_key() -> None:
    record = OutputRecord(
        sys_id="h-1", topic=TOPIC, payload={"urls": ["https://Example.COM/x", "http://b.test/"]}
    )
    params = SPEC.build_params(record, probe_settings(SPEC))
    assert SPEC.target_host(params) is None
    one = OutputRecord(sys_id="h-2", topic=TOPIC, payload={"url": "https://Example.COM/x"})
    assert SPEC.target_host(SPEC.build_params(one, probe_settings(SPEC))) == "example.com"


# --- through the bridge and the broker -------------------------------------------------------


async def test_urls_job_end_to_end(
    broker: BrokerAddress,
    unique_agent: str,
    tmp_path: Path,
    target: Target,
    credentials_file: Path,
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.DEBUG)
    state_dir = tmp_path / "state"
    config = make_config(broker.host, broker.port, unique_agent, state_dir)
    config.bridge.credentials_file = credentials_file
    config.probes.settings = {TOPIC: {"max_urls": 8}}
    agent = f"mid.server.{unique_agent}"
    port = closed_port()
    urls = [
        f"{target.http}/hello",
        f"{target.http}/json",
        f"{target.http}/status/404",
        f"http://127.0.0.1:{port}/",
        f"{target.http}/redirect/1",
        f"{target.http}/auth",
    ]
    xml_urls = f"{target.http}/hello&#10;  {target.http}/status/503"
    xml = (
        f'<parameters><parameter name="urls" value="{xml_urls}"/>'
        '<parameter name="concurrency" value="2"/></parameters>'
    )
    many = {"urls": urls, "credential_id": "web-basic", "chunk_responses": 2, "concurrency": 3}
    jobs = [
        output_record(TOPIC, agent=agent, payload=many, name="many"),
        output_record(TOPIC, agent=agent, payload=xml),
        output_record(TOPIC, agent=agent, payload={"urls": [urls[0], "ftp://127.0.0.1/"]}),
        output_record(TOPIC, agent=agent, payload={"url": urls[0], "urls": urls}),
        output_record(TOPIC, agent=agent, payload={"urls": [urls[0]] * 9}),
    ]
    async with bridge_and_client(config) as (_bridge, client):
        await client.send(jobs)
        results = await client.wait([job["sys_id"] for job in jobs], timeout=20)
    main, from_xml, ftp, both, too_many = results

    records = main.records
    assert [r["sequence"] for r in records] == [0, 1, 2]
    assert [r["complete"] for r in records] == [False, False, True]
    assert {r["response_to"] for r in records} == {jobs[0]["sys_id"]}
    assert len({r["run"] for r in records}) == 1
    assert len({r["sys_id"] for r in records}) == 3
    for r in records:
        assert (r["topic"], r["queue"], r["name"], r["agent"]) == (TOPIC, "input", "many", agent)
        assert (r["error_string"], r["result_code"]) == ("", 0)
        assert r["payload"]["method"] == "GET"
        assert r["payload"]["request"] == {
            "headers": {},
            "credential_id": "web-basic",
            "credential_type": "http_basic",
        }
        assert len(r["payload"]["responses"]) == 2
    assert "summary" not in records[0]["payload"]
    assert "summary" not in records[1]["payload"]
    assert records[2]["payload"]["summary"] == {
        "requests": 6,
        "answered": 5,
        "failed": 1,
        "statuses": {"200": 4, "404": 1},
    }
    assert "probe_time" in records[2]
    entries = {e["index"]: e for r in records for e in r["payload"]["responses"]}
    assert sorted(entries) == list(range(6))
    assert [entries[n].get("status") for n in range(6)] == [200, 200, 404, None, 200, 200]
    assert entries[0]["body"] == "hello"
    assert entries[1]["json"]["a"] == 1
    assert entries[3]["error"]["kind"] == "connection_refused"
    assert entries[4]["final_url"] == f"{target.http}/redirect/0"
    assert entries[5]["json"] == {"authorized": True}
    assert "final_url" not in entries[0]
    # The credential went to every URL of the target server (not to the closed port).
    assert target.seen_auth == [BASIC_HEADER]

    [xml_record] = from_xml.records
    assert xml_record["complete"] is True
    assert xml_record["error_string"] == ""
    xml_entries = {e["index"]: e for e in xml_record["payload"]["responses"]}
    assert (xml_entries[0]["status"], xml_entries[1]["status"]) == (200, 503)
    assert xml_record["payload"]["summary"]["statuses"] == {"200": 1, "503": 1}

    assert ftp.final["payload"]["error"] == {
        "kind": "bad_parameter",
        "message": "entry 1: scheme must be http or https, got 'ftp'",
        "field": "urls",
    }
    assert both.final["payload"]["error"] == {
        "kind": "bad_parameter",
        "message": "give either url or urls, not both",
        "field": "urls",
    }
    assert too_many.final["payload"]["error"] == {
        "kind": "refused",
        "message": "9 URLs is over the limit of 8 (probes.settings.RESTProbe.max_urls)",
        "field": "urls",
    }
    for failed in (ftp, both, too_many):
        assert len(failed.records) == 1
        assert failed.final["complete"] is True
        assert failed.final["result_code"] == 1
        assert failed.final["error_string"].startswith(failed.final["payload"]["error"]["kind"])

    wire = orjson.dumps([r.records for r in results]).decode()
    logs = caplog.text
    stored = b"".join(p.read_bytes() for p in state_dir.rglob("*") if p.is_file())
    for secret in (*SECRETS, SESSION_COOKIE):
        assert secret not in wire
        assert secret not in logs
        assert secret.encode() not in stored
