"""A Shazzam job's parameters: the model and ``build_params``."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from pydantic import Field, ValidationInfo, field_validator
from pydantic_core import PydanticCustomError

from bridge.wire.errors import BadParameter, Refused
from bridge.wire.records import OutputRecord
from bridge.wire.targets import TargetSet, parse_ports, parse_targets
from probes.contract import ProbeParams, parse_params
from probes.shazzam.settings import ShazzamSettings

TOPIC = "Shazzam"

# The TCP ports discovery's classifiers look at: remote shells and file transfer, web,
# Windows (WMI/RPC, NetBIOS, SMB, WinRM, RDP), mail, and the common databases.
DEFAULT_PORTS: tuple[int, ...] = (
    21, 22, 23, 25, 80, 135, 139, 443, 445, 1433, 1521, 3306, 3389, 5432, 5985, 5986,
    8080, 8443,
)  # fmt: skip

MAX_SNMP_CREDENTIAL_IDS = 32


def _clean_error(exc: ValueError) -> PydanticCustomError:
    """A parse error as pydantic reports it, without the ``Value error,`` prefix."""
    return PydanticCustomError("value_error", str(exc))


_CANONICAL: dict[str, Callable[[Any], Any]] = {
    "targets": lambda value: parse_targets(value).texts(),
    "ports": parse_ports,
}


class ShazzamParams(ProbeParams):
    """A sweep. ``targets`` holds the canonical, merged form (``first-last`` intervals)."""

    targets: tuple[str, ...]
    ports: tuple[int, ...] = DEFAULT_PORTS
    connect_timeout: float = Field(1.0, gt=0, le=60)  # seconds before a port is filtered
    banner: bool = False  # read what an open port says first
    banner_timeout: float = Field(0.5, gt=0, le=10)  # seconds to wait for it
    chunk_hosts: int = Field(256, ge=1, le=65_536)  # hosts in one result chunk
    snmp: bool = False  # also tap UDP snmp_port with the snmp_community credentials
    snmp_port: int = Field(161, ge=1, le=65_535)
    snmp_timeout: float = Field(1.0, gt=0, le=30)  # seconds from the first tap to giving up
    snmp_credential_ids: tuple[str, ...] | None = None  # None: every snmp_community, in order

    @field_validator("targets", "ports", mode="before")
    @classmethod
    def _canonical(cls, value: Any, info: ValidationInfo) -> Any:
        """``targets`` as merged intervals, ``ports`` as numbers."""
        try:
            return _CANONICAL[info.field_name or ""](value)
        except ValueError as exc:
            raise _clean_error(exc) from None

    @field_validator("snmp_credential_ids", mode="before")
    @classmethod
    def _parse_credential_ids(cls, value: Any) -> tuple[str, ...] | None:
        if value is None:
            return None
        if isinstance(value, str):
            items: list[Any] = value.split(",")
        elif isinstance(value, list | tuple):
            items = list(value)
        else:
            raise PydanticCustomError(
                "value_error", "a list of credential ids, or one text of ids separated by commas"
            )
        ids: list[str] = []
        for item in items:
            if not isinstance(item, str):
                raise PydanticCustomError("value_error", "credential ids are texts")
            text = item.strip()
            if text and text not in ids:
                ids.append(text)
        if not ids:
            raise PydanticCustomError("value_error", "no credential id given")
        if len(ids) > MAX_SNMP_CREDENTIAL_IDS:
            raise PydanticCustomError(
                "value_error", f"at most {MAX_SNMP_CREDENTIAL_IDS} credential ids"
            )
        return tuple(ids)

    def target_set(self) -> TargetSet:
        return parse_targets(list(self.targets))


def build_params(record: OutputRecord, cfg: ShazzamSettings) -> ShazzamParams:
    """Parameters from the payload (targets default to the record's ``source``).

    Raises ``BadParameter`` naming the field, or ``Refused`` for a sweep over the limits.
    """
    data = {k: v for k, v in record.payload.items() if v is not None}
    if "targets" not in data:
        if not record.source.strip():
            raise BadParameter(
                "no targets: give payload 'targets' or the record's source", field="targets"
            )
        data["targets"] = record.source
    data.setdefault("connect_timeout", cfg.connect_timeout)
    data.setdefault("chunk_hosts", cfg.chunk_hosts)
    params = parse_params(ShazzamParams, data)
    addresses = params.target_set().count
    if addresses > cfg.max_addresses:
        raise Refused(
            f"the sweep covers {addresses} addresses, over the limit of {cfg.max_addresses}"
            " (probes.shazzam.max_addresses): split it into smaller jobs",
            field="targets",
        )
    probes = addresses * len(params.ports)
    if probes > cfg.max_probes:
        raise Refused(
            f"{addresses} addresses × {len(params.ports)} ports = {probes} probes, over the"
            f" limit of {cfg.max_probes} (probes.shazzam.max_probes): split it into smaller jobs"
        )
    return params
