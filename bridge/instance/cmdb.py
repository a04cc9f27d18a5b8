"""The CMDB side of discovery: what a classify answer says, and which CI it is.

Three steps, each a plain function of its input (``docs/discovery.md``):

- **Classification parsing.** :func:`parse_ssh`, :func:`parse_snmp`, :func:`parse_http` turn
  the result payloads of the bridge's ``SSHCommand``, ``SNMP`` and ``RESTProbe`` probes into
  an :class:`Observation`: a CI class, a name, the identifiers (serial number, MAC
  addresses, name + IP) and the attributes seen. ``None`` when the answer says too little
  to make a CI of (an SSH login whose output has no ``uname``, an SNMP answer without
  system group, an HTTP answer without a status).
- **Identification** (:func:`identify`): serial number, then MAC addresses, then name +
  IP address, each looked up among the CIs *of the observed class* (so one kernel
  answering for a server over SSH and for a "device" over SNMP, as on a loopback lab, stays
  two CIs); a generic ``cmdb_ci_ip_address`` CI at the same address is taken over (and
  reclassified) by a richer class. An ``cmdb_ci_ip_address`` observation (every classifier
  failed) matches any CI holding that address and only refreshes it.
- **Upsert** (:func:`upsert`): a match is updated (non-empty values win, ``first_discovered``
  stays, ``last_discovered`` moves); no match inserts a CI.

CIs live in ``cmdb_ci``'s storage; ``sys_class_name`` is the class. :data:`CI_CLASSES` is
the built-in class tree, seeded as ``sys_db_object`` records that extend ``cmdb_ci``
(``bridge.instance.schema``), so each class is a table: ``cmdb_ci_linux_server`` reads
(and writes) the records of that class and the classes below it. :func:`class_view`
tells them, from the live schema when given it (classes users added included).
"""

from __future__ import annotations

import html
import ipaddress
import re
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from bridge.instance.query import escape
from bridge.instance.schema import CI_CLASSES, builtin_catalog
from bridge.instance.store import Record, Store, Table
from bridge.wire.records import now_text

CI_TABLE = "cmdb_ci"
LINUX_SERVER = "cmdb_ci_linux_server"
NETGEAR = "cmdb_ci_netgear"
WEB_SERVER = "cmdb_ci_web_server"
IP_ADDRESS = "cmdb_ci_ip_address"
DISCOVERY_SOURCE = "midbridge"

# The SSH classifier's one shell line: sections behind markers, every read allowed to fail.
SSH_MARK = "@@midbridge:"
SSH_SECTIONS = ("uname", "os-release", "hostname", "serial", "mac", "end")
SSH_COMMAND = "; ".join(
    [
        f"echo '{SSH_MARK}uname'",
        "uname -a",
        f"echo '{SSH_MARK}os-release'",
        "cat /etc/os-release 2>/dev/null",
        f"echo '{SSH_MARK}hostname'",
        "(hostname 2>/dev/null || cat /proc/sys/kernel/hostname)",
        f"echo '{SSH_MARK}serial'",
        "cat /sys/class/dmi/id/product_serial 2>/dev/null",
        f"echo '{SSH_MARK}mac'",
        "grep -H . /sys/class/net/*/address 2>/dev/null",
        f"echo '{SSH_MARK}end'",
    ]
)

# What SNMP classification asks: the system group's names, and the interfaces' MACs.
SNMP_OIDS = "get sysDescr.0 sysObjectID.0 sysName.0\ntable ifTable ifDescr,ifPhysAddress"
_SYS_DESCR, _SYS_OBJECT_ID, _SYS_NAME = (
    "1.3.6.1.2.1.1.1.0",
    "1.3.6.1.2.1.1.2.0",
    "1.3.6.1.2.1.1.5.0",
)

_MAC = re.compile(r"^[0-9a-f]{2}(:[0-9a-f]{2}){5}$")
_TITLE = re.compile(r"<title[^>]*>(.*?)</title\s*>", re.IGNORECASE | re.DOTALL)
_SPACES = re.compile(r"\s+")
# Serial numbers that firmware writes when it has none: never an identifier.
_NO_SERIAL = frozenset(
    {
        "", "0", "none", "n/a", "na", "not specified", "not applicable", "default string",
        "to be filled by o.e.m.", "system serial number", "0123456789", "unknown",
    }
)  # fmt: skip
MAX_TEXT = 1000  # a stored attribute is cut to this many characters


