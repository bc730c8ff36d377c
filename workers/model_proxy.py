"""The model proxy: swaps a session's credential for the real API key on the Messages API calls Claude Code makes, during
its session's turns, and streams the model's answer back untouched."""
from __future__ import annotations

import hashlib
import hmac
import http.client
import ipaddress
import json
import logging
import socket
import threading
import time
import uuid
from collections import Counter
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any, Callable
from urllib.parse import parse_qsl, urlencode, urlsplit

import jwt
from sqlalchemy import or_, select
from sqlalchemy.exc import OperationalError

from core.db import make_engine, make_session_factory, transaction
from core.errors import ConfigError
from core.models import Session, Turn
from core.pricing import PriceTable
from core.settings import Settings
from core.trees import ENDED_STATES, BudgetExhausted, check_budget
from workers.metering import ACCEPT_ENCODING, Usage, UsageMeter, usage_recorder
from workers.model_calls import refused_call

log = logging.getLogger(__name__)

AUDIENCE = "ccd-model-proxy"
SESSION_CLAIM = "ccd_model_session"
TURN_CLAIM = "ccd_model_turn"  # the turn the spend of the credential's requests is metered to
# A hot Claude Code process's: it lives across turns (and never re-reads its key), so its credential names the
# process instead, and reaches the model while that process runs a turn of the session.
PROCESS_CLAIM = "ccd_model_process"
DEFAULT_UPSTREAM = "https://api.anthropic.com"
MAX_REQUEST_BYTES = 32 * 1024 * 1024  # the Messages API's own request limit
UPSTREAM_TIMEOUT_SECONDS = 600  # between two reads of a response: a stream may pause, not stall forever
CHUNK = 64 * 1024
# Per connection, not end to end: never forwarded in either direction.
HOP_BY_HOP = frozenset({"connection", "keep-alive", "proxy-authenticate", "proxy-authorization", "te", "trailer",
                        "trailers", "transfer-encoding", "upgrade", "host", "content-length"})
CREDENTIAL_HEADERS = frozenset({"x-api-key", "authorization"})
# What Claude Code calls (2.1.330, measured through the scripted model): the Messages API and its token count, by
# POST, with `?beta=true` or no query. The real key reaches nothing else of the account (files, batches, models).
ROUTES = frozenset({"/v1/messages", "/v1/messages/count_tokens"})
QUERIES = frozenset({(), (("beta", "true"),)})
ALLOWED = "POST /v1/messages and POST /v1/messages/count_tokens"
REFUSAL_LOG_SECONDS = 10  # one line per client per this long for connections turned away: a flood is one line


def _signing_key(secret: str) -> bytes:
    """A key of its own, derived from JWT_SECRET: a model credential never passes the API's token check
    (whatever JWT_AUDIENCE is), and an API token never passes the proxy's."""
    return hmac.new(secret.encode(), b"ccd-model-proxy", hashlib.sha256).digest()


def mint_model_credential(secret: str, session_id: str, ttl_seconds: int, turn_id: str | None = None,
                          process_id: str | None = None) -> str:
    """The API key a session's Claude Code uses: good only at the proxy, only for that session. With `turn_id`
    it reaches the model during that turn only, and its spend is metered to it; with `process_id`, during any turn
    that process runs (its spend metered to that turn)."""
    if turn_id is not None and process_id is not None:
        raise ValueError("a model credential names its turn or its process, not both")
    now = int(time.time())
    claims = {"aud": AUDIENCE, "sub": session_id, SESSION_CLAIM: session_id, "iat": now, "exp": now + ttl_seconds}
    if turn_id is not None:
        claims[TURN_CLAIM] = turn_id
    if process_id is not None:
        claims[PROCESS_CLAIM] = process_id
    return jwt.encode(claims, _signing_key(secret), algorithm="HS256")


def read_model_claims(secret: str, credential: str
                      ) -> tuple[uuid.UUID, uuid.UUID | None, uuid.UUID | None] | None:
    """The session, turn and process a credential was minted for; None when it is not a valid, current model
    credential."""
    try:
        claims = jwt.decode(credential, _signing_key(secret), algorithms=["HS256"], audience=AUDIENCE,
                            options={"require": ["exp", "aud", SESSION_CLAIM]})
        turn, process = claims.get(TURN_CLAIM), claims.get(PROCESS_CLAIM)
        return (uuid.UUID(str(claims[SESSION_CLAIM])), uuid.UUID(str(turn)) if turn is not None else None,
                uuid.UUID(str(process)) if process is not None else None)
    except (jwt.InvalidTokenError, ValueError):
        return None


