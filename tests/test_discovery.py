"""Discovery on the built-in instance, end to end, and its parts.

The end-to-end tests are real: the built-in instance on loopback with its connector and
the discovery engine, a private Mosquitto, a real bridge in this process (validated
through the instance's admin action, so credentials reach it sealed), a real OpenSSH
server (``tests/sshd.py``), a real net-snmp agent (``tests/snmpd.py``), aiohttp HTTP and
HTTPS servers (the test CA of ``tests/test_http.py``), each on its own 127.x address;
addresses with nothing on them; a /16 of loopback addresses.

The rest checks the pieces without a network: batches and exclusions, schedule checks,
the classification parsers, identification rules, the Table API's class views.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import os
import random
import secrets
import socket
import ssl
import time
import uuid
from collections.abc import AsyncIterator, Iterator
from contextlib import AsyncExitStack, asynccontextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiohttp
import orjson
import pytest
from aiohttp import web

from bridge.agent.bridge import Bridge
from bridge.instance import auth, cmdb, discovery
from bridge.instance.api import restrict
from bridge.instance.connector import Connector, ConnectorSettings, install, keys_for
from bridge.instance.platform_credentials import PlatformKeys, add_credential
from bridge.instance.query import QueryError
from bridge.instance.server import Instance, InstanceConfig
from bridge.instance.sqlite_store import SQLiteStore
from bridge.instance.store import Change
from bridge.wire.broker import BrokerConfig
from bridge.wire.records import now_text
from bridge.wire.targets import parse_targets
from probes import REGISTRY
from tests.brokers import MosquittoServer
from tests.harness import make_config
from tests.snmpd import COMMUNITY, SYS_NAME, Snmpd, SnmpdUnavailable
from tests.sshd import SshdUnavailable, SshServer, ensure_users, generate_key, remove_users
from tests.test_http import Pki, make_pki

OS_RELEASE = Path("/etc/os-release").read_text(encoding="utf-8")
ADMIN_PASSWORD = "admin-" + secrets.token_urlsafe(12)
DISCO_PASSWORD = "disco-" + secrets.token_urlsafe(12)
MID_PASSWORD = "mid-" + secrets.token_urlsafe(12)
FINAL = ("Completed", "Error", "Cancelled")


def basic(user: str, password: str) -> str:
    return "Basic " + base64.b64encode(f"{user}:{password}".encode()).decode()


def free_port(kind: socket.SocketKind = socket.SOCK_STREAM) -> int:
    """A port free on every address (bound on 0.0.0.0 and released)."""
    with socket.socket(socket.AF_INET, kind) as sock:
        sock.bind(("0.0.0.0", 0))
        port: int = sock.getsockname()[1]
    return port


def listening(host: str, port: int) -> socket.socket:
    sock = socket.socket()
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind((host, port))
    sock.listen(128)
    return sock


def machine_macs() -> list[str]:
    """The MACs of this machine's interfaces, as the SSH classifier reads them."""
    found = set()
    for path in Path("/sys/class/net").glob("*/address"):
        mac = cmdb.normalize_mac(path.read_text().strip())
        if mac is not None and path.parent.name != "lo":
            found.add(mac)
    return sorted(found)


# --- the platform: instance + connector + discovery, and a validated bridge -------------------


@dataclass
class Lab:
    inst: Instance
    keys: PlatformKeys
    connector: Connector
    engine: discovery.DiscoveryEngine
    http: aiohttp.ClientSession
    prefix: str

    async def call(
        self, method: str, path: str, body: Any = None, *, user: tuple[str, str] | None = None
    ) -> tuple[int, Any]:
        headers = {"Authorization": basic(*(user or ("admin", ADMIN_PASSWORD)))}
        if body is None and method == "POST":
            body = {}  # the action endpoints take JSON only (CSRF)
        if body is not None:
            headers["Content-Type"] = "application/json"
        data = None if body is None else orjson.dumps(body)
        async with self.http.request(
            method, self.inst.url + path, data=data, headers=headers
        ) as response:
            raw = await response.read()
            return response.status, orjson.loads(raw) if raw else None

    async def rows(self, table: str, query: str = "") -> list[dict[str, Any]]:
        status, data = await self.call(
            "GET", f"/api/now/table/{table}?sysparm_query={query}&sysparm_limit=10000"
        )
        assert status == 200, data
        result: list[dict[str, Any]] = data["result"]
        return result

    async def schedule(self, **fields: Any) -> dict[str, Any]:
        status, data = await self.call("POST", "/api/now/table/discovery_schedule", fields)
        assert status == 201, data
        result: dict[str, Any] = data["result"]
        return result

    async def wait_agent(self, name: str, field: str, value: str, timeout: float = 15) -> None:
        deadline = time.monotonic() + timeout
        row: dict[str, Any] = {}
        while time.monotonic() < deadline:
            rows = await self.rows("ecc_agent", f"name={name}")
            if rows and rows[0][field] == value:
                return
            row = rows[0] if rows else {}
            await asyncio.sleep(0.05)
        raise AssertionError(f"agent {name}: {field} never became {value}: {row}")

    async def wait_run(self, status_id: str, timeout: float) -> dict[str, Any]:
        """Until the run's status record is final (told by the store, bounded)."""
        changed = asyncio.Event()

        def on_update(change: Change) -> None:
            if change.record["sys_id"] == status_id:
                changed.set()

        remove = self.inst.on_update("discovery_status", on_update)
        try:
            async with asyncio.timeout(timeout):
                while True:
                    row = await self.inst.store.get("discovery_status", status_id)
                    assert row is not None
                    if row["state"] in FINAL:
                        return row
                    changed.clear()
                    await changed.wait()
        except TimeoutError:
            row = await self.inst.store.get("discovery_status", status_id)
            raise AssertionError(f"run not finished within {timeout} s: {row}") from None
        finally:
            remove()


