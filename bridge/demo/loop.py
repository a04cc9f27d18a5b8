"""``midbridge demo``: the whole loop on loopback, nothing to set up beforehand.

1. A broker: the one given (``--broker HOST:PORT``), else a private ``mosquitto`` when
   the binary is installed, else the embedded amqtt broker (``bridge.demo.broker``).
2. The built-in instance on a free loopback port with a temporary database (the admin
   password is generated, or ``$MIDBRIDGE_ADMIN_PASSWORD``), its broker connector and the
   discovery engine; the web dashboard is part of it.
3. The sample targets of ``bridge.demo.targets`` on 127.0.0.11-127.0.0.33: Linux hosts
   over SSH, network gear over SNMP, web servers over HTTP and HTTPS.
4. The real bridge (temporary state, ``security.require_validation`` and
   ``require_signatures`` on, the instance's signing key).
5. Then, as an administrator would, through the instance's REST API (:class:`Admin`):
   the ``mid.user`` user with role ``mid_server``; wait for the bridge's agent record;
   ``validate`` it (the bridge confirms the fingerprint); the demo's SSH password and SNMP
   community as ``discovery_credentials`` (sealed at rest, and sealed per job to the
   validated bridge); a discovery schedule over 127.0.0.1-127.0.0.60 with the targets'
   ports; a run, followed with a progress bar; the CIs it found, as a table.
6. The dashboard's address and the admin credentials; ``--keep`` stays up until Ctrl-C.

``--https``: the instance serves HTTPS with a self-signed certificate made for this run
(``bridge.instance.tls``); the demo's own client trusts it, and its SHA-256 fingerprint is
printed for the browser.

Step 5 is :func:`discover`, which only needs the instance's URL: ``python -m bridge.demo
discover --url http://instance:8080 ...`` runs it against an instance elsewhere (the
compose setup, ``compose/docker-compose.yml``); ``--ca-file`` trusts an https instance's
certificate.

The connector and the bridge work on the amqtt broker (MQTT 3.1.1) as on Mosquitto.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import contextlib
import dataclasses
import ipaddress
import logging
import os
import secrets
import ssl
import sys
import tempfile
import time
from collections.abc import Awaitable, Callable, Iterator, Mapping, Sequence
from contextlib import AsyncExitStack
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiohttp
import orjson
from rich import box
from rich.console import Console
from rich.markup import escape
from rich.progress import BarColumn, Progress, TaskProgressColumn, TextColumn
from rich.table import Table

from bridge.agent.config import BridgeSection, Config, LimitsConfig, SecurityConfig
from bridge.cli_errors import EXIT_FAILED, CommandError, fail
from bridge.console import make_console
from bridge.demo.broker import BrokerEndpoint, EmbeddedBrokerError, embedded_broker
from bridge.demo.targets import (
    DEFAULT_SSH_USER,
    SNMP_COMMUNITY_ENV,
    SSH_PASSWORD_ENV,
    Ports,
    RunningTargets,
    TargetSettings,
    demo_targets,
    describe,
)
from bridge.instance import tls
from bridge.signals import StopSignals
from bridge.wire.broker import BrokerConfig
from bridge.wire.errors import INSECURE_DEFAULT

ADMIN_PASSWORD_ENV = "MIDBRIDGE_ADMIN_PASSWORD"
DEMO_AGENT = "demo"
MID_USER = "mid.user"
SCHEDULE_NAME = "Demo network"
SSH_CREDENTIAL = "demo-ssh"
SNMP_CREDENTIAL = "demo-snmp"
DEFAULT_HOSTS = 60  # 127.0.0.1-127.0.0.60: every target and some empty addresses
FINAL_STATES = frozenset({"Completed", "Error", "Cancelled"})
CLASS_LABELS = {
    "cmdb_ci_linux_server": "Linux server",
    "cmdb_ci_netgear": "Network gear",
    "cmdb_ci_web_server": "Web server",
    "cmdb_ci_ip_address": "IP address",
}


class DemoError(CommandError):
    """A step of the demo failed: printed as one line, exit status 1."""

    def __init__(self, message: str) -> None:
        super().__init__(message, status=EXIT_FAILED)


# --- the instance's API, as an administrator ----------------------------------------------


class Admin:
    """An administrator's client of the instance's REST API (Basic authentication)."""

    def __init__(self, http: aiohttp.ClientSession, url: str, user: str, password: str) -> None:
        self.http = http
        self.url = url.rstrip("/")
        token = base64.b64encode(f"{user}:{password}".encode()).decode()
        self._authorization = f"Basic {token}"

    async def call(
        self,
        method: str,
        path: str,
        body: Mapping[str, Any] | None = None,
        *,
        params: Mapping[str, str] | None = None,
        allow: Sequence[int] = (),
    ) -> tuple[int, Any]:
        """(status, the answer's ``result``); ``DemoError`` for an error not in ``allow``."""
        headers = {"Accept": "application/json", "Authorization": self._authorization}
        data = None
        if body is not None:
            headers["Content-Type"] = "application/json"
            data = orjson.dumps(dict(body))
        try:
            async with self.http.request(
                method, self.url + path, data=data, params=params, headers=headers
            ) as response:
                raw = await response.read()
                status = response.status
        except aiohttp.ClientError as exc:
            raise DemoError(
                f"{method} {path}: cannot reach the instance at {self.url}: {exc}"
            ) from None
        try:
            answer = orjson.loads(raw) if raw else None
        except orjson.JSONDecodeError:
            answer = None
        if status >= 300 and status not in allow:
            error = answer.get("error") if isinstance(answer, dict) else None
            detail = ""
            if isinstance(error, dict):
                detail = f": {error.get('message', '')} ({error.get('detail', '')})"
            raise DemoError(f"{method} {path}: HTTP {status}{detail}")
        result = answer.get("result") if isinstance(answer, dict) else None
        return status, result

    async def query(self, table: str, query: str, *, limit: int = 1000) -> list[dict[str, Any]]:
        _, rows = await self.call(
            "GET",
            f"/api/now/table/{table}",
            params={"sysparm_query": query, "sysparm_limit": str(limit)},
        )
        return rows if isinstance(rows, list) else []

    async def get(self, table: str, sys_id: str) -> dict[str, Any]:
        _, row = await self.call("GET", f"/api/now/table/{table}/{sys_id}")
        if not isinstance(row, dict):
            raise DemoError(f"{table}/{sys_id}: no record")
        return row

    async def insert(self, table: str, fields: Mapping[str, Any], **params: str) -> dict[str, Any]:
        _, row = await self.call("POST", f"/api/now/table/{table}", fields, params=params or None)
        if not isinstance(row, dict):
            raise DemoError(f"POST {table}: no record in the answer")
        return row

    async def upsert(self, table: str, name: str, fields: Mapping[str, Any]) -> dict[str, Any]:
        """Insert the record named ``name``, or update the one there (a rerun)."""
        rows = await self.query(table, f"name={name}", limit=1)
        if rows:
            _, row = await self.call("PATCH", f"/api/now/table/{table}/{rows[0]['sys_id']}", fields)
            if isinstance(row, dict):
                return row
        return await self.insert(table, {"name": name, **fields})

    async def wait_until(
        self,
        what: str,
        probe: Callable[[], Awaitable[Any]],
        timeout: float,
        interval: float = 0.1,
    ) -> Any:
        """Call ``probe`` until it returns something true; ``DemoError`` naming ``what``."""
        deadline = time.monotonic() + timeout
        while True:
            found = await probe()
            if found:
                return found
            if time.monotonic() > deadline:
                raise DemoError(f"{what}: not within {timeout:g} s")
            await asyncio.sleep(interval)


# --- the discovery loop -------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class DiscoveryPlan:
    """What the demo discovers, and with which credentials."""

    ranges: str
    ports: Ports
    ssh_user: str
    ssh_password: str
    snmp_community: str
    parallel_batches: int = 4
    batch_size: int = 16
    timeout: float = 60.0  # seconds the run may take


def schedule_fields(agent: str, plan: DiscoveryPlan) -> dict[str, Any]:
    """The ``discovery_schedule`` record: ranges, ports and which port calls which
    classifier (``bridge.instance.discovery``)."""
    ports = plan.ports
    return {
        "ranges": plan.ranges,
        "agent": agent,
        "ports": f"{ports.ssh},{ports.http},{ports.https}",
        "ssh_ports": str(ports.ssh),
        "http_ports": str(ports.http),
        "https_ports": str(ports.https),
        "snmp": True,
        "snmp_port": ports.snmp,
        "credentials": f"{SSH_CREDENTIAL},{SNMP_CREDENTIAL}",
        "batch_size": plan.batch_size,
        "parallel_batches": plan.parallel_batches,
        "chunk_hosts": 8,
        "active": True,
    }


async def ensure_mid_user(admin: Admin, password: str, agent: str) -> str:
    """``mid.user`` with role ``mid_server`` (web service only), acting for ``agent`` only
    (``sys_user.mid_agents``); 'created', 'bound' (it existed: now acts for ``agent`` too)
    or 'exists'."""
    found = await admin.query("sys_user", f"user_name={MID_USER}", limit=1)
    if found:
        agents = {a for a in str(found[0].get("mid_agents") or "").split(",") if a}
        if agent in agents:
            return "exists"
        await admin.call(
            "PATCH",
            f"/api/now/table/sys_user/{found[0]['sys_id']}",
            {"mid_agents": ",".join(sorted(agents | {agent}))},
        )
        return "bound"
    user = await admin.insert(
        "sys_user",
        {
            "user_name": MID_USER,
            "first_name": "MID",
            "last_name": "Server",
            "user_password": password,
            "web_service_access_only": True,
            "mid_agents": agent,
        },
    )
    await admin.insert(
        "sys_user_has_role",
        {"user": user["sys_id"], "role": "mid_server"},
        sysparm_input_display_value="true",
    )
    return "created"


async def validate_agent(
    admin: Admin, console: Console, agent: str, timeout: float = 30.0
) -> dict[str, Any]:
    """Wait for the agent's record (Up, with its key), validate it, wait for the bridge's
    confirmation (``validated`` true)."""

    async def agent_row(check: Callable[[dict[str, Any]], bool]) -> dict[str, Any] | None:
        rows = await admin.query("ecc_agent", f"name={agent}", limit=1)
        return rows[0] if rows and check(rows[0]) else None

    row: dict[str, Any] = await admin.wait_until(
        f"the agent {agent} reporting Up with its key",
        lambda: agent_row(lambda r: r.get("status") == "Up" and bool(r.get("fingerprint"))),
        timeout,
    )
    fingerprint = str(row.get("fingerprint"))
    if row.get("validated") == "true":
        console.print(f"agent: mid.server.{agent} is Up and already validated")
        return row
    console.print(
        f"agent: mid.server.{agent} is Up (key fingerprint {fingerprint[:16]}…), not validated;"
        " validating it (admin action)"
    )
    await admin.call("POST", f"/api/midbridge/agents/{agent}/validate", {})
    row = await admin.wait_until(
        f"the agent {agent} confirming its validation",
        lambda: agent_row(lambda r: r.get("validated") == "true"),
        timeout,
    )
    console.print(f"agent: validated: the bridge confirmed fingerprint {fingerprint[:16]}…")
    return row


def _progress_fields(status: Mapping[str, Any]) -> dict[str, Any]:
    def number(name: str) -> int:
        try:
            return int(float(status.get(name) or 0))
        except (TypeError, ValueError):
            return 0

    return {
        "state": str(status.get("state") or ""),
        "scanned": number("scanned"),
        "addresses": number("addresses"),
        "alive": number("alive"),
        "classified": number("classified"),
        "classify_total": number("classify_total"),
        "cis": number("cis_created") + number("cis_updated"),
    }


async def follow_run(
    admin: Admin, console: Console, status_id: str, timeout: float
) -> dict[str, Any]:
    """A progress bar following ``discovery_status`` until the run ends (or the timeout)."""
    progress = Progress(
        TextColumn("[bold]discovery[/bold] {task.fields[state]:<11}"),
        BarColumn(bar_width=20),
        TaskProgressColumn(),
        TextColumn(
            "scanned {task.fields[scanned]}/{task.fields[addresses]}, "
            "alive {task.fields[alive]}, classified "
            "{task.fields[classified]}/{task.fields[classify_total]}, CIs {task.fields[cis]}"
        ),
        console=console,
    )
    status = await admin.get("discovery_status", status_id)
    task = progress.add_task("run", total=100.0, completed=0, **_progress_fields(status))
    deadline = time.monotonic() + timeout
    with progress:
        while True:
            fields = _progress_fields(status)
            done = fields["state"] in FINAL_STATES
            completed = 100.0 if done else float(status.get("progress") or 0.0)
            progress.update(task, completed=completed, **fields)
            if done:
                break
            if time.monotonic() > deadline:
                with contextlib.suppress(DemoError):
                    await admin.call("POST", f"/api/midbridge/discovery/{status_id}/cancel", {})
                raise DemoError(f"the discovery run did not finish within {timeout:g} s")
            await asyncio.sleep(0.15)
            status = await admin.get("discovery_status", status_id)
    return status


def class_label(sys_class_name: Any) -> str:
    """``cmdb_ci_linux_server`` → ``linux_server`` (the table's class column)."""
    return str(sys_class_name or "").removeprefix("cmdb_ci_")


def ci_details(ci: Mapping[str, Any]) -> str:
    """What discovery saw of a CI and what identifies it, in one line."""
    cls = ci.get("sys_class_name")
    parts: list[str]
    if cls == "cmdb_ci_linux_server":
        parts = [str(ci.get("os") or ""), f"kernel {ci.get('kernel')}" if ci.get("kernel") else ""]
    elif cls == "cmdb_ci_netgear":
        parts = [str(ci.get("sys_descr") or "")]
    elif cls == "cmdb_ci_web_server":
        title = ci.get("http_title")
        parts = [f"“{title}”" if title else "", str(ci.get("http_server") or "")]
        if ci.get("tls_subject"):
            parts.append(f"TLS {ci.get('tls_subject')}")
    else:
        parts = ["no classifier could identify it"]
    if ci.get("serial_number"):
        parts.append(f"serial {ci['serial_number']}")
    macs = [m for m in str(ci.get("mac_address") or "").split(",") if m]
    if macs:
        parts.append(f"MAC {macs[0]}" + (f" +{len(macs) - 1}" if len(macs) > 1 else ""))
    if ci.get("ports"):
        parts.append(f"ports {ci.get('ports')}")
    return ", ".join(p for p in parts if p)


def _ip_key(ci: Mapping[str, Any]) -> tuple[int, str]:
    try:
        return int(ipaddress.ip_address(str(ci.get("ip_address")))), str(ci.get("name"))
    except ValueError:
        return 0, str(ci.get("name"))


def _listing(title: str, columns: Sequence[str]) -> Table:
    """A plain table: every column on one line but the last, which folds."""
    table = Table(title=title, title_justify="left", box=box.SIMPLE_HEAD, pad_edge=False)
    for column in columns[:-1]:
        table.add_column(column, no_wrap=True)
    table.add_column(columns[-1], overflow="fold")
    return table


def ci_table(cis: Sequence[Mapping[str, Any]]) -> Table:
    table = _listing(
        f"CIs found: {len(cis)} (class = cmdb_ci_<class>)", ("class", "name", "IP", "details")
    )
    for ci in sorted(cis, key=_ip_key):
        table.add_row(
            escape(class_label(ci.get("sys_class_name"))),
            escape(str(ci.get("name") or "")),
            escape(str(ci.get("ip_address") or "")),
            escape(ci_details(ci)),
        )
    return table


async def discover(
    admin: Admin,
    console: Console,
    *,
    agent: str,
    plan: DiscoveryPlan,
    mid_password: str | None = None,
    agent_timeout: float = 30.0,
) -> int:
    """The demo's loop on an instance: mid.user, validation, credentials, a schedule, a
    run with a progress bar, the CIs. 0 when the run completed and found CIs."""
    made = await ensure_mid_user(admin, mid_password or secrets.token_urlsafe(18), agent)
    console.print(
        f"instance: user {MID_USER} (role mid_server, web service only, agent {agent}) {made}"
    )
    await validate_agent(admin, console, agent, agent_timeout)
    await admin.upsert(
        "discovery_credentials",
        SSH_CREDENTIAL,
        {
            "type": "ssh_password",
            "order": 10,
            "active": True,
            "secret": orjson.dumps({"user": plan.ssh_user, "password": plan.ssh_password}).decode(),
        },
    )
    await admin.upsert(
        "discovery_credentials",
        SNMP_CREDENTIAL,
        {
            "type": "snmp_community",
            "order": 10,
            "active": True,
            "secret": orjson.dumps({"community": plan.snmp_community}).decode(),
        },
    )
    console.print(
        f"credentials: {SSH_CREDENTIAL} (ssh_password, user {plan.ssh_user}) and "
        f"{SNMP_CREDENTIAL} (snmp_community): sealed at rest, sealed per job to the bridge's key"
    )
    schedule = await admin.upsert("discovery_schedule", SCHEDULE_NAME, schedule_fields(agent, plan))
    ports = plan.ports
    console.print(
        f"schedule: {SCHEDULE_NAME!r} over {plan.ranges}: TCP {ports.ssh} → SSH, "
        f"{ports.http} → HTTP, {ports.https} → HTTPS; UDP {ports.snmp} → SNMP"
    )
    status, run = await admin.call(
        "POST", f"/api/midbridge/discovery/{schedule['sys_id']}/run", {}, allow=(404,)
    )
    if status == 404 or not isinstance(run, dict):
        raise DemoError(
            "the instance has no discovery route (POST /api/midbridge/discovery/<schedule>/run):"
            " its discovery engine is not installed"
        )
    final = await follow_run(admin, console, str(run["sys_id"]), plan.timeout)
    cis = await admin.query("cmdb_ci", f"discovery_status={run['sys_id']}")
    fields = _progress_fields(final)
    duration = final.get("duration") or ""
    console.print(
        f"run: {fields['state']} in {duration} s: {fields['scanned']} addresses scanned, "
        f"{fields['classified']} classified, {len(cis)} CIs"
    )
    if fields["state"] != "Completed" or not cis:
        for line in str(final.get("log") or "").splitlines()[-12:]:
            console.print(f"  [dim]{escape(line)}[/dim]")
    if cis:
        console.print(ci_table(cis))
    return 0 if fields["state"] == "Completed" and cis else 1


# --- midbridge demo ----------------------------------------------------------------------


def _targets_table(running: RunningTargets) -> Table:
    table = _listing(
        "sample targets (every other address of the range: nothing)",
        ("target", "address", "serves", "what it is"),
    )
    services: dict[str, list[str]] = {}
    order: list[Any] = []
    for item in running.listening:
        if item.target.name not in services:
            order.append(item)
        services.setdefault(item.target.name, []).append(f"{item.service} {item.port}")
    for item in sorted(order, key=lambda i: ipaddress.ip_address(i.address)):
        table.add_row(
            item.target.name,
            item.address,
            ", ".join(services[item.target.name]),
            escape(describe(item.target)),
        )
    return table


async def _wait_for_signal() -> None:
    with StopSignals() as stop:
        await stop.wait()


class _DropInsecureDefault(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        return not getattr(record, INSECURE_DEFAULT, False)


@contextlib.contextmanager
def _without_insecure_default_warnings() -> Iterator[None]:
    """Leave out the warnings about an anonymous broker while the demo runs its own."""
    handlers = logging.getLogger().handlers
    drop = _DropInsecureDefault()
    for handler in handlers:
        handler.addFilter(drop)
    try:
        yield
    finally:
        for handler in handlers:
            handler.removeFilter(drop)


async def run_demo(
    *,
    broker: tuple[str, int] | None = None,
    hosts: int = DEFAULT_HOSTS,
    embedded: str = "auto",
    keep: bool = False,
    console: Console | None = None,
    https: bool = False,
) -> int:
    console = console or make_console()
    hosts = max(1, min(hosts, 254))
    started = time.perf_counter()
    try:
        async with AsyncExitStack() as stack:
            address: BrokerEndpoint = await stack.enter_async_context(
                embedded_broker(preferred=broker, force=embedded)  # type: ignore[arg-type]
            )
            console.print(
                f"broker: {address.kind} on {address.host}:{address.port} (MQTT {address.protocol})"
                + ("" if broker else ", private to this run (anonymous, on loopback)")
            )
            if broker is None:  # our own broker: its anonymous login is no news to anyone
                stack.enter_context(_without_insecure_default_warnings())
            code = await _demo(stack, console, address, hosts, keep, started, https)
    except DemoError as exc:
        return fail("demo", exc)
    except EmbeddedBrokerError as exc:
        return fail("demo", exc, status=EXIT_FAILED)
    return code


async def _demo(
    stack: AsyncExitStack,
    console: Console,
    address: BrokerEndpoint,
    hosts: int,
    keep: bool,
    started: float,
    https: bool = False,
) -> int:
    from bridge.agent.bridge import Bridge
    from bridge.instance import discovery
    from bridge.instance.connector import Connector, ConnectorSettings, install, keys_for
    from bridge.instance.server import Instance, InstanceConfig
    from probes import REGISTRY

    state = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="midbridge-demo-")))
    # A broker of its own: the usual prefix; someone else's: topics of this run only.
    prefix = "ecc" if address.kind != "external" else f"demo-{secrets.token_hex(4)}"
    broker_cfg = BrokerConfig(
        host=address.host, port=address.port, protocol=address.protocol,
        reconnect_min=0.1, reconnect_max=1.0,
    )  # fmt: skip

    admin_password = os.environ.get(ADMIN_PASSWORD_ENV) or secrets.token_urlsafe(12)
    db = state / "instance" / "instance.db"
    db.parent.mkdir(mode=0o700)
    instance_config = InstanceConfig(host="127.0.0.1", port=0, db=db, admin_password=admin_password)
    client_tls: ssl.SSLContext | bool = True
    tls_note = ""
    if https:  # a self-signed certificate for this run; the demo's client trusts it
        cert = tls.self_signed(db, tls.DEFAULT_NAMES)
        tls_note = (
            f"instance: HTTPS with a self-signed certificate made for this run ({cert.cert})\n"
            f"instance: its SHA-256 fingerprint {cert.fingerprint}"
        )
        instance_config = dataclasses.replace(
            instance_config, ssl_context=tls.server_context(cert.cert, cert.key)
        )
        client_tls = tls.client_context(cert.cert)
    instance = Instance(instance_config)
    keys = keys_for(db)
    install(instance, keys)
    discovery.install(instance)
    inst = await stack.enter_async_context(instance)
    await stack.enter_async_context(
        Connector(
            inst.store,
            broker_cfg,
            settings=ConnectorSettings(
                prefix=prefix, client_id=f"midbridge-demo-instance-{prefix}"
            ),
            keys=keys,
        )
    )
    console.print(f"instance: {inst.url} (database in {state}; connector on the broker)")
    if tls_note:
        console.print(tls_note, soft_wrap=True)  # the path and fingerprint unbroken, to copy

    targets = await stack.enter_async_context(demo_targets(TargetSettings()))
    console.print(_targets_table(targets))
    for note in targets.notes:
        console.print(f"[yellow]targets: {escape(note)}[/yellow]")

    config = Config(
        broker=broker_cfg,
        bridge=BridgeSection(
            agent=DEMO_AGENT,
            topic_prefix=prefix,
            state_dir=state / "bridge",
        ),
        limits=LimitsConfig(drain_timeout=2.0),
        security=SecurityConfig(
            require_validation=True, require_signatures=True, platform_key=keys.public_key_b64
        ),
    )
    await stack.enter_async_context(Bridge(config, REGISTRY))
    console.print(
        f"bridge: mid.server.{DEMO_AGENT} up (validation and signed jobs required, "
        f"state in {state / 'bridge'})"
    )

    ranges = f"127.0.0.1-127.0.0.{hosts}"
    settings = targets.settings
    plan = DiscoveryPlan(
        ranges=ranges,
        ports=targets.ports,
        ssh_user=settings.ssh_user,
        ssh_password=settings.ssh_password,
        snmp_community=settings.snmp_community,
    )
    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(ssl=client_tls)) as http:
        admin = Admin(http, inst.url, "admin", admin_password)
        code = await discover(admin, console, agent=DEMO_AGENT, plan=plan)
    console.print(f"demo: {time.perf_counter() - started:.1f} s")
    where = f"{inst.url}/" if inst.dashboard is not None else f"{inst.url}/api/now/table/cmdb_ci"
    console.print(
        f"dashboard: [bold]{where}[/bold]  (user admin, password {escape(admin_password)})"
    )
    if keep:
        console.print("--keep: everything stays up until Ctrl-C")
        await _wait_for_signal()
        console.print("stopping")
    else:
        console.print("(the demo stops now; `midbridge demo --keep` stays up to browse it)")
    return code


