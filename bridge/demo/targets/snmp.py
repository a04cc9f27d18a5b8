"""The demo's network gear: an SNMP v2c agent over UDP (GET, GETNEXT, GETBULK over a fixed MIB)."""

from __future__ import annotations

import asyncio
import bisect
import hmac
import time
from collections.abc import Awaitable, Callable
from typing import Any, cast

from pyasn1.codec.ber import decoder as ber_decoder
from pyasn1.codec.ber import encoder as ber_encoder
from pyasn1.error import PyAsn1Error
from pysnmp.proto import api as snmp_api

from bridge.demo.targets.network import SnmpDevice

_V2C: Any = snmp_api.PROTOCOL_MODULES[snmp_api.SNMP_VERSION_2C]
_SYSTEM = (1, 3, 6, 1, 2, 1, 1)
_SYS_UPTIME = (*_SYSTEM, 3, 0)
_IF_NUMBER = (1, 3, 6, 1, 2, 1, 2, 1, 0)
_IF_ENTRY = (1, 3, 6, 1, 2, 1, 2, 2, 1)
MAX_BULK_VARBINDS = 200  # in one GETBULK answer
MAX_VARBINDS = 128  # in one request


def _oid(text: str) -> tuple[int, ...]:
    return tuple(int(arc) for arc in text.strip(".").split("."))


def _mac_bytes(mac: str) -> bytes:
    return bytes.fromhex(mac.replace(":", "")) if mac else b""


