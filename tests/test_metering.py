"""Spend metering: the usage parser (SSE and JSON, any chunking, gzip), the price table, the reported figures made
safe, and the proxy adding each answer's price to its turn and session in the real database."""
from __future__ import annotations

import gzip
import json
import math
import threading
import uuid
from dataclasses import replace
from decimal import Decimal

import pytest
from sqlalchemy import select

from core.db import transaction
from core.errors import ConfigError
from core.models import Session, Turn
from core.pricing import DEFAULT_PRICES, PriceTable
from core.settings import Settings
from tests.conftest import wait_for
from tests.model_server import ModelServer
from tests.test_model_proxy import db, post  # noqa: F401 (db: the fixture)
from workers.metering import BYTES_PER_ESTIMATED_TOKEN, UsageMeter
from workers.model_proxy import build_server, mint_model_credential, start_in_thread
from workers.turn_output import parse_line, reported_figures

START = {"type": "message_start", "message": {
    "id": "msg_1", "type": "message", "role": "assistant", "model": "claude-sonnet-4-5-20250929", "content": [],
    "usage": {"input_tokens": 120, "cache_creation_input_tokens": 3000, "cache_read_input_tokens": 40000,
              "output_tokens": 1}}}
DELTA = {"type": "message_delta", "delta": {"stop_reason": "end_turn"}, "usage": {"output_tokens": 512}}


def sse(*events: dict, text: str = "hello world") -> bytes:
    frames = [("message_start", events[0])]
    frames += [("content_block_start", {"type": "content_block_start", "index": 0,
                                        "content_block": {"type": "text", "text": ""}})]
    frames += [("content_block_delta", {"type": "content_block_delta", "index": 0,
                                        "delta": {"type": "text_delta", "text": word}}) for word in text.split()]
    frames += [(e["type"], e) for e in events[1:]] + [("message_stop", {"type": "message_stop"})]
    return b"".join(f"event: {name}\r\ndata: {json.dumps(body)}\r\n\r\n".encode() for name, body in frames)


def metered(data: bytes, step: int, content_type: str = "text/event-stream", encoding: str | None = None,
            status: int = 200):
    meter = UsageMeter(status, content_type, encoding)
    for at in range(0, len(data), step):
        meter.feed(data[at:at + step])
    return meter.finish()


@pytest.mark.parametrize("step", [1, 7, 64, 1 << 20])
def test_a_stream_is_metered_from_message_start_and_message_delta_however_it_is_cut(step):
    usage = metered(sse(START, DELTA), step)
    assert usage.model == "claude-sonnet-4-5-20250929" and not usage.estimated
    assert usage.counts == {"input_tokens": 120, "output_tokens": 512, "cache_creation_input_tokens": 3000,
                            "cache_read_input_tokens": 40000, "cache_write_1h_tokens": 0}


def test_cumulative_counts_in_a_later_message_delta_replace_the_earlier_ones():
    later = dict(DELTA, usage={"input_tokens": 130, "output_tokens": 600, "cache_read_input_tokens": 40001})
    usage = metered(sse(START, DELTA, later), 13)
    assert (usage.counts["input_tokens"], usage.counts["output_tokens"], usage.counts["cache_read_input_tokens"],
            usage.counts["cache_creation_input_tokens"]) == (130, 600, 40001, 3000)


def test_a_gzipped_stream_and_a_gzipped_json_answer_are_read_too():
    assert metered(gzip.compress(sse(START, DELTA)), 5, encoding="gzip").counts["output_tokens"] == 512
    answer = dict(START["message"], content=[{"type": "text", "text": "x"}], usage=dict(
        START["message"]["usage"], output_tokens=77, cache_creation={"ephemeral_1h_input_tokens": 1000}))
    usage = metered(gzip.compress(json.dumps(answer).encode()), 3, "application/json; charset=utf-8", "gzip")
    assert usage.counts["output_tokens"] == 77 and usage.counts["cache_write_1h_tokens"] == 1000


