"""``midbridge instance ...``: run the built-in instance, manage its users.

- ``midbridge instance [--host H] [--port P] [--db PATH|postgresql://...]``: serve until
  SIGINT/SIGTERM (on PostgreSQL several processes serve one database: one leader runs the
  connector and discovery, ``bridge/instance/leader.py``; ``--keys STEM`` the key files).
  On first start the ``admin`` user is created with ``$MIDBRIDGE_ADMIN_PASSWORD``, or a
  generated password that is printed once. HTTPS: ``--tls-cert FILE --tls-key FILE``, or
  ``--tls-self-signed`` (a certificate made beside the database, reused; its path and
  SHA-256 fingerprint are printed). ``--public-url URL``: the base of the API's links
  (Link, Location) behind a proxy; ``--trust-forwarded``: believe X-Forwarded-* headers.
  ``--table-cleaner-interval SECONDS`` (3600; 0: off): the table cleaner's runs
  (``bridge/instance/table_cleaner.py``; on PostgreSQL the leader's).
- ``midbridge instance agent ...`` / ``instance discovery run ...``: talk to a running
  instance at ``--url``; ``--ca-file FILE`` trusts its certificate (or ``$SSL_CERT_FILE``).
- ``midbridge instance user create NAME [--first-name F] [--last-name L] [--email E]
  [--role R ...] [--web-service-only] [--inactive] [--password-stdin]``: the password is
  asked for twice (no echo), or read as one line from stdin.
  ``--agent NAME`` (repeatable): the MID(s) a mid_server account acts for.
- ``midbridge instance user set-agents NAME [AGENT ...]``: the MIDs it acts for (none: clear).
- ``midbridge instance user list`` (read-only: a missing database is an error, not created).

``--db`` (default ``$MIDBRIDGE_INSTANCE_DB`` or ``midbridge-state/instance.db``) may be
given before or after the ``user`` subcommand. The database file is made mode 600. Exit
status: 0, or 2 with a one-line error.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import dataclasses
import getpass
import ipaddress
import logging
import os
import sqlite3
import ssl
import sys
from collections.abc import Callable, Coroutine
from contextlib import AsyncExitStack
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import quote, urlsplit

from bridge.cli_errors import CommandError, fail
from bridge.instance import tls
from bridge.instance.agents import valid_agent_name
from bridge.instance.api import ApiSettings
from bridge.instance.auth import (
    PasswordError,
    create_user,
    find_user,
    mid_agents_text,
    roles_of,
    seed_roles,
)
from bridge.instance.metrics import METRICS_TOKEN_ENV
from bridge.instance.store import Conflict, Store, StoreError
from bridge.instance.tls import TlsError, client_context
from bridge.signals import StopSignals
from bridge.wire.address import AddressError, parse_host_port
from bridge.wire.broker import BrokerConfig

log = logging.getLogger("midbridge.instance")

DEFAULT_DB = Path("midbridge-state/instance.db")
DB_ENV = "MIDBRIDGE_INSTANCE_DB"
DEFAULT_KEYS = Path("midbridge-state/instance")
KEYS_ENV = "MIDBRIDGE_INSTANCE_KEYS"


def _db_arg(text: str) -> Path | str:
    """``--db``: a postgresql:// URL as given, anything else a file path."""
    return text if text.startswith(("postgresql://", "postgres://")) else Path(text)


ADMIN_PASS_ENV = "MIDBRIDGE_ADMIN_PASSWORD"