class Refusal(Exception):
    """A request the proxy answers itself, with an error in the Messages API's shape."""

    def __init__(self, status: int, kind: str, message: str) -> None:
        super().__init__(message)
        self.status, self.kind, self.message = status, kind, message


def forwarded_target(method: str, target: str) -> str | None:
    """The request target to send upstream, rebuilt from what was checked; None unless it is a call Claude Code makes.

    The path must be one of ROUTES exactly, as sent: no dot segments, doubled slashes or escapes get through.
    """
    path, _, query = target.partition("?")
    if method != "POST" or path not in ROUTES:
        return None
    pairs = tuple(parse_qsl(query, keep_blank_values=True))
    if pairs not in QUERIES:
        return None
    return path + (f"?{urlencode(pairs)}" if pairs else "")


# Whether the session has a turn running: asked in the same statement that reads the session row.
RUNNING = select(Turn.id).where(Turn.session_id == Session.id, Turn.status == "running")
TURN_RUNNING = RUNNING.exists().label("turn_running")
# (session, turn claim, process claim) -> the turn the request's spend is metered to; raises Refusal.
Gate = Callable[[uuid.UUID, uuid.UUID | None, uuid.UUID | None], uuid.UUID | None]


def gate_query(session_id: uuid.UUID, turn_id: uuid.UUID | None, process_id: uuid.UUID | None):
    """One statement: the session row, whether a turn of it runs, whether the credential's own turn does, and for a
    process credential whether its process is the session's (or the running turn's) and which turn it runs."""
    own = RUNNING.where(Turn.id == turn_id) if turn_id is not None else RUNNING
    columns = [Session, TURN_RUNNING, own.exists().label("own_turn_running")]
    if process_id is not None:
        # The running turn's process_id names the process the worker minted for (should serve start one for the
        # turn); sessions.process_id the one serve reported running it. Either is the process that holds the key.
        columns.append(or_(Session.process_id.is_not_distinct_from(process_id),
                           RUNNING.where(Turn.process_id == process_id).exists()).label("own_process"))
        columns.append(RUNNING.order_by(Turn.process_id.is_distinct_from(process_id), Turn.seq.desc())
                       .limit(1).scalar_subquery().label("running_turn"))
    return select(*columns).where(Session.id == session_id)


def session_gate(settings: Settings, factory) -> Gate:
    """Checks, for every request, that the session still exists, is live, has a turn running (the credential's
    own, when it names one: a credential left behind by an earlier turn is dead; one its process runs, when it
    names a process: a credential an ended process left behind is dead) and has budget left.
    Returns the turn the request's spend is metered to: the credential's turn, or the turn its process runs."""

    def check(session_id: uuid.UUID, turn_id: uuid.UUID | None = None,
              process_id: uuid.UUID | None = None) -> uuid.UUID | None:
        try:
            with transaction(factory) as db:
                found = db.execute(gate_query(session_id, turn_id, process_id)).first()
                row = found[0] if found else None
                if row is None or row.status in ENDED_STATES:
                    state = "gone" if row is None else row.status
                    raise Refusal(403, "permission_error", f"session {session_id} is {state}; its credential "
                                                           "no longer reaches the model")
                if not found.turn_running:
                    raise Refusal(403, "permission_error", f"session {session_id} has no turn running; its "
                                                           "credential reaches the model only during a turn")
                if not found.own_turn_running:
                    raise Refusal(403, "permission_error", f"turn {turn_id} of session {session_id} is not running; "
                                                           "its credential reaches the model only during that turn")
                if process_id is not None and not found.own_process:
                    raise Refusal(403, "permission_error", f"the credential belongs to Claude Code process "
                                                           f"{process_id} of session {session_id}, which has ended; "
                                                           "it reaches the model only while that process runs the "
                                                           "session's turns")
                check_budget(db, row)
                return found.running_turn if process_id is not None else turn_id
        except BudgetExhausted as exc:
            raise Refusal(402, "billing_error", str(exc)) from None
        except OperationalError:
            raise Refusal(503, "api_error", "cc-docker's database is unreachable; try again shortly") from None

    return check