def test_a_json_answer_is_metered_and_free_or_failed_answers_cost_nothing():
    answer = dict(START["message"], content=[{"type": "text", "text": "hi"}], usage=dict(START["message"]["usage"],
                                                                                          output_tokens=9))
    usage = metered(json.dumps(answer).encode(), 10, "application/json")
    assert usage.model == START["message"]["model"] and usage.counts["output_tokens"] == 9
    assert metered(b'{"input_tokens": 10}', 4, "application/json") is None  # count_tokens
    error = b'{"type": "error", "error": {"type": "overloaded_error", "message": "x"}}'
    assert metered(error, 4, "application/json", status=529) is None
    assert metered(b"<html>", 4, "text/html") is None


def test_a_huge_content_line_is_skipped_not_held_and_usage_after_it_still_counts():
    meter = UsageMeter(200, "text/event-stream", None)
    data = sse(START, DELTA, text="word " * 1 + ("x" * (1 << 20)))
    for at in range(0, len(data), 4096):
        meter.feed(data[at:at + 4096])
        assert len(meter._line) <= 256 * 1024
    assert meter.finish().counts["output_tokens"] == 512


def test_a_stream_cut_before_its_usage_is_charged_at_least_one_token_per_two_bytes_read():
    data = sse(START, DELTA, text="a " * 5000)
    cut = data[:data.index(b"event: message_delta")]
    usage = metered(cut, 999)
    assert usage.estimated and usage.counts["input_tokens"] == 120
    assert usage.counts["output_tokens"] == len(cut) // BYTES_PER_ESTIMATED_TOKEN > 512


def test_an_unreadable_encoding_is_charged_by_its_size_at_the_default_price():
    usage = metered(b"\x00" * 1000, 100, encoding="br")
    assert usage.estimated and usage.model == "" and usage.counts["output_tokens"] == 501
    table = PriceTable.parse("")
    assert table.price(usage.model) == DEFAULT_PRICES["default"]


def test_prices_are_found_by_the_longest_prefix_and_unknown_models_pay_the_dearest_price():
    table = PriceTable.parse("")
    assert table.price("claude-opus-4-5-20251101") == DEFAULT_PRICES["claude-opus-4-5"]
    assert table.price("claude-opus-4-1-20250805") == DEFAULT_PRICES["claude-opus-4"]
    assert table.price("claude-haiku-4-5-20251001").output == Decimal(5)
    default = table.price("some-new-model")
    for price in DEFAULT_PRICES.values():
        assert all(getattr(default, f) >= getattr(price, f) for f in ("input", "output", "cache_write", "cache_read"))
    assert table.price(None) == default


def test_a_cost_is_tokens_times_price_per_million_rounded_up_to_the_micro_dollar():
    table = PriceTable.parse("")
    counts = {"input_tokens": 120, "output_tokens": 512, "cache_creation_input_tokens": 3000,
              "cache_read_input_tokens": 40000}
    price = DEFAULT_PRICES["claude-sonnet-4"]
    expected = (120 * price.input + 512 * price.output + 3000 * price.cache_write + 40000 * price.cache_read) / 10 ** 6
    assert table.cost("claude-sonnet-4-5", counts) == expected.quantize(Decimal("0.000001"))
    assert table.cost("claude-3-haiku", {"cache_read_input_tokens": 1}) == Decimal("0.000001")  # 3e-8, up
    # A 1-hour cache write costs twice the input price.
    one_hour = table.cost("claude-sonnet-4", {"cache_creation_input_tokens": 10 ** 6, "cache_write_1h_tokens": 10 ** 6})
    assert one_hour == 2 * price.input


def test_the_price_table_can_be_overridden_and_a_bad_one_stops_start_up():
    table = PriceTable.parse(json.dumps({"my-model": {"input": 1, "output": 2, "cache_write": 3, "cache_read": "0.5"},
                                         "default": {"input": 9, "output": 9, "cache_write": 9, "cache_read": 9}}))
    assert table.cost("my-model-v2", {"output_tokens": 10 ** 6}) == 2
    assert table.cost("other", {"input_tokens": 10 ** 6}) == 9
    assert table.price("claude-opus-4-5") == DEFAULT_PRICES["claude-opus-4-5"]
    rest = '"output": 1, "cache_write": 1, "cache_read": 1'
    for bad in ("[1]", "{", '{"m": {"input": 1}}', '{"m": {"input": -1, %s}}' % rest,
                '{"m": {"input": "NaN", %s}}' % rest, '{"m": {"input": true, %s}}' % rest,
                '{"m": {"input": 1, "extra": 1, %s}}' % rest):
        with pytest.raises(ConfigError, match="CCD_MODEL_PRICES"):
            Settings.from_env({"JWT_SECRET": "x" * 32, "CCD_MODEL_PRICES": bad})


