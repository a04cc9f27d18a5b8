"""The relay's settings, its error, and the MID Server properties it honours.

A MID Server takes its tuning from three places, in this order of precedence (highest
last): its ``config.xml`` parameters, the instance's MID Server properties
(``ecc_agent_property``), and, for the relay, the command line. ``MidProperties`` holds
the few the relay reads (docs/relay.md, "MID properties"):

- ``mid.poll.time``: seconds between polls of the ECC queue when idle (ServiceNow: 40 with
  its AMB push channel, 5 without; the relay has no AMB channel, so 5);
- ``threads.interactive.max`` / ``threads.expedited.max`` / ``threads.max`` (10/20/25): the
  MID fetches outputs "proportional to the thread count"; the relay fetches their sum a poll;
- ``mid.eccq.max_payload_size`` (20,000,000): a result larger than this is not sent; an
  error saying so is sent instead, as the MID does;
- ``glide.soapprocessor.large_field_patch_max`` (512,000): the instance moves a payload
  larger than this into an attachment (``<see_attachment/>``); the relay does the same
  through the Attachment API, since the Table API does not.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from xml.etree import ElementTree

from bridge.wire.errors import BridgeError

TABLE_PATH = "/api/now/table/ecc_queue"
AGENT_PATH = "/api/now/table/ecc_agent"
PROPERTY_PATH = "/api/now/table/ecc_agent_property"
ATTACHMENT_PATH = "/api/now/attachment/file"
PASSWORD_ENV = "MIDBRIDGE_RELAY_PASSWORD"
SEE_ATTACHMENT = "<see_attachment/>"  # the payload of an input whose XML is an attachment
ATTACHMENT_NAME = "payload.xml"

# name → default (text, as ServiceNow stores property values)
PROPERTY_DEFAULTS: Mapping[str, str] = {
    "mid.poll.time": "5",
    "threads.interactive.max": "10",
    "threads.expedited.max": "20",
    "threads.max": "25",
    "mid.eccq.max_payload_size": "20000000",
    "glide.soapprocessor.large_field_patch_max": "512000",
}


class RelayError(BridgeError):
    """The instance refused or failed a request (``status`` is the HTTP status, 0 if none)."""

    kind = "relay_error"

    def __init__(self, message: str, *, status: int = 0, field: str | None = None) -> None:
        super().__init__(message, field=field)
        self.status = status

    @property
    def transient(self) -> bool:
        """Worth another try: no answer, a 5xx or a 429 (a 4xx will answer the same)."""
        return not 400 <= self.status < 500 or self.status == 429


@dataclass(frozen=True)
class RelaySettings:
    instance: str  # https://<name>.service-now.com (or the built-in instance's URL)
    user: str
    password: str = field(repr=False)
    agent: str = "midbridge"  # the MID's name, without mid.server.
    prefix: str = "ecc"
    poll_interval: float | None = None  # None: mid.poll.time
    busy_interval: float = 0.05  # seconds between polls while work keeps coming
    batch: int | None = None  # records fetched by one poll; None: the thread counts' sum
    lease: float = 300.0  # seconds before an unanswered output is published again
    resume: bool = True  # at start, take back this relay's outputs left processing
    verify_tls: bool = True
    ca_file: Path | None = None  # PEM CA bundle the instance's certificate must chain to
    request_timeout: float = 30.0
    retries: int = 4  # attempts for one write before it is left for later
    client_id: str | None = None  # MQTT client id; default midbridge-relay-<agent>
    state_dir: Path | None = None  # the durable spool; None: kept in memory only
    # The Ed25519 key jobs are signed with (PKCS#8 PEM, made owner-only on first use);
    # None: <state_dir>/relay.signing.pem, or a key in memory without a state_dir.
    signing_key: Path | None = None
    claim_window: float = 5.0  # the claim's time bound (docs/relay.md, "Claims")
    claim_concurrency: int = 8  # claim PATCHes in flight at once
    register: bool = True  # keep the MID's ecc_agent record
    refresh_interval: float = 60.0  # seconds between ecc_agent refreshes (last_refreshed)
    mid_config: Path | None = None  # a MID config.xml: <parameter name=".." value=".."/>
    properties: Mapping[str, str] = field(default_factory=dict)  # overrides, highest
    follow_bridge_status: bool = True  # the bridge's retained status shapes the MID's

    @property
    def relay_id(self) -> str:
        """Who claims: the MQTT client id (unique per relay, stable across restarts)."""
        return self.client_id or f"midbridge-relay-{self.agent}"


def read_config_xml(path: Path) -> dict[str, str]:
    """A MID ``config.xml``'s ``<parameter name=".." value=".."/>`` elements (any depth)."""
    text = path.read_text(encoding="utf-8")
    if "<!DOCTYPE" in text or "<!ENTITY" in text:
        raise RelayError(f"{path}: DTDs and entities are not accepted", field="mid_config")
    try:
        root = ElementTree.fromstring(text)
    except ElementTree.ParseError as exc:
        raise RelayError(f"{path}: {exc}", field="mid_config") from None
    found: dict[str, str] = {}
    for element in root.iter("parameter"):
        name = element.get("name")
        if name:
            found[name] = element.get("value") or (element.text or "").strip()
    return found


def parse_assignments(items: list[str]) -> dict[str, str]:
    """``NAME=VALUE`` texts (``--property``) as a mapping; a text without ``=`` is refused."""
    found: dict[str, str] = {}
    for item in items:
        name, sep, value = item.partition("=")
        if not sep or not name.strip():
            raise RelayError(f"{item[:80]!r} is not NAME=VALUE", field="property")
        found[name.strip()] = value.strip()
    return found


@dataclass(frozen=True)
class MidProperties:
    """The MID properties in force: defaults < config.xml < instance < command line."""

    values: Mapping[str, str]
    sources: Mapping[str, str]  # name → where its value came from

    @classmethod
    def merge(cls, *layers: tuple[str, Mapping[str, str]]) -> MidProperties:
        values: dict[str, str] = dict(PROPERTY_DEFAULTS)
        sources = dict.fromkeys(PROPERTY_DEFAULTS, "default")
        for source, layer in layers:
            for name, value in layer.items():
                values[name] = value
                sources[name] = source
        return cls(values, sources)

    def number(self, name: str, *, minimum: float = 0.0) -> float:
        """A numeric property; an unreadable value falls back to the default."""
        try:
            value = float(self.values.get(name, PROPERTY_DEFAULTS.get(name, "0")))
        except ValueError:
            value = float(PROPERTY_DEFAULTS.get(name, "0"))
        return max(minimum, value)

    @property
    def poll_time(self) -> float:
        return self.number("mid.poll.time", minimum=0.01)

    @property
    def batch(self) -> int:
        threads = ("threads.interactive.max", "threads.expedited.max", "threads.max")
        return max(1, int(sum(self.number(name, minimum=0) for name in threads)))

    @property
    def max_payload(self) -> int:
        return int(self.number("mid.eccq.max_payload_size", minimum=1))

    @property
    def attach_over(self) -> int:
        return int(self.number("glide.soapprocessor.large_field_patch_max", minimum=1))
