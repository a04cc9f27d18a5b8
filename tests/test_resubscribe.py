"""A bridge whose broker session is resumed still listens where its config says.

The broker keeps a persistent session's subscriptions; a bridge restarted with another
topic prefix or shared group resumes that session. These tests restart a bridge (same
agent, same state directory, so the same client ids) with new topics, check that the
broker really resumed the session, and get a job through on the new topics; the old
subscriptions must be gone.
"""

from __future__ import annotations

import asyncio
from pathlib import Path

import orjson

from bridge.agent.bridge import Bridge
from bridge.agent.config import Config
from bridge.wire.client import EccClient, output_record
from bridge.wire.transport import MqttSession
from probes import REGISTRY
from tests.brokers import BrokerAddress
from tests.harness import make_config


def with_topics(config: Config, *, prefix: str, group: str | None) -> Config:
    section = config.bridge.model_copy(
        update={"topic_prefix": prefix, "shared_group": group, "instance": "m1"}
    )
    return config.model_copy(update={"bridge": section})


async def echo_through(config: Config, message: str) -> None:
    """One Echo job sent on the config's topics gets its complete answer."""
    name = config.bridge.agent
    async with EccClient(config.broker, agent=name, prefix=config.bridge.topic_prefix) as client:
        record = output_record("Echo", agent=f"mid.server.{name}", payload={"message": message})
        await client.send([record])
        (result,) = await client.wait([record["sys_id"]], timeout=15)
        assert result.final["payload"]["message"] == message


async def test_restart_with_new_prefix_and_group_on_a_resumed_session(
    broker: BrokerAddress, unique_agent: str, tmp_path: Path
) -> None:
    base = make_config(broker.host, broker.port, unique_agent, tmp_path)
    first = with_topics(base, prefix="ecc", group="g1")
    async with Bridge(first, REGISTRY) as bridge:
        await echo_through(first, "first run")
        assert bridge.bulk.subscriptions == [f"$share/g1/ecc/{unique_agent}/output"]

    second = with_topics(base, prefix="ecc2", group="g2")
    async with Bridge(second, REGISTRY) as bridge:
        # The point of the test: the broker handed back the old session.
        assert bridge.bulk._session_present, "the broker did not resume the session"
        await echo_through(second, "after the restart")
        recorded = orjson.loads((tmp_path / "subscriptions-bulk.json").read_bytes())
        assert recorded["topics"] == [f"$share/g2/ecc2/{unique_agent}/output"]
        assert recorded["client_id"] == bridge.bulk.client_id

        # The old shared subscription was dropped: a job on the old topics reaches nobody.
        async with EccClient(first.broker, agent=unique_agent, prefix="ecc") as old:
            stale = output_record(
                "Echo", agent=f"mid.server.{unique_agent}", payload={"message": "old topic"}
            )
            await old.send([stale])
            await asyncio.sleep(1.0)
            assert not old.results[stale["sys_id"]].runs, "the old subscription still delivers"
        assert bridge.counters.processed == 1


async def test_resumed_session_is_resubscribed_without_a_record(
    broker: BrokerAddress, unique_agent: str, tmp_path: Path
) -> None:
    """No record (a state directory from before records existed): still subscribed."""
    base = make_config(broker.host, broker.port, unique_agent, tmp_path)
    async with Bridge(with_topics(base, prefix="ecc", group=None), REGISTRY):
        pass
    for name in ("subscriptions-bulk.json", "subscriptions-express.json"):
        (tmp_path / name).unlink()
    moved = with_topics(base, prefix="moved", group=None)
    async with Bridge(moved, REGISTRY) as bridge:
        assert bridge.bulk._session_present
        await echo_through(moved, "no record")


async def test_subscription_record_is_rewritten_and_a_bad_one_ignored(
    broker: BrokerAddress, unique_agent: str, tmp_path: Path
) -> None:
    """The record is rewritten with the current topics; unreadable records are ignored."""
    record = tmp_path / "subs.json"
    record.write_text("not json")
    topic = f"t/{unique_agent}/a"
    got: list[str] = []

    async def handler(delivery: object) -> bool:
        got.append(getattr(delivery, "topic", ""))
        return True

    async with MqttSession(
        make_config(broker.host, broker.port, unique_agent, tmp_path).broker,
        client_id=f"resub-{unique_agent}",
        subscriptions=[topic],
        on_message=handler,
        subscription_record=record,
    ) as session:
        await session.publish(topic, b"x")
        for _ in range(100):
            if got:
                break
            await asyncio.sleep(0.05)
    assert got == [topic]
    assert orjson.loads(record.read_bytes()) == {
        "client_id": f"resub-{unique_agent}",
        "topics": [topic],
    }


async def test_a_new_client_id_drops_the_session_of_the_old_one(
    broker: BrokerAddress, unique_agent: str, tmp_path: Path
) -> None:
    """Leaving a shared group changes the client id (the member's name goes): the broker
    would keep the old session, and with it the old group's share of the jobs. It is
    dropped at the next start."""
    base = make_config(broker.host, broker.port, unique_agent, tmp_path)
    grouped = with_topics(base, prefix="ecc", group="g1")
    async with Bridge(grouped, REGISTRY) as bridge:
        old_id = bridge.bulk.client_id
    alone = with_topics(base, prefix="ecc", group=None)
    async with Bridge(alone, REGISTRY) as bridge:
        assert bridge.bulk.client_id != old_id
        await echo_through(alone, "alone")
    # Had the old session survived, this connect would resume it.
    async with MqttSession(base.broker, client_id=old_id) as probe:
        assert not probe._session_present, "the old client id's session is still there"