# --- python -m bridge.demo discover: the loop against an instance elsewhere ----------------


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m bridge.demo",
        description="The demo's discovery loop against a running instance (compose).",
    )
    sub = parser.add_subparsers(dest="command", required=True)
    run = sub.add_parser(
        "discover",
        help="validate an agent, store the demo credentials, run a discovery, print the CIs",
    )
    run.add_argument("--url", required=True, help="the instance, e.g. http://instance:8080")
    run.add_argument(
        "--ca-file",
        type=Path,
        default=None,
        help="trust this PEM certificate (an https instance's self-signed one)",
    )
    run.add_argument("--agent", required=True, help="the bridge's agent name")
    run.add_argument("--ranges", required=True, help="what to discover, e.g. 172.30.57.0/24")
    run.add_argument(
        "--user", default="admin", help=f"admin user (password: ${ADMIN_PASSWORD_ENV})"
    )
    defaults = Ports()
    run.add_argument("--ssh-port", type=int, default=defaults.ssh)
    run.add_argument("--http-port", type=int, default=defaults.http)
    run.add_argument("--https-port", type=int, default=defaults.https)
    run.add_argument("--snmp-port", type=int, default=defaults.snmp)
    run.add_argument("--ssh-user", default=DEFAULT_SSH_USER)
    run.add_argument("--timeout", type=float, default=300.0, help="seconds the run may take")
    run.add_argument(
        "--wait", type=float, default=120.0, help="seconds to wait for the instance and the agent"
    )
    return parser


