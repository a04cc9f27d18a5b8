"""The MID's ``ecc_agent`` record, kept by the relay as a MID Server keeps its own.

ServiceNow's MID Server record (``ecc_agent``; the ``MIDServer`` script include reads it:
name, host name, IP, status Up/Down, URL, version, validated) is written by the MID
itself, which also "refresh[es] its start and stop times" there (MID Server parameters,
``instance.date.format``). The relay:

- at start finds the record by ``name`` or creates it, then writes ``status`` (Up),
  ``version``, ``host_name``, ``ip_address``, ``url``, ``started`` and ``last_refreshed``;
- every ``refresh_interval`` writes ``last_refreshed`` and the status it computes (Up,
  Paused, or Down when the bridge's retained status record says the bridge is down);
- at a clean stop writes ``status`` Down and ``stopped``;
- never writes ``validated``: the instance's administrator validates a MID.

The record's fields are learnt from what the instance answers: a field the record does
not have is not sent (a real instance ignores unknown fields; the built-in instance
refuses them). Where the built-in instance names a field otherwise (``host``,
``last_heartbeat``, ``started_at``), that name is used when the ServiceNow one is absent.
"""

from __future__ import annotations

import asyncio
import logging
import socket
from typing import Any
from urllib.parse import urlsplit

from bridge import __version__
from bridge.relay.http import InstanceClient, Row
from bridge.relay.settings import RelayError
from bridge.wire.records import now_text

TABLE = "ecc_agent"
# ServiceNow's field → the names it may have, in order of preference
ALIASES: dict[str, tuple[str, ...]] = {
    "status": ("status",),
    "version": ("version",),
    "host_name": ("host_name", "host"),
    "ip_address": ("ip_address",),
    "url": ("url",),
    "started": ("started", "started_at"),
    "stopped": ("stopped",),
    "last_refreshed": ("last_refreshed", "last_heartbeat"),
}


def local_address(instance_url: str) -> str:
    """The local IP address a connection to the instance leaves from ("" if unknown).
    A UDP ``connect`` picks the route without sending anything."""
    parts = urlsplit(instance_url)
    host = parts.hostname or ""
    port = parts.port or (443 if parts.scheme == "https" else 80)
    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_DGRAM)
        family, _, _, _, address = infos[0]
        with socket.socket(family, socket.SOCK_DGRAM) as probe:
            probe.connect(address)
            return str(probe.getsockname()[0])
    except (OSError, IndexError):
        return ""


class Registration:
    def __init__(
        self,
        client: InstanceClient,
        name: str,
        *,
        instance_url: str,
        logger: logging.Logger | None = None,
    ) -> None:
        self.client = client
        self.name = name
        self.instance_url = instance_url
        self._log = logger or logging.getLogger("midbridge.relay")
        self.sys_id = ""
        self.fields: set[str] = set()
        self.record: Row = {}
        self.status = ""

    @property
    def validated(self) -> str:
        return str(self.record.get("validated", ""))

    def _body(self, values: dict[str, Any]) -> dict[str, Any]:
        body: dict[str, Any] = {}
        for field, value in values.items():
            name = next((n for n in ALIASES.get(field, (field,)) if n in self.fields), None)
            if name is None:
                self._log.debug("ecc_agent has no field for %s: not written", field)
            else:
                body[name] = value
        return body

    def _learn(self, row: Row) -> None:
        if row:
            self.record = row
            self.fields |= set(row)
            self.sys_id = row.get("sys_id", self.sys_id)

    async def register(self, status: str) -> None:
        """Find or create the record; write what the MID reports about itself."""
        query = f"name={self.name}^ORDERBYsys_created_on"  # the oldest, if several
        found = await self.client.query(TABLE, query, limit=1)
        if found:
            self._learn(found[0])
        else:
            try:
                # Created without a status (Down by default): it turns Up below, together
                # with host name, IP and the rest, never before them.
                created = await self.client.insert(TABLE, {"name": self.name})
            except RelayError as exc:
                if exc.status != 409:
                    raise
                # Another relay of this MID created it meanwhile (a unique name).
                created = next(iter(await self.client.query(TABLE, query, limit=1)), {})
            else:
                self._log.info("created ecc_agent %s (%s)", self.name, created.get("sys_id"))
            self._learn(created)
        if not self.sys_id:
            raise RelayError("the instance answered no ecc_agent sys_id", field="ecc_agent")
        address = await asyncio.to_thread(local_address, self.instance_url)
        now = now_text()
        await self._write({
            "status": status, "version": f"midbridge {__version__}",
            "host_name": socket.gethostname(), "ip_address": address,
            "url": self.instance_url, "started": now, "last_refreshed": now,
        })  # fmt: skip
        self.status = status

    async def _write(self, values: dict[str, Any]) -> None:
        body = self._body(values)
        if body:
            self._learn(await self.client.update(TABLE, self.sys_id, body))

    async def refresh(self, status: str) -> None:
        """``last_refreshed`` now, and ``status`` when the record says another."""
        values: dict[str, Any] = {"last_refreshed": now_text()}
        if status != self.record.get("status") or status != self.status:
            values["status"] = status
        await self._write(values)
        self.status = status

    async def down(self) -> None:
        await self._write({"status": "Down", "stopped": now_text()})
        self.status = "Down"

    async def properties(self) -> dict[str, str]:
        """The instance's MID Server properties for this MID (``ecc_agent_property``:
        this MID's, then those of every MID); {} when the table cannot be read."""
        if not self.sys_id:
            return {}
        try:
            rows = await self.client.query(
                "ecc_agent_property",
                f"ecc_agent={self.sys_id}^ORecc_agentISEMPTY",
                limit=500,
                fields="name,value,ecc_agent",
            )
        except RelayError as exc:
            self._log.debug("MID Server properties not read (%s)", exc)
            return {}
        found: dict[str, str] = {}
        for row in sorted(rows, key=lambda r: bool(r.get("ecc_agent"))):  # this MID's last
            if row.get("name"):
                found[row["name"]] = row.get("value", "")
        return found
