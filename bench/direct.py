"""The baselines the service is measured against, run straight in a session's container through the Docker API
(`exec_create`/`exec_start`, no CLI start-up in the figure): a `claude -p` per turn, and one long-lived Claude Code
driven over its stdin as the Claude Agent SDK's client drives it.

The model proxy lets a credential reach the model only while a turn of its session runs, and these turns are not
the service's: they get a session of their own in the database (no container) with a turn that stays running."""
from __future__ import annotations

import json
import socket
import time
import uuid

from core.db import transaction
from core.models import Session, Turn, utcnow
from workers.model_proxy import mint_model_credential
from workers.runtime import ExecResult, read_frames, split_lines, stdout_of


def direct_credential(bench) -> str:
    """A model credential for the baselines: a session row of their own with one running turn, made once."""
    if getattr(bench, "_direct_credential", None) is None:
        session_id, turn_id = uuid.uuid4(), uuid.uuid4()
        with transaction(bench.db) as db:
            db.add(Session(id=session_id, owner="bench-direct", status="ready", config={}, workspace={},
                           claude_session_id=uuid.uuid4(), turn_count=1))
            db.flush()
            db.add(Turn(id=turn_id, session_id=session_id, seq=1, prompt="baseline", status="running",
                        started_at=utcnow(), lease_expires_at=None))
        bench._direct_credential = mint_model_credential(bench.settings.jwt_secret, str(session_id), 6 * 3600,
                                                         str(turn_id))
    return bench._direct_credential


class DirectTurns:
    """Turns of one conversation of its own, run straight in a container: --session-id first, then --resume."""

    def __init__(self, bench, session_id: str) -> None:
        self.bench, self.session_id = bench, session_id
        self.container = bench.container_of(session_id).id
        self.conversation, self.started = str(uuid.uuid4()), False
        self.env = {"ANTHROPIC_BASE_URL": bench.runtime.model_proxy_url(), "ANTHROPIC_API_KEY": direct_credential(bench)}

    def argv(self) -> list[str]:
        """The command line the wrapper gives Claude Code for a session with the default config."""
        flag = "--resume" if self.started else "--session-id"
        return ["claude", "-p", "--output-format", "stream-json", "--verbose", "--include-partial-messages",
                flag, self.conversation, "--permission-mode", "bypassPermissions"]

    def run(self, prompt: str) -> float:
        """One turn, start to exit; returns its wall time in seconds."""
        result: list[ExecResult] = []
        start = time.monotonic()
        lines = sum(1 for _ in self.bench.runtime.exec_lines(self.container, self.argv(), self.env,
                                                              prompt.encode(), result))
        elapsed = time.monotonic() - start
        if not result or result[0].exit_code != 0 or lines == 0:
            raise RuntimeError(f"direct claude -p failed: {result[0] if result else 'no result'}")
        self.started = True
        return elapsed


class DirectHotTurns:
    """One long-lived Claude Code in a session's container (`--input-format stream-json`), a user message per turn
    on its stdin, read until that turn's `result` line: what the Agent SDK's client does."""

    def __init__(self, bench, session_id: str) -> None:
        self.bench = bench
        self.container = bench.container_of(session_id).id
        env = {"ANTHROPIC_BASE_URL": bench.runtime.model_proxy_url(), "ANTHROPIC_API_KEY": direct_credential(bench)}
        argv = ["claude", "-p", "--input-format", "stream-json", "--output-format", "stream-json", "--verbose",
                "--include-partial-messages", "--session-id", str(uuid.uuid4()), "--permission-mode",
                "bypassPermissions"]
        api = bench.runtime.api
        self.exec_id = api.exec_create(self.container, argv, stdin=True, stdout=True, stderr=False,
                                       environment=env, user="agent", workdir="/workspace")["Id"]
        self.sock = api.exec_start(self.exec_id, socket=True)
        self.raw = getattr(self.sock, "_sock", self.sock)
        self.lines = split_lines(stdout_of(read_frames(self.raw), bytearray()))

    def run(self, prompt: str) -> float:
        """One turn, its message written to the end of its result line; its wall time in seconds."""
        message = {"type": "user", "message": {"role": "user", "content": prompt}, "parent_tool_use_id": None,
                   "session_id": "default"}
        start = time.monotonic()
        self.raw.sendall(json.dumps(message).encode() + b"\n")
        for line, _size in self.lines:
            if line.startswith('{"type":"stream_event"'):
                continue
            try:
                kind = json.loads(line).get("type")
            except ValueError:
                continue
            if kind == "result":
                return time.monotonic() - start
        raise RuntimeError("the long-lived claude ended before its turn's result")

    def pid(self) -> int | None:
        return self.bench.runtime.api.exec_inspect(self.exec_id).get("Pid")

    def close(self) -> None:
        try:
            self.raw.shutdown(socket.SHUT_WR)  # its stdin ends: Claude Code exits
        except OSError:
            pass
        self.sock.close()
