"""ServiceNow payloads through the relay: output parameters in, one result XML out.

Each fixture (``tests/fixtures/servicenow/<probe>/``) is an output as a ServiceNow
instance writes it. The output goes into the built-in instance through its Table API;
the relay claims it over HTTP and publishes it on a real broker, where a scripted bridge
checks the JSON parameters it receives and answers with the fixture's result chunks; the
relay writes one input record, read back over HTTP and parsed with an XML parser.

A real bridge runs a real Shazzam sweep of loopback at the end; large results go through
the Attachment API (a stand-in for ServiceNow's on the built-in instance).
"""

from __future__ import annotations

import asyncio
import logging
import socket
from collections.abc import AsyncIterator
from contextlib import AsyncExitStack, asynccontextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from xml.etree import ElementTree

import orjson
import pytest

from bridge.agent.bridge import Bridge
from bridge.relay.service import Relay
from probes import REGISTRY
from tests.brokers import BrokerAddress
from tests.harness import make_config
from tests.test_relay import FakeBridge, Snow, broker_config, new_prefix, relay_settings, snow

FIXTURES = Path(__file__).parent / "fixtures" / "servicenow"
Element = ElementTree.Element


@dataclass
class Case:
    name: str
    xml: str
    record: dict[str, Any]
    bridge_params: dict[str, Any]
    chunks: list[Any]

    @classmethod
    def load(cls, name: str) -> Case:
        case = orjson.loads((FIXTURES / name / "case.json").read_bytes())
        xml = (FIXTURES / name / "output.xml").read_text(encoding="utf-8")
        return cls(name, xml, case["record"], case["bridge_params"], case["chunks"])

    def parameters(self) -> list[tuple[str | None, str | None]]:
        """The output's parameters as ServiceNow wrote them (what the answer must echo)."""
        root = ElementTree.fromstring(self.xml)
        return [(p.get("name"), p.get("value")) for p in root.iterfind("parameter")]


@dataclass
class Rig:
    sn: Snow
    relay: Relay
    bridge: FakeBridge
    agent: str


@asynccontextmanager
async def rig(broker: BrokerAddress, agent: str, tmp_path: Path, **over: Any) -> AsyncIterator[Rig]:
    prefix = new_prefix()
    async with AsyncExitStack() as stack:
        sn = await stack.enter_async_context(snow(tmp_path, agent))
        bridge = await stack.enter_async_context(FakeBridge(broker, prefix, agent))
        settings = relay_settings(sn.inst.url, agent, prefix, state_dir=tmp_path / "relay", **over)
        relay = await stack.enter_async_context(Relay(settings, broker_config(broker)))
        yield Rig(sn, relay, bridge, agent)


async def run_case(r: Rig, case: Case) -> tuple[dict[str, Any], dict[str, Any], Element]:
    """(the job the bridge got, the input record, its parsed payload)."""
    sys_id = await r.sn.output(r.agent, payload=case.xml, **case.record)
    job = await r.bridge.job(sys_id)
    await r.bridge.answer(job, case.chunks)
    [done] = await r.sn.wait_done([sys_id])
    assert done["state"] == "processed"
    [answer] = await r.sn.inputs(sys_id)
    return job, answer, ElementTree.fromstring(answer["payload"])


def check_envelope(root: Element, answer: dict[str, Any], case: Case, agent: str) -> None:
    """What every answer has: the <results> attributes, the record's fields, the echo."""
    assert root.tag == "results"
    assert root.get("result_code") == "0"
    assert root.get("error") is None
    assert root.get("probe_time") == "12.5"
    echoed = [(p.get("name"), p.get("value")) for p in root.iterfind("parameters/parameter")]
    assert echoed == case.parameters()
    assert [c.tag for c in root][-1] == "parameters"
    assert answer["queue"] == "input"
    assert answer["state"] == "ready"
    assert answer["agent"] == f"mid.server.{agent}"
    for key in ("topic", "name", "source", "agent_correlator", "priority"):
        assert answer[key] == str(case.record[key]), key
    assert answer["error_string"] == ""
    assert answer["sequence"] in ("", None)


def attrs(node: Element | None) -> dict[str, str]:
    assert node is not None
    return dict(node.attrib)


