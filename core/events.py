"""Session event streams on Redis: publish, replay from an id, wait for new events, gap detection."""
from __future__ import annotations

import re
from typing import Iterable, Sequence

import redis

from core.envelope import Event, EnvelopeError
from core.settings import Settings


def parse_stream_id(value: str) -> tuple[int, int]:
    """'1732450000000-0' -> (1732450000000, 0); ValueError when it is not a stream id."""
    ms, _, seq = value.partition("-")
    return int(ms), int(seq or 0)


def id_before(value: str) -> str:
    """The stream id just before `value`, so an exclusive read from it includes `value`."""
    ms, seq = parse_stream_id(value)
    if seq:
        return f"{ms}-{seq - 1}"
    return f"{ms - 1}-18446744073709551615" if ms else "0-0"


# What Redis takes: ASCII digits (int() also takes "+1", " 1", "1_0", "١"), each part below 2**64.
STREAM_ID = re.compile(r"[0-9]{1,20}(-[0-9]{1,20})?")


def is_stream_id(value: str) -> bool:
    if not STREAM_ID.fullmatch(value):
        return False
    ms, seq = parse_stream_id(value)
    return ms < 2**64 and seq < 2**64


# Marks outlive any turn by far; they only matter while a turn can still be re-attached.
MARK_TTL_SECONDS = 7 * 86400
# Every stream has two caps: entries (CCD_EVENTS_MAXLEN) and bytes (CCD_EVENTS_MAX_BYTES). The bytes are
# the entries' field names and values, kept in a counter key next to the stream, so a publish pays for a
# counter update, and for the oldest entries it trims (never the newest), not for a scan. The counter
# counts from the first publish that had it: a stream written before it existed is undercounted by what
# it held then (never below zero), until that is trimmed.
# cap(stream, counter, added, maxlen, max_bytes) records `added` bytes, then trims the oldest entries
# until both caps hold.
CAP = """
local function cap(stream, counter, added, maxlen, max_bytes)
  local bytes = redis.call('INCRBY', counter, added)
  local length = redis.call('XLEN', stream)
  if length <= maxlen and bytes <= max_bytes then
    return
  end
  local removed, freed, after, threshold = 0, 0, '-', nil
  while threshold == nil do
    local entries = redis.call('XRANGE', stream, after, '+', 'COUNT', math.min(64, math.max(2, length - maxlen - removed + 1)))
    if #entries == 0 then
      break
    end
    for _, entry in ipairs(entries) do
      if (length - removed <= maxlen and bytes - freed <= max_bytes) or length - removed <= 1 then
        threshold = entry[1]
        break
      end
      local size, fields = 0, entry[2]
      for k = 1, #fields do
        size = size + #fields[k]
      end
      removed, freed, after = removed + 1, freed + size, '(' .. entry[1]
    end
  end
  if threshold ~= nil and removed > 0 then
    redis.call('XTRIM', stream, 'MINID', threshold)
  end
  if bytes - freed < 0 then
    freed = bytes
  end
  redis.call('DECRBY', counter, freed)
end

local function fields_size(args, first, last)
  local size = 0
  for k = first, last do
    size = size + #args[k]
  end
  return size
end
"""
# Events of one session, capped. KEYS: stream, byte counter. ARGV: maxlen, max bytes, then per event:
# field count, field names and values. Returns the ids.
PUBLISH_CAPPED = CAP + """
local ids, added, i = {}, 0, 3
while i <= #ARGV do
  local count = tonumber(ARGV[i])
  ids[#ids + 1] = redis.call('XADD', KEYS[1], '*', unpack(ARGV, i + 1, i + 2 * count))
  added = added + fields_size(ARGV, i + 1, i + 2 * count)
  i = i + 1 + 2 * count
end
cap(KEYS[1], KEYS[2], added, tonumber(ARGV[1]), tonumber(ARGV[2]))
return ids
"""
# Fenced: nothing is published (nil) when a later attempt took the turn or its final event is out, so a
# worker that lost its turn cannot publish. Otherwise each event gets its id, or false for a line already
# published (a "last" event numbered at or below the mark) or an event after the final one; the mark
# (last number, the ids of the first, last and final events, the attempt) is updated once.
# KEYS: stream, mark, byte counter. ARGV: maxlen, mark ttl, attempt, max bytes, then per event: number,
# id field, field count, field names and values.
PUBLISH_MARKED = CAP + """
local attempt = ARGV[3]
if tonumber(redis.call('HGET', KEYS[2], 'attempt') or '0') > tonumber(attempt)
   or redis.call('HEXISTS', KEYS[2], 'final') == 1 then
  return false
end
local number = redis.call('HGET', KEYS[2], 'number') or '-1'
local ids, marked, ended, added, i = {}, {}, false, 0, 5
while i <= #ARGV do
  local n, field, count = ARGV[i], ARGV[i + 1], tonumber(ARGV[i + 2])
  local id = false
  if not ended and not (field == 'last' and tonumber(n) <= tonumber(number)) then
    id = redis.call('XADD', KEYS[1], '*', unpack(ARGV, i + 3, i + 2 + 2 * count))
    added = added + fields_size(ARGV, i + 3, i + 2 + 2 * count)
    number, marked[field], ended = n, id, field == 'final'
  end
  ids[#ids + 1] = id
  i = i + 3 + 2 * count
end
if next(marked) then
  cap(KEYS[1], KEYS[3], added, tonumber(ARGV[1]), tonumber(ARGV[4]))
  local update = {'number', number, 'attempt', attempt}
  for field, id in pairs(marked) do
    update[#update + 1] = field
    update[#update + 1] = id
  end
  redis.call('HSET', KEYS[2], unpack(update))
  redis.call('EXPIRE', KEYS[2], ARGV[2])
end
return ids
"""
TAKE_MARK = """
if tonumber(redis.call('HGET', KEYS[1], 'attempt') or '0') < tonumber(ARGV[1]) then
  redis.call('HSET', KEYS[1], 'attempt', ARGV[1])
  redis.call('EXPIRE', KEYS[1], ARGV[2])
end
return redis.call('HGETALL', KEYS[1])
"""


