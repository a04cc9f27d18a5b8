"""Discovery through the relay in ServiceNow-compatibility mode finds the CIs the broker
path finds (issue 15 item 4; docs/compat-mode.md, "Discovery in ServiceNow's shapes").

Both runs scan the demo's sample network (``bridge.demo.targets``, in this process):

- **the broker path**: the built-in instance in its normal mode with its connector, a
  bridge, the demo's discovery loop (``bridge.demo.loop.discover``), as ``midbridge demo``;
- **the relay path**: real processes, ``midbridge instance --servicenow-compat``,
  ``midbridge run`` (the bridge: the demo's secrets in its local credentials file) and
  ``midbridge relay`` (the MID), one broker; the same schedule; the instance's outputs are
  ServiceNow ``<parameters>`` XML and each is answered by ONE input of result XML.

The CIs must be the same, field by field, except the certificate fields a RESTProbe
result cannot carry (documented).
"""

from __future__ import annotations

import asyncio
import io
import secrets
import socket
import time
from collections.abc import AsyncIterator
from contextlib import AsyncExitStack, asynccontextmanager
from pathlib import Path
from typing import Any
from xml.etree import ElementTree

import aiohttp
import orjson

from bridge.agent.bridge import Bridge
from bridge.console import make_console
from bridge.demo import loop
from bridge.demo.targets import Ports, RunningTargets, TargetSettings, demo_targets
from bridge.instance import cmdb, discovery
from bridge.instance.connector import Connector, ConnectorSettings, install, keys_for
from bridge.instance.discovery_xml import (
    parameters_xml,
    parse_results,
    results_error,
    shazzam_payload,
    snmp_payload,
)
from bridge.instance.server import Instance, InstanceConfig
from bridge.wire.broker import BrokerConfig
from probes import REGISTRY
from tests.brokers import BrokerAddress
from tests.harness import BridgeProcess, make_config
from tests.test_connector import ADMIN_PASSWORD
from tests.test_relay_e2e import relay_process, served_instance

RANGES = "127.0.0.10-127.0.0.34"
COMPARED = (
    "sys_class_name", "name", "ip_address", "host_name", "os", "os_version", "kernel",
    "serial_number", "mac_address", "ports", "sys_descr", "sys_object_id", "http_server",
    "http_title",
)  # fmt: skip
NOT_IN_XML = ("tls_subject", "tls_not_after")  # a RESTProbe <result> has no certificate


def free_port(kind: socket.SocketKind = socket.SOCK_STREAM) -> int:
    with socket.socket(socket.AF_INET, kind) as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


def ci_key(ci: dict[str, Any]) -> tuple[str, str]:
    return str(ci.get("sys_class_name")), str(ci.get("name"))


def compared(cis: list[dict[str, Any]]) -> dict[tuple[str, str], dict[str, str]]:
    return {ci_key(ci): {f: str(ci.get(f) or "") for f in COMPARED} for ci in cis}


def plan_for(settings: TargetSettings, ports: Ports) -> loop.DiscoveryPlan:
    return loop.DiscoveryPlan(
        ranges=RANGES, ports=ports, ssh_user=settings.ssh_user,
        ssh_password=settings.ssh_password, snmp_community=settings.snmp_community,
    )  # fmt: skip


@asynccontextmanager
async def targets() -> AsyncIterator[tuple[TargetSettings, RunningTargets]]:
    settings = TargetSettings(
        ssh_password="pw-" + secrets.token_hex(8),
        snmp_community="c-" + secrets.token_hex(6),
        ports=Ports(ssh=free_port(), http=free_port(), https=free_port(),
                    snmp=free_port(socket.SOCK_DGRAM)),
    )  # fmt: skip
    async with demo_targets(settings) as running:
        yield settings, running


async def broker_path(
    broker: BrokerAddress, tmp: Path, settings: TargetSettings, running: RunningTargets
) -> list[dict[str, Any]]:
    """midbridge demo's loop: the instance's connector, a validated bridge, JSON jobs."""
    prefix = "p" + secrets.token_hex(6)
    agent = "broker-" + secrets.token_hex(4)
    db = tmp / "broker-instance" / "instance.db"
    db.parent.mkdir()
    inst = Instance(InstanceConfig(db=db, admin_password=ADMIN_PASSWORD))
    keys = keys_for(db)
    install(inst, keys)
    discovery.install(inst)
    broker_cfg = BrokerConfig(host=broker.host, port=broker.port)
    config = make_config(broker.host, broker.port, agent, tmp / "broker-bridge",
                         security={"require_validation": True})  # fmt: skip
    config.bridge.topic_prefix = prefix
    async with AsyncExitStack() as stack:
        await stack.enter_async_context(inst)
        await stack.enter_async_context(
            Connector(inst.store, broker_cfg, keys=keys,
                      settings=ConnectorSettings(prefix=prefix, client_id=f"inst-{prefix}"))
        )  # fmt: skip
        await stack.enter_async_context(Bridge(config, REGISTRY))
        http = await stack.enter_async_context(aiohttp.ClientSession())
        admin = loop.Admin(http, inst.url, "admin", ADMIN_PASSWORD)
        out = io.StringIO()
        code = await loop.discover(
            admin, make_console(out, width=200), agent=agent,
            plan=plan_for(settings, running.ports),
        )  # fmt: skip
        assert code == 0, out.getvalue()
        return await inst.store.query("cmdb_ci", "")


