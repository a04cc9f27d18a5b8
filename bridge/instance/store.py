"""The instance's storage interface: ServiceNow-style tables of records.

Every record is a flat ``dict[str, Any]`` with a ``sys_id`` (32 hex), ``sys_created_on``
and ``sys_updated_on`` (UTC ``YYYY-MM-DD HH:MM:SS``). SQLite serves by default; the same
interface lets PostgreSQL serve a larger installation.

Tables (fields beyond the ``sys_*`` ones):
- ``ecc_queue``: agent, topic, name, source, queue (output|input), state
  (ready|processing|processed|error), response_to, agent_correlator, priority (0/1/2),
  error_string, payload (text: JSON or XML), processed, sequence, complete, run,
  lease_until (epoch seconds, instance-internal), attempts.
- ``ecc_agent``: name, host, status, validated, version, capabilities (comma list),
  public_key, fingerprint, last_heartbeat (text time), started_at, stats (JSON text),
  validation_request (the administrator's validate output awaiting its answer).
- ``sys_user``: user_name, first_name, last_name, email, active (bool),
  web_service_access_only (bool), user_password (hash; never returned by the API),
  mid_agents (comma list of the MID names a mid_server account acts for).
- ``sys_user_role``: name, description.
- ``sys_user_has_role``: user (sys_id of sys_user), role (sys_id of sys_user_role).
- ``discovery_credentials``: name, type, order, active, secret (ciphertext under the
  instance key; never returned in clear).
- ``ecc_dead_letter``: agent, topic, kind, reason, received, records, response_to,
  excerpt: broker messages the connector refused (admin only through the Table API).

``TABLES`` below is the machine-readable form of that list (types, defaults, references,
write-only fields); the SQLite store, the query compiler and the Table API all follow it.

Values, store side (what ``insert``/``update`` accept and records hold):
- string fields hold ``str`` (empty is ``""``, never ``None``); a ``dict``/``list`` given
  for one (e.g. an ECC ``payload``) is stored as its JSON text; numbers and booleans are
  stored as their text (``True`` → ``"true"``);
- integer and real fields hold ``int`` / ``float`` or ``None`` (empty); ``"2"`` is accepted;
- boolean fields hold ``bool``; ``"true"``/``"false"``/``"1"``/``"0"``/``1``/``0`` are accepted.
A value that does not fit, or a field the table does not have, raises ``FieldError``.
``sys_id`` may be given on insert (``[A-Za-z0-9_.:-]{1,64}``; a new 32-hex id otherwise);
``sys_created_on`` / ``sys_updated_on`` are set by the store and are read-only.

Interface extensions beyond plain CRUD (documented in ``docs/instance.md``):
``count``, ``update_query`` (atomic claim / compare-and-set), ``insert_input_once``
(idempotent ECC input chunks), and ``add_listener`` (change events, pushed, never polled).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from enum import StrEnum
from typing import Any, Literal, Protocol

Record = dict[str, Any]


class FieldType(StrEnum):
    STRING = "string"
    INTEGER = "integer"
    REAL = "real"
    BOOLEAN = "boolean"


@dataclass(frozen=True, slots=True)
class Field:
    name: str
    type: FieldType = FieldType.STRING
    default: Any = None  # None: "" for strings, False for booleans, NULL for numbers
    reference: str | None = None  # the table this field holds a sys_id of
    cascade_delete: bool = False  # delete this record when the referenced one is deleted
    write_only: bool = False  # never returned (nor queried) by the Table API
    read_only: bool = False  # set by the store only


@dataclass(frozen=True, slots=True)
class Table:
    name: str
    fields: Mapping[str, Field]
    unique: tuple[tuple[str, ...], ...] = ()  # each a set of fields no two records share
    display_field: str = "sys_id"  # what a reference given by display value matches

    @property
    def writable(self) -> frozenset[str]:
        """Fields ``insert``/``update`` accept (``sys_id`` on insert only)."""
        return frozenset(name for name, f in self.fields.items() if not f.read_only)


def _table(
    name: str,
    *fields: Field,
    unique: tuple[tuple[str, ...], ...] = (),
    display_field: str = "sys_id",
) -> Table:
    system = (
        Field("sys_id"),
        Field("sys_created_on", read_only=True),
        Field("sys_updated_on", read_only=True),
    )
    return Table(
        name, {f.name: f for f in (*system, *fields)}, unique=unique, display_field=display_field
    )


_INT, _REAL, _BOOL = FieldType.INTEGER, FieldType.REAL, FieldType.BOOLEAN

TABLES: Mapping[str, Table] = {
    t.name: t
    for t in (
        _table(
            "ecc_queue",
            Field("agent"),
            Field("topic"),
            Field("name"),
            Field("source"),
            Field("queue", default="input"),
            Field("state", default="ready"),
            Field("response_to", reference="ecc_queue"),
            Field("agent_correlator"),
            Field("priority", _INT, default=2),
            Field("error_string"),
            Field("payload"),
            Field("processed"),
            Field("sequence", _INT),
            Field("complete", _BOOL),
            Field("run"),
            Field("lease_until", _REAL),
            Field("attempts", _INT, default=0),
            Field("timeout", _REAL),  # seconds the job may run (passed to the bridge)
            Field("expires_at", _REAL),  # epoch seconds: not started by then, it expires
        ),
        _table(
            "ecc_agent",
            Field("name"),
            Field("host"),
            Field("status", default="Down"),
            Field("validated", _BOOL),
            Field("version"),
            Field("capabilities"),
            Field("public_key"),
            Field("fingerprint"),
            Field("last_heartbeat"),
            Field("started_at"),
            Field("stats"),
            # sys_id of the validate SystemCommand an administrator started and whose
            # answer is awaited: only that answer may set validated (agents.admin_action).
            Field("validation_request"),
            unique=(("name",),),
            display_field="name",
        ),
        _table(
            "ecc_dead_letter",  # what the connector received and could not store
            Field("agent"),  # MID name, from the topic
            Field("topic"),  # the MQTT topic it came on
            Field("kind"),  # input | status
            Field("reason"),
            Field("received"),  # UTC text time
            Field("records", _INT, default=1),  # records refused in the message
            Field("response_to"),  # the output a refused input named, if any
            Field("excerpt"),  # the start of the raw message (bounded)
        ),
        _table(
            "sys_user",
            Field("user_name"),
            Field("first_name"),
            Field("last_name"),
            Field("email"),
            Field("active", _BOOL, default=True),
            Field("web_service_access_only", _BOOL),
            Field("user_password", write_only=True),
            # MID names (without mid.server.) a mid_server account acts for, comma list:
            # one agent, or a cluster's. Empty: none (it sees no ECC record, no agent).
            Field("mid_agents"),
            unique=(("user_name",),),
            display_field="user_name",
        ),
        _table(
            "sys_user_role",
            Field("name"),
            Field("description"),
            unique=(("name",),),
            display_field="name",
        ),
        _table(
            "sys_user_has_role",
            Field("user", reference="sys_user", cascade_delete=True),
            Field("role", reference="sys_user_role", cascade_delete=True),
            unique=(("user", "role"),),
        ),
        _table(
            "discovery_credentials",
            Field("name"),
            Field("type"),
            Field("order", _INT, default=100),
            Field("active", _BOOL, default=True),
            Field("secret", write_only=True),
        ),
        # --- Discovery (docs/discovery.md) -----------------------------------------------
        _table(
            "discovery_schedule",
            Field("name"),
            Field("ranges"),  # CIDRs, ranges a-b, lists: what Shazzam takes
            Field("exclusions"),  # the same forms, never scanned
            Field("agent"),  # MID name (without mid.server.)
            Field("ports"),  # empty: Shazzam's defaults
            Field("snmp", _BOOL),
            Field("credentials"),  # comma list of discovery_credentials names to try
            Field("max_addresses", _INT, default=65536),
            Field("batch_size", _INT, default=1000),  # addresses per Shazzam job
            Field("parallel_batches", _INT, default=4),  # Shazzam jobs in flight at once
            Field("active", _BOOL, default=True),
            # Which open port calls which classifier (docs/discovery.md); port lists as text.
            Field("ssh_ports", default="22"),
            Field("http_ports", default="80,8080"),
            Field("https_ports", default="443,8443"),
            Field("snmp_port", _INT, default=161),  # UDP port of the SNMP tap and SNMP job
            Field("chunk_hosts", _INT, default=256),  # hosts per Shazzam result chunk
            unique=(("name",),),
            display_field="name",
        ),
        _table(
            "discovery_status",
            Field("schedule", reference="discovery_schedule"),
            Field("name"),
            Field("agent"),
            Field(
                "state", default="Starting"
            ),  # Starting Scanning Classifying Completed Error Cancelled
            Field("started"),
            Field("completed"),
            Field("addresses", _INT, default=0),
            Field("scanned", _INT, default=0),
            Field("alive", _INT, default=0),
            Field("batches", _INT, default=0),
            Field("batches_done", _INT, default=0),
            Field("classify_total", _INT, default=0),
            Field("classified", _INT, default=0),
            Field("cis_created", _INT, default=0),
            Field("cis_updated", _INT, default=0),
            Field("errors", _INT, default=0),
            Field("progress", _REAL, default=0.0),  # 0..100
            Field("log"),
            Field("open_ports", _INT, default=0),  # open TCP ports found (sum over hosts)
            Field("probes", _INT, default=0),  # TCP connects (addresses x ports), Shazzam's count
            Field("classify_failed", _INT, default=0),  # hosts whose every classifier failed
            Field("refused", _INT, default=0),  # results refused: wrong agent or address
            Field("scan_duration", _REAL),  # seconds from the start to the last batch done
            Field("duration", _REAL),  # seconds from the start to the end of the run
        ),
        _table(
            "cmdb_ci",  # one table; sys_class_name is the class (cmdb_ci_linux_server, ...)
            Field("name"),
            Field("sys_class_name", default="cmdb_ci_ip_address"),
            Field("ip_address"),
            Field("mac_address"),  # comma list
            Field("serial_number"),
            Field("host_name"),
            Field("os"),
            Field("os_version"),
            Field("kernel"),
            Field("sys_descr"),
            Field("sys_object_id"),
            Field("http_server"),
            Field("http_title"),
            Field("tls_subject"),
            Field("tls_not_after"),
            Field("ports"),  # comma list of open TCP ports
            Field("first_discovered"),
            Field("last_discovered"),
            Field("discovery_source", default="midbridge"),
            Field("discovery_status", reference="discovery_status"),
            display_field="name",
        ),
    )
}


class StoreError(Exception):
    """Base of the store's errors; ``message`` is meant for the API client."""

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message


