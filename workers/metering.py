"""Spend metering at the model proxy: reads a copy of each model answer's `usage` and adds its price to the turn
and the session the proxy let its request through for."""
from __future__ import annotations

import json
import logging
import uuid
import zlib
from dataclasses import dataclass, field
from decimal import Decimal
from typing import Callable

from sqlalchemy import text

from core.db import transaction
from core.pricing import PriceTable
from workers.publisher import retry_while_down

log = logging.getLogger(__name__)

LINE_CAP = 256 * 1024  # an SSE line longer than this is no message_start or message_delta: skipped, not held
JSON_CAP = 8 * 1024 * 1024  # a whole answer of the largest output the API allows is far smaller
DECODE_STEP = 64 * 1024
DRAIN_CAP = 1024 * 1024  # read on past a vanished client until message_start, at most this much
MAX_TOKENS = 10 ** 10  # per count, per answer: whatever an upstream says, a cost column cannot overflow
MAX_MODEL_CHARS = 100
# Without its closing usage (the client went away mid-stream), an answer is charged one output token per this many
# bytes of the stream read: more than its text or tool input ever holds, so a cut stream never costs less.
BYTES_PER_ESTIMATED_TOKEN = 2
COUNTS = ("input_tokens", "output_tokens", "cache_creation_input_tokens", "cache_read_input_tokens")
READABLE_ENCODINGS = {"": 0, "identity": 0, "gzip": 16 + zlib.MAX_WBITS, "x-gzip": 16 + zlib.MAX_WBITS,
                      "deflate": zlib.MAX_WBITS}
# What the proxy asks the upstream for, so that the meter can read every answer.
ACCEPT_ENCODING = "gzip, deflate"


@dataclass
class Usage:
    """The tokens one answer used, by the model that answered."""

    model: str
    counts: dict[str, int] = field(default_factory=dict)
    estimated: bool = False

    def priced(self, prices: PriceTable) -> Decimal:
        return prices.cost(self.model, self.counts)


def tokens(value) -> int:
    """A token count as the upstream wrote it, made a bounded non-negative int (anything else is 0)."""
    if isinstance(value, bool) or not isinstance(value, (int, float)) or value != value:
        return 0
    return int(max(0, min(value, MAX_TOKENS)))


