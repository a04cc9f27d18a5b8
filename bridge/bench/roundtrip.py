"""``midbridge bench roundtrip``: trivial jobs through the bridge vs a minimal echo responder.

The job is the ``Echo`` probe (it answers with its own parameters): what is measured is
the ECC round trip itself: broker → intake → run → input record → broker.

- peer: :func:`responder_main`, a minimal responder written with the same MQTT client
  library (gmqtt 0.8 + uvloop, MQTT 5, QoS 1, the same receive window as the bridge's
  bulk session). It subscribes the output topic, answers each message with one input
  record (the same fields as the bridge's) on the input topic, and acknowledges the job
  after handing the answer to the socket. Nothing else: no validation, no durable
  outbox, no batching of answers.
- ours: the bridge, ``python -m bridge run``, default limits.

Both run as child processes (started before the rounds, each with its own agent name, so
their topics never meet) and are driven by the same driver in this process: an
``EccClient`` (the platform side) that publishes one record per MQTT message.

- flood: ``FLOOD_JOBS`` jobs, at most ``WINDOW`` unanswered at any time; jobs/s from the
  first publish to the last answer.
- latency: ``LATENCY_JOBS`` jobs one after the other (one in flight); p50 / p99 of the
  time from publish to answer.
"""

from __future__ import annotations

import asyncio
import contextlib
import sys
import tempfile
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any, TypeVar

import orjson

from bridge.agent.config import LimitsConfig
from bridge.bench import BenchError, nats_peer
from bridge.bench.common import (
    BRIDGE_COMMAND,
    CpuMeter,
    CpuMeters,
    Result,
    Round,
    Side,
    Table,
    bench_broker,
    bridge_process,
    broker_facts,
    child_pid,
    echo_answer,
    log_problems,
    median,
    percentile,
    plain_config,
    plain_config_for,
    progress,
)
from bridge.bench.nats_peer import nats_servers
from bridge.demo.broker import BrokerEndpoint, stop_process
from bridge.signals import StopSignals
from bridge.wire.broker import BrokerConfig
from bridge.wire.client import EccClient, output_record
from bridge.wire.topics import Topics

FLOOD_JOBS = 20_000
WINDOW = 1_000  # jobs published and not yet answered, at most
LATENCY_JOBS = 300
WARMUP_JOBS = 2_000
RECEIVE_WINDOW = LimitsConfig().max_in_flight  # the bridge's bulk window; the peer uses it too
PREFIX = "ecc"
STALL_S = 5.0  # no answer for this long while jobs are outstanding: a stall
MAX_ATTEMPTS = 5  # a stalled measurement is made again, this many times at most
T = TypeVar("T")


# --- the peer: a minimal gmqtt echo responder (child process) -----------------------------------


def _now_text() -> str:
    return time.strftime("%Y-%m-%d %H:%M:%S", time.gmtime())


async def _responder(host: str, port: int, agent: str, prefix: str) -> int:
    import gmqtt
    from gmqtt.mqtt.constants import MQTTv50

    topics = Topics.for_agent(prefix, agent)
    input_topic = topics.input
    agent_id = f"mid.server.{agent}"
    dumps, loads, new_id = orjson.dumps, orjson.loads, uuid.uuid4

    client = gmqtt.Client(
        f"bench-echo-{agent}",
        clean_session=True,
        optimistic_acknowledgement=False,  # PUBACK the job once on_message returns
        receive_maximum=RECEIVE_WINDOW,
    )
    subscribed = asyncio.Event()

    async def on_message(
        cl: Any, topic: str, payload: bytes, qos: int, properties: dict[str, Any]
    ) -> int:
        job = loads(payload)
        answer = echo_answer(job, agent_id, new_id().hex, _now_text())
        cl.publish(input_topic, dumps(answer), qos=1)
        return 0  # the answer is on its way: acknowledge the job

    def on_subscribe(cl: Any, mid: int, qos: Any, properties: Any) -> None:
        subscribed.set()

    client.on_message = on_message
    client.on_subscribe = on_subscribe
    with StopSignals() as stop:
        await client.connect(host, port, version=MQTTv50)
        client.subscribe(topics.output, qos=1)
        await asyncio.wait_for(subscribed.wait(), 10)
        print("ready", flush=True)
        await stop.wait()
        await client.disconnect()
    return 0


