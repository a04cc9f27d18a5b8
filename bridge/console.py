"""The terminal console every command prints through (rich), set up one way.

Rich turns ``:name:`` in printed text into an emoji by default, so a certificate
fingerprint ``…6B:CD:36…`` or a MAC address ``02:ab:…`` came out with 💿 or 🆎 in it.
Nothing midbridge prints uses emoji codes: they are off here.
"""

from __future__ import annotations

from typing import IO, Any

from rich.console import Console


def make_console(file: IO[str] | None = None, **options: Any) -> Console:
    """A rich ``Console`` whose text is printed as it is written: no emoji codes."""
    return Console(file=file, emoji=False, **options)
