"""Webhooks end to end with the real stack: a redirect is not followed (a failed attempt, retried, then `failed`),
and deliveries come from the webhook consumer, a process that never reaches Docker."""
from __future__ import annotations

import time
from pathlib import Path

import docker
import pytest

from core.webhooks import SIGNATURE_HEADER, verify
from tests.conftest import wait_for
from tests.receiver import Receiver
from tests.test_e2e import Api

pytestmark = pytest.mark.docker


def webhook_status_becomes(api: Api, turn_id: str, status: str) -> None:
    wait_for(lambda: api.call("GET", f"/api/v1/turns/{turn_id}", 200)["webhook_status"] == status, 90,
             what=f"the webhook to be {status}")


@pytest.fixture(scope="module")
def api(stack_env, token):
    return Api(stack_env["base"], token("webhooks-owner"))


def test_a_webhook_answered_with_a_redirect_is_retried_then_failed_and_the_redirect_target_gets_nothing(
        api, stack_env):
    elsewhere = Receiver(200)
    hook = Receiver(302, location=f"{elsewhere.url}/stolen")
    sid = api.session()["id"]
    try:
        turn = api.call("POST", f"/api/v1/sessions/{sid}/chat", 202,
                        json={"prompt": "SAY: redirected", "webhook": hook.url})
        webhook_status_becomes(api, turn["id"], "failed")
        time.sleep(3)  # time for a wrong extra attempt, or a late follow of the redirect, to show up
    finally:
        hook.stop()
        elsewhere.stop()
    attempts = int(stack_env["env"]["CCD_WEBHOOK_MAX_ATTEMPTS"])
    assert hook.header("CCD-Attempt") == [str(n) for n in range(1, attempts + 1)]
    assert all(verify(stack_env["settings"].webhook_secret, h[SIGNATURE_HEADER], body) for _, h, body in hook.calls)
    assert elsewhere.calls == [], "the redirect was followed: the signed webhook reached another host"
    api.call("DELETE", f"/api/v1/sessions/{sid}", 202)


def test_webhooks_are_delivered_by_the_webhook_consumer_which_never_reaches_docker(api, stack_env):
    consumer = stack_env["webhooks"]
    trap = stack_env["docker_trap"]
    hook = Receiver(200)
    sid = api.session()["id"]
    try:
        turn = api.call("POST", f"/api/v1/sessions/{sid}/chat", 202,
                        json={"prompt": "SAY: from the consumer", "webhook": hook.url})
        webhook_status_becomes(api, turn["id"], "delivered")
    finally:
        hook.stop()
    assert len(hook.calls) == 1
    assert f"webhook for turn {turn['id']} delivered" in consumer.log_path.read_text(errors="replace")
    assert f"webhook for turn {turn['id']}" not in stack_env["worker"].log_path.read_text(errors="replace")
    # The consumer and its pool processes run with DOCKER_HOST at the tripwire, and none ever connected to it.
    pids = [consumer.proc.pid, *map(int, Path(f"/proc/{consumer.proc.pid}/task/{consumer.proc.pid}/children")
                                      .read_text().split())]
    assert len(pids) > 1, "the consumer has no pool processes"
    for pid in pids:
        environ = dict(item.split("=", 1) for item in Path(f"/proc/{pid}/environ").read_text().split("\0") if item)
        assert environ["DOCKER_HOST"] == f"unix://{trap.path}", pid
    assert trap.connections == 0, "the webhook consumer made a Docker client and used it"
    with pytest.raises(docker.errors.DockerException):  # and the tripwire does catch a client that tries
        docker.DockerClient(base_url=f"unix://{trap.path}", timeout=2).ping()
    assert trap.connections == 1
    api.call("DELETE", f"/api/v1/sessions/{sid}", 202)
