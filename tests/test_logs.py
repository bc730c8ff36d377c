"""Structured logs: the formatters with real logging, request ids in the web, and a private stack with
LOG_FORMAT=json whose every printed line is JSON, carries the ids of its work, and holds no prompt or secret."""
from __future__ import annotations

import io
import json
import logging
import logging.config
import secrets
import threading
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

import pytest
import requests
import websocket

from core.errors import ConfigError
from core.logs import (TASK_HEADER, ContextFilter, JsonFormatter, bind_log_ids, gunicorn_log_config,
                       iterate_in_context, log_context, make_handler)
from core.migrate import prepare_database
from core.settings import Settings
from tests import stack
from tests.conftest import wait_for
from tests.test_e2e import FINAL, Api
from web.request_ids import stamp_task_headers

FIELDS = {"time", "level", "logger", "message"}


@contextmanager
def captured(fmt: str, logger_name: str = "ccd.test.logs") -> Iterator[tuple[logging.Logger, io.StringIO]]:
    """A real logger whose records go through our handler (format and ids filter) into a buffer."""
    out = io.StringIO()
    handler = make_handler(fmt, out)
    logger = logging.getLogger(logger_name)
    level, propagate = logger.level, logger.propagate
    logger.addHandler(handler)
    logger.setLevel(logging.DEBUG)
    logger.propagate = False
    try:
        yield logger, out
    finally:
        logger.removeHandler(handler)
        logger.setLevel(level)
        logger.propagate = propagate


def records(out: io.StringIO) -> list[dict]:
    return [json.loads(line) for line in out.getvalue().splitlines()]


def test_json_lines_parse_and_carry_the_ids_of_the_context_they_were_logged_in():
    with captured("json") as (log, out):
        log.info("before %s", "any context")
        with log_context(request_id="req-1", session_id="sess-1"):
            log.info("in a request")
            with log_context(turn_id="turn-1"):
                log.warning("in a turn")
            bind_log_ids(turn_id="turn-2")
            log.info("bound")
        log.info("after")
    first, in_request, in_turn, bound, after = records(out)
    assert FIELDS <= set(first) and not {"request_id", "session_id", "turn_id"} & set(first)
    assert first["message"] == "before any context" and first["level"] == "INFO"
    assert first["logger"] == "ccd.test.logs" and first["time"].endswith("Z") and "T" in first["time"]
    assert (in_request["request_id"], in_request["session_id"]) == ("req-1", "sess-1")
    assert "turn_id" not in in_request
    assert (in_turn["turn_id"], in_turn["request_id"], in_turn["level"]) == ("turn-1", "req-1", "WARNING")
    assert bound["turn_id"] == "turn-2"
    assert not {"request_id", "session_id", "turn_id"} & set(after)  # bind_log_ids ended with its log_context


def test_an_exception_and_a_multi_line_message_stay_on_one_json_line():
    with captured("json") as (log, out):
        with log_context(turn_id="t-9"):
            try:
                {}["missing"]
            except KeyError:
                log.exception("lookup failed\nsecond line\u2028third \u00e9")
    text = out.getvalue()
    assert text.count("\n") == 1 and len(text.splitlines()) == 1  # splitlines also cuts at U+2028
    (record,) = records(out)
    assert record["message"] == "lookup failed\nsecond line\u2028third \u00e9"
    assert record["exc_info"].startswith("Traceback") and "KeyError: 'missing'" in record["exc_info"]
    assert record["turn_id"] == "t-9" and record["level"] == "ERROR"


def test_text_lines_show_the_ids_and_keep_a_message_on_one_line():
    with captured("text") as (log, out):
        with log_context(request_id="r-7", session_id="s-7"):
            log.info("one\ntwo")
        log.info("plain")
    with_ids, plain = out.getvalue().splitlines()
    assert with_ids.endswith("INFO ccd.test.logs: one\\ntwo [request_id=r-7 session_id=s-7]")
    assert plain.endswith("INFO ccd.test.logs: plain")


def test_malformed_ids_are_not_logged_and_unknown_id_names_are_refused():
    with captured("json") as (log, out):
        with log_context(request_id="bad id\nwith a newline", session_id="x" * 129, turn_id="ok-1"):
            log.info("hello")
    (record,) = records(out)
    assert "request_id" not in record and "session_id" not in record and record["turn_id"] == "ok-1"
    with pytest.raises(ValueError):
        with log_context(user="alice"):
            pass


