"""Discovery in ServiceNow's ECC shapes: the engine of compatibility mode.

In ServiceNow-compatibility mode (``docs/compat-mode.md``) the MID is ``midbridge relay``:
it reads an output's ``<parameters>`` XML with its per-probe dialect
(``bridge/relay/dialect/*``) and answers with ONE input per output holding ServiceNow's
result XML (``<results probe_time result_code [error]><result>..</result><parameters/>``),
or ``<see_attachment/>`` with the XML attached when it is large. :class:`XmlDiscoveryEngine`
is :class:`~bridge.instance.discovery_engine.DiscoveryEngine` speaking that:

- **Outputs** carry ``<parameters>``: Shazzam ``targets`` and a ``port_probes``
  specification (one TCP probe a port, named by its classifier, and a UDP ``snmp`` probe
  for the SNMP tap); SSHCommand with the command in the ``name`` parameter and the host in
  the record's ``source``, ``port``, ``timeout`` and ``command_timeout_ms`` (ms); SNMP
  ``oid_spec_list`` (``walk iso.org.dod.internet.mgmt.mib-2.system`` and ``table ifTable
  ifDescr,ifPhysAddress``), ``port``, ``timeout`` (ms), ``retries``; RESTProbe
  ``rest_endpoint``, ``http_method``, ``http_timeout`` (ms). ``credential_id`` is sent as
  ServiceNow does; the relay drops it (the MID uses its own credentials).
- **Inputs** are read once the output is closed (ServiceNow's "ECC Queue - mark outputs
  processed" closes it when the input, or its attachment, is in): only the job's agent's,
  the last one, its attachment when the payload is ``<see_attachment/>``. The XML is
  turned into what ``bridge.instance.cmdb``'s parsers read (the same functions the broker
  path uses), so both paths build CIs the same way. A ``<results error="..">`` is the
  job's failure (the next classifier is tried, as for an output closed in ``error``).

What the XML does not carry: a RESTProbe ``<result>`` has no certificate, so a web server
found this way has no ``tls_subject``/``tls_not_after`` (docs/compat-mode.md); a Shazzam
``<result>`` lists live hosts only, so ``scanned`` counts the batch's other addresses
from its ``<totals addresses>``.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any
from xml.etree import ElementTree

from bridge.instance import cmdb
from bridge.instance.agents import agent_id
from bridge.instance.attachments import attachment_of
from bridge.instance.discovery_engine import (
    ECC,
    DiscoveryEngine,
    _Job,
    _Run,
)
from bridge.instance.discovery_plan import REST, SHAZZAM, SNMP, SSH, Attempt, Plan
from bridge.instance.query import escape
from bridge.instance.store import Record

SEE_ATTACHMENT = "<see_attachment/>"
# The SNMP classifier's specification in ServiceNow's oid_spec_list syntax.
SNMP_SPEC = "walk iso.org.dod.internet.mgmt.mib-2.system\ntable ifTable ifDescr,ifPhysAddress"
_SCALARS = {  # system group elements → the OIDs cmdb.parse_snmp reads
    "sysDescr": "1.3.6.1.2.1.1.1.0",
    "sysObjectID": "1.3.6.1.2.1.1.2.0",
    "sysName": "1.3.6.1.2.1.1.5.0",
}


def parameters_xml(params: Mapping[str, Any]) -> str:
    """``<parameters><parameter name value/>..</parameters>``; a value that is an Element
    goes nested (a port-probe specification)."""
    root = ElementTree.Element("parameters")
    for name, value in params.items():
        if value is None:
            continue
        node = ElementTree.SubElement(root, "parameter", {"name": name})
        if isinstance(value, ElementTree.Element):
            node.append(value)
        elif isinstance(value, bool):
            node.set("value", "true" if value else "false")
        else:
            node.set("value", str(value))
    return ElementTree.tostring(root, encoding="unicode")


def port_probes(plan: Plan) -> ElementTree.Element | None:
    """Shazzam's port-probe specification: a TCP probe a port (named by the classifier
    that port calls), and the UDP ``snmp`` probe when the schedule taps SNMP."""
    spec = ElementTree.Element("port_probes")
    tcp = (
        plan.ports
        if plan.ports is not None
        else sorted(plan.ssh_ports | plan.http_ports | plan.https_ports)
    )
    for port in tcp:
        name = (
            "ssh" if port in plan.ssh_ports
            else "https" if port in plan.https_ports
            else "http" if port in plan.http_ports
            else f"tcp_{port}"
        )  # fmt: skip
        ElementTree.SubElement(spec, "port_probe",
                               {"name": name, "protocol": "tcp", "ports": str(port)})  # fmt: skip
    if plan.snmp:
        ElementTree.SubElement(
            spec, "port_probe", {"name": "snmp", "protocol": "udp", "ports": str(plan.snmp_port)}
        )
    return spec if len(spec) else None


def parse_results(text: str) -> ElementTree.Element:
    """An input's ``<results>`` document; ``ValueError`` for what is not one (a DTD or an
    entity declaration is refused, never expanded)."""
    if "<!DOCTYPE" in text or "<!ENTITY" in text:
        raise ValueError("DTDs and entities are not accepted")
    try:
        root = ElementTree.fromstring(text)
    except ElementTree.ParseError as exc:
        raise ValueError(f"the payload does not parse: {exc}") from None
    if root.tag != "results":
        raise ValueError(f"the root is <{root.tag}>, not <results>")
    return root


def results_error(root: ElementTree.Element) -> str:
    """The failure a ``<results>`` reports ('' when it succeeded)."""
    error = root.get("error") or ""
    if error or root.get("result_code", "0") not in ("0", ""):
        return error or f"result_code {root.get('result_code')}"
    for result in root.findall("result"):
        node = result.find("error")
        if node is not None:
            message = node.findtext("message") or node.text or "error"
            kind = node.findtext("kind")
            return f"{kind}: {message}" if kind else message
    return ""


def shazzam_payload(root: ElementTree.Element) -> dict[str, Any]:
    """Shazzam's ``<host><scanner/>`` elements → the sweep payload the engine counts."""
    hosts: list[dict[str, Any]] = []
    totals: dict[str, Any] = {}
    for result in root.findall("result"):
        for node in result.findall("host"):
            host: dict[str, Any] = {"ip": node.get("ip"), "alive": node.get("alive") == "true"}
            opened: dict[int, dict[str, Any]] = {}
            for scanner in node.findall("scanner"):
                if scanner.get("result") != "open":
                    continue
                if (scanner.get("protocol") or "").upper() == "UDP":
                    host["snmp"] = {
                        key: scanner.findtext(tag)
                        for key, tag in (
                            ("sys_descr", "sysDescr"),
                            ("sys_name", "sysName"),
                            ("sys_object_id", "sysObjectID"),
                        )
                        if scanner.find(tag) is not None
                    }
                    continue
                try:
                    port = int(scanner.get("port") or "")
                except ValueError:
                    continue
                opened[port] = {"port": port, "service": scanner.get("service") or ""}
            host["open"] = [opened[p] for p in sorted(opened)]
            hosts.append(host)
        summary = result.find("totals")
        if summary is not None:
            for key, value in summary.attrib.items():
                totals[key] = int(value) if value.isdigit() else value
    return {"hosts": hosts, "totals": totals}


