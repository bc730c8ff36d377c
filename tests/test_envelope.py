"""The event envelope round-trips through a Redis stream entry and rejects malformed ones."""
import json

import pytest

from core.envelope import Event, EnvelopeError


def test_event_round_trips_through_stream_fields():
    event = Event(session_id="s1", turn_id="t1", seq=3, type="claude.assistant", data={"type": "assistant"})
    back = Event.decode("1732450000000-0", event.to_fields())
    assert back == Event(**{**event.asdict(), "id": "1732450000000-0"})
    frame = json.loads(back.to_json())
    assert list(frame) == ["id", "session_id", "turn_id", "seq", "type", "ts", "data"]
    assert frame["id"] == "1732450000000-0" and frame["data"] == {"type": "assistant"}


def test_decode_accepts_bytes_from_redis():
    event = Event(session_id="s1", type="session.status", data={"status": "ready"})
    fields = {b"e": event.to_fields()["e"].encode()}
    assert Event.decode(b"1-1", fields).id == "1-1"


def test_timestamp_is_utc_with_milliseconds():
    ts = Event(session_id="s", type="turn.queued", data={}).ts
    assert ts.endswith("Z") and len(ts.split(".")[1]) == 4


@pytest.mark.parametrize("fields,message", [
    ({}, "no envelope field"),
    ({"e": "not json"}, "not JSON"),
    ({"e": "[]"}, "not an object"),
    ({"e": json.dumps({"session_id": "s", "type": "turn.queued", "ts": "x"})}, "lacks"),
    ({"e": json.dumps({"session_id": "s", "type": "bogus", "ts": "x", "data": {}})}, "bad envelope type"),
    ({"e": json.dumps({"session_id": "s", "type": "claude.", "ts": "x", "data": {}})}, "bad envelope type"),
    ({"e": json.dumps({"session_id": "s", "type": "turn.failed", "ts": "x", "data": []})}, "bad envelope type"),
])
def test_decode_rejects_malformed_entries(fields, message):
    with pytest.raises(EnvelopeError, match=message):
        Event.decode("1-0", fields)