def test_credentials_in_messages_and_tracebacks_are_masked():
    jwt = "eyJhbGciOiJIUzI1NiJ9.eyJzdWIiOiJhbGljZSJ9.c2lnbmF0dXJlLXNpZ25hdHVyZQ"
    with captured("json") as (log, out):
        log.warning("token %s, header Bearer %s, key sk-ant-0123456789abcdef, url /x?token=%s&since=1, "
                    "redis://:hunter2pass@db:6379/0", jwt, "opaqueopaque123", "abcdefgh")
        try:
            raise RuntimeError(f"refused {jwt}")
        except RuntimeError:
            log.exception("failed")
    text = out.getvalue()
    for secret in (jwt, "opaqueopaque123", "sk-ant-0123456789abcdef", "abcdefgh", "hunter2pass"):
        assert secret not in text
    warning, failed = records(out)
    assert "since=1" in warning["message"] and "@db:6379/0" in warning["message"]
    assert "[jwt]" in failed["exc_info"]


def test_a_thread_started_in_a_copied_context_and_a_streamed_body_keep_the_ids():
    import contextvars

    with captured("json") as (log, out):
        with log_context(request_id="req-t"):
            thread = threading.Thread(target=contextvars.copy_context().run, args=(log.info, "from the thread"))
            body = iterate_in_context(log.info("from the body %d", i) or i for i in range(2))
        thread.start()
        thread.join()
        assert list(body) == [0, 1]  # iterated after the context ended, as a server iterates a streamed body
        log.info("outside")
    lines = records(out)
    assert [r.get("request_id") for r in lines] == ["req-t", "req-t", "req-t", None]


def test_the_context_filter_does_not_override_ids_given_explicitly():
    record = logging.LogRecord("x", logging.INFO, __file__, 1, "m", None, None)
    record.turn_id = "explicit"
    with log_context(turn_id="ambient", session_id="s"):
        ContextFilter().filter(record)
    assert (record.turn_id, record.session_id, record.request_id) == ("explicit", "s", None)


def test_log_format_setting_takes_text_or_json_only():
    assert Settings.from_env({"JWT_SECRET": "s" * 32}).log_format == "text"
    assert Settings.from_env({"JWT_SECRET": "s" * 32, "LOG_FORMAT": "json"}).log_format == "json"
    with pytest.raises(ConfigError, match="LOG_FORMAT"):
        Settings.from_env({"JWT_SECRET": "s" * 32, "LOG_FORMAT": "xml"})
    assert "s" * 32 not in repr(Settings.from_env({"JWT_SECRET": "s" * 32}))  # secrets stay out of reprs


def test_gunicorn_log_config_uses_our_formatter():
    config = gunicorn_log_config({"LOG_FORMAT": "json", "LOG_LEVEL": "warning"})
    assert config["root"]["level"] == "WARNING" and config["loggers"]["gunicorn.error"]["propagate"] is False
    # Applied as gunicorn applies it, to a logger of this test only (the root logger stays pytest's).
    logging.config.dictConfig({key: value for key, value in config.items() if key != "root"} | {
        "loggers": {"ccd.test.gunicorn": config["loggers"]["gunicorn.error"]},
        "handlers": {"console": {**config["handlers"]["console"], "stream": "ext://tests.test_logs.GUNICORN_OUT"}}})
    logger = logging.getLogger("ccd.test.gunicorn")
    try:
        with log_context(request_id="g-1"):
            logger.info("Booting worker")  # below the level
            logger.error("Worker exiting")
    finally:
        logger.handlers.clear()
    (record,) = records(GUNICORN_OUT)
    assert (record["message"], record["request_id"], record["level"]) == ("Worker exiting", "g-1", "ERROR")
    assert gunicorn_log_config({})["formatters"]["ccd"]["()"] is not JsonFormatter  # text by default


GUNICORN_OUT = io.StringIO()


def test_task_headers_carry_the_request_id_only_inside_a_request():
    headers: dict = {}
    stamp_task_headers(headers=headers)
    assert TASK_HEADER not in headers
    with log_context(request_id="req-q"):
        stamp_task_headers(headers=headers)
    assert headers[TASK_HEADER] == "req-q"


# --- the web tier, in process ---------------------------------------------------------------------------------


