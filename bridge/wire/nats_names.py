"""The wire contract's topics as NATS subjects, and the names of the JetStream streams.

A topic's levels become a subject's tokens: ``ecc/dc1/output/interactive`` is
``ecc.dc1.output.interactive``. A character NATS gives a meaning to (``.``, ``*``, ``>``,
white space) and ``%`` itself are written ``%XX`` inside a token, so every topic maps to
one subject and back: the agent ``dc.1`` is the token ``dc%2E1``.

Streams (docs/wire-contract.md, *NATS JetStream*), ``<P>`` being the prefix made a name:

- ``<P>_jobs_<agent>``: one MID's jobs, work-queue retention; subjects
  ``<prefix>.<agent>.output`` (bulk) and ``<prefix>.<agent>.output.interactive``;
- ``<P>_inputs``: every MID's results, interest retention (kept until every consumer
  took them); ``<prefix>.*.input``;
- ``<P>_status``: every MID's status record, the last one per subject;
  ``<prefix>.*.status``.

Stream and consumer names may hold only ``A-Za-z0-9-``; anything else is written ``_XX``
(``_`` itself is ``_5F``), so names never collide.
"""

from __future__ import annotations

import re

_SPECIAL = re.compile(r"[%.*>\s]")
_ESCAPED = re.compile(r"%([0-9A-F]{2})")
_NAME_SPECIAL = re.compile(r"[^A-Za-z0-9-]")


def _token(level: str) -> str:
    return _SPECIAL.sub(lambda m: f"%{ord(m.group()):02X}", level) if level else "%00"


def subject_of(topic: str) -> str:
    """The NATS subject of a topic (MQTT's single-level wildcard ``+`` becomes ``*``)."""
    return ".".join("*" if level == "+" else _token(level) for level in topic.split("/"))


def topic_of(subject: str) -> str:
    """The topic a subject stands for (the inverse of :func:`subject_of`)."""
    levels = []
    for token in subject.split("."):
        level = _ESCAPED.sub(lambda m: chr(int(m.group(1), 16)), token)
        levels.append("" if level == "\0" else level)
    return "/".join(levels)


def name_of(text: str) -> str:
    """``text`` as a stream or consumer name."""
    return _NAME_SPECIAL.sub(lambda m: f"_{ord(m.group()):02X}", text)


def jobs_stream(prefix: str, agent: str) -> str:
    return f"{name_of(prefix)}_jobs_{name_of(agent)}"


def inputs_stream(prefix: str) -> str:
    return f"{name_of(prefix)}_inputs"


def status_stream(prefix: str) -> str:
    return f"{name_of(prefix)}_status"


def agent_of(prefix: str, topic: str) -> str | None:
    """The agent of ``<prefix>/<agent>/...``, or None for a topic outside the prefix."""
    head = prefix + "/"
    if not topic.startswith(head):
        return None
    agent = topic[len(head) :].split("/", 1)[0]
    return agent or None
