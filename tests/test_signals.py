"""Signals on the real ``midbridge run`` process: SIGHUP is ignored, SIGTERM drains."""

from __future__ import annotations

import asyncio
import signal
from pathlib import Path

from bridge.wire.client import EccClient, output_record
from tests.brokers import BrokerAddress
from tests.harness import BridgeProcess, make_config


async def test_sighup_neither_ends_the_bridge_nor_cuts_a_job_short(
    broker: BrokerAddress, unique_agent: str, tmp_path: Path
) -> None:
    config = make_config(broker.host, broker.port, unique_agent, tmp_path / "state")
    process = BridgeProcess(config, tmp_path / "bridge.log")
    process.start()
    agent = f"mid.server.{unique_agent}"
    try:
        async with EccClient(config.broker, agent=unique_agent) as client:
            slow = output_record("Echo", agent=agent, payload={"message": "slow", "delay": 1.5})
            await client.send([slow])
            await asyncio.sleep(0.5)  # the job is running
            assert process.proc is not None
            process.proc.send_signal(signal.SIGHUP)
            (result,) = await client.wait([slow["sys_id"]], timeout=15)
            assert result.final["payload"]["message"] == "slow"
            assert process.proc.poll() is None, f"SIGHUP ended the bridge:\n{process.log_tail()}"

            after = output_record("Echo", agent=agent, payload={"message": "after"})
            await client.send([after])
            (result,) = await client.wait([after["sys_id"]], timeout=15)
            assert result.final["payload"]["message"] == "after"
        assert "SIGHUP ignored" in process.log_tail(20_000)
    finally:
        code = process.stop()
    assert code == 0, process.log_tail()


async def test_sigterm_drains_the_job_in_flight(
    broker: BrokerAddress, unique_agent: str, tmp_path: Path
) -> None:
    config = make_config(
        broker.host, broker.port, unique_agent, tmp_path / "state", limits={"drain_timeout": 10}
    )
    process = BridgeProcess(config, tmp_path / "bridge.log")
    process.start()
    agent = f"mid.server.{unique_agent}"
    async with EccClient(config.broker, agent=unique_agent) as client:
        job = output_record("Echo", agent=agent, payload={"message": "drained", "delay": 1.5})
        await client.send([job])
        await asyncio.sleep(0.5)
        assert process.proc is not None
        process.proc.send_signal(signal.SIGTERM)
        (result,) = await client.wait([job["sys_id"]], timeout=15)
        assert result.final["payload"]["message"] == "drained"
    assert process.stop() == 0, process.log_tail()