def test_every_response_echoes_a_well_formed_request_id_or_a_new_one(client, auth):
    ok = client.get("/healthz", headers={"X-Request-Id": "client-id_1.2:3"})
    assert ok.headers["X-Request-Id"] == "client-id_1.2:3"
    unauthorized = client.get("/api/v1/sessions", headers={"X-Request-Id": "client-id-401"})
    assert unauthorized.status_code == 401 and unauthorized.headers["X-Request-Id"] == "client-id-401"
    missing = client.get("/no/such/page", headers={"X-Request-Id": "client-id-404"})
    assert missing.status_code == 404 and missing.headers["X-Request-Id"] == "client-id-404"
    for bad in ("has space", "x" * 129, "semi;colon", "-leading-dash"):
        made = client.get("/healthz", headers={"X-Request-Id": bad}).headers["X-Request-Id"]
        assert made != bad and len(made) == 32 and set(made) <= set("0123456789abcdef")
    first, second = (client.get("/healthz").headers["X-Request-Id"] for _ in range(2))
    assert first != second


def test_request_lines_carry_the_request_and_session_ids_but_not_the_query(client, auth):
    sid = "00000000-0000-4000-8000-000000000000"
    with captured("json", logger_name="web.request_ids") as (_, out):
        resp = client.get(f"/api/v1/sessions/{sid}?token=not-logged-secret", headers={**auth(), "X-Request-Id": "rq-5"})
    assert resp.status_code == 404 and resp.headers["X-Request-Id"] == "rq-5"
    (line,) = records(out)
    assert line["message"].startswith(f"GET /api/v1/sessions/{sid} 404 ")
    assert (line["request_id"], line["session_id"], line["level"]) == ("rq-5", sid, "INFO")
    assert "not-logged-secret" not in out.getvalue()


# --- a private stack with LOG_FORMAT=json --------------------------------------------------------------------


@pytest.fixture(scope="module")
def json_stack(stack_env, settings, docker_client, token):
    """proxy, web, worker and beat of a private stack (own database, key prefix, queues) logging JSON."""
    suffix = secrets.token_hex(2)
    base, name = settings.database_url.rsplit("/", 1)
    database_url = f"{base}/{name}_l{suffix}"
    prepare_database(database_url)
    prefix = f"{settings.key_prefix}l{suffix}"
    port = stack.free_port()
    env = {**stack_env["env"], "LOG_FORMAT": "json", "LOG_LEVEL": "INFO", "DATABASE_URL": database_url,
           "CCD_KEY_PREFIX": prefix, "CCD_PORT": str(port), "CCD_SESSION_API_URL": "",
           "CCD_MODEL_PROXY_PORT": str(stack.free_port())}
    processes = [stack.start_proxy(env, name="logs-proxy"), stack.start_web(env, port, name="logs-web"),
                 stack.start_worker(env, name="logs-worker"), stack.start_beat(env, name="logs-beat")]
    yield {"processes": {p.name: p for p in processes}, "base": f"http://127.0.0.1:{port}",
           "ws": f"ws://127.0.0.1:{port}", "token": token("logs-owner"), "env": env}
    for process in reversed(processes):
        process.stop()
    stack.remove_private_stack(docker_client, prefix, database_url)


def parsed(path: Path) -> list[dict]:
    """Every line of a process's output, each of which must be one JSON log record."""
    lines = [line for line in path.read_text(errors="replace").splitlines() if line.strip()]
    out = []
    for line in lines:
        try:
            record = json.loads(line)
        except ValueError:
            raise AssertionError(f"{path.name}: not a JSON line: {line[:300]!r}") from None
        assert isinstance(record, dict) and FIELDS <= set(record), f"{path.name}: {line[:300]!r}"
        out.append(record)
    return out