def ssh_payload(root: ElementTree.Element) -> dict[str, Any] | None:
    result = root.find("result")
    if result is None or result.find("stdout") is None:
        return None
    return {"stdout": result.findtext("stdout") or "", "stderr": result.findtext("stderr") or ""}


def snmp_payload(root: ElementTree.Element) -> dict[str, Any]:
    """The ``<snmp>`` MIB tree → one ``cmdb.parse_snmp`` result entry."""
    varbinds: list[dict[str, Any]] = []
    rows: list[dict[str, Any]] = []
    for result in root.findall("result"):
        for node in result.iter():
            oid = _SCALARS.get(node.tag)
            if oid is not None and node.get("instance") in (None, "", "0"):
                varbinds.append({"oid": oid, "value": node.text or ""})
            elif node.tag == "ifEntry":
                cell = node.find("ifPhysAddress")
                if cell is not None:
                    rows.append(
                        {
                            "index": node.get("instance"),
                            "values": {"ifPhysAddress": {"value": cell.text or ""}},
                        }
                    )
    return {"results": [{"varbinds": varbinds, "rows": rows}]}


def rest_payload(root: ElementTree.Element) -> dict[str, Any] | None:
    result = root.find("result")
    if result is None:
        return None
    try:
        status = int(result.get("status") or "")
    except ValueError:
        return None
    headers = [
        [h.get("name") or "", h.get("value") or ""] for h in result.findall("headers/header")
    ]
    body = result.find("body")
    return {
        "status": status,
        "headers": headers,
        "body": (body.text or "") if body is not None else "",
        "body_encoding": (body.get("encoding") or "text") if body is not None else "text",
    }


