"""Logging set-up shared by every process: one line per record, as text or JSON (LOG_FORMAT), each carrying
the request, session and turn ids of the work in hand (from `log_context`), with secrets masked."""
from __future__ import annotations

import contextvars
import json
import logging
import re
import sys
import threading
from contextlib import AbstractContextManager, contextmanager
from datetime import datetime, timezone
from types import MappingProxyType
from typing import Iterable, Iterator, Mapping

IDS = ("request_id", "session_id", "turn_id")
FORMATS = ("text", "json")
# The Celery message header that carries the id of the HTTP request that sent a task.
TASK_HEADER = "ccd_request_id"
# What an id may look like to be logged or passed on: short, and nothing that could break a line or a header.
_WELL_FORMED_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9._:-]{0,127}")

_ids: contextvars.ContextVar[Mapping[str, str]] = contextvars.ContextVar("ccd_log_ids",
                                                                          default=MappingProxyType({}))

# Credentials that must never reach a log line, whatever logged them (an exception text, a URL, a library).
_SECRETS = (
    (re.compile(r"eyJ[A-Za-z0-9_-]{4,}\.[A-Za-z0-9_-]{4,}\.[A-Za-z0-9_-]*"), "[jwt]"),
    (re.compile(r"(?i)\b(bearer|basic)\s+[A-Za-z0-9._~+/=-]{8,}"), r"\1 [redacted]"),
    (re.compile(r"\bsk-[A-Za-z0-9_-]{8,}"), "sk-[redacted]"),
    (re.compile(r"(?i)([?&](?:token|access_token|api_key|key|secret)=)[^&\s\"']+"), r"\1[redacted]"),
    (re.compile(r"(?i)((?:x-api-key|authorization)[\"']?\s*[:=]\s*[\"']?)[^\s\"',}]{8,}"), r"\1[redacted]"),
    (re.compile(r"(://[^/\s:@]*:)[^/\s@]+@"), r"\1[redacted]@"),  # a password in a URL
)

_NOISY = ("urllib3", "docker", "kombu", "amqp", "werkzeug", "celery.worker.strategy", "celery.app.trace",
          "celery.beat")


def well_formed_id(value: object) -> str | None:
    """The value when it is a short id of safe characters, else None."""
    if isinstance(value, str) and _WELL_FORMED_ID.fullmatch(value):
        return value
    return None


def _with(base: Mapping[str, str], ids: Mapping[str, object]) -> Mapping[str, str]:
    """`base` with `ids` set (None, or a malformed value, removes one)."""
    unknown = set(ids) - set(IDS)
    if unknown:
        raise ValueError(f"log ids are {', '.join(IDS)}; not {', '.join(sorted(unknown))}")
    merged = dict(base)
    for name, value in ids.items():
        value = well_formed_id(None if value is None else str(value))
        if value is None:
            merged.pop(name, None)
        else:
            merged[name] = value
    return MappingProxyType(merged)


@contextmanager
def log_context(**ids: object) -> Iterator[None]:
    """Every line logged inside the block, by any module, carries these ids (None removes one)."""
    token = _ids.set(_with(_ids.get(), ids))
    try:
        yield
    finally:
        _ids.reset(token)


def traced(**ids: object) -> AbstractContextManager[None]:
    """The log context of the Celery task running now: `ids`, and the id of the HTTP request that sent it (none
    when a worker or beat sent it, or an older web that sets no header)."""
    from celery import current_task  # here: only worker processes run tasks

    request = getattr(current_task, "request", None)  # none when the task is called directly
    return log_context(request_id=getattr(request, TASK_HEADER, None), **ids)


def bind_log_ids(**ids: object) -> None:
    """Adds ids to the current context until the enclosing `log_context` (or request, or task) ends."""
    _ids.set(_with(_ids.get(), ids))


def current_log_ids() -> dict[str, str]:
    """The ids every line logged here would carry now."""
    return dict(_ids.get())


def start_log_context(**ids: object) -> contextvars.Token:
    """Sets exactly these ids for a unit of work that begins and ends in different callbacks (a web
    request); hand the token to `end_log_context`."""
    return _ids.set(_with({}, ids))


def end_log_context(token: contextvars.Token) -> None:
    _ids.reset(token)


def iterate_in_context(items: Iterable) -> Iterator:
    """Iterates `items` in a copy of the context of this call: a streamed response body keeps logging with
    its request's ids after the request itself has ended, without leaking them into the server's context."""
    return _iterate(contextvars.copy_context(), iter(items))  # copied now, not at the first next()


def _iterate(context: contextvars.Context, iterator: Iterator) -> Iterator:
    try:
        while True:
            try:
                item = context.run(next, iterator)
            except StopIteration:
                return
            yield item
    finally:
        close = getattr(iterator, "close", None)
        if close is not None:
            context.run(close)


def redact(text: str) -> str:
    """The text with tokens, API keys and URL passwords masked."""
    for pattern, replacement in _SECRETS:
        text = pattern.sub(replacement, text)
    return text


class ContextFilter(logging.Filter):
    """Copies the current ids onto each record (ids given with `extra=` win); attach it to handlers."""

    def filter(self, record: logging.LogRecord) -> bool:
        ids = _ids.get()
        for name in IDS:
            if getattr(record, name, None) is None:
                setattr(record, name, ids.get(name))
        return True


def _message(record: logging.LogRecord) -> str:
    try:
        return record.getMessage()
    except Exception:  # a bad format call must still give a line, not a traceback on stderr
        return f"{record.msg!s} (unformattable arguments: {record.args!r})"


