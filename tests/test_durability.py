"""Nothing lost: a killed bridge, a deep broker backlog, a broker restart.

These run the bridge as a real child process (``python -m bridge run``) against a private
Mosquitto that the test can kill and restart.
"""

from __future__ import annotations

import asyncio
import threading
import time
from pathlib import Path

import psutil

from bridge.wire.client import EccClient, output_record
from tests.brokers import MosquittoServer
from tests.harness import BridgeProcess, bridge_and_client, make_config

# Peak RSS the bridge may reach while 100,000 jobs wait on the broker with 1,000 in flight.
# Measured ~81 MB on the 2-core CI machine class (Python + uvloop + gmqtt + pydantic +
# 1,000 jobs and their MQTT messages); the bound leaves room but catches an unbounded queue
# (100,000 buffered records alone would add well over 100 MB).
RSS_BOUND_MB = 120


class PeakRss:
    """Samples a process's RSS every 20 ms in a thread."""

    def __init__(self, pid: int) -> None:
        self.proc = psutil.Process(pid)
        self.peak = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                self.peak = max(self.peak, self.proc.memory_info().rss)
            except psutil.Error:
                return
            time.sleep(0.02)

    def __enter__(self) -> PeakRss:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(timeout=2)


async def test_sigkill_mid_sweeps_loses_nothing_and_reruns_nothing_finished(
    private_broker: MosquittoServer, unique_agent: str, tmp_path: Path
) -> None:
    config = make_config(
        private_broker.host,
        private_broker.port,
        unique_agent,
        tmp_path / "state",
        limits={"probe_rate": 40_000, "lane_workers": [4, 4, 8]},
        shazzam={"chunk_hosts": 16},
    )
    bridge = BridgeProcess(config, tmp_path / "bridge.log")
    bridge.start()
    jobs = [
        output_record(
            "Shazzam",
            agent=f"mid.server.{unique_agent}",
            payload={
                "targets": "127.0.0.1-127.0.0.128",
                "ports": "20000-20019",
                "connect_timeout": 0.5,
            },
        )
        for _ in range(60)
    ]
    ids = [j["sys_id"] for j in jobs]
    try:
        async with EccClient(config.broker, agent=unique_agent) as client:
            await client.send(jobs)
            deadline = time.monotonic() + 60
            while time.monotonic() < deadline:
                finished = sum(client.results[i].done for i in ids)
                if finished >= 10:
                    break
                await asyncio.sleep(0.01)
            finished_before = {i for i in ids if client.results[i].done}
            assert 10 <= len(finished_before) < len(ids), "kill must land mid-run"
            bridge.kill()
            bridge.start()
            results = await client.wait(ids, timeout=120)
        for result in results:
            assert result.done
            assert sorted(result.chunks) == list(range(result.complete_at + 1))  # type: ignore[operator]
            totals = result.final["payload"]["totals"]
            assert totals["addresses"] == 128
            assert totals["probes"] == 128 * 20
            hosts = [h for rec in result.records for h in rec["payload"]["hosts"]]
            assert len(hosts) == 128
            assert len({h["ip"] for h in hosts}) == 128
            # A job whose answer was complete before the kill was never run again: every
            # copy of its complete record is the same record (same input sys_id).
            if result.sys_id in finished_before:
                assert len(result.complete_ids) == 1, result.complete_ids
    finally:
        bridge.stop()


async def test_deep_backlog_stays_bounded_and_completes(
    private_broker: MosquittoServer, unique_agent: str, tmp_path: Path
) -> None:
    total = 100_000
    config = make_config(
        private_broker.host,
        private_broker.port,
        unique_agent,
        tmp_path / "state",
        limits={"max_in_flight": 1000},
    )
    bridge = BridgeProcess(config, tmp_path / "bridge.log")
    bridge.start()  # creates the persistent session and its subscription
    assert bridge.stop() == 0
    agent = f"mid.server.{unique_agent}"
    records = [
        output_record("Echo", agent=agent, payload={"message": str(i)}) for i in range(total)
    ]
    async with EccClient(config.broker, agent=unique_agent) as client:
        for start in range(0, total, 5000):
            await client.send(records[start : start + 5000])  # one record per message
        with_backlog = time.monotonic()
        bridge.start()
        with PeakRss(bridge.pid) as rss:
            results = await client.wait([r["sys_id"] for r in records], timeout=300)
        elapsed = time.monotonic() - with_backlog
    bridge.stop()
    assert all(r.complete_at == 0 for r in results)
    assert [r.final["payload"]["message"] for r in results] == [str(i) for i in range(total)]
    peak_mb = rss.peak / 1e6
    print(f"backlog of {total}: done in {elapsed:.1f} s, bridge peak RSS {peak_mb:.0f} MB")
    assert 0 < peak_mb < RSS_BOUND_MB


async def test_broker_restart_mid_run_loses_nothing(
    private_broker: MosquittoServer, unique_agent: str, tmp_path: Path
) -> None:
    config = make_config(private_broker.host, private_broker.port, unique_agent, tmp_path / "state")
    agent = f"mid.server.{unique_agent}"
    jobs = [
        output_record("Echo", agent=agent, payload={"message": str(i), "delay": 0.5})
        for i in range(300)
    ]
    ids = [j["sys_id"] for j in jobs]
    async with bridge_and_client(config) as (bridge, client):
        await client.send(jobs, batch=10)
        deadline = time.monotonic() + 20
        while bridge.counters.processed < 50 and time.monotonic() < deadline:
            await asyncio.sleep(0.01)
        private_broker.stop()  # clean stop: Mosquitto saves sessions and queued messages
        await asyncio.sleep(1.0)  # jobs finish while the broker is away: outbox on disk
        assert bridge.store.outbox_records > 0
        private_broker.start()
        try:
            results = await client.wait(ids, timeout=60)
        except TimeoutError:
            done = sum(client.results[i].done for i in ids)
            raise AssertionError(
                f"{done}/300 done; bridge {bridge.stats()}; sessions "
                f"{ {k: s.connected.is_set() for k, s in bridge.sessions().items()} }; "
                f"client connected {client.session.connected.is_set()}"
            ) from None
    assert [r.final["payload"]["message"] for r in results] == [str(i) for i in range(300)]
    assert all(r.complete_at == 0 for r in results)
