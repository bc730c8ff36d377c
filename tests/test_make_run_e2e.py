"""`make run` as a new user gets it: scripts/run.py itself starts the stack (against this run's database, Redis prefix,
network and ports, and the scripted model), with no CCD_SESSION_API_URL set, and an agent's spawn tool works."""
from __future__ import annotations

import json
import os
import signal
import sys
import uuid

import pytest
import requests
from sqlalchemy.engine import make_url

from client.tokens import mint_token
from tests import stack
from tests.conftest import RUN_ID, wait_for
from tests.model_server import ModelServer
from tests.stack import ROOT
from tests.test_e2e import Api
from tests.test_spawn_e2e import spawn_and_wait
from tests.test_workspaces_e2e import new_session

pytestmark = pytest.mark.docker


@pytest.fixture(scope="module")
def make_run(settings, docker_client):
    """scripts/run.py in the foreground, as `make run` starts it; only what says where this run's parts are is set."""
    stack.build_image(settings.image)
    model = ModelServer("127.0.0.1", 0).start()
    port, prefix, network = stack.free_port(), f"{settings.key_prefix}mr", f"ccdt{RUN_ID}-mr"
    database_url = make_url(settings.database_url).set(database=f"ccd_test_{RUN_ID}_mr").render_as_string(
        hide_password=False)
    env = {**{k: v for k, v in os.environ.items() if not k.startswith(("ANTHROPIC_", "CCD_", "MAX_SPAWN"))},
           "JWT_SECRET": settings.jwt_secret, "DATABASE_URL": database_url, "REDIS_URL": settings.redis_url,
           "CCD_KEY_PREFIX": prefix, "CCD_SESSION_NETWORK": network, "CCD_IMAGE": settings.image,
           "CCD_PORT": str(port), "CCD_MODEL_PROXY_PORT": str(stack.free_port()),
           "CCD_WORKER_METRICS_PORT": str(stack.free_port()), "CCD_WARM_POOL_SIZE": "0",
           "ANTHROPIC_API_KEY": settings.anthropic_api_key, "ANTHROPIC_BASE_URL": model.url}
    run = stack.Process("make-run", [sys.executable, "scripts/run.py"], env)
    try:
        stack.wait_for_log(run, "cc-docker is running at", "start the stack", timeout=300)
        stack.wait_for_log(run, " ready.", "start its worker", timeout=60)
        yield {"base": f"http://127.0.0.1:{port}", "run": run, "model": model}
    finally:
        if run.alive():  # its SIGTERM handler stops everything it started
            os.kill(run.proc.pid, signal.SIGTERM)
            try:
                run.proc.wait(30)
            except Exception:
                os.killpg(run.proc.pid, signal.SIGKILL)
        run.stop()
        model.stop()
        stack.remove_prefixed(docker_client, prefix, network)
        stack.drop_database(database_url)


def test_make_run_gives_agents_a_spawn_tool_whose_child_answers_into_the_parents_result(make_run, settings):
    run = make_run["run"]
    api = Api(make_run["base"], mint_token(settings.jwt_secret, "make-run-owner", 900))
    root = new_session(api)["id"]
    marker = uuid.uuid4().hex
    turn = api.finished_turn(api.chat(root, spawn_and_wait(f"SAY: child says {marker}"))["id"], timeout=240)
    assert turn["status"] == "succeeded", (turn, run.tail())
    assert "NO-TOOL" not in (turn["result"] or ""), turn["result"]  # the model was offered the spawn tool
    assert marker in turn["result"]  # the child's answer came back through wait_for_child
    children = wait_for(lambda: api.call("GET", f"/api/v1/sessions/{root}/children", 200)["items"], 30,
                        what="the child session")
    assert [c["parent_id"] for c in children] == [root] and json.dumps(children).count(marker) >= 1
    assert "agents get the spawn tools" in run.log_path.read_text(errors="replace")  # and make run said so


def test_make_run_keeps_a_webhook_secret_so_webhooks_are_on(make_run, settings):
    api = Api(make_run["base"], mint_token(settings.jwt_secret, "make-run-owner", 900))
    sid = new_session(api)["id"]
    # A loopback receiver is refused for its address (webhook_not_allowed), not for webhooks being off: nothing is
    # delivered anywhere, and the server had a secret to sign with.
    resp = requests.post(f"{make_run['base']}/api/v1/sessions/{sid}/chat", headers=api.headers, timeout=30,
                         json={"prompt": "SAY: hi", "webhook": "http://127.0.0.1:9/hook"})
    assert resp.status_code == 400 and resp.json()["error"]["code"] == "webhook_not_allowed", resp.text
    assert len((ROOT / ".run" / "webhook_secret").read_text().strip()) >= 32