class XmlDiscoveryEngine(DiscoveryEngine):
    """Discovery runs whose outputs and inputs are ServiceNow's XML (compatibility mode)."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._parsed: dict[str, list[dict[str, Any]]] = {}  # classify output → its answer

    # --- outputs -----------------------------------------------------------------------

    def _output(
        self, run: _Run, sys_id: str, agent: str, topic: str, name: str, source: str,
        payload: Mapping[str, Any],
    ) -> dict[str, Any]:  # fmt: skip
        row = super()._output(run, sys_id, agent, topic, name, source, payload)
        row["payload"] = parameters_xml(self._parameters(run.plan, topic, payload))
        if topic == REST:
            row["source"] = str(payload.get("url") or source)
        return row

    def _parameters(self, plan: Plan, topic: str, payload: Mapping[str, Any]) -> dict[str, Any]:
        settings = self.settings
        credential = payload.get("credential_id")
        if topic == SHAZZAM:
            return {"targets": payload["targets"], "port_probes": port_probes(plan)}
        if topic == SSH:
            return {
                "name": cmdb.SSH_COMMAND,
                "port": payload["port"],
                "timeout": round(settings.ssh_connect_timeout * 1000),
                "command_timeout_ms": round(settings.ssh_command_timeout * 1000),
                "credential_id": credential,
            }
        if topic == SNMP:
            return {
                "oid_spec_list": SNMP_SPEC,
                "port": payload["port"],
                "timeout": round(settings.snmp_timeout * 1000),
                "retries": payload.get("retries", 1),
                "credential_id": credential,
            }
        return {
            "rest_endpoint": payload["url"],
            "http_method": "GET",
            "http_timeout": round(settings.http_timeout * 1000),
        }

    # --- inputs ------------------------------------------------------------------------

    async def _handle(self, change: Any) -> None:
        if change.op == "insert":
            return  # one input per output: read when the output is closed
        await super()._handle(change)

    async def _document(self, job: _Job, output_id: str) -> tuple[ElementTree.Element | None, str]:
        """The job's answer as a ``<results>`` element, or (None, why not)."""
        rows = await self.store.query(
            ECC, f"queue=input^response_to={escape(output_id)}^ORDERBYsys_created_on"
        )
        usable = []
        for row in rows:
            if row.get("agent") != agent_id(job.agent):
                self._refuse(job, row, f"from {row.get('agent')!r}, not the job's agent")
                continue
            usable.append(row)
        if not usable:
            return None, "no answer from the job's agent"
        row = usable[-1]
        text = str(row.get("payload") or "")
        if text.strip() == SEE_ATTACHMENT:
            content = await attachment_of(self.store, ECC, str(row["sys_id"]))
            if content is None:
                return None, "the answer's attachment is missing"
            text = content.decode("utf-8", errors="replace")
        try:
            return parse_results(text), ""
        except ValueError as exc:
            self._refuse(job, row, str(exc))
            return None, str(exc)

    async def _scan_done(self, job: _Job, output: Record) -> None:
        root, why = await self._document(job, str(output["sys_id"]))
        error = results_error(root) if root is not None else why
        if root is not None and not error:
            payload = shazzam_payload(root)
            before = job.run.counts["scanned"]
            self._scan_chunk(job, {**output, "response_to": output["sys_id"],
                                   "payload": payload})  # fmt: skip
            addresses = payload["totals"].get("addresses")
            listed = job.run.counts["scanned"] - before
            if isinstance(addresses, int) and addresses > listed:
                job.run.counts["scanned"] += addresses - listed  # the batch's dead addresses
        elif output.get("state") != "error":
            output = {**output, "state": "error", "error_string": error}
        await super()._scan_done(job, output)

    async def _classify_done(self, job: _Job, output: Record) -> None:
        sys_id = str(output["sys_id"])
        if output.get("state") == "processed":
            root, why = await self._document(job, sys_id)
            error = results_error(root) if root is not None else why
            answer = self._payload(job.attempt, root) if root is not None and not error else None
            if answer is None:
                output = {
                    **output,
                    "state": "error",
                    "error_string": error or "the answer does not tell what the host is",
                }
            else:
                self._parsed[sys_id] = [answer]
        try:
            await super()._classify_done(job, output)
        finally:
            self._parsed.pop(sys_id, None)

    @staticmethod
    def _payload(attempt: Attempt | None, root: ElementTree.Element) -> dict[str, Any] | None:
        if attempt is None:
            return None
        if attempt.kind == "ssh":
            return ssh_payload(root)
        if attempt.kind == "snmp":
            return snmp_payload(root)
        return rest_payload(root)

    async def _answer(self, job: _Job, output_id: str) -> list[dict[str, Any]]:
        return self._parsed.get(output_id, [])


__all__ = [
    "SNMP_SPEC",
    "XmlDiscoveryEngine",
    "parameters_xml",
    "parse_results",
    "port_probes",
    "rest_payload",
    "results_error",
    "shazzam_payload",
    "snmp_payload",
    "ssh_payload",
]
