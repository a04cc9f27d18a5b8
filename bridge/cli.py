"""The ``midbridge`` command: run, sweep, demo, bench, instance, relay."""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
import sys
import time
from collections.abc import Coroutine, Sequence
from contextlib import AsyncExitStack
from pathlib import Path
from typing import Any, NoReturn, cast

from bridge import __version__
from bridge.agent.config import Config, defaults_toml, load_config
from bridge.cli_errors import ERROR_PREFIX, EXIT_REFUSED, CommandError, fail
from bridge.logs import FORMATS, LEVELS, setup_logging
from bridge.signals import StopSignals
from bridge.wire.address import AddressError, parse_host_port
from bridge.wire.broker import BrokerConfig
from bridge.wire.errors import BridgeError, BrokerRefused, ConfigError

log = logging.getLogger("midbridge")


def _broker_arg(text: str) -> tuple[str, int]:
    try:
        return parse_host_port(text, option="--broker")
    except AddressError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


class _Parser(argparse.ArgumentParser):
    """argparse, with a usage error as one line: ``midbridge: error: <cause>``, exit 2."""

    def error(self, message: str) -> NoReturn:
        where = self.prog.removeprefix("midbridge").strip()
        hint = f" (midbridge {where} --help)" if where else " (midbridge --help)"
        print(f"{ERROR_PREFIX}{message}{hint}", file=sys.stderr, flush=True)
        raise SystemExit(EXIT_REFUSED)


def _global_flags(parser: argparse.ArgumentParser, *, top: bool) -> None:
    """--log-level and --log-format: before the subcommand or after it (at any depth)."""
    if "--log-level" not in parser._option_string_actions:
        parser.add_argument(
            "--log-level",
            default=None if top else argparse.SUPPRESS,
            choices=LEVELS,
            help="trace shows the protocol libraries' packet dumps too",
        )
    if "--log-format" not in parser._option_string_actions:
        parser.add_argument(
            "--log-format", default=None if top else argparse.SUPPRESS, choices=FORMATS
        )
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for child in action.choices.values():
                _global_flags(child, top=False)


def _wait_arg(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a number of seconds: {text!r}") from None
    if not value >= 0:
        raise argparse.ArgumentTypeError("must be 0 or more seconds")
    return value


def _parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="midbridge", description=__doc__)
    parser.add_argument("--version", action="version", version=f"midbridge {__version__}")
    # Subparsers are _Parser too (one-line errors); the other modules add plain ones.
    sub = cast(
        "argparse._SubParsersAction[argparse.ArgumentParser]",
        parser.add_subparsers(dest="command", required=True),
    )

    run = sub.add_parser("run", help="run the bridge (config file + MIDBRIDGE_* env overrides)")
    run.add_argument("--config", "-c", type=Path, default=None, help="TOML config file")
    run.add_argument(
        "--wait-for-broker",
        type=_wait_arg,
        default=None,
        metavar="SECONDS",
        help="retry an unreachable broker this long at start (default: for ever; 0: no retry)",
    )

    config = sub.add_parser("config", help="check a configuration, or print the defaults")
    config_sub = config.add_subparsers(dest="config_command", required=True)
    check = config_sub.add_parser(
        "check", help="every problem of a config file (and MIDBRIDGE_* overrides) at once"
    )
    check.add_argument("file", type=Path, nargs="?", default=None, help="TOML config file")
    config_sub.add_parser("defaults", help="print the default configuration as TOML")

    sweep = sub.add_parser("sweep", help="send a Shazzam sweep to a running bridge, show results")
    sweep.add_argument("targets", help="CIDRs, ranges a-b, lists: 10.0.0.0/24,10.0.1.5")
    sweep.add_argument(
        "--ports", "-p", default=None, help="22,80,8000-8100 (default: discovery ports)"
    )
    sweep.add_argument("--broker", type=_broker_arg, default=None, help="HOST:PORT")
    sweep.add_argument(
        "--config", "-c", type=Path, default=None, help="bridge config (broker, agent)"
    )
    sweep.add_argument("--agent", default=None, help="agent name (default: from config)")
    sweep.add_argument("--timeout", type=float, default=600.0)
    sweep.add_argument("--banner", action="store_true", help="read a short banner on open ports")
    sweep.add_argument("--all", action="store_true", help="list hosts without open ports too")
    sweep.add_argument("--json", action="store_true", help="print one JSON object (no progress)")
    sweep.add_argument(
        "--status-wait",
        type=_wait_arg,
        default=5.0,
        metavar="SECONDS",
        help="how long to wait for the bridge's status record before giving up (default 5)",
    )

    demo = sub.add_parser(
        "demo",
        help="the whole loop on loopback: broker, instance, bridge, targets, a discovery run",
    )
    demo.add_argument(
        "--broker", type=_broker_arg, default=None, help="use this broker instead of starting one"
    )
    demo.add_argument(
        "--hosts", type=int, default=60, help="discover 127.0.0.1-127.0.0.N (default 60)"
    )
    demo.add_argument(
        "--keep", action="store_true", help="stay up after the run (the dashboard) until Ctrl-C"
    )
    demo.add_argument(
        "--embedded",
        choices=["auto", "mosquitto", "amqtt"],
        default="auto",
        help="which broker to start when none is given",
    )
    demo.add_argument(
        "--https",
        action="store_true",
        help="serve the instance over HTTPS with a self-signed certificate (trusted by the demo)",
    )

    bench = sub.add_parser("bench", help="benchmarks beside their peers (see docs/benchmarks.md)")
    bench.add_argument("name", help="benchmark name, or 'list'")
    bench.add_argument("--json", action="store_true", help="print one JSON object")
    bench.add_argument("--broker", type=_broker_arg, default=None)
    bench.add_argument("--rounds", type=int, default=3, help="alternating rounds (median kept)")
    bench.add_argument(
        "--transport", choices=["mqtt", "nats"], default=None, help="roundtrip: mqtt or nats"
    )

    # The built-in instance: `midbridge instance ...` (bridge/instance/cli.py).
    from bridge.instance.cli import add_instance_parser

    add_instance_parser(sub)

    # --- relay to a ServiceNow instance: `midbridge relay ...` (bridge/relay/service.py) ---
    from bridge.relay.service import add_relay_parser

    add_relay_parser(sub)
    # --- end relay ---
    _global_flags(parser, top=True)
    return parser


