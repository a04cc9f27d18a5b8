"""``--broker nats://HOST:PORT[,nats://HOST:PORT...]`` on the command line: a NATS broker
configuration (the instance's connector, the relay)."""

from __future__ import annotations

from pydantic import ValidationError

from bridge.cli_errors import CommandError
from bridge.wire.address import AddressError, parse_host_port
from bridge.wire.broker import BrokerConfig


def nats_broker(
    text: str, username: str | None, password: str | None, *, ack_wait: float | None = None
) -> BrokerConfig:
    """``--broker nats://HOST:PORT[,nats://HOST:PORT...]``: NATS JetStream (``ack_wait``:
    ``--nats-ack-wait``, seconds; None: the default)."""
    servers = [part.strip() for part in text.split(",") if part.strip()]
    hosts = []
    for server in servers:
        if not server.startswith("nats://"):
            raise CommandError(f"--broker: expected nats://HOST:PORT, not {server!r}")
        try:
            hosts.append(parse_host_port(server.removeprefix("nats://"), option="--broker"))
        except AddressError as exc:
            raise CommandError(str(exc)) from None
    host, port = hosts[0]
    try:
        return BrokerConfig.model_validate(
            {
                "kind": "nats",
                "host": host,
                "port": port,
                "username": username,
                "password": password,
                "nats": {"servers": servers} | ({} if ack_wait is None else {"ack_wait": ack_wait}),
            }
        )
    except ValidationError as exc:
        problem = exc.errors()[0]
        where = "--nats-ack-wait" if ack_wait is not None else "--broker"
        raise CommandError(f"{where}: {problem['msg']}") from None