def credentials_file(path: Path, settings: TargetSettings) -> Path:
    path.write_text(
        f'[[credential]]\nid = "demo-ssh"\ntype = "ssh_password"\nuser = "{settings.ssh_user}"\n'
        f'password = "{settings.ssh_password}"\n\n'
        f'[[credential]]\nid = "demo-snmp"\ntype = "snmp_community"\n'
        f'community = "{settings.snmp_community}"\n',
        encoding="utf-8",
    )
    path.chmod(0o600)
    return path


async def relay_path(
    broker: BrokerAddress, tmp: Path, settings: TargetSettings, running: RunningTargets
) -> tuple[list[dict[str, Any]], list[dict[str, Any]], dict[str, Any]]:
    """The compatibility-mode instance, a bridge and a relay as processes: (CIs, the run's
    ECC records, the run's status)."""
    prefix = "r" + secrets.token_hex(6)
    agent = "relay-" + secrets.token_hex(4)
    tmp = tmp / "relay"
    tmp.mkdir()
    config = make_config(broker.host, broker.port, agent, tmp / "bridge")
    config.bridge.topic_prefix = prefix
    config.bridge.credentials_file = credentials_file(tmp / "credentials.toml", settings)
    # ServiceNow leaves certificate checks to the MID's own policy (MID Server certificate
    # check policies), not to a RESTProbe parameter: here the bridge's RESTProbe setting.
    config.probes.settings = {"RESTProbe": {"verify": False}}
    bridge = BridgeProcess(config, tmp / "bridge.log")
    plan = plan_for(settings, running.ports)
    async with AsyncExitStack() as stack:
        url, _proc = await stack.enter_async_context(served_instance(tmp, agent))
        http = await stack.enter_async_context(aiohttp.ClientSession())
        admin = loop.Admin(http, url, "admin", ADMIN_PASSWORD)
        await asyncio.to_thread(bridge.start)
        stack.callback(bridge.stop)
        relay = relay_process(url, agent, broker, prefix, tmp)
        stack.callback(relay.stop)
        await admin.wait_until(
            "the MID registers Up",
            lambda: admin.query("ecc_agent", f"name={agent}^status=Up"),
            30.0,
        )
        for name, kind, secret in (
            (loop.SSH_CREDENTIAL, "ssh_password",
             {"user": settings.ssh_user, "password": settings.ssh_password}),
            (loop.SNMP_CREDENTIAL, "snmp_community", {"community": settings.snmp_community}),
        ):  # fmt: skip
            await admin.upsert("discovery_credentials", name, {
                "type": kind, "order": 10, "active": True, "secret": json_text(secret),
            })  # fmt: skip
        schedule = await admin.upsert(
            "discovery_schedule", loop.SCHEDULE_NAME, loop.schedule_fields(agent, plan)
        )
        _status, run = await admin.call(
            "POST", f"/api/midbridge/discovery/{schedule['sys_id']}/run", {}
        )
        deadline = time.monotonic() + 90
        while True:
            final = await admin.get("discovery_status", run["sys_id"])
            if final.get("state") in ("Completed", "Error", "Cancelled"):
                break
            assert time.monotonic() < deadline, (final, relay.text()[-3000:])
            await asyncio.sleep(0.2)
        assert final["state"] == "Completed", (final.get("log"), relay.text()[-3000:])
        cis = await admin.query("cmdb_ci", f"discovery_status={run['sys_id']}")
        outputs = await admin.query(
            "ecc_queue", f"queue=output^agent_correlator={run['sys_id']}", limit=10_000
        )
        inputs = await admin.query(
            "ecc_queue", "queue=input^response_toIN" + ",".join(r["sys_id"] for r in outputs),
            limit=10_000,
        )  # fmt: skip
        return cis, outputs + inputs, final


def json_text(value: Any) -> str:
    return orjson.dumps(value).decode()


