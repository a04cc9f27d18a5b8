"""``midbridge sweep``: publish one Shazzam job, show progress as chunks arrive, print a table."""

from __future__ import annotations

import asyncio
import ipaddress
import sys
import time
import uuid
from typing import Any

import orjson
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

from bridge.cli_errors import EXIT_FAILED, CommandError
from bridge.console import make_console
from bridge.wire.broker import BrokerConfig
from bridge.wire.client import EccClient, JobResult, output_record
from bridge.wire.session import Delivery, Publisher
from bridge.wire.sessions import platform_session
from bridge.wire.topics import Topics
from bridge.wire.transport import MqttSession

STATUS_WAIT = 5.0  # seconds for the bridge's retained status record


async def bridge_status(
    broker: BrokerConfig, *, agent: str, prefix: str, wait: float = STATUS_WAIT
) -> dict[str, Any] | None:
    """The retained status record of the bridge named ``agent`` (None: none within ``wait``).

    A short-lived session of its own (a clean MQTT session that the broker forgets at
    once; an ephemeral NATS consumer) that takes every agent's status and keeps this one's.
    """
    found: dict[str, Any] = {}
    arrived = asyncio.Event()
    mid = f"mid.server.{agent}"

    async def on_message(delivery: Delivery) -> bool:
        if delivery.topic.endswith("/status") or broker.kind == "nats":
            try:
                record = orjson.loads(delivery.payload)
            except orjson.JSONDecodeError:
                return True
            if isinstance(record, dict) and (
                record.get("agent") == mid or record.get("name") == agent
            ):
                found.update(record)
                arrived.set()
        return True

    client_id = f"midbridge-sweep-{uuid.uuid4().hex[:12]}"
    if broker.kind == "nats":
        session: Publisher = platform_session(
            broker, client_id=client_id, prefix=prefix, on_message=on_message, agent=agent,
            status=True, durable=False,
        )  # fmt: skip
    else:
        session = MqttSession(
            broker.model_copy(update={"session_expiry": 0}),
            client_id=client_id,
            subscriptions=[Topics.for_agent(prefix, agent).status],
            on_message=on_message,
            clean_start=True,
        )
    async with session:
        try:
            async with asyncio.timeout(wait):
                await arrived.wait()
        except TimeoutError:
            return None
    return found


async def check_bridge(
    broker: BrokerConfig, *, agent: str, prefix: str, wait: float = STATUS_WAIT
) -> dict[str, Any]:
    """The bridge's status, or a ``CommandError`` saying why no sweep can run there now."""
    status = await bridge_status(broker, agent=agent, prefix=prefix, wait=wait)
    topic = Topics.for_agent(prefix, agent).status
    if status is None:
        raise CommandError(
            f"no bridge with agent name {agent!r} answers: no status record on {topic} within "
            f"{wait:g} s (is `midbridge run` up with bridge.agent = {agent!r}, on this broker "
            f"and topic prefix {prefix!r}?)"
        )
    state = str(status.get("status", "?"))
    if state == "Down":
        raise CommandError(
            f"the bridge {agent!r} is Down (its last status record on {topic}, host "
            f"{status.get('host', '?')}): start it, then sweep"
        )
    capabilities = status.get("capabilities")
    if isinstance(capabilities, list) and "Shazzam" not in capabilities:
        raise CommandError(
            f"the bridge {agent!r} does not run Shazzam (it runs: "
            f"{', '.join(map(str, capabilities)) or 'nothing'})"
        )
    return status


