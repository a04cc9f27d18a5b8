"""``midbridge relay``: one MID Server for a ServiceNow instance, its work run by a bridge.

The relay itself is ``bridge.relay.core.Relay`` (docs/relay.md); this module is its
command line, and keeps the names other modules and the tests import from here.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
from pathlib import Path

from bridge.cli_errors import fail
from bridge.nats_url import nats_broker
from bridge.relay.core import SIGNING_KEY_FILE, Relay, state_dir_for
from bridge.relay.envelope import results_envelope
from bridge.relay.http import basic_auth
from bridge.relay.settings import (
    PASSWORD_ENV,
    TABLE_PATH,
    RelayError,
    RelaySettings,
    parse_assignments,
)
from bridge.signals import StopSignals
from bridge.wire.address import AddressError, parse_host_port
from bridge.wire.broker import BrokerConfig
from bridge.wire.keyfiles import public_key_b64, signing_key_file

log = logging.getLogger("midbridge.relay")

__all__ = [
    "PASSWORD_ENV",
    "TABLE_PATH",
    "Relay",
    "RelayError",
    "RelaySettings",
    "add_relay_parser",
    "basic_auth",
    "results_envelope",
    "run_command",
]


def add_relay_parser(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """Add ``midbridge relay`` to the command's parser."""
    parser = sub.add_parser(
        "relay", help="be a MID Server for a ServiceNow instance, its work run by a bridge"
    )
    parser.add_argument("--instance", required=True, help="https://<name>.service-now.com")
    parser.add_argument("--user", required=True, help="the MID's user (role mid_server)")
    parser.add_argument(
        "--password-stdin",
        action="store_true",
        help=f"read the password from the first line of stdin (else ${PASSWORD_ENV})",
    )
    parser.add_argument("--agent", required=True, help="the MID's name, without mid.server.")
    parser.add_argument(
        "--broker",
        default=None,
        help="HOST:PORT (MQTT), or nats://HOST:PORT[,nats://HOST:PORT...] (NATS JetStream); "
        "default: the config's broker",
    )
    parser.add_argument("--config", "-c", default=None, help="bridge config (broker, prefix)")
    parser.add_argument("--prefix", default=None, help="topic prefix (default: from config)")
    parser.add_argument(
        "--poll-interval",
        type=float,
        default=None,
        help="seconds between idle polls (default: mid.poll.time, 5)",
    )
    parser.add_argument(
        "--batch",
        type=int,
        default=None,
        help="outputs fetched a poll (default: the threads.* properties' sum)",
    )
    parser.add_argument("--lease", type=float, default=300.0)
    parser.add_argument(
        "--state-dir",
        default=None,
        help="the spool's directory (default: <bridge.state_dir>/relay-<id>)",
    )
    parser.add_argument(
        "--mid-config", default=None, help="a MID Server config.xml whose parameters to honour"
    )
    parser.add_argument(
        "--property",
        action="append",
        default=[],
        metavar="NAME=VALUE",
        help="a MID property (mid.poll.time=5); overrides the instance's",
    )
    parser.add_argument(
        "--claim-window",
        type=float,
        default=5.0,
        help="the claim's time bound in seconds (docs/relay.md, Claims)",
    )
    parser.add_argument(
        "--refresh-interval", type=float, default=60.0, help="seconds between ecc_agent refreshes"
    )
    parser.add_argument(
        "--no-register", action="store_true", help="do not keep the MID's ecc_agent record"
    )
    parser.add_argument("--insecure", action="store_true", help="do not verify TLS certificates")
    parser.add_argument("--ca-file", default=None, metavar="PEM",
                        help="verify the instance's certificate with these CAs (not the "
                        "system's)")  # fmt: skip
    parser.add_argument("--client-id", default=None,
                        help="MQTT client id and claim identity (default per agent)")  # fmt: skip
    parser.add_argument("--signing-key", default=None, metavar="PEM",
                        help="the Ed25519 key jobs are signed with (default: "
                        "<state dir>/relay.signing.pem, made on first use)")  # fmt: skip
    parser.add_argument("--print-key", action="store_true",
                        help="print the public key jobs are signed with (the bridge's "
                        "security.platform_key) and exit")  # fmt: skip


def broker_from_option(config: BrokerConfig, option: str) -> BrokerConfig:
    """``--broker``: ``nats://HOST:PORT[,...]`` (NATS JetStream) or ``HOST:PORT`` (MQTT)
    over the config's broker: the option gives the kind and the addresses, the config
    every other setting (user, password, TLS, ``nats.*``). Raises ``AddressError`` or
    ``CommandError`` naming ``--broker``."""
    if option.startswith("nats://"):
        given = nats_broker(option, config.username, config.password)
        nats = {**config.nats.model_dump(), "servers": given.nats.servers}
        return BrokerConfig.model_validate(
            {**config.model_dump(), "kind": "nats", "host": given.host, "port": given.port,
             "nats": nats}
        )  # fmt: skip
    host, port = parse_host_port(option, option="--broker")
    return BrokerConfig.model_validate(
        {**config.model_dump(), "kind": "mqtt", "host": host, "port": port}
    )


async def run_command(args: argparse.Namespace) -> int:
    """Run ``midbridge relay`` until SIGTERM/SIGINT; the exit status."""
    from bridge.agent.config import Config, load_config

    config = load_config(Path(args.config)) if args.config else Config()
    relay_id = args.client_id or f"midbridge-relay-{args.agent}"
    state_dir = (
        Path(args.state_dir) if args.state_dir else state_dir_for(config.bridge.state_dir, relay_id)
    )
    signing_key = Path(args.signing_key) if args.signing_key else state_dir / SIGNING_KEY_FILE
    if args.print_key:
        print(public_key_b64(signing_key_file(signing_key)))
        return 0
    if args.password_stdin:
        password = sys.stdin.readline().rstrip("\r\n")
    else:
        password = os.environ.get(PASSWORD_ENV, "")
    if not password:
        return fail("relay", f"no password (--password-stdin or ${PASSWORD_ENV})")
    broker = config.broker
    if args.broker:
        try:
            broker = broker_from_option(broker, str(args.broker))
        except AddressError as exc:
            return fail("relay", exc)
    try:
        properties = parse_assignments(list(args.property))
    except RelayError as exc:
        return fail("relay", exc)
    if args.ca_file and args.insecure:
        return fail("relay", "--ca-file and --insecure: give one")
    settings = RelaySettings(
        instance=args.instance,
        user=args.user,
        password=password,
        agent=args.agent,
        prefix=args.prefix or config.bridge.topic_prefix,
        poll_interval=args.poll_interval,
        lease=args.lease,
        batch=args.batch,
        verify_tls=not args.insecure,
        ca_file=Path(args.ca_file) if args.ca_file else None,
        client_id=args.client_id,
        state_dir=state_dir,
        signing_key=signing_key,
        claim_window=args.claim_window,
        refresh_interval=args.refresh_interval,
        register=not args.no_register,
        mid_config=Path(args.mid_config) if args.mid_config else None,
        properties=properties,
    )
    with StopSignals() as stop:
        async with Relay(settings, broker):
            await stop.wait()
    log.info("relay stopped")
    return 0
