"""Attacks on the broker's sessions (issue 12), against Mosquitto 2.0 with the compose config.

The broker runs ``compose/mosquitto-secure.conf`` (its paths and ports made local) with the
password file and ACL that ``compose/make-mid-user.sh`` writes, as in
``docker-compose.secure.yml``; the bridge runs with that overlay's settings.
"""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest

from bridge.agent.bridge import Bridge
from bridge.wire.broker import BrokerConfig
from bridge.wire.client import EccClient, output_record
from bridge.wire.transport import MqttSession
from probes import REGISTRY
from tests.harness import make_config
from tests.test_broker_security import make_user, secure_compose_broker

TIMEOUT = 10.0
AGENT = "compose"  # compose/midbridge.toml's agent, as the secure overlay runs it
PASSWORDS = {"platform": "platform-pw", "mid.user.compose": "compose-pw", "mid.user.dc2": "dc2-pw"}


def make_users(auth_dir: Path) -> None:
    for args, user in (
        (["--platform"], "platform"),
        ([AGENT], "mid.user.compose"),
        (["dc2"], "mid.user.dc2"),
    ):
        done = make_user(auth_dir, *args, password=PASSWORDS[user])
        assert done.returncode == 0, done.stderr


def login(port: int, user: str) -> BrokerConfig:
    return BrokerConfig(
        port=port,
        username=user,
        password=PASSWORDS[user],
        reconnect_min=0.1,
        reconnect_max=1.0,
    )


@pytest.mark.parametrize("attacker", ["mid.user.dc2", "platform"])
async def test_another_broker_user_cannot_take_over_the_bridges_session(
    tmp_path: Path, attacker: str
) -> None:
    """Another broker user (another agent's MID, or the platform's user) connects with the
    bridge's client id and a clean start, to disconnect the bridge and wipe its queued jobs.
    The broker gives it its own user name as client id instead: the bridge's session, and
    the job queued in it while the bridge was away, survive; the restarted bridge runs it."""
    auth = tmp_path / "auth"
    make_users(auth)
    with secure_compose_broker(tmp_path, auth) as (port, _health):
        config = make_config(
            "127.0.0.1",
            port,
            AGENT,
            tmp_path / "state",
            broker={
                "username": "mid.user.compose",
                "password": PASSWORDS["mid.user.compose"],
                "session_users": True,  # as docker-compose.secure.yml sets it
            },
        )
        async with EccClient(login(port, "platform"), agent=AGENT) as platform:
            async with Bridge(config, REGISTRY) as bridge:
                bulk_id = bridge.bulk.client_id
            job = output_record("Echo", agent=f"mid.server.{AGENT}", payload={"message": "kept"})
            await platform.send([job])  # queued in the absent bridge's bulk session
            for client_id in (bulk_id, f"midbridge-{AGENT}-bulk"):
                takeover = MqttSession(login(port, attacker), client_id=client_id, clean_start=True)
                async with takeover:
                    await asyncio.sleep(0.1)
            async with Bridge(config, REGISTRY):
                (result,) = await platform.wait([job["sys_id"]], timeout=TIMEOUT)
    assert result.error_string == ""
    assert result.final["payload"]["message"] == "kept"
