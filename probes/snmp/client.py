"""One leased gufo-snmp session and the requests a job makes on it: GET, GETNEXT, walks.

Uses private parts of gufo-snmp (``SnmpSession._send``, ``_fd``, ``_recv``, ``_sock`` and
``gufo.snmp._fast.GetIter``): :func:`check_library` fails loudly at import if a release
drops the methods, and ``tests/test_snmp.py`` checks the walks against net-snmp.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncGenerator, Awaitable, Callable, Sequence
from dataclasses import dataclass
from typing import Any, TypeVar, cast

import gufo.snmp as gufo_snmp
from gufo.snmp import SnmpAuthError, SnmpDecodeError, SnmpError
from gufo.snmp._fast import GetIter
from gufo.snmp.aio.client import SnmpSession

from bridge.wire.errors import AuthFailed, BridgeError, ProbeTimeout, ProtocolError
from probes.snmp import values as sv
from probes.snmp.errors import refused, translate
from probes.snmp.reader import Prefetch, Reader, Wait
from probes.snmp.versions import Version

GET_BATCH = 16  # OIDs in one GET request (keeps answers well under any size limit)


T = TypeVar("T")


def check_library() -> None:
    """Fail at import if gufo-snmp lost what :meth:`SnmpClient.walk` relies on."""
    missing = [
        name for name in ("_send", "_recv") if not callable(getattr(SnmpSession, name, None))
    ]
    if missing:
        raise ImportError(
            f"gufo-snmp {gufo_snmp.__version__} has no SnmpSession."
            f"{', '.join(missing)}: probes/snmp.py needs updating"
        )


check_library()


END = object()  # the library said the walk is over (or a GETBULK answer was refused)
DECODE = object()  # the answer did not decode (e.g. larger than the receive buffer)


@dataclass(frozen=True, slots=True)
class Policy:
    timeout: float  # seconds per try
    retries: int  # more tries after a timeout

    @property
    def tries(self) -> int:
        return self.retries + 1


def silence(policy: Policy, version: Version) -> ProbeTimeout:
    """The error for an agent that never answered."""
    tries = f"{policy.tries} {'try' if policy.tries == 1 else 'tries'}"
    message = f"no answer from the agent ({tries} of {policy.timeout:g} s)"
    if version != "3":
        message += "; a wrong community gets no answer either"
    return ProbeTimeout(message)


class SnmpClient:
    """One leased gufo session plus the retry policy of the job that holds it."""

    def __init__(
        self,
        session: SnmpSession,
        *,
        version: Version,
        has_priv: bool,
        policy: Policy,
        reader: Reader | None = None,
    ):
        self.session = session
        self.reader = reader  # the session's lasting registration, if pooled
        self.version = version
        self.has_priv = has_priv
        self.policy = policy
        self.requests = 0  # sent, retries included
        self.resumed = 0  # GETBULK answers the library refused; the walk went on by GETNEXT

    async def _retry(self, make: Callable[[], Awaitable[T]]) -> T:
        """``make()`` with our timeout, ``retries`` more times on silence (v3 refresh only)."""
        for _ in range(self.policy.tries):
            self.requests += 1
            deadline = asyncio.timeout(self.policy.timeout)
            try:
                async with deadline:
                    return await make()
            except TimeoutError:
                if deadline.expired():
                    continue
                raise refused() from None
            except BaseException as exc:
                raise translate(exc) from None
        raise self._silence()

    async def _request(
        self, send: Callable[[], None], recv: Callable[[], T], *, tries: int | None = None
    ) -> T | object:
        """One request on the session's socket, ``retries`` more times on silence.

        The library's own path (``_send`` then ``_recv``, which runs ``wait_for``) under an
        ``asyncio.timeout`` costs two timers and three futures a request; this is one
        reader, one timer and one future. A datagram the library drops (an old request id)
        reads as ``BlockingIOError``: wait on. ``END`` / ``DECODE`` instead of the
        library's ``StopAsyncIteration`` / ``SnmpDecodeError``.
        """
        session = self.session
        reader = self.reader
        loop = reader.loop if reader is not None else asyncio.get_running_loop()
        fd = session._fd
        timeout = self.policy.timeout
        for _ in range(self.policy.tries if tries is None else tries):
            self.requests += 1
            try:
                try:
                    send()
                except BlockingIOError:  # the send buffer is full: the library waits
                    await session._send(send)
            except BaseException as exc:
                raise translate(exc) from None
            wait = Wait(loop.create_future())
            timer: asyncio.TimerHandle | None = None
            if reader is None:
                loop.add_reader(fd, wait.wake)
                timer = loop.call_later(timeout, wait.expire)
            else:
                reader.waiter = wait
                reader.deadlines.add(wait, timeout)
            try:
                while await wait.future:
                    try:
                        return recv()
                    except BlockingIOError:
                        wait.future = loop.create_future()
                    except StopAsyncIteration:
                        return END
                    except SnmpDecodeError:
                        return DECODE
                    except TimeoutError:
                        # gufo-snmp reports a refused port (ICMP port unreachable) so.
                        raise refused() from None
                    except BaseException as exc:
                        raise translate(exc) from None
            finally:
                if timer is not None:
                    loop.remove_reader(fd)
                    timer.cancel()
                else:
                    reader.waiter = None  # type: ignore[union-attr]
                    wait.forget()
        raise self._silence()

    def _send_ahead(self, send: Callable[[], None], recv: Callable[[], Any]) -> Prefetch | None:
        """Send the next request of a walk now, before the caller works on this answer, so
        the agent answers while the bridge types and stores varbinds. ``None`` when it
        cannot (no lasting reader, or the send failed: :meth:`_request` sends it later and
        reports what goes wrong)."""
        reader = self.reader
        if reader is None:
            return None
        try:
            send()
        except BaseException:
            return None
        self.requests += 1
        ahead = Prefetch(recv, reader)
        reader.waiter = ahead
        return ahead

    async def _collect(
        self, ahead: Prefetch, send: Callable[[], None], recv: Callable[[], T]
    ) -> T | object:
        """The answer to a request sent by :meth:`_send_ahead` (as :meth:`_request` gives
        it); on silence, the remaining tries go through :meth:`_request`."""
        reader = ahead.reader
        try:
            if not ahead.done:
                reader.deadlines.add(ahead, self.policy.timeout)
                if not await ahead.future:
                    ahead.done = True  # given up: what comes late is drained
                    if self.policy.tries > 1:
                        return await self._request(send, recv, tries=self.policy.tries - 1)
                    raise self._silence()
        finally:
            if reader.waiter is ahead:
                reader.waiter = None
        error = ahead.error
        if error is None:
            return cast(T, ahead.result)
        if isinstance(error, StopAsyncIteration):
            return END
        if isinstance(error, SnmpDecodeError):
            return DECODE
        if isinstance(error, TimeoutError):
            raise refused()
        raise translate(error) from None

    def _silence(self) -> ProbeTimeout:
        return silence(self.policy, self.version)

    async def refresh(self) -> None:
        """SNMPv3 engine discovery (new session) and time sync, with our timeout and retries."""
        await self._retry(self.session.refresh)

    async def discover(self) -> None:
        """:meth:`refresh` for a new v3 session, telling a wrong privacy key from silence.

        The agent answers discovery in clear, then drops the encrypted time sync that
        follows if the privacy key or protocol is wrong (no report, no error).
        """
        try:
            await self.refresh()
        except ProbeTimeout:
            if self.has_priv and self.session.get_engine_id():
                raise AuthFailed(
                    "the agent answered SNMPv3 engine discovery but not the encrypted request"
                    " that follows: the privacy key or protocol is wrong"
                ) from None
            raise

    async def get(self, oids: Sequence[str]) -> dict[str, Any]:
        """``{oid: value}`` for every OID; one the agent lacks maps to ``Missing(kind)``."""
        found: dict[str, Any] = {}
        for start in range(0, len(oids), GET_BATCH):
            batch = list(oids[start : start + GET_BATCH])
            answer = await self._get_many(batch)
            if self.version == "1" and (len(answer) < len(batch) or None in answer.values()):
                # v1: one noSuchName voids the whole answer; ask one by one
                answer = {}
                for oid in batch:
                    value = await self._get_one(oid)
                    if value is not None:
                        answer[oid] = value
            found.update(answer)
        for oid in oids:
            if oid not in found or (self.version == "1" and found[oid] is None):
                found[oid] = Missing(await self.missing_kind(oid))
        return found

    async def _get_many(self, oids: list[str]) -> dict[str, Any]:
        sock = self.session._sock
        got = await self._request(lambda: sock.send_get_many(oids), sock.recv_get_many)
        if got is DECODE or got is END:
            raise ProtocolError("the agent's answer did not decode")
        return got  # type: ignore[return-value]

    async def _get_one(self, oid: str) -> Any:
        sock = self.session._sock

        def recv() -> Any:
            try:
                return sock.recv_get()
            except (SnmpAuthError, SnmpDecodeError):
                raise
            except SnmpError:  # NoSuchInstance and the v1 error statuses
                return None

        got = await self._request(lambda: sock.send_get(oid), recv)
        if got is DECODE or got is END:
            raise ProtocolError("the agent's answer did not decode")
        return got

    async def walk(self, root: str, max_repetitions: int) -> AsyncGenerator[tuple[str, Any], None]:
        """Every ``(oid, value)`` under ``root``, in order, by GETBULK (GETNEXT for v1).

        Nothing is sent ahead: callers of this (tables, getnext) often stop early."""
        answers = self.walk_answers(root, max_repetitions, room=0)
        async with contextlib.aclosing(answers):
            async for answer in answers:
                for item in answer:
                    yield item

    async def walk_answers(
        self, root: str, max_repetitions: int, *, room: int | None = None
    ) -> AsyncGenerator[list[tuple[str, Any]], None]:
        """:meth:`walk` an answer at a time: the varbinds of each GETBULK (or GETNEXT) in a
        list, so a caller pays the generator once per request, not once per varbind.

        After a full GETBULK answer the next GETBULK is sent at once, before the answer is
        handed over (:meth:`_send_ahead`): the agent works on it while the caller types
        and stores the varbinds. ``room``: the varbinds the caller will take at most
        (``None``: all); nothing is sent ahead that the caller would not read, since a
        late answer left in flight could reach the session's next request (an answer too
        large for the library's buffer fails to decode before its request id is checked).
        """
        sock = self.session._sock
        bulk = self.version != "1" and max_repetitions > 1
        ctx = GetIter(root, max_repetitions) if bulk else GetIter(root)
        stepping = 0  # GETNEXTs to send before the next GETBULK
        ahead: Prefetch | None = None
        handed = 0  # varbinds handed over so far

        def send_bulk() -> None:
            sock.send_get_bulk(ctx)

        def recv_bulk() -> list[tuple[str, Any] | None]:
            return sock.recv_get_bulk(ctx)

        def send_next() -> None:
            sock.send_get_next(ctx)

        def recv_next() -> tuple[str, Any]:
            return sock.recv_get_next(ctx)

        try:
            while True:
                if bulk and stepping == 0:
                    sent, ahead = ahead, None
                    got: Any = (
                        await self._collect(sent, send_bulk, recv_bulk)
                        if sent is not None
                        else await self._request(send_bulk, recv_bulk)
                    )
                    if got is END or got is DECODE:
                        # Too big for the library (or the end of the MIB view): one by one.
                        self.resumed += 1
                        stepping = max_repetitions
                        continue
                    if not got:
                        return
                    if None in got:  # the end of the subtree inside this answer
                        yield got[: got.index(None)]
                        return
                    handed += len(got)
                    if len(got) >= max_repetitions and (room is None or handed <= room):
                        ahead = self._send_ahead(send_bulk, recv_bulk)  # the walk goes on
                    yield got
                else:
                    got = await self._request(send_next, recv_next)
                    if got is END:
                        return
                    if got is DECODE:
                        raise ProtocolError(f"an answer while walking {root} did not decode")
                    yield [got]
                    if stepping:
                        stepping -= 1
        finally:
            if ahead is not None:  # the caller stopped early: drain its answer when it comes
                ahead.done = True
                if ahead.reader.waiter is ahead:
                    ahead.reader.waiter = None

    async def first_under(self, root: str) -> tuple[str, Any] | None:
        """The first ``(oid, value)`` strictly under ``root``: one GETNEXT."""
        sock = self.session._sock
        ctx = GetIter(root)

        def send() -> None:
            sock.send_get_next(ctx)

        def recv() -> tuple[str, Any]:
            return sock.recv_get_next(ctx)

        got: Any = await self._request(send, recv)
        if got is END:
            return None
        if got is DECODE:
            raise ProtocolError(f"the answer to a GETNEXT of {root} did not decode")
        return got  # type: ignore[no-any-return]

    async def successor(self, oid: str, max_repetitions: int, limit: int) -> tuple[str, Any] | None:
        """What a GETNEXT of ``oid`` answers (``None``: end of the MIB view).

        gufo-snmp only walks within a subtree, so: the first OID under ``oid``; else the
        first OID after it under its parent, its grandparent, ... (at most ``limit``
        varbinds read on the way).
        """
        first = await self.first_under(oid)
        if first is not None:
            return first
        arcs = oid.split(".")
        key = sv.oid_key(oid)
        scanned = 0
        for depth in range(len(arcs) - 1, 1, -1):
            parent = ".".join(arcs[:depth])
            async with contextlib.aclosing(self.walk(parent, max_repetitions)) as items:
                async for found, value in items:
                    if sv.oid_key(found) > key:
                        return found, value
                    scanned += 1
                    if scanned >= limit:
                        raise BridgeError(
                            f"getnext {oid}: no answer within {limit} varbinds read forward"
                            " from its parent (use walk for this subtree)"
                        )
        return None

    async def missing_kind(self, oid: str) -> str:
        """noSuchInstance if the object (``oid`` minus its last part) has instances."""
        parent = oid.rsplit(".", 1)[0]
        if parent.count(".") < 1:
            return sv.NO_SUCH_OBJECT
        found = await self.first_under(parent)
        return sv.NO_SUCH_INSTANCE if found is not None else sv.NO_SUCH_OBJECT


@dataclass(frozen=True, slots=True)
class Missing:
    kind: str
