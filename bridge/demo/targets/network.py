"""The sample network: its hosts, network gear and web sites, and the ports they use."""

from __future__ import annotations

from dataclasses import dataclass

# Read by ``python -m bridge.demo.targets`` and ``python -m bridge.demo`` (compose). Not
# MIDBRIDGE_*: the bridge's configuration takes every MIDBRIDGE_<KEY> as a setting.
SSH_PASSWORD_ENV = "DEMO_SSH_PASSWORD"
SNMP_COMMUNITY_ENV = "DEMO_SNMP_COMMUNITY"
DEFAULT_SSH_USER = "discovery"


# --- the network ------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Ports:
    """The ports the targets use (a discovery schedule maps them to classifiers)."""

    ssh: int = 2222
    http: int = 8080
    https: int = 8443
    snmp: int = 1161  # UDP


def _os_release(pretty: str, name: str, ident: str, version_id: str, like: str = "") -> str:
    lines = [
        f'PRETTY_NAME="{pretty}"',
        f'NAME="{name}"',
        f'VERSION_ID="{version_id}"',
        f"ID={ident}",
    ]
    if like:
        lines.append(f"ID_LIKE={like}")
    return "\n".join(lines) + "\n"


@dataclass(frozen=True, slots=True)
class LinuxHost:
    name: str  # the target's name (``--only``)
    address: str
    hostname: str
    os_release: str  # /etc/os-release
    kernel: str  # uname -r
    version: str  # uname -v
    serial: str  # /sys/class/dmi/id/product_serial
    interfaces: tuple[tuple[str, str], ...]  # (name, MAC)
    accepts_demo_password: bool = True  # False: a host discovery cannot log in to

    def files(self) -> dict[str, str]:
        """The virtual file system the canned shell reads."""
        files = {
            "/etc/os-release": self.os_release,
            "/etc/hostname": self.hostname + "\n",
            "/proc/sys/kernel/hostname": self.hostname + "\n",
            "/proc/version": f"Linux version {self.kernel} {self.version}\n",
            "/sys/class/dmi/id/product_serial": self.serial + "\n",
            "/sys/class/net/lo/address": "00:00:00:00:00:00\n",
        }
        for interface, mac in self.interfaces:
            files[f"/sys/class/net/{interface}/address"] = mac + "\n"
        return files


@dataclass(frozen=True, slots=True)
class SnmpDevice:
    name: str
    address: str
    sys_name: str
    sys_descr: str
    sys_object_id: str
    location: str
    interfaces: tuple[tuple[str, str, int], ...]  # (ifDescr, MAC, speed in bit/s)


@dataclass(frozen=True, slots=True)
class WebSite:
    name: str
    address: str
    hostname: str  # the certificate's name
    title: str
    server: str  # the Server header
    http: bool = True
    https: bool = False


Target = LinuxHost | SnmpDevice | WebSite

# sysObjectID of net-snmp's Linux agent (NET-SNMP-TC::linux): what a Linux-based router
# or switch running net-snmp reports.
NET_SNMP_LINUX = "1.3.6.1.4.1.8072.3.2.10"

NETWORK: tuple[Target, ...] = (
    LinuxHost(
        "db01",
        "127.0.0.11",
        "db01.demo.lan",
        _os_release("Debian GNU/Linux 12 (bookworm)", "Debian GNU/Linux", "debian", "12"),
        "6.1.0-28-amd64",
        "#1 SMP PREEMPT_DYNAMIC Debian 6.1.119-1 (2024-11-22)",
        "DEMO-0011-7Q2X",
        (("eth0", "02:6d:62:00:00:11"),),
    ),
    LinuxHost(
        "app01",
        "127.0.0.12",
        "app01.demo.lan",
        _os_release("Ubuntu 24.04.1 LTS", "Ubuntu", "ubuntu", "24.04", "debian"),
        "6.8.0-49-generic",
        "#49-Ubuntu SMP PREEMPT_DYNAMIC Mon Nov  4 02:06:24 UTC 2024",
        "DEMO-0012-K8PL",
        (("ens3", "02:6d:62:00:00:12"), ("ens4", "02:6d:62:00:01:12")),
    ),
    LinuxHost(
        "build01",
        "127.0.0.13",
        "build01.demo.lan",
        _os_release(
            "AlmaLinux 9.5 (Teal Serval)", "AlmaLinux", "almalinux", "9.5", '"rhel centos fedora"'
        ),
        "5.14.0-503.14.1.el9_5.x86_64",
        "#1 SMP PREEMPT_DYNAMIC Fri Nov 15 12:04:32 EST 2024",
        "DEMO-0013-M3ZT",
        (("eth0", "02:6d:62:00:00:13"),),
    ),
    LinuxHost(  # its SSH refuses the demo password: recorded as an IP address only
        "legacy01",
        "127.0.0.14",
        "legacy01.demo.lan",
        _os_release("CentOS Linux 7 (Core)", "CentOS Linux", "centos", "7"),
        "3.10.0-1160.el7.x86_64",
        "#1 SMP Mon Oct 19 16:18:59 UTC 2020",
        "DEMO-0014-OLD1",
        (("eth0", "02:6d:62:00:00:14"),),
        accepts_demo_password=False,
    ),
    SnmpDevice(
        "rtr01",
        "127.0.0.21",
        "rtr01.demo.lan",
        "midbridge demo router (simulated), Linux 5.15.0 armv7l",
        NET_SNMP_LINUX,
        "Rack A1, demo lab",
        (
            ("lo", "", 0),
            ("wan0", "02:6d:62:00:00:21", 1_000_000_000),
            ("lan0", "02:6d:62:00:01:21", 1_000_000_000),
        ),
    ),
    SnmpDevice(
        "sw01",
        "127.0.0.22",
        "sw01.demo.lan",
        "midbridge demo switch (simulated), 8 ports",
        NET_SNMP_LINUX,
        "Rack A2, demo lab",
        tuple((f"port{i}", f"02:6d:62:00:{i:02x}:22", 1_000_000_000) for i in range(1, 9)),
    ),
    WebSite(
        "intranet",
        "127.0.0.31",
        "intranet.demo.lan",
        "Demo Intranet - Home",
        "midbridge-demo-httpd/1.0",
    ),
    WebSite(
        "monitor",
        "127.0.0.32",
        "monitor.demo.lan",
        "Monitoring - Demo Lab",
        "midbridge-demo-httpd/1.0",
        http=False,
        https=True,
    ),
    WebSite(
        "wiki",
        "127.0.0.33",
        "wiki.demo.lan",
        "Demo Wiki",
        "midbridge-demo-httpd/1.0",
        http=True,
        https=True,
    ),
)
TARGET_NAMES = tuple(t.name for t in NETWORK)


def kind_of(target: Target) -> str:
    if isinstance(target, LinuxHost):
        return "linux"
    if isinstance(target, SnmpDevice):
        return "snmp"
    return "web"


def describe(target: Target) -> str:
    """One line: what the target is."""
    if isinstance(target, LinuxHost):
        release = dict(line.split("=", 1) for line in target.os_release.splitlines() if "=" in line)
        what = release.get("PRETTY_NAME", "Linux").strip('"')
        note = "; refuses the demo password" if not target.accepts_demo_password else ""
        return f"Linux, {what}{note}"
    if isinstance(target, SnmpDevice):
        return f"network gear, {target.sys_name}, {len(target.interfaces)} interfaces"
    return f"web server, {target.title!r}"
