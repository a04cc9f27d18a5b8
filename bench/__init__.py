"""Benchmarks run by ``midbridge bench NAME``: each measures a peer and midbridge side by side."""

from __future__ import annotations


def run_bench(name: str, *, as_json: bool, broker: tuple[str, int] | None, rounds: int) -> int:
    raise SystemExit(f"midbridge bench: no benchmark named {name!r} yet")