class JsonFormatter(logging.Formatter):
    """One JSON object per line: time (ISO-8601 UTC), level, logger, message, the ids that are set, and
    exc_info / stack_info as strings. Non-ASCII is escaped, so no line splitter can cut a record."""

    def format(self, record: logging.LogRecord) -> str:
        out: dict[str, str] = {
            "time": datetime.fromtimestamp(record.created, timezone.utc).isoformat(timespec="milliseconds")
            .replace("+00:00", "Z"),
            "level": record.levelname,
            "logger": record.name,
            "message": redact(_message(record)),
        }
        for name in IDS:
            value = getattr(record, name, None)
            if value:
                out[name] = str(value)
        if record.exc_info:
            out["exc_info"] = redact(self.formatException(record.exc_info))
        elif record.exc_text:
            out["exc_info"] = redact(record.exc_text)
        if record.stack_info:
            out["stack_info"] = redact(self.formatStack(record.stack_info))
        return json.dumps(out, ensure_ascii=True)


class TextFormatter(logging.Formatter):
    """`time LEVEL logger: message [request_id=.. session_id=.. turn_id=..]` on one line; a traceback
    follows on its own lines."""

    def __init__(self) -> None:
        super().__init__("%(asctime)s %(levelname)s %(name)s: %(message)s")

    def formatMessage(self, record: logging.LogRecord) -> str:  # noqa: N802 (logging's name)
        line = super().formatMessage(record)
        ids = " ".join(f"{name}={getattr(record, name)}" for name in IDS if getattr(record, name, None))
        return f"{line} [{ids}]" if ids else line

    def format(self, record: logging.LogRecord) -> str:
        record.message = redact(_message(record)).replace("\r", "\\r").replace("\n", "\\n")
        if self.usesTime():
            record.asctime = self.formatTime(record, self.datefmt)
        text = self.formatMessage(record)
        if record.exc_info:
            record.exc_text = record.exc_text or self.formatException(record.exc_info)
        if record.exc_text:
            text += "\n" + redact(record.exc_text)
        if record.stack_info:
            text += "\n" + redact(self.formatStack(record.stack_info))
        return text


def make_formatter(fmt: str) -> logging.Formatter:
    """The formatter for LOG_FORMAT `fmt` (text or json)."""
    if fmt not in FORMATS:
        raise ValueError(f"LOG_FORMAT must be text or json, got {fmt!r}")
    return JsonFormatter() if fmt == "json" else TextFormatter()


def make_handler(fmt: str, stream=None) -> logging.Handler:
    """A stderr handler with our format and the ids filter."""
    handler = logging.StreamHandler(stream or sys.stderr)
    handler.setFormatter(make_formatter(fmt))
    handler.addFilter(ContextFilter())
    return handler


def setup_logging(level: str, fmt: str = "text") -> None:
    """Makes ours the only handler of the root logger; with json, uncaught exceptions and warnings are
    records too, so that every line the process prints is one JSON object."""
    root = logging.getLogger()
    for old in root.handlers[:]:
        root.removeHandler(old)
    root.addHandler(make_handler(fmt))
    root.setLevel(level.upper())
    logging.captureWarnings(True)
    if fmt == "json":
        sys.excepthook = _log_uncaught
        threading.excepthook = lambda args: _log_uncaught(args.exc_type, args.exc_value, args.exc_traceback)
    # Celery logs every task received and finished; our own modules log what matters.
    for noisy in _NOISY:
        logging.getLogger(noisy).setLevel(max(logging.WARNING, root.level))


def _log_uncaught(exc_type, exc, tb) -> None:
    if issubclass(exc_type, KeyboardInterrupt):
        return
    logging.getLogger("uncaught").critical("uncaught %s: %s", exc_type.__name__, exc, exc_info=(exc_type, exc, tb))


class LineLogger:
    """A file-like stand-in for stdout that logs each line it is given (for libraries that print)."""

    def __init__(self, logger: logging.Logger, level: int = logging.INFO) -> None:
        self.logger, self.level, self._pending = logger, level, ""

    def write(self, text: str) -> int:
        lines = (self._pending + text).split("\n")
        self._pending = lines.pop()
        for line in lines:
            if line.strip():
                self.logger.log(self.level, line.rstrip())
        return len(text)

    def flush(self) -> None:
        if self._pending.strip():
            self.logger.log(self.level, self._pending.rstrip())
        self._pending = ""

    def isatty(self) -> bool:
        return False


def gunicorn_log_config(environ: Mapping[str, str]) -> dict:
    """gunicorn's `logconfig_dict`: its own lines (start-up, worker boots, errors) in our format.

    Reads only LOG_LEVEL and LOG_FORMAT: gunicorn logs before the app loads its settings, and an invalid
    value falls back here so that the app's settings check can report it properly.
    """
    level = (environ.get("LOG_LEVEL") or "INFO").upper()
    if level not in ("DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL"):
        level = "INFO"
    fmt = environ.get("LOG_FORMAT") or "text"
    formatter = {"()": JsonFormatter} if fmt == "json" else {"()": TextFormatter}
    return {
        "version": 1,
        "disable_existing_loggers": False,
        "filters": {"ids": {"()": ContextFilter}},
        "formatters": {"ccd": formatter},
        "handlers": {"console": {"class": "logging.StreamHandler", "stream": "ext://sys.stderr",
                                 "formatter": "ccd", "filters": ["ids"]}},
        "root": {"level": level, "handlers": ["console"]},
        "loggers": {
            "gunicorn.error": {"level": level, "handlers": ["console"], "propagate": False},
            # Off: with a log config gunicorn would log each request with its query string (where a token may
            # be); web/request_ids.py logs each request instead, with its ids and without the query.
            "gunicorn.access": {"level": "WARNING", "handlers": ["console"], "propagate": False},
        },
    }
