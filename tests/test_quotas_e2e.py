"""Open files and sockets are limited in real session containers: the agent's own Bash tool opens files and sockets
until the kernel refuses, and cannot raise its limit; warm pool and cold containers alike."""
from __future__ import annotations

import json
import textwrap

import pytest

from tests.test_e2e import Api, container_of
from tests.test_hardening_e2e import sh

pytestmark = pytest.mark.docker
OWNER = "quotas-owner"

# Run by the agent's Bash tool during a turn: opens files and sockets, alternately, until EMFILE.
FD_FLOOD = textwrap.dedent("""
    import json, resource, socket, subprocess
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    shell = subprocess.run(["sh", "-c", "ulimit -n"], capture_output=True, text=True).stdout.strip()
    held, err = [], None
    try:
        while len(held) < 100000:
            held.append(socket.socket() if len(held) % 2 else open("/dev/null"))
    except OSError as exc:
        err = exc.errno
    opened = len(held)
    for f in held:
        f.close()
    try:
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard * 4, hard * 4))
        raised = True
    except (ValueError, OSError):
        raised = False
    print(json.dumps({"soft": soft, "hard": hard, "shell": shell, "opened": opened, "errno": err,
                      "raised": raised}))
""")


@pytest.fixture(scope="module")
def api(stack_env, token):
    return Api(stack_env["base"], token(OWNER))


@pytest.mark.parametrize("config", [{}, {"limits": {"memory_mb": 1024}}], ids=["warm-pool", "cold"])
def test_a_container_opening_files_and_sockets_stops_at_its_nofile_limit(api, config, docker_client, settings,
                                                                        stack_env):
    nofile = 4096  # CCD_NOFILE's default: the stack sets none
    assert "CCD_NOFILE" not in stack_env["env"]
    sid = api.session(**config)["id"]
    first = api.finished_turn(api.chat(sid, "SAY: ready")["id"])
    assert first["status"] == "succeeded", first
    container = container_of(docker_client, settings, sid)
    sh(container, "true", stdin_file=("/tmp/fds.py", FD_FLOOD))
    turn = api.finished_turn(api.chat(sid, "RUN: python3 /tmp/fds.py")["id"])
    assert turn["status"] == "succeeded", turn
    seen = json.loads(turn["result"].removeprefix("BASH-RESULT:").strip())
    assert (seen["soft"], seen["hard"], seen["shell"]) == (nofile, nofile, str(nofile)), seen
    # EMFILE just short of the limit (the interpreter holds a few), and the limit cannot be raised.
    assert seen["errno"] == 24 and nofile - 64 < seen["opened"] < nofile, seen
    assert seen["raised"] is False, seen
    assert container.attrs["HostConfig"]["Ulimits"] == [{"Name": "nofile", "Soft": nofile, "Hard": nofile}]
    # The session carries on.
    after = api.finished_turn(api.chat(sid, "SAY: still here")["id"])
    assert (after["status"], after["result"]) == ("succeeded", "still here"), after