def _setup_logging(level: str, fmt: str | None = None) -> None:
    setup_logging(level, fmt or "text")


def _run_loop(coro: Coroutine[Any, Any, int]) -> int:
    try:
        import uvloop

        return uvloop.run(coro)
    except ImportError:  # pragma: no cover - platforms without uvloop
        return asyncio.run(coro)


async def _serve(config: Config, wait_for_broker: float | None = None) -> int:
    from bridge.agent.runtime import tune_gc

    tune_gc()

    async with AsyncExitStack() as stack:
        stop = stack.enter_context(StopSignals())
        slot = None
        if config.metrics_port is not None:  # bound first: a port in use stops the start now
            from bridge.agent.metrics import BridgeSlot, serve_metrics

            slot = BridgeSlot()
            host = config.metrics_host
            try:
                port = await stack.enter_async_context(
                    serve_metrics(slot, host, config.metrics_port)
                )
            except OSError as exc:
                raise CommandError(
                    f"metrics_port: cannot serve on {host}:{config.metrics_port}: "
                    f"{exc.strerror or exc}"
                ) from None
            log.info("metrics on http://%s:%s/metrics (/livez, /readyz)", host, port)
        bridge = await _connect(config, stack, stop, slot, wait_for_broker)
        if bridge is None:
            return 0  # stopped while waiting for the broker
        if slot is not None:
            slot.bridge = bridge
        waiter = asyncio.ensure_future(stop.wait())
        failure = asyncio.ensure_future(bridge.serve_forever())
        await asyncio.wait({waiter, failure}, return_when=asyncio.FIRST_COMPLETED)
        waiter.cancel()
        failure.cancel()
        log.info("stopping: draining in-flight jobs (up to %ss)", config.limits.drain_timeout)
    return 0


async def _connect(
    config: Config,
    stack: AsyncExitStack,
    stop: asyncio.Event,
    slot: Any,
    wait_for_broker: float | None,
) -> Any:
    """The bridge, up; while the broker is unreachable or refuses TCP, try again with
    back-off (for ever, or ``wait_for_broker`` seconds). None: stopped meanwhile."""
    from bridge.agent.bridge import Bridge
    from probes import REGISTRY

    deadline = None if wait_for_broker is None else time.monotonic() + wait_for_broker
    delay = config.broker.reconnect_min
    attempt = 0
    while True:
        attempt += 1
        bridge = Bridge(config, REGISTRY)
        bridge.warn_insecure = attempt == 1
        try:
            return await stack.enter_async_context(bridge)
        except BrokerRefused as exc:
            if not exc.retry:
                raise
            left = None if deadline is None else deadline - time.monotonic()
            if left is not None and left <= 0:
                raise
            wait = delay if left is None else min(delay, left)
            if slot is not None:
                slot.waiting = f"broker: {exc.kind}: {exc}"
            log.warning(
                "broker %s (attempt %d): %s; next try in %.1f s",
                exc.kind, attempt, exc, wait,
                extra={"error_kind": exc.kind, "attempt": attempt},
            )  # fmt: skip
            stopping = asyncio.ensure_future(stop.wait())
            try:
                await asyncio.wait({stopping}, timeout=wait)
            finally:
                stopping.cancel()
            if stopping.done() and not stopping.cancelled():
                return None
            delay = min(delay * 2, config.broker.reconnect_max)


def _config(path: Path | None) -> Config:
    try:
        return load_config(path)
    except BridgeError as exc:
        raise CommandError(f"configuration error: {exc}") from None