class ProxyServer(ThreadingHTTPServer):
    """One thread per connection, at most `client_connections` at once per client address (a session container),
    each closed after `idle_seconds` without a byte; each request is checked, then forwarded to `upstream`."""

    daemon_threads = True
    allow_reuse_address = True
    request_queue_size = socket.SOMAXCONN  # a burst of connects waits to be accepted (or turned away), not dropped

    def __init__(self, address: tuple[str, int], secret: str, api_key: str, upstream: str,
                 gate: Gate,
                 record: Callable[[uuid.UUID, uuid.UUID | None, Usage], None],
                 idle_seconds: float = 60, client_connections: int = 32) -> None:
        super().__init__(address, ProxyHandler)
        self.secret, self.api_key, self.gate, self.record = secret, api_key, gate, record
        self.idle_seconds, self.client_connections = idle_seconds, client_connections
        self._open: Counter[str] = Counter()
        self._turned_away_logged: dict[str, float] = {}
        self._open_lock = threading.Lock()
        parts = urlsplit(upstream or DEFAULT_UPSTREAM)
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise ValueError(f"ANTHROPIC_BASE_URL must be an http(s) URL, got {upstream!r}")
        self.upstream_scheme, self.upstream_host = parts.scheme, parts.hostname
        self.upstream_port = parts.port or (443 if parts.scheme == "https" else 80)
        self.upstream_path = parts.path.rstrip("/")

    @property
    def url(self) -> str:
        host, port = self.server_address[:2]
        return f"http://{host}:{port}"

    def connect_upstream(self) -> http.client.HTTPConnection:
        kind = http.client.HTTPSConnection if self.upstream_scheme == "https" else http.client.HTTPConnection
        return kind(self.upstream_host, self.upstream_port, timeout=UPSTREAM_TIMEOUT_SECONDS)

    def process_request(self, request: socket.socket, client_address: tuple) -> None:
        """Gives the connection a thread, unless its client already holds its share: then it is turned away at once."""
        client = client_address[0]
        with self._open_lock:
            full = self._open[client] >= self.client_connections
            if not full:
                self._open[client] += 1
        if full:
            return self._turn_away(request, client)
        try:
            super().process_request(request, client_address)
        except BaseException:  # no thread started: nothing else gives the slot back
            self._release(client)
            raise

    def process_request_thread(self, request: socket.socket, client_address: tuple) -> None:
        try:
            super().process_request_thread(request, client_address)
        finally:
            self._release(client_address[0])

    def open_connections(self, client: str) -> int:
        with self._open_lock:
            return self._open[client]

    def _release(self, client: str) -> None:
        with self._open_lock:
            self._open[client] -= 1
            if self._open[client] <= 0:
                del self._open[client]

    def _turn_away(self, request: socket.socket, client: str) -> None:
        """A 429 in the Messages API's shape, sent without waiting on the client, then the connection closed."""
        now = time.monotonic()
        with self._open_lock:
            quiet = now - self._turned_away_logged.get(client, -REFUSAL_LOG_SECONDS) < REFUSAL_LOG_SECONDS
            if not quiet:
                self._turned_away_logged[client] = now
        if not quiet:
            log.warning("turning away connections from %s: it holds %d, CCD_MODEL_PROXY_CLIENT_CONNECTIONS",
                        client, self.client_connections)
        body = json.dumps({"type": "error", "error": {
            "type": "rate_limit_error",
            "message": f"too many open connections from {client}: at most {self.client_connections} at once "
                       "(CCD_MODEL_PROXY_CLIENT_CONNECTIONS); close some and retry"}}).encode()
        head = (f"HTTP/1.1 429 Too Many Requests\r\nContent-Type: application/json\r\nContent-Length: {len(body)}\r\n"
                "Retry-After: 1\r\nx-should-retry: true\r\nConnection: close\r\n\r\n").encode()
        try:
            request.setblocking(False)  # a new socket's send buffer takes this; a client that never reads costs nothing
            request.send(head + body)
        except OSError:
            pass
        self.shutdown_request(request)