def class_and_subclasses(name: str, schema: Mapping[str, Table] | None = None) -> tuple[str, ...]:
    """``name`` and every class below it (empty if it is not a CI class): from ``schema``
    (``Store.schema``) when given, else the built-in tree (:data:`CI_CLASSES`)."""
    tables = builtin_catalog().tables if schema is None else schema
    table = tables.get(name)
    if table is None or table.physical != CI_TABLE:
        return ()
    return table.classes


def class_view(table: str, schema: Mapping[str, Table] | None = None) -> tuple[str, ...] | None:
    """For a CI class name other than ``cmdb_ci`` itself: the classes its Table API view
    shows (the class and its subclasses). None for anything else."""
    if table == CI_TABLE:
        return None
    return class_and_subclasses(table, schema) or None


@dataclass(slots=True)
class Observation:
    """One host as one classifier saw it: what to identify a CI by, and what to store."""

    sys_class_name: str
    ip_address: str
    name: str
    serial_number: str = ""
    macs: tuple[str, ...] = ()
    attributes: dict[str, str] = field(default_factory=dict)  # other cmdb_ci fields

    def fields(self) -> dict[str, str]:
        """The ``cmdb_ci`` fields this observation sets (empty values left out)."""
        values = {
            "name": self.name,
            "sys_class_name": self.sys_class_name,
            "ip_address": self.ip_address,
            "serial_number": self.serial_number,
            "mac_address": ",".join(self.macs),
            **self.attributes,
        }
        return {k: _cut(v) for k, v in values.items() if v}


def _cut(value: str) -> str:
    return value if len(value) <= MAX_TEXT else value[: MAX_TEXT - 3] + "..."


def _text(value: Any) -> str:
    if value is None:
        return ""
    return value.strip() if isinstance(value, str) else str(value)


def normalize_mac(value: Any) -> str | None:
    """``AA-BB-CC-DD-EE-FF`` / ``aa:bb:..`` → ``aa:bb:cc:dd:ee:ff``; None if not a usable MAC
    (malformed, all zeros as on ``lo``, or broadcast)."""
    text = _text(value).lower().replace("-", ":")
    if not _MAC.match(text) or text in ("00:00:00:00:00:00", "ff:ff:ff:ff:ff:ff"):
        return None
    return text


def _macs(values: Iterable[Any]) -> tuple[str, ...]:
    found: list[str] = []
    for value in values:
        mac = normalize_mac(value)
        if mac is not None and mac not in found:
            found.append(mac)
    return tuple(sorted(found))


def _serial(value: Any) -> str:
    text = _text(value)
    return "" if text.lower() in _NO_SERIAL else text[:255]


def ports_text(ports: Iterable[int]) -> str:
    return ",".join(str(p) for p in sorted(set(ports)))


def host_port(ip: str, port: int) -> str:
    """``10.0.0.7:443`` or ``[2001:db8::7]:443``."""
    try:
        v6 = ipaddress.ip_address(ip).version == 6
    except ValueError:
        v6 = False
    return f"[{ip}]:{port}" if v6 else f"{ip}:{port}"


# --- classification parsing ------------------------------------------------------------------


def ssh_sections(stdout: str) -> dict[str, str]:
    """The marked sections of the SSH classifier's output (``uname`` → its text, ...)."""
    sections: dict[str, list[str]] = {}
    current: list[str] | None = None
    for line in stdout.splitlines():
        if line.startswith(SSH_MARK):
            name = line[len(SSH_MARK) :].strip()
            current = sections.setdefault(name, []) if name in SSH_SECTIONS else None
            continue
        if current is not None:
            current.append(line)
    return {name: "\n".join(lines).strip() for name, lines in sections.items()}


def parse_os_release(text: str) -> dict[str, str]:
    """``/etc/os-release`` (``KEY=value`` lines, values maybe quoted) as a dict."""
    values: dict[str, str] = {}
    for line in text.splitlines():
        key, sep, value = line.strip().partition("=")
        if not sep or not key or key.startswith("#"):
            continue
        value = value.strip()
        if len(value) >= 2 and value[0] == value[-1] and value[0] in "'\"":
            value = value[1:-1]
        values[key.strip()] = value
    return values


