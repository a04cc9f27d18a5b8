"""Compare `pip freeze` (stdin) with the lock file named on the command line.

Prints one line per package whose installed version differs from the lock, or that only
one side has; `scripts/test --latest` shows this before it runs the suite.
"""

from __future__ import annotations

import re
import sys
from pathlib import Path


def pins(lines: list[str]) -> dict[str, str]:
    found: dict[str, str] = {}
    for line in lines:
        name, sep, version = line.strip().partition("==")
        if sep and not name.startswith("#"):
            found[re.sub(r"[-_.]+", "-", name).lower()] = version
    return found


def main() -> int:
    locked = pins(Path(sys.argv[1]).read_text().splitlines())
    installed = pins(sys.stdin.read().splitlines())
    changes = [
        f"  {name}: {locked.get(name, '(not locked)')} -> {installed.get(name, '(not installed)')}"
        for name in sorted(locked.keys() | installed.keys())
        if locked.get(name) != installed.get(name)
    ]
    print("\n".join(changes) if changes else "  none: the newest releases are the locked ones")
    return 0


if __name__ == "__main__":
    sys.exit(main())
