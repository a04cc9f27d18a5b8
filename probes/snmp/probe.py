"""SNMP: GET, GETNEXT, walks and tables against one agent, over gufo-snmp (v1, v2c, v3).

Reference: ``docs/probes/SNMP.md``. The job names its operations in ``oid_spec_list``
(``get 1.3.6.1.2.1.1.5.0``, ``walk system``, ``table ifTable ifDescr,ifType``); results
stream back in chunks of typed varbinds (:mod:`probes.snmp.values`).

What gufo-snmp does and does not do, and how this module makes up for it:

* One request at a time per session, and a v3 session pays an engine discovery when it is
  made. :class:`~probes.snmp.pool.SnmpPool` (``ctx.resource``) keeps a few sessions per (address,
  port, version, credential), each leased to one job at a time.
* No retries and one timeout per session: every request here goes through
  :meth:`SnmpClient._request` (``timeout`` per try, ``retries`` more tries), which
  also drives the library's socket with one timer per request instead of its ``wait_for``.
* Its walk iterators are bounded to the subtree they started from, and a GETBULK whose
  answer is too large ends the walk *silently* (v3 at max-repetitions 50 after ~200
  varbinds; v2c raises past its 4 KB receive buffer). :meth:`SnmpClient.walk` drives the
  library's request context itself: when a GETBULK fails that way it steps on with plain
  GETNEXTs on the same context, then goes back to GETBULK, so a walk returns what
  ``snmpbulkwalk`` returns. This uses private parts of gufo-snmp (``SnmpSession._send``, ``_fd``,
  ``_recv``, ``_sock`` and ``gufo.snmp._fast.GetIter``): :func:`check_library` fails
  loudly at import if a release drops the methods, and ``tests/test_snmp.py`` checks the
  walks against net-snmp.
* No unbounded GETNEXT: ``getnext OID`` on an OID without children scans forward from
  its parent (:meth:`SnmpClient.successor`).
* noSuchObject and noSuchInstance arrive as one exception (GET) or as a missing varbind
  (GET of several OIDs); v1's noSuchName arrives as ``None``. One GETNEXT under the
  object tells the two apart (:meth:`SnmpClient.missing_kind`).
* A wrong community and a wrong v3 privacy key look like silence; a closed port comes
  as an immediate ``TimeoutError`` (→ ``connection_refused``); a wrong v3 user or
  authentication key raises ``SnmpAuthError``. A new authPriv session
  whose engine discovery (in clear) is answered but whose encrypted time sync is not gets
  ``auth_failed`` (the privacy key or protocol is wrong); other silence is ``timeout``.
* No v3 context name: a credential with a non-empty ``context`` is refused.

The package: :mod:`~probes.snmp.spec` (the ``oid_spec_list`` lines),
:mod:`~probes.snmp.params` and :mod:`~probes.snmp.settings` (the job and the probe's
settings), :mod:`~probes.snmp.credentials`, :mod:`~probes.snmp.client` (requests on one
session, over :mod:`~probes.snmp.reader`'s lasting socket registration),
:mod:`~probes.snmp.pool`, :mod:`~probes.snmp.operations` (one agent's operations into
result entries), :mod:`~probes.snmp.gets` (hosts jobs of GETs on callbacks) and this
module (the probe: one agent, or many). Shazzam's SNMP tap is
:mod:`probes.shazzam.snmp_tap`.
"""

from __future__ import annotations

import asyncio
import contextlib
import socket
from collections.abc import AsyncGenerator, AsyncIterator, Callable, Coroutine, Sequence
from typing import Any

from bridge.wire.credentials import Credential
from bridge.wire.errors import AuthFailed, BadParameter, BridgeError, CredentialError, ProbeTimeout
from probes.contract import Job, ProbeContext, ProbeSpec
from probes.kit.fanout import fan_out, result_chunks
from probes.snmp.client import GET_BATCH, Policy, SnmpClient
from probes.snmp.credentials import COMMUNITY, SNMPV3, version_for
from probes.snmp.errors import sound
from probes.snmp.gets import GetSweep, sweep_gets
from probes.snmp.operations import Output, failed_entry, gets_entry, operate, summary_of
from probes.snmp.params import SnmpParams, build_params, ip_literal
from probes.snmp.pool import Lease, SnmpPool, Target, open_pool, pool_of
from probes.snmp.settings import TOPIC, SnmpSettings
from probes.snmp.values import SYS_OBJECT_ID
from probes.snmp.versions import Version


async def resolve_host(host: str, port: int) -> str:
    """An IP literal as is; a name → its first address (IPv4 first)."""
    literal = ip_literal(host)
    if literal is not None:
        return literal
    loop = asyncio.get_running_loop()
    try:
        infos = await loop.getaddrinfo(host, port, type=socket.SOCK_DGRAM)
    except OSError:
        raise BadParameter(f"{host[:80]!r} does not resolve", field="host") from None
    addresses = sorted({str(info[4][0]) for info in infos}, key=lambda a: ":" in a)
    if not addresses:
        raise BadParameter(f"{host[:80]!r} does not resolve", field="host")
    return str(addresses[0])


