"""PUBACK notification for gmqtt: a future per outbound QoS 1/2 publish.

gmqtt 0.8 has no "published" callback and ``Client.publish`` returns nothing, but it keeps
every un-acknowledged QoS > 0 PUBLISH in a pluggable ``persistent_storage``: ``publish``
calls ``push_message(mid, packet)`` synchronously, and PUBACK (QoS 1) or PUBCOMP (QoS 2)
calls ``remove_message_by_mid(mid)``. :class:`AckTrackingStorage` turns that into futures::

    acks = AckTrackingStorage()
    client = gmqtt.Client(client_id, persistent_storage=acks, ...)
    acks.attach(client)                  # optional, see below
    client.publish(topic, payload, qos=1)
    done = acks.last_future()            # resolves when the broker's PUBACK arrives
    # or: done = acks.publish(client, topic, payload, qos=1)

What gmqtt does around it (checked in tests/test_mqtt_client.py):

- Messages published while the connection is down go to the closed socket (gmqtt logs
  "TRYING WRITE TO CLOSED SOCKET") but stay stored; after a reconnect whose CONNACK says
  *session present*, gmqtt resends every stored packet (same packet id, DUP flag not set) and
  the futures resolve on the new PUBACKs.
- If the CONNACK says *no session* (the broker lost or expired it), gmqtt drops the stored
  packets without sending them (``clear()``). The futures then fail with
  :class:`PublishLost`: the caller must publish those records again.
- gmqtt ignores the PUBACK reason code: a publish the broker refused (for example 0x87, not
  authorised by the ACL) is removed exactly like a delivered one. :meth:`attach` hooks the
  PUBACK/PUBREC parsing so such futures fail with :class:`PublishRefused` instead.
- gmqtt does not free the packet ids of messages dropped by ``clear()``: they stay "in use"
  for the life of the client, and once receive_maximum - 1 ids are taken ``publish`` raises
  OverflowError forever. :meth:`attach` frees them.
- ``publish`` raises OverflowError (nothing stored) when receive_maximum - 1 messages are
  un-acknowledged, receive_maximum being the broker's CONNACK value (Mosquitto's default is
  20). Use :meth:`wait_below` before publishing to apply backpressure instead.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable
from typing import Any

from gmqtt.storage import PersistentStorage

log = logging.getLogger("midbridge.mqtt_acks")

_PUBACK = 0x40
_PUBREC = 0x50


class PublishFailed(Exception):
    """An outbound QoS > 0 publish will not be acknowledged as delivered."""


class PublishLost(PublishFailed):
    """gmqtt dropped the message unsent (the broker had no session for us, or shutdown)."""


class PublishRefused(PublishFailed):
    """The broker answered with a failure reason code (>= 0x80) in PUBACK/PUBREC."""

    def __init__(self, mid: int, reason_code: int) -> None:
        super().__init__(
            f"broker refused publish (packet id {mid}): reason code 0x{reason_code:02x}"
        )
        self.mid = mid
        self.reason_code = reason_code


def _retrieve(future: asyncio.Future[None]) -> None:
    # A fire-and-forget publish whose future fails must not log "exception never retrieved":
    # clear() already logs the loss once.
    if not future.cancelled():
        future.exception()


class AckTrackingStorage(PersistentStorage):  # type: ignore[misc]
    """gmqtt's in-flight store, plus one future per outbound publish (by packet id)."""

    def __init__(self) -> None:
        super().__init__()
        self._futures: dict[int, asyncio.Future[None]] = {}
        self._last: asyncio.Future[None] | None = None
        self._refused: dict[int, int] = {}
        self._space_waiters: list[tuple[int, asyncio.Future[None]]] = []
        self._release_id: Callable[[int], None] | None = None

    # --- gmqtt's storage interface ------------------------------------------------------

    def push_message(self, mid: int, raw_package: Any) -> None:
        super().push_message(mid, raw_package)
        if mid in self._futures:
            # QoS 2: the PUBLISH is swapped for its PUBREL on PUBREC; same message.
            return
        future: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        future.add_done_callback(_retrieve)
        self._futures[mid] = future
        self._last = future

    def remove_message_by_mid(self, mid: int) -> None:
        super().remove_message_by_mid(mid)
        future = self._futures.pop(mid, None)
        reason = self._refused.pop(mid, None)
        if future is not None and not future.done():
            if reason is None:
                future.set_result(None)
            else:
                future.set_exception(PublishRefused(mid, reason))
        self._wake_space_waiters()

    def clear(self) -> None:
        """gmqtt calls this when a CONNACK says "no session": the stored messages are gone."""
        lost = list(self._futures)
        super().clear()
        if lost:
            log.warning(
                "broker has no session for us: %d un-acknowledged publish(es) dropped by gmqtt",
                len(lost),
            )
        self._fail(lost, "the broker had no session: message dropped unsent")

    # --- for the bridge -----------------------------------------------------------------

    def attach(self, client: Any) -> None:
        """Hook a gmqtt 0.8 ``Client`` that uses this storage (private gmqtt internals).

        Makes refused publishes (reason code >= 0x80) fail with :class:`PublishRefused`, and
        frees the packet ids of messages gmqtt drops on a lost session.
        """
        handler = client._package_handler
        originals = {
            _PUBACK: handler._handle_puback_packet,
            _PUBREC: handler._handle_pubrec_packet,
        }

        def hook(original: Callable[[int, bytes], None]) -> Callable[[int, bytes], None]:
            def handle(cmd: int, packet: bytes) -> None:
                # v5 PUBACK/PUBREC: packet id, then an optional reason code (absent = 0).
                if len(packet) >= 3 and packet[2] >= 0x80:
                    self._refused[int.from_bytes(packet[:2], "big")] = packet[2]
                original(cmd, packet)

            return handle

        handler._handle_puback_packet = hook(originals[_PUBACK])
        handler._handle_pubrec_packet = hook(originals[_PUBREC])
        for cmd in originals:
            handler._handler_cache.pop(cmd, None)
        self._release_id = handler.id_generator.free_id

    def last_future(self) -> asyncio.Future[None]:
        """The future of the message most recently stored (call right after ``publish``)."""
        if self._last is None:
            raise LookupError("no QoS > 0 message has been published through this storage")
        return self._last

    def future(self, mid: int) -> asyncio.Future[None]:
        """The future of the un-acknowledged message with packet id ``mid``."""
        try:
            return self._futures[mid]
        except KeyError:
            raise LookupError(f"no un-acknowledged message with packet id {mid}") from None

    async def wait(self, mid: int) -> None:
        """Return when packet ``mid`` is acknowledged; raise :class:`PublishFailed` if not."""
        await asyncio.shield(self.future(mid))

    def publish(
        self,
        client: Any,
        topic: str,
        payload: bytes,
        *,
        qos: int = 1,
        retain: bool = False,
        **properties: Any,
    ) -> asyncio.Future[None]:
        """``client.publish`` and return the future of that message (done at once for QoS 0)."""
        self._last = None
        client.publish(topic, payload, qos=qos, retain=retain, **properties)
        if qos == 0 or self._last is None:
            done: asyncio.Future[None] = asyncio.get_running_loop().create_future()
            done.set_result(None)
            return done
        return self._last

    @property
    def pending(self) -> int:
        """Messages published and not yet acknowledged."""
        return len(self._futures)

    async def wait_below(self, limit: int) -> None:
        """Wait until fewer than ``limit`` messages are un-acknowledged (``limit`` >= 1)."""
        if limit < 1:
            raise ValueError("limit must be at least 1")
        while len(self._futures) >= limit:
            waiter: asyncio.Future[None] = asyncio.get_running_loop().create_future()
            entry = (limit, waiter)
            self._space_waiters.append(entry)
            try:
                await waiter
            finally:
                if entry in self._space_waiters:
                    self._space_waiters.remove(entry)

    def fail_pending(self, reason: str = "publisher stopped before the broker acknowledged") -> int:
        """Fail every pending future with :class:`PublishLost` (on shutdown); return how many.

        The packets stay stored: if the same client reconnects, gmqtt still resends them.
        """
        pending = list(self._futures)
        for mid in pending:
            future = self._futures.pop(mid)
            if not future.done():
                future.set_exception(PublishLost(reason))
        self._wake_space_waiters()
        return len(pending)

    # --- internals ----------------------------------------------------------------------

    def _fail(self, mids: list[int], reason: str) -> None:
        for mid in mids:
            future = self._futures.pop(mid, None)
            self._refused.pop(mid, None)
            if self._release_id is not None:
                self._release_id(mid)
            if future is not None and not future.done():
                future.set_exception(PublishLost(f"{reason} (packet id {mid})"))
        self._wake_space_waiters()

    def _wake_space_waiters(self) -> None:
        if not self._space_waiters:
            return
        pending = len(self._futures)
        for limit, waiter in list(self._space_waiters):
            if pending < limit and not waiter.done():
                waiter.set_result(None)