@pytest.mark.docker
def test_json_stack_logs_one_object_per_line_with_the_ids_of_each_turn_and_no_prompt_or_secret(json_stack):
    base, token = json_stack["base"], json_stack["token"]
    api = Api(base, token)
    create_id, chat_id, ws_id = (f"logs-{what}-{secrets.token_hex(6)}" for what in ("create", "chat", "ws"))
    marker, ws_marker = f"PROMPTMARK{secrets.token_hex(8)}", f"WSPROMPTMARK{secrets.token_hex(8)}"

    created = requests.post(f"{base}/api/v1/sessions", json={"workspace": {"type": "ephemeral"}}, timeout=30,
                            headers={**api.headers, "X-Request-Id": create_id})
    assert created.status_code == 201 and created.headers["X-Request-Id"] == create_id, created.text
    sid = created.json()["id"]
    api.session_status(sid, "ready")  # so that the chat's request enqueues the turn itself
    chat = requests.post(f"{base}/api/v1/sessions/{sid}/chat", json={"prompt": f"say hello {marker}"}, timeout=30,
                         headers={**api.headers, "X-Request-Id": chat_id})
    assert chat.status_code == 202 and chat.headers["X-Request-Id"] == chat_id, chat.text
    turn_id = chat.json()["id"]
    assert api.finished_turn(turn_id)["status"] == "succeeded"

    # A chat over the WebSocket (token in the query string, as browsers send it) carries the upgrade's id.
    ws = websocket.create_connection(f"{json_stack['ws']}/api/v1/sessions/{sid}/stream?token={token}",
                                     header=[f"X-Request-Id: {ws_id}"], timeout=120)
    try:
        ws.send(json.dumps({"type": "chat", "prompt": f"say hello {ws_marker}", "id": "c1"}))
        ws_turn = None
        while True:
            frame = json.loads(ws.recv())
            if frame["type"] == "reply":
                assert frame["ok"], frame
                ws_turn = frame["turn"]["id"]
            elif ws_turn and frame["type"] in FINAL and frame["turn_id"] == ws_turn:
                assert frame["type"] == "turn.completed", frame
                break
    finally:
        ws.close()

    logs = {name: p.log_path for name, p in json_stack["processes"].items()}
    for turn in (turn_id, ws_turn):  # the final line comes just after the turn row is updated
        wait_for(lambda t=turn: f'"turn_id": "{t}"' in logs["logs-worker"].read_text()
                 and f"turn {t} succeeded" in logs["logs-worker"].read_text(), 10, what=f"turn {turn}'s last line")
    for process in json_stack["processes"].values():
        process.stop()  # their shutdown lines too
    web, worker, proxy, beat = (parsed(logs[f"logs-{n}"]) for n in ("web", "worker", "proxy", "beat"))

    # Every process's own start-up lines went through our formatter too.
    assert any(r["logger"] == "gunicorn.error" and r["message"].startswith("Booting worker") for r in web)
    assert any(r["message"].endswith(" ready.") for r in worker)
    assert any(r["message"].startswith("model proxy listening on") for r in proxy)
    assert any(r["message"].endswith(" is starting.") for r in beat)

    # The web: the requests' lines carry their ids.
    chat_lines = [r for r in web if r.get("request_id") == chat_id]
    assert any(r["message"].startswith(f"POST /api/v1/sessions/{sid}/chat 202") and r.get("session_id") == sid
               for r in chat_lines), chat_lines
    assert any(r["message"].startswith("POST /api/v1/sessions 201") for r in web if r.get("request_id") == create_id)
    assert not [r for r in web if r["logger"] == "gunicorn.access"]  # it would log query strings

    # The worker: a turn's lines carry its turn and session ids and the id of the request that queued it.
    for turn, request_id in ((turn_id, chat_id), (ws_turn, ws_id)):
        lines = [r for r in worker if r["logger"] == "workers.turn_runner" and r.get("turn_id") == turn]
        messages = [r["message"] for r in lines]
        assert any(m.startswith(f"turn {turn} (session {sid}, #") and m.endswith("started") for m in messages)
        assert f"turn {turn} succeeded" in messages
        assert all(r.get("request_id") == request_id and r.get("session_id") == sid for r in lines), lines
    started = [r for r in worker if r["message"].startswith(f"session {sid} ready")]
    assert started and all(r.get("request_id") == create_id and r.get("session_id") == sid for r in started)

    # Nothing logged below INFO, and no prompt, token or key anywhere.
    settings_env = json_stack["env"]
    everything = "\n".join(path.read_text(errors="replace") for path in logs.values())
    assert not [r for r in web + worker + proxy + beat if r["level"] == "DEBUG"]
    for secret in (marker, ws_marker, token, settings_env["ANTHROPIC_API_KEY"], settings_env["JWT_SECRET"],
                   settings_env["MINIO_SECRET_KEY"]):
        assert secret not in everything