@asynccontextmanager
async def lab(broker: MosquittoServer, tmp_path: Path) -> AsyncIterator[Lab]:
    prefix = "d" + uuid.uuid4().hex[:12]
    db = tmp_path / "instance" / "instance.sqlite3"
    keys = keys_for(db)
    inst = Instance(InstanceConfig(db=db, admin_password=ADMIN_PASSWORD))
    install(inst, keys)
    engine = discovery.install(inst)
    connector = Connector(
        inst.store,
        BrokerConfig(host=broker.host, port=broker.port, reconnect_min=0.1, reconnect_max=1.0),
        settings=ConnectorSettings(
            prefix=prefix, client_id=f"inst-{prefix}", sweep_interval=0.5, lease_check_interval=0.2
        ),
        keys=keys,
    )
    async with inst, connector, aiohttp.ClientSession() as http:
        await auth.create_user(inst.store, "disco", DISCO_PASSWORD, roles=["discovery_admin"])
        await auth.create_user(
            inst.store, "mid.user", MID_PASSWORD, roles=["mid_server"], web_service_access_only=True
        )
        yield Lab(inst, keys, connector, engine, http, prefix)


@asynccontextmanager
async def validated_bridge(
    the_lab: Lab, broker: MosquittoServer, agent: str, state: Path, credentials: str = ""
) -> AsyncIterator[Bridge]:
    config = make_config(
        broker.host,
        broker.port,
        agent,
        state,
        security={"require_signatures": True, "platform_key": the_lab.keys.public_key_b64,
                  "require_validation": True},
    )  # fmt: skip
    config.bridge.topic_prefix = the_lab.prefix
    config.probes.settings = {"SSHCommand": {"known_hosts": str(state / "known_hosts")}}
    if credentials:
        path = state.parent / f"{agent}-credentials.toml"
        path.write_text(credentials, encoding="utf-8")
        path.chmod(0o600)
        config.bridge.credentials_file = path
    async with Bridge(config, REGISTRY) as bridge:
        await the_lab.wait_agent(agent, "status", "Up")
        status, data = await the_lab.call("POST", f"/api/midbridge/agents/{agent}/validate")
        assert status == 201, data
        await the_lab.wait_agent(agent, "validated", "true")
        yield bridge


# --- targets ------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def key_user() -> Iterator[str]:
    """The sshd test account with public-key login (tests/sshd.py), made if missing."""
    import pwd

    try:
        pwd.getpwnam("mbkey")
        made = None
    except KeyError:
        try:
            made = ensure_users()
        except SshdUnavailable as exc:
            pytest.fail(str(exc), pytrace=False)
    yield "mbkey"
    if made is not None:
        remove_users(made)


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Pki:
    return make_pki(tmp_path_factory.mktemp("pki"))


def web_app(title: str) -> web.Application:
    async def home(request: web.Request) -> web.Response:
        return web.Response(
            text=f"<!doctype html><html><head><title>{title}</title></head><body>hi</body></html>",
            content_type="text/html",
        )

    app = web.Application()
    app.router.add_get("/", home)
    return app


@asynccontextmanager
async def web_servers(
    plain: list[tuple[str, int]], tls: list[tuple[str, int]], pki: Pki
) -> AsyncIterator[None]:
    """HTTP servers on ``plain`` (title "Lab web") and HTTPS ones on ``tls`` ("Lab secure")."""
    runners = []
    try:
        for sites, title in ((plain, "Lab web"), (tls, "Lab secure")):
            if not sites:
                continue
            runner = web.AppRunner(web_app(title), access_log=None)
            await runner.setup()
            runners.append(runner)
            context = None
            if sites is tls:
                context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
                context.load_cert_chain(pki.cert_file, pki.key_file)
            for host, port in sites:
                await web.SockSite(runner, listening(host, port), ssl_context=context).start()
        yield
    finally:
        for runner in runners:
            await runner.cleanup()


@asynccontextmanager
async def raw_listeners(sites: list[tuple[str, int]]) -> AsyncIterator[None]:
    """TCP listeners that speak no protocol: they say a line and hang up."""

    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        with contextlib.suppress(ConnectionError):
            writer.write(b"not a protocol you know\r\n")
            await writer.drain()
        writer.close()

    servers = [await asyncio.start_server(handle, host, port) for host, port in sites]
    try:
        yield
    finally:
        for server in servers:
            server.close()
            await server.wait_closed()


