"""NATS for the benchmarks: private servers, and the bare nats-py echo responder (the peer).

- :func:`nats_servers`: the NATS given with ``--broker`` (one server, replicas 1), else a
  private cluster of ``size`` nodes with JetStream on loopback (``bridge.bench.natsd``).
- :func:`responder_main`, the peer of ``bench roundtrip --transport nats``: nats-py
  2.16 + uvloop, nothing else. It binds a push consumer to the agent's jobs stream (the
  same stream the bridge reads, ``max_ack_pending`` = the bridge's window), answers each job
  with one input record (the same fields as the bridge's) published on the input subject
  (stored by the inputs stream, no wait for JetStream's acknowledgement), and acknowledges
  the job after handing the answer to the socket: the NATS twin of the gmqtt responder in
  ``bridge/bench/roundtrip.py``. No validation, no durable outbox, no batching, no dedupe.
"""

from __future__ import annotations

import asyncio
import contextlib
import sys
import time
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any

import orjson

from bridge.bench import BenchError
from bridge.bench.common import CpuMeters, echo_answer
from bridge.bench.natsd import NatsCluster, NatsServerError
from bridge.signals import StopSignals
from bridge.wire.broker import BrokerConfig
from bridge.wire.nats_link import inputs_config, jobs_config
from bridge.wire.nats_names import jobs_stream, subject_of
from bridge.wire.topics import Topics

# --- the servers --------------------------------------------------------------------------------


@dataclass
class NatsServers:
    """Where the benchmark's NATS is, and the CPU meter of its nodes (private ones)."""

    broker: BrokerConfig
    cluster: NatsCluster | None
    meter: CpuMeters = field(default_factory=lambda: CpuMeters([None]))

    def facts(self) -> dict[str, Any]:
        facts: dict[str, Any] = {
            "kind": "nats",
            "host": self.broker.host,
            "port": self.broker.port,
            "protocol": "NATS JetStream",
            "servers": self.broker.nats_servers,
            "replicas": self.broker.nats.replicas,
        }
        if self.cluster is not None:
            facts["config"] = (
                f"bridge.bench.natsd: {self.cluster.size} private nats-server node(s) on "
                "loopback, JetStream file storage in a temporary directory"
            )
        return facts


@contextlib.asynccontextmanager
async def nats_servers(broker: tuple[str, int] | None, size: int = 1) -> AsyncIterator[NatsServers]:
    """The NATS given (``--broker``), else ``size`` private nodes; stopped afterwards."""
    if broker is not None:
        yield NatsServers(BrokerConfig(kind="nats", host=broker[0], port=broker[1]), None)
        return
    try:
        cluster = NatsCluster(size)
    except NatsServerError as exc:
        raise BenchError(str(exc)) from None
    try:
        await asyncio.to_thread(cluster.start)
        meter = CpuMeters([node.proc.pid if node.proc else None for node in cluster.nodes])
        yield NatsServers(cluster.broker_config(), cluster, meter)
    finally:
        await asyncio.to_thread(cluster.close)


# --- the peer: a bare nats-py echo responder (child process) ------------------------------------


def _now_text() -> str:
    return time.strftime("%Y-%m-%d %H:%M:%S", time.gmtime())


async def _responder(servers: str, agent: str, prefix: str, window: int) -> int:
    import nats
    from nats.js.api import AckPolicy, ConsumerConfig

    topics = Topics.for_agent(prefix, agent)
    input_subject = subject_of(topics.input)
    agent_id = f"mid.server.{agent}"
    dumps, loads, new_id = orjson.dumps, orjson.loads, uuid.uuid4
    cfg = BrokerConfig.model_validate({"kind": "nats", "nats": {"servers": servers.split(",")}})

    nc = await nats.connect(servers.split(","), name=f"bench-echo-{agent}")
    js = nc.jetstream()
    await js.add_stream(jobs_config(cfg, prefix, agent))
    await js.add_stream(inputs_config(cfg, prefix))

    async def on_message(msg: Any) -> None:
        job = loads(msg.data)
        answer = echo_answer(job, agent_id, new_id().hex, _now_text())
        await nc.publish(input_subject, dumps(answer))
        await msg.ack()  # the answer is on its way: acknowledge the job

    with StopSignals() as stop:
        await js.subscribe(
            subject_of(topics.output),
            stream=jobs_stream(prefix, agent),
            durable="echo",
            cb=on_message,
            manual_ack=True,
            config=ConsumerConfig(
                ack_policy=AckPolicy.EXPLICIT, max_ack_pending=window, ack_wait=30.0
            ),
        )
        print("ready", flush=True)
        await stop.wait()
        await nc.close()
    return 0


def responder_main(argv: list[str]) -> int:
    servers, agent, prefix, window = argv[0], argv[1], argv[2], int(argv[3])
    import uvloop

    return uvloop.run(_responder(servers, agent, prefix, window))


def responder_command(broker: BrokerConfig, agent: str, prefix: str, window: int) -> list[str]:
    servers = ",".join(broker.nats_servers)
    return [
        sys.executable,
        "-m",
        "bridge.bench.nats_peer",
        "responder",
        servers,
        agent,
        prefix,
        str(window),
    ]


if __name__ == "__main__" and sys.argv[1:2] == ["responder"]:
    sys.exit(responder_main(sys.argv[2:]))
