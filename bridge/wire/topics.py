"""The topics of one agent: the wire contract's addresses (docs/wire-contract.md)."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True, slots=True)
class Topics:
    output: str
    express: str
    input: str
    status: str

    @classmethod
    def for_agent(cls, prefix: str, agent: str) -> Topics:
        base = f"{prefix}/{agent}"
        return cls(
            f"{base}/output", f"{base}/output/interactive", f"{base}/input", f"{base}/status"
        )