def responder_main(argv: list[str]) -> int:
    host, port, agent, prefix = argv[0], int(argv[1]), argv[2], argv[3]
    import uvloop

    return uvloop.run(_responder(host, port, agent, prefix))


def responder_command(endpoint: BrokerEndpoint, agent: str) -> list[str]:
    return [
        sys.executable,
        "-m",
        "bridge.bench.roundtrip",
        "responder",
        endpoint.host,
        str(endpoint.port),
        agent,
        PREFIX,
    ]


@contextlib.asynccontextmanager
async def responder_process(command: list[str]) -> AsyncIterator[asyncio.subprocess.Process]:
    proc = await asyncio.create_subprocess_exec(
        *command, stdin=asyncio.subprocess.DEVNULL, stdout=asyncio.subprocess.PIPE
    )
    assert proc.stdout is not None
    try:
        line = await asyncio.wait_for(proc.stdout.readline(), 30)
        if line.strip() != b"ready":
            raise BenchError(f"the echo responder did not start: {line!r}")
        yield proc
    finally:
        await stop_process(proc, 5)


# --- the driver: the same for both sides --------------------------------------------------------


class Stalled(BenchError):
    """Jobs were outstanding and no answer came for ``STALL_S`` seconds."""


class Driver:
    """The platform side: publishes Echo jobs one record per message, collects the answers.

    Only answers to the current batch count; answers to an abandoned (stalled) batch that
    arrive later are ignored.
    """

    def __init__(
        self, broker: BrokerConfig, agent: str, *, payload: dict[str, Any] | None = None
    ) -> None:
        self.agent_id = f"mid.server.{agent}"
        self.broker = broker
        self.payload = payload or {"message": "ping"}
        self.client = EccClient(self.broker, agent=agent, prefix=PREFIX, on_record=self._answer)
        self._room: asyncio.Semaphore | None = None
        self._current: set[str] = set()  # sys_ids of the batch, not yet answered
        self._answered = 0
        self._wanted = 0
        self._all = asyncio.Event()

    async def __aenter__(self) -> Driver:
        await self.client.__aenter__()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.client.__aexit__(*exc)

    def _answer(self, record: dict[str, Any]) -> None:
        if not record.get("complete"):
            return
        sys_id = record.get("response_to")
        if sys_id not in self._current:
            return
        self._current.discard(sys_id)
        self._answered += 1
        if self._room is not None:
            self._room.release()
        if not self._current:
            self._all.set()

    def _jobs(self, count: int) -> list[tuple[str, bytes]]:
        jobs = []
        for _ in range(count):
            record = output_record("Echo", agent=self.agent_id, payload=self.payload)
            jobs.append((record["sys_id"], orjson.dumps(record)))
        self.client.expect(sys_id for sys_id, _ in jobs)
        self._current = {sys_id for sys_id, _ in jobs}
        self._answered, self._wanted = 0, count
        self._all.clear()
        return jobs

    async def flood(self, count: int, window: int) -> Side:
        jobs = self._jobs(count)  # built and encoded before the clock starts
        session = self.client.session
        topic = self.client.topics.output
        self._room = asyncio.Semaphore(window)
        pubacks = []
        try:
            started = time.perf_counter()
            for _sys_id, body in jobs:
                await self._take_slot()
                pubacks.append(await session.publish_start(topic, body))
            await self._wait_all()
            seconds = time.perf_counter() - started
            await asyncio.gather(*pubacks)
        except Stalled:
            self._abandon(jobs)
            raise
        finally:
            self._room = None
        self._check(jobs)
        return Side(count, seconds)

    async def _take_slot(self) -> None:
        """Room for one more job; ``Stalled`` if the window stays full with no answer."""
        room = self._room
        assert room is not None
        if not room.locked():
            await room.acquire()
            return
        seen = self._answered
        while True:
            try:
                await asyncio.wait_for(room.acquire(), STALL_S)
            except TimeoutError:
                if self._answered == seen:
                    raise Stalled(self._stalled()) from None
                seen = self._answered
            else:
                return

    async def _wait_all(self) -> None:
        """Wait for every answer; ``Stalled`` if none arrives for ``STALL_S`` seconds."""
        seen = -1
        while not self._all.is_set():
            if self._answered == seen:
                raise Stalled(self._stalled())
            seen = self._answered
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._all.wait(), STALL_S)

    def _stalled(self) -> str:
        return (
            f"{self._answered:,} of {self._wanted:,} jobs answered, then no answer for "
            f"{STALL_S:g} s"
        )

    def _abandon(self, jobs: list[tuple[str, bytes]]) -> None:
        self._current = set()
        for sys_id, _ in jobs:
            self.client.results.pop(sys_id, None)

    async def sequential(self, count: int) -> list[float]:
        """Round-trip times in seconds, one job in flight at a time."""
        jobs = self._jobs(count)
        session = self.client.session
        topic = self.client.topics.output
        times = []
        for sys_id, body in jobs:
            result = self.client.results[sys_id]
            started = time.perf_counter()
            puback = await session.publish_start(topic, body)
            try:
                await asyncio.wait_for(result.finished.wait(), STALL_S)
            except TimeoutError:
                message = self._stalled()
                self._abandon(jobs)
                raise Stalled(message) from None
            times.append(time.perf_counter() - started)
            await puback
        self._check(jobs)
        return times

    def _check(self, jobs: list[tuple[str, bytes]]) -> None:
        failed = 0
        for sys_id, _ in jobs:
            result = self.client.results.pop(sys_id)
            if not result.done or result.error_string:
                failed += 1
        if failed:
            raise BenchError(f"{failed} of {len(jobs)} Echo jobs were not answered correctly")