@pytest.mark.parametrize("reported, shown", [
    (-1000, Decimal("-1000")), (1e300, Decimal("99999999.999999")), (-1e300, Decimal("-99999999.999999")),
    (10 ** 400, Decimal("99999999.999999")), ("12.5", None), (True, None), (None, None),
    (0.1234567, Decimal("0.123457")),
])
def test_a_reported_cost_is_shown_clamped_into_its_column_or_not_at_all(reported, shown):
    assert reported_figures({"total_cost_usd": reported})["reported_cost_usd"] == shown


def test_nan_infinity_and_overflowing_numbers_in_a_line_are_read_as_null():
    line = parse_line('{"type": "result", "total_cost_usd": NaN, "a": Infinity, "b": -Infinity, "c": 1e400, '
                      '"usage": {"input_tokens": 1e999}, "duration_ms": 12}')
    assert [line["total_cost_usd"], line["a"], line["b"], line["c"]] == [None] * 4
    assert line["usage"] == {"input_tokens": None}
    json.dumps(line, allow_nan=False)  # standard JSON, as Postgres and clients take it


def test_reported_figures_fit_their_columns_whatever_the_line_holds():
    figures = reported_figures({"result": {"not": "text"}, "usage": [1, 2], "duration_ms": 1e300})
    assert figures == {"result": '{"not": "text"}', "usage": None, "reported_cost_usd": None, "duration_ms": None}
    assert reported_figures({"duration_ms": 2 ** 40})["duration_ms"] is None
    assert reported_figures({"duration_ms": 1500.0, "usage": {"input_tokens": 3}}) == {
        "result": None, "usage": {"input_tokens": 3}, "reported_cost_usd": None, "duration_ms": 1500}
    assert not math.isnan(float(reported_figures({"total_cost_usd": 0.5})["reported_cost_usd"]))
    nul = reported_figures({"result": "a\x00b", "usage": {"k\x00": ["\x00"], "n": 1}})
    assert (nul["result"], nul["usage"]) == ("a\ufffdb", {"k\ufffd": ["\ufffd"], "n": 1})


# The proxy, metering into the run's real database.

@pytest.fixture(scope="module")
def model():
    server = ModelServer("127.0.0.1", 0).start()
    yield server
    server.stop()


@pytest.fixture(scope="module")
def proxy(settings, model):
    server = build_server(replace(settings, anthropic_base_url=model.url), "127.0.0.1", 0)
    start_in_thread(server)
    yield server
    server.shutdown()
    server.server_close()


def session_with_turn(db) -> tuple[str, str]:
    with transaction(db) as s:
        row = Session(owner="meter-owner", config={}, workspace={}, status="busy", claude_session_id=uuid.uuid4())
        s.add(row)
        s.flush()
        row.root_id = row.id
        turn = Turn(session_id=row.id, seq=1, prompt="p", status="running")
        s.add(turn)
        s.flush()
        return str(row.id), str(turn.id)


def expected_cost(answers: list[dict]) -> Decimal:
    """The price of what the model reported, worked out here from the table's numbers."""
    table, total = PriceTable.parse(""), Decimal(0)
    for answer in answers:
        price, usage = table.price(answer["model"]), answer["usage"]
        cost = (usage["input_tokens"] * price.input + usage["output_tokens"] * price.output
                + usage["cache_creation_input_tokens"] * price.cache_write
                + usage["cache_read_input_tokens"] * price.cache_read) / 10 ** 6
        total += cost.quantize(Decimal("0.000001"), rounding="ROUND_CEILING")
    return total


def session_cost(db, sid: str) -> Decimal:
    with transaction(db) as s:
        return s.scalar(select(Session.cost_usd).where(Session.id == uuid.UUID(sid)))