class ProxyHandler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    server: ProxyServer

    def setup(self) -> None:
        self.timeout = self.server.idle_seconds  # every read and write on the connection: an idle one is closed
        super().setup()

    def log_message(self, format: str, *args: Any) -> None:
        log.debug("%s %s", self.address_string(), format % args)

    def do_GET(self) -> None:
        if self.command == "GET" and self.path == "/healthz":  # compose's healthcheck; carries nothing, needs no credential
            return self._answer_health()
        self._proxy()

    do_POST = do_PUT = do_PATCH = do_DELETE = do_HEAD = do_OPTIONS = do_GET

    def _answer_health(self) -> None:
        body = b'{"status": "ok"}'
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def _proxy(self) -> None:
        session_id = None
        try:
            session_id = self._credential_session()
            target = forwarded_target(self.command, self.path)
            if target is None:
                raise Refusal(403, "permission_error", f"{self.command} {self.path[:200]} is not a call the model "
                                                       f"proxy forwards: it forwards only {ALLOWED}")
            metered_to = self.server.gate(*self.claims)
            body = self._read_body()
            if (problem := refused_call(self.headers, body)) is not None:  # parsed once; the bytes go on as sent
                raise Refusal(*problem)
        except Refusal as exc:
            (log.warning if exc.status == 403 else log.info)(
                "refused %s %r for session %s from %s: %s", self.command, self.path[:200], session_id or "-",
                self.client_address[0], exc.message)
            return self._refuse(exc)
        upstream = self.server.connect_upstream()  # connects on the first request, below
        try:
            upstream.request(self.command, self.server.upstream_path + target, body=body,
                             headers=self._forward_headers(len(body)))
            response = upstream.getresponse()
        except (OSError, http.client.HTTPException) as exc:
            log.warning("model endpoint unreachable: %s", exc)
            upstream.close()
            return self._refuse(Refusal(502, "api_error", f"the model endpoint is unreachable: {exc}"))
        meter = UsageMeter(response.status, response.getheader("content-type"),
                           response.getheader("content-encoding"))
        try:
            self._relay(response, meter)
        except (OSError, http.client.HTTPException):  # either side went away mid-answer: end both
            self.close_connection = True
        finally:
            usage = meter.finish(response)
            upstream.close()
            if usage is not None:
                self.server.record(session_id, metered_to, usage)

    def _credential_session(self) -> uuid.UUID:
        """The session of the request's credential (x-api-key, or a bearer token); refused when it has none."""
        credential = self.headers.get("x-api-key", "")
        scheme, _, value = self.headers.get("authorization", "").partition(" ")
        if not credential and scheme.lower() == "bearer":
            credential = value.strip()
        self.claims = read_model_claims(self.server.secret, credential) if credential else None
        if self.claims is None:
            raise Refusal(401, "authentication_error", "invalid or expired session credential")
        return self.claims[0]

    def _read_body(self) -> bytes:
        if "chunked" in self.headers.get("transfer-encoding", "").lower():
            raise Refusal(411, "invalid_request_error", "send the request with a Content-Length")
        try:
            length = int(self.headers.get("content-length") or 0)
        except ValueError:
            raise Refusal(400, "invalid_request_error", "bad Content-Length") from None
        if length > MAX_REQUEST_BYTES:
            raise Refusal(413, "request_too_large", f"request bodies are limited to {MAX_REQUEST_BYTES} bytes")
        return self.rfile.read(length) if length > 0 else b""

    def _forward_headers(self, length: int) -> dict[str, str]:
        headers = {name: value for name, value in self.headers.items()
                   if name.lower() not in HOP_BY_HOP | CREDENTIAL_HEADERS}
        headers["Host"] = self.server.upstream_host
        headers["Accept-Encoding"] = ACCEPT_ENCODING  # what the meter can read
        if self.server.api_key:
            headers["x-api-key"] = self.server.api_key
        if length or self.command in ("POST", "PUT", "PATCH"):
            headers["Content-Length"] = str(length)
        return headers

    def _relay(self, response: http.client.HTTPResponse, meter: UsageMeter) -> None:
        """Sends the upstream's status, headers and body on, each piece as soon as it arrives; the meter reads
        each piece after it was sent (or failed to be)."""
        self.send_response_only(response.status, response.reason)
        for name, value in response.getheaders():
            if name.lower() not in HOP_BY_HOP:
                self.send_header(name, value)
        length = response.getheader("content-length")
        no_body = self.command == "HEAD" or response.status in (204, 304) or 100 <= response.status < 200
        chunked = not no_body and length is None
        if no_body or length is not None:
            self.send_header("Content-Length", "0" if no_body and length is None else length)
        else:
            self.send_header("Transfer-Encoding", "chunked")
        self.end_headers()
        if no_body:
            return
        while data := response.read1(CHUNK):
            try:
                self.wfile.write(b"%x\r\n%s\r\n" % (len(data), data) if chunked else data)
                self.wfile.flush()
            finally:
                meter.feed(data)
        if chunked:
            self.wfile.write(b"0\r\n\r\n")
            self.wfile.flush()

    def _refuse(self, refusal: Refusal) -> None:
        data = json.dumps({"type": "error", "error": {"type": refusal.kind, "message": refusal.message}}).encode()
        self.close_connection = True  # the request's body may still be unread: never parse it as a request
        self.send_response(refusal.status)
        self.send_header("Connection", "close")
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.send_header("x-should-retry", "false" if refusal.status < 500 else "true")
        self.end_headers()
        self.wfile.write(data)


