"""``midbridge demo``: the main job end to end on loopback, nothing to set up beforehand.

A broker (the one given, else an embedded one), the real bridge, a few loopback
listeners as targets, then a Shazzam sweep through the broker with a progress bar and a
result table.
"""

from __future__ import annotations

import asyncio
import tempfile
import uuid
from collections.abc import AsyncIterator
from contextlib import AsyncExitStack, asynccontextmanager
from pathlib import Path

from rich.console import Console

from bridge.config import BridgeSection, BrokerConfig, Config, LimitsConfig
from bridge.core import Bridge
from bridge.embedded_broker import embedded_broker
from bridge.sweep_cli import run_sweep

DEMO_PORTS = "22,80,443,2222,5985,8080,8443"

# (address, port, banner): what the demo network "runs"
DEMO_TARGETS: tuple[tuple[str, int, bytes], ...] = (
    ("127.0.0.10", 2222, b"SSH-2.0-OpenSSH_9.2p1 midbridge-demo\r\n"),
    ("127.0.0.11", 8080, b""),
    ("127.0.0.11", 8443, b""),
    ("127.0.0.12", 5985, b""),
    ("127.0.0.20", 2222, b"SSH-2.0-dropbear_2022.83\r\n"),
    ("127.0.0.20", 8080, b""),
)


@asynccontextmanager
async def demo_targets() -> AsyncIterator[list[tuple[str, int]]]:
    """Listeners on loopback addresses; an SSH-like banner where one is given."""
    servers: list[asyncio.Server] = []
    opened: list[tuple[str, int]] = []

    def handler_for(banner: bytes) -> object:
        async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            try:
                if banner:
                    writer.write(banner)
                    await writer.drain()
                await asyncio.wait_for(reader.read(1024), timeout=2.0)
            except (TimeoutError, ConnectionError):
                pass
            finally:
                writer.close()

        return handle

    try:
        for host, port, banner in DEMO_TARGETS:
            try:
                server = await asyncio.start_server(handler_for(banner), host, port)  # type: ignore[arg-type]
            except OSError:
                continue  # taken on this machine: the sweep will still show what answers
            servers.append(server)
            opened.append((host, port))
        yield opened
    finally:
        for server in servers:
            server.close()
        for server in servers:
            await server.wait_closed()


async def run_demo(
    *, broker: tuple[str, int] | None = None, hosts: int = 254, embedded: str = "auto"
) -> int:
    console = Console()
    hosts = max(1, min(hosts, 254))
    async with AsyncExitStack() as stack:
        address = await stack.enter_async_context(embedded_broker(preferred=broker, force=embedded))  # type: ignore[arg-type]
        console.print(
            f"broker: {address.kind} on {address.host}:{address.port} (MQTT {address.protocol})"
        )
        broker_cfg = BrokerConfig(host=address.host, port=address.port, protocol=address.protocol)
        state = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="midbridge-demo-")))
        agent = f"demo-{uuid.uuid4().hex[:8]}"
        config = Config(
            broker=broker_cfg,
            bridge=BridgeSection(agent=agent, state_dir=state),
            limits=LimitsConfig(drain_timeout=2.0),
        )
        opened = await stack.enter_async_context(demo_targets())
        console.print(
            "targets: "
            + ", ".join(f"{h}:{p}" for h, p in opened)
            + " (every other 127.0.0.x answers with refusals)"
        )
        await stack.enter_async_context(Bridge(config))
        console.print(f"bridge: mid.server.{agent} up; sending a Shazzam job through the broker")
        targets = f"127.0.0.1-127.0.0.{hosts}"
        result = await run_sweep(
            broker_cfg,
            agent=agent,
            targets=targets,
            ports=DEMO_PORTS,
            banner=True,
            console=console,
            timeout=120.0,
            chunk_hosts=16,
        )
        return 1 if result.error_string else 0
    return 1
