"""The instance's storage interface: ServiceNow-style tables of records.

Every record is a flat ``dict[str, Any]`` with ServiceNow's system fields: ``sys_id`` (32
hex), ``sys_created_on`` / ``sys_updated_on`` (UTC ``YYYY-MM-DD HH:MM:SS``),
``sys_created_by`` / ``sys_updated_by`` (the writer's ``actor``, "system" by default),
``sys_mod_count`` (one more per update that changes something) and ``sys_tags`` (empty);
tables in an extension hierarchy also have ``sys_class_name``. SQLite serves by default;
the same interface lets PostgreSQL serve a larger installation.

The schema is data (``bridge.instance.schema``): tables are ``sys_db_object`` records,
fields ``sys_dictionary`` records; ``Store.schema`` is built from them. ``TABLES`` below is
the code-side seed of the built-in tables (types, defaults, references, write-only
fields), and ``bridge.instance.schema.CI_CLASSES`` the CI class tree seeded as tables
extending ``cmdb_ci``. Built-in tables (fields beyond the system ones):

- ``ecc_queue``: agent, topic, name, source, queue (output|input), state
  (ready|processing|processed|error), response_to (the answered output's sys_id, a plain
  string as in ServiceNow), agent_correlator, priority (0/1/2), error_string, payload
  (text: JSON or XML), processed, sequence, complete, run, lease_until (epoch seconds,
  instance-internal), attempts, timeout, expires_at.
- ``ecc_agent``: name, host, status, validated, version, capabilities (comma list),
  public_key, fingerprint, last_heartbeat (text time), started_at, stats (JSON text),
  validation_request (the administrator's validate output awaiting its answer);
  ServiceNow's host_name, ip_address, url, started, stopped, last_refreshed (a relay's).
- ``ecc_agent_property``: name, value, ecc_agent (empty: every MID's).
- ``sys_attachment``: file_name, content_type, size_bytes, table_name, table_sys_id,
  hash, content (base64; write-only): the Attachment API's files.
- ``ecc_dead_letter``: agent, topic, kind, reason, received, records, response_to,
  excerpt: broker messages the connector refused (admin only through the Table API).
- ``sys_user``: user_name, first_name, last_name, name (first (middle) last unless given),
  middle_name, email, title, department, manager, phone, mobile_phone, employee_number,
  active, locked_out, web_service_access_only, internal_integration_user, user_password
  (hash; write-only), password_needs_reset, failed_attempts, last_login_time, time_zone,
  vip, mid_agents (comma list of the MID names a mid_server account acts for).
- ``cmn_department``; ``sys_user_role``: name, description; ``sys_user_has_role``: user,
  role; ``sys_user_group``: name, description, manager, email, active, type, parent, ...;
  ``sys_user_grmember``: user, group (both cascade); ``syslog``: level, message, source.
- ``sys_auto_flush``: tablename, matchfield (a date-time field, sys_created_on by default),
  age (seconds), conditions (an encoded query), active: the Table Cleaner's rules
  (``bridge.instance.table_cleaner``; admin only through the Table API).
- ``sys_db_object`` and ``sys_dictionary``: the schema (``bridge.instance.schema``).
- ``discovery_credentials``: name, type, order, active, secret (ciphertext under the
  instance key; never returned in clear); ``discovery_schedule``, ``discovery_status``,
  ``cmdb_ci`` (+ its CI classes): docs/discovery.md.

Values, store side (what ``insert``/``update`` accept and records hold):
- string fields hold ``str`` (empty is ``""``, never ``None``); a ``dict``/``list`` given
  for one (e.g. an ECC ``payload``) is stored as its JSON text; numbers and booleans are
  stored as their text (``True`` → ``"true"``);
- glide_date_time fields hold ``YYYY-MM-DD HH:MM:SS`` text (a date alone gets 00:00:00);
- integer and real fields hold ``int`` / ``float`` or ``None`` (empty); ``"2"`` is accepted;
- boolean fields hold ``bool``; ``"true"``/``"false"``/``"1"``/``"0"``/``1``/``0`` are accepted.
A value that does not fit, or a field the table does not have, raises ``FieldError``.
``sys_id`` may be given on insert (``[A-Za-z0-9_.:-]{1,64}``; a new 32-hex id otherwise);
the other system fields are set by the store and are read-only; ``sys_class_name`` is the
table written unless one of ``Table.classes`` is given.

Interface extensions beyond plain CRUD (documented in ``docs/instance.md``):
``count``, ``aggregate`` (the Aggregate API's statistics), ``update_query`` (atomic claim
/ compare-and-set), ``insert_input_once`` (idempotent ECC input chunks), and
``add_listener`` (change events, pushed, never polled).
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
    # Text ``YYYY-MM-DD HH:MM:SS`` (UTC), ServiceNow's glide_date_time: stored and compared
    # as text (the format sorts in time order); the query language evaluates date helpers.
    DATETIME = "glide_date_time"

    @property
    def is_text(self) -> bool:
        """Stored as text (``""`` when empty), matched by the LIKE family."""
        return self in (FieldType.STRING, FieldType.DATETIME)


@dataclass(frozen=True, slots=True)
class Field:
    name: str
    type: FieldType = FieldType.STRING
    default: Any = None  # None: "" for strings, False for booleans, NULL for numbers
    reference: str | None = None  # the table this field holds a sys_id of
    cascade_delete: bool = False  # delete this record when the referenced one is deleted
    write_only: bool = False  # never returned (nor queried) by the Table API
    read_only: bool = False  # set by the store only
    label: str = ""  # sys_dictionary.column_label ("" : made from the name)
    mandatory: bool = False
    # sys_dictionary.internal_type ("" : derived: string, integer, decimal, boolean,
    # glide_date_time, reference, password2 for write-only; see bridge.instance.schema).
    internal_type: str = ""


@dataclass(frozen=True, slots=True)
class Table:
    name: str
    fields: Mapping[str, Field]
    unique: tuple[tuple[str, ...], ...] = ()  # each a set of fields no two records share
    display_field: str = "sys_id"  # what a reference given by display value matches
    label: str = ""  # sys_db_object.label
    # Table extension (sys_db_object.super_class): the parent table's name; a table that
    # extends another has its parent's fields too, and its records live in the root's
    # storage with sys_class_name = the class they were created as.
    super_class: str | None = None
    storage: str = ""  # the physical table: the hierarchy's root ("" : this table's name)
    classes: tuple[str, ...] = ()  # in a hierarchy: this table and every table below it
    extendable: bool = False  # sys_db_object.is_extendable: other tables may extend it

    @property
    def physical(self) -> str:
        """The table that holds this table's records (the root of its hierarchy)."""
        return self.storage or self.name

    @property
    def extended(self) -> bool:
        """Part of a hierarchy whose records carry ``sys_class_name``."""
        return bool(self.classes)

    @property
    def writable(self) -> frozenset[str]:
        """Fields ``insert``/``update`` accept (``sys_id`` on insert only)."""
        return frozenset(name for name, f in self.fields.items() if not f.read_only)


