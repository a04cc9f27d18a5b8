"""The relay as a MID Server: its ecc_agent record, heartbeats and SystemCommands.

Against the built-in instance over HTTP, a real broker and a real bridge: the record is
created Up and refreshed, never validated by the relay; HeartbeatProbe is answered by
the bridge in ServiceNow's XML; queue.stats, config.file, pauseMid and resumeMid are
answered by the relay; the MID goes Down when its bridge stops and when it stops itself.
"""

from __future__ import annotations

import asyncio
import time
from contextlib import AsyncExitStack
from pathlib import Path
from xml.etree import ElementTree

from bridge.agent.bridge import Bridge
from bridge.relay.service import Relay
from probes import REGISTRY
from tests.brokers import BrokerAddress
from tests.harness import make_config
from tests.test_connector import MID_PASSWORD
from tests.test_relay import Snow, broker_config, new_prefix, relay_settings, snow

HEARTBEAT_XML = '<parameters><parameter name="skip_sensor" value="true"/></parameters>'


async def wait_agent(sn: Snow, agent: str, field: str, value: str, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while (row := await sn.agent(agent)).get(field) != value:
        assert time.monotonic() < deadline, (
            f"ecc_agent {field} is {row.get(field)!r}, not {value!r}"
        )
        await asyncio.sleep(0.05)


async def answer_of(sn: Snow, sys_id: str) -> ElementTree.Element:
    [done] = await sn.wait_done([sys_id])
    [answer] = await sn.inputs(sys_id)
    assert answer["topic"] == done["topic"]
    root = ElementTree.fromstring(answer["payload"])
    assert root.tag == "results"
    return root


async def test_registration_is_kept_and_the_mid_goes_down_at_a_clean_stop(
    broker: BrokerAddress, unique_agent: str, tmp_path: Path
) -> None:
    prefix = new_prefix()
    async with snow(tmp_path, unique_agent) as sn:
        settings = relay_settings(
            sn.inst.url, unique_agent, prefix, refresh_interval=0.3, state_dir=tmp_path / "r"
        )
        async with Relay(settings, broker_config(broker)) as relay:
            record = await sn.agent(unique_agent)
            assert record["status"] == "Up"
            assert record["version"].startswith("midbridge ")
            assert record["host_name"]  # ServiceNow's names (the built-in instance has them)
            assert record["ip_address"] == "127.0.0.1"  # the route to the instance
            assert record["url"] == sn.inst.url
            assert record["started"]
            assert record["stopped"] == ""
            assert record["validated"] == "false"  # the instance validates, never the relay
            first = record["last_refreshed"]
            assert first
            # Refreshed every 0.3 s; the times have a resolution of one second.
            deadline = time.monotonic() + 10
            while (await sn.agent(unique_agent))["last_refreshed"] <= first:
                assert time.monotonic() < deadline, "last_refreshed never moved"
                await asyncio.sleep(0.1)
            assert relay.registration.sys_id == record["sys_id"]
        down = await sn.agent(unique_agent)
        assert down["status"] == "Down"
        assert down["stopped"] >= down["started"]

        # A second start finds the record (no second one), Up again.
        async with Relay(settings, broker_config(broker)):
            assert (await sn.agent(unique_agent))["status"] == "Up"
        rows = await sn.call("GET", f"/api/now/table/ecc_agent?sysparm_query=name={unique_agent}")
        assert len(rows) == 1


async def test_heartbeat_and_system_commands_in_servicenow_shapes(
    broker: BrokerAddress, unique_agent: str, tmp_path: Path
) -> None:
    prefix = new_prefix()
    async with AsyncExitStack() as stack:
        sn = await stack.enter_async_context(snow(tmp_path, unique_agent))
        bridge_stack = await stack.enter_async_context(AsyncExitStack())
        config = make_config(broker.host, broker.port, unique_agent, tmp_path / "bridge")
        config.bridge.topic_prefix = prefix
        await bridge_stack.enter_async_context(Bridge(config, REGISTRY))
        settings = relay_settings(
            sn.inst.url, unique_agent, prefix, refresh_interval=0.3, state_dir=tmp_path / "r",
            properties={"glide.http.proxy_password": "proxy-s3cret"},
        )  # fmt: skip
        relay = await stack.enter_async_context(Relay(settings, broker_config(broker)))

        # HeartbeatProbe: answered by the bridge, in ServiceNow's XML.
        beat = await sn.output(unique_agent, "HeartbeatProbe", HEARTBEAT_XML, priority=0)
        root = await answer_of(sn, beat)
        heartbeat = root.find("result/heartbeat")
        assert heartbeat is not None
        assert heartbeat.get("status") == "Up"
        assert heartbeat.get("name") == unique_agent
        assert heartbeat.get("agent") == f"mid.server.{unique_agent}"
        assert root.findtext("result/stats/processed") is not None
        assert [p.get("name") for p in root.iterfind("parameters/parameter")] == ["skip_sensor"]

        # queue.stats: the relay's and the bridge's statistics (its retained status record).
        deadline = time.monotonic() + 10
        while relay.bridge_status is None:
            assert time.monotonic() < deadline, "the bridge's status record never came"
            await asyncio.sleep(0.05)
        root = await answer_of(sn, await sn.system_command(unique_agent, "queue.stats"))
        result = root.find("result")
        assert result is not None
        assert (result.get("command"), result.get("status")) == ("queue.stats", "Up")
        assert int(result.findtext("stats/relay/claimed") or "0") >= 1
        assert result.findtext("stats/bridge/name") == unique_agent  # its status record

        # config.file: the MID's configuration as config.xml parameters, no password.
        config_id = await sn.system_command(unique_agent, "config.file")
        root = await answer_of(sn, config_id)
        params = {p.get("name"): p.get("value") for p in root.iterfind("result/config/parameter")}
        assert params["url"] == sn.inst.url
        assert params["name"] == unique_agent
        assert params["mid.instance.username"] == "mid.user"
        assert params["mid.poll.time"] == "5"  # the default (the relay polls at 0.1 s here)
        [answer] = await sn.inputs(config_id)
        assert MID_PASSWORD not in answer["payload"]
        assert "proxy-s3cret" not in answer["payload"]

        # An unsupported command: a clear error, not a silence.
        restart = await sn.system_command(unique_agent, "restartService")
        [done] = await sn.wait_done([restart])
        assert done["state"] == "error"
        [answer] = await sn.inputs(restart)
        root = ElementTree.fromstring(answer["payload"])
        assert root.findtext("result/error/kind") == "refused"
        assert "restartService" in (root.get("error") or "")

        # pauseMid: Paused; only commands and heartbeats are taken until resumeMid.
        await answer_of(sn, await sn.system_command(unique_agent, "pauseMid"))
        await wait_agent(sn, unique_agent, "status", "Paused")
        held = await sn.output(unique_agent, "Echo", {"message": "wait"})
        beat = await sn.output(unique_agent, "HeartbeatProbe", HEARTBEAT_XML, priority=0)
        root = await answer_of(sn, beat)
        assert root.find("result/heartbeat") is not None
        assert (await sn.record(held))["state"] == "ready"
        resume = await sn.system_command(unique_agent, "resumeMid")
        root = await answer_of(sn, resume)
        assert root.find("result").get("status") == "Up"  # type: ignore[union-attr]
        [done] = await sn.wait_done([held])
        assert done["state"] == "processed"
        await wait_agent(sn, unique_agent, "status", "Up")
        assert relay.stats["local"] == 5

        # The bridge stops: its retained status says Down, and so does the MID's record.
        await bridge_stack.aclose()
        await wait_agent(sn, unique_agent, "status", "Down")