# --- end to end: a lab with one of each ----------------------------------------------------------


async def test_discovery_classifies_a_lab_and_a_second_run_updates_the_same_cis(
    private_broker: MosquittoServer,
    unique_agent: str,
    tmp_path: Path,
    key_user: str,
    pki: Pki,
) -> None:
    net = f"127.42.{random.randint(0, 255)}"
    ssh_ip, snmp_ip, http_ip, https_ip, fake_ip = (f"{net}.{i}" for i in range(1, 6))
    ssh_port, http_port, https_port = free_port(), free_port(), free_port()

    key = generate_key(tmp_path / "id_lab")
    sshd = SshServer(
        tmp_path / "sshd", authorized_keys={key_user: [key.with_name(key.name + ".pub")]}
    )
    sshd.host, sshd.port = ssh_ip, ssh_port
    snmpd = Snmpd(tmp_path / "snmpd")
    snmpd.host = snmp_ip
    try:
        sshd.start()
        snmpd.start()
    except (SshdUnavailable, SnmpdUnavailable) as exc:
        sshd.close()
        snmpd.stop()
        pytest.fail(str(exc), pytrace=False)

    async with AsyncExitStack() as stack:
        stack.callback(sshd.close)
        stack.callback(snmpd.stop)
        await stack.enter_async_context(
            web_servers([(http_ip, http_port)], [(https_ip, https_port)], pki)
        )
        await stack.enter_async_context(raw_listeners([(fake_ip, ssh_port)]))
        the_lab = await stack.enter_async_context(lab(private_broker, tmp_path))
        store = the_lab.inst.store
        await add_credential(
            store, the_lab.keys, name="lab-ssh", type="ssh_private_key",
            fields={"user": key_user, "private_key": key.read_text()},
        )  # fmt: skip
        await add_credential(
            store, the_lab.keys, name="lab-snmp", type="snmp_community",
            fields={"community": COMMUNITY},
        )  # fmt: skip
        # Shazzam's SNMP tap takes the bridge's own snmp_community credentials: the
        # connector seals credentials into SSHCommand and SNMP jobs, not into Shazzam ones.
        local = (
            f'[[credential]]\nid = "lab-snmp"\ntype = "snmp_community"\ncommunity = "{COMMUNITY}"\n'
        )
        await stack.enter_async_context(
            validated_bridge(the_lab, private_broker, unique_agent, tmp_path / "bridge", local)
        )
        schedule = await the_lab.schedule(
            name="lab",
            ranges=f"{net}.0/28",
            exclusions=f"{net}.14",
            agent=unique_agent,
            ports=f"{ssh_port},{http_port},{https_port}",
            ssh_ports=str(ssh_port),
            http_ports=str(http_port),
            https_ports=str(https_port),
            snmp=True,
            snmp_port=snmpd.port,
            credentials="lab-ssh, lab-snmp",
            batch_size=4,
            parallel_batches=2,
        )

        # --- first run, through the Python API ---
        first_id = await discovery.start_run(the_lab.inst, schedule["sys_id"])
        first = await the_lab.wait_run(first_id, timeout=90)
        assert first["state"] == "Completed", first
        print("\n" + first["log"])
        assert first["addresses"] == 13  # .1-.14 without .14
        assert first["scanned"] == 13
        assert first["alive"] == 13  # loopback: every address answers (refused)
        assert (first["batches"], first["batches_done"]) == (4, 4)
        assert first["open_ports"] == 4
        assert first["probes"] == 13 * 3
        assert first["classify_total"] == 5
        assert first["classified"] == 4
        assert first["classify_failed"] == 1  # the fake SSH port: nothing else to try
        assert first["errors"] == 1
        assert (first["cis_created"], first["cis_updated"]) == (5, 0)
        assert first["progress"] == 100.0
        assert first["duration"] > 0
        assert f"{fake_ip}: ssh classification failed" in first["log"]

        cis = {ci["ip_address"]: ci for ci in await the_lab.rows("cmdb_ci")}
        assert sorted(cis) == sorted([ssh_ip, snmp_ip, http_ip, https_ip, fake_ip])
        macs = ",".join(machine_macs())

        linux = cis[ssh_ip]
        assert linux["sys_class_name"] == "cmdb_ci_linux_server"
        assert linux["name"] == linux["host_name"] == socket.gethostname()
        assert linux["kernel"] == os.uname().release
        os_release = cmdb.parse_os_release(OS_RELEASE)
        assert linux["os"] == os_release["PRETTY_NAME"]
        assert linux["os_version"] == os_release.get("VERSION_ID", "")
        assert linux["mac_address"] == macs
        assert linux["ports"] == str(ssh_port)

        gear = cis[snmp_ip]
        assert gear["sys_class_name"] == "cmdb_ci_netgear"
        assert gear["name"] == gear["host_name"] == SYS_NAME
        assert gear["sys_object_id"].startswith("1.3.6.1.4.1.8072.")  # net-snmp
        assert gear["sys_descr"].startswith("Linux")
        assert gear["mac_address"] == macs  # the same kernel: identified apart by class

        web_ci = cis[http_ip]
        assert web_ci["sys_class_name"] == "cmdb_ci_web_server"
        assert web_ci["name"] == f"{http_ip}:{http_port}"
        assert web_ci["http_title"] == "Lab web"
        assert "aiohttp" in web_ci["http_server"]
        assert web_ci["tls_subject"] == ""

        secure = cis[https_ip]
        assert secure["sys_class_name"] == "cmdb_ci_web_server"
        assert secure["http_title"] == "Lab secure"
        assert "CN=target.test" in secure["tls_subject"]
        assert secure["tls_not_after"].startswith(str(pki.server.not_valid_after_utc.year))

        bare = cis[fake_ip]
        assert bare["sys_class_name"] == "cmdb_ci_ip_address"
        assert (bare["name"], bare["ports"]) == (fake_ip, str(ssh_port))

        for ci in cis.values():
            assert ci["first_discovered"] == ci["last_discovered"] != ""
            assert ci["discovery_source"] == "midbridge"
            assert ci["discovery_status"]["value"] == first_id  # a reference: {link, value}

        # The classify jobs were ordinary output records, answered by the bridge.
        jobs = await the_lab.rows("ecc_queue", f"queue=output^agent_correlator={first_id}")
        topics = sorted(j["topic"] for j in jobs)
        assert (
            topics
            == ["RESTProbe", "RESTProbe", "SNMP", "SSHCommand", "SSHCommand"] + ["Shazzam"] * 4
        )
        ssh_jobs = [j for j in jobs if j["topic"] == "SSHCommand"]
        assert all(orjson.loads(j["payload"])["credential_id"] == "lab-ssh" for j in ssh_jobs)

        # --- second run, through the HTTP API, a second later ---
        async with asyncio.timeout(3):
            while now_text() <= max(ci["last_discovered"] for ci in cis.values()):
                await asyncio.sleep(0.05)
        status, data = await the_lab.call(
            "POST", f"/api/midbridge/discovery/{schedule['name']}/run",
            user=("disco", DISCO_PASSWORD),
        )  # fmt: skip
        assert status == 201, data
        second_id = data["result"]["sys_id"]
        assert data["result"]["schedule"] == schedule["sys_id"]
        second = await the_lab.wait_run(second_id, timeout=90)
        assert second["state"] == "Completed", second
        assert (second["classified"], second["classify_failed"]) == (4, 1)
        assert (second["cis_created"], second["cis_updated"]) == (0, 5)

        again = {ci["ip_address"]: ci for ci in await the_lab.rows("cmdb_ci")}
        assert len(again) == len(await the_lab.rows("cmdb_ci")) == 5  # no duplicates
        for ip, ci in again.items():
            before = cis[ip]
            assert ci["sys_id"] == before["sys_id"]
            assert ci["sys_class_name"] == before["sys_class_name"]
            assert ci["first_discovered"] == before["first_discovered"]
            assert ci["last_discovered"] > before["last_discovered"]
            assert ci["discovery_status"]["value"] == second_id

        # --- the CIs through the Table API's class views ---
        names = {r["name"] for r in await the_lab.rows("cmdb_ci_web_server")}
        assert names == {f"{http_ip}:{http_port}", f"{https_ip}:{https_port}"}
        [server] = await the_lab.rows("cmdb_ci_linux_server")
        assert server["sys_id"] == linux["sys_id"]
        assert {r["sys_class_name"] for r in await the_lab.rows("cmdb_ci_hardware")} == {
            "cmdb_ci_linux_server", "cmdb_ci_netgear",
        }  # fmt: skip
        assert (
            len(await the_lab.rows("cmdb_ci_server", "nameSTARTSWITHx^NQip_address=" + ssh_ip)) == 1
        )
        status, one = await the_lab.call("GET", f"/api/now/table/cmdb_ci_netgear/{gear['sys_id']}")
        assert status == 200
        assert one["result"]["name"] == SYS_NAME
        status, _ = await the_lab.call("GET", f"/api/now/table/cmdb_ci_netgear/{linux['sys_id']}")
        assert status == 404
        status, data = await the_lab.call(
            "POST", "/api/now/table/cmdb_ci_linux_server", {"name": "x"}
        )
        assert status == 201, data  # a class table is written like ServiceNow's
        assert data["result"]["sys_class_name"] == "cmdb_ci_linux_server"
        status, _ = await the_lab.call(
            "GET", "/api/now/table/cmdb_ci_linux_server", user=("mid.user", MID_PASSWORD)
        )
        assert status == 403


