"""How every midbridge command reports a failure: one line on stderr, one exit status.

``midbridge: error: <cause>`` (argparse's own prefix, the same for every command), then
exit status 2 (a wrong option, a bad configuration, a start that was refused), or the
status the :class:`CommandError` carries (1: the command ran and its work failed). A leaf
module: the instance, the relay, the demo and the benchmarks import it without importing
each other.
"""

from __future__ import annotations

import sys

ERROR_PREFIX = "midbridge: error: "
EXIT_REFUSED = 2  # usage, configuration, a start refused: nothing was done
EXIT_FAILED = 1  # the command ran, its work failed (a demo step, a benchmark)


class CommandError(Exception):
    """A failure to tell the user in one line; ``status`` is the command's exit status."""

    def __init__(self, message: str, *, status: int = EXIT_REFUSED) -> None:
        super().__init__(message)
        self.status = status


def fail(command: str, cause: object, *, status: int | None = None) -> int:
    """Print ``midbridge: error: <cause>`` on stderr; the exit status to return.

    ``command`` is kept for the callers' sake; the prefix is the same for every command.

    The status is ``status`` if given, else the one a :class:`CommandError` cause carries,
    else 2.
    """
    if status is None:
        status = cause.status if isinstance(cause, CommandError) else EXIT_REFUSED
    text = " ".join(str(cause).split("\n"))  # one line, whatever the cause's text
    print(f"{ERROR_PREFIX}{text}", file=sys.stderr, flush=True)
    return status
