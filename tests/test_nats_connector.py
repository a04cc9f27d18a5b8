"""The built-in instance's connector on NATS JetStream, with a real bridge.

The same platform as ``tests/test_connector.py`` (Table API, store, signed jobs), its
connector on a private ``nats-server`` (``broker.kind = "nats"``): outputs inserted reach
the bridge and their answers close them; the bridge's status records keep ``ecc_agent``
up to date; a bridge that stops says Down, and one that is killed is reported Down by the
connector once its status subject has been silent for ``status_timeout`` (NATS has no
last will).
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import AsyncExitStack, asynccontextmanager
from pathlib import Path
from typing import Any

import aiohttp
import orjson

from bridge.agent.bridge import Bridge
from bridge.agent.config import Config
from bridge.bench.natsd import NatsCluster
from bridge.instance import auth
from bridge.instance.connector import Connector, ConnectorSettings, install, keys_for
from bridge.instance.server import Instance, InstanceConfig
from probes import REGISTRY
from tests.harness import BridgeProcess, make_config
from tests.test_connector import ADMIN_PASSWORD, MID_PASSWORD, Platform

pytest_plugins = ("tests.nats_cluster",)


@asynccontextmanager
async def nats_platform(node: NatsCluster, tmp_path: Path, **nats: Any) -> AsyncIterator[Platform]:
    prefix = "n" + tmp_path.name[-12:].replace("_", "")
    db = tmp_path / "instance" / "instance.sqlite3"
    keys = keys_for(db)
    inst = Instance(InstanceConfig(db=db, admin_password=ADMIN_PASSWORD))
    install(inst, keys)
    connector = Connector(
        inst.store,
        node.broker_config(**nats),
        settings=ConnectorSettings(
            prefix=prefix, client_id=f"inst-{prefix}", sweep_interval=0.5,
            lease_check_interval=0.2,
        ),
        keys=keys,
    )  # fmt: skip
    async with inst, connector, aiohttp.ClientSession() as http:
        await auth.create_user(
            inst.store, "mid.user", MID_PASSWORD, roles=["mid_server"], web_service_access_only=True
        )
        yield Platform(inst, keys, connector, http, prefix, db)


def nats_bridge_config(
    node: NatsCluster, agent: str, state: Path, plat: Platform, **security: Any
) -> Config:
    broker = node.broker_settings()
    host, port = broker.pop("host"), broker.pop("port")
    config = make_config(
        host,
        port,
        agent,
        state,
        broker=broker,
        security={"require_signatures": True, "platform_key": plat.keys.public_key_b64,
                  **security},
    )  # fmt: skip
    config.bridge.topic_prefix = plat.prefix
    return config


async def test_outputs_reach_a_nats_bridge_and_answers_close_them(
    nats_node: NatsCluster, unique_agent: str, tmp_path: Path
) -> None:
    async with AsyncExitStack() as stack:
        plat = await stack.enter_async_context(nats_platform(nats_node, tmp_path))
        config = nats_bridge_config(nats_node, unique_agent, tmp_path / "bridge", plat)
        bridge = await stack.enter_async_context(Bridge(config, REGISTRY))
        await plat.wait_agent(unique_agent, lambda a: a["status"] == "Up" and a["last_heartbeat"])
        outs = [
            await plat.insert_output(unique_agent, "Echo", payload={"message": f"m{i}"})
            for i in range(20)
        ]
        chunked = await plat.insert_output(
            unique_agent, "Echo", payload={"message": "c", "chunks": 3}
        )
        bad = await plat.insert_output(unique_agent, "NoSuchProbe", payload={})
        urgent = await plat.insert_output(
            unique_agent, "Echo", priority=0, payload={"message": "now"}
        )
        rows = await plat.wait_done([o["sys_id"] for o in [*outs, chunked, bad, urgent]])
        assert [r["state"] for r in rows] == ["processed"] * 21 + ["error", "processed"]
        assert rows[-2]["error_string"].startswith("unknown_topic: topic:")
        answer = await plat.inputs(outs[7]["sys_id"])
        assert [orjson.loads(a["payload"]) for a in answer] == [{"message": "m7", "chunk": 0}]
        chunks = await plat.inputs(chunked["sys_id"])
        assert [(c["sequence"], c["complete"]) for c in chunks] == [
            ("0", "false"), ("1", "false"), ("2", "true"),
        ]  # fmt: skip
        many = await plat.inst.store.insert_many(
            "ecc_queue",
            [
                {"agent": f"mid.server.{unique_agent}", "topic": "Echo", "queue": "output",
                 "payload": {"message": str(i)}}
                for i in range(300)
            ],
        )  # fmt: skip
        await plat.wait_done([r["sys_id"] for r in many], timeout=30)
        assert plat.connector.stats.repushed == 0
        assert plat.connector.stats.dead_letters == 0
        assert bridge.counters.processed >= 323


async def test_a_stopped_bridge_says_down_and_a_killed_one_is_reported_down(
    nats_node: NatsCluster, unique_agent: str, tmp_path: Path
) -> None:
    async with AsyncExitStack() as stack:
        plat = await stack.enter_async_context(
            nats_platform(nats_node, tmp_path, status_timeout=2.0)
        )
        config = nats_bridge_config(
            nats_node, unique_agent, tmp_path / "bridge", plat, status_interval=0.5
        )
        async with Bridge(config, REGISTRY):
            await plat.wait_agent(unique_agent, lambda a: a["status"] == "Up")
        await plat.wait_agent(unique_agent, lambda a: a["status"] == "Down", timeout=5)

        proc = BridgeProcess(config, tmp_path / "bridge.log")
        stack.callback(proc.stop)
        proc.start()
        await plat.wait_agent(unique_agent, lambda a: a["status"] == "Up", timeout=10)
        proc.kill()  # no Down of its own: the silence says it
        await plat.wait_agent(unique_agent, lambda a: a["status"] == "Down", timeout=10)
