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


def stream_bytes(log: EventLog, sid: str) -> int:
    """What the stream holds, counted as the cap counts it: field names and values, in bytes."""
    return sum(len(k.encode()) + len(v.encode()) for _, fields in log.redis.xrange(log.key(sid)) for k, v in fields.items())


def test_large_events_are_trimmed_to_the_byte_cap_and_an_old_since_gets_a_gap_first(api_settings, auth):
    max_bytes = 200_000
    app = create_app(replace(api_settings, events_max_bytes=max_bytes, max_event_bytes=max_bytes))
    client = app.test_client()
    sid = client.post("/api/v1/sessions", json={}, headers=auth("bytes")).get_json()["id"]
    log = EventLog(redis.Redis.from_url(api_settings.redis_url, decode_responses=True), api_settings.key_prefix,
                   MAXLEN * 1000, max_bytes)
    # Far under the entry cap, far over the byte cap; through both publishing paths (the web's, the worker's).
    ids = log.publish_many(Event(session_id=sid, type="claude.stream_event", data={"n": n, "pad": "x" * 5000})
                           for n in range(100))
    marked = log.publish_marked_many([(Event(session_id=sid, turn_id="t", type="claude.assistant",
                                             data={"n": 100 + n, "pad": "x" * 7000}), n, "last") for n in range(20)],
                                     "t-bytes")
    assert all(marked)
    held = stream_bytes(log, sid)
    assert max_bytes - 8000 < held <= max_bytes, held  # trimmed to the cap, and no further than one event
    assert int(log.redis.get(log.bytes_key(sid))) == held  # the counter is exact, not an estimate
    assert log.redis.xlen(log.key(sid)) < 100

    page = client.get(f"/api/v1/sessions/{sid}/events", query_string={"since": ids[0], "limit": 5},
                      headers=auth("bytes")).get_json()
    first, rest = page["items"][0], page["items"][1:]
    assert first["type"] == "stream.gap" and first["data"]["since"] == ids[0]
    assert rest[0]["id"] == log.read(sid, count=1)[0].id

    # One event larger than the cap stays (the newest is never trimmed), alone.
    huge = log.publish(Event(session_id=sid, type="claude.stream_event", data={"pad": "y" * (max_bytes + 10)}))
    assert [e.id for e in log.read(sid)] == [huge]
    assert int(log.redis.get(log.bytes_key(sid))) == stream_bytes(log, sid)
    log.delete(sid)
    assert not log.redis.exists(log.key(sid), log.bytes_key(sid))


def test_an_events_page_stops_at_its_byte_budget_and_the_pages_still_cover_every_event(api_settings, auth):
    budget = 50_000
    app = create_app(replace(api_settings, events_page_max_bytes=budget))
    client = app.test_client()
    sid = client.post("/api/v1/sessions", json={}, headers=auth("pages")).get_json()["id"]
    log = EventLog.from_settings(api_settings)
    ids = log.publish_many(Event(session_id=sid, type="claude.stream_event", data={"n": n, "pad": "z" * 3000})
                           for n in range(60))
    seen, since, pages = [], None, 0
    while True:
        resp = client.get(f"/api/v1/sessions/{sid}/events", query_string={"limit": 1000, **({"since": since} if since else {})},
                          headers=auth("pages"))
        page = resp.get_json()
        pages += 1
        assert len(resp.data) <= budget + 200, len(resp.data)  # the budget, and the page's own few keys
        if page["has_more"]:
            assert 0 < len(page["items"]) < 60 and page["next_since"] == page["items"][-1]["id"]
        seen += [item["id"] for item in page["items"]]
        since = page["next_since"]
        if not page["has_more"]:
            break
    assert seen == ids and pages >= 4  # every event once, in order, over several pages

    # The tree page keeps the same budget.
    tree = client.get(f"/api/v1/sessions/{sid}/events", query_string={"tree": "true", "limit": 1000},
                      headers=auth("pages"))
    assert len(tree.data) <= budget + 200 and tree.get_json()["has_more"] is True

    # An event larger than the budget still makes a page of its own, so a reader always moves on.
    big = log.publish(Event(session_id=sid, type="claude.stream_event", data={"pad": "w" * (2 * budget)}))
    page = client.get(f"/api/v1/sessions/{sid}/events", query_string={"since": ids[-1]},
                      headers=auth("pages")).get_json()
    assert [e["id"] for e in page["items"]] == [big] and page["has_more"] is False and page["next_since"] == big