async def credentials_for(job: Job[SnmpParams], ctx: ProbeContext) -> list[Credential]:
    params = job.params
    if ctx.credentials is None:
        raise CredentialError("this bridge has no credentials configured", field="credential_id")
    types: tuple[str, ...]
    if params.version == "3":
        types = (SNMPV3,)
    elif params.version in ("1", "2c"):
        types = (COMMUNITY,)
    else:
        types = (COMMUNITY, SNMPV3)
    return await ctx.credentials.resolve(
        job.record, credential_id=params.credential_id, types=types
    )


def open_client(
    pool: SnmpPool,
    address: str,
    port: int,
    creds: Sequence[Credential],
    version: Version | None,
    policy: Policy,
) -> contextlib.AbstractAsyncContextManager[tuple[SnmpClient, Credential]]:
    """``async with``: a leased client for the first credential the agent accepts.

    With one credential, no extra request: its errors surface from the job's own requests.
    With several, each is tried in order (the one that last worked here first) with a GET
    of sysObjectID.0; silence and authentication failures move on to the next one.
    """
    if len(creds) == 1:
        cred = creds[0]
        return _OneCredential(
            pool.lease(Target(address, port, version_for(cred, version)), cred, policy), cred
        )
    return _first_accepted(pool, (address, port), creds, version, policy)


class _OneCredential:
    """:func:`open_client` with one credential: a plain class (it runs once per agent)."""

    __slots__ = ("cred", "lease")

    def __init__(self, lease: Lease, cred: Credential) -> None:
        self.lease = lease
        self.cred = cred

    async def __aenter__(self) -> tuple[SnmpClient, Credential]:
        return await self.lease.__aenter__(), self.cred

    async def __aexit__(self, exc_type: object, exc: BaseException | None, tb: object) -> None:
        await self.lease.__aexit__(exc_type, exc, tb)


@contextlib.asynccontextmanager
async def _first_accepted(
    pool: SnmpPool,
    agent: tuple[str, int],
    creds: Sequence[Credential],
    version: Version | None,
    policy: Policy,
) -> AsyncIterator[tuple[SnmpClient, Credential]]:
    address, port = agent
    ordered = list(creds)
    preferred = pool.preferred(address, port)
    ordered.sort(key=lambda c: c.id != preferred)
    failures: list[tuple[str, BridgeError]] = []
    for cred in ordered:
        target = Target(address, port, version_for(cred, version))
        stack = contextlib.AsyncExitStack()
        try:
            client = await stack.enter_async_context(pool.lease(target, cred, policy))
            await client.get([SYS_OBJECT_ID])
        except (ProbeTimeout, AuthFailed) as exc:
            await stack.__aexit__(type(exc), exc, exc.__traceback__)
            failures.append((cred.id, exc))
            continue
        except BaseException as exc:
            await stack.__aexit__(type(exc), exc, exc.__traceback__)
            raise
        async with stack:
            pool.remember(address, port, cred.id)
            yield client, cred
        return
    tried = ", ".join(cred_id for cred_id, _ in failures)
    if any(isinstance(exc, AuthFailed) for _, exc in failures):
        raise AuthFailed(f"no credential was accepted (tried {tried})", field="credential_id")
    raise ProbeTimeout(
        f"no answer with any credential (tried {tried}; a wrong community gets no answer)",
        field="credential_id",
    )


def _gets_step(
    oids: list[str],
    ask: list[str],
    cred: Credential,
    pool: SnmpPool,
    port: int,
    version: Version | None,
    policy: Policy,
) -> Callable[[tuple[int, str]], Coroutine[Any, Any, dict[str, Any]]]:
    """One agent of a hosts job of GETs with one credential, as a coroutine.

    :mod:`probes.snmp_gets` drives such jobs from callbacks and hands this whatever would
    wait (a name to resolve, a busy agent, a new v3 session, a missing OID).
    """
    wanted = version_for(cred, version)

    async def step(item: tuple[int, str]) -> dict[str, Any]:
        index, host = item
        client: SnmpClient | None = None
        try:
            address = ip_literal(host) or await resolve_host(host, port)
            target = Target(address, port, wanted)
            group = pool.group(target, cred)
            pooled = await pool.enter(group, target, cred, policy)
            client = pooled.lease_client(wanted, policy)
            try:
                values = await client.get(ask)  # a repeated OID asked once
            except BaseException as exc:
                pool.leave(group, pooled, sound(exc))
                raise
            pool.leave(group, pooled, True)
        except BridgeError as exc:
            return failed_entry(index, host, exc, client.requests if client is not None else 0)
        return gets_entry(index, host, address, oids, values, client.requests)

    return step


