"""The model proxy against attacks from inside real session containers: the account's other endpoints, a credential
kept past its turn or its session, and a flood of idle connections; the scripted model records what reached it."""
from __future__ import annotations

import http.client
import json
import textwrap
import time

import pytest

from tests.conftest import wait_for
from tests.test_e2e import Api, container_of
from tests.test_hardening_e2e import sh

pytestmark = pytest.mark.docker
OWNER = "proxy-e2e-owner"

# Run by the agent's own Bash tool: the credential and the proxy's address come from the agent's environment (or,
# where the tool's shell lacks them, from Claude Code's own, in /proc, as any process of the agent can read it).
PROBE = textwrap.dedent("""
    import http.client, json, os, sys
    from urllib.parse import urlsplit

    def agent_env():
        if os.environ.get("ANTHROPIC_API_KEY"):
            return os.environ, "environ"
        for pid in filter(str.isdigit, os.listdir("/proc")):
            try:
                with open(f"/proc/{pid}/environ", "rb") as f:
                    data = f.read()
            except OSError:
                continue
            env = dict(v.split("=", 1) for v in data.decode("utf-8", "replace").split("\\0") if "=" in v)
            if env.get("ANTHROPIC_API_KEY"):
                return env, "proc"
        raise SystemExit("no credential found")

    env, source = agent_env()
    base, key = urlsplit(env["ANTHROPIC_BASE_URL"]), env["ANTHROPIC_API_KEY"]
    if sys.argv[1:] == ["credential"]:
        print(json.dumps({"source": source, "base": env["ANTHROPIC_BASE_URL"], "key": key}))
        raise SystemExit
    out = {"source": source}
    for call in sys.argv[1:]:
        method, target = call.split(" ", 1)
        body = json.dumps({"model": "m", "max_tokens": 5, "messages": [{"role": "user", "content": "SAY: probe"}]})
        conn = http.client.HTTPConnection(base.hostname, base.port, timeout=30)
        conn.request(method, target, body=body.encode() if method in ("POST", "PUT") else None,
                     headers={"x-api-key": key, "anthropic-version": "2023-06-01", "content-type": "application/json"})
        resp = conn.getresponse()
        answer = json.loads(resp.read() or b"{}")
        out[call] = [resp.status, (answer.get("error") or {}).get("type") or answer.get("type")]
        conn.close()
    print(json.dumps(out))
""")

# The account's endpoints a stolen key would use, and ways of dressing them up as the messages endpoint.
FORBIDDEN = ["GET /v1/files", "POST /v1/files", "GET /v1/files/file_011/content", "DELETE /v1/files/file_011",
             "GET /v1/models", "GET /v1/models/claude-opus-4-1", "POST /v1/messages/batches",
             "GET /v1/messages/batches", "POST /v1/messages/batches/msgbatch_01/cancel", "POST /v1/messages/../files",
             "POST //v1/files", "POST /v1/messages/%2e%2e/files", "POST /v1/messages?beta=true&limit=1000",
             "GET /v1/messages?beta=true", "POST /v1/organizations/api_keys"]


@pytest.fixture(scope="module")
def api(stack_env, token):
    return Api(stack_env["base"], token(OWNER))


def started_session(api: Api) -> str:
    sid = api.session()["id"]
    turn = api.finished_turn(api.chat(sid, "SAY: ready")["id"])
    assert turn["status"] == "succeeded", turn
    return sid


def bash_result(api: Api, sid: str, command: str, timeout: float = 90) -> dict:
    """Runs `command` with the agent's own Bash tool in a turn; its output, read as JSON."""
    turn = api.finished_turn(api.chat(sid, f"RUN: {command}")["id"], timeout=timeout)
    assert turn["status"] == "succeeded", turn
    return json.loads(turn["result"].removeprefix("BASH-RESULT:").strip())


def proxy_call(url: str, key: str) -> tuple[int, dict]:
    """A Messages API call to the proxy from the test host, with a credential taken from a container."""
    host, port = url.removeprefix("http://").split(":")
    conn = http.client.HTTPConnection(host, int(port), timeout=30)
    body = {"model": "m", "max_tokens": 5, "messages": [{"role": "user", "content": "SAY: from outside"}]}
    conn.request("POST", "/v1/messages?beta=true", body=json.dumps(body).encode(),
                 headers={"x-api-key": key, "content-type": "application/json"})
    resp = conn.getresponse()
    answer = json.loads(resp.read())
    conn.close()
    return resp.status, answer


