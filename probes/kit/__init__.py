"""Shared machinery for probes: worker fan-out, request deadlines, rate limits."""