def every_address(host: str) -> bool:
    """True for a listening address that is every interface: empty, 0.0.0.0, ::, or a name or shorthand
    ("0") that the resolver turns into one of them, as bind() would."""
    host = host.strip("[]")
    if not host:
        return True
    try:
        found = socket.getaddrinfo(host, None, type=socket.SOCK_STREAM)
    except socket.gaierror:  # binding will fail with the resolver's own error
        return False
    return any(ipaddress.ip_address(address[4][0].split("%")[0]).is_unspecified for address in found)


def build_server(settings: Settings, host: str, port: int,
                 gate: Gate | None = None
                 ) -> ProxyServer:
    """A proxy for these settings on host:port (port 0: any free one); `gate` defaults to the database check.

    Refuses every address unless CCD_MODEL_PROXY_ALLOW_ANY_ADDRESS says so: with a session's credential, anyone
    who reaches the proxy spends on the account, so it listens where the sessions are and nowhere else. What each
    answer used is recorded in the database (workers/metering.py).
    """
    if every_address(host) and not settings.model_proxy_allow_any_address:
        raise ConfigError(f"the model proxy would listen on every address ({host or 'empty'!r}), where anyone who "
                          "reaches this host can use a session's credential; set CCD_MODEL_PROXY_HOST to the "
                          "sessions' network gateway (or leave it empty to find the gateway), or set "
                          "CCD_MODEL_PROXY_ALLOW_ANY_ADDRESS=true where only session containers reach this address")
    factory = make_session_factory(make_engine(settings))
    if gate is None:
        gate = session_gate(settings, factory)
    record = usage_recorder(factory, PriceTable.parse(settings.model_prices))
    return ProxyServer((host, port), settings.jwt_secret, settings.anthropic_api_key, settings.anthropic_base_url,
                       gate, record, settings.model_proxy_idle_seconds, settings.model_proxy_client_connections)


def start_in_thread(server: ProxyServer) -> threading.Thread:
    thread = threading.Thread(target=server.serve_forever, name="model-proxy", daemon=True)
    thread.start()
    return thread


def serve(settings: Settings) -> None:
    """Runs the proxy until stopped, on CCD_MODEL_PROXY_HOST or else the sessions' network gateway."""
    host = settings.model_proxy_host
    if not host:
        from workers.runtime import DockerRuntime

        host = DockerRuntime(settings).gateway()
    server = build_server(settings, host, settings.model_proxy_port)
    log.info("model proxy listening on %s, forwarding to %s", server.url,
             settings.anthropic_base_url or DEFAULT_UPSTREAM)
    if not settings.anthropic_api_key:
        log.warning("ANTHROPIC_API_KEY is not set: requests go to the model endpoint without a key")
    try:
        server.serve_forever()
    finally:
        server.server_close()