def parse_ssh(ip: str, payload: Mapping[str, Any], ports: Sequence[int] = ()) -> Observation | None:
    """An ``SSHCommand`` result of :data:`SSH_COMMAND`: a Linux server (``uname`` says
    ``Linux``), else a generic IP address CI with what was learnt; None without ``uname``."""
    stdout = payload.get("stdout")
    if not isinstance(stdout, str):
        return None
    sections = ssh_sections(stdout)
    uname = sections.get("uname", "").splitlines()
    if not uname or not uname[0].strip():
        return None
    words = uname[0].split()
    release = parse_os_release(sections.get("os-release", ""))
    hostname = (sections.get("hostname", "").splitlines() or [""])[0].strip()
    macs = []
    for line in sections.get("mac", "").splitlines():
        # grep -H: "/sys/class/net/eth0/address:02:42:ac:11:00:02"
        path, sep, mac = line.partition("address:")
        if sep and not path.endswith("/lo/"):
            macs.append(mac)
    linux = words[0] == "Linux"
    attributes = {
        "host_name": hostname,
        "os": release.get("PRETTY_NAME") or release.get("NAME") or words[0],
        "os_version": release.get("VERSION_ID", ""),
        "kernel": words[2] if len(words) > 2 else "",
        "ports": ports_text(ports),
    }
    return Observation(
        sys_class_name=LINUX_SERVER if linux else IP_ADDRESS,
        ip_address=ip,
        name=(hostname or ip) if linux else ip,
        serial_number=_serial(sections.get("serial", "")),
        macs=_macs(macs),
        attributes=attributes,
    )


def parse_snmp(
    ip: str, payloads: Sequence[Mapping[str, Any]], ports: Sequence[int] = ()
) -> Observation | None:
    """``SNMP`` result chunks of :data:`SNMP_OIDS`: network gear named by ``sysName``;
    None without ``sysDescr`` and ``sysObjectID``."""
    scalars: dict[str, str] = {}
    macs: list[Any] = []
    for payload in payloads:
        results = payload.get("results")
        if not isinstance(results, list):
            continue
        for entry in results:
            if not isinstance(entry, dict):
                continue
            for varbind in entry.get("varbinds") or ():
                if isinstance(varbind, dict) and isinstance(varbind.get("oid"), str):
                    scalars[varbind["oid"].lstrip(".")] = _text(varbind.get("value"))
            for row in entry.get("rows") or ():
                values = row.get("values") if isinstance(row, dict) else None
                cell = values.get("ifPhysAddress") if isinstance(values, dict) else None
                if isinstance(cell, dict):
                    macs.append(cell.get("value"))
    descr, object_id = scalars.get(_SYS_DESCR, ""), scalars.get(_SYS_OBJECT_ID, "")
    if not descr and not object_id:
        return None
    sys_name = scalars.get(_SYS_NAME, "")
    return Observation(
        sys_class_name=NETGEAR,
        ip_address=ip,
        name=sys_name or ip,
        macs=_macs(macs),
        attributes={
            "host_name": sys_name,
            "sys_descr": descr,
            "sys_object_id": object_id,
            "ports": ports_text(ports),
        },
    )


def _header(headers: Any, name: str) -> str:
    if isinstance(headers, list):
        for item in headers:
            if isinstance(item, list | tuple) and len(item) == 2 and str(item[0]).lower() == name:
                return _text(item[1])
    return ""


def html_title(body: str) -> str:
    match = _TITLE.search(body)
    if match is None:
        return ""
    return _SPACES.sub(" ", html.unescape(match.group(1))).strip()[:255]


