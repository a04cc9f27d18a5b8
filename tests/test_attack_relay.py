"""Attacks on the signature between the relay and its bridge, through the real path.

The relay takes jobs from the instance and publishes them signed with its own Ed25519 key
(``bridge/relay/core.py``); the bridge behind it has ``security.require_signatures`` and
the relay's public key as ``security.platform_key``. The attacker is any client of the
broker (anonymous here, as the test broker allows): it reads the jobs the relay publishes
and writes its own straight onto the bridge's output topics, unsigned, signed with a key of
its own, or as a copy of a relay-signed job with a new payload or a new sys_id. The bridge
must refuse each with an error record naming the signature, run none of them, and still run
the jobs the relay took from the instance.
"""

from __future__ import annotations

import asyncio
import subprocess
import sys
import time
from contextlib import AsyncExitStack
from pathlib import Path
from typing import Any

import orjson
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from bridge.agent.bridge import Bridge
from bridge.relay.core import SIGNING_KEY_FILE, Relay
from bridge.wire.keyfiles import public_key_b64, signing_key_file
from bridge.wire.records import new_sys_id
from bridge.wire.sealing import SIGNATURE_FIELD, sign_record
from bridge.wire.transport import Delivery, MqttSession
from probes import REGISTRY
from tests.brokers import BrokerAddress
from tests.harness import REPO
from tests.test_relay import (
    FakeBridge,
    broker_config,
    new_prefix,
    relay_settings,
    signed_bridge_config,
    snow,
)


class Eavesdropper(FakeBridge):
    """A broker client that reads the bridge's jobs and answers (and writes its own jobs)."""

    def __init__(self, broker: BrokerAddress, prefix: str, agent: str) -> None:
        super().__init__(broker, prefix, agent)
        self.answers: dict[str, dict[str, Any]] = {}  # response_to → the bridge's record
        self.session = MqttSession(
            broker_config(broker),
            client_id=f"eavesdropper-{prefix}",
            subscriptions=[self.topics.output, self.topics.express, self.topics.input],
            on_message=self._on_any,
            clean_start=True,
        )

    async def _on_any(self, delivery: Delivery) -> bool:
        if delivery.topic != self.topics.input:
            return await self._on_message(delivery)
        data = orjson.loads(delivery.payload)
        for record in data if isinstance(data, list) else [data]:
            self.answers[record["response_to"]] = record
        return True

    async def answer_to(self, sys_id: str, timeout: float = 10.0) -> dict[str, Any]:
        deadline = time.monotonic() + timeout
        while sys_id not in self.answers:
            assert time.monotonic() < deadline, f"no answer to {sys_id}"
            await asyncio.sleep(0.05)
        return self.answers[sys_id]

    async def inject(self, record: dict[str, Any]) -> None:
        await self.session.publish(self.topics.output, orjson.dumps(record))


async def test_the_bridge_runs_only_the_jobs_its_relay_signed(
    broker: BrokerAddress, unique_agent: str, tmp_path: Path
) -> None:
    prefix = new_prefix()
    state = tmp_path / "relay-state"
    config = signed_bridge_config(broker.host, broker.port, unique_agent, tmp_path, prefix, state)
    async with AsyncExitStack() as stack:
        sn = await stack.enter_async_context(snow(tmp_path, unique_agent))
        spy = Eavesdropper(broker, prefix, unique_agent)
        await stack.enter_async_context(spy)
        bridge = await stack.enter_async_context(Bridge(config, REGISTRY))
        relay = await stack.enter_async_context(
            Relay(
                relay_settings(sn.inst.url, unique_agent, prefix, state_dir=state),
                broker_config(broker),
            )
        )
        assert (
            relay.public_key_b64 == config.security.platform_key
        )  # the key made beforehand is the one used

        real = await sn.output(unique_agent, "Echo", {"message": "from the instance"})
        [done] = await sn.wait_done([real])
        assert done["state"] == "processed"
        captured = await spy.job(real)
        assert captured[SIGNATURE_FIELD]  # the relay signed what it published

        unsigned = {k: v for k, v in captured.items() if k != SIGNATURE_FIELD}
        unsigned["sys_id"] = new_sys_id()
        other_key = sign_record(
            Ed25519PrivateKey.generate(), {**unsigned, "sys_id": new_sys_id()}
        )  # an attacker's own key
        new_payload = {**captured, "sys_id": new_sys_id(), "payload": {"message": "forged"}}
        new_id = {**captured, "sys_id": new_sys_id()}  # a signed job under another sys_id
        forged = [unsigned, other_key, new_payload, new_id]
        for record in forged:
            await spy.inject(record)
        for record in forged:
            answer = await spy.answer_to(record["sys_id"])
            assert answer["error_string"].startswith("bad_record: signature:"), answer
        assert bridge.counters.rejected == len(forged)

        # The relay's own job answered once; a replay of it under its own sys_id is a
        # repeat the bridge drops (the dedupe ledger), not a second run.
        await spy.inject(captured)
        again = await sn.output(unique_agent, "Echo", {"message": "still served"})
        [still] = await sn.wait_done([again])
        assert still["state"] == "processed"
        assert bridge.counters.processed == 2
        assert len(await sn.inputs(real)) == 1


def test_print_key_shows_the_key_the_relay_signs_with(tmp_path: Path) -> None:
    state = tmp_path / "relay-state"
    common = [sys.executable, "-m", "bridge", "relay", "--instance", "https://x.invalid",
              "--user", "u", "--agent", "a1", "--state-dir", str(state)]  # fmt: skip
    shown = subprocess.run(
        [*common, "--print-key"], cwd=REPO, capture_output=True, text=True, timeout=60
    )
    assert shown.returncode == 0, shown.stderr
    key = shown.stdout.strip()
    assert key == public_key_b64(signing_key_file(state / SIGNING_KEY_FILE))
    assert (state / SIGNING_KEY_FILE).stat().st_mode & 0o077 == 0

    (state / SIGNING_KEY_FILE).chmod(0o644)  # readable by others: refused, named
    refused = subprocess.run(
        [*common, "--print-key"], cwd=REPO, capture_output=True, text=True, timeout=60
    )
    assert refused.returncode == 2
    assert "relay.signing.pem" in refused.stderr
    assert "chmod 600" in refused.stderr
    assert "Traceback" not in refused.stderr

    encrypted = Ed25519PrivateKey.generate().private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.BestAvailableEncryption(b"a passphrase"),
    )
    (state / SIGNING_KEY_FILE).unlink()
    (state / SIGNING_KEY_FILE).write_bytes(encrypted)
    (state / SIGNING_KEY_FILE).chmod(0o600)
    locked = subprocess.run(
        [*common, "--print-key"], cwd=REPO, capture_output=True, text=True, timeout=60
    )
    assert locked.returncode == 2
    assert "is encrypted" in locked.stderr
    assert len(locked.stderr.strip().splitlines()) == 1, locked.stderr
