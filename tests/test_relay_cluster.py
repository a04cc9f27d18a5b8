"""Two relays for one MID, and relays that stop and start again.

Against the built-in instance over HTTP and a real broker; a scripted bridge counts what
each output was published as, so a job taken by both relays would show (a real bridge
would hide it: it drops repeats by sys_id).
"""

from __future__ import annotations

import asyncio
from collections import Counter
from contextlib import AsyncExitStack
from pathlib import Path

from bridge.relay.http import InstanceClient
from bridge.relay.pickup import TOKEN_PREFIX, Claimer
from bridge.relay.service import Relay
from tests.brokers import BrokerAddress
from tests.test_connector import MID_PASSWORD
from tests.test_relay import FakeBridge, broker_config, new_prefix, relay_settings, snow

JOBS = 40


async def test_two_relays_of_one_mid_run_every_job_once(
    broker: BrokerAddress, unique_agent: str, tmp_path: Path
) -> None:
    prefix = new_prefix()
    async with AsyncExitStack() as stack:
        sn = await stack.enter_async_context(snow(tmp_path, unique_agent))
        bridge = await stack.enter_async_context(FakeBridge(broker, prefix, unique_agent))
        outputs = [
            await sn.output(unique_agent, "Echo", {"message": f"job {n}"}) for n in range(JOBS)
        ]
        relays = [
            relay_settings(
                sn.inst.url, unique_agent, prefix, client_id=f"relay-{name}-{prefix}",
                state_dir=tmp_path / name, poll_interval=0.05, batch=8,
                claim_window=1.0, lease=5.0,
            )
            for name in ("a", "b")
        ]  # fmt: skip
        # Both start at once: they fetch the same ready outputs and race for each.
        a, b = await asyncio.gather(
            *(stack.enter_async_context(Relay(s, broker_config(broker))) for s in relays)
        )
        await bridge.echo_each(JOBS)
        done = await sn.wait_done(outputs, timeout=30)
        assert {row["state"] for row in done} == {"processed"}

        published = Counter(job["sys_id"] for job in bridge.jobs)
        assert set(published) == set(outputs)
        assert max(published.values()) == 1, "a job was taken by both relays"
        for sys_id in outputs:
            assert len(await sn.inputs(sys_id)) == 1  # answered once, by the relay holding it
        assert a.stats["claimed"] + b.stats["claimed"] == JOBS
        assert a.stats["closed"] + b.stats["closed"] == JOBS
        # Each relay ignored the other's answers (both read the MID's one input topic).
        assert a.stats["ignored"] + b.stats["ignored"] >= JOBS


async def test_claims_racing_for_the_same_outputs_have_one_winner_each(
    unique_agent: str, tmp_path: Path
) -> None:
    """The claim protocol alone, under certain contention: two claimers that both read
    the same outputs ``ready`` write their tokens at the same time."""
    async with AsyncExitStack() as stack:
        sn = await stack.enter_async_context(snow(tmp_path, unique_agent))
        outputs = [await sn.output(unique_agent, "Echo", {"n": n}) for n in range(12)]
        claimers = []
        for name in ("a", "b"):
            client = InstanceClient(sn.inst.url, "mid.user", MID_PASSWORD)
            await client.open()
            stack.push_async_callback(client.close)
            claimers.append(Claimer(client, f"mid.server.{unique_agent}", name, window=4.0))
        fetched = await asyncio.gather(*(c.fetch("ready", 50) for c in claimers))
        assert all(len(rows) == len(outputs) for rows, _ in fetched)
        a, b = await asyncio.gather(
            *(c.claim(rows, checked) for c, (rows, checked) in zip(claimers, fetched, strict=True))
        )
        assert a.uncertain == b.uncertain == []
        assert a.skipped == b.skipped == 0
        winners = Counter(row["sys_id"] for row, _ in a.won + b.won)
        assert set(winners) == set(outputs)
        assert max(winners.values()) == 1
        assert a.lost + b.lost == len(outputs)
        for row, token in a.won + b.won:
            now = await sn.record(row["sys_id"])
            assert (now["state"], now["error_string"]) == ("processing", token)


async def test_results_that_arrive_while_the_relay_is_stopped_are_written_at_its_start(
    broker: BrokerAddress, unique_agent: str, tmp_path: Path
) -> None:
    prefix = new_prefix()
    async with AsyncExitStack() as stack:
        sn = await stack.enter_async_context(snow(tmp_path, unique_agent))
        bridge = await stack.enter_async_context(FakeBridge(broker, prefix, unique_agent))
        settings = relay_settings(sn.inst.url, unique_agent, prefix, state_dir=tmp_path / "r")
        async with Relay(settings, broker_config(broker)):
            sys_id = await sn.output(unique_agent, "Echo", {"message": "slow"})
            job = await bridge.job(sys_id)
        assert (await sn.record(sys_id))["state"] == "processing"
        # The bridge answers while no relay runs: the broker keeps it for the relay.
        await bridge.answer(job, [{"part": 1}, {"part": 2}])
        await asyncio.sleep(0.3)
        assert await sn.inputs(sys_id) == []
        async with Relay(settings, broker_config(broker)) as relay:
            [done] = await sn.wait_done([sys_id])
            assert done["state"] == "processed"
            [answer] = await sn.inputs(sys_id)
            assert answer["payload"] == '[{"part":1},{"part":2}]'
            assert relay.stats["closed"] == 1


async def test_outputs_left_processing_are_taken_back_at_start(
    broker: BrokerAddress, unique_agent: str, tmp_path: Path
) -> None:
    prefix = new_prefix()
    relay_id = f"relay-{prefix}"
    async with AsyncExitStack() as stack:
        sn = await stack.enter_async_context(snow(tmp_path, unique_agent))
        bridge = await stack.enter_async_context(FakeBridge(broker, prefix, unique_agent))
        # Left by this relay after its claim (it stopped before its spool had it), by
        # something that wrote no token, and by another relay of the MID that still runs.
        left = {"state": "processing"}
        mine = await sn.output(
            unique_agent, "Echo", {"message": "mine"}, **left,
            error_string=f"{TOKEN_PREFIX}{relay_id}:0123456789abcdef",
        )  # fmt: skip
        bare = await sn.output(unique_agent, "Echo", {"message": "bare"}, **left)
        theirs = await sn.output(
            unique_agent, "Echo", {"message": "theirs"}, **left,
            error_string=f"{TOKEN_PREFIX}relay-other:fedcba9876543210",
        )  # fmt: skip
        settings = relay_settings(
            sn.inst.url, unique_agent, prefix, client_id=relay_id, state_dir=tmp_path / "r"
        )
        async with Relay(settings, broker_config(broker)):
            for sys_id in (mine, bare):
                job = await bridge.job(sys_id)
                await bridge.answer(job, [{"ok": True}])
            done = await sn.wait_done([mine, bare])
            assert [row["state"] for row in done] == ["processed", "processed"]
            await asyncio.sleep(0.3)
            assert {job["sys_id"] for job in bridge.jobs} == {mine, bare}
            row = await sn.record(theirs)
            assert row["state"] == "processing"  # another relay's: left to it
            assert row["error_string"].startswith(f"{TOKEN_PREFIX}relay-other:")
