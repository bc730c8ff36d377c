"""Stream retention: a session's stream is capped (MAXLEN), old events are trimmed, and a reader
whose `since` fell out of it is told so with a stream.gap event first."""
from dataclasses import replace

import redis

from core.envelope import Event
from core.events import EventLog
from web import create_app

MAXLEN = 50


def test_a_flood_of_events_is_trimmed_to_the_cap_and_an_old_since_gets_a_gap_first(api_settings, auth):
    app = create_app(replace(api_settings, events_maxlen=MAXLEN))
    client = app.test_client()
    sid = client.post("/api/v1/sessions", json={}, headers=auth("flood")).get_json()["id"]
    log = EventLog(redis.Redis.from_url(api_settings.redis_url, decode_responses=True),
                   api_settings.key_prefix, MAXLEN)
    ids = log.publish_many(Event(session_id=sid, type="claude.stream_event", data={"n": n}) for n in range(2000))

    kept = log.redis.xlen(log.key(sid))
    # Trimming is approximate (whole radix-tree nodes of 100 entries), never unbounded.
    assert kept < MAXLEN + 200, kept
    oldest_kept = log.read(sid)[0].id
    assert oldest_kept != ids[0]

    page = client.get(f"/api/v1/sessions/{sid}/events", query_string={"since": ids[0], "limit": 10},
                      headers=auth("flood")).get_json()
    first, rest = page["items"][0], page["items"][1:]
    assert first["type"] == "stream.gap" and first["data"]["since"] == ids[0]
    assert rest[0]["id"] == oldest_kept and [e["data"]["n"] for e in rest] == list(range(2000 - kept, 2000 - kept + 10))