async def _retrying(what: str, stalls: list[str], attempt: Callable[[], Awaitable[T]]) -> T:
    """Run ``attempt``; a stall is written down and the attempt made again from scratch."""
    for _ in range(MAX_ATTEMPTS):
        try:
            return await attempt()
        except Stalled as exc:
            stalls.append(f"{what}: {exc}")
            progress(f"{what} stalled ({exc}); measuring it again")
    raise BenchError(f"{what} stalled {MAX_ATTEMPTS} times in a row; last: {stalls[-1]}")


async def warm_up(who: str, driver: Driver, stalls: list[str]) -> None:
    await _retrying(f"{who} warm-up", stalls, lambda: driver.flood(WARMUP_JOBS, WINDOW))
    await _retrying(f"{who} warm-up", stalls, lambda: driver.sequential(20))


async def measure(
    who: str,
    driver: Driver,
    meter: CpuMeter,
    broker_meter: CpuMeter | CpuMeters,
    stalls: list[str],
) -> Side:
    async def flood() -> Side:
        meter.start()
        broker_meter.start()
        driver_cpu = time.process_time()
        side = await driver.flood(FLOOD_JOBS, WINDOW)
        driver_cpu = time.process_time() - driver_cpu
        side.cpu_s = meter.stop()
        broker_cpu = broker_meter.stop()
        if broker_cpu is not None:
            side.extra["broker_cpu_us_per_job"] = round(broker_cpu / side.count * 1e6, 1)
        side.extra["driver_cpu_us_per_job"] = round(driver_cpu / side.count * 1e6, 1)
        return side

    side = await _retrying(f"{who} flood", stalls, flood)
    times = await _retrying(f"{who} latency", stalls, lambda: driver.sequential(LATENCY_JOBS))
    side.extra["latency_ms"] = {
        "p50": round(percentile(times, 0.50) * 1000, 3),
        "p99": round(percentile(times, 0.99) * 1000, 3),
        "mean": round(sum(times) / len(times) * 1000, 3),
        "sequential_jobs_per_s": round(len(times) / sum(times), 1),
    }
    return side


