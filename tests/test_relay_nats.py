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
from bridge.relay.settings import PASSWORD_ENV
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
        assert (await sn.record(slow))["state"] == "processing"
        await asyncio.sleep(2.0)  # the bridge answers meanwhile, with no relay to hear it
        async with Relay(settings, nats_node.broker_config()):
            [late] = await sn.wait_done([slow], timeout=20)
            assert late["state"] == "processed"
            [late_answer] = await sn.inputs(slow)
            assert orjson.loads(late_answer["payload"]) == {"message": "late", "chunk": 0}
        assert bridge.counters.processed == 22
        assert bridge.counters.rejected == 0


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