def test_from_inside_a_turn_the_accounts_other_endpoints_are_refused_and_never_reach_the_model(
        api, stack_env, docker_client, settings):
    model = stack_env["model"]
    sid = started_session(api)
    sh(container_of(docker_client, settings, sid), "true", stdin_file=("/tmp/probe.py", PROBE))
    before = len(model.targets())
    calls = " ".join(f"'{call}'" for call in FORBIDDEN + ["POST /v1/messages?beta=true"])
    seen = bash_result(api, sid, f"python3 /tmp/probe.py {calls}")
    assert seen["source"] == "environ", seen  # the Bash tool has the credential in its own environment
    for call in FORBIDDEN:
        assert seen[call] == [403, "permission_error"], (call, seen)
    # The same credential, at the same moment, does reach the model: the refusals are about the call, not the key.
    assert seen["POST /v1/messages?beta=true"] == [200, "message"], seen
    reached = model.targets()[before:]
    assert reached and set(reached) == {("POST", "/v1/messages?beta=true")}, reached
    paths = {target.split("?")[0] for _, target in model.targets()}
    assert not {p for p in paths if "files" in p or "models" in p or "batches" in p or p.startswith("//")}, paths
    # The proxy's log names the session for each refusal.
    log = stack_env["proxy"].log_path.read_text(errors="replace")
    for line in ("GET '/v1/files'", "POST '/v1/messages/batches'", "POST '/v1/messages/%2e%2e/files'"):
        assert f"refused {line} for session {sid}" in log, line


def test_a_credential_taken_in_a_turn_is_refused_between_turns_in_a_later_turn_and_once_its_session_stopped(
        api, stack_env, docker_client, settings):
    model = stack_env["model"]
    sid = started_session(api)
    sh(container_of(docker_client, settings, sid), "true", stdin_file=("/tmp/probe.py", PROBE))
    stolen = bash_result(api, sid, "python3 /tmp/probe.py credential")
    url, key = stolen["base"], stolen["key"]
    assert url == f"http://{stack_env['gateway']}:{stack_env['env']['CCD_MODEL_PROXY_PORT']}", stolen
    before = len(model.targets())
    # Between turns the session is alive and its credential unexpired, but no turn of it runs.
    status, answer = proxy_call(url, key)
    assert (status, answer["error"]["type"]) == (403, "permission_error"), answer
    assert answer["error"]["message"] == f"session {sid} has no turn running; its credential reaches the model " \
                                         "only during a turn", answer
    assert len(model.targets()) == before
    # Once its Claude Code process has ended, a later turn of the session does not bring it back: a credential is
    # good only while its own process runs the session's turns (the gate is the process it was minted for, not the
    # key's age), while that later turn's new Claude Code reaches the model with its own.
    sh(container_of(docker_client, settings, sid), "pkill -KILL -f '^claude -p --input-format' || true")
    slow = api.chat(sid, "SLOW: 12")["id"]
    wait_for(lambda: api.call("GET", f"/api/v1/turns/{slow}", 200)["status"] == "running"
             and len(model.targets()) > before, 60, what="the slow turn to reach the model")
    status, answer = proxy_call(url, key)
    assert (status, answer["error"]["type"]) == (403, "permission_error"), answer
    assert f"of session {sid}, which has ended" in answer["error"]["message"], answer
    assert api.call("GET", f"/api/v1/turns/{slow}", 200)["status"] == "running"  # it was still running
    assert api.finished_turn(slow)["status"] == "succeeded"
    assert proxy_call(url, key)[0] == 403
    api.call("POST", f"/api/v1/sessions/{sid}/stop", 202)
    api.session_status(sid, "stopped")
    after_stop = len(model.targets())
    status, answer = proxy_call(url, key)
    assert (status, answer["error"]["type"]) == (403, "permission_error"), answer
    assert answer["error"]["message"] == f"session {sid} is stopped; its credential no longer reaches the model"
    api.call("DELETE", f"/api/v1/sessions/{sid}", 202)
    api.session_status(sid, "deleted")
    status, answer = proxy_call(url, key)
    assert status == 403 and f"session {sid} is deleted" in answer["error"]["message"], answer
    assert len(model.targets()) == after_stop  # none of the refused calls reached the model