async def test_sshcommand_fixture(
    broker: BrokerAddress, unique_agent: str, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    case = Case.load("ssh")
    caplog.set_level(logging.DEBUG, logger="midbridge.relay.dialect")
    async with rig(broker, unique_agent, tmp_path) as r:
        job, answer, root = await run_case(r, case)
    assert job["payload"] == case.bridge_params
    # ServiceNow's other parameters: accepted, not passed on, named in a debug log.
    [dropped] = [rec.getMessage() for rec in caplog.records if "not used" in rec.getMessage()]
    for name in ("channel_timeout_ms", "use_snc_ssh", "path_override", "credential_id"):
        assert name in dropped
    assert job["topic"] == "SSHCommand"
    check_envelope(root, answer, case, unique_agent)
    [result] = root.findall("result")
    assert attrs(result) == {"command": "uname -a && echo '<done>'"}
    assert [c.tag for c in result] == ["stdout", "stderr"]
    assert result.findtext("stdout") == "Linux web7 6.1.0 #1 SMP x86_64 GNU/Linux\n<done>\n"
    stderr = result.find("stderr")
    assert stderr is not None
    assert stderr.text is None
    assert len(stderr) == 0  # <stderr/>


async def test_shazzam_fixture(broker: BrokerAddress, unique_agent: str, tmp_path: Path) -> None:
    case = Case.load("shazzam")
    async with rig(broker, unique_agent, tmp_path) as r:
        job, answer, root = await run_case(r, case)
    assert job["payload"] == case.bridge_params
    check_envelope(root, answer, case, unique_agent)
    [result] = root.findall("result")
    hosts = result.findall("host")
    assert [attrs(h) for h in hosts] == [
        {"ip": "10.30.0.1", "alive": "true"},
        {"ip": "10.30.0.3", "alive": "true"},
    ]  # 10.30.0.2 did not answer: not listed
    first = [attrs(s) for s in hosts[0].findall("scanner")]
    assert first == [
        {"name": "ssh", "portprobe": "ssh", "port": "22", "protocol": "TCP", "result": "open",
         "service": "ssh"},
        {"name": "http", "portprobe": "http", "port": "80", "protocol": "TCP",
         "result": "closed"},
        {"name": "http", "portprobe": "http", "port": "443", "protocol": "TCP",
         "result": "filtered"},
        {"name": "snmp", "portprobe": "snmp", "port": "161", "protocol": "UDP", "result": "open",
         "service": "snmp"},
    ]  # fmt: skip
    ssh, _, _, tap = hosts[0].findall("scanner")
    assert ssh.findtext("banner") == "SSH-2.0-OpenSSH_9.2"
    assert tap.findtext("sysDescr") == "Linux gw1"
    assert tap.findtext("sysObjectID") == "1.3.6.1.4.1.8072.3.2.10"
    assert tap.findtext("sysName") == "gw1"
    second = [(s.get("port"), s.get("result"), s.get("service")) for s in hosts[1]]
    assert second == [("22", "closed", None), ("80", "open", "http"), ("443", "open", "https")]
    totals = attrs(result.find("totals"))
    assert totals["addresses"] == "3"
    assert totals["alive"] == "2"
    assert totals["snmp_answered"] == "1"


async def test_snmp_fixture(broker: BrokerAddress, unique_agent: str, tmp_path: Path) -> None:
    case = Case.load("snmp")
    async with rig(broker, unique_agent, tmp_path) as r:
        job, answer, root = await run_case(r, case)
    assert job["payload"] == case.bridge_params
    check_envelope(root, answer, case, unique_agent)
    [result] = root.findall("result")
    mib2 = result.find("snmp/iso/org/dod/internet/mgmt/mib-2")
    assert mib2 is not None
    system = mib2.find("system")
    assert system is not None
    assert [(c.tag, c.get("type"), c.text) for c in system] == [
        ("sysDescr", "SnmpOctetString", "Cisco IOS <C2960>"),
        ("sysObjectID", "SnmpObjectIdentifier", "1.3.6.1.4.1.9.1.1208"),
        ("sysUpTime", "SnmpTimeTicks", "123456"),
        ("sysName", "SnmpOctetString", "sw-core-1"),  # the walk went on in the next chunk
    ]
    assert all(c.get("instance") is None for c in system)  # a scalar's .0 is dropped
    entries = mib2.findall("entityMIB/entityMIBObjects/entityPhysical/entPhysicalTable/"
                           "entPhysicalEntry")  # fmt: skip
    assert [e.get("instance") for e in entries] == ["1001"]  # (=0): the chassis only
    assert [(c.tag, c.get("type"), c.text) for c in entries[0]] == [
        ("entPhysicalDescr", "SnmpOctetString", "Chassis"),
        ("entPhysicalContainedIn", "SnmpInteger", "0"),
        ("entPhysicalClass", "SnmpInteger", "3"),
    ]
    [interface] = mib2.findall("interfaces/ifTable/ifEntry")
    assert interface.get("instance") == "1"
    assert interface.findtext("ifDescr") == "Gi0/1"
    assert interface.find("ifType").get("type") == "SnmpInteger"  # type: ignore[union-attr]


async def test_restprobe_fixture(broker: BrokerAddress, unique_agent: str, tmp_path: Path) -> None:
    case = Case.load("rest")
    async with rig(broker, unique_agent, tmp_path) as r:
        job, answer, root = await run_case(r, case)
    assert job["payload"] == case.bridge_params
    assert job["priority"] == 1
    check_envelope(root, answer, case, unique_agent)
    [result] = root.findall("result")
    assert attrs(result) == {
        "status": "200", "reason": "OK", "url": "https://api.example.test/v1/items?limit=2",
        "method": "GET", "content_type": "application/json",
    }  # fmt: skip
    assert [attrs(h) for h in result.iterfind("headers/header")] == [
        {"name": "Content-Type", "value": "application/json"},
        {"name": "X-Total", "value": "2"},
    ]
    body = result.find("body")
    assert attrs(body) == {"encoding": "text", "truncated": "false"}
    assert orjson.loads(body.text or "") == {"items": [1, 2]}  # type: ignore[union-attr]


async def test_heartbeat_fixture(broker: BrokerAddress, unique_agent: str, tmp_path: Path) -> None:
    case = Case.load("heartbeat")
    async with rig(broker, unique_agent, tmp_path) as r:
        job, answer, root = await run_case(r, case)
    assert job["payload"] == {}  # the bridge's heartbeat takes no parameter
    check_envelope(root, answer, case, unique_agent)
    [result] = root.findall("result")
    assert attrs(result.find("heartbeat")) == {
        "status": "Up", "name": "dc1", "agent": "mid.server.dc1", "host": "bridge-host",
        "version": "0.1.0", "validated": "true",
    }  # fmt: skip
    assert result.findtext("stats/processed") == "9"
    assert result.findtext("stats/uptime_s") == "12.5"


async def test_bad_servicenow_parameters_are_answered_without_the_bridge(
    broker: BrokerAddress, unique_agent: str, tmp_path: Path
) -> None:
    async with rig(broker, unique_agent, tmp_path) as r:
        bad_timeout = await r.sn.output(
            r.agent, "SSHCommand",
            '<parameters><parameter name="command_timeout_ms" value="soon"/></parameters>',
            name="ls", source="10.0.0.1",
        )  # fmt: skip
        unknown_name = await r.sn.output(
            r.agent, "SNMP",
            '<parameters><parameter name="oid_spec_list" value="walk frobnicateMIB"/>'
            "</parameters>", source="10.0.0.1",
        )  # fmt: skip
        vlan = await r.sn.output(
            r.agent, "SNMP",
            '<parameters><parameter name="oid_spec_list" value="walk 2.1.17"/>'
            '<parameter name="index" value="12"/></parameters>', source="10.0.0.1",
        )  # fmt: skip
        done = await r.sn.wait_done([bad_timeout, unknown_name, vlan])
        assert [row["state"] for row in done] == ["error"] * 3
        fields = []
        for sys_id in (bad_timeout, unknown_name, vlan):
            [answer] = await r.sn.inputs(sys_id)
            root = ElementTree.fromstring(answer["payload"])
            assert root.get("result_code") == "1"
            assert root.findtext("result/error/kind") == "bad_parameter"
            assert answer["error_string"] == root.get("error")
            fields.append(root.findtext("result/error/field"))
        assert fields == ["command_timeout_ms", "oid_spec_list", "index"]
        assert r.bridge.jobs == []  # none of them reached the bridge


async def test_large_results_go_as_an_attachment_and_oversized_ones_as_an_error(
    broker: BrokerAddress, unique_agent: str, tmp_path: Path
) -> None:
    case = Case.load("ssh")
    properties = {"glide.soapprocessor.large_field_patch_max": "2000",
                  "mid.eccq.max_payload_size": "100000"}  # fmt: skip
    async with rig(broker, unique_agent, tmp_path, properties=properties) as r:
        big = await r.sn.output(r.agent, payload=case.xml, **case.record)
        job = await r.bridge.job(big)
        stdout = "line of output\n" * 400  # 6,000 bytes: over 2,000, under 100,000
        await r.bridge.answer(job, [{**case.chunks[0], "stdout": stdout}])
        huge = await r.sn.output(r.agent, payload=case.xml, **case.record)
        job = await r.bridge.job(huge)
        await r.bridge.answer(job, [{**case.chunks[0], "stdout": "x" * 200_000}])
        done = await r.sn.wait_done([big, huge])
        assert [row["state"] for row in done] == ["processed", "error"]

        [answer] = await r.sn.inputs(big)
        assert answer["payload"] == "<see_attachment/>"
        [(file_name, content_type, content)] = await r.sn.attached(answer["sys_id"])
        assert (file_name, content_type) == ("payload.xml", "application/xml")
        root = ElementTree.fromstring(content)
        assert root.findtext("result/stdout") == stdout
        assert r.relay.stats["attached"] == 1

        [answer] = await r.sn.inputs(huge)
        root = ElementTree.fromstring(answer["payload"])
        assert root.findtext("result/error/kind") == "payload_too_large"
        assert "mid.eccq.max_payload_size (100000)" in (root.get("error") or "")
        assert await r.sn.attached(answer["sys_id"]) == []


async def _listener() -> tuple[asyncio.Server, int]:
    async def talk(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        writer.close()

    server = await asyncio.start_server(talk, "127.0.0.1", 0)
    return server, server.sockets[0].getsockname()[1]


def _closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@pytest.mark.slow
async def test_a_real_shazzam_sweep_through_the_relay_and_a_real_bridge(
    broker: BrokerAddress, unique_agent: str, tmp_path: Path
) -> None:
    prefix = new_prefix()
    server, open_port = await _listener()
    closed = _closed_port()
    spec = (f'<port_probe name="web" protocol="tcp" ports="{open_port}"/>'
            f'<port_probe name="other" protocol="tcp" ports="{closed}"/>')  # fmt: skip
    payload = (
        '<parameters><parameter name="ranges" value="127.0.0.1"/>'
        f'<parameter name="port_probes">{spec}</parameter></parameters>'
    )
    async with server, AsyncExitStack() as stack:
        sn = await stack.enter_async_context(snow(tmp_path, unique_agent))
        config = make_config(broker.host, broker.port, unique_agent, tmp_path / "bridge")
        config.bridge.topic_prefix = prefix
        await stack.enter_async_context(Bridge(config, REGISTRY))
        settings = relay_settings(sn.inst.url, unique_agent, prefix, state_dir=tmp_path / "r")
        await stack.enter_async_context(Relay(settings, broker_config(broker)))
        sys_id = await sn.output(unique_agent, "Shazzam", payload, source="127.0.0.1 scan")
        [done] = await sn.wait_done([sys_id], timeout=30)
        assert done["state"] == "processed", done["error_string"]
        [answer] = await sn.inputs(sys_id)
    root = ElementTree.fromstring(answer["payload"])
    assert root.get("result_code") == "0"
    assert float(root.get("probe_time") or "0") > 0
    [host] = root.findall("result/host")
    assert attrs(host) == {"ip": "127.0.0.1", "alive": "true"}
    scanners = {s.get("name"): s for s in host.findall("scanner")}
    assert attrs(scanners["web"])["result"] == "open"
    assert attrs(scanners["web"])["port"] == str(open_port)
    assert attrs(scanners["other"])["result"] == "closed"
    assert root.find("result/totals").get("addresses") == "1"  # type: ignore[union-attr]