# Every table's system fields (ServiceNow's "Global default fields"), set by the store:
# sys_created_by / sys_updated_by from the writer's ``actor``, sys_mod_count +1 per update,
# sys_tags always empty. Tables in an extension hierarchy also have sys_class_name.
SYSTEM_FIELDS: tuple[Field, ...] = (
    Field("sys_id", internal_type="GUID", label="Sys ID"),
    Field("sys_created_on", FieldType.DATETIME, read_only=True, label="Created"),
    Field("sys_created_by", read_only=True, label="Created by"),
    Field("sys_updated_on", FieldType.DATETIME, read_only=True, label="Updated"),
    Field("sys_updated_by", read_only=True, label="Updated by"),
    Field("sys_mod_count", FieldType.INTEGER, default=0, read_only=True, label="Updates"),
    Field("sys_tags", read_only=True, label="Tags"),
)
SYSTEM_FIELD_NAMES = frozenset(f.name for f in SYSTEM_FIELDS) | {"sys_class_name"}


def _table(
    name: str,
    label: str,
    *fields: Field,
    unique: tuple[tuple[str, ...], ...] = (),
    display_field: str = "sys_id",
    extendable: bool = False,
) -> Table:
    system = SYSTEM_FIELDS
    if extendable:
        system = (*system, Field("sys_class_name", default=name, internal_type="sys_class_name"))
    return Table(
        name,
        {f.name: f for f in (*system, *fields)},
        unique=unique,
        display_field=display_field,
        label=label,
        extendable=extendable,
        classes=(name,) if extendable else (),
    )


