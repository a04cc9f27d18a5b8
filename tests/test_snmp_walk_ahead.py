"""Walks that send the next GETBULK before handing an answer over (``walk_answers``).

A walk stopped early (the job's ``max_varbinds``) leaves a request in flight: its answer
must be read and dropped when it comes, never taken for the answer of the session's next
request, and the session must go back to the pool at rest.
"""

from __future__ import annotations

import asyncio

from probes.snmp.pool import Pooled
from probes.snmp.values import SYS_NAME as SYS_NAME_OID
from tests.snmpd import BIG, SYS_NAME
from tests.test_snmp import Runner, agent, by_oid, lab

FIXTURES = (agent, lab)  # pytest finds the fixtures by these names


def idle_sessions(runner: Runner) -> list[Pooled]:
    return [p for g in runner.pool._groups.values() for p in g.idle]


async def test_a_walk_cut_short_leaves_its_session_clean(lab: Runner) -> None:
    chunks = await lab.run(
        {"credential_id": "v2", "oid_spec_list": f"walk {BIG}", "max_varbinds": 15}
    )
    assert chunks[-1]["summary"]["truncated"] is True
    assert chunks[-1]["summary"]["varbinds"] == 15
    requests = chunks[-1]["summary"]["requests"]
    # 10, then 10 (the walk stops inside it): the first answer's successor was sent ahead,
    # the second's was not, since the job takes no more than 15 varbinds
    assert requests == 2
    [pooled] = idle_sessions(lab)
    assert pooled.reader is not None
    assert pooled.reader.waiter is None
    await asyncio.sleep(0.05)  # it arrives and is drained by the reader
    for _ in range(3):  # the same session answers its own requests, not the stale one
        got = by_oid(await lab.run({"credential_id": "v2", "oid_spec_list": "get sysName.0"}))
        assert got[SYS_NAME_OID]["value"] == SYS_NAME
    assert [p.session for p in idle_sessions(lab)] == [pooled.session]


async def test_a_walk_that_ends_sends_nothing_ahead(lab: Runner) -> None:
    """The last answer is short (or holds the end of the subtree): no request after it."""
    chunks = await lab.run({"credential_id": "v2", "oid_spec_list": f"walk {BIG}"})
    summary = chunks[-1]["summary"]
    answers = -(-summary["varbinds"] // 10)  # max_repetitions 10
    assert summary["requests"] in (answers, answers + 1)  # +1: a full last answer
    [pooled] = idle_sessions(lab)
    assert pooled.reader is not None
    assert pooled.reader.waiter is None


async def test_walks_one_after_another_return_the_same_varbinds(lab: Runner) -> None:
    first = await lab.run({"credential_id": "v2", "oid_spec_list": "walk 1.3.6.1.2.1.1"})
    for max_repetitions in (1, 3, 10, 25):
        again = await lab.run(
            {
                "credential_id": "v2",
                "oid_spec_list": "walk 1.3.6.1.2.1.1",
                "max_repetitions": max_repetitions,
            }
        )
        assert [vb["oid"] for vb in again[0]["results"][0]["varbinds"]] == [
            vb["oid"] for vb in first[0]["results"][0]["varbinds"]
        ]


async def test_a_walk_that_fills_its_room_exactly_sends_nothing_unread(lab: Runner) -> None:
    chunks = await lab.run(
        {"credential_id": "v2", "oid_spec_list": f"walk {BIG}", "max_varbinds": 20}
    )
    assert chunks[-1]["summary"]["varbinds"] == 20
    assert chunks[-1]["summary"]["truncated"] is True
    # the third answer is read (it tells that there is more: truncated); no fourth is sent
    assert chunks[-1]["summary"]["requests"] == 3
    [pooled] = idle_sessions(lab)
    assert pooled.reader is not None
    assert pooled.reader.waiter is None
