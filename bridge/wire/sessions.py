"""The platform's session on either transport, chosen by ``broker.kind``.

The connector of the built-in instance, the relay and ``EccClient`` (the sweep command,
the demo, the benchmarks, the tests) publish output records and take input records (the connector
also status records) through :func:`platform_session`; the bridge makes its own sessions
(``bridge.agent.bridge``).
"""

from __future__ import annotations

import logging

from bridge.wire.broker import BrokerConfig
from bridge.wire.session import MessageHandler, Publisher
from bridge.wire.transport import MqttSession


def platform_session(
    cfg: BrokerConfig,
    *,
    client_id: str,
    prefix: str,
    on_message: MessageHandler,
    agent: str | None = None,
    status: bool = False,
    durable: bool = True,
    receive_maximum: int = 1000,
    logger: logging.Logger | None = None,
) -> Publisher:
    """A session that takes ``<prefix>/<agent>/input`` and, with ``status``,
    ``<prefix>/<agent>/status`` (every agent's when ``agent`` is None: ``+``); it publishes
    to any topic.

    ``durable``: the subscription outlives the process (an MQTT session kept by the broker,
    a durable JetStream consumer), so answers sent while it is away wait for it. An
    ephemeral one (NATS) is removed by the server soon after the process leaves.
    """
    if cfg.kind == "nats":
        from bridge.wire.nats_transport import NatsPlatformSession  # nats-py only when used

        return NatsPlatformSession(
            cfg,
            client_id=client_id,
            prefix=prefix,
            on_message=on_message,
            agent=agent,
            status=status,
            durable=durable,
            receive_maximum=receive_maximum,
            logger=logger,
        )
    subscriptions = [f"{prefix}/{agent or '+'}/input"]
    if status:
        subscriptions.append(f"{prefix}/{agent or '+'}/status")
    return MqttSession(
        cfg,
        client_id=client_id,
        subscriptions=subscriptions,
        on_message=on_message,
        receive_maximum=receive_maximum,
        logger=logger,
    )
