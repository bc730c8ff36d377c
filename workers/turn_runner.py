"""Runs one turn: lease it, exec the wrapper in the session container, publish, record the result."""
from __future__ import annotations

import logging
import threading
import time
import uuid
from decimal import Decimal

from sqlalchemy import update

from core import batches
from core.db import transaction
from core.envelope import Event
from core.session_tokens import mint_session_token
from core.models import Session, Turn, utcnow
from core.turns import claim_turn, final_event_type, head_queued_turn, renew_lease
from workers.context import WorkerContext
from workers.lifecycle import wake
from workers.runtime import ExecResult
from workers.turn_output import TurnOutput

log = logging.getLogger(__name__)

LEASE_SECONDS = 120.0
RENEW_EVERY = 30.0
CANCEL_POLL_SECONDS = 1.0
# A session token outlives its turn by this much, so a spawn tool call at the very end still works.
TOKEN_SLACK_SECONDS = 300


def turn_timeout(config: dict, ceiling: int) -> int:
    """The session's turn timeout, never above the service-wide ceiling."""
    asked = (config.get("timeouts") or {}).get("turn_seconds") or ceiling
    return max(1, min(int(asked), ceiling))


def wrapper_argv(turn_id: str, session: dict, timeout: int, grace: int) -> list[str]:
    """The in-container command for a turn; the prompt goes on stdin, never here."""
    config = session["config"]
    argv = ["python3", "-m", "wrapper", "run", "--turn-id", turn_id, "--timeout", str(timeout),
            "--grace", str(grace)]
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
        output, failure, stop_watch = TurnOutput(), None, None
        try:
            container_id = wake(self.ctx, session["id"], session["owner"], session["config"])
            stop_watch = self._watch(turn, container_id)
            self._execute(container_id, session, turn, output)
        except Exception as exc:  # the turn fails, the worker and the session carry on
            log.warning("turn %s could not run: %s", turn_id, exc)
            failure = f"the session container could not run the turn: {exc}"
        finally:
            if stop_watch:
                stop_watch()
        status, error = ("failed", failure) if failure else output.outcome()
        if status not in ("succeeded", "cancelled") and self._cancel_requested(turn):
            status, error = "cancelled", "cancelled by request"  # e.g. its container was stopped
        finished = self._finish(session, turn, output, status, error, first_id)
        self._start_next(session)
        if finished:
            self._after(turn)

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
                {"id": str(turn.id), "seq": turn.seq, "prompt": turn.prompt, "attempt": turn.attempt,
                 "webhook": turn.webhook, "batch_id": turn.batch_id},
                {"id": str(session.id), "owner": session.owner, "config": dict(session.config),
                 "claude_session_id": str(session.claude_session_id),
                 "conversation_started": session.conversation_started,
                 "host_queue": session.host_queue},
            )

    def _watch(self, turn: dict, container_id: str):
        """While the turn runs: renew its lease and interrupt it when cancelled. Returns the stop function."""
        done = threading.Event()
        turn_uuid = uuid.UUID(turn["id"])

        def watch() -> None:
            renew_at, interrupted = time.monotonic() + RENEW_EVERY, False
            while not done.is_set():
                signalled = not interrupted and self.ctx.cancels.wait(turn["id"], CANCEL_POLL_SECONDS)
                if interrupted:
                    done.wait(CANCEL_POLL_SECONDS)
                if time.monotonic() >= renew_at and not done.is_set():
                    renew_at = time.monotonic() + RENEW_EVERY
                    with transaction(self.ctx.db) as db:
                        if not renew_lease(db, turn_uuid, turn["attempt"], LEASE_SECONDS):
                            return
                    signalled = signalled or (not interrupted and self._cancel_requested(turn))
                if signalled and not done.is_set():
                    interrupted = True
                    self._interrupt(container_id, turn)

        thread = threading.Thread(target=watch, name=f"watch-{turn['id'][:8]}", daemon=True)
        thread.start()

        def stop() -> None:
            done.set()
            self.ctx.cancels.clear(turn["id"])
        return stop

    def _cancel_requested(self, turn: dict) -> bool:
        with transaction(self.ctx.db) as db:
            row = db.get(Turn, uuid.UUID(turn["id"]))
            return row is not None and row.cancel_requested_at is not None

    def _interrupt(self, container_id: str, turn: dict) -> None:
        """Stops Claude Code in the container: interrupt, then terminate, then kill."""
        log.info("turn %s: cancel requested, interrupting Claude Code", turn["id"])
        grace = self.ctx.settings.cancel_grace_seconds
        try:
            code = self.ctx.runtime.run(container_id, ["python3", "-m", "wrapper", "cancel",
                                                       "--turn-id", turn["id"], "--grace", str(grace)])
            if code != 0:
                log.warning("turn %s: Claude Code outlived the kill signal (exit %s)", turn["id"], code)
        except Exception as exc:  # the container may be gone already: then so is the turn
            log.warning("turn %s: could not interrupt: %s", turn["id"], exc)

    def _execute(self, container_id: str, session: dict, turn: dict, output: TurnOutput) -> None:
        settings = self.ctx.settings
        env = {k: v for k, v in (("ANTHROPIC_API_KEY", settings.anthropic_api_key),
                                 ("ANTHROPIC_BASE_URL", settings.anthropic_base_url)) if v}
        timeout = turn_timeout(session["config"], settings.container_timeout_default)
        if settings.session_api_url:  # the agent's spawn tools call the API with a token for its subtree only
            env.update(CCD_API_URL=settings.session_api_url, CCD_SESSION_ID=session["id"],
                       CCD_SESSION_TOKEN=mint_session_token(settings.jwt_secret, session["owner"], session["id"],
                                                            timeout + TOKEN_SLACK_SECONDS))
        result: list[ExecResult] = []
        argv = wrapper_argv(turn["id"], session, timeout, settings.cancel_grace_seconds)
        lines = self.ctx.runtime.exec_lines(container_id, argv, env, turn["prompt"].encode(), result)
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
                error: str | None, first_id: str) -> bool:
        result = output.result or {}
        usage = result.get("usage") or {}
        # Rounded as the database stores it, so the event and the turn row report the same cost.
        cost = Decimal(str(result.get("total_cost_usd") or 0)).quantize(Decimal("0.000001"))
        summary = {"status": status, "result": result.get("result"), "error": error,
                   "usage": usage or None, "cost_usd": float(cost) if result else None,
                   "duration_ms": result.get("duration_ms")}
        last_id = self._publish(session, turn, final_event_type(status), summary)
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
                return False
            row = db.get(Session, uuid.UUID(session["id"]), with_for_update=True)
            row.input_tokens += int(usage.get("input_tokens") or 0)
            row.output_tokens += int(usage.get("output_tokens") or 0)
            row.cost_usd += cost
            row.conversation_started = row.conversation_started or output.saw_init
            row.last_active_at = utcnow()
            if row.status == "busy":
                row.status = "ready"
        log.info("turn %s %s%s", turn["id"], status, f": {error}" if error else "")
        return True

    def _after(self, turn: dict) -> None:
        """The turn's webhook, and its batch's next items."""
        if turn["webhook"]:
            self.ctx.sender.deliver_webhook("turn", turn["id"])
        if turn["batch_id"]:
            batches.advance(self.ctx.db, self.ctx.events, self.ctx.sender, self.ctx.cancels,
                            self.ctx.settings, [turn["batch_id"]])

    def _start_next(self, session: dict) -> None:
        """Sends the session's next queued turn on its way, now that this one is done."""
        with transaction(self.ctx.db) as db:
            head = head_queued_turn(db, uuid.UUID(session["id"]))
            host_queue = session["host_queue"]
            if head is not None and host_queue:
                self.ctx.sender.run_turn(str(head.id), host_queue)