async def run(job: Job[SnmpParams], ctx: ProbeContext) -> AsyncIterator[dict[str, Any]]:
    params = job.params
    if params.hosts is not None:
        async with contextlib.aclosing(run_many(job, ctx)) as chunks:
            async for chunk in chunks:
                yield chunk
        return
    host = params.host
    assert host is not None  # build_params: host or hosts
    pool = pool_of(ctx)
    address = await resolve_host(host, params.port)
    creds = await credentials_for(job, ctx)
    policy = Policy(params.timeout, params.retries)
    async with open_client(pool, address, params.port, creds, params.version, policy) as (
        client,
        cred,
    ):
        header = {
            "host": host,
            "address": address,
            "port": params.port,
            "version": client.version,
            "credential_id": cred.id,
        }
        out = Output(header, chunk=params.chunk_varbinds, cap=params.max_varbinds)
        async with contextlib.aclosing(operate(client, params.specs(), params, out)) as chunks:
            async for chunk in chunks:
                yield chunk
        final = out.flush(open_entry=False)
        final["summary"] = summary_of(out, client)
        yield final


async def run_many(job: Job[SnmpParams], ctx: ProbeContext) -> AsyncGenerator[dict[str, Any], None]:
    """A ``hosts`` job: the operations on every agent, ``concurrency`` agents at a time.

    Each agent's answer is one entry of ``agents``: the one-agent result (``host``,
    ``address``, ``version``, ``credential_id``, ``results``, ``summary``) plus ``index``,
    its place in ``hosts``; for a job of ``get`` lines and one credential, the compact
    :func:`gets_entry`. An agent that fails gives ``{"index", "host", "error"}``: one silent
    or refusing agent does not fail the job. Entries come in the order agents finish.
    ``max_varbinds`` applies to each agent. Every chunk carries ``port`` (and, for GETs,
    ``version`` and ``credential_id``); the last one carries ``summary`` for the job.
    """
    params = job.params
    hosts = params.hosts
    assert hosts is not None
    pool = pool_of(ctx)
    specs = params.specs()
    creds = await credentials_for(job, ctx)
    policy = Policy(params.timeout, params.retries)
    port = params.port
    whole = params.max_varbinds + 1  # one agent's answer is never split across chunks

    async def one(item: tuple[int, str]) -> dict[str, Any]:
        index, host = item
        used: SnmpClient | None = None
        try:
            address = ip_literal(host) or await resolve_host(host, port)
            async with open_client(pool, address, port, creds, params.version, policy) as (
                client,
                cred,
            ):
                used = client
                out = Output(
                    {
                        "index": index,
                        "host": host,
                        "address": address,
                        "version": client.version,
                        "credential_id": cred.id,
                    },
                    chunk=whole,
                    cap=params.max_varbinds,
                )
                async with contextlib.aclosing(operate(client, specs, params, out)) as chunks:
                    async for _never in chunks:
                        pass
                entry = out.flush(open_entry=False)
                entry["summary"] = summary_of(out, client)
                return entry
        except BridgeError as exc:
            return failed_entry(index, host, exc, used.requests if used is not None else 0)

    targets = list(enumerate(hosts))
    get_oids = [oid for spec in specs for oid in spec.oids]
    gets_only = all(spec.op == "get" for spec in specs)
    batches: AsyncGenerator[list[dict[str, Any]], None]
    header: dict[str, Any] = {"port": port}
    distinct = list(dict.fromkeys(get_oids))  # a repeated OID is asked once
    if gets_only and len(creds) == 1 and len(get_oids) <= params.max_varbinds:
        header["version"] = version_for(creds[0], params.version)
        header["credential_id"] = creds[0].id
        step = _gets_step(get_oids, distinct, creds[0], pool, port, params.version, policy)
        if len(distinct) <= GET_BATCH:  # one request an agent: the callback lanes
            sweep = GetSweep(
                targets,
                oids=get_oids,
                ask=distinct,
                cred=creds[0],
                pool=pool,
                port=port,
                version=version_for(creds[0], params.version),
                policy=policy,
                chunk=params.chunk_agents,
                fallback=step,
            )
            batches = sweep_gets(sweep, limit=params.concurrency)
        else:  # several requests an agent (SnmpClient.get batches them): coroutines
            batches = fan_out(
                targets,
                step,
                limit=params.concurrency,
                budget=pool.budget,
                chunk=params.chunk_agents,
            )
    else:
        batches = fan_out(
            targets, one, limit=params.concurrency, budget=pool.budget, chunk=params.chunk_agents
        )

    totals = {"agents": len(hosts), "answered": 0, "failed": 0, "varbinds": 0, "requests": 0}

    def count(entry: dict[str, Any]) -> None:
        if "error" in entry:
            totals["failed"] += 1
            totals["requests"] += entry.get("requests", 0)
            return
        totals["answered"] += 1
        summary = entry.get("summary")
        if summary is None:  # a compact GET entry
            totals["varbinds"] += len(entry["varbinds"])
            totals["requests"] += entry["requests"]
        else:
            totals["varbinds"] += summary["varbinds"]
            totals["requests"] += summary["requests"]

    chunks = result_chunks(
        batches, header=header, key="agents", count=count, summary=lambda: dict(totals)
    )
    async with contextlib.aclosing(chunks):
        async for chunk in chunks:
            yield chunk


SPEC = ProbeSpec(
    TOPIC,
    SnmpParams,
    run,
    build_params,
    settings=SnmpSettings,
    resource=open_pool,
    target_host=lambda params: params.host,  # None for a hosts job: the pool limits per agent
    needs_credentials=True,
)