_INT, _REAL, _BOOL, _TIME = FieldType.INTEGER, FieldType.REAL, FieldType.BOOLEAN, FieldType.DATETIME

TABLES: Mapping[str, Table] = {
    t.name: t
    for t in (
        _table(
            "ecc_queue",
            "Queue",
            Field("agent"),
            Field("topic"),
            Field("name"),
            Field("source"),
            Field("queue", default="input"),
            Field("state", default="ready"),
            # The sys_id of the output an input answers: a plain string, as in ServiceNow.
            Field("response_to"),
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
            "MID Server",
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
            # ServiceNow's names, written by a relay (a MID): docs/compat-mode.md.
            Field("host_name"),
            Field("ip_address", label="IP address"),
            Field("url", label="URL"),
            Field("started", _TIME),
            Field("stopped", _TIME),
            Field("last_refreshed", _TIME),
            unique=(("name",),),
            display_field="name",
        ),
        _table(
            "ecc_agent_property",  # MID Server properties: one MID's, or every MID's
            "MID Server Property",
            Field("name"),
            Field("value"),
            Field("ecc_agent", reference="ecc_agent", cascade_delete=True),  # empty: all
            display_field="name",
        ),
        _table(
            "sys_attachment",  # the Attachment API (bridge/instance/attachments.py)
            "Attachment",
            Field("file_name"),
            Field("content_type"),
            Field("size_bytes", _INT, default=0),
            Field("table_name"),
            Field("table_sys_id"),
            Field("hash"),  # SHA-256 of the content, hex
            Field("content", write_only=True),  # base64; read through the Attachment API
            display_field="file_name",
        ),
        _table(
            "ecc_dead_letter",  # what the connector received and could not store
            "ECC dead letter",
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
            "User",
            Field("user_name", label="User ID"),
            Field("first_name"),
            Field("last_name"),
            Field("name"),  # full name: first (middle) last unless given
            Field("middle_name"),
            Field("email"),
            Field("title"),
            Field("department", reference="cmn_department"),
            Field("manager", reference="sys_user"),
            Field("phone", label="Business phone"),
            Field("mobile_phone"),
            Field("employee_number"),
            Field("active", _BOOL, default=True),
            Field("locked_out", _BOOL),
            Field("web_service_access_only", _BOOL),
            Field("internal_integration_user", _BOOL),
            Field("user_password", write_only=True, internal_type="password", label="Password"),
            Field("password_needs_reset", _BOOL),
            Field("failed_attempts", _INT, default=0),
            Field("last_login_time", _TIME),
            Field("time_zone"),
            Field("vip", _BOOL, label="VIP"),
            # MID names (without mid.server.) a mid_server account acts for, comma list:
            # one agent, or a cluster's. Empty: none (it sees no ECC record, no agent).
            Field("mid_agents"),
            unique=(("user_name",),),
            display_field="name",
        ),
        _table(
            "cmn_department",
            "Department",
            Field("name"),
            Field("id", label="ID"),
            Field("description"),
            Field("head", reference="sys_user"),
            Field("parent", reference="cmn_department"),
            display_field="name",
        ),
        _table(
            "sys_user_role",
            "Role",
            Field("name"),
            Field("description"),
            unique=(("name",),),
            display_field="name",
        ),
        _table(
            "sys_user_has_role",
            "User Role",
            Field("user", reference="sys_user", cascade_delete=True),
            Field("role", reference="sys_user_role", cascade_delete=True),
            unique=(("user", "role"),),
        ),
        _table(
            "sys_user_group",
            "Group",
            Field("name"),
            Field("description"),
            Field("manager", reference="sys_user"),
            Field("email", label="Group email"),
            Field("active", _BOOL, default=True),
            Field("type"),  # comma list of group type names
            Field("parent", reference="sys_user_group"),
            Field("default_assignee", reference="sys_user"),
            Field("exclude_manager", _BOOL),
            Field("include_members", _BOOL),
            Field("roles"),  # comma list of role names
            display_field="name",
        ),
        _table(
            "sys_user_grmember",
            "Group Member",
            Field("user", reference="sys_user", cascade_delete=True),
            Field("group", reference="sys_user_group", cascade_delete=True),
            unique=(("user", "group"),),
        ),
        _table(
            "syslog",
            "System Log",
            Field("level", _INT, default=0),  # 0 information, 1 warning, 2 error
            Field("message"),
            Field("source"),
            Field("context_map"),
        ),
        _table(
            "sys_auto_flush",  # the Table Cleaner's rules (bridge/instance/table_cleaner.py)
            "Auto Flush",
            Field("tablename", label="Table"),
            Field("matchfield", default="sys_created_on", label="Match field"),
            Field("age", _INT, label="Age in seconds"),
            Field("conditions"),  # an encoded query AND-ed with the age (may be empty)
            Field("active", _BOOL, default=True),
            display_field="tablename",
        ),
        # --- the schema as data (bridge/instance/schema.py) ---------------------------------
        _table(
            "sys_db_object",
            "Table",
            Field("name"),
            Field("label"),
            Field("super_class", reference="sys_db_object", label="Extends table"),
            Field("is_extendable", _BOOL, label="Extensible"),
            unique=(("name",),),
            display_field="label",
        ),
        _table(
            "sys_dictionary",
            "Dictionary Entry",
            Field("name", label="Table"),
            Field("element", label="Column name"),
            Field("column_label"),
            Field("internal_type", default="string", label="Type"),
            Field("reference"),  # the referenced table's name
            Field("reference_cascade_rule"),  # "" / none / clear, delete / cascade
            Field("max_length", _INT),
            Field("default_value"),
            Field("mandatory", _BOOL),
            Field("read_only", _BOOL),
            Field("display", _BOOL),
            Field("unique", _BOOL),
            Field("active", _BOOL, default=True),
            unique=(("name", "element"),),
            display_field="column_label",
        ),
        _table(
            "discovery_credentials",
            "Credential",
            Field("name"),
            Field("type"),
            Field("order", _INT, default=100),
            Field("active", _BOOL, default=True),
            Field("secret", write_only=True),
        ),
        # --- Discovery (docs/discovery.md) -----------------------------------------------
        _table(
            "discovery_schedule",
            "Discovery Schedule",
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
            "Discovery Status",
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
            "cmdb_ci",  # the root of the CI class tree (schema.CI_CLASSES): sys_class_name
            "Configuration Item",
            Field("name"),
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
            extendable=True,
        ),
    )
}