async def test_runs_are_refused_held_and_cancelled(
    private_broker: MosquittoServer, tmp_path: Path
) -> None:
    async with lab(private_broker, tmp_path) as the_lab:
        nobody = "nobody-" + uuid.uuid4().hex[:8]  # never reports: its work is held
        schedule = await the_lab.schedule(
            name="held", ranges="127.43.0.1-127.43.0.30", agent=nobody, batch_size=10,
            parallel_batches=2, ports="9",
        )  # fmt: skip
        path = f"/api/midbridge/discovery/{schedule['sys_id']}/run"
        mid = ("mid.user", MID_PASSWORD)
        assert (await the_lab.call("POST", path, user=mid))[0] == 403
        assert (await the_lab.call("POST", path, user=("disco", "wrong-password")))[0] == 401
        status, data = await the_lab.call("POST", "/api/midbridge/discovery/nope/run")
        assert status == 404, data

        status, data = await the_lab.call("POST", path, user=("disco", DISCO_PASSWORD))
        assert status == 201, data
        run = data["result"]
        assert run["state"] == "Scanning"
        assert (run["addresses"], run["batches"]) == ("30", "3")
        assert "has never reported" in run["log"]
        outputs = await the_lab.rows("ecc_queue", f"agent_correlator={run['sys_id']}")
        assert len(outputs) == 2  # parallel_batches
        assert all(o["state"] == "ready" and o["topic"] == "Shazzam" for o in outputs)
        payload = orjson.loads(outputs[0]["payload"])
        assert payload == {"targets": "127.43.0.1-127.43.0.10", "chunk_hosts": 256, "ports": [9]}

        status, data = await the_lab.call("POST", path)
        assert status == 409, data
        assert "running already" in data["error"]["message"]

        status, data = await the_lab.call(
            "POST", f"/api/midbridge/discovery/{run['sys_id']}/cancel",
            user=("disco", DISCO_PASSWORD),
        )  # fmt: skip
        assert status == 200, data
        assert data["result"]["state"] == "Cancelled"
        outputs = await the_lab.rows("ecc_queue", f"agent_correlator={run['sys_id']}")
        assert len(outputs) == 2
        assert {o["state"] for o in outputs} == {"error"}
        assert all(o["error_string"].startswith("cancelled:") for o in outputs)
        assert the_lab.engine.active_runs == []
        status, data = await the_lab.call(
            "POST", f"/api/midbridge/discovery/{run['sys_id']}/cancel"
        )
        assert status == 409, data

        bad = await the_lab.schedule(name="bad", ranges="lab-router.example.com", agent="a")
        status, data = await the_lab.call("POST", f"/api/midbridge/discovery/{bad['sys_id']}/run")
        assert status == 400
        assert "ranges" in data["error"]["message"]
        big = await the_lab.schedule(
            name="big", ranges="10.0.0.0/16", agent="a", max_addresses=1000
        )
        with pytest.raises(discovery.DiscoveryError, match="max_addresses"):
            await discovery.start_run(the_lab.inst.store, big["sys_id"])
        off = await the_lab.schedule(name="off", ranges="10.0.0.1", agent="a", active=False)
        status, data = await the_lab.call("POST", f"/api/midbridge/discovery/{off['name']}/run")
        assert status == 409