def _config_command(args: argparse.Namespace) -> int:
    if args.config_command == "defaults":
        sys.stdout.write(defaults_toml())
        return 0
    path = args.file
    if path is None and not os.environ.get("MIDBRIDGE_CONFIG"):
        raise CommandError("config check: name the file (or set MIDBRIDGE_CONFIG)")
    try:
        config = load_config(path)
    except ConfigError as exc:
        for problem in exc.problems:
            print(f"{ERROR_PREFIX}{problem}", file=sys.stderr)
        return EXIT_REFUSED
    problems = _probe_setting_problems(config)
    for problem in problems:
        print(f"{ERROR_PREFIX}{problem}", file=sys.stderr)
    if problems:
        return EXIT_REFUSED
    print(f"{path or os.environ['MIDBRIDGE_CONFIG']}: ok")
    return 0


def _probe_setting_problems(config: Config) -> list[str]:
    """Each probe's settings table checked on its own: a problem per probe."""
    from bridge.agent.probe_contexts import settings_tables, validate_settings
    from probes import REGISTRY

    try:
        tables = settings_tables(config, REGISTRY)
    except ConfigError as exc:
        return [str(exc)]
    enabled = config.probes.enabled
    problems: list[str] = []
    for topic, spec in REGISTRY.items():
        if enabled is not None and topic not in enabled:
            continue
        try:
            validate_settings(
                spec.settings, tables.get(topic, {}), topic, per_host_limit=config.limits.per_host
            )
        except ConfigError as exc:
            problems.extend(exc.problems)
    return problems


def main(argv: Sequence[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    log_format = args.log_format
    try:
        if args.command == "run":
            config = _config(args.config)
            _setup_logging(args.log_level or config.log_level, log_format or config.log_format)
            return _run_loop(_serve(config, args.wait_for_broker))
        if args.command == "config":
            return _config_command(args)
        if args.command == "sweep":
            from bridge.sweep_cli import run_sweep

            config = (
                _config(args.config)
                if args.config or os.environ.get("MIDBRIDGE_CONFIG")
                else Config()
            )
            _setup_logging(args.log_level or "warning", log_format)
            broker = config.broker
            if args.broker:
                broker = BrokerConfig(
                    **{**broker.model_dump(), "host": args.broker[0], "port": args.broker[1]}
                )
            agent = args.agent or config.bridge.agent

            async def sweep() -> int:
                result = await run_sweep(
                    broker,
                    agent=agent,
                    targets=args.targets,
                    ports=args.ports,
                    prefix=config.bridge.topic_prefix,
                    timeout=args.timeout,
                    banner=args.banner,
                    show_all=args.all,
                    as_json=args.json,
                    status_wait=args.status_wait,
                )
                return 1 if result.error_string else 0

            return _run_loop(sweep())
        if args.command == "demo":
            from bridge.demo.loop import run_demo

            _setup_logging(args.log_level or "warning", log_format)
            if args.log_level is None:
                # The demo shows each host's outcome itself; a job that fails on purpose
                # (legacy01 refuses the demo password) is not a warning to its user.
                logging.getLogger("midbridge.jobs").setLevel(logging.ERROR)
            return _run_loop(
                run_demo(
                    broker=args.broker,
                    hosts=args.hosts,
                    embedded=args.embedded,
                    keep=args.keep,
                    https=args.https,
                )
            )
        if args.command == "instance":  # the built-in instance (bridge/instance/cli.py)
            from bridge.instance.cli import run_instance_command

            _setup_logging(args.log_level or "info", log_format)
            return run_instance_command(args, run_loop=_run_loop)
        # --- relay (bridge/relay/service.py) ---
        if args.command == "relay":
            from bridge.relay.service import run_command

            _setup_logging(args.log_level or "info", log_format)
            return _run_loop(run_command(args))
        # --- end relay ---
        if args.command == "bench":
            try:
                from bridge.bench import run_bench
            except ModuleNotFoundError as exc:  # the container image leaves the benches out
                raise CommandError(
                    f"the benchmarks are not in this installation ({exc.name} is missing): "
                    "run them from a source checkout installed with '.[bench]'"
                ) from None

            _setup_logging(args.log_level or "warning", log_format)
            return run_bench(
                args.name,
                as_json=args.json,
                broker=args.broker,
                rounds=args.rounds,
                transport=args.transport,
            )
    except CommandError as exc:
        return fail(args.command, exc)
    except ConfigError as exc:  # found while starting (probe settings): as a config file's
        return fail(args.command, f"configuration error: {exc}")
    except BridgeError as exc:
        return fail(args.command, f"{exc.kind}: {exc}")
    except OSError as exc:  # a file or a port of the user's: named, no traceback
        where = f"{exc.filename}: " if exc.filename else ""
        return fail(args.command, f"{where}{exc.strerror or exc}")
    except KeyboardInterrupt:
        return 130
    return 2


if __name__ == "__main__":  # pragma: no cover
    raise SystemExit(main())
