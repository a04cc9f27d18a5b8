"""``midbridge instance discovery run SCHEDULE --wait``: follow the run to its end.

Polls the run's ``discovery_status`` record through the Table API (every ``interval``
seconds): a rich progress bar on a terminal, else one plain line whenever the state
changes or, at most every :data:`PLAIN_EVERY` seconds, when the progress moved. At the
end, the run's CIs (``cmdb_ci`` with ``discovery_status`` = the run), one a line.
Exit status: 0 when the run ends ``Completed``, 1 when it ends ``Error`` or ``Cancelled``.
"""

from __future__ import annotations

import asyncio
import sys
import time
from typing import Any, TextIO
from urllib.parse import quote

import aiohttp
from rich.progress import BarColumn, Progress, TaskProgressColumn, TextColumn

from bridge.cli_errors import CommandError
from bridge.console import make_console

FINAL = ("Completed", "Error", "Cancelled")
PLAIN_EVERY = 5.0  # seconds between plain progress lines while only numbers move
STATUS_FIELDS = (
    "sys_id,name,state,progress,addresses,scanned,alive,classified,classify_total,"
    "cis_created,cis_updated,errors,duration,log"
)
CI_FIELDS = "sys_class_name,name,ip_address,host_name"
CI_ORDER = "ORDERBYsys_class_name^ORDERBYip_address"
MAX_CIS = 1000


def _number(status: dict[str, Any], name: str) -> int:
    try:
        return int(float(status.get(name) or 0))
    except (TypeError, ValueError):
        return 0


def summary(status: dict[str, Any]) -> str:
    """One line of a run's progress."""
    cis = _number(status, "cis_created") + _number(status, "cis_updated")
    return (
        f"{status.get('state') or '?'} {_number(status, 'progress')}%: scanned "
        f"{_number(status, 'scanned')}/{_number(status, 'addresses')}, alive "
        f"{_number(status, 'alive')}, classified {_number(status, 'classified')}/"
        f"{_number(status, 'classify_total')}, CIs {cis}"
    )


async def _get(http: aiohttp.ClientSession, url: str, params: dict[str, str]) -> Any:
    async with http.get(url, params=params) as resp:
        body = await resp.json(content_type=None)
        if resp.status != 200:
            error = body.get("error", {}) if isinstance(body, dict) else {}
            message = f"{error.get('message', 'error')} {error.get('detail', '')}".strip()
            raise CommandError(f"{url}: HTTP {resp.status}: {message}")
        return body.get("result") if isinstance(body, dict) else None


async def follow_run(
    http: aiohttp.ClientSession,
    base: str,
    status_id: str,
    *,
    timeout: float,
    interval: float = 1.0,
    out: TextIO | None = None,
    tty: bool | None = None,
) -> int:
    """Follow run ``status_id`` of the instance at ``base`` until it ends; print its CIs."""
    out = out if out is not None else sys.stdout
    tty = out.isatty() if tty is None else tty
    url = f"{base}/api/now/table/discovery_status/{quote(status_id, safe='')}"
    params = {"sysparm_fields": STATUS_FIELDS}
    deadline = time.monotonic() + timeout
    status: dict[str, Any] = await _get(http, url, params) or {}
    console = make_console(out, force_terminal=tty, highlight=False)
    if tty:
        bar = Progress(
            TextColumn("[bold]discovery[/bold] {task.fields[state]:<11}"),
            BarColumn(bar_width=24),
            TaskProgressColumn(),
            TextColumn("{task.fields[line]}"),
            console=console,
        )
        task = bar.add_task("run", total=100.0, state="", line="")
        with bar:
            while True:
                done = status.get("state") in FINAL
                bar.update(
                    task,
                    completed=100.0 if done else float(_number(status, "progress")),
                    state=str(status.get("state") or ""),
                    line=summary(status).split(": ", 1)[-1],
                )
                if done:
                    break
                status = await _next(http, url, params, deadline, interval, timeout)
    else:
        last_line, last_state, last_at = "", "", 0.0
        while True:
            line = summary(status)
            state = str(status.get("state") or "")
            now = time.monotonic()
            if state != last_state or (line != last_line and now - last_at >= PLAIN_EVERY):
                print(f"discovery {line}", file=out, flush=True)
                last_line, last_state, last_at = line, state, now
            if state in FINAL:
                if line != last_line:
                    print(f"discovery {line}", file=out, flush=True)
                break
            status = await _next(http, url, params, deadline, interval, timeout)
    state = str(status.get("state") or "")
    cis = (
        await _get(
            http,
            f"{base}/api/now/table/cmdb_ci",
            {
                "sysparm_query": f"discovery_status={status_id}^{CI_ORDER}",
                "sysparm_fields": CI_FIELDS,
                "sysparm_limit": str(MAX_CIS),
            },
        )
        or []
    )
    duration = status.get("duration")
    took = f" in {float(duration):.1f} s" if duration not in (None, "") else ""
    print(f"run {status_id} {state}{took}: {len(cis)} {'CI' if len(cis) == 1 else 'CIs'}",
          file=out, flush=True)  # fmt: skip
    for ci in cis:
        print(
            f"  {str(ci.get('sys_class_name') or '').removeprefix('cmdb_ci_'):<14} "
            f"{ci.get('ip_address') or '-':<16} {ci.get('name') or ci.get('host_name') or ''}",
            file=out,
            flush=True,
        )
    if state != "Completed":
        for line in str(status.get("log") or "").splitlines()[-8:]:
            print(f"  log: {line}", file=out, flush=True)
    return 0 if state == "Completed" else 1


async def _next(
    http: aiohttp.ClientSession,
    url: str,
    params: dict[str, str],
    deadline: float,
    interval: float,
    timeout: float,
) -> dict[str, Any]:
    if time.monotonic() >= deadline:
        raise CommandError(
            f"--timeout: the run is still going after {timeout:g} s (it goes on; follow it on "
            "the dashboard's discovery page)"
        )
    await asyncio.sleep(interval)
    found = await _get(http, url, params)
    return found if isinstance(found, dict) else {}


__all__ = ["follow_run", "summary"]