# Query options (bridge.instance.query uses them; defined here so the store's interface
# needs no import of the query module).
InvalidFields = Literal["error", "ignore", "no_rows"]
"""What a condition or ORDERBY on a field the table does not have (or may not be queried)
does: ``error`` raises QueryError (the store's own callers); ``ignore`` drops the term, as
ServiceNow does by default (``glide.invalid_query.returns_no_rows`` false); ``no_rows``
makes the query match nothing (that property set true)."""


@dataclass(frozen=True, slots=True)
class QueryContext:
    """Who asks, for ``javascript:gs.getUserID()`` / ``gs.getUserName()`` values, and the
    clock the date helpers read (``now``: epoch seconds; None: the current time)."""

    user_id: str = ""
    user_name: str = ""
    now: float | None = None


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


@dataclass(frozen=True, slots=True)
class Aggregate:
    """One group of ``Store.aggregate``: its ``group_by`` values and its statistics
    (``avg`` etc. map each of the fields asked for to its value; None where no record
    has one). ``count`` is None when not asked for."""

    group: Mapping[str, Any]
    count: int | None = None
    avg: Mapping[str, float | None] = field(default_factory=dict)
    min: Mapping[str, Any] = field(default_factory=dict)
    max: Mapping[str, Any] = field(default_factory=dict)
    sum: Mapping[str, float | None] = field(default_factory=dict)