def add_instance_parser(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """Add ``instance`` (and its ``user`` subcommands) to the ``midbridge`` parser."""
    default_db = Path(os.environ.get(DB_ENV) or DEFAULT_DB)
    inst = sub.add_parser("instance", help="the built-in instance: serve it, manage its users")
    inst.add_argument("--host", default="127.0.0.1", help="address to listen on")
    inst.add_argument("--port", type=int, default=8080, help="port to listen on (0: any)")
    inst.add_argument(
        "--db",
        type=_db_arg,
        default=default_db,
        help=f"database file ({DEFAULT_DB}), or postgresql://user@host:port/db (several "
        "instances on one PostgreSQL: one leader runs the connector, docs/scaling.md)",
    )
    inst.add_argument(
        "--keys",
        type=Path,
        default=None,
        metavar="STEM",
        help="the platform key files STEM.secret.key and STEM.signing.pem (default: beside "
        f"the database file; with PostgreSQL ${KEYS_ENV} or {DEFAULT_KEYS}: every instance "
        "of one database needs the same files)",
    )
    inst.add_argument(
        "--broker",
        default=None,
        metavar="HOST:PORT",
        help="connect the ECC queue to this MQTT broker (the connector), or to NATS "
        "JetStream with nats://HOST:PORT[,nats://HOST:PORT...]; none: API only",
    )
    inst.add_argument(
        "--nats-ack-wait",
        type=float,
        default=None,
        metavar="SECONDS",
        help="with --broker nats://: seconds before a message the connector took and did not "
        "acknowledge (it died) is delivered again (default 30)",
    )
    inst.add_argument(
        "--broker-username",
        default=None,
        help=f"broker user (password from ${BROKER_PASSWORD_ENV})",
    )
    inst.add_argument("--topic-prefix", default="ecc", help="topic prefix (as the bridges')")
    inst.add_argument(
        "--trust-forwarded",
        action="store_true",
        help="behind a TLS proxy: trust X-Forwarded-Proto (Secure cookies, https links), "
        "X-Forwarded-Host (links) and X-Forwarded-For (the client address for sign-in "
        "throttling)",
    )
    inst.add_argument(
        "--public-url",
        default=None,
        metavar="URL",
        help="the address clients use (e.g. https://snow.example.com behind a proxy): "
        "the base of the API's Link and Location headers and reference links",
    )
    inst.add_argument(
        "--tls-cert", type=Path, default=None, metavar="FILE", help="serve HTTPS: PEM certificate"
    )
    inst.add_argument(
        "--tls-key", type=Path, default=None, metavar="FILE", help="its PEM private key"
    )
    inst.add_argument(
        "--tls-self-signed",
        action="store_true",
        help="serve HTTPS with a self-signed certificate made beside the database (reused); "
        "prints its path and SHA-256 fingerprint for clients to trust",
    )
    inst.add_argument(
        "--metrics-token",
        default=os.environ.get(METRICS_TOKEN_ENV) or None,
        metavar="TOKEN",
        help=f"/metrics needs Authorization: Bearer TOKEN (default ${METRICS_TOKEN_ENV}, "
        "which keeps it out of the process list); none: /metrics is open, as Prometheus "
        "scrapes usually are (docs/operations.md)",
    )
    inst.add_argument(
        "--servicenow-compat",
        action="store_true",
        help="ServiceNow-compatibility mode, for a relay as the MID (docs/compat-mode.md): "
        "ECC stored as ServiceNow would, the MID Server Monitor; not with --broker",
    )
    inst.add_argument(
        "--mid-monitor-interval",
        type=float,
        default=300.0,
        metavar="SECONDS",
        help="--servicenow-compat: seconds between MID Server Monitor cycles (300)",
    )
    inst.add_argument(
        "--table-cleaner-interval",
        type=float,
        default=3600.0,
        metavar="SECONDS",
        help="seconds between table cleaner runs, which delete old records by the "
        "sys_auto_flush rules (3600; 0: off; docs/instance.md)",
    )
    inst_sub = inst.add_subparsers(dest="instance_command")
    user = inst_sub.add_parser("user", help="users of the instance")
    user_sub = user.add_subparsers(dest="user_command", required=True)

    def db_option(parser: argparse.ArgumentParser) -> None:
        parser.add_argument(
            "--db", type=_db_arg, default=argparse.SUPPRESS, help="database file or URL"
        )

    create = user_sub.add_parser("create", help="create a user (and grant roles)")
    create.add_argument("name", help="user_name, e.g. mid.user")
    create.add_argument("--first-name", default="")
    create.add_argument("--last-name", default="")
    create.add_argument("--email", default="")
    create.add_argument(
        "--role", action="append", default=[], help="role name (repeatable), e.g. mid_server"
    )
    create.add_argument(
        "--web-service-only",
        action="store_true",
        help="web service access only (the API, not web pages)",
    )
    create.add_argument("--inactive", action="store_true", help="create the user inactive")
    create.add_argument(
        "--password-stdin", action="store_true", help="read the password from stdin (one line)"
    )
    create.add_argument(
        "--agent",
        action="append",
        default=[],
        help="a MID (name without mid.server.) this mid_server account acts for (repeatable)",
    )
    db_option(create)
    set_agents = user_sub.add_parser(
        "set-agents", help="the MIDs a mid_server account acts for (none given: clear)"
    )
    set_agents.add_argument("name", help="user_name, e.g. mid.user")
    set_agents.add_argument("agents", nargs="*", help="MID names (without mid.server.)")
    db_option(set_agents)
    listing = user_sub.add_parser("list", help="list users and their roles")
    db_option(listing)

    agent = inst_sub.add_parser(
        "agent", help="MID agents of a running instance: list, or an admin action"
    )
    agent.add_argument(
        "action", choices=["list", "validate", "invalidate", "pause", "resume", "drain"]
    )
    agent.add_argument("name", nargs="?", help="the agent's name (without mid.server.)")
    agent.add_argument("--url", default="http://127.0.0.1:8080", help="the running instance")
    agent.add_argument("--user", default="admin", help=f"admin user (password: ${ADMIN_PASS_ENV})")
    ca_file_option(agent)

    disco = inst_sub.add_parser("discovery", help="start a discovery run on a running instance")
    disco.add_argument("action", choices=["run"])
    disco.add_argument("schedule", help="the discovery_schedule's name or sys_id")
    disco.add_argument("--url", default="http://127.0.0.1:8080", help="the running instance")
    disco.add_argument("--user", default="admin", help=f"user (password: ${ADMIN_PASS_ENV})")
    disco.add_argument(
        "--wait", action="store_true", help="follow the run (progress) and list its CIs"
    )
    disco.add_argument(
        "--timeout", type=float, default=3600.0, metavar="SECONDS", help="--wait at most this"
    )
    ca_file_option(disco)


def ca_file_option(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--ca-file",
        type=Path,
        default=None,
        metavar="FILE",
        help="trust this PEM certificate (e.g. the instance's self-signed one) besides the "
        "system's CAs ($SSL_CERT_FILE replaces those)",
    )


def run_instance_command(
    args: argparse.Namespace, run_loop: Callable[[Coroutine[Any, Any, int]], int] = asyncio.run
) -> int:
    """Run a parsed ``midbridge instance ...`` command; ``run_loop`` runs the coroutine."""
    try:
        if args.instance_command is None:
            return run_loop(
                _serve(
                    args.host,
                    args.port,
                    args.db,
                    broker=_broker(args),
                    trust_forwarded=args.trust_forwarded,
                    https=_https(args),
                    public_url=_public_url(args),
                    metrics_token=args.metrics_token,
                    compat=_compat(args),
                    keys_stem=args.keys,
                    table_cleaner=_table_cleaner(args),
                )
            )
        if args.instance_command in ("agent", "discovery"):
            return run_loop(_agent_command(args))
        if args.user_command == "create":
            password = _read_password(args.password_stdin)
            return run_loop(_user_create(args, password))
        if args.user_command == "set-agents":
            return run_loop(_user_set_agents(args))
        return run_loop(_user_list(args.db))
    except CommandError as exc:
        return fail("instance", exc)
    except TlsError as exc:
        return fail("instance", exc)
    except StoreError as exc:
        return fail("instance", exc.message)
    except sqlite3.Error as exc:
        return fail("instance", f"database {args.db}: {exc}")


BROKER_PASSWORD_ENV = "MIDBRIDGE_INSTANCE_BROKER_PASSWORD"


async def _agent_command(args: argparse.Namespace) -> int:
    """Agent actions go through the running instance's API, so its connector sends them."""
    import aiohttp

    trust = client_context(args.ca_file)  # a bad --ca-file before the password prompt
    password = os.environ.get(ADMIN_PASS_ENV)
    if password is None:
        if not sys.stdin.isatty():  # getpass would read stdin, warn, then end in EOFError
            raise CommandError(f"no password for {args.user}: set ${ADMIN_PASS_ENV} (no terminal)")
        try:
            password = getpass.getpass(f"Password for {args.user}: ")
        except EOFError:
            raise CommandError(f"no password for {args.user}: set ${ADMIN_PASS_ENV}") from None
    token = base64.b64encode(f"{args.user}:{password}".encode()).decode()
    base = str(args.url).rstrip("/")
    connector = aiohttp.TCPConnector(ssl=trust)
    headers = {"Authorization": f"Basic {token}"}
    async with aiohttp.ClientSession(headers=headers, connector=connector) as http:
        try:
            if args.action == "list":
                url = f"{base}/api/now/table/ecc_agent"
                async with http.get(
                    url, params={"sysparm_fields": "name,status,validated,last_heartbeat"}
                ) as resp:
                    body = await resp.json(content_type=None)
                    if resp.status != 200:
                        raise CommandError(_api_error(resp.status, body))
                for row in body.get("result", []):
                    print(
                        f"{row['name']:<24} {row['status']:<9} validated={row['validated']:<6} "
                        f"last heartbeat {row['last_heartbeat'] or '-'}"
                    )
                return 0
            if args.instance_command == "discovery":
                url = f"{base}/api/midbridge/discovery/{quote(args.schedule, safe='')}/run"
                async with http.post(url, json={}) as resp:
                    body = await resp.json(content_type=None)
                    if resp.status >= 300:
                        raise CommandError(_api_error(resp.status, body))
                status = body.get("result", {}) if isinstance(body, dict) else {}
                print(
                    f"discovery run {status.get('sys_id', '?')} started "
                    f"({status.get('addresses', '?')} addresses)",
                    flush=True,
                )
                if args.wait and status.get("sys_id"):
                    if not args.timeout > 0:
                        raise CommandError("--timeout: must be more than 0 seconds")
                    from bridge.instance.discovery_follow import follow_run

                    return await follow_run(http, base, str(status["sys_id"]), timeout=args.timeout)
                return 0
            if not args.name:
                raise CommandError(f"agent {args.action}: name the agent")
            if not valid_agent_name(args.name):
                raise CommandError(f"agent {args.action}: {args.name!r} is not a MID name")
            url = f"{base}/api/midbridge/agents/{args.name}/{args.action}"
            async with http.post(url, json={}) as resp:
                body = await resp.json(content_type=None)
                if resp.status >= 300:
                    raise CommandError(_api_error(resp.status, body))
        except aiohttp.ClientConnectorCertificateError as exc:
            cause = exc.certificate_error
            raise CommandError(
                f"the instance at {base} has a certificate this machine does not trust "
                f"({getattr(cause, 'verify_message', None) or cause}): give --ca-file "
                "with its certificate (or set SSL_CERT_FILE)"
            ) from None
        except aiohttp.ClientError as exc:
            raise CommandError(f"cannot reach the instance at {base}: {exc}") from None
    print(f"{args.action} sent to {args.name}")
    return 0


def _api_error(status: int, body: Any) -> str:
    error = body.get("error", {}) if isinstance(body, dict) else {}
    return f"HTTP {status}: {error.get('message', 'error')} {error.get('detail', '')}".strip()


def _broker(args: argparse.Namespace) -> tuple[BrokerConfig, str] | None:
    if not args.broker:
        return None
    text = str(args.broker)
    if text.startswith("nats://"):
        from bridge.nats_url import nats_broker

        cfg = nats_broker(
            text,
            args.broker_username,
            os.environ.get(BROKER_PASSWORD_ENV),
            ack_wait=args.nats_ack_wait,
        )
        return cfg, str(args.topic_prefix)
    try:
        host, port = parse_host_port(text, option="--broker")
    except AddressError as exc:
        raise CommandError(str(exc)) from None
    cfg = BrokerConfig(
        host=host,
        port=port,
        username=args.broker_username,
        password=os.environ.get(BROKER_PASSWORD_ENV),
    )
    return cfg, str(args.topic_prefix)


def insecure_settings(host: str, broker: BrokerConfig | None, *, https: bool = False) -> list[str]:
    """What in this start-up is open to others: each is allowed, and said loudly."""
    warnings = []
    if not _loopback(host) and not https:
        warnings.append(
            f"listening on {host} over plain HTTP: passwords (Basic) and sessions cross the "
            "network in clear; put a TLS proxy in front (and --trust-forwarded)"
        )
    if broker is not None and not broker.username:
        warnings.append(
            f"connector on {broker.host}:{broker.port} without a broker user: anyone who "
            "reaches the broker may read jobs and forge results (set --broker-username)"
        )
    if broker is not None and not broker.tls:
        warnings.append(
            f"connector on {broker.host}:{broker.port} without TLS: jobs and results cross "
            "the network in clear"
        )
    return warnings


def _loopback(host: str) -> bool:
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return host == "localhost"


@dataclass(frozen=True, slots=True)
class Https:
    """How the instance serves HTTPS: the server context and what to tell the user."""

    context: ssl.SSLContext
    lines: tuple[str, ...]


def _https(args: argparse.Namespace) -> Https | None:
    """The TLS options checked (one-line errors naming the flag), or None for plain HTTP."""
    cert, key = args.tls_cert, args.tls_key
    if args.tls_self_signed:
        if cert is not None or key is not None:
            flag = "--tls-cert" if cert is not None else "--tls-key"
            raise CommandError(f"{flag}: not with --tls-self-signed (give one or the other)")
        if str(args.db) == ":memory:" or not isinstance(args.db, Path):
            raise CommandError("--tls-self-signed: needs a database file (--db) to keep it beside")
        public = _public_url(args)
        extra = [urlsplit(public).hostname or ""] if public else []
        made = tls.self_signed(Path(args.db), tls.certificate_names(str(args.host), extra))
        state = {"new": "made now", "renewed": "renewed", "": "reused"}[made.made]
        return Https(
            tls.server_context(made.cert, made.key),
            (
                f"TLS: self-signed certificate {made.cert} ({state}) for {', '.join(made.names)}",
                f"TLS: SHA-256 fingerprint {made.fingerprint}",
                f"TLS: clients trust it with curl --cacert {made.cert}, "
                f"REQUESTS_CA_BUNDLE={made.cert} or SSL_CERT_FILE={made.cert}",
            ),
        )
    if cert is None and key is None:
        return None
    if cert is None:
        raise CommandError("--tls-key: needs --tls-cert (the certificate it belongs to)")
    if key is None:
        raise CommandError("--tls-cert: needs --tls-key (the certificate's private key)")
    context = tls.server_context(cert, key)
    return Https(
        context, (f"TLS: certificate {cert} (SHA-256 fingerprint {tls.file_fingerprint(cert)})",)
    )


def _compat(args: argparse.Namespace) -> float | None:
    """``--servicenow-compat``'s MID Server Monitor interval; None when the mode is off."""
    if not args.servicenow_compat:
        return None
    if args.broker is not None:
        raise CommandError(
            "--servicenow-compat: not with --broker (in compatibility mode a relay is the "
            "MID; the connector would run every job a second time)"
        )
    interval = args.mid_monitor_interval
    if not (interval > 0 and interval < 86_400 * 365):
        raise CommandError(f"--mid-monitor-interval: expected seconds > 0, not {interval!r}")
    return float(interval)


def _table_cleaner(args: argparse.Namespace) -> float:
    """``--table-cleaner-interval``: seconds between runs, 0 for none."""
    interval = args.table_cleaner_interval
    if not (interval >= 0 and interval < 86_400 * 365):
        raise CommandError(
            f"--table-cleaner-interval: expected seconds >= 0 (0: off), not {interval!r}"
        )
    return float(interval)


def _public_url(args: argparse.Namespace) -> str:
    return tls.check_public_url(args.public_url) if args.public_url is not None else ""


async def _serve(
    host: str,
    port: int,
    db: Path | str,
    *,
    broker: tuple[BrokerConfig, str] | None = None,
    trust_forwarded: bool = False,
    https: Https | None = None,
    public_url: str = "",
    metrics_token: str | None = None,
    compat: float | None = None,
    keys_stem: Path | None = None,
    table_cleaner: float = 0.0,
) -> int:
    from bridge.instance import discovery
    from bridge.instance.connector import Connector, ConnectorSettings, install, keys_for
    from bridge.instance.server import ADMIN_PASSWORD_ENV, Instance, InstanceConfig
    from bridge.instance.table_cleaner import TableCleaner

    with StopSignals() as stop:
        try:
            cfg_broker = broker[0] if broker is not None else None
            for warning in insecure_settings(host, cfg_broker, https=https is not None):
                log.warning("insecure: %s", warning)
                print(f"midbridge instance: warning: {warning}", file=sys.stderr, flush=True)
            api = ApiSettings(trust_forwarded=trust_forwarded, public_url=public_url)
            config = InstanceConfig(
                host=host, port=port, db=db, api=api, metrics_token=metrics_token
            )
            if https is not None:
                config = dataclasses.replace(config, ssl_context=https.context)
            if compat is not None:
                config = dataclasses.replace(
                    config, servicenow_compat=True, mid_monitor_interval=compat
                )
            instance = Instance(config)
            cluster = isinstance(db, str)  # a postgresql:// URL (_db_arg)
            if keys_stem is None and cluster:
                keys_stem = Path(os.environ.get(KEYS_ENV) or DEFAULT_KEYS)
            keys = keys_for(db if keys_stem is None else keys_stem)
            install(instance, keys)  # sealed credentials, agent actions, the platform key
            leadership = None
            if cluster:  # several processes on one database: one leader (leader.py)
                from bridge.instance.leader import cluster_leadership

                leadership = cluster_leadership(
                    instance, str(db), broker, keys, table_cleaner_interval=table_cleaner
                )
            else:
                discovery.install(instance)  # runs, their routes, the CI class views
            async with AsyncExitStack() as stack:
                inst = await stack.enter_async_context(instance)
                shown = _shown_db(db)
                print(f"midbridge instance on {inst.url} (database {shown})", flush=True)
                for line in https.lines if https is not None else ():
                    print(line, flush=True)
                if public_url:
                    print(f"public URL (links, Location): {public_url}", flush=True)
                generated = inst.generated_admin_password
                if generated:
                    print(f"admin password (first start, shown only now): {generated}", flush=True)
                print(
                    f"platform signing key (bridges' security.platform_key): {keys.public_key_b64}",
                    flush=True,
                )
                if leadership is not None:
                    await stack.enter_async_context(leadership)
                elif broker is not None:
                    cfg, prefix = broker
                    connector = Connector(
                        inst.store, cfg, settings=ConnectorSettings(prefix=prefix), keys=keys
                    )
                    inst.attach_connector(connector)  # /readyz: not ready until connected
                    await stack.enter_async_context(connector)
                    where = f"mqtt://{cfg.host}:{cfg.port}"
                    if cfg.kind == "nats":
                        where = ",".join(cfg.nats_servers)
                    print(f"connector: ECC queue on {where}", flush=True)
                if leadership is None and table_cleaner > 0:  # the sys_auto_flush rules
                    await stack.enter_async_context(
                        TableCleaner(
                            inst.store, table_cleaner, on_deleted=inst.metrics.table_cleaned
                        )
                    )
                await stop.wait()
        except PasswordError as exc:
            raise CommandError(f"{ADMIN_PASSWORD_ENV}: {exc}") from None
        except OSError as exc:
            raise CommandError(f"cannot serve on {host}:{port}: {exc.strerror or exc}") from None
    return 0


def _read_password(from_stdin: bool) -> str:
    if from_stdin:
        line = sys.stdin.readline()
        if not line:
            raise CommandError("--password-stdin: no password on stdin")
        return line.rstrip("\r\n")
    try:
        first = getpass.getpass("Password: ")
        second = getpass.getpass("Password (again): ")
    except EOFError:
        raise CommandError("no password given (use --password-stdin to pipe one)") from None
    if first != second:
        raise CommandError("the passwords differ")
    return first


def _shown_db(db: Path | str) -> str:
    from bridge.instance.pg_store import shown_url

    return shown_url(db) if isinstance(db, str) else str(db)


async def _open(db: Path | str) -> Store:
    from bridge.instance.pg_store import store_for

    store = store_for(db)
    await store.__aenter__()
    await seed_roles(store)
    return store


async def _user_create(args: argparse.Namespace, password: str) -> int:
    store = await _open(args.db)
    try:
        user = await create_user(
            store,
            args.name,
            password,
            roles=args.role,
            first_name=args.first_name,
            last_name=args.last_name,
            email=args.email,
            web_service_access_only=args.web_service_only,
            active=not args.inactive,
            mid_agents=args.agent,
        )
    except PasswordError as exc:
        raise CommandError(str(exc)) from None
    except LookupError as exc:
        raise CommandError(str(exc.args[0])) from None
    except Conflict:
        raise CommandError(f"user {args.name} already exists") from None
    finally:
        await store.close()
    roles = ", ".join(args.role) or "none"
    print(f"created user {user['user_name']} (sys_id {user['sys_id']}); roles: {roles}")
    if user["mid_agents"]:
        print(f"acts for agents: {user['mid_agents']}")
    return 0


async def _user_set_agents(args: argparse.Namespace) -> int:
    try:
        text = mid_agents_text(args.agents)
    except ValueError as exc:
        raise CommandError(str(exc)) from None
    store = await _open_existing(args.db)
    try:
        user = await find_user(store, args.name)
        if user is None:
            raise CommandError(f"no user {args.name}")
        await store.update("sys_user", user["sys_id"], {"mid_agents": text})
    finally:
        await store.close()
    print(f"user {args.name} acts for agents: {text or '(none)'}")
    return 0


async def _open_existing(db: Path | str) -> Store:
    """A database that must exist already (commands that only read or change it)."""
    if isinstance(db, Path) and not await asyncio.to_thread(db.is_file):
        raise CommandError(f"no database at {db} (start the instance, or give --db)")
    return await _open(db)


async def _user_list(db: Path | str) -> int:
    store = await _open_existing(db)
    try:
        users = await store.query("sys_user", "ORDERBYuser_name")
        rows = [("user_name", "name", "active", "web_service_only", "roles", "agents")]
        for user in users:
            name = f"{user['first_name']} {user['last_name']}".strip()
            roles = ",".join(sorted(await roles_of(store, user["sys_id"])))
            rows.append(
                (
                    user["user_name"],
                    name,
                    "true" if user["active"] else "false",
                    "true" if user["web_service_access_only"] else "false",
                    roles,
                    user["mid_agents"],
                )
            )
    finally:
        await store.close()
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    for row in rows:
        cells = (cell.ljust(width) for cell, width in zip(row, widths, strict=True))
        print("  ".join(cells).rstrip())
    return 0
