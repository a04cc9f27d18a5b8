"""The demo: the whole loop on loopback (``midbridge demo``), its sample targets and the
embedded broker.

Its libraries (amqtt, pysnmp) are the ``demo`` extra (``pip install -c constraints.txt
'.[demo]'``, README command 1); without them, importing the demo is a one-line error
that names the extra (``midbridge demo`` prints it and exits 2), not a traceback.
"""

from importlib.util import find_spec

from bridge.cli_errors import CommandError

EXTRA_MODULES = ("amqtt", "pysnmp")


def missing_modules() -> list[str]:
    return [name for name in EXTRA_MODULES if find_spec(name) is None]


if missing_modules():
    raise CommandError(
        f"the demo and the benchmarks need the 'demo' extra ({', '.join(missing_modules())} "
        "not installed): pip install -c constraints.txt '.[demo]' (or 'midbridge[demo]')"
    )
