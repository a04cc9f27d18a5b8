"""``python -m bridge.demo.targets``: serve the sample targets until SIGINT or SIGTERM."""

from __future__ import annotations

import argparse
import asyncio
import os
from collections.abc import Sequence

from bridge.cli_errors import EXIT_FAILED, fail
from bridge.demo.targets.network import (
    DEFAULT_SSH_USER,
    SNMP_COMMUNITY_ENV,
    SSH_PASSWORD_ENV,
    TARGET_NAMES,
    Ports,
    describe,
)
from bridge.demo.targets.running import TargetSettings, demo_targets
from bridge.signals import StopSignals


def command_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m bridge.demo.targets",
        description="Serve the midbridge demo's sample targets until SIGINT/SIGTERM.",
    )
    parser.add_argument(
        "--bind", default=None, help="serve the targets on this address (default: each its own)"
    )
    parser.add_argument(
        "--only",
        default=None,
        help=f"comma list of targets to serve (default: all of {', '.join(TARGET_NAMES)})",
    )
    parser.add_argument("--ssh-user", default=DEFAULT_SSH_USER)
    defaults = Ports()
    parser.add_argument("--ssh-port", type=int, default=defaults.ssh)
    parser.add_argument("--http-port", type=int, default=defaults.http)
    parser.add_argument("--https-port", type=int, default=defaults.https)
    parser.add_argument("--snmp-port", type=int, default=defaults.snmp)
    return parser


async def _serve(settings: TargetSettings) -> int:
    with StopSignals() as stop:
        return await _serve_until(settings, stop)


async def _serve_until(settings: TargetSettings, stop: asyncio.Event) -> int:
    async with demo_targets(settings) as running:
        for item in running.listening:
            print(f"{item.target.name:<9} {item.where:<24} {describe(item.target)}", flush=True)
        for note in running.notes:
            print(f"note: {note}", flush=True)
        if not running.listening:
            return fail("demo targets", "nothing started", status=EXIT_FAILED)
        print(
            f"SSH user {settings.ssh_user!r} (password from ${SSH_PASSWORD_ENV}), "
            f"SNMP community from ${SNMP_COMMUNITY_ENV}; serving until SIGINT/SIGTERM",
            flush=True,
        )
        await stop.wait()
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    args = command_parser().parse_args(argv)
    only = None
    if args.only:
        only = frozenset(n.strip() for n in str(args.only).split(",") if n.strip())
        unknown = sorted(only - set(TARGET_NAMES))
        if unknown:
            return fail(
                "demo targets",
                f"unknown target(s) {', '.join(unknown)}; known: {', '.join(TARGET_NAMES)}",
            )
    for env in (SSH_PASSWORD_ENV, SNMP_COMMUNITY_ENV):
        if not os.environ.get(env):
            return fail("demo targets", f"set ${env} (the discovery side must know it)")
    settings = TargetSettings(
        ssh_user=args.ssh_user,
        ssh_password=os.environ[SSH_PASSWORD_ENV],
        snmp_community=os.environ[SNMP_COMMUNITY_ENV],
        ports=Ports(args.ssh_port, args.http_port, args.https_port, args.snmp_port),
        bind=args.bind,
        only=only,
    )
    return asyncio.run(_serve(settings))
