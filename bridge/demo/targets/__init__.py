"""A small network to discover, in this process: what ``midbridge demo`` scans.

Every target listens on an address of its own (127.0.0.x by default) and on high ports,
so nothing needs root or a system package:

- **Linux hosts** (:class:`LinuxHost`): an asyncssh server with a password user and a
  generated host key. Commands run in a canned shell (:class:`CannedShell`) over a small
  virtual file system: it knows ``echo``, ``uname``, ``cat``, ``hostname``, ``grep -H .``,
  ``id``, ``whoami``, ``true``, ``false``, ``;``, ``||``, ``&&``, ``( ... )`` and
  ``2>/dev/null``: everything the SSH classifier's command line
  (``bridge.instance.cmdb.SSH_COMMAND``) uses, and a little more for a person trying it
  with ``ssh -p 2222 discovery@127.0.0.11``.
- **Network gear** (:class:`SnmpDevice`): an SNMP v2c agent over UDP answering GET,
  GETNEXT and GETBULK for the system group, ``ifNumber`` and a small ``ifTable``. The
  messages are decoded and encoded by ``pyasn1``'s BER codec with ``pysnmp``'s SNMP
  message and PDU types (``pysnmp.proto.api``): a well-kept library does the BER, this
  module only looks values up. (snmpsim would be the full simulator, but it refuses to
  run as root and brings pysmi and data files; a responder of ~100 lines is enough for
  what the SNMP classifier asks.) A request with another community gets no answer, as
  from a real agent.
- **Web servers** (:class:`WebSite`): aiohttp on HTTP and/or HTTPS (a self-signed
  certificate made with ``cryptography`` at start), with a ``Server`` header and an HTML
  ``<title>``.

Addresses of the range that no target uses answer nothing (a refused connection).

``async with demo_targets(settings) as running:`` starts them and tells what listens where
(:class:`RunningTargets`); ``python -m bridge.demo.targets`` serves them until SIGINT or
SIGTERM (``--bind 0.0.0.0 --only db01`` serves one target on every address of a
container: what ``compose/docker-compose.yml`` does).
"""

from bridge.demo.targets.network import (
    DEFAULT_SSH_USER,
    NETWORK,
    SNMP_COMMUNITY_ENV,
    SSH_PASSWORD_ENV,
    TARGET_NAMES,
    LinuxHost,
    Ports,
    SnmpDevice,
    Target,
    WebSite,
    describe,
    kind_of,
)
from bridge.demo.targets.running import Listening, RunningTargets, TargetSettings, demo_targets
from bridge.demo.targets.shell import CannedShell
from bridge.demo.targets.snmp import SnmpAgent
from bridge.demo.targets.web import self_signed_context

__all__ = [
    "DEFAULT_SSH_USER",
    "NETWORK",
    "SNMP_COMMUNITY_ENV",
    "SSH_PASSWORD_ENV",
    "TARGET_NAMES",
    "CannedShell",
    "LinuxHost",
    "Listening",
    "Ports",
    "RunningTargets",
    "SnmpAgent",
    "SnmpDevice",
    "Target",
    "TargetSettings",
    "WebSite",
    "demo_targets",
    "describe",
    "kind_of",
    "self_signed_context",
]
