"""The MIB names the SNMP dialect knows: ``iso.org.dod.internet`` down to MIB-2's groups,
tables and columns that discovery reads (RFC 1213, 2863, 2790, 4188, 6933). A ``+``
marks a subtree whose objects are not named here.

Used both ways: names in an ``oid_spec_list`` become numeric OIDs for the bridge, and
the OIDs in its results become the nested elements ServiceNow's SNMP results use
(``<iso><org><dod><internet><mgmt><mib-2><system><sysDescr ..>``). A name outside this
map must be given as a numeric OID; a result OID outside it keeps its numbers (an
``<oid oid="..">`` element under the deepest known node).
"""

from __future__ import annotations

_TREE = """
iso 1
 org 3
  dod 6
   internet 1
    directory 1 +
    mgmt 2
     mib-2 1
      system 1
       sysDescr 1
       sysObjectID 2
       sysUpTime 3
       sysContact 4
       sysName 5
       sysLocation 6
       sysServices 7
       sysORLastChange 8
       sysORTable 9
        sysOREntry 1
         sysORIndex 1
         sysORID 2
         sysORDescr 3
         sysORUpTime 4
      interfaces 2
       ifNumber 1
       ifTable 2
        ifEntry 1
         ifIndex 1
         ifDescr 2
         ifType 3
         ifMtu 4
         ifSpeed 5
         ifPhysAddress 6
         ifAdminStatus 7
         ifOperStatus 8
         ifLastChange 9
         ifInOctets 10
         ifInUcastPkts 11
         ifInNUcastPkts 12
         ifInDiscards 13
         ifInErrors 14
         ifInUnknownProtos 15
         ifOutOctets 16
         ifOutUcastPkts 17
         ifOutNUcastPkts 18
         ifOutDiscards 19
         ifOutErrors 20
         ifOutQLen 21
         ifSpecific 22
      at 3
       atTable 1
        atEntry 1
         atIfIndex 1
         atPhysAddress 2
         atNetAddress 3
      ip 4
       ipForwarding 1
       ipDefaultTTL 2
       ipAddrTable 20
        ipAddrEntry 1
         ipAdEntAddr 1
         ipAdEntIfIndex 2
         ipAdEntNetMask 3
         ipAdEntBcastAddr 4
         ipAdEntReasmMaxSize 5
       ipRouteTable 21
        ipRouteEntry 1
         ipRouteDest 1
         ipRouteIfIndex 2
         ipRouteMetric1 3
         ipRouteMetric2 4
         ipRouteMetric3 5
         ipRouteMetric4 6
         ipRouteNextHop 7
         ipRouteType 8
         ipRouteProto 9
         ipRouteAge 10
         ipRouteMask 11
         ipRouteMetric5 12
         ipRouteInfo 13
       ipNetToMediaTable 22
        ipNetToMediaEntry 1
         ipNetToMediaIfIndex 1
         ipNetToMediaPhysAddress 2
         ipNetToMediaNetAddress 3
         ipNetToMediaType 4
      icmp 5 +
      tcp 6 +
      udp 7 +
      transmission 10 +
      snmp 11 +
      dot1dBridge 17
       dot1dBase 1
        dot1dBaseBridgeAddress 1
        dot1dBaseNumPorts 2
        dot1dBaseType 3
        dot1dBasePortTable 4
         dot1dBasePortEntry 1
          dot1dBasePort 1
          dot1dBasePortIfIndex 2
       dot1dTp 4
        dot1dTpFdbTable 3
         dot1dTpFdbEntry 1
          dot1dTpFdbAddress 1
          dot1dTpFdbPort 2
          dot1dTpFdbStatus 3
      host 25
       hrSystem 1
        hrSystemUptime 1
        hrSystemDate 2
        hrSystemNumUsers 5
        hrSystemProcesses 6
        hrSystemMaxProcesses 7
       hrStorage 2
        hrMemorySize 2
        hrStorageTable 3
         hrStorageEntry 1
          hrStorageIndex 1
          hrStorageType 2
          hrStorageDescr 3
          hrStorageAllocationUnits 4
          hrStorageSize 5
          hrStorageUsed 6
          hrStorageAllocationFailures 7
       hrDevice 3
        hrDeviceTable 2
         hrDeviceEntry 1
          hrDeviceIndex 1
          hrDeviceType 2
          hrDeviceDescr 3
          hrDeviceID 4
          hrDeviceStatus 5
          hrDeviceErrors 6
        hrProcessorTable 3
         hrProcessorEntry 1
          hrProcessorFrwID 1
          hrProcessorLoad 2
       hrSWRun 4
        hrSWOSIndex 1
        hrSWRunTable 2
         hrSWRunEntry 1
          hrSWRunIndex 1
          hrSWRunName 2
          hrSWRunID 3
          hrSWRunPath 4
          hrSWRunParameters 5
          hrSWRunType 6
          hrSWRunStatus 7
       hrSWInstalled 6
        hrSWInstalledTable 3
         hrSWInstalledEntry 1
          hrSWInstalledIndex 1
          hrSWInstalledName 2
          hrSWInstalledID 3
          hrSWInstalledType 4
          hrSWInstalledDate 5
      ifMIB 31
       ifMIBObjects 1
        ifXTable 1
         ifXEntry 1
          ifName 1
          ifInMulticastPkts 2
          ifInBroadcastPkts 3
          ifOutMulticastPkts 4
          ifOutBroadcastPkts 5
          ifHCInOctets 6
          ifHCInUcastPkts 7
          ifHCInMulticastPkts 8
          ifHCInBroadcastPkts 9
          ifHCOutOctets 10
          ifHCOutUcastPkts 11
          ifHCOutMulticastPkts 12
          ifHCOutBroadcastPkts 13
          ifLinkUpDownTrapEnable 14
          ifHighSpeed 15
          ifPromiscuousMode 16
          ifConnectorPresent 17
          ifAlias 18
          ifCounterDiscontinuityTime 19
      entityMIB 47
       entityMIBObjects 1
        entityPhysical 1
         entPhysicalTable 1
          entPhysicalEntry 1
           entPhysicalIndex 1
           entPhysicalDescr 2
           entPhysicalVendorType 3
           entPhysicalContainedIn 4
           entPhysicalClass 5
           entPhysicalParentRelPos 6
           entPhysicalName 7
           entPhysicalHardwareRev 8
           entPhysicalFirmwareRev 9
           entPhysicalSoftwareRev 10
           entPhysicalSerialNum 11
           entPhysicalMfgName 12
           entPhysicalModelName 13
           entPhysicalAlias 14
           entPhysicalAssetID 15
           entPhysicalIsFRU 16
    experimental 3 +
    private 4
     enterprises 1 +
    security 5 +
    snmpV2 6 +
"""


