"""``midbridge sweep``: publish one Shazzam job, show progress as chunks arrive, print a table."""

from __future__ import annotations

import ipaddress
import time
from typing import Any

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

from bridge.wire.broker import BrokerConfig
from bridge.wire.client import EccClient, JobResult, output_record


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
) -> JobResult:
    console = console or Console()
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
            [result] = await client.wait([record["sys_id"]], timeout=timeout + 30)
    elapsed = time.perf_counter() - started
    print_sweep(result, console=console, elapsed=elapsed, show_all=show_all)
    return result


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