def metered_cost(db, tid: str, expected: Decimal) -> None:
    """Waits for the turn's metered cost to reach `expected`; fails showing what it is."""
    def read() -> Decimal:
        with transaction(db) as s:
            return s.scalar(select(Turn.cost_usd).where(Turn.id == uuid.UUID(tid)))
    try:
        wait_for(lambda: read() == expected, 10, what="the turn's metered cost")
    except AssertionError:
        assert read() == expected
        raise


def body_of(model_name: str, stream: bool, text: str) -> bytes:
    return json.dumps({"model": model_name, "stream": stream, "tools": [{"name": "Bash"}], "max_tokens": 100,
                       "messages": [{"role": "user", "content": "earlier"}, {"role": "assistant", "content": "ok"},
                                    {"role": "user", "content": f"SAY: {text}"}]}).encode()


def test_each_answer_through_the_proxy_adds_its_price_to_the_turn_and_the_session(db, proxy, model, settings):
    sid, tid = session_with_turn(db)
    credential = mint_model_credential(settings.jwt_secret, sid, 60, tid)
    before = len(model.answers)
    for name, stream in (("claude-sonnet-4-5-20250929", True), ("claude-haiku-4-5-20251001", False),
                         ("an-unknown-model", True)):
        conn, resp = post(proxy.url, {"x-api-key": credential}, body_of(name, stream, "metered " * 50))
        assert resp.status == 200 and b"metered" in resp.read()
        conn.close()
    answers = model.answers[before:]
    assert len(answers) == 3 and all(a["usage"]["output_tokens"] > 1 for a in answers)
    metered_cost(db, tid, expected_cost(answers))  # counted after the answer was sent on: a moment later at most
    with transaction(db) as s:
        turn, session = s.get(Turn, uuid.UUID(tid)), s.get(Session, uuid.UUID(sid))
        assert turn.cost_usd == expected_cost(answers) > 0
        assert session.cost_usd == turn.cost_usd
        assert session.input_tokens == sum(a["usage"]["input_tokens"] for a in answers)
        assert session.output_tokens == sum(a["usage"]["output_tokens"] for a in answers)
        assert set(turn.metered_usage) == {a["model"] for a in answers}
        sonnet = turn.metered_usage["claude-sonnet-4-5-20250929"]
        assert sonnet == {k: answers[0]["usage"][k] for k in sonnet}


def test_answers_of_one_turn_at_once_all_add_up(db, proxy, model, settings):
    sid, tid = session_with_turn(db)
    credential = mint_model_credential(settings.jwt_secret, sid, 60, tid)
    before = len(model.answers)

    def ask(n: int) -> None:
        conn, resp = post(proxy.url, {"x-api-key": credential}, body_of("claude-opus-4-5", n % 2 == 0, f"n{n} " * n))
        resp.read()
        conn.close()

    threads = [threading.Thread(target=ask, args=(n,)) for n in range(12)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)
    answers = model.answers[before:]
    assert len(answers) == 12
    metered_cost(db, tid, expected_cost(answers))
    with transaction(db) as s:
        turn = s.get(Turn, uuid.UUID(tid))
        assert turn.cost_usd == expected_cost(answers)
        outputs = sum(a["usage"]["output_tokens"] for a in answers)
        assert turn.metered_usage["claude-opus-4-5"]["output_tokens"] == outputs
        assert s.scalar(select(Session.cost_usd).where(Session.id == uuid.UUID(sid))) == turn.cost_usd


def test_a_credential_without_a_turn_still_charges_its_session(db, proxy, model, settings):
    sid, tid = session_with_turn(db)
    before = len(model.answers)
    conn, resp = post(proxy.url, {"x-api-key": mint_model_credential(settings.jwt_secret, sid, 60)},
                      body_of("claude-sonnet-4-5", True, "x"))
    resp.read()
    conn.close()
    expected = expected_cost(model.answers[before:])
    wait_for(lambda: session_cost(db, sid) == expected, 10, what="the session's metered cost")
    with transaction(db) as s:
        assert s.get(Session, uuid.UUID(sid)).cost_usd == expected > 0
        assert s.get(Turn, uuid.UUID(tid)).cost_usd == 0


