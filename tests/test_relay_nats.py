"""The relay on NATS JetStream (``broker.kind = "nats"``), with a real bridge on a private
``nats-server`` and the built-in instance over real HTTP.

The same relay as ``tests/test_relay.py``: it claims the instance's outputs, publishes them
signed to the MID's jobs stream, and answers each with one input record; the bridge's
status record comes from the status stream; answers that arrive while the relay is stopped
wait in its durable consumer and are written back when it starts again.
"""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
import time
from contextlib import AsyncExitStack
from pathlib import Path
from xml.etree import ElementTree

import orjson

from bridge.agent.bridge import Bridge
from bridge.bench.natsd import NatsCluster
from bridge.relay.core import Relay
from bridge.relay.service import broker_from_option
from bridge.relay.settings import PASSWORD_ENV
from bridge.wire.broker import BrokerConfig
from probes import REGISTRY
from tests.harness import REPO
from tests.test_relay import ECHO_XML, new_prefix, relay_settings, signed_bridge_config, snow

pytest_plugins = ("tests.nats_cluster",)


async def test_the_relay_serves_the_instance_over_nats_jetstream(
    nats_node: NatsCluster, unique_agent: str, tmp_path: Path
) -> None:
    prefix = new_prefix()
    state = tmp_path / "relay-state"
    broker = nats_node.broker_settings()
    host, port = broker.pop("host"), broker.pop("port")
    config = signed_bridge_config(host, port, unique_agent, tmp_path, prefix, state, broker=broker)
    async with AsyncExitStack() as stack:
        sn = await stack.enter_async_context(snow(tmp_path, unique_agent))
        settings = relay_settings(sn.inst.url, unique_agent, prefix, state_dir=state)
        bridge = await stack.enter_async_context(Bridge(config, REGISTRY))
        async with Relay(settings, nats_node.broker_config()) as relay:
            jobs = [await sn.output(unique_agent, "Echo", {"message": f"m{i}"}) for i in range(20)]
            xml_job = await sn.output(unique_agent, "Echo", ECHO_XML)
            done = await sn.wait_done([*jobs, xml_job], timeout=30)
            assert [r["state"] for r in done] == ["processed"] * 21
            [answer] = await sn.inputs(jobs[7])
            assert orjson.loads(answer["payload"]) == {"message": "m7", "chunk": 0}
            [xml_answer] = await sn.inputs(xml_job)
            root = ElementTree.fromstring(xml_answer["payload"])
            assert [r.findtext("message") for r in root.findall("result")] == ["a <b> & c"] * 2
            deadline = time.monotonic() + 10
            while (relay.bridge_status or {}).get("status") != "Up":
                assert time.monotonic() < deadline, relay.bridge_status
                await asyncio.sleep(0.05)

            # A job still running when the relay stops: its answer waits in the relay's
            # durable consumer and is written back when the relay starts again.
            slow = await sn.output(unique_agent, "Echo", {"message": "late", "delay": 1.5})
            await sn.wait_state(slow, "processing")
            deadline = time.monotonic() + 10  # at the bridge, running, when the relay stops
            while bridge.counters.received < 22:
                assert time.monotonic() < deadline, bridge.counters
                await asyncio.sleep(0.02)
        assert (await sn.record(slow))["state"] == "processing"
        # The bridge answers meanwhile (run, and published to the stream), no relay to hear it.
        deadline = time.monotonic() + 20
        while bridge.counters.processed < 22 or bridge.egress.published_records < 23:
            assert time.monotonic() < deadline, (bridge.counters, bridge.egress.published_records)
            await asyncio.sleep(0.05)
        assert (await sn.record(slow))["state"] == "processing"
        async with Relay(settings, nats_node.broker_config()):
            [late] = await sn.wait_done([slow], timeout=20)
            assert late["state"] == "processed"
            [late_answer] = await sn.inputs(slow)
            assert orjson.loads(late_answer["payload"]) == {"message": "late", "chunk": 0}
        assert bridge.counters.processed == 22
        assert bridge.counters.rejected == 0
        assert bridge.counters.received == 22  # the answer waited: the job was not sent again


def test_a_bad_nats_broker_url_is_one_line_naming_the_option(tmp_path: Path) -> None:
    env = {**os.environ, PASSWORD_ENV: "x"}
    for url, said in (
        ("nats://127.0.0.1:notaport", "--broker"),
        ("nats://127.0.0.1:4222,mqtt://127.0.0.1:1883", "expected nats://HOST:PORT"),
    ):
        run = subprocess.run(
            [sys.executable, "-m", "bridge", "relay", "--instance", "https://x.invalid",
             "--user", "u", "--agent", "a1", "--state-dir", str(tmp_path / "s"),
             "--broker", url],
            cwd=REPO, env=env, capture_output=True, text=True, timeout=60,
        )  # fmt: skip
        assert run.returncode == 2, run.stderr
        lines = run.stderr.strip().splitlines()
        assert len(lines) == 1, run.stderr
        assert lines[0].startswith("midbridge: error:"), lines
        assert said in lines[0]


def test_the_broker_option_keeps_the_configs_other_settings(tmp_path: Path) -> None:
    """``--broker`` names the kind and the addresses; user, password, TLS and ``nats.*``
    stay the config file's (a NATS URL must not drop TLS and send the password in clear)."""
    ca = tmp_path / "ca.pem"
    ca.write_text("not read here\n")
    config = BrokerConfig.model_validate(
        {"host": "mq.lan", "port": 8883, "username": "relay", "password": "pw", "tls": True,
         "ca_file": str(ca), "nats": {"ack_wait": 45, "replicas": 3}}
    )  # fmt: skip
    on_nats = broker_from_option(config, "nats://10.0.0.1:4222,nats://10.0.0.2:4222")
    assert on_nats.kind == "nats"
    assert (on_nats.host, on_nats.port) == ("10.0.0.1", 4222)
    assert on_nats.nats.servers == ["nats://10.0.0.1:4222", "nats://10.0.0.2:4222"]
    assert (on_nats.username, on_nats.password) == ("relay", "pw")
    assert (on_nats.tls, on_nats.ca_file) == (True, ca)
    assert (on_nats.nats.ack_wait, on_nats.nats.replicas) == (45, 3)
    on_mqtt = broker_from_option(on_nats, "127.0.0.1:1884")
    assert (on_mqtt.kind, on_mqtt.host, on_mqtt.port) == ("mqtt", "127.0.0.1", 1884)
    assert (on_mqtt.username, on_mqtt.tls, on_mqtt.ca_file) == ("relay", True, ca)
