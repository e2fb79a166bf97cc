"""JSON log lines read back: `xdpflow run --log-format json` and the tools' own collectors print
one JSON object a line, among lines that are not JSON at all (a traceback, a child's chatter).

A line is an event if it parses as a JSON object; anything else is skipped by the readers here
and left to the caller to keep or drop (json_object returns None for it).
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from typing import Any


def json_object(line: str) -> dict[str, Any] | None:
    """The JSON object on `line`, or None when the line is anything else."""
    text = line.strip()
    if not text.startswith("{"):
        return None
    try:
        obj = json.loads(text)
    except ValueError:
        return None
    return obj if isinstance(obj, dict) else None


def json_events(text: str) -> Iterator[dict[str, Any]]:
    """JSON log lines (others skipped) in order."""
    for line in text.splitlines():
        obj = json_object(line)
        if obj is not None:
            yield obj


def find_event(text: str, event: str) -> dict[str, Any] | None:
    """The last line of `event` in `text` (a later report supersedes an earlier one)."""
    found = None
    for obj in json_events(text):
        if obj.get("event") == event:
            found = obj
    return found