class UsageMeter:
    """Follows one answer as it is relayed (`feed` each piece after it was sent on) and says what it used (`finish`).

    Streams (SSE) are read line by line, keeping at most one line of LINE_CAP: `message_start` gives the model
    and the input and cache counts, each `message_delta` the counts so far. A JSON answer is kept whole (up to
    JSON_CAP) and read at the end. It never raises: a relay must not fail because its copy could not be read.
    """

    def __init__(self, status: int, content_type: str | None, content_encoding: str | None) -> None:
        kind = (content_type or "").split(";")[0].strip().lower()
        encoding = (content_encoding or "").strip().lower()
        self.stream = kind == "text/event-stream"
        self.active = 200 <= status < 300 and (self.stream or kind == "application/json")
        self.unreadable = self.active and encoding not in READABLE_ENCODINGS
        wbits = READABLE_ENCODINGS.get(encoding, 0)
        self._inflate = zlib.decompressobj(wbits) if wbits else None
        self._line = bytearray()
        self._skipping = False
        self._body = bytearray()
        self.raw_bytes = 0
        self.model: str | None = None
        self.counts: dict[str, int] = {}
        self.cache_write_1h = 0
        self.started = False  # message_start seen
        self.closed = False  # message_delta seen: the counts are final
        self.stream_bytes = 0
        self.oversized = False

    def feed(self, data: bytes) -> None:
        if not self.active:
            return
        self.raw_bytes += len(data)
        if self.unreadable:
            return
        try:
            if self._inflate is None:
                self._take(data)
                return
            chunk = self._inflate.decompress(data, DECODE_STEP)
            while chunk:
                self._take(chunk)
                chunk = self._inflate.decompress(self._inflate.unconsumed_tail, DECODE_STEP)
        except zlib.error:
            log.warning("a model answer's %s body could not be decoded; it is charged by its size",
                        "gzip/deflate")
            self.unreadable = True

    def _take(self, data: bytes) -> None:
        if not self.stream:
            if len(self._body) + len(data) > JSON_CAP:
                self.oversized = True
                self._body = bytearray()
            elif not self.oversized:
                self._body += data
            return
        self.stream_bytes += len(data)
        start = 0
        while start < len(data):
            end = data.find(b"\n", start)
            piece = data[start:] if end < 0 else data[start:end]
            if not self._skipping:
                if len(self._line) + len(piece) > LINE_CAP:
                    self._skipping, self._line = True, bytearray()
                else:
                    self._line += piece
            if end < 0:
                return
            if not self._skipping:
                self._read_line(bytes(self._line))
            self._line, self._skipping = bytearray(), False
            start = end + 1

    def _read_line(self, line: bytes) -> None:
        if not line.startswith(b"data:"):
            return
        if b"message_start" not in line and b"message_delta" not in line:
            return
        try:
            event = json.loads(line[5:])
        except ValueError:
            return
        if not isinstance(event, dict):
            return
        if event.get("type") == "message_start" and isinstance(event.get("message"), dict):
            self.started = True
            self._take_usage(event["message"])
        elif event.get("type") == "message_delta":
            self.closed = True
            self._take_usage(event)

    def _take_usage(self, holder: dict) -> None:
        """The model, and each count the usage names (a later figure replaces an earlier: they are cumulative)."""
        if isinstance(holder.get("model"), str) and holder["model"]:
            self.model = holder["model"][:MAX_MODEL_CHARS]
        usage = holder.get("usage")
        if not isinstance(usage, dict):
            return
        for name in COUNTS:
            if name in usage:
                self.counts[name] = tokens(usage[name])
        creation = usage.get("cache_creation")
        if isinstance(creation, dict) and "ephemeral_1h_input_tokens" in creation:
            self.cache_write_1h = tokens(creation["ephemeral_1h_input_tokens"])

    def finish(self, response=None) -> Usage | None:
        """What the answer used, or None when it used nothing billable (an error, a token count). A JSON answer
        the client stopped reading is read to its end first (the upstream made all of it)."""
        if not self.active:
            return None
        try:
            if not self.stream and response is not None and not self.oversized and not self.unreadable:
                while not response.isclosed() and (data := response.read1(DECODE_STEP)):
                    self.feed(data)
            # A client that hung up before the stream's message_start (even before its headers were sent) must not
            # dodge the input it already cost: read on, a bounded amount, to the counts.
            drained = 0
            while (self.stream and not self.started and response is not None and drained < DRAIN_CAP
                   and not response.isclosed() and (data := response.read1(DECODE_STEP))):
                self.feed(data)
                drained += len(data)
        except Exception:  # the upstream went away too: charge what arrived
            pass
        try:
            return self._usage()
        except Exception:  # never let metering break a relay; say so, loudly
            log.exception("could not meter a model answer")
            return None

    def _usage(self) -> Usage | None:
        if self.unreadable or self.oversized:
            log.warning("a model answer could not be read for its usage (%d bytes, %s); charged as output tokens "
                        "of the default price", self.raw_bytes, "too large" if self.oversized else "encoding")
            return Usage("", {"output_tokens": self.raw_bytes // BYTES_PER_ESTIMATED_TOKEN + 1}, estimated=True)
        if not self.stream:
            try:
                answer = json.loads(bytes(self._body))
            except ValueError:
                return None
            if not isinstance(answer, dict) or not isinstance(answer.get("usage"), dict):
                return None  # e.g. count_tokens: free
            self._take_usage(answer)
        elif not self.started:
            return None
        counts = {name: self.counts.get(name, 0) for name in COUNTS}
        counts["cache_write_1h_tokens"] = self.cache_write_1h
        estimated = self.stream and not self.closed
        if estimated:
            counts["output_tokens"] = max(counts["output_tokens"], self.stream_bytes // BYTES_PER_ESTIMATED_TOKEN)
        return Usage(self.model or "", counts, estimated)


def _usage_entry(name: str) -> str:
    return f"'{name}', COALESCE((metered_usage -> :model ->> '{name}')::bigint, 0) + :{name}"


# One statement each, so concurrent answers of one turn add up (Postgres re-reads a row another update changed).
ADD_TO_TURN = text(
    "UPDATE turns SET cost_usd = cost_usd + :cost, metered_usage = COALESCE(metered_usage, '{}'::jsonb) || "
    "jsonb_build_object(CAST(:model AS text), jsonb_build_object("
    + ", ".join(_usage_entry(name) for name in COUNTS) + ")) WHERE id = :turn_id AND session_id = :session_id")
ADD_TO_SESSION = text("UPDATE sessions SET cost_usd = cost_usd + :cost, input_tokens = input_tokens + :input_tokens, "
                      "output_tokens = output_tokens + :output_tokens WHERE id = :session_id")


def usage_recorder(factory, prices: PriceTable) -> Callable[[uuid.UUID, uuid.UUID | None, Usage], None]:
    """Adds an answer's cost and tokens to its turn (the one the proxy's check gave: the credential's turn, or the
    turn its process ran when the request came; none for a credential naming neither) and to its session."""

    def record(session_id: uuid.UUID, turn_id: uuid.UUID | None, usage: Usage) -> None:
        cost = usage.priced(prices)
        values = {name: usage.counts.get(name, 0) for name in COUNTS}
        values.update(cost=cost, model=usage.model or "unknown", session_id=session_id, turn_id=turn_id)

        def add() -> None:
            with transaction(factory) as db:
                if turn_id is not None:
                    db.execute(ADD_TO_TURN, values)
                db.execute(ADD_TO_SESSION, values)

        try:
            retry_while_down(add, what=f"meter session {session_id}'s model answer")
        except Exception:
            log.exception("spend not recorded: session %s turn %s model %s tokens %s cost $%s", session_id, turn_id,
                          usage.model, values, cost)
            return
        if usage.estimated:
            log.info("session %s: a model answer ended before its usage; charged an estimate ($%s)", session_id, cost)

    return record
