"""Runs one turn: lease it, exec the wrapper in the session container, publish, record the result."""
from __future__ import annotations

import logging
import threading
import uuid
from decimal import Decimal

from sqlalchemy import update

from core.db import transaction
from core.envelope import Event
from core.models import Session, Turn, utcnow
from core.turns import claim_turn, head_queued_turn, renew_lease
from workers.context import WorkerContext
from workers.runtime import ExecResult
from workers.turn_output import TurnOutput

log = logging.getLogger(__name__)

LEASE_SECONDS = 120.0
RENEW_EVERY = 30.0


def turn_timeout(config: dict, ceiling: int) -> int:
    """The session's turn timeout, never above the service-wide ceiling."""
    asked = (config.get("timeouts") or {}).get("turn_seconds") or ceiling
    return max(1, min(int(asked), ceiling))


def wrapper_argv(turn_id: str, session: dict, timeout: int) -> list[str]:
    """The in-container command for a turn; the prompt goes on stdin, never here."""
    config = session["config"]
    argv = ["python3", "-m", "wrapper", "run", "--turn-id", turn_id, "--timeout", str(timeout)]
    flag = "--resume" if session["conversation_started"] else "--session-id"
    argv += [flag, session["claude_session_id"]]
    if config.get("model"):
        argv += ["--model", config["model"]]
    if config.get("allowed_tools"):
        argv += ["--allowed-tools", ",".join(config["allowed_tools"])]
    if config.get("permission_mode"):
        argv += ["--permission-mode", config["permission_mode"]]
    if config.get("append_system_prompt"):
        argv += ["--append-system-prompt", config["append_system_prompt"]]
    return argv


class TurnRunner:
    """Carries one turn from `queued` to a final state; safe to call twice for the same turn."""

    def __init__(self, ctx: WorkerContext) -> None:
        self.ctx = ctx

    def run(self, turn_id: str) -> None:
        snapshot = self._claim(turn_id)
        if snapshot is None:
            log.debug("turn %s is not ours to run (finished, running elsewhere, or not next)", turn_id)
            return
        turn, session = snapshot
        log.info("turn %s (session %s, #%s) started", turn_id, session["id"], turn["seq"])
        first_id = self._publish(session, turn, "turn.started", {"attempt": turn["attempt"]})
        output, failure = TurnOutput(), None
        stop_heartbeat = self._heartbeat(turn)
        try:
            container_id = self.ctx.runtime.ensure_running(session["id"], session["owner"], session["config"])
            self._execute(container_id, session, turn, output)
        except Exception as exc:  # the turn fails, the worker and the session carry on
            log.warning("turn %s could not run: %s", turn_id, exc)
            failure = f"the session container could not run the turn: {exc}"
        finally:
            stop_heartbeat()
        status, error = ("failed", failure) if failure else output.outcome()
        self._finish(session, turn, output, status, error, first_id)
        self._start_next(session)

    def _claim(self, turn_id: str) -> tuple[dict, dict] | None:
        with transaction(self.ctx.db) as db:
            turn = claim_turn(db, turn_id, self.ctx.holder, LEASE_SECONDS)
            if turn is None:
                return None
            session = db.get(Session, turn.session_id)
            if session.status in ("ready", "stopped", "creating"):
                session.status = "busy"
            session.last_active_at = utcnow()
            return (
                {"id": str(turn.id), "seq": turn.seq, "prompt": turn.prompt, "attempt": turn.attempt},
                {"id": str(session.id), "owner": session.owner, "config": dict(session.config),
                 "claude_session_id": str(session.claude_session_id),
                 "conversation_started": session.conversation_started,
                 "host_queue": session.host_queue},
            )

    def _heartbeat(self, turn: dict):
        """Renews the lease in the background while the turn runs; returns the stop function."""
        done = threading.Event()

        def beat() -> None:
            while not done.wait(RENEW_EVERY):
                with transaction(self.ctx.db) as db:
                    if not renew_lease(db, uuid.UUID(turn["id"]), turn["attempt"], LEASE_SECONDS):
                        return

        thread = threading.Thread(target=beat, name=f"lease-{turn['id'][:8]}", daemon=True)
        thread.start()
        return done.set

    def _execute(self, container_id: str, session: dict, turn: dict, output: TurnOutput) -> None:
        settings = self.ctx.settings
        env = {k: v for k, v in (("ANTHROPIC_API_KEY", settings.anthropic_api_key),
                                 ("ANTHROPIC_BASE_URL", settings.anthropic_base_url)) if v}
        timeout = turn_timeout(session["config"], settings.container_timeout_default)
        result: list[ExecResult] = []
        lines = self.ctx.runtime.exec_lines(container_id, wrapper_argv(turn["id"], session, timeout),
                                            env, turn["prompt"].encode(), result)
        for record in lines:
            line = output.take(record)
            if line is not None:
                self._publish(session, turn, f"claude.{line['type']}", line)
        if output.exit is None and result:
            log.warning("turn %s: wrapper ended without an exit record (exit code %s): %s",
                        turn["id"], result[0].exit_code, result[0].stderr[-500:])

    def _publish(self, session: dict, turn: dict, kind: str, data: dict) -> str:
        return self.ctx.events.publish(Event(session_id=session["id"], turn_id=turn["id"],
                                             seq=turn["seq"], type=kind, data=data))

    def _finish(self, session: dict, turn: dict, output: TurnOutput, status: str,
                error: str | None, first_id: str) -> None:
        result = output.result or {}
        usage = result.get("usage") or {}
        cost = Decimal(str(result.get("total_cost_usd") or 0))
        summary = {"status": status, "result": result.get("result"), "error": error,
                   "usage": usage or None, "cost_usd": float(cost) if result else None,
                   "duration_ms": result.get("duration_ms")}
        kind = "turn.completed" if status == "succeeded" else "turn.failed"
        last_id = self._publish(session, turn, kind, summary)
        with transaction(self.ctx.db) as db:
            done = db.execute(
                update(Turn).where(Turn.id == uuid.UUID(turn["id"]), Turn.attempt == turn["attempt"],
                                   Turn.status == "running")
                .values(status=status, result=result.get("result"), usage=usage or None,
                        cost_usd=cost if result else None, duration_ms=result.get("duration_ms"),
                        error=error, first_event_id=first_id, last_event_id=last_id,
                        finished_at=utcnow(), lease_holder=None, lease_expires_at=None))
            if done.rowcount != 1:
                log.warning("turn %s was taken from us before it finished; result dropped", turn["id"])
                return
            row = db.get(Session, uuid.UUID(session["id"]), with_for_update=True)
            row.input_tokens += int(usage.get("input_tokens") or 0)
            row.output_tokens += int(usage.get("output_tokens") or 0)
            row.cost_usd += cost
            row.conversation_started = row.conversation_started or output.saw_init
            row.last_active_at = utcnow()
            if row.status == "busy":
                row.status = "ready"
        log.info("turn %s %s%s", turn["id"], status, f": {error}" if error else "")

    def _start_next(self, session: dict) -> None:
        """Sends the session's next queued turn on its way, now that this one is done."""
        with transaction(self.ctx.db) as db:
            head = head_queued_turn(db, uuid.UUID(session["id"]))
            host_queue = session["host_queue"]
            if head is not None and host_queue:
                self.ctx.sender.run_turn(str(head.id), host_queue)