async def test_an_unfinished_run_is_closed_when_the_instance_starts_again(tmp_path: Path) -> None:
    db = tmp_path / "i.sqlite3"
    async with Instance(InstanceConfig(db=db, admin_password=ADMIN_PASSWORD)) as inst:
        row = await inst.store.insert("discovery_status", {"name": "x", "state": "Scanning"})
    inst = Instance(InstanceConfig(db=db))
    discovery.install(inst)
    async with inst:
        again = await inst.store.get("discovery_status", row["sys_id"])
        assert again is not None
        assert again["state"] == "Error"
        assert "the instance stopped during the run" in again["log"]


# --- end to end: a /16 ------------------------------------------------------------------------


async def test_a_slash_16_of_loopback_addresses_completes_with_correct_counts(
    private_broker: MosquittoServer, unique_agent: str, tmp_path: Path, pki: Pki
) -> None:
    http_port, https_port, other_port = free_port(), free_port(), free_port()
    web_hosts = ["127.1.0.10", "127.1.200.7"]
    tls_hosts = ["127.1.100.100"]
    raw_hosts = ["127.1.50.50", "127.1.255.254"]  # open, but no classifier handles the port
    async with AsyncExitStack() as stack:
        await stack.enter_async_context(
            web_servers(
                [(h, http_port) for h in web_hosts], [(h, https_port) for h in tls_hosts], pki
            )
        )
        await stack.enter_async_context(raw_listeners([(h, other_port) for h in raw_hosts]))
        the_lab = await stack.enter_async_context(lab(private_broker, tmp_path))
        await stack.enter_async_context(
            validated_bridge(the_lab, private_broker, unique_agent, tmp_path / "bridge")
        )
        schedule = await the_lab.schedule(
            name="slash16",
            ranges="127.1.0.0/16",
            agent=unique_agent,
            ports=f"{http_port},{https_port},{other_port}",
            http_ports=str(http_port),
            https_ports=str(https_port),
        )
        started = time.perf_counter()
        status_id = await discovery.start_run(the_lab.inst.store, schedule["sys_id"])
        result = await the_lab.wait_run(status_id, timeout=120)
        wall = time.perf_counter() - started
        addresses = 65_534
        assert result["state"] == "Completed", result
        assert result["addresses"] == result["scanned"] == result["alive"] == addresses
        assert (result["batches"], result["batches_done"]) == (66, 66)
        assert result["probes"] == addresses * 3
        assert result["open_ports"] == 5
        assert result["classify_total"] == result["classified"] == 3
        assert (result["classify_failed"], result["errors"]) == (0, 0)
        assert (result["cis_created"], result["cis_updated"]) == (3, 0)
        cis = await the_lab.rows("cmdb_ci")
        assert sorted(ci["ip_address"] for ci in cis) == sorted(web_hosts + tls_hosts)
        assert {ci["sys_class_name"] for ci in cis} == {"cmdb_ci_web_server"}
        classify = await the_lab.rows(
            "ecc_queue", f"queue=output^agent_correlator={status_id}^topic!=Shazzam"
        )
        assert sorted(j["source"] for j in classify) == sorted(web_hosts + tls_hosts)
        scan = result["scan_duration"]
        servicenow = result["probes"] / 1000  # ~1 probe per ms, one Shazzam per MID
        print(
            f"\n/16 discovery: {addresses} addresses x 3 ports = {result['probes']} probes; "
            f"scan {scan:.2f} s ({result['probes'] / scan:,.0f} probes/s), "
            f"run {result['duration']:.2f} s, wall {wall:.2f} s; "
            f"at ServiceNow's pacing ~{servicenow:.0f} s"
        )
        assert wall < 60, wall