class EventLog:
    """The events of every session, one Redis stream per session, trimmed to a maximum length and size."""

    def __init__(self, client: redis.Redis, prefix: str, maxlen: int,
                 max_bytes: int = Settings.events_max_bytes) -> None:
        self.redis = client
        self.prefix = prefix
        self.maxlen = maxlen
        self.max_bytes = max_bytes

    @classmethod
    def from_settings(cls, settings) -> "EventLog":
        # A bounded connect: an unreachable Redis is a quick 503 (redis_unavailable), not a hung request.
        return cls(redis.Redis.from_url(settings.redis_url, decode_responses=True, socket_connect_timeout=5),
                   settings.key_prefix, settings.events_maxlen, settings.events_max_bytes)

    def key(self, session_id: str) -> str:
        return f"{self.prefix}:events:{session_id}"

    def bytes_key(self, session_id: str) -> str:
        """The counter of the bytes the session's stream holds (see CAP)."""
        return f"{self.prefix}:events-bytes:{session_id}"

    def publish(self, event: Event) -> str:
        """Appends one event and returns its stream id."""
        return self.publish_many([event])[0]

    def publish_marked(self, event: Event, turn_id: str, number: int, id_field: str = "last",
                       attempt: int = 1) -> str | None:
        """Appends one event and, atomically with it, records in the turn's mark that wrapper line
        `number` is published and its stream id under `id_field` ("first", "last" or "final").

        A worker that re-attaches to a turn reads the mark to publish only what is missing, so
        every event of the turn is in the stream exactly once. Returns None, publishing nothing,
        when a later attempt took the turn over, the line is already there, or the turn's final
        event is.
        """
        ids = self.publish_marked_many([(event, number, id_field)], turn_id, attempt)
        return ids[0] if ids else None

    def publish_marked_many(self, marked: Sequence[tuple[Event, int, str]], turn_id: str,
                            attempt: int = 1) -> list[str | None] | None:
        """Appends events of one turn, each given as (event, wrapper line number, id field), in one
        round trip, fenced and marked as `publish_marked` does for one; the mark is updated once.

        Returns None, publishing nothing, when a later attempt took the turn over or its final event
        is out; otherwise each event's stream id, or None for one skipped (its line was already
        published, or it came after the final event).
        """
        if not marked:
            return []
        return self.publish_encoded_marked(marked[0][0].session_id,
                                           [(number, id_field, event.to_fields()) for event, number, id_field in marked],
                                           turn_id, attempt)

    def publish_encoded_marked(self, session_id: str, entries: Sequence[tuple[int, str, dict[str, str]]],
                               turn_id: str, attempt: int = 1) -> list[str | None] | None:
        """`publish_marked_many` for entries already encoded (Event.to_fields), as (number, id field, fields)."""
        if not entries:
            return []
        args: list = [self.maxlen, MARK_TTL_SECONDS, attempt, self.max_bytes]
        for number, id_field, fields in entries:
            args += [number, id_field, len(fields)]
            for name, value in fields.items():
                args += [name, value]
        return self._script(PUBLISH_MARKED)(keys=[self.key(session_id), self.mark_key(turn_id),
                                                  self.bytes_key(session_id)], args=args)

    def take_mark(self, turn_id: str, attempt: int) -> dict[str, str]:
        """Fences off earlier attempts' publishing and returns the turn's mark: `number` (the last
        wrapper line published), `attempt`, and the ids of its first, last and final events, as far
        as they were published; {} when nothing was."""
        flat = self._script(TAKE_MARK)(keys=[self.mark_key(turn_id)], args=[attempt, MARK_TTL_SECONDS])
        return dict(zip(flat[::2], flat[1::2], strict=True))

    def _script(self, source: str):
        scripts = self.__dict__.setdefault("_scripts", {})
        if source not in scripts:
            scripts[source] = self.redis.register_script(source)
        return scripts[source]

    def mark_key(self, turn_id: str) -> str:
        return f"{self.prefix}:turnmark:{turn_id}"

    def publish_many(self, events: Iterable[Event]) -> list[str]:
        """Appends events in one round trip, in order; their ids, in the same order."""
        by_session: dict[str, list[int]] = {}
        args: dict[str, list] = {}
        for index, event in enumerate(events):
            by_session.setdefault(event.session_id, []).append(index)
            fields = event.to_fields()
            args.setdefault(event.session_id, [self.maxlen, self.max_bytes]).append(len(fields))
            for name, value in fields.items():
                args[event.session_id] += [name, value]
        script, pipe = self._script(PUBLISH_CAPPED), self.redis.pipeline(transaction=False)
        for session_id in by_session:
            script(keys=[self.key(session_id), self.bytes_key(session_id)], args=args[session_id], client=pipe)
        ids: list[str] = [""] * sum(map(len, by_session.values()))
        for indexes, found in zip(by_session.values(), pipe.execute(), strict=True):
            for index, stream_id in zip(indexes, found, strict=True):
                ids[index] = stream_id
        return ids

    def read(self, session_id: str, since: str | None = None, count: int = 500) -> list[Event]:
        """Stored events after `since` (exclusive), or from the start, oldest first."""
        start = f"({since}" if since else "-"
        return self._decode(self.redis.xrange(self.key(session_id), min=start, count=count))

    def wait(self, session_id: str, after: str, block_ms: int, count: int = 500) -> list[Event]:
        """Events after `after`, waiting up to block_ms for the first one."""
        reply = self.redis.xread({self.key(session_id): after}, count=count, block=block_ms)
        return self._decode(reply[0][1]) if reply else []

    def wait_many(self, positions: dict[str, str], block_ms: int, count: int = 500) -> dict[str, list[Event]]:
        """Events after each session's position, waiting up to block_ms for the first one anywhere."""
        keys = {self.key(sid): sid for sid in positions}
        reply = self.redis.xread({key: positions[sid] for key, sid in keys.items()}, count=count, block=block_ms)
        return {keys[key]: self._decode(entries) for key, entries in reply or []}

    def last_id(self, session_id: str) -> str:
        """The newest id in the stream, or '0-0' when it is empty."""
        newest = self.redis.xrevrange(self.key(session_id), count=1)
        return newest[0][0] if newest else "0-0"

    def gap_after(self, session_id: str, since: str) -> str | None:
        """The newest trimmed id when events after `since` were trimmed away, else None."""
        try:
            info = self.redis.xinfo_stream(self.key(session_id))
        except redis.ResponseError:  # no such stream: nothing was ever trimmed
            return None
        deleted = info.get("max-deleted-entry-id") or "0-0"
        # MAXLEN trimming does not move max-deleted-entry-id (Redis 7.0): an event is also gone
        # when the stream lost entries and `since` is older than the first one it still holds.
        first = info.get("recorded-first-entry-id") or "0-0"
        if info.get("entries-added", 0) > info.get("length", 0) and parse_stream_id(first) > (0, 0):
            before_first = id_before(first)
            if parse_stream_id(before_first) > parse_stream_id(deleted):
                deleted = before_first
        if parse_stream_id(deleted) > parse_stream_id(since):
            return deleted
        return None

    def delete(self, session_id: str) -> None:
        self.redis.delete(self.key(session_id), self.bytes_key(session_id))

    @staticmethod
    def _decode(entries) -> list[Event]:
        events = []
        for stream_id, fields in entries:
            try:
                events.append(Event.decode(stream_id, fields))
            except EnvelopeError:
                continue  # a foreign entry in our key: skip it rather than break every reader
        return events