def _latency(side: Side, key: str) -> float:
    return float(side.extra["latency_ms"][key])


# --- the benchmark ---------------------------------------------------------------------------


async def run(broker: tuple[str, int] | None, rounds: int, transport: str = "mqtt") -> Result:
    tag = uuid.uuid4().hex[:8]
    peer_agent, ours_agent = f"bench-echo-{tag}", f"bench-bridge-{tag}"
    nats = transport == "nats"
    with tempfile.TemporaryDirectory(prefix="midbridge-bench-") as tmp:
        workdir = Path(tmp)
        async with contextlib.AsyncExitStack() as stack:
            broker_meter: CpuMeter | CpuMeters
            if nats:
                servers = await stack.enter_async_context(nats_servers(broker))
                driver_broker = servers.broker
                peer_command = nats_peer.responder_command(
                    driver_broker, peer_agent, PREFIX, RECEIVE_WINDOW
                )
                peer = "bare nats-py + uvloop echo responder (bridge/bench/nats_peer.py), "
                peer += "a push consumer on the same jobs stream"
                facts, broker_meter = servers.facts(), servers.meter
                config = plain_config_for(driver_broker, ours_agent, workdir)
            else:
                endpoint = await stack.enter_async_context(bench_broker(broker))
                driver_broker = BrokerConfig(
                    host=endpoint.host, port=endpoint.port, protocol=endpoint.protocol
                )
                peer_command = responder_command(endpoint, peer_agent)
                peer = "minimal gmqtt + uvloop echo responder (bridge/bench/roundtrip.py), QoS 1"
                facts = broker_facts(endpoint)
                broker_pid = child_pid("mosquitto") if endpoint.kind == "mosquitto" else None
                broker_meter = CpuMeter(broker_pid)
                config = plain_config(endpoint, ours_agent, workdir)
            message = "JetStream message" if nats else "MQTT message"
            result = Result(
                name="roundtrip-nats" if nats else "roundtrip",
                unit="jobs/s",
                goal=0.5,
                peer=peer,
                ours="the bridge (child process) running the Echo probe, default limits",
                peer_command=peer_command,
                ours_command=BRIDGE_COMMAND,
                workload=f"{FLOOD_JOBS:,} Echo jobs, one record per {message}, at most "
                f"{WINDOW:,} unanswered; then {LATENCY_JOBS} one at a time for latency",
            )
            result.broker = facts
            log_path = workdir / "bridge.log"
            peer_proc = await stack.enter_async_context(responder_process(peer_command))
            bridge = await stack.enter_async_context(bridge_process(config, log_path))
            peer_driver = await stack.enter_async_context(Driver(driver_broker, peer_agent))
            ours_driver = await stack.enter_async_context(Driver(driver_broker, ours_agent))
            meters = {"peer": CpuMeter(peer_proc.pid), "ours": CpuMeter(bridge.pid)}
            drivers = {"peer": peer_driver, "ours": ours_driver}
            result.details["bridge_config"] = {
                "limits": config.limits.model_dump(mode="json"),
                "env": "MIDBRIDGE_* variables (every setting at its default but agent, "
                "state_dir, broker)",
            }

            stalls: list[str] = []
            progress(f"warm-up: {WARMUP_JOBS:,} untimed jobs through each side")
            for side in ("peer", "ours"):
                await warm_up(side, drivers[side], stalls)

            for index in range(1, rounds + 1):
                order = ("peer", "ours") if index % 2 else ("ours", "peer")
                sides: dict[str, Side] = {}
                for side in order:
                    sides[side] = await measure(
                        side, drivers[side], meters[side], broker_meter, stalls
                    )
                rnd = Round(index, order, sides["peer"], sides["ours"])
                result.rounds.append(rnd)
                progress(
                    f"round {index}/{rounds}: responder {rnd.peer.rate:,.0f} jobs/s "
                    f"(p50 {_latency(rnd.peer, 'p50'):.2f} ms), bridge {rnd.ours.rate:,.0f} "
                    f"jobs/s (p50 {_latency(rnd.ours, 'p50'):.2f} ms), ratio {rnd.ratio:.2f}"
                )
        result.warnings += [f"bridge log: {line}" for line in log_problems(log_path)]

    result.details["stalls"] = stalls
    if stalls:
        result.warnings.append(
            f"{len(stalls)} measurement(s) stalled (jobs outstanding, no answer for "
            f"{STALL_S:g} s) and were made again; only complete measurements are reported: "
            + "; ".join(stalls)
        )

    latency = {
        who: {
            key: round(median([_latency(getattr(r, who), key) for r in result.rounds]), 3)
            for key in ("p50", "p99", "mean")
        }
        for who in ("peer", "ours")
    }
    result.details["latency_ms"] = latency
    result.details["flood_jobs"] = FLOOD_JOBS
    result.details["window"] = WINDOW
    result.details["latency_jobs"] = LATENCY_JOBS
    result.details["choices"] = [
        "both sides are child processes started before the rounds (start-up not timed), "
        "each on its own agent/topics; the driver (EccClient) runs in the bench process",
        f"one untimed warm-up of {WARMUP_JOBS:,} jobs per side before round 1",
        "rounds alternate the order (peer first in odd rounds, ours first in even)",
        "jobs are built and JSON-encoded before the clock starts; the same driver code for "
        "both sides",
        "the bridge acknowledges a job after its answer is in the durable outbox (SQLite) "
        "and publishes answers in batches (egress_linger_ms, egress_batch); the responder "
        "acknowledges after handing its answer to the socket and sends one answer per message",
        "cpu_s: the measured process's CPU over the flood (all threads, /proc/PID/stat); "
        "broker_cpu_us_per_job: the broker's CPU over the flood (mosquitto, or the "
        "nats-server) divided by the jobs; "
        "driver_cpu_us_per_job: the bench process's (the EccClient driver's)",
    ]
    result.tables.append(
        Table(
            "latency, one job in flight (ms, median over rounds)",
            ["side", "p50", "p99", "mean"],
            [
                [
                    who,
                    f"{latency[who]['p50']:.3f}",
                    f"{latency[who]['p99']:.3f}",
                    f"{latency[who]['mean']:.3f}",
                ]
                for who in ("peer", "ours")
            ],
        )
    )
    result.tables.append(
        Table(
            "flood CPU per job, µs (the measured process; the broker and the driver meanwhile)",
            ["round", "responder", "bridge", "broker: peer/ours", "driver: peer/ours"],
            [
                [
                    str(r.index),
                    f"{(r.peer.cpu_s or 0) / r.peer.count * 1e6:.1f}",
                    f"{(r.ours.cpu_s or 0) / r.ours.count * 1e6:.1f}",
                    f"{r.peer.extra.get('broker_cpu_us_per_job', '-')}/"
                    f"{r.ours.extra.get('broker_cpu_us_per_job', '-')}",
                    f"{r.peer.extra['driver_cpu_us_per_job']}/"
                    f"{r.ours.extra['driver_cpu_us_per_job']}",
                ]
                for r in result.rounds
            ],
        )
    )
    return result


if __name__ == "__main__" and sys.argv[1:2] == ["responder"]:
    sys.exit(responder_main(sys.argv[2:]))
