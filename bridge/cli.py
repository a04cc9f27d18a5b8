"""The ``midbridge`` command: run, sweep, demo, bench, instance, relay."""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
import sys
from collections.abc import Coroutine, Sequence
from contextlib import AsyncExitStack
from pathlib import Path
from typing import Any

from bridge import __version__
from bridge.agent.config import Config, load_config
from bridge.cli_errors import CommandError, fail
from bridge.signals import StopSignals
from bridge.wire.address import AddressError, parse_host_port
from bridge.wire.broker import BrokerConfig
from bridge.wire.errors import BridgeError, ConfigError

log = logging.getLogger("midbridge")


def _broker_arg(text: str) -> tuple[str, int]:
    try:
        return parse_host_port(text, option="--broker")
    except AddressError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="midbridge", description=__doc__)
    parser.add_argument("--version", action="version", version=f"midbridge {__version__}")
    parser.add_argument("--log-level", default=None, choices=["debug", "info", "warning", "error"])
    sub = parser.add_subparsers(dest="command", required=True)

    run = sub.add_parser("run", help="run the bridge (config file + MIDBRIDGE_* env overrides)")
    run.add_argument("--config", "-c", type=Path, default=None, help="TOML config file")

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
    return parser


def _setup_logging(level: str) -> None:
    logging.basicConfig(
        level=getattr(logging, level.upper()),
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        stream=sys.stderr,
    )
    quiet = logging.ERROR if level != "debug" else logging.DEBUG
    logging.getLogger("midbridge.gmqtt").setLevel(quiet)
    logging.getLogger("gmqtt").setLevel(quiet)
    # asyncssh logs every connection and channel at INFO.
    logging.getLogger("asyncssh").setLevel(logging.WARNING if level != "debug" else logging.DEBUG)


def _run_loop(coro: Coroutine[Any, Any, int]) -> int:
    try:
        import uvloop

        return uvloop.run(coro)
    except ImportError:  # pragma: no cover - platforms without uvloop
        return asyncio.run(coro)


async def _serve(config: Config) -> int:
    from bridge.agent.bridge import Bridge
    from bridge.agent.runtime import tune_gc
    from probes import REGISTRY

    tune_gc()

    async with AsyncExitStack() as stack:
        stop = stack.enter_context(StopSignals())
        bridge = await stack.enter_async_context(Bridge(config, REGISTRY))
        if config.metrics_port is not None:
            from bridge.agent.metrics import serve_metrics

            port = await stack.enter_async_context(
                serve_metrics(bridge, config.metrics_host, config.metrics_port)
            )
            log.info("metrics on http://%s:%s/metrics", config.metrics_host, port)
        waiter = asyncio.ensure_future(stop.wait())
        failure = asyncio.ensure_future(bridge.serve_forever())
        await asyncio.wait({waiter, failure}, return_when=asyncio.FIRST_COMPLETED)
        waiter.cancel()
        failure.cancel()
        log.info("stopping: draining in-flight jobs (up to %ss)", config.limits.drain_timeout)
    return 0


def _config(path: Path | None) -> Config:
    try:
        return load_config(path)
    except BridgeError as exc:
        raise CommandError(f"configuration error: {exc}") from None


def main(argv: Sequence[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    try:
        if args.command == "run":
            config = _config(args.config)
            _setup_logging(args.log_level or config.log_level)
            return _run_loop(_serve(config))
        if args.command == "sweep":
            from bridge.sweep_cli import run_sweep

            config = (
                _config(args.config)
                if args.config or os.environ.get("MIDBRIDGE_CONFIG")
                else Config()
            )
            _setup_logging(args.log_level or "warning")
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
                )
                return 1 if result.error_string else 0

            return _run_loop(sweep())
        if args.command == "demo":
            from bridge.demo.loop import run_demo

            _setup_logging(args.log_level or "warning")
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

            _setup_logging(args.log_level or "info")
            return run_instance_command(args, run_loop=_run_loop)
        # --- relay (bridge/relay/service.py) ---
        if args.command == "relay":
            from bridge.relay.service import run_command

            _setup_logging(args.log_level or "info")
            return _run_loop(run_command(args))
        # --- end relay ---
        if args.command == "bench":
            from bridge.bench import run_bench

            _setup_logging(args.log_level or "warning")
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
    except KeyboardInterrupt:
        return 130
    return 2


if __name__ == "__main__":  # pragma: no cover
    raise SystemExit(main())