def test_a_stream_the_client_cuts_short_is_still_charged_no_less_than_the_model_reported(db, proxy, model, settings):
    sid, tid = session_with_turn(db)
    before = len(model.answers)
    conn, resp = post(proxy.url, {"x-api-key": mint_model_credential(settings.jwt_secret, sid, 60, tid)},
                      body_of("claude-sonnet-4-5", True, "x").replace(b"SAY: x", b"SLOW: 2"))
    assert resp.status == 200 and b"message_start" in resp.read1(65536)
    conn.sock.close()  # gone before the answer's closing usage
    conn.close()
    wait_for(lambda: session_cost(db, sid) > 0, 20, what="the cut stream to be charged")
    reported = model.answers[before]["usage"]
    with transaction(db) as s:
        counts = s.get(Turn, uuid.UUID(tid)).metered_usage["claude-sonnet-4-5"]
    assert counts["input_tokens"] == reported["input_tokens"]
    assert counts["output_tokens"] >= reported["output_tokens"], (counts, reported)


def test_a_client_that_resets_before_the_answer_arrives_is_still_charged_its_input(db, proxy, model, settings):
    """The client sends its request and resets the connection at once: the proxy's relay fails before anything
    reached it, and the upstream's answer must still be metered (read on to its message_start)."""
    import socket
    import struct

    sid, tid = session_with_turn(db)
    before = len(model.answers)
    body = body_of("claude-sonnet-4-5", True, "x").replace(b"SAY: x", b"WAIT: 2")
    host, port = proxy.url.removeprefix("http://").split(":")
    sock = socket.create_connection((host, int(port)))
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))  # close = RST
    head = (f"POST /v1/messages?beta=true HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
            f"x-api-key: {mint_model_credential(settings.jwt_secret, sid, 60, tid)}\r\n"
            f"Content-Length: {len(body)}\r\n\r\n").encode()
    asked = len(model.requests)
    sock.sendall(head + body)
    wait_for(lambda: len(model.requests) > asked, 20, what="the model to take the request")
    sock.close()  # while the model has not answered yet: the proxy's first write to this client fails
    wait_for(lambda: session_cost(db, sid) > 0, 20, what="the reset request to be charged")
    with transaction(db) as s:
        counts = s.get(Turn, uuid.UUID(tid)).metered_usage["claude-sonnet-4-5"]
    assert counts["input_tokens"] == model.answers[before]["usage"]["input_tokens"] > 0


def test_a_hot_process_credential_charges_whichever_turn_of_its_session_the_process_runs(db, proxy, model, settings):
    sid, first = session_with_turn(db)
    process = uuid.uuid4()
    with transaction(db) as s:
        s.get(Turn, uuid.UUID(first)).process_id = process  # serve started the process for turn 1
    credential = mint_model_credential(settings.jwt_secret, sid, 60, process_id=str(process))

    def answer_once() -> list[dict]:
        before = len(model.answers)
        conn, resp = post(proxy.url, {"x-api-key": credential}, body_of("claude-sonnet-4-5", True, "hot " * 20))
        assert resp.status == 200 and b"hot" in resp.read()
        conn.close()
        return model.answers[before:]

    one = answer_once()
    metered_cost(db, first, expected_cost(one))
    # Turn 1 ends; turn 2 runs on the same hot process (the session reports it; turn 2 was minted another).
    with transaction(db) as s:
        s.get(Turn, uuid.UUID(first)).status = "succeeded"
        s.get(Session, uuid.UUID(sid)).process_id = process
        second = Turn(session_id=uuid.UUID(sid), seq=2, prompt="p", status="running", process_id=uuid.uuid4())
        s.add(second)
        s.flush()
        second = str(second.id)
    two = answer_once()
    metered_cost(db, second, expected_cost(two))
    wait_for(lambda: session_cost(db, sid) == expected_cost(one + two), 10, what="the session's metered cost")
    with transaction(db) as s:
        assert s.get(Turn, uuid.UUID(first)).cost_usd == expected_cost(one) > 0  # nothing of turn 2's on turn 1
        assert set(s.get(Turn, uuid.UUID(second)).metered_usage) == {"claude-sonnet-4-5"}
