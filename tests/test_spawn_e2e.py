"""Agents that spawn agents, end to end: the real Claude Code calls the spawn tools of the
wrapper's MCP server, which call the real API with a session token (MAX_SPAWN_DEPTH=1 here)."""
from __future__ import annotations

import json
import uuid

import pytest
import requests
from sqlalchemy import create_engine, func, select

from core.models import Session
from tests.test_e2e import Api, container_of
from tests.test_workspaces_e2e import new_session

pytestmark = pytest.mark.docker


@pytest.fixture(scope="module")
def api(stack_env, token):
    return Api(stack_env["base"], token("spawn-owner"))


def spawn_and_wait(child_prompt: str) -> str:
    """A parent prompt: spawn a child with `child_prompt`, then wait for its turn's result."""
    return (f"CALL: mcp__ccd__spawn_child {json.dumps({'prompt': child_prompt})}\n"
            f"CALL: mcp__ccd__wait_for_child {json.dumps({'session_id': '{{session_id}}', 'timeout_seconds': 150})}")


def finished(api: Api, sid: str, prompt: str) -> dict:
    return api.finished_turn(api.chat(sid, prompt)["id"], timeout=200)


def test_an_agent_spawns_a_child_that_works_in_its_own_container_and_returns_its_result(
        stack_env, api, docker_client):
    settings = stack_env["settings"]
    root = new_session(api)["id"]
    marker = uuid.uuid4().hex
    turn = finished(api, root, spawn_and_wait(f"RUN: echo {marker} > /workspace/child.txt && cat /workspace/child.txt"))
    assert turn["status"] == "succeeded", turn
    assert marker in turn["result"]  # the parent's answer carries the child's result

    children = api.call("GET", f"/api/v1/sessions/{root}/children", 200)["items"]
    assert len(children) == 1
    child = children[0]
    assert child["parent_id"] == root and child["depth"] == 1
    assert child["latest_turn"]["status"] == "succeeded" and marker in child["latest_turn"]["result"]
    # The Bash tool ran in the child's container and wrote only there.
    out = container_of(docker_client, settings, child["id"]).exec_run(["cat", "/workspace/child.txt"], user="agent")
    assert out.exit_code == 0 and out.output.decode().strip() == marker
    assert container_of(docker_client, settings, root).exec_run(["test", "-e", "/workspace/child.txt"]).exit_code != 0

    # The root's tree stream holds both sessions' events, each tagged with its session.
    page = api.call("GET", f"/api/v1/sessions/{root}/events?tree=true&limit=1000", 200)
    by_session = {}
    for event in page["items"]:
        by_session.setdefault(event["session_id"], set()).add(event["type"])
    assert {"turn.completed", "claude.result"} <= by_session[child["id"]]
    assert {"turn.completed", "claude.result"} <= by_session[root]
    rest = api.call("GET", f"/api/v1/sessions/{root}/events?tree=true&since={page['next_since']}", 200)
    assert rest["items"] == [] and not rest["has_more"]

    # Stopping the parent stops the child too.
    api.call("POST", f"/api/v1/sessions/{root}/stop", 202)
    api.session_status(child["id"], "stopped")


def test_spawning_past_the_depth_limit_is_a_tool_error_and_creates_nothing(stack_env, api):
    root = new_session(api)["id"]
    grandchild = f"CALL: mcp__ccd__spawn_child {json.dumps({'prompt': 'SAY: too deep'})}"
    turn = finished(api, root, spawn_and_wait(grandchild))
    assert turn["status"] == "succeeded", turn
    assert "spawn_depth_exceeded" in turn["result"]  # the child's tool error, passed up by the parent's wait
    engine = create_engine(stack_env["settings"].database_url)
    with engine.connect() as conn:
        depths = conn.execute(select(Session.depth, func.count()).where(Session.root_id == uuid.UUID(root))
                              .group_by(Session.depth)).all()
    engine.dispose()
    assert sorted(depths) == [(0, 1), (1, 1)]


def test_a_spent_tree_budget_refuses_the_next_turn(stack_env, api):
    root = new_session(api, max_budget_usd=0.000001)["id"]
    first = finished(api, root, "SAY: spend something")
    assert first["status"] == "succeeded" and first["cost_usd"] > 0.000001, first
    resp = requests.post(f"{stack_env['base']}/api/v1/sessions/{root}/chat", json={"prompt": "SAY: more"},
                         headers=api.headers, timeout=30)
    assert resp.status_code == 402 and resp.json()["error"]["code"] == "budget_exhausted"
