"""Attacks on the bridge's trust boundary (issue 12), each through the real path.

A real broker, a real ``Bridge`` and the platform's side as an ``EccClient``: the attacker
publishes what anyone with write access to the agent's output topic could publish (a
forged record, a captured signed record replayed), and each test checks that the real job
still runs and the attacker's record does not.
"""

from __future__ import annotations

import asyncio
import base64
import logging
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import orjson
import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from bridge.wire.client import EccClient, JobResult, output_record
from bridge.wire.sealing import b64, canonical, sign_record
from tests.brokers import BrokerAddress
from tests.harness import bridge_and_client, make_config

TIMEOUT = 10.0


def platform_keys() -> tuple[Ed25519PrivateKey, str]:
    private = Ed25519PrivateKey.generate()
    raw = private.public_key().public_bytes(
        serialization.Encoding.Raw, serialization.PublicFormat.Raw
    )
    return private, base64.b64encode(raw).decode()


def complete_records(result: JobResult) -> list[dict[str, Any]]:
    """Every complete record received for a job, one per run, in arrival order of runs."""
    return [
        chunks[max(chunks)] for chunks in result.runs.values() if chunks[max(chunks)]["complete"]
    ]


async def until(predicate: Callable[[], bool], what: str, within: float = TIMEOUT) -> None:
    deadline = time.monotonic() + within
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {within:.0f} s waiting for {what}")
        await asyncio.sleep(0.02)


async def publish_raw(client: EccClient, record: dict[str, Any]) -> None:
    """Publish exactly these bytes (a forged or captured record), acknowledged by the broker."""
    await client.send_raw(orjson.dumps(record))


# --- F5: a refused record must not poison the dedupe ledger -------------------------------


async def test_a_forged_unsigned_record_does_not_make_the_bridge_drop_the_real_job(
    broker: BrokerAddress, unique_agent: str, tmp_path: Path
) -> None:
    """The attacker publishes an unsigned record carrying the sys_id of a job the platform
    is about to send, hoping the bridge files that id as done and drops the real, signed
    job as a duplicate. The forged record is refused; the real job runs and is answered."""
    private, public_b64 = platform_keys()
    agent = f"mid.server.{unique_agent}"
    config = make_config(
        broker.host,
        broker.port,
        unique_agent,
        tmp_path,
        security={"require_signatures": True, "platform_key": public_b64},
    )
    real = sign_record(private, output_record("Echo", agent=agent, payload={"message": "real"}))
    forged = {**real, "payload": {"message": "forged"}}
    del forged["signature"]
    async with bridge_and_client(config) as (bridge, client):
        client.expect([real["sys_id"]])
        result = client.results[real["sys_id"]]
        await publish_raw(client, forged)
        await until(lambda: len(complete_records(result)) == 1, "the forged record's refusal")
        refusal = complete_records(result)[0]
        assert refusal["error_string"].startswith("bad_record: signature: ")
        await publish_raw(client, real)
        await until(lambda: len(complete_records(result)) == 2, "the real job's answer")
    answer = complete_records(result)[1]
    assert answer["error_string"] == ""
    assert answer["payload"]["message"] == "real"
    assert bridge.counters.processed == 1
    assert bridge.counters.duplicates == 0


# --- F9: signed jobs carry their freshness -------------------------------------------------


async def test_a_captured_signed_job_replayed_after_the_dedupe_window_is_refused(
    broker: BrokerAddress, unique_agent: str, tmp_path: Path
) -> None:
    """The attacker captures a signed job off the wire and publishes it again once the
    bridge's dedupe ledger has forgotten its sys_id. The signature still verifies, but the
    signed validity has run out: the replay is answered ``bad_record: valid_until`` and the
    job does not run a second time."""
    private, public_b64 = platform_keys()
    agent = f"mid.server.{unique_agent}"
    window = 2.0
    config = make_config(
        broker.host,
        broker.port,
        unique_agent,
        tmp_path,
        limits={"dedupe_window": window},
        security={"require_signatures": True, "platform_key": public_b64, "clock_skew": 0},
    )
    captured = sign_record(
        private, output_record("Echo", agent=agent, payload={"message": "once"}), valid_for=1.0
    )
    async with bridge_and_client(config) as (bridge, client):
        client.expect([captured["sys_id"]])
        result = client.results[captured["sys_id"]]
        await publish_raw(client, captured)
        await until(lambda: len(complete_records(result)) == 1, "the job's answer")
        assert complete_records(result)[0]["error_string"] == ""
        answered_at = time.time()
        # Past the dedupe window: the ledger no longer knows the sys_id.
        await asyncio.sleep(max(0.0, answered_at + window + 0.3 - time.time()))
        assert not await bridge.store.is_done(captured["sys_id"])
        await publish_raw(client, captured)
        await until(lambda: len(complete_records(result)) == 2, "the replay's answer")
    replay = complete_records(result)[1]
    assert replay["error_string"].startswith("bad_record: valid_until: the signed record expired")
    assert replay["payload"]["error"]["field"] == "valid_until"
    assert bridge.counters.processed == 1