# --- the pieces -----------------------------------------------------------------------------------


def test_batches_leave_out_exclusions_and_keep_their_size() -> None:
    targets = parse_targets("10.0.0.0/24, 10.0.1.1-10.0.1.5")
    holes = parse_targets("10.0.0.10-10.0.0.19, 10.0.1.3").intervals
    left = discovery.subtract(targets.intervals, holes)
    assert [i.text() for i in left] == [
        "10.0.0.1-10.0.0.9", "10.0.0.20-10.0.0.254", "10.0.1.1-10.0.1.2", "10.0.1.4-10.0.1.5",
    ]  # fmt: skip
    batches = discovery.cut_batches(left, 100)
    assert [n for _, n in batches] == [100, 100, 48]
    assert batches[0][0] == "10.0.0.1-10.0.0.9, 10.0.0.20-10.0.0.110"
    assert batches[2][0] == "10.0.0.211-10.0.0.254, 10.0.1.1-10.0.1.2, 10.0.1.4-10.0.1.5"
    every = [a for text, _ in batches for _, a in parse_targets(text).addresses()]
    assert len(every) == len(set(every)) == 248
    assert "10.0.0.15" not in every
    assert discovery.cut_batches(parse_targets("::1-::3").intervals, 1000) == [("::1-::3", 3)]


async def test_a_plan_follows_the_schedule(tmp_path: Path) -> None:
    async with SQLiteStore(tmp_path / "s.sqlite3") as store:
        keys = PlatformKeys.ephemeral()
        for name, kind, order, fields in (
            ("b-ssh", "ssh_password", 20, {"user": "u", "password": "p"}),
            ("a-ssh", "ssh_password", 10, {"user": "u", "password": "p"}),
            ("snmp", "snmp_community", 10, {"community": "c"}),
        ):
            await add_credential(store, keys, name=name, type=kind, order=order, fields=fields)
        base = {"sys_id": "s1", "name": "s", "agent": "m1, m2", "ranges": "10.0.0.1-10.0.0.9",
                "ssh_ports": "22,2222", "http_ports": "80", "https_ports": "443",
                "snmp_port": 161, "batch_size": 4, "parallel_batches": 2}  # fmt: skip
        plan = await discovery.make_plan(store, base)
        assert plan.agents == ("m1", "m2")
        assert plan.addresses == 9
        assert [n for _, n in plan.batches] == [4, 4, 1]
        assert plan.ports is None  # Shazzam's defaults
        assert plan.ssh_credentials == (None,)  # no list: every SSH credential, one job
        assert plan.snmp_credential_ids == ()
        listed = await discovery.make_plan(store, {**base, "credentials": "b-ssh,nope,a-ssh,snmp"})
        assert listed.ssh_credentials == ("a-ssh", "b-ssh")  # by their order
        assert listed.snmp_credential_ids == ("snmp",)
        assert any("'nope'" in note for note in listed.notes)

        tried = discovery.attempts_for(listed, [80, 443, 2222], {"credential_id": "snmp"})
        assert [(a.kind, a.port, a.credential_id) for a in tried] == [
            ("ssh", 2222, "a-ssh"), ("ssh", 2222, "b-ssh"), ("snmp", 161, "snmp"),
            ("https", 443, None), ("http", 80, None),
        ]  # fmt: skip
        assert discovery.attempts_for(listed, [8080, 3306], None) == []
        no_ssh = await discovery.make_plan(store, {**base, "credentials": "snmp"})
        assert discovery.attempts_for(no_ssh, [22], None) == []

        cases: list[tuple[dict[str, Any], str]] = [
            ({"agent": ""}, "names no MID"),
            ({"agent": "mid.server.x y"}, "not a MID name"),
            ({"ranges": "10.0.0.1-5, host.example"}, "ranges"),
            ({"exclusions": "x"}, "exclusions"),
            ({"ranges": "10.0.0.0/8"}, "max_addresses"),
            ({"ranges": "10.0.0.1", "exclusions": "10.0.0.0/24"}, "no address is left"),
            ({"ports": "0"}, "ports"),
            ({"http_ports": "80-70"}, "http_ports"),
            ({"batch_size": 0}, "batch_size"),
        ]
        for fields, message in cases:
            with pytest.raises(discovery.DiscoveryError, match=message):
                await discovery.make_plan(store, {**base, **fields})