def _build() -> tuple[dict[str, str], dict[str, str], set[str]]:
    by_name: dict[str, str] = {}
    by_oid: dict[str, str] = {}
    parents: set[str] = set()
    stack: list[tuple[int, str]] = []  # (indent, oid)
    for line in _TREE.strip("\n").splitlines():
        indent = len(line) - len(line.lstrip(" "))
        name, arc, *group = line.split()
        while stack and stack[-1][0] >= indent:
            stack.pop()
        oid = f"{stack[-1][1]}.{arc}" if stack else arc
        if stack:
            parents.add(stack[-1][1])
        if group:  # a subtree whose objects the map does not name ("+")
            parents.add(oid)
        by_name[name] = oid
        by_oid[oid] = name
        stack.append((indent, oid))
    return by_name, by_oid, parents


OID_OF, NAME_OF, PARENTS = _build()
INTERNET = OID_OF["internet"]  # 1.3.6.1


def parent_of(oid: str) -> str:
    return oid.rsplit(".", 1)[0] if "." in oid else ""


def is_entry(oid: str) -> bool:
    """A conceptual row (``xEntry`` = ``xTable.1``), whose children are columns."""
    return NAME_OF.get(oid, "").endswith("Entry") and NAME_OF.get(parent_of(oid), "").endswith(
        "Table"
    )


def known_prefix(oid: str) -> str:
    """The deepest OID of the map that is ``oid`` or an ancestor of it ("" if none)."""
    parts = oid.split(".")
    for end in range(len(parts), 0, -1):
        candidate = ".".join(parts[:end])
        if candidate in NAME_OF:
            return candidate
    return ""


def path_of(oid: str) -> list[str]:
    """The known OIDs from the root down to ``oid`` (which must be known)."""
    parts = oid.split(".")
    return [
        prefix for end in range(1, len(parts) + 1) if (prefix := ".".join(parts[:end])) in NAME_OF
    ]