# Opens `total` connections to the proxy from `procs` processes (one process's open files would not hold them all),
# sends nothing on them, and watches each until the proxy closes it: at once with a 429 (over the container's share),
# or after the idle time. Prints a summary once every connection is closed, or after `wait` seconds.
FLOOD = textwrap.dedent("""
    import json, os, select, socket, sys, time
    host, port, total, procs, wait, mark = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4]), \\
        float(sys.argv[5]), sys.argv[6]

    def flood(index, count):
        socks, failed = {}, 0
        for _ in range(count):
            s = socket.socket()
            s.settimeout(10)
            try:
                s.connect((host, port))
            except OSError:
                failed += 1
                s.close()
                continue
            s.setblocking(False)
            socks[s.fileno()] = [s, time.monotonic(), b""]
        open(f"{mark}.{index}", "w").close()
        poller = select.poll()
        for fd in socks:
            poller.register(fd, select.POLLIN)
        turned_away, held = 0, []
        deadline = time.monotonic() + wait
        while socks and time.monotonic() < deadline:
            for fd, _ in poller.poll(200):
                s, opened, data = socks[fd]
                try:
                    chunk = s.recv(65536)
                except BlockingIOError:
                    continue
                except OSError:
                    chunk = b""
                if chunk:
                    socks[fd][2] += chunk
                    continue
                poller.unregister(fd)
                del socks[fd]
                s.close()
                if data.startswith(b"HTTP/1.1 429 "):
                    turned_away += 1
                else:
                    held.append(round(time.monotonic() - opened, 2))
        return {"opened": count - failed, "failed": failed, "turned_away": turned_away, "held": held,
                "still_open": len(socks)}

    per, pids = total // procs, []
    for index in range(procs):
        read, write = os.pipe()
        pid = os.fork()
        if pid == 0:
            os.close(read)
            os.write(write, json.dumps(flood(index, per)).encode())
            os._exit(0)
        os.close(write)
        pids.append((pid, read))
    summary = {"opened": 0, "failed": 0, "turned_away": 0, "held": [], "still_open": 0}
    for pid, read in pids:
        data = b""
        while chunk := os.read(read, 1 << 20):
            data += chunk
        os.waitpid(pid, 0)
        for key, value in json.loads(data).items():
            summary[key] += value
    print(json.dumps(summary))
""")
TCP_ESTABLISHED = "01"


def connections_to(container, port: int) -> int:
    """The container's TCP connections to `port` that are still established (the server has not closed them)."""
    code, out = sh(container, "cat /proc/net/tcp")
    assert code == 0, out
    rows = [line.split() for line in out.splitlines()[1:]]
    return sum(1 for row in rows if int(row[2].split(":")[1], 16) == port and row[3] == TCP_ESTABLISHED)


def test_a_container_holding_5000_idle_connections_to_the_proxy_leaves_other_sessions_turns_working(
        api, stack_env, docker_client, settings):
    idle = int(stack_env["env"]["CCD_MODEL_PROXY_IDLE_SECONDS"])
    share = stack_env["settings"].model_proxy_client_connections
    port = int(stack_env["env"]["CCD_MODEL_PROXY_PORT"])
    attacker, neighbour = started_session(api), started_session(api)
    box = container_of(docker_client, settings, attacker)
    sh(box, "rm -f /tmp/flood.mark.*", stdin_file=("/tmp/flood.py", FLOOD))
    procs = 10
    flood = api.chat(attacker, f"RUN: python3 /tmp/flood.py {stack_env['gateway']} {port} 5000 {procs} "
                               f"{idle + 30} /tmp/flood.mark")["id"]
    wait_for(lambda: sh(box, "ls /tmp/flood.mark.* 2>/dev/null | wc -l")[1].strip() == str(procs), 90,
             what="the flood to open its connections")
    # Connections the kernel completed but the proxy has not accepted yet (its listen backlog) are established on the
    # container's side until the proxy takes them and turns them away: wait for that, then count.
    def settled() -> int | None:
        held = connections_to(box, port)
        return held if held <= share else None

    held_at_start = wait_for(settled, 60, what="the proxy to turn away what is past the container's share")
    # Its share (Claude Code's own keep-alive connection may hold a place of it), and no more.
    assert share // 2 <= held_at_start <= share, held_at_start
    model = stack_env["model"]
    before = len(model.targets())
    served = api.chat(neighbour, "SAY: still served")["id"]
    # The neighbour's Claude Code reached the model through the proxy while the flood held its connections open.
    wait_for(lambda: len(model.targets()) > before, idle, what="the neighbour's turn to reach the model")
    assert connections_to(box, port) >= share // 2
    turn = api.finished_turn(served)
    assert (turn["status"], turn["result"]) == ("succeeded", "still served"), turn
    finished = api.finished_turn(flood, timeout=idle + 90)
    assert finished["status"] == "succeeded", finished
    summary = json.loads(finished["result"].removeprefix("BASH-RESULT:").strip())
    assert summary["opened"] + summary["failed"] == 5000 and summary["failed"] == 0, {**summary, "held": "..."}
    assert summary["still_open"] == 0, summary["still_open"]  # the proxy closed every one of them
    # All but its share were turned away at once; the share was closed after the idle time, not before.
    assert len(summary["held"]) <= share and summary["turned_away"] == 5000 - len(summary["held"]), summary
    assert summary["held"] and all(idle - 1 <= t <= idle + 15 for t in summary["held"]), summary["held"]
    # And the attacker's own session still works once its connections are gone.
    turn = api.finished_turn(api.chat(attacker, "SAY: after the flood")["id"])
    assert (turn["status"], turn["result"]) == ("succeeded", "after the flood"), turn