SSH_OUTPUT = """@@midbridge:uname
Linux web-07 6.1.0-18-amd64 #1 SMP PREEMPT_DYNAMIC Debian 6.1.76-1 x86_64 GNU/Linux
@@midbridge:os-release
PRETTY_NAME="Debian GNU/Linux 12 (bookworm)"
NAME="Debian GNU/Linux"
VERSION_ID="12"
@@midbridge:hostname
web-07
@@midbridge:serial
@@midbridge:mac
/sys/class/net/eth0/address:02:FC:00:00:00:01
/sys/class/net/lo/address:00:00:00:00:00:00
/sys/class/net/eth1/address:02:fc:00:00:00:02
@@midbridge:end
"""


def test_classification_parsers() -> None:
    obs = cmdb.parse_ssh("10.0.0.7", {"stdout": SSH_OUTPUT, "exit_status": 0}, [22, 80])
    assert obs is not None
    assert obs.sys_class_name == "cmdb_ci_linux_server"
    assert (obs.name, obs.serial_number) == ("web-07", "")
    assert obs.macs == ("02:fc:00:00:00:01", "02:fc:00:00:00:02")
    assert obs.attributes == {
        "host_name": "web-07", "os": "Debian GNU/Linux 12 (bookworm)", "os_version": "12",
        "kernel": "6.1.0-18-amd64", "ports": "22,80",
    }  # fmt: skip
    with_serial = SSH_OUTPUT.replace("@@midbridge:serial\n", "@@midbridge:serial\nVMW-42\n")
    assert cmdb.parse_ssh("h", {"stdout": with_serial}).serial_number == "VMW-42"  # type: ignore[union-attr]
    oem = SSH_OUTPUT.replace("@@midbridge:serial\n", "@@midbridge:serial\nTo be filled by O.E.M.\n")
    assert cmdb.parse_ssh("h", {"stdout": oem}).serial_number == ""  # type: ignore[union-attr]
    bsd = cmdb.parse_ssh("10.0.0.8", {"stdout": "@@midbridge:uname\nFreeBSD fw 14.0-RELEASE\n"})
    assert bsd is not None
    assert (bsd.sys_class_name, bsd.name) == ("cmdb_ci_ip_address", "10.0.0.8")
    assert bsd.attributes["os"] == "FreeBSD"
    assert cmdb.parse_ssh("h", {"stdout": "Permission denied\n"}) is None
    assert cmdb.parse_ssh("h", {"error": {}}) is None

    def get(oid: str, kind: str, value: str) -> dict[str, Any]:
        return {"spec": 0, "op": "get", "oid": oid,
                "varbinds": [{"oid": oid, "type": kind, "value": value}]}  # fmt: skip

    def row(index: str, mac: str) -> dict[str, Any]:
        cell = {"type": "OctetString", "value": mac, "encoding": "hex"}
        return {"index": index, "values": {"ifDescr": {"value": "x"}, "ifPhysAddress": cell}}

    chunk = {
        "results": [
            get("1.3.6.1.2.1.1.1.0", "OctetString", "Cisco IOS 15.0"),
            get("1.3.6.1.2.1.1.2.0", "ObjectIdentifier", "1.3.6.1.4.1.9.1.1208"),
            get("1.3.6.1.2.1.1.5.0", "OctetString", "sw-3"),
            {"spec": 1, "op": "table", "oid": "1.3.6.1.2.1.2.2",
             "rows": [row("1", ""), row("2", "00:1b:54:aa:bb:01")]},
        ]
    }  # fmt: skip
    gear = cmdb.parse_snmp("10.0.0.9", [chunk], [161])
    assert gear is not None
    assert (gear.sys_class_name, gear.name, gear.macs) == ("cmdb_ci_netgear", "sw-3",
                                                           ("00:1b:54:aa:bb:01",))  # fmt: skip
    assert gear.attributes["sys_object_id"] == "1.3.6.1.4.1.9.1.1208"
    assert cmdb.parse_snmp("h", [{"results": []}]) is None

    answer = {
        "status": 200, "headers": [["Server", "nginx/1.24.0"], ["Content-Type", "text/html"]],
        "body": "<html><head><TITLE>\n  Lab &amp; co\n</TITLE></head></html>",
        "body_encoding": "text",
        "tls": {"peer_certificate": {"subject": "CN=lab", "not_after": "2027-01-01T00:00"}},
    }  # fmt: skip
    web_obs = cmdb.parse_http("2001:db8::7", 8443, answer)
    assert web_obs is not None
    assert web_obs.name == "[2001:db8::7]:8443"
    assert web_obs.attributes["http_server"] == "nginx/1.24.0"
    assert web_obs.attributes["http_title"] == "Lab & co"
    assert web_obs.attributes["tls_subject"] == "CN=lab"
    assert cmdb.parse_http("h", 80, {"error": {"kind": "timeout"}}) is None