async def run_sweep(
    broker: BrokerConfig,
    *,
    agent: str,
    targets: str,
    ports: str | None,
    prefix: str = "ecc",
    timeout: float = 600.0,
    banner: bool = False,
    console: Console | None = None,
    show_all: bool = False,
    chunk_hosts: int | None = None,
    as_json: bool = False,
    status_wait: float | None = STATUS_WAIT,
) -> JobResult:
    """Check the bridge answers (``status_wait``; None: skip), send the job, show the result."""
    if status_wait is not None:
        status = await check_bridge(broker, agent=agent, prefix=prefix, wait=status_wait)
        if status.get("status") != "Up" and not as_json:
            print(f"midbridge: warning: the bridge {agent!r} is {status.get('status')}: the "
                  "sweep waits until it takes jobs", file=sys.stderr, flush=True)  # fmt: skip
    console = console or make_console(quiet=as_json)
    payload: dict[str, Any] = {"targets": targets}
    if ports:
        payload["ports"] = ports
    if banner:
        payload["banner"] = True
    if chunk_hosts:
        payload["chunk_hosts"] = chunk_hosts
    record = output_record(
        "Shazzam", agent=f"mid.server.{agent}", payload=payload, source=targets, timeout=timeout
    )
    progress = Progress(
        TextColumn("[bold]sweep[/bold] {task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TextColumn("addresses"),
        TimeElapsedColumn(),
        console=console,
        transient=False,
    )
    task_id = progress.add_task(targets, total=None)

    def on_record(rec: dict[str, Any]) -> None:
        body = rec.get("payload") or {}
        prog = body.get("progress") if isinstance(body, dict) else None
        if isinstance(prog, dict):
            progress.update(task_id, completed=prog.get("done", 0), total=prog.get("total"))
        if rec.get("complete"):
            totals = body.get("totals") if isinstance(body, dict) else None
            if isinstance(totals, dict):
                total = totals.get("addresses")
                progress.update(task_id, completed=total, total=total)

    started = time.perf_counter()
    async with EccClient(broker, agent=agent, prefix=prefix, on_record=on_record) as client:
        with progress:
            await client.send([record])
            try:
                [result] = await client.wait([record["sys_id"]], timeout=timeout + 30)
            except TimeoutError:
                raise CommandError(
                    f"no answer from the bridge {agent!r} within {timeout + 30:g} s",
                    status=EXIT_FAILED,
                ) from None
    elapsed = time.perf_counter() - started
    if as_json:
        sys.stdout.write(orjson.dumps(sweep_json(result, targets, agent, elapsed)).decode() + "\n")
        sys.stdout.flush()
        return result
    print_sweep(result, console=console, elapsed=elapsed, show_all=show_all)
    return result


def sweep_json(result: JobResult, targets: str, agent: str, elapsed: float) -> dict[str, Any]:
    """``sweep --json``: one object (hosts sorted by address, every host of the result)."""
    final = result.final.get("payload") if result.complete_at is not None else None
    totals = final.get("totals") if isinstance(final, dict) else None
    return {
        "targets": targets,
        "agent": f"mid.server.{agent}",
        "sys_id": result.sys_id,
        "ok": not result.error_string,
        "error": result.error_string or None,
        "hosts": sorted(sweep_hosts(result), key=_address_key),
        "totals": totals if isinstance(totals, dict) else {},
        "input_records": len(result.chunks),
        "elapsed_s": round(elapsed, 3),
    }


def sweep_hosts(result: JobResult) -> list[dict[str, Any]]:
    hosts: list[dict[str, Any]] = []
    for rec in result.records:
        body = rec.get("payload") or {}
        if isinstance(body, dict):
            hosts.extend(h for h in body.get("hosts", []) if isinstance(h, dict))
    return hosts


def _address_key(host: dict[str, Any]) -> tuple[int, int]:
    try:
        address = ipaddress.ip_address(str(host.get("ip")))
    except ValueError:
        return (9, 0)
    return (address.version, int(address))


def print_sweep(result: JobResult, *, console: Console, elapsed: float, show_all: bool) -> None:
    if result.error_string:
        console.print(f"[red]sweep failed[/red]: {result.error_string}")
        return
    hosts = sweep_hosts(result)
    table = Table(title="Shazzam results", show_lines=False)
    table.add_column("address")
    table.add_column("alive")
    table.add_column("open ports")
    table.add_column("closed", justify="right")
    table.add_column("filtered", justify="right")
    shown = 0
    for host in sorted(hosts, key=_address_key):
        open_ports = host.get("open") or []
        if not open_ports and not show_all:
            continue
        shown += 1
        table.add_row(
            str(host.get("ip")),
            "yes" if host.get("alive") else "no",
            ", ".join(
                f"{p.get('port')}/{p.get('service') or '?'}"
                + (f" ({str(p['banner'])[:40]})" if p.get("banner") else "")
                for p in open_ports
            )
            or "-",
            str(len(host.get("closed") or [])),
            str(len(host.get("filtered") or [])),
        )
    console.print(table if shown else "no host with an open port")
    totals = (result.final.get("payload") or {}).get("totals") or {}
    console.print(
        f"{totals.get('addresses', len(hosts))} addresses, {totals.get('alive', '?')} alive, "
        f"{totals.get('open_ports', '?')} open ports, {totals.get('probes', '?')} probes in "
        f"{totals.get('duration_s', elapsed):.3g} s "
        f"({totals.get('probes_per_s', 0):,.0f} probes/s); "
        f"{len(result.chunks)} input records; round trip {elapsed:.2f} s"
    )