async def test_signed_records_without_or_outside_their_freshness_are_refused(
    broker: BrokerAddress, unique_agent: str, tmp_path: Path
) -> None:
    """The attacker holds records signed the old way (no issued_at / valid_until, valid
    forever), and tries to stretch a record's validity or post-date it. None runs; each
    answer names the field. A freshly signed record still runs."""
    private, public_b64 = platform_keys()
    agent = f"mid.server.{unique_agent}"
    config = make_config(
        broker.host,
        broker.port,
        unique_agent,
        tmp_path,
        security={"require_signatures": True, "platform_key": public_b64, "clock_skew": 5},
    )

    def job(message: str) -> dict[str, Any]:
        return output_record("Echo", agent=agent, payload={"message": message})

    unfresh = job("old style")
    unfresh["signature"] = b64(private.sign(canonical(unfresh)))  # signed before issue 12
    stretched = sign_record(private, job("stretched"), valid_for=60.0)
    stretched["valid_until"] += 86_400.0
    post_dated = sign_record(private, job("future"), now=time.time() + 3600.0)
    fresh = sign_record(private, job("fresh"))
    async with bridge_and_client(config) as (bridge, client):
        await client.send([unfresh, stretched, post_dated, fresh])
        results = await client.wait(
            [r["sys_id"] for r in (unfresh, stretched, post_dated, fresh)], timeout=TIMEOUT
        )
    errors = [r.error_string for r in results]
    assert errors[0].startswith("bad_record: issued_at: is missing"), errors[0]
    assert errors[1].startswith("bad_record: signature: does not verify"), errors[1]
    assert errors[2].startswith("bad_record: issued_at: signed 3600 s in the future"), errors[2]
    assert errors[3] == ""
    assert bridge.counters.processed == 1


# --- F14: insecure settings are allowed but loud ------------------------------------------


def _warnings_naming(caplog: pytest.LogCaptureFixture, setting: str) -> list[str]:
    return [
        r.getMessage()
        for r in caplog.records
        if r.levelno == logging.WARNING and setting in r.getMessage()
    ]


async def test_an_anonymous_unsigned_bridge_warns_once_per_setting_at_start(
    broker: BrokerAddress, unique_agent: str, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """An operator runs the defaults (no broker user, unsigned jobs): whoever reaches the
    broker can command this bridge. That is allowed, but the start-up log says so, once for
    each setting, so the exposure is never silent."""
    caplog.set_level(logging.WARNING, logger="midbridge")
    config = make_config(broker.host, broker.port, unique_agent, tmp_path)
    async with bridge_and_client(config):
        await asyncio.sleep(0.2)  # a status publish or two: no repeats
    assert len(_warnings_naming(caplog, "broker.username")) == 1
    assert len(_warnings_naming(caplog, "security.require_signatures")) == 1


async def test_an_authenticated_signed_bridge_starts_without_those_warnings(
    broker: BrokerAddress, unique_agent: str, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """The hardened settings (a broker user, signatures required) raise neither warning."""
    _, public_b64 = platform_keys()
    caplog.set_level(logging.WARNING, logger="midbridge")
    config = make_config(
        broker.host,
        broker.port,
        unique_agent,
        tmp_path,
        broker={"username": f"mid.user.{unique_agent}"},
        security={"require_signatures": True, "platform_key": public_b64},
    )
    async with bridge_and_client(config):
        pass
    assert _warnings_naming(caplog, "broker.username") == []
    assert _warnings_naming(caplog, "security.require_signatures") == []


# --- found by the independent review: records nested too deep to sign ----------------------


async def test_records_nested_too_deep_to_check_are_answered_not_left_unacknowledged(
    broker: BrokerAddress, unique_agent: str, tmp_path: Path
) -> None:
    """Whoever may publish on the agent's interactive topic sends records nested 300 deep
    with a signature field: readable JSON (orjson reads 1,024 levels) that cannot be put in
    canonical form (it writes about 254). The check raised, the message stayed
    unacknowledged and held a slot of the receive window for good: with the window full,
    no signed job on that lane ran any more. Each is now refused with an error record."""
    private, public_b64 = platform_keys()
    agent = f"mid.server.{unique_agent}"
    config = make_config(
        broker.host, broker.port, unique_agent, tmp_path,
        limits={"express_in_flight": 4},
        security={"require_signatures": True, "platform_key": public_b64},
    )  # fmt: skip
    deep = b"[" * 300 + b"0" + b"]" * 300
    async with bridge_and_client(config) as (_bridge, client):
        poison = []
        for _ in range(8):
            record = output_record("Echo", agent=agent, priority=0)
            head = orjson.dumps({**record, "signature": "AAAA"})[:-1]
            poison.append((record["sys_id"], head + b',"payload":{"deep":' + deep + b"}}"))
        client.expect(sys_id for sys_id, _ in poison)
        for _, body in poison:
            await client.send_raw(body, express=True)
        real = sign_record(private, output_record("Echo", agent=agent, priority=0,
                                                  payload={"message": "still served"}))  # fmt: skip
        await client.send([real], express=True)
        (result,) = await client.wait([real["sys_id"]], timeout=TIMEOUT)
        assert result.final["payload"]["message"] == "still served"
        for sys_id, _ in poison:
            answer = client.results[sys_id]
            await until(lambda answer=answer: answer.done, "the poison record's refusal")  # type: ignore[misc]
            assert answer.final["error_string"].startswith("bad_record: signature:")
