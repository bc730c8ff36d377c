"""Runs one turn: lease it, exec the wrapper in the session container, publish, record the result."""
from __future__ import annotations

import contextvars
import logging
import threading
import time
import uuid

import redis
from sqlalchemy import case, or_, select, update
from sqlalchemy.exc import OperationalError, StatementError

from core import batches
from core.claimed import ClaimedSession, ClaimedTurn
from core.db import transaction
from core.logs import bind_log_ids
from core.session_tokens import TOKEN_SLACK_SECONDS, mint_session_token
from core.settings import Settings
from core.models import Session, Turn, utcnow
from core.turn_ends import end_turn
from core.turn_states import CANCELLED_BY_REQUEST, Ending, TurnReason, TurnStatus
from core.turns import SESSIONS, TURNS, claim_turn, next_turn_id, renew_lease
from workers.context import WorkerContext
from workers import metrics
from workers.lifecycle import wake
from workers.approvals import TurnApprovals
from workers.hot import cool
from workers.model_proxy import mint_model_credential
from workers.publisher import SERVICE_DOWN, Publisher, retry_while_down
from workers.runtime import WRAPPER, ExecResult, NotRunning
from workers.turn_output import TurnOutput, reported_figures, storable

log = logging.getLogger(__name__)

# How long a turn whose process vanished waits for its container's state to say why.
STATE_SETTLE_SECONDS = 3.0
CANCEL_POLL_SECONDS = 1.0


def turn_timeout(config: dict, settings: Settings) -> int:
    """The session's turn timeout (CONTAINER_TIMEOUT_DEFAULT when it asks for none), never above the ceiling."""
    asked = (config.get("timeouts") or {}).get("turn_seconds") or settings.container_timeout_default
    return max(1, min(int(asked), settings.turn_ceiling))


def wrapper_argv(turn_id: str, session: ClaimedSession, timeout: int, grace: int, hot_seconds: int = 0) -> list[str]:
    """The wrapper's arguments for a turn (after WRAPPER); the prompt goes on stdin, never here."""
    config = session.config
    argv = ["run", "--turn-id", turn_id, "--timeout", str(timeout), "--grace", str(grace),
            "--hot", str(hot_seconds)]
    flag = "--resume" if session.conversation_started else "--session-id"
    argv += [flag, session.claude_session_id]
    if config.get("model"):
        argv += ["--model", config["model"]]
    asking = config.get("approvals") == "ask"
    # Rules that never ask: the session's own, those its approvals allow, and those an answer said to remember.
    rules = list(config.get("allowed_tools") or [])
    if asking:
        rules += [r for r in [*(config.get("approval_rules") or []), *session.approval_rules] if r not in rules]
    if rules:
        argv += ["--allowed-tools", ",".join(rules)]
    mode = config.get("permission_mode")
    if asking:
        argv += ["--approvals", "ask"]
        # Bypassing permissions would ask nobody: with approvals, Claude Code's own default mode asks.
        mode = "default" if mode in (None, "bypassPermissions") else mode
    if mode:
        argv += ["--permission-mode", mode]
    if config.get("append_system_prompt"):
        argv += ["--append-system-prompt", config["append_system_prompt"]]
    return argv


# Claude Code's control protocol lines: its permission prompts become approvals, not claude.* events.
CONTROL_LINES = ("control_request", "control_cancel_request")
GONE_WHILE_LOST = "the session container stopped while its worker was lost; the turn's process went with it"


def poll_seconds(approvals: TurnApprovals) -> float:
    """How long the watcher may wait for a signal: its poll, or less when a prompt's deadline comes first."""
    deadline = approvals.next_deadline()
    if deadline is None:
        return CANCEL_POLL_SECONDS
    return max(0.05, min(CANCEL_POLL_SECONDS, deadline - time.time()))


class ContainerLost(Exception):
    """The turn's container is gone or was restarted, and the turn's process with it."""