class UnknownTable(StoreError):
    def __init__(self, table: str) -> None:
        super().__init__(f"Invalid table {table}")
        self.table = table


class FieldError(StoreError):
    """A field the table does not have, a read-only field, or a value that does not fit."""

    def __init__(self, table: str, field: str, message: str) -> None:
        super().__init__(f"{table}.{field}: {message}")
        self.table = table
        self.field = field


class Conflict(StoreError):
    """The write would break a unique constraint (a sys_id, a user_name, a role grant...)."""


@dataclass(frozen=True, slots=True)
class Change:
    """One committed write, told to listeners right after it is committed.

    ``record`` is the record after the write (for ``delete``: as it was); ``previous`` the
    record before an ``update`` (``None`` otherwise).
    """

    table: str
    op: Literal["insert", "update", "delete"]
    record: Record
    previous: Record | None = field(default=None)


Listener = Callable[[Change], object]
"""Called on the event loop, in commit order, once per record written; must not block
(set an ``asyncio.Event``, put to a queue, start a task). An exception is logged and
never undoes or fails the write."""


class Store(Protocol):
    """Async table storage. ``query`` takes a ServiceNow encoded query (``bridge.instance.query``).

    Bad queries raise ``bridge.instance.query.QueryError``; bad fields and values
    ``FieldError``; unique constraints ``Conflict``; unknown tables ``UnknownTable``.
    """

    async def insert(self, table: str, fields: Mapping[str, Any]) -> Record: ...

    async def get(self, table: str, sys_id: str) -> Record | None: ...

    async def query(
        self,
        table: str,
        encoded_query: str = "",
        *,
        hidden: Sequence[str] = (),
        limit: int | None = None,
        offset: int = 0,
    ) -> list[Record]:
        """Records matching, in the query's order, then insertion order. ``hidden``: fields
        the query may not use (the API passes the write-only ones: no oracle on hashes)."""
        ...

    async def update(self, table: str, sys_id: str, fields: Mapping[str, Any]) -> Record | None: ...

    async def delete(self, table: str, sys_id: str) -> bool: ...

    async def insert_many(self, table: str, rows: Sequence[Mapping[str, Any]]) -> list[Record]: ...

    async def close(self) -> None: ...

    # --- extensions ---------------------------------------------------------------------

    async def count(
        self, table: str, encoded_query: str = "", *, hidden: Sequence[str] = ()
    ) -> int:
        """How many records match (ORDERBY terms are allowed and ignored)."""
        ...

    async def update_query(
        self, table: str, encoded_query: str, fields: Mapping[str, Any], *, limit: int | None = None
    ) -> list[Record]:
        """Set ``fields`` on the records matching (the first ``limit`` in the query's order),
        atomically, and return them as updated. A claim:
        ``update_query("ecc_queue", "agent=mid.server.a^queue=output^state=ready^ORDERBYpriority",
        {"state": "processing", "lease_until": t}, limit=100)``; a compare-and-set on one
        record: ``"sys_id=<id>^state=ready"`` (an empty list means somebody else won)."""
        ...

    async def insert_input_once(self, fields: Mapping[str, Any]) -> tuple[Record, bool]:
        """Insert an ``ecc_queue`` input record unless it is already stored: same ``sys_id``,
        or same (``response_to``, ``run``, ``sequence``) among inputs with a ``sequence``.
        Returns (the stored record, True if this call inserted it)."""
        ...

    def add_listener(self, listener: Listener) -> Callable[[], None]:
        """Be told of every committed write; returns a function that removes the listener."""
        ...


def same_answer(stored: Mapping[str, Any], values: Mapping[str, Any]) -> bool:
    """``stored`` is the ecc_queue input ``values`` repeats: an input, answering the same
    output, from the same agent (never another record that happens to have its sys_id)."""
    return (
        stored.get("queue") == "input"
        and stored.get("response_to") == values.get("response_to", "")
        and stored.get("agent") == values.get("agent", "")
    )