class Store(Protocol):
    """Async table storage. ``query`` takes a ServiceNow encoded query (``bridge.instance.query``).

    Bad queries raise ``bridge.instance.query.QueryError``; bad fields and values
    ``FieldError``; unique constraints ``Conflict``; unknown tables ``UnknownTable``.
    """

    @property
    def schema(self) -> Mapping[str, Table]:
        """Every table as ``sys_db_object`` and ``sys_dictionary`` define it now (built-in
        tables seeded from ``TABLES``, CI classes, and tables/fields added as records);
        kept current after every committed write to those two tables."""
        ...

    async def insert(
        self, table: str, fields: Mapping[str, Any], *, actor: str = "system"
    ) -> Record:
        """``actor`` (a user_name) is written to ``sys_created_by`` and ``sys_updated_by``."""
        ...

    async def get(self, table: str, sys_id: str) -> Record | None: ...

    async def query(
        self,
        table: str,
        encoded_query: str = "",
        *,
        hidden: Sequence[str] = (),
        limit: int | None = None,
        offset: int = 0,
        invalid: InvalidFields = "error",
        context: QueryContext | None = None,
    ) -> list[Record]:
        """Records matching, in the query's order, then insertion order. ``hidden``: fields
        the query may not use (the API passes the write-only ones: no oracle on hashes)."""
        ...

    async def sys_ids(self, table: str, encoded_query: str = "", *, limit: int) -> list[str]:
        """The sys_ids of at most ``limit`` records matching, in the query's order: what a
        caller that only needs to name records reads (not their payloads or files)."""
        ...

    async def update(
        self, table: str, sys_id: str, fields: Mapping[str, Any], *, actor: str = "system"
    ) -> Record | None:
        """Sets ``sys_updated_by`` to ``actor`` and adds one to ``sys_mod_count``."""
        ...

    async def delete(self, table: str, sys_id: str) -> bool: ...

    async def insert_many(
        self, table: str, rows: Sequence[Mapping[str, Any]], *, actor: str = "system"
    ) -> list[Record]: ...

    async def close(self) -> None: ...

    # --- extensions ---------------------------------------------------------------------

    async def count(
        self,
        table: str,
        encoded_query: str = "",
        *,
        hidden: Sequence[str] = (),
        invalid: InvalidFields = "error",
        context: QueryContext | None = None,
    ) -> int:
        """How many records match (ORDERBY terms are allowed and ignored)."""
        ...

    async def aggregate(
        self,
        table: str,
        encoded_query: str = "",
        *,
        group_by: Sequence[str] = (),
        count: bool = True,
        avg_fields: Sequence[str] = (),
        min_fields: Sequence[str] = (),
        max_fields: Sequence[str] = (),
        sum_fields: Sequence[str] = (),
        hidden: Sequence[str] = (),
        invalid: InvalidFields = "error",
        context: QueryContext | None = None,
    ) -> list[Aggregate]:
        """The Aggregate API's statistics over the records matching: one ``Aggregate`` per
        group of ``group_by`` values (one in all when ``group_by`` is empty), groups in the
        order of their values."""
        ...

    async def update_query(
        self,
        table: str,
        encoded_query: str,
        fields: Mapping[str, Any],
        *,
        limit: int | None = None,
        actor: str = "system",
    ) -> list[Record]:
        """Set ``fields`` on the records matching (the first ``limit`` in the query's order),
        atomically, and return them as updated (``sys_updated_by`` = ``actor``, one more
        ``sys_mod_count`` each). A claim:
        ``update_query("ecc_queue", "agent=mid.server.a^queue=output^state=ready^ORDERBYpriority",
        {"state": "processing", "lease_until": t}, limit=100)``; a compare-and-set on one
        record: ``"sys_id=<id>^state=ready"`` (an empty list means somebody else won)."""
        ...

    async def insert_input_once(
        self, fields: Mapping[str, Any], *, actor: str = "system"
    ) -> tuple[Record, bool]:
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
