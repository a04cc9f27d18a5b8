"""The statuses an agent reports in its status record (docs/wire-contract.md)."""

STATUSES = ("Up", "Paused", "Draining", "Drained", "Down")