def parse_http(
    ip: str, port: int, payload: Mapping[str, Any], ports: Sequence[int] = ()
) -> Observation | None:
    """A ``RESTProbe`` answer to ``GET /``: a web server named ``ip:port``, with its
    ``Server`` header, page title and (HTTPS) certificate; None without a status."""
    status = payload.get("status")
    if not isinstance(status, int) or isinstance(status, bool):
        return None
    body = payload.get("body")
    text = isinstance(body, str) and payload.get("body_encoding") == "text"
    title = html_title(body) if text and isinstance(body, str) else ""
    cert: Mapping[str, Any] = {}
    tls = payload.get("tls")
    if isinstance(tls, dict) and isinstance(tls.get("peer_certificate"), dict):
        cert = tls["peer_certificate"]
    return Observation(
        sys_class_name=WEB_SERVER,
        ip_address=ip,
        name=host_port(ip, port),
        attributes={
            "http_server": _header(payload.get("headers"), "server"),
            "http_title": title,
            "tls_subject": _text(cert.get("subject")),
            "tls_not_after": _text(cert.get("not_after")),
            "ports": ports_text(ports),
        },
    )


def ip_only(ip: str, ports: Sequence[int] = ()) -> Observation:
    """A host that had a classifier's port open but that no classifier could identify."""
    return Observation(IP_ADDRESS, ip, ip, attributes={"ports": ports_text(ports)})


# --- identification and upsert ---------------------------------------------------------------


async def _first(store: Store, query: str) -> Record | None:
    rows = await store.query(CI_TABLE, query + "^ORDERBYsys_created_on", limit=1)
    return rows[0] if rows else None


async def identify(store: Store, obs: Observation) -> tuple[Record | None, str]:
    """The CI this observation is, and the rule that found it (``serial_number``,
    ``mac_address``, ``name_ip``, ``ip_address``, or ``""`` with None: a new CI)."""
    cls = f"sys_class_name={escape(obs.sys_class_name)}"
    ip = escape(obs.ip_address)
    if obs.sys_class_name == IP_ADDRESS:
        found = await _first(store, f"{cls}^ip_address={ip}")
        found = found or await _first(store, f"ip_address={ip}")
        return found, "ip_address" if found else ""
    if obs.serial_number:
        found = await _first(store, f"{cls}^serial_number={escape(obs.serial_number)}")
        if found is not None:
            return found, "serial_number"
    for mac in obs.macs:
        for row in await store.query(CI_TABLE, f"{cls}^mac_addressLIKE{escape(mac)}"):
            if mac in str(row.get("mac_address") or "").split(","):
                return row, "mac_address"
    found = await _first(store, f"{cls}^name={escape(obs.name)}^ip_address={ip}")
    if found is not None:
        return found, "name_ip"
    found = await _first(store, f"sys_class_name={IP_ADDRESS}^ip_address={ip}")
    return found, "ip_address" if found else ""


async def upsert(
    store: Store, obs: Observation, *, status_sys_id: str = "", now: str | None = None
) -> tuple[Record, bool]:
    """Identify the CI and write it: (the CI as stored, True if it was created)."""
    now = now or now_text()
    found, _rule = await identify(store, obs)
    fields: dict[str, Any] = obs.fields()
    fields.update(last_discovered=now, discovery_source=DISCOVERY_SOURCE)
    if status_sys_id:
        fields["discovery_status"] = status_sys_id
    if found is None:
        fields["first_discovered"] = now
        return await store.insert(CI_TABLE, fields), True
    if obs.sys_class_name == IP_ADDRESS:
        # Nothing identified the host this time: refresh what it is known as, no more.
        fields = {k: v for k, v in fields.items() if k not in ("name", "sys_class_name")}
    if not found.get("first_discovered"):
        fields["first_discovered"] = now
    updated = await store.update(CI_TABLE, found["sys_id"], fields)
    if updated is None:  # deleted meanwhile: it is new again
        fields["first_discovered"] = now
        return await store.insert(CI_TABLE, {**obs.fields(), **fields}), True
    return updated, False


__all__ = [
    "CI_CLASSES",
    "CI_TABLE",
    "IP_ADDRESS",
    "LINUX_SERVER",
    "NETGEAR",
    "SNMP_OIDS",
    "SSH_COMMAND",
    "WEB_SERVER",
    "Observation",
    "class_and_subclasses",
    "class_view",
    "identify",
    "ip_only",
    "normalize_mac",
    "parse_http",
    "parse_os_release",
    "parse_snmp",
    "parse_ssh",
    "upsert",
]