async def _discover_remote(args: argparse.Namespace) -> int:
    console = make_console()
    missing = [
        env for env in (ADMIN_PASSWORD_ENV, SSH_PASSWORD_ENV, SNMP_COMMUNITY_ENV)
        if not os.environ.get(env)
    ]  # fmt: skip
    if missing:
        return fail("demo discover", f"set {', '.join('$' + m for m in missing)}")
    plan = DiscoveryPlan(
        ranges=args.ranges,
        ports=Ports(args.ssh_port, args.http_port, args.https_port, args.snmp_port),
        ssh_user=args.ssh_user,
        ssh_password=os.environ[SSH_PASSWORD_ENV],
        snmp_community=os.environ[SNMP_COMMUNITY_ENV],
        batch_size=256,
        timeout=args.timeout,
    )
    try:
        client_tls = tls.client_context(args.ca_file)
    except tls.TlsError as exc:
        return fail("demo discover", exc)
    connector = aiohttp.TCPConnector(ssl=client_tls)
    async with aiohttp.ClientSession(connector=connector) as http:
        admin = Admin(http, args.url, args.user, os.environ[ADMIN_PASSWORD_ENV])

        async def reachable() -> bool:
            try:
                await admin.call("GET", "/api/now/table/ecc_agent", params={"sysparm_limit": "1"})
            except DemoError:
                return False
            return True

        try:
            await admin.wait_until(f"the instance at {args.url}", reachable, args.wait, 1.0)
            console.print(f"instance: {args.url}")
            code = await discover(
                admin, console, agent=args.agent, plan=plan, agent_timeout=args.wait
            )
        except DemoError as exc:
            return fail("demo discover", exc)
    console.print(f"dashboard: {args.url.rstrip('/')}/ (user {args.user})")
    return code


def main(argv: Sequence[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    return asyncio.run(_discover_remote(args))


if __name__ == "__main__":
    sys.exit(main())
