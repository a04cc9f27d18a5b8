"""The bridge's one error family.

Library exceptions are translated into these once, at the edge of each probe (or of the
transport). Every error has a ``kind`` that travels in the input record as data, so the
platform can tell a refused connection from a bad parameter without parsing prose.
"""

from __future__ import annotations


class BridgeError(Exception):
    """Base of every error the bridge reports as data."""

    kind = "error"

    def __init__(self, message: str, *, field: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.field = field

    def __str__(self) -> str:
        if self.field:
            return f"{self.field}: {self.message}"
        return self.message


class BadRecord(BridgeError):
    """The output record itself is unreadable or invalid (JSON, fields, size)."""

    kind = "bad_record"


class BadParameter(BridgeError):
    """A probe parameter is missing or invalid; ``field`` names it."""

    kind = "bad_parameter"


class UnknownTopic(BridgeError):
    kind = "unknown_topic"


class Refused(BridgeError):
    """Policy refused the job (too large, not enabled, not validated, paused...)."""

    kind = "refused"


class Expired(BridgeError):
    kind = "expired"


class Cancelled(BridgeError):
    kind = "cancelled"


class ProbeTimeout(BridgeError):
    kind = "timeout"


class ConnectionRefused(BridgeError):
    kind = "connection_refused"


class AuthFailed(BridgeError):
    kind = "auth_failed"


class ProtocolError(BridgeError):
    kind = "protocol_error"


class CredentialError(BridgeError):
    kind = "credential_error"


class ConfigError(BridgeError):
    """Configuration is invalid; ``field`` names the key at fault.

    ``problems``: each problem on its own (``key: cause``) when there are several.
    """

    kind = "config_error"

    def __init__(self, message: str, *, field: str | None = None) -> None:
        super().__init__(message, field=field)
        self.problems: list[str] = [str(self)]


class BrokerRefused(BridgeError):
    """The broker refused us for good (bad credentials, not authorised): do not retry.

    ``retry`` is True only for :class:`BrokerUnavailable` (nothing answered): those a
    bridge waiting for its broker (``run --wait-for-broker``) tries again.
    """

    kind = "broker_refused"
    retry = False


class BrokerNotAuthorised(BrokerRefused):
    """The broker answered and said no: CONNACK with a bad user name, password or ACL."""

    kind = "not_authorised"


class BrokerUnavailable(BrokerRefused):
    """No broker to talk to (yet): worth another try."""

    kind = "broker_unavailable"
    retry = True


class BrokerUnreachable(BrokerUnavailable):
    """No answer at all: no route, the name does not resolve, or the attempt timed out."""

    kind = "unreachable"


class BrokerConnectionRefused(BrokerUnavailable):
    """The host answered with a TCP reset: nothing listens on that port."""

    kind = "refused"


class HostKeyMismatch(BridgeError):
    """The target's SSH host key is not the one on record (or unknown under strict)."""

    kind = "host_key_mismatch"


class TlsError(BridgeError):
    """TLS failed: certificate verification or the handshake."""

    kind = "tls_error"


class Unreachable(BridgeError):
    """No route, host unreachable, or the name does not resolve."""

    kind = "unreachable"


# The ``extra`` key of a log record that warns about an insecure default (an anonymous
# broker, unsigned jobs): a program that made that choice on purpose, such as the demo on
# its own private broker, may filter exactly those records.
INSECURE_DEFAULT = "insecure_default"
# The words those warnings start with, for readers of a text log (the benchmarks).
INSECURE_DEFAULT_NOTE = "insecure default:"