async def test_identification_serial_then_mac_then_name_and_ip(tmp_path: Path) -> None:
    async with SQLiteStore(tmp_path / "c.sqlite3") as store:

        def server(ip: str, name: str, serial: str = "", macs: tuple[str, ...] = ()) -> Any:
            return cmdb.Observation("cmdb_ci_linux_server", ip, name, serial, macs)

        first, created = await cmdb.upsert(
            store, server("10.0.0.1", "a", "S1", ("02:00:00:00:00:01",))
        )
        assert created
        # the serial number wins over a new address, name and MAC
        again, created = await cmdb.upsert(
            store, server("10.0.0.2", "b", "S1", ("02:00:00:00:00:09",))
        )
        assert (again["sys_id"], created) == (first["sys_id"], False)
        assert (again["ip_address"], again["name"]) == ("10.0.0.2", "b")
        assert again["first_discovered"] == first["first_discovered"]
        # no serial: a MAC in common
        found, rule = await cmdb.identify(
            store, server("10.9.9.9", "z", "", ("02:00:00:00:00:09",))
        )
        assert (found or {}).get("sys_id") == first["sys_id"]
        assert rule == "mac_address"
        # no serial, no MAC: name + IP
        found, rule = await cmdb.identify(store, server("10.0.0.2", "b"))
        assert (rule, (found or {}).get("sys_id")) == ("name_ip", first["sys_id"])
        found, rule = await cmdb.identify(store, server("10.0.0.3", "b"))
        assert (found, rule) == (None, "")
        # another class with the same MAC is another CI
        gear = cmdb.Observation("cmdb_ci_netgear", "10.0.0.2", "sw", "", ("02:00:00:00:00:09",))
        other, created = await cmdb.upsert(store, gear)
        assert created
        assert other["sys_id"] != first["sys_id"]
        # a bare IP address CI is taken over by a richer class, and refreshes what exists
        bare, created = await cmdb.upsert(store, cmdb.ip_only("10.0.0.5", [8080]))
        assert created
        assert bare["sys_class_name"] == "cmdb_ci_ip_address"
        web_obs = cmdb.Observation("cmdb_ci_web_server", "10.0.0.5", "10.0.0.5:80")
        taken, created = await cmdb.upsert(store, web_obs)
        assert (taken["sys_id"], created) == (bare["sys_id"], False)
        assert taken["sys_class_name"] == "cmdb_ci_web_server"
        refreshed, created = await cmdb.upsert(store, cmdb.ip_only("10.0.0.5", [80]))
        assert (refreshed["sys_id"], created) == (bare["sys_id"], False)
        assert refreshed["sys_class_name"] == "cmdb_ci_web_server"
        assert refreshed["name"] == "10.0.0.5:80"
        assert await store.count("cmdb_ci") == 3


def test_class_views_and_restricted_queries() -> None:
    assert cmdb.class_view("cmdb_ci") is None
    assert cmdb.class_view("ecc_queue") is None
    assert cmdb.class_view("cmdb_ci_linux_server") == ("cmdb_ci_linux_server",)
    assert set(cmdb.class_view("cmdb_ci_hardware") or ()) == {
        "cmdb_ci_hardware", "cmdb_ci_computer", "cmdb_ci_server", "cmdb_ci_linux_server",
        "cmdb_ci_netgear",
    }  # fmt: skip
    cond = "sys_class_nameINa,b"
    assert restrict("", cond) == cond
    # An empty term never makes "^^" (a caret inside the scope's last value):
    assert restrict("^name=x,b", cond) == f"{cond}^name=x,b"
    assert restrict("name=a^", cond) == f"{cond}^name=a"
    assert restrict("name=x^ORname=y^ip_address=1", cond) == f"{cond}^name=x^ORname=y^ip_address=1"
    assert restrict("name=a^NQname=b^ORDERBYname", cond) == (
        f"{cond}^name=a^NQ{cond}^name=b^ORDERBYname"
    )
    assert restrict("name=a^^NQb", cond) == f"{cond}^name=a^^NQb"  # a caret in a value
    with pytest.raises(QueryError):
        restrict("ORname=x", cond)


def test_discovery_admin_reads_runs_and_cis_and_writes_schedules() -> None:
    from bridge.instance.auth import AuthError, Principal, authorize, authorize_table

    who = Principal(sys_id="u", user_name="d", roles=frozenset({"discovery_admin"}))
    for table in ("discovery_schedule", "discovery_status", "cmdb_ci"):
        authorize_table(who, table)
        authorize(who, table, "read")
    authorize(who, "discovery_schedule", "create", fields={"name": "x"})
    with pytest.raises(AuthError):
        authorize(who, "cmdb_ci", "create", fields={"name": "x"})
    with pytest.raises(AuthError):
        authorize_table(who, "discovery_credentials")
    mid = Principal(sys_id="m", user_name="mid", roles=frozenset({"mid_server"}))
    with pytest.raises(AuthError):
        authorize_table(mid, "cmdb_ci")
