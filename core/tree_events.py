"""A spawn tree's events as one stream: every member session's stream, merged in id order.

Each session keeps its own Redis stream, so a merged read needs one position per member.
The id of each merged event is a tree cursor ("tree." + base64 of {session: last id}) that
resumes after that event exactly once, like a plain stream id does for one session.
"""
from __future__ import annotations

import base64
import binascii
import json
import time
from dataclasses import replace
from typing import Callable, Iterator

from core.envelope import Event
from core.errors import ValidationFailed
from core.events import EventLog, is_stream_id, parse_stream_id

PREFIX = "tree."
REFRESH_MEMBERS_SECONDS = 2.0


def encode_cursor(positions: dict[str, str]) -> str:
    raw = json.dumps(positions, separators=(",", ":"), sort_keys=True).encode()
    return PREFIX + base64.urlsafe_b64encode(raw).decode().rstrip("=")


def decode_cursor(value: str | None) -> dict[str, str]:
    """The positions in a tree cursor; an empty cursor starts every member from its beginning."""
    if not value:
        return {}
    try:
        if not value.startswith(PREFIX):
            raise ValueError
        body = value[len(PREFIX):]
        positions = json.loads(base64.urlsafe_b64decode(body + "=" * (-len(body) % 4)))
        if not isinstance(positions, dict) or not all(isinstance(v, str) and is_stream_id(v)
                                                      for v in positions.values()):
            raise ValueError
        return positions
    except (ValueError, binascii.Error):
        raise ValidationFailed("since must be a tree cursor (the id of an event from ?tree=true)",
                               field="since") from None


def in_order(batches) -> list[Event]:
    """Events of several members (lists per member) in stream-id order."""
    return sorted((e for events in batches for e in events), key=lambda e: parse_stream_id(e.id))


def relabel(ordered: list[Event], positions: dict[str, str]) -> list[Event]:
    """Each event re-labelled with the tree cursor after it; `positions` advances with them."""
    out = []
    for event in ordered:
        positions[event.session_id] = event.id
        out.append(replace(event, id=encode_cursor(positions)))
    return out


def read(log: EventLog, members: list[str], positions: dict[str, str], count: int) -> list[Event]:
    """Up to `count` stored events of the tree after `positions`, oldest first."""
    ordered = in_order(log.read(m, positions.get(m), count=count) for m in members)
    return relabel(ordered[:count], positions)


def tail(log: EventLog, list_members: Callable[[], list[str] | None], positions: dict[str, str]
         ) -> Iterator[Event | None]:
    """The tree's events after `positions`, then live ones from every member, including members
    spawned later; yields None on quiet seconds; ends when `list_members` returns None (root gone)."""
    members, refreshed = list_members(), time.monotonic()
    while members is not None:
        batches = log.wait_many({m: positions.get(m, "0-0") for m in members}, 1000)
        events = relabel(in_order(batches.values()), positions)
        yield from events
        if not events:
            yield None
        if time.monotonic() - refreshed > REFRESH_MEMBERS_SECONDS:
            members, refreshed = list_members(), time.monotonic()