async def test_discovery_through_the_relay_finds_the_cis_of_the_broker_path(
    broker: BrokerAddress, tmp_path: Path
) -> None:
    async with targets() as (settings, running):
        expected = await broker_path(broker, tmp_path, settings, running)
        got, ecc, status = await relay_path(broker, tmp_path, settings, running)

    # The broker path found the whole sample network: servers, gear, web servers, and
    # legacy01 (its SSH refuses the password) as an IP address.
    classes = sorted({str(ci["sys_class_name"]) for ci in expected})
    assert classes == ["cmdb_ci_ip_address", "cmdb_ci_linux_server", "cmdb_ci_netgear",
                       "cmdb_ci_web_server"], expected  # fmt: skip
    assert len(expected) >= 9, expected
    # The same CIs, field by field.
    assert compared(got) == compared(expected)
    # Documented difference: the certificate of an HTTPS site (the broker path has it).
    https = [ci for ci in expected if str(ci.get("name")).endswith(f":{running.ports.https}")]
    assert https
    assert all(ci.get("tls_subject") and ci.get("tls_not_after") for ci in https)
    assert not any(ci.get(f) for ci in got for f in NOT_IN_XML)

    # The run spoke ServiceNow's shapes only: XML parameters out, one result XML input each.
    outputs = [r for r in ecc if r["queue"] == "output"]
    inputs = [r for r in ecc if r["queue"] == "input"]
    assert {r["topic"] for r in outputs} == {"Shazzam", "SSHCommand", "SNMP", "RESTProbe"}
    answered: dict[str, int] = {}
    for record in inputs:
        answered[record["response_to"]] = answered.get(record["response_to"], 0) + 1
    assert all(answered.get(r["sys_id"]) == 1 for r in outputs), answered
    for record in outputs:
        root = ElementTree.fromstring(record["payload"])
        assert root.tag == "parameters"
        names = {p.get("name") for p in root}
        topic = record["topic"]
        if topic == "SSHCommand":
            assert {"name", "port", "command_timeout_ms"} <= names
            assert record["source"].startswith("127.0.0.")
        elif topic == "SNMP":
            assert "oid_spec_list" in names
        elif topic == "RESTProbe":
            assert "rest_endpoint" in names
        else:
            assert {"targets", "port_probes"} <= names
    for record in inputs:
        assert record["payload"] == "<see_attachment/>" or record["payload"].startswith(
            "<results"
        ), record["payload"][:200]
    assert int(status["scanned"]) == 25  # every address of the range, dead ones included
    assert int(status["refused"]) == 0


def test_xml_results_are_read_as_the_broker_paths_payloads() -> None:
    """The parsers on ServiceNow-shaped documents (as the relay writes them)."""
    params = parameters_xml({"targets": "127.0.0.1", "skip": None, "flag": True})
    assert params == (
        '<parameters><parameter name="targets" value="127.0.0.1" />'
        '<parameter name="flag" value="true" /></parameters>'
    )
    scan = parse_results(
        '<results probe_time="1" result_code="0"><result>'
        '<host ip="127.0.0.11" alive="true">'
        '<scanner name="ssh" portprobe="ssh" port="2222" protocol="TCP" result="open"/>'
        '<scanner name="http" portprobe="http" port="8080" protocol="TCP" result="closed"/>'
        '<scanner name="snmp" portprobe="snmp" port="1161" protocol="UDP" result="open">'
        "<sysName>db01</sysName></scanner></host>"
        '<totals addresses="4" alive="1"/></result><parameters/></results>'
    )
    assert results_error(scan) == ""
    assert shazzam_payload(scan) == {
        "hosts": [{"ip": "127.0.0.11", "alive": True, "snmp": {"sys_name": "db01"},
                   "open": [{"port": 2222, "service": ""}]}],
        "totals": {"addresses": 4, "alive": 1},
    }  # fmt: skip
    snmp = parse_results(
        '<results probe_time="1" result_code="0"><result><snmp><iso><org><dod><internet>'
        "<mgmt><mib-2><system><sysDescr>box</sysDescr><sysName>sw</sysName>"
        "<sysObjectID>1.3.6.1.4.1.8072</sysObjectID></system><interfaces><ifTable>"
        '<ifEntry instance="2"><ifDescr>p1</ifDescr><ifPhysAddress>02:00:00:00:00:02'
        "</ifPhysAddress></ifEntry></ifTable></interfaces></mib-2></mgmt></internet></dod>"
        "</org></iso></snmp></result></results>"
    )
    payload = snmp_payload(snmp)
    seen = cmdb.parse_snmp("127.0.0.22", [payload], [1161])
    assert seen is not None
    assert (seen.name, seen.macs, seen.attributes["sys_descr"]) == (
        "sw", ("02:00:00:00:00:02",), "box",
    )  # fmt: skip
    failed = parse_results(
        '<results probe_time="0" result_code="1" error="probe_error: refused"><result/></results>'
    )
    assert results_error(failed) == "probe_error: refused"
    for bad in ("<x/>", "<results", '<!DOCTYPE r [<!ENTITY a "b">]><results/>'):
        try:
            parse_results(bad)
        except ValueError:
            continue
        raise AssertionError(f"{bad!r} was accepted")
