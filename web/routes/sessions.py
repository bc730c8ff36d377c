"""Session routes: create, list, show, spawn a child, list children, stop, delete."""
from __future__ import annotations

from flask import g
from pydantic import ValidationError

from core import admission, limits, trees, workspaces
from core import sessions as session_cmds
from core import turns as turn_cmds
from core.envelope import status_event
from core.turn_ends import ended_event
from core.resources import session_body, turn_body
from web.api import (api, claim_idempotency_key, enqueue, json_body, page, query,
                     remember_idempotency_key)
from web.auth import OutOfScope
from web.context import ctx, unit_of_work
from web.errors import validation_response
from web.schemas import ChildrenQuery, CreateSession, SessionConfig, SessionListQuery, SpawnRequest


@api.post("/sessions")
def create_session():
    """Records a new session and asks a worker to start its container."""
    spec = json_body(CreateSession)
    config = spec.config.model_dump()
    limits.check_ceilings(config, ctx().settings)
    with unit_of_work() as db:
        prior = claim_idempotency_key(db)
        if prior is not None:
            body = session_body(session_cmds.get_owned(db, g.owner, str(prior.resource_id)))
            return body, prior.status_code, {"Location": body["links"]["self"]}
        admission.admit_session(db, g.owner, ctx().settings, config)
        row = session_cmds.create_session(db, g.owner, config, spec.workspace.stored())
        workspaces.hold(db, row)
        remember_idempotency_key(db, "session", row.id, 201)
        body, spec = session_body(row), session_cmds.start_spec(row)
    enqueue(ctx().sender.start_session, body["id"], spec)
    return body, 201, {"Location": body["links"]["self"]}


@api.post("/sessions/<session_id>/spawn")
def spawn(session_id: str):
    """Makes a child session (the parent's config under the request's), optionally with a first prompt."""
    spec = json_body(SpawnRequest)
    try:
        overrides = spec.config_overrides()
    except ValidationError as exc:
        return validation_response(exc, prefix="config.")
    settings = ctx().settings
    with unit_of_work() as db:
        prior = claim_idempotency_key(db)
        if prior is not None:
            child = session_cmds.get_owned(db, g.owner, str(prior.resource_id))
            body = session_body(child)
            body["turn"] = first_turn_body(db, child.id)
            return body, prior.status_code, {"Location": body["links"]["self"]}
        admission.lock_owner(db, g.owner)  # before the parent's row lock, the order every admission keeps
        parent = session_cmds.get_owned(db, g.owner, session_id, lock=True)
        if g.get("token_scope"):
            check_agent_spawn(parent.config, overrides, spec.workspace.stored())
        config = SessionConfig.model_validate(trees.child_config(parent.config, overrides)).model_dump()
        limits.check_ceilings(config, settings)
        admission.admit_session(db, g.owner, settings, config)
        if spec.prompt is not None:
            trees.check_budget(db, parent)
            admission.admit_turn(db, g.owner, settings, session_idle=True)
        child = trees.spawn_child(db, parent, settings, config, spec.workspace.stored())
        workspaces.hold(db, child)
        turn = None
        if spec.prompt is not None:
            turn = turn_cmds.queue_turn(db, child, spec.prompt)
            turn.queued_event_id = ctx().events.publish(turn_cmds.queued_event(turn))
        remember_idempotency_key(db, "session", child.id, 201)
        body, spec = session_body(child), session_cmds.start_spec(child)
        body["turn"] = first_turn_body(db, child.id)
    enqueue(ctx().sender.start_session, body["id"], spec)
    return body, 201, {"Location": body["links"]["self"]}


def check_agent_spawn(parent_config: dict, overrides: dict, workspace: dict) -> None:
    """An agent (a session token) may only make children no more capable than itself, in their own
    ephemeral workspace: it may change the model and the system prompt, and narrow the tools."""
    if workspace.get("type") != "ephemeral":
        raise OutOfScope("an agent's child gets an ephemeral workspace; persistent ones are the owner's")
    extra = set(overrides) - {"model", "append_system_prompt", "allowed_tools"}
    if extra:
        raise OutOfScope(f"an agent may not change {', '.join(sorted(extra))} for its child")
    tools, allowed = overrides.get("allowed_tools"), parent_config.get("allowed_tools")
    if "allowed_tools" in overrides and allowed is not None and (tools is None or not set(tools) <= set(allowed)):
        raise OutOfScope("an agent's child may only use tools the agent itself may use")


