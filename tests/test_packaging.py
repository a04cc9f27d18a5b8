"""The wheel holds every package and the console script (what `pip install .` gives)."""

from __future__ import annotations

import subprocess
import sys
import zipfile
from pathlib import Path

from tests.harness import REPO


def test_wheel_contents(tmp_path: Path) -> None:
    subprocess.run(
        [
            sys.executable,
            "-m",
            "pip",
            "wheel",
            "--no-deps",
            "--no-build-isolation",
            "-q",
            "-w",
            str(tmp_path),
            str(REPO),
        ],
        check=True,
        capture_output=True,
        timeout=300,
    )
    [wheel] = list(tmp_path.glob("midbridge-*.whl"))
    names = set(zipfile.ZipFile(wheel).namelist())
    for package in ("bridge", "probes", "bench"):
        sources = sorted(p.relative_to(REPO).as_posix() for p in (REPO / package).rglob("*.py"))
        assert sources
        missing = [s for s in sources if s not in names]
        assert not missing, f"not in the wheel: {missing}"
    assert "bridge/py.typed" in names
    entry_points = next(n for n in names if n.endswith("entry_points.txt"))
    text = zipfile.ZipFile(wheel).read(entry_points).decode()
    assert "midbridge = bridge.cli:main" in text
    assert not any(n.startswith("tests/") for n in names)
