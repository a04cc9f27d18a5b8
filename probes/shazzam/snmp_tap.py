"""Shazzam's SNMP tap: is there an SNMP agent at ``host`` that answers one of these
communities?"""

from __future__ import annotations

import asyncio
import ipaddress
from collections.abc import Sequence
from typing import Any, Literal

from gufo.snmp import SnmpError
from gufo.snmp.aio.client import SnmpSession

from bridge.wire.credentials import Credential
from probes.snmp import values as sv
from probes.snmp.credentials import COMMUNITY
from probes.snmp.values import SYS_DESCR, SYS_NAME, SYS_OBJECT_ID
from probes.snmp.versions import GUFO_VERSION, SESSION_TIMEOUT

TAP_OIDS = (SYS_DESCR, SYS_OBJECT_ID, SYS_NAME)


async def snmp_tap(
    host: str,
    communities: Sequence[str],
    *,
    port: int = 161,
    timeout: float = 1.0,
    taps: int = 2,
    interval: float = 0.2,
    version: Literal["1", "2c"] = "2c",
) -> dict[str, Any] | None:
    """Is there an SNMP agent at ``host:port`` that answers one of ``communities``?

    Like ServiceNow's SNMP port probe: a GET of sysDescr.0, sysObjectID.0 and sysName.0
    with every community at once, sent again (a second *tap*, on a fresh socket) every
    ``interval`` seconds while nothing answered, ``taps`` times in all; the first answer
    within ``timeout`` seconds wins. A wrong community, a closed port and no host at all
    look the same: ``None``. ``host`` must be an IP literal.

    Returns ``{"host", "port", "version", "community_index", "sys_descr",
    "sys_object_id", "sys_name", "rtt_ms"}``: the index into ``communities`` that was
    answered (never the community itself); a field is ``None`` when the agent does not
    have that object.
    """
    if not communities or taps < 1:
        return None
    address = str(ipaddress.ip_address(host))
    loop = asyncio.get_running_loop()
    started = loop.time()
    deadline = started + timeout

    async def ask(index: int, community: str) -> tuple[int, dict[str, Any]] | None:
        session = SnmpSession(
            addr=address,
            port=port,
            community=community,
            version=GUFO_VERSION[version],
            timeout=SESSION_TIMEOUT,
        )
        try:
            return index, await session.get_many(list(TAP_OIDS))
        except (SnmpError, OSError):
            return None  # something answered, but not an agent we can read

    pending: set[asyncio.Task[tuple[int, dict[str, Any]] | None]] = set()
    try:
        for tap in range(taps):
            for index, community in enumerate(communities):
                pending.add(asyncio.create_task(ask(index, community)))
            until = deadline if tap == taps - 1 else min(deadline, loop.time() + interval)
            while pending and (left := until - loop.time()) > 0:
                done, pending = await asyncio.wait(
                    pending, timeout=left, return_when=asyncio.FIRST_COMPLETED
                )
                answers = [task.result() for task in done]
                for answer in answers:
                    if answer is not None:
                        index, values = answer
                        return {
                            "host": address,
                            "port": port,
                            "version": version,
                            "community_index": index,
                            "sys_descr": sv.text_value(values.get(SYS_DESCR)),
                            "sys_object_id": sv.text_value(values.get(SYS_OBJECT_ID)),
                            "sys_name": sv.text_value(values.get(SYS_NAME)),
                            "rtt_ms": round((loop.time() - started) * 1000.0, 3),
                        }
            if loop.time() >= deadline:
                break
        return None
    finally:
        for task in pending:
            task.cancel()
        if pending:
            await asyncio.gather(*pending, return_exceptions=True)


async def snmp_tap_credentials(
    host: str, credentials: Sequence[Credential], **options: Any
) -> dict[str, Any] | None:
    """:func:`snmp_tap` with ``snmp_community`` credentials: adds ``credential_id``."""
    usable = [c for c in credentials if c.type == COMMUNITY and c.fields.get("community")]
    answer = await snmp_tap(host, [c.fields["community"] for c in usable], **options)
    if answer is not None:
        answer["credential_id"] = usable[answer["community_index"]].id
    return answer