def first_turn_body(db, session_id) -> dict | None:
    first = turn_cmds.first_turn(db, session_id)
    if first is None:
        return None
    return turn_body(first, turn_cmds.queue_positions(db, {session_id}).get(first.id))


@api.get("/sessions/<session_id>/children")
def list_children(session_id: str):
    """The session's children; with ?recursive=true the whole tree below it, nested."""
    q = query(ChildrenQuery)
    with unit_of_work() as db:
        row = session_cmds.get_owned(db, g.owner, session_id)
        if not q.recursive:
            return {"items": [with_latest_turn(db, child) for child in trees.children(db, row.id)]}
        nodes = {row.id: {"children": []}}
        for child in trees.descendants(db, row.id):
            if child.status == "deleted" or child.parent_id not in nodes:
                continue
            node = {**with_latest_turn(db, child), "children": []}
            nodes[child.id] = node
            nodes[child.parent_id]["children"].append(node)
        return {"items": nodes[row.id]["children"], "tree_cost_usd": float(trees.tree_cost(db, row.root_id))}


def with_latest_turn(db, row) -> dict:
    latest = turn_cmds.latest_turn(db, row.id)
    return session_body(row, latest, with_latest=True)


@api.get("/sessions")
def list_sessions():
    q = query(SessionListQuery)
    with unit_of_work() as db:
        rows, total = session_cmds.list_owned(db, g.owner, q.status, q.limit, q.offset)
        return page([session_body(r) for r in rows], total, q)


@api.get("/sessions/<session_id>")
def get_session(session_id: str):
    with unit_of_work() as db:
        row = session_cmds.get_owned(db, g.owner, session_id)
        latest = turn_cmds.latest_turn(db, row.id)
        positions = turn_cmds.queue_positions(db, {row.id}) if latest is not None else {}
        latest_body = turn_body(latest, positions.get(latest.id)) if latest is not None else None
        return session_body(row, latest_body, with_latest=True)


def wind_down(session_id: str, command, send) -> dict:
    """Runs a stop/delete command on the session and every session below it, under their locks:
    queued turns are cancelled at once, running ones signalled, the status changes published,
    and `send(session_id, host_queue)` asks each one's worker to finish the job."""
    with unit_of_work() as db:
        row = session_cmds.get_owned(db, g.owner, session_id, lock=True)
        tree = [row] + [s for s in trees.descendants(db, row.id) if s.status != "deleted"]
        cancelled, running, events, targets = [], [], [], []
        for session in tree:
            db.refresh(session, with_for_update=True)
            if session is not row and session.status == "deleted":
                continue
            was_stopped = session.status == "stopped"
            cancelled += command(db, session)
            running += turn_cmds.cancel_running_turns(db, session.id)
            events.append(status_event(str(session.id), session.status))
            if not (was_stopped and session.status == "stopped"):
                targets.append((str(session.id), session.host_queue))
        ctx().events.publish_many([ended_event(t) for t in cancelled] + events)
        body = session_body(row)
    after_turns_ended(cancelled, running)
    for target in targets:
        enqueue(send, *target)
    return body


def after_turns_ended(ended: list, running: list[str]) -> None:
    """Signals running turns to stop, sends the webhooks of turns that ended, moves their batches on."""
    ctx().cancels.send(running)
    for turn in ended:
        if turn.webhook:
            enqueue(ctx().sender.deliver_webhook, "turn", str(turn.id))
    batch_ids = list({turn.batch_id for turn in ended if turn.batch_id})
    if batch_ids:
        enqueue(ctx().advance_batches, batch_ids)


@api.post("/sessions/<session_id>/stop")
def stop_session(session_id: str):
    """Stops the container (and its descendants'); the next chat starts it again with the workspace
    and conversation kept."""
    return wind_down(session_id, session_cmds.request_stop, ctx().sender.stop_session), 202


@api.delete("/sessions/<session_id>")
def delete_session(session_id: str):
    """Removes the container, volumes and events of the session and its descendants; rows stay, marked deleted."""
    return wind_down(session_id, session_cmds.request_delete, ctx().sender.delete_session), 202