class TurnRunner:
    """Carries one turn from `queued` to a final state; safe to call twice for the same turn."""

    def __init__(self, ctx: WorkerContext) -> None:
        self.ctx = ctx

    def run(self, turn_id: str) -> None:
        claim = self._claim(turn_id)
        if claim is None:
            self._dropped(turn_id)
            return
        turn, session = claim
        metrics.turn_taken(turn)
        bind_log_ids(session_id=session.id)  # with the task's turn and request ids, until the task ends
        publisher = Publisher(self.ctx.events, session, turn)
        try:
            self._run_claimed(turn, session, publisher)
        finally:
            publisher.close()

    def _run_claimed(self, turn: ClaimedTurn, session: ClaimedSession, publisher: Publisher) -> None:
        """Runs (or re-attaches to) a turn this worker holds the lease of, and records how it ended."""
        turn_id = turn.id
        output = TurnOutput(max_bytes=self.ctx.settings.max_turn_output_bytes,
                            max_event=self.ctx.settings.max_event_bytes)
        if turn.resumed:
            mark = self.ctx.events.take_mark(turn_id, turn.attempt)  # the old worker can publish no more
            log.info("turn %s (session %s): its worker was lost, re-attaching (attempt %s, %s lines published)",
                     turn_id, session.id, turn.attempt, mark.get("number", 0))
        else:
            log.info("turn %s (session %s, #%s) started", turn_id, session.id, turn.seq)
            first_id = publisher.publish("turn.started", {"attempt": turn.attempt}, 0, "first")
            mark = {"number": "0", "first": first_id}
        failure, where = None, {}
        turn.approvals = TurnApprovals(self.ctx, session, turn, where)
        # Watching starts before the container does: a long start or restore must not cost the lease.
        stop_watch = self._watch(turn, where, output)
        try:
            where["container"], published = self._container(session, turn), int(mark.get("number") or 0)
            try:
                self._execute(where["container"], session, turn, output, publisher, published)
            except NotRunning:  # stopped (idle, or the engine restarted) or removed: start it, then run the turn
                if turn.resumed:
                    raise ContainerLost(GONE_WHILE_LOST) from None
                where["container"] = wake(self.ctx, session.id, session.owner, session.config)
                if turn.lost:
                    return  # another worker took the turn over while the container started
                self._execute(where["container"], session, turn, output, publisher, published)
        except ContainerLost as exc:
            failure = (str(exc), TurnReason.CONTAINER_LOST)
        except SERVICE_DOWN:
            raise  # Redis or Postgres stayed away: the lease lapses and a re-attaching worker finishes the turn
        except Exception as exc:  # the turn fails, the worker and the session carry on
            log.warning("turn %s could not run: %s", turn_id, exc)
            failure = (f"the session container could not run the turn: {exc}", TurnReason.CONTAINER_ERROR)
        finally:
            stop_watch()
        if turn.lost:
            return
        ending = Ending(TurnStatus.FAILED, *failure) if failure else Ending(*output.outcome())
        if ending.reason == TurnReason.PROCESS_LOST:
            ending = self._why_lost(session, ending)
        ending = self._as_asked(turn, ending)
        if self._finish(session, turn, output, ending, mark, publisher):
            self._send_next(turn.next, session.host_queue)  # looked up as the turn was recorded
            self._keep_hot(session, output)
            self._after(turn)
        else:
            self._start_next(session.id, session.host_queue)

    def _dropped(self, turn_id: str) -> None:
        """Says why a delivery of the turn's task did nothing; a second delivery of a running turn is
        worth a line (the broker redelivered it, or the reaper re-sent it while it ran). A turn that ended
        while queued (cancelled) hands its place on: the turns queued behind it were sent no task of their own."""
        with transaction(self.ctx.db) as db:
            row = db.get(Turn, uuid.UUID(turn_id))
            if row is not None and row.status == TurnStatus.RUNNING:
                log.info("turn %s is already running (attempt %s, lease held by %s); duplicate delivery dropped",
                         turn_id, row.attempt, row.lease_holder)
                return
            log.debug("turn %s is not ours to run (%s)", turn_id, row.status if row else "no such turn")
            if row is None or row.status == TurnStatus.QUEUED:
                return
            host_queue = db.scalar(select(Session.host_queue).where(Session.id == row.session_id))
        self._start_next(str(row.session_id), host_queue)

    def _container(self, session: ClaimedSession, turn: ClaimedTurn) -> str:
        """The container to run in. A new turn goes by the container's name, with no lookup here: most find it
        running, and one that is not is started when the runtime says so (NotRunning, see `_run_claimed`). A
        re-attach runs only in the running container the turn was in (a restarted one has lost the turn's process)."""
        if not turn.resumed:
            return self.ctx.runtime.container_name(session.id)
        container = self.ctx.runtime.find(session.id)
        if container is None or container.status != "running":
            raise ContainerLost(GONE_WHILE_LOST)
        return container.id

    def _why_lost(self, session: ClaimedSession, ending: Ending) -> Ending:
        """Names why a turn's process vanished, from its container's state (killed, out of memory)."""
        try:
            container = self.ctx.runtime.find(session.id)
            deadline = time.monotonic() + STATE_SETTLE_SECONDS
            # The exec stream can end a moment before the engine marks a killed container stopped.
            while container is not None and container.status == "running" and time.monotonic() < deadline:
                time.sleep(0.2)
                container = self.ctx.runtime.find(session.id)
        except Exception:  # Docker itself is unreachable: keep the generic reason
            return ending
        if container is None:
            return Ending(TurnStatus.FAILED, "the session container was removed during the turn",
                          TurnReason.CONTAINER_LOST)
        state = container.attrs.get("State") or {}
        if state.get("OOMKilled"):
            return Ending(TurnStatus.FAILED, "the session container ran out of memory and was killed during the "
                                             "turn; raise config.limits.memory_mb", TurnReason.OUT_OF_MEMORY)
        if not state.get("Running"):
            return Ending(TurnStatus.FAILED, f"the session container stopped during the turn (exit code "
                                             f"{state.get('ExitCode')}); it is started again for the next turn",
                          TurnReason.CONTAINER_LOST)
        return ending

    def _as_asked(self, turn: ClaimedTurn, ending: Ending) -> Ending:
        """A turn that was asked to stop ends as asked: `failed` with the service's reason when it stopped the
        session (e.g. disk_quota), else `cancelled` (e.g. its container was stopped under it). A success, and a
        turn stopped for its output, stand as they are."""
        if ending.status == TurnStatus.SUCCEEDED or ending.reason == TurnReason.OUTPUT_LIMIT:
            return ending
        asked = self._cancel_requested(turn)
        if asked is None or (asked.status == ending.status == TurnStatus.CANCELLED):
            return ending
        return asked

    def _claim(self, turn_id: str) -> tuple[ClaimedTurn, ClaimedSession] | None:
        with transaction(self.ctx.db) as db:
            return claim_turn(db, turn_id, self.ctx.holder, self.ctx.settings.lease_seconds)

    def _watch(self, turn: ClaimedTurn, where: dict, output: TurnOutput):
        """While the turn runs: renew its lease, and interrupt it when cancelled or over its output limit.

        Returns the stop function. Losing the lease (another worker took the turn over) sets
        `turn.lost`, so this worker stops publishing and leaves the rest to the new holder.
        """
        done = threading.Event()
        turn_uuid = uuid.UUID(turn.id)
        lease = self.ctx.settings.lease_seconds
        renew_every = max(1.0, lease / 4)

        def watch() -> None:
            try:
                watch_until_done()
            except Exception:  # a crashed watcher would leave the turn without lease renewals
                log.exception("turn %s: the lease and cancel watcher failed", turn.id)

        approvals = turn.approvals

        def watch_until_done() -> None:
            renew_at, interrupted = time.monotonic() + renew_every, False
            answered = turn.resumed  # answers given while no worker held the turn are passed on first
            while not done.is_set():
                try:
                    signal = None if interrupted else self.ctx.cancels.wait(turn.id, poll_seconds(approvals))
                except redis.RedisError:  # a Redis blip: cancels are also seen in Postgres below
                    signal = None
                    done.wait(CANCEL_POLL_SECONDS)
                signalled = signal == "cancel"
                if interrupted:
                    done.wait(CANCEL_POLL_SECONDS)
                elif not done.is_set():
                    answered = answered or signal == "answer"
                    answered = not self._approvals_step(approvals, answered)
                if time.monotonic() >= renew_at and not done.is_set():
                    renew_at = time.monotonic() + renew_every
                    if not self._renew(turn_uuid, turn.attempt, lease):
                        turn.lost = True
                        log.warning("turn %s: lost its lease to another worker; leaving the turn to it", turn.id)
                        return
                    signalled = signalled or (not interrupted and self._cancel_requested(turn))
                    # An answer whose signal Redis lost is found in Postgres, at least this often.
                    answered = answered or approvals.next_deadline() is not None
                if not interrupted and output.over_limit:
                    log.warning("turn %s: output passed %d bytes, stopping it", turn.id, output.max_bytes)
                    signalled = True
                if signalled and not done.is_set() and where.get("container"):
                    # Not reached (e.g. its container is still starting): the next lease renewal looks again.
                    interrupted = self._interrupt(where["container"], turn)

        # In a copy of this context, so that the watcher's lines carry the turn's ids too.
        thread = threading.Thread(target=contextvars.copy_context().run, args=(watch,), name=f"watch-{turn.id[:8]}",
                                  daemon=True)
        thread.start()

        def stop() -> None:
            done.set()
            self.ctx.cancels.clear(turn.id)
        return stop

    def _approvals_step(self, approvals: TurnApprovals, answered: bool) -> bool:
        """Passes answers on (when one came) and denies prompts past their deadline; False to try again."""
        try:
            if answered:
                approvals.deliver()
            approvals.expire(time.time())
            return True
        except SERVICE_DOWN as exc:
            log.warning("turn %s: approvals wait for the database (%s)", approvals.turn.id, exc)
            return False

    def _renew(self, turn_uuid: uuid.UUID, attempt: int, lease: float) -> bool:
        """Extends the lease; a database blip is not a lost lease (True: try again next time)."""
        try:
            with transaction(self.ctx.db) as db:
                return renew_lease(db, turn_uuid, attempt, lease)
        except OperationalError as exc:
            log.warning("could not renew a lease (database unreachable: %s); retrying", exc.orig or exc)
            return True

    def _cancel_requested(self, turn: ClaimedTurn) -> Ending | None:
        """None, or how a turn asked to stop ends: cancelled by request, or failed with the reason and error the
        service gave (see core.turns.cancel_running_turns)."""
        def check() -> Ending | None:
            with transaction(self.ctx.db) as db:
                row = db.get(Turn, uuid.UUID(turn.id))
                if row is None or row.cancel_requested_at is None:
                    return None
                if row.reason:
                    return Ending(TurnStatus.FAILED, row.error, TurnReason(row.reason))
                return CANCELLED_BY_REQUEST
        return retry_while_down(check, what=f"check turn {turn.id} for a cancel")

    def _interrupt(self, container_id: str, turn: ClaimedTurn) -> bool:
        """Stops the turn: first by asking Claude Code (the control protocol's interrupt: it ends the turn and stays
        hot; the turn agent sends signals if it does not within the grace time), else (a run the agent does not
        hold, a container made before there was one) interrupt, terminate, kill from a `wrapper cancel`. False if
        the container could not be reached."""
        log.info("turn %s: cancel requested, interrupting Claude Code", turn.id)
        try:
            if self.ctx.runtime.agent_control(container_id, {"control": "interrupt", "turn_id": turn.id}) == "ok":
                return True
        except NotRunning as exc:
            log.warning("turn %s: could not interrupt: %s", turn.id, exc)
            return False
        except Exception as exc:  # an agent that does not answer: the signals below
            log.warning("turn %s: the turn agent did not take the interrupt (%s); stopping by signals", turn.id, exc)
        grace = self.ctx.settings.cancel_grace_seconds
        try:
            code = self.ctx.runtime.run(container_id, WRAPPER + ["cancel", "--turn-id", turn.id,
                                                                 "--grace", str(grace)])
            if code != 0:
                log.warning("turn %s: Claude Code outlived the kill signal (exit %s)", turn.id, code)
            return True
        except Exception as exc:  # the container may be gone already (then so is the turn), or not started yet
            log.warning("turn %s: could not interrupt: %s", turn.id, exc)
            return False

    def _execute(self, container_id: str, session: ClaimedSession, turn: ClaimedTurn, output: TurnOutput,
                 publisher: Publisher, published: int) -> None:
        """Runs the turn's wrapper (or, re-attaching, follows its log) and publishes each line past
        `published`, the last wrapper line number already in the stream (batched: see Publisher)."""
        settings = self.ctx.settings
        timeout = turn_timeout(session.config, settings)
        result: list[ExecResult] = []
        cap = settings.max_turn_output_bytes + 64  # one line can at most end the turn: no need to hold more
        if turn.resumed:  # follows the turn's log: an exec, since the container's agent serves only runs
            records = self.ctx.runtime.exec_lines(container_id, WRAPPER + ["attach", "--turn-id", turn.id], {},
                                                  b"", result, max_line=cap)
        else:
            argv = wrapper_argv(turn.id, session, timeout, settings.cancel_grace_seconds, settings.hot_seconds)
            records = self.ctx.runtime.turn_lines(container_id, argv, self._run_env(session, turn, timeout),
                                                  turn.prompt.encode(), result, max_line=cap,
                                                  on_start=lambda process: self._process_started(session, process))
        approvals = turn.approvals
        try:
            for record, size in records:
                line = output.take(record, size, cut=size > cap)
                if turn.lost:
                    return
                if line is None:
                    pass
                elif line["type"] in CONTROL_LINES:  # Claude Code asking (or no longer asking) for permission
                    if line["type"] == "control_request":
                        approvals.requested(line, output.number, publisher if output.number > published else None)
                    else:
                        approvals.withdrawn(line)
                elif output.number > published:
                    publisher.add(f"claude.{line['type']}", line, output.number)
                if output.exit is not None:
                    # The exit record is the wrapper's last: waiting for its process to end and asking the
                    # engine for its exit code would only add time (~20 ms) to every turn.
                    break
        finally:
            records.close()
        if output.exit is None and result:
            log.warning("turn %s: wrapper ended without an exit record (exit code %s): %s",
                        turn.id, result[0].exit_code, result[0].stderr[-500:])

    def _run_env(self, session: ClaimedSession, turn: ClaimedTurn, timeout: int) -> dict[str, str]:
        """A new run's environment: the model through cc-docker's proxy, with a credential for this session only
        (the real key stays out) that names the Claude Code process it would start (a hot process keeps its key
        for its whole life: the proxy accepts it only while that process runs the session's turns, and meters
        them), and with the spawn tools on, a token for the agent's own subtree (renewed every turn)."""
        settings = self.ctx.settings
        process_id = str(turn.process_id)
        env = {"ANTHROPIC_BASE_URL": self.ctx.runtime.model_proxy_url(), "CCD_PROCESS_ID": process_id,
               "ANTHROPIC_API_KEY": mint_model_credential(settings.jwt_secret, session.id,
                                                          settings.max_token_ttl_seconds, process_id=process_id)}
        if settings.session_api_url:
            env.update(CCD_API_URL=self.ctx.runtime.session_api_url(), CCD_SESSION_ID=session.id,
                       CCD_SESSION_TOKEN=mint_session_token(settings.jwt_secret, session.owner, session.id,
                                                            timeout + TOKEN_SLACK_SECONDS,
                                                            settings.jwt_audience, settings.jwt_issuer))
        return env

    def _process_started(self, session: ClaimedSession, process_id: str) -> None:
        """The turn agent says which Claude Code process runs the turn: the session's from now on."""
        if not process_id or process_id == str(session.process_id or ""):
            return
        session.process_id = process_id
        with transaction(self.ctx.db) as db:
            db.execute(update(SESSIONS).where(SESSIONS.c.id == uuid.UUID(session.id))
                       .values(process_id=uuid.UUID(process_id)))

    def _finish(self, session: ClaimedSession, turn: ClaimedTurn, output: TurnOutput, ending: Ending,
                mark: dict[str, str], publisher: Publisher) -> bool:
        """Publishes the final event (unless a lost worker already did) and records the outcome."""
        if turn.lost:
            return False
        ending = ending._replace(error=storable(ending.error))  # it may quote the result line
        # The result line's figures are shown, fitted to their columns; the spend is what the model proxy metered.
        reported = reported_figures(output.result, (output.exit or {}).get("cost_before"))
        text, reported_cost = reported["result"], reported["reported_cost_usd"]
        summary = {"result": text, "usage": reported["usage"], "cost_usd": self._metered_cost(turn),
                   "reported_cost_usd": float(reported_cost) if reported_cost is not None else None,
                   "duration_ms": reported["duration_ms"]}
        if isinstance(text, str) and len(text) > self.ctx.settings.max_event_bytes // 2:
            # The event stays within the event limit; the turn row keeps the whole answer.
            summary.update(result=text[: self.ctx.settings.max_event_bytes // 2], result_truncated=True)
        last_id = mark.get("final")  # taken with the turn: a lost worker got as far as publishing it
        if last_id is None:
            last_id = publisher.publish(ending.event_type, ending.event_data(**summary), output.number, "final")
            if last_id is None:
                log.warning("turn %s was taken over before it finished; leaving it to attempt > %s",
                            turn.id, turn.attempt)
                return False
        values = dict(**reported, first_event_id=mark.get("first"), last_event_id=last_id)
        def record() -> bool:
            return self._record(session, turn, ending, values, output.saw_init)
        try:
            done = retry_while_down(record, what=f"record turn {turn.id}'s result")
        except StatementError as exc:
            if isinstance(exc, OperationalError):
                raise
            # Whatever the result line held, the turn is recorded: without its figures, never re-attached forever.
            log.warning("turn %s: its result line's figures could not be stored (%s); recorded without them",
                        turn.id, type(exc.orig or exc).__name__)
            values.update(result=None, usage=None, reported_cost_usd=None, duration_ms=None)
            done = retry_while_down(record, what=f"record turn {turn.id}'s result")
        if not done:
            log.warning("turn %s was taken from us before it finished; result dropped", turn.id)
            return False
        log.info("turn %s %s%s", turn.id, ending.status, f" ({ending.reason}): {ending.error}" if ending.error else "")
        metrics.turn_finished(turn, ending.status)
        return True

    def _metered_cost(self, turn: ClaimedTurn) -> float | None:
        """What the model proxy has metered for the turn so far; None when the database does not answer right now:
        the final event does not wait for it (the turn row has the figure, and the recording below retries)."""
        try:
            with transaction(self.ctx.db) as db:
                cost = db.scalar(select(TURNS.c.cost_usd).where(TURNS.c.id == uuid.UUID(turn.id)))
        except OperationalError as exc:
            log.warning("turn %s: its metered cost could not be read for the final event (%s); sent without it",
                        turn.id, type(exc.orig or exc).__name__)
            return None
        return float(cost or 0)

    def _record(self, session: ClaimedSession, turn: ClaimedTurn, ending: Ending, values: dict,
                saw_init: bool) -> bool:
        """Ends the turn (core.turn_ends, fenced by our attempt, with `values`) and marks the session's conversation
        and activity (its spend and tokens are added by the model proxy as it meters them); also finds the session's
        next queued turn (`turn.next`), under the same row lock, which saves a transaction on every turn."""
        session_id, s = uuid.UUID(session.id), SESSIONS.c
        with transaction(self.ctx.db) as db:
            if end_turn(db, turn, ending, **values) is None:
                return False
            # One statement (it locks the row as it updates it), not a locked read and an ORM flush.
            db.execute(update(SESSIONS).where(s.id == session_id).values(
                conversation_started=or_(s.conversation_started, saw_init),
                last_active_at=utcnow(),
                status=case((s.status == "busy", "ready"), else_=s.status)))
            head = next_turn_id(db, session_id)
            turn.next = str(head) if head is not None else None
        return True

    def _keep_hot(self, session: ClaimedSession, output: TurnOutput) -> None:
        """The session's process is idle and hot now: the host's least recently used beyond its limit are ended."""
        if self.ctx.settings.hot_seconds <= 0 or output.exit is None or output.exit.get("process_id") is None:
            return
        try:
            cool(self.ctx.runtime, self.ctx.hot, self.ctx.hot.idle(session.id))
        except redis.RedisError as exc:  # each process still ends by itself after CCD_HOT_SECONDS
            log.warning("could not keep the host's hot processes within their limit: %s", exc)

    def _after(self, turn: ClaimedTurn) -> None:
        """The turn's webhook, and its batch's next items."""
        if turn.webhook:
            self.ctx.sender.deliver_webhook("turn", turn.id)
        if turn.batch_id:
            batches.advance(self.ctx.db, self.ctx.events, self.ctx.sender, self.ctx.cancels,
                            self.ctx.settings, [turn.batch_id])

    def _start_next(self, session_id: str, host_queue: str | None) -> None:
        """Sends the session's next queued turn on its way, now that the one before it is done."""
        if not host_queue:
            return  # not started yet: its start sends the first queued turn
        with transaction(self.ctx.db) as db:
            head = next_turn_id(db, uuid.UUID(session_id))
        self._send_next(str(head) if head is not None else None, host_queue)

    def _send_next(self, turn_id: str | None, host_queue: str | None) -> None:
        if turn_id and host_queue:
            self.ctx.sender.run_turn(turn_id, host_queue)
