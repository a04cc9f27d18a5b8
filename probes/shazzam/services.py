"""TCP port → service name, for the ``service`` field of an open port.

A small hand-written table covers the ports discovery cares about, with the names the
classification step expects (``wmi`` for 135, ``winrm`` for 5985 rather than the IANA
``epmap`` / ``wsman``). Other ports fall back to the system's services database
(``/etc/services``, which differs between machines), then to ``"unknown"``.
"""

from __future__ import annotations

import functools
import socket

SERVICES: dict[int, str] = {
    21: "ftp",
    22: "ssh",
    23: "telnet",
    25: "smtp",
    53: "domain",
    80: "http",
    110: "pop3",
    111: "rpcbind",
    135: "wmi",
    139: "netbios-ssn",
    143: "imap",
    161: "snmp",
    389: "ldap",
    443: "https",
    445: "smb",
    465: "smtps",
    514: "shell",
    587: "submission",
    623: "ipmi",
    636: "ldaps",
    873: "rsync",
    993: "imaps",
    995: "pop3s",
    1433: "ms-sql",
    1521: "oracle",
    2049: "nfs",
    2375: "docker",
    2376: "docker-tls",
    3306: "mysql",
    3389: "rdp",
    5432: "postgresql",
    5900: "vnc",
    5985: "winrm",
    5986: "winrm-https",
    6379: "redis",
    6443: "kubernetes-api",
    8000: "http-alt",
    8080: "http-proxy",
    8443: "https-alt",
    9100: "jetdirect",
    9200: "elasticsearch",
    10250: "kubelet",
    11211: "memcached",
    27017: "mongodb",
}


@functools.lru_cache(maxsize=4096)
def service_name(port: int) -> str:
    """The service usually found on TCP ``port``; ``"unknown"`` when nobody knows."""
    name = SERVICES.get(port)
    if name is not None:
        return name
    try:
        return socket.getservbyport(port, "tcp")
    except (OSError, OverflowError):
        return "unknown"
