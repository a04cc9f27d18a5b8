"""What the commands print is the data as it is: rich's emoji codes are off.

A demo run failed in CI when its certificate's fingerprint held ``…6B:CD:36…``: rich's
default console printed ``6B💿36``. MAC addresses (``02:ab:…`` → 🆎) were at the same risk
in the CI tables. ``bridge.console.make_console`` is what every command prints through.
"""

from __future__ import annotations

import io

from rich.console import Console

from bridge.console import make_console
from bridge.demo.loop import ci_table

CODES = "fingerprint ED:FD:6B:CD:36:F0 tags :ok: :up: :id:"
CI = {
    "sys_class_name": "cmdb_ci_linux_server",
    "name": "db:cd:01",
    "ip_address": "127.0.0.11",
    "os": "Debian :cd: edition",
    "mac_address": "02:ab:cd:00:00:11,02:ab:cd:00:00:12",
}


def printed(console_of: type[Console] | None, *things: object) -> str:
    out = io.StringIO()
    console = make_console(out, width=200) if console_of is None else Console(file=out, width=200)
    for thing in things:
        console.print(thing)
    return out.getvalue()


def test_colons_in_data_are_printed_as_they_are() -> None:
    assert "💿" in printed(Console, CODES)  # rich's default, the premise of this file
    text = printed(None, CODES, ci_table([CI]))
    assert "ED:FD:6B:CD:36:F0" in text
    assert ":ok: :up: :id:" in text
    assert "db:cd:01" in text
    assert "Debian :cd: edition" in text
    assert "MAC 02:ab:cd:00:00:11 +1" in text
    assert not any(ord(ch) > 0x1F000 for ch in text)  # no emoji at all