class SnmpAgent(asyncio.DatagramProtocol):
    """An SNMP v2c agent for one device: GET, GETNEXT, GETBULK over a fixed MIB."""

    def __init__(self, device: SnmpDevice, community: str) -> None:
        self.device = device
        self.community = community.encode()
        self.started = time.monotonic()
        self.transport: asyncio.DatagramTransport | None = None
        self.answered = 0
        values: dict[tuple[int, ...], Any] = {
            (*_SYSTEM, 1, 0): _V2C.OctetString(device.sys_descr.encode()),
            (*_SYSTEM, 2, 0): _V2C.ObjectIdentifier(_oid(device.sys_object_id)),
            _SYS_UPTIME: _V2C.TimeTicks(0),  # computed when asked
            (*_SYSTEM, 4, 0): _V2C.OctetString(b"noc@demo.lan"),
            (*_SYSTEM, 5, 0): _V2C.OctetString(device.sys_name.encode()),
            (*_SYSTEM, 6, 0): _V2C.OctetString(device.location.encode()),
            (*_SYSTEM, 7, 0): _V2C.Integer(6),  # datalink + internet
            _IF_NUMBER: _V2C.Integer(len(device.interfaces)),
        }
        for index, (descr, mac, speed) in enumerate(device.interfaces, start=1):
            loopback = not mac
            columns: dict[int, Any] = {
                1: _V2C.Integer(index),  # ifIndex
                2: _V2C.OctetString(descr.encode()),  # ifDescr
                3: _V2C.Integer(24 if loopback else 6),  # ifType: softwareLoopback / ethernet
                4: _V2C.Integer(65536 if loopback else 1500),  # ifMtu
                5: _V2C.Gauge32(min(speed, 2**32 - 1)),  # ifSpeed
                6: _V2C.OctetString(_mac_bytes(mac)),  # ifPhysAddress
                7: _V2C.Integer(1),  # ifAdminStatus up
                8: _V2C.Integer(1),  # ifOperStatus up
                10: _V2C.Counter32(1000 * index + 7),  # ifInOctets
                16: _V2C.Counter32(900 * index + 3),  # ifOutOctets
            }
            for column, value in columns.items():
                values[(*_IF_ENTRY, column, index)] = value
        self.values = values
        self.oids = sorted(values)

    # lookups ---------------------------------------------------------------------------

    def _value(self, oid: tuple[int, ...]) -> Any:
        if oid == _SYS_UPTIME:
            return _V2C.TimeTicks(int((time.monotonic() - self.started) * 100) % 2**32)
        return self.values[oid]

    def get(self, oid: tuple[int, ...]) -> tuple[tuple[int, ...], Any]:
        if oid in self.values:
            return oid, self._value(oid)
        parent = oid[:-1]
        known = any(o[: len(parent)] == parent for o in self.oids) if parent else False
        return oid, _V2C.NoSuchInstance("") if known else _V2C.NoSuchObject("")

    def next(self, oid: tuple[int, ...]) -> tuple[tuple[int, ...], Any]:
        at = bisect.bisect_right(self.oids, oid)
        if at >= len(self.oids):
            return oid, _V2C.EndOfMibView("")
        found = self.oids[at]
        return found, self._value(found)

    def answer(self, data: bytes) -> bytes | None:
        """The response to one datagram, or None (not v2c, another community, garbage)."""
        try:
            if int(snmp_api.decodeMessageVersion(data)) != snmp_api.SNMP_VERSION_2C:
                return None
            request, _rest = ber_decoder.decode(data, asn1Spec=_V2C.Message())
        except (PyAsn1Error, ValueError, TypeError):
            return None
        community = bytes(_V2C.apiMessage.get_community(request))
        if not hmac.compare_digest(community, self.community):
            return None
        pdu = _V2C.apiMessage.get_pdu(request)
        oids = [tuple(oid) for oid, _ in _V2C.apiPDU.get_varbinds(pdu)]
        if len(oids) > MAX_VARBINDS:
            return None
        if pdu.isSameTypeWith(_V2C.GetRequestPDU()):
            varbinds = [self.get(oid) for oid in oids]
        elif pdu.isSameTypeWith(_V2C.GetNextRequestPDU()):
            varbinds = [self.next(oid) for oid in oids]
        elif pdu.isSameTypeWith(_V2C.GetBulkRequestPDU()):
            varbinds = self._bulk(
                oids,
                int(_V2C.apiBulkPDU.get_non_repeaters(pdu)),
                int(_V2C.apiBulkPDU.get_max_repetitions(pdu)),
            )
        else:
            return None  # SET and the rest: a read-only demo device stays silent
        response = _V2C.apiMessage.get_response(request)
        response_pdu = _V2C.apiMessage.get_pdu(response)
        _V2C.apiPDU.set_varbinds(
            response_pdu, [(_V2C.ObjectIdentifier(oid), value) for oid, value in varbinds]
        )
        encoded: bytes = ber_encoder.encode(response)
        return encoded

    def _bulk(
        self, oids: list[tuple[int, ...]], non_repeaters: int, max_repetitions: int
    ) -> list[tuple[tuple[int, ...], Any]]:
        non_repeaters = max(0, min(non_repeaters, len(oids)))
        varbinds = [self.next(oid) for oid in oids[:non_repeaters]]
        cursors = oids[non_repeaters:]
        for _ in range(max(0, max_repetitions)):
            if not cursors or len(varbinds) + len(cursors) > MAX_BULK_VARBINDS:
                break
            row = [self.next(oid) for oid in cursors]
            varbinds += row
            if all(isinstance(v, type(_V2C.EndOfMibView(""))) for _, v in row):
                break
            cursors = [oid for oid, _ in row]
        return varbinds

    # asyncio ---------------------------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.DatagramTransport, transport)

    def datagram_received(self, data: bytes, addr: tuple[str | Any, int]) -> None:
        answer = self.answer(data)
        if answer is not None and self.transport is not None:
            self.answered += 1
            self.transport.sendto(answer, addr)

    def error_received(self, exc: Exception) -> None:
        pass  # an ICMP error for an earlier answer: nothing to do


async def start_snmp(
    device: SnmpDevice, address: str, port: int, *, community: str
) -> Callable[[], Awaitable[None]]:
    loop = asyncio.get_running_loop()
    transport, _protocol = await loop.create_datagram_endpoint(
        lambda: SnmpAgent(device, community), local_addr=(address, port)
    )

    async def stop() -> None:
        transport.close()

    return stop
