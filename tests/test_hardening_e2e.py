"""Hostile agent code stays contained, and the model key stays out: checked inside real session containers."""
from __future__ import annotations

import json
import socket
import textwrap

import pytest
import requests

from tests.conftest import wait_for
from tests.test_e2e import Api, container_of

pytestmark = pytest.mark.docker
OWNER = "hardening-owner"
# The shared session's limits: small enough to hit quickly, big enough for Claude Code (~250 MB).
LIMITS = {"memory_mb": 512, "cpus": 0.5, "pids": 128}

PROBE = textwrap.dedent("""
    import json, socket, sys, urllib.request, urllib.error
    out = {}
    for target in sys.argv[1:]:
        if target.startswith("http"):
            try:
                out[target] = urllib.request.urlopen(target, timeout=5).status
            except urllib.error.HTTPError as exc:
                out[target] = [exc.code, json.loads(exc.read() or b"{}")]
            except OSError as exc:
                out[target] = "error " + str(exc)
            continue
        host, port = target.rsplit(":", 1)
        try:
            socket.create_connection((host, int(port)), timeout=3).close()
            out[target] = "open"
        except OSError as exc:
            out[target] = "closed " + type(exc).__name__ + " " + str(exc.errno)
    print(json.dumps(out))
""")

FORK_BOMB = textwrap.dedent("""
    import json, os, time
    kids, err = [], None
    try:
        while len(kids) < 100000:
            pid = os.fork()
            if pid == 0:
                time.sleep(120)
                os._exit(0)
            kids.append(pid)
    except OSError as exc:
        err = exc.errno
    for pid in kids:
        os.kill(pid, 9)
        os.waitpid(pid, 0)
    print(json.dumps({"forked": len(kids), "errno": err}))
""")

# Run by the agent's own Bash tool during a turn, so Claude Code, the wrapper and the shell are alive.
# It holds the key reversed: the script and the prompt must not themselves put the key in the container.
SCANNER = textwrap.dedent("""
    import json, os
    needle = "{reversed_key}"[::-1].encode()
    leaks, procs, files, agents = [], 0, 0, []
    for pid in filter(str.isdigit, os.listdir("/proc")):
        for part in ("environ", "cmdline"):
            try:
                with open(f"/proc/{{pid}}/{{part}}", "rb") as f:
                    data = f.read()
            except OSError:
                continue
            procs += part == "environ"
            if needle in data:
                leaks.append(f"/proc/{{pid}}/{{part}}")
            if part == "environ" and b"ANTHROPIC_API_KEY=" in data:
                env = dict(v.split("=", 1) for v in data.decode("utf-8", "replace").split("\\0") if "=" in v)
                agents.append({{"base_url": env.get("ANTHROPIC_BASE_URL"), "key": env["ANTHROPIC_API_KEY"]}})
    for top in ("/workspace", "/home/agent", "/tmp", "/etc"):
        for root, _dirs, names in os.walk(top):
            for name in names:
                try:
                    with open(os.path.join(root, name), "rb") as f:
                        data = f.read(64 << 20)
                except OSError:
                    continue
                files += 1
                if needle in data:
                    leaks.append(os.path.join(root, name))
    print(json.dumps({{"leaks": leaks, "procs": procs, "files": files, "agents": agents, "uid": os.getuid()}}))
""")


def sh(container, command: str, user: str = "agent", stdin_file: tuple[str, str] | None = None) -> tuple[int, str]:
    """Runs a shell command in the container (as the agent, like the worker does); its exit code and output."""
    if stdin_file:  # writes a script first, through the shell, so the test needs no tar upload
        path, text = stdin_file
        code, out = container.exec_run(["sh", "-c", f"cat > {path} <<'CCD_EOF'\n{text}\nCCD_EOF"], user=user)
        assert code == 0, out
    code, out = container.exec_run(["sh", "-c", command], user=user)
    return code, out.decode("utf-8", "replace")


def probe(container, *targets: str) -> dict:
    code, out = sh(container, "python3 /tmp/probe.py " + " ".join(targets), stdin_file=("/tmp/probe.py", PROBE))
    assert code == 0, out
    return json.loads(out)


def cgroup(container, v1: str, v2: str) -> str:
    """A cgroup file of the container, seen from inside (cgroup v1 or v2 layout)."""
    code, out = sh(container, f"cat /sys/fs/cgroup/{v1} 2>/dev/null || cat /sys/fs/cgroup/{v2}")
    assert code == 0, out
    return out


def stat_value(text: str, key: str) -> int:
    return next(int(line.split()[1]) for line in text.splitlines() if line.split()[0] == key)


@pytest.fixture(scope="module")
def api(stack_env, token):
    return Api(stack_env["base"], token(OWNER))


def started_session(api: Api, **config) -> str:
    sid = api.session(**config)["id"]
    turn = api.finished_turn(api.chat(sid, "SAY: ready")["id"])
    assert turn["status"] == "succeeded", turn
    return sid


@pytest.fixture(scope="module")
def box(api, docker_client, settings):
    """One session container, with small limits, shared by the checks below."""
    sid = started_session(api, limits=LIMITS)
    return sid, container_of(docker_client, settings, sid)


@pytest.fixture(scope="module")
def neighbour(api, docker_client, settings):
    """A second session, on the same host and network."""
    sid = started_session(api)
    return sid, container_of(docker_client, settings, sid)


def test_the_container_is_started_hardened(box):
    _, container = box
    container.reload()
    host = container.attrs["HostConfig"]
    assert host["ReadonlyRootfs"] is True
    assert host["CapDrop"] == ["ALL"] and not host["CapAdd"] and host["Privileged"] is False
    assert "no-new-privileges" in host["SecurityOpt"]
    assert host["PidsLimit"] == LIMITS["pids"] and host["Memory"] == LIMITS["memory_mb"] << 20
    assert host["MemorySwap"] == host["Memory"]  # no swap to hide in
    assert not any("docker.sock" in (m.get("Source") or "") for m in container.attrs["Mounts"])


def test_the_agent_is_not_root_and_has_no_capabilities(box):
    _, container = box
    code, out = sh(container, "id -u; grep -E '^(CapInh|CapPrm|CapEff|CapBnd|CapAmb|NoNewPrivs):' /proc/self/status")
    assert code == 0, out
    lines = out.split()
    assert lines[0] == "1000"
    status = dict(zip(lines[1::2], lines[2::2], strict=True))
    assert status == {"CapInh:": "0" * 16, "CapPrm:": "0" * 16, "CapEff:": "0" * 16, "CapBnd:": "0" * 16,
                      "CapAmb:": "0" * 16, "NoNewPrivs:": "1"}


def test_a_setuid_root_binary_does_not_escalate(box):
    _, container = box
    # The image ships no setuid or setgid programs at all.
    code, out = sh(container, "find / -xdev -type f -perm /6000 2>/dev/null")
    assert out.strip() == "", out
    # Make one: a root-owned copy of `id` with the setuid bit, on the workspace volume (not mounted nosuid).
    assert sh(container, "mkdir -p /workspace/suid && chmod 777 /workspace/suid")[0] == 0
    code, out = sh(container, "cp /usr/bin/id /workspace/suid/id && chmod 4755 /workspace/suid/id "
                              "&& stat -c %u:%a /workspace/suid/id", user="root")
    assert (code, out.strip()) == (0, "0:4755"), out
    try:
        code, out = sh(container, "/workspace/suid/id -u")
        assert (code, out.strip()) == (0, "1000"), out  # the effective uid stays the agent's
    finally:
        sh(container, "rm -rf /workspace/suid", user="root")


def test_only_workspace_home_and_a_small_tmp_are_writable(box):
    _, container = box
    for path in ("/probe", "/usr/probe", "/etc/probe", "/opt/ccd/probe"):
        # root (still without capabilities) owns these: only a read-only file system stops it
        code, out = sh(container, f"touch {path}", user="root")
        assert code != 0 and "Read-only file system" in out, (path, out)
    code, out = sh(container, "touch /workspace/w $HOME/h /tmp/t && rm /workspace/w $HOME/h /tmp/t && echo ok")
    assert (code, out.strip()) == (0, "ok"), out
    code, out = sh(container, "grep ' /tmp ' /proc/mounts")
    assert "tmpfs" in out and "size=262144k" in out and "nosuid" in out, out
    try:
        code, out = sh(container, "head -c 300M /dev/zero > /tmp/fill")
        assert code != 0 and "No space left on device" in out, out
    finally:
        sh(container, "rm -f /tmp/fill")


def test_a_fork_bomb_stops_at_the_pids_limit_and_the_container_survives(box, api):
    sid, container = box
    code, out = sh(container, "python3 /tmp/bomb.py", stdin_file=("/tmp/bomb.py", FORK_BOMB))
    assert code == 0, out
    result = json.loads(out)
    assert result["errno"] == 11 and 0 < result["forked"] < LIMITS["pids"], result  # EAGAIN at the limit
    container.reload()
    assert container.status == "running"
    turn = api.finished_turn(api.chat(sid, "SAY: after the bomb")["id"])
    assert (turn["status"], turn["result"]) == ("succeeded", "after the bomb"), turn


def test_a_memory_hog_is_oom_killed_inside_its_container(box):
    _, container = box
    before = stat_value(cgroup(container, "memory/memory.oom_control", "memory.events"), "oom_kill")
    code, out = sh(container, "python3 -c \"x = b'x' * (1536 << 20)\"")
    assert code == 137, (code, out)  # SIGKILL from the kernel's OOM killer
    assert stat_value(cgroup(container, "memory/memory.oom_control", "memory.events"), "oom_kill") > before
    container.reload()
    assert container.status == "running"
    assert sh(container, "echo alive") == (0, "alive\n")


def cpu_usage_us(container) -> float:
    """CPU time the container used so far, in microseconds."""
    code, out = sh(container, "cat /sys/fs/cgroup/cpuacct/cpuacct.usage 2>/dev/null "
                              "|| grep usage_usec /sys/fs/cgroup/cpu.stat")
    assert code == 0, out
    parts = out.split()
    return int(parts[-1]) / (1000 if len(parts) == 1 else 1)  # v1 counts nanoseconds


def test_a_cpu_spinner_gets_only_its_share_and_another_session_still_runs(box, neighbour, api):
    _, container = box
    other, _ = neighbour
    quota = cgroup(container, "cpu/cpu.cfs_quota_us", "cpu.max").split()[0]
    assert quota == "50000", quota  # cpus 0.5: 50 ms per 100 ms period
    spin = "import os\nos.fork()\nos.fork()\nwhile True:\n    pass\n"  # four spinners on a 2-core machine
    sh(container, "true", stdin_file=("/tmp/spin.py", spin))
    container.exec_run(["python3", "/tmp/spin.py"], user="agent", detach=True)
    try:
        def throttled() -> int:
            return stat_value(cgroup(container, "cpu/cpu.stat", "cpu.stat"), "nr_throttled")

        def periods() -> int:
            return stat_value(cgroup(container, "cpu/cpu.stat", "cpu.stat"), "nr_periods")

        first = throttled()
        wait_for(lambda: throttled() > first + 5, 60, what="the spinner to be throttled")
        used, counted = cpu_usage_us(container), periods()
        turn = api.finished_turn(api.chat(other, "SAY: not starved")["id"])
        assert (turn["status"], turn["result"]) == ("succeeded", "not starved"), turn
        used, counted = cpu_usage_us(container) - used, periods() - counted
        # However hard it spins, per 100 ms period it gets its 50 ms quota and no more.
        assert counted > 0 and used / counted <= 60_000, (used, counted)
    finally:
        sh(container, "pkill -f /tmp/spin.py")


def test_no_docker_socket_and_no_route_to_services_but_the_proxy_and_the_api(box, neighbour, stack_env,
                                                                             s3_endpoint, settings):
    _, container = box
    _, other = neighbour
    gateway = stack_env["gateway"]
    code, out = sh(container, "find / -xdev \\( -name 'docker.sock' -o -name 'containerd.sock' \\) 2>/dev/null; "
                              "test -e /var/run/docker.sock || echo no-socket")
    assert out == "no-socket\n", out
    with socket.socket() as listener, socket.socket() as everywhere:
        listener.bind(("127.0.0.1", 0))  # a host service on loopback, like Postgres, Redis and the S3 server
        listener.listen()
        host_port = listener.getsockname()[1]
        everywhere.bind(("0.0.0.0", 0))  # and one on every address: the host firewall closes it
        everywhere.listen()
        open_port = everywhere.getsockname()[1]
        s3_port = s3_endpoint["endpoint"].rsplit(":", 1)[1]
        proxy = f"http://{gateway}:{stack_env['env']['CCD_MODEL_PROXY_PORT']}"
        seen = probe(container, f"{gateway}:6379", f"{gateway}:5432", f"{gateway}:{s3_port}",
                     f"{gateway}:{host_port}", f"{gateway}:{open_port}", f"{gateway}:2375", f"{gateway}:2376", "1.1.1.1:443", "8.8.8.8:53", f"{proxy}/v1/models",
                     f"{stack_env['env']['CCD_SESSION_API_URL']}/healthz")
    for target in (f"{gateway}:6379", f"{gateway}:5432", f"{gateway}:{s3_port}", f"{gateway}:{host_port}",
                   f"{gateway}:{open_port}", f"{gateway}:2375", f"{gateway}:2376"):
        assert seen[target].startswith("closed ConnectionRefusedError"), (target, seen)
    for target in ("1.1.1.1:443", "8.8.8.8:53"):  # the internal network forwards nothing beyond the host
        assert seen[target].startswith("closed"), (target, seen)
    # The proxy answers, and without a session credential refuses, in the Messages API's error shape.
    status, body = seen[f"{proxy}/v1/models"]
    assert status == 401 and body["error"]["type"] == "authentication_error", seen
    assert seen[f"{stack_env['env']['CCD_SESSION_API_URL']}/healthz"] == 200, seen
    # Nor can one session reach another's container.
    sh(container, "true", stdin_file=("/tmp/serve.py", "import http.server\n"
                                      "http.server.HTTPServer(('0.0.0.0', 8765), http.server.BaseHTTPRequestHandler)"
                                      ".serve_forever()"))
    container.exec_run(["python3", "/tmp/serve.py"], user="agent", detach=True)
    try:
        wait_for(lambda: probe(container, "127.0.0.1:8765")["127.0.0.1:8765"] == "open", 30,
                 what="a listener in the session")
        container.reload()
        address = container.attrs["NetworkSettings"]["Networks"][settings.session_network]["IPAddress"]
        seen = probe(other, f"{address}:8765")
        assert seen[f"{address}:8765"].startswith("closed"), seen
    finally:
        sh(container, "pkill -f /tmp/serve.py")


def test_the_model_key_is_nowhere_in_the_container_while_turns_work(box, api, stack_env, settings, docker_client):
    sid, container = box
    key = settings.anthropic_api_key
    assert key and stack_env["env"]["ANTHROPIC_API_KEY"] == key
    sh(container, "true", stdin_file=("/tmp/scan.py", SCANNER.format(reversed_key=key[::-1])))
    turn = api.finished_turn(api.chat(sid, "RUN: python3 /tmp/scan.py")["id"])
    assert turn["status"] == "succeeded", turn
    found = json.loads(turn["result"].removeprefix("BASH-RESULT:").strip())
    assert found["leaks"] == [], found
    assert found["uid"] == 1000 and found["files"] > 50, found
    # The scan saw the live agent: Claude Code's environment holds the proxy and a per-session credential.
    proxy = f"http://{stack_env['gateway']}:{stack_env['env']['CCD_MODEL_PROXY_PORT']}"
    assert found["agents"] and {a["base_url"] for a in found["agents"]} == {proxy}, found
    credential = found["agents"][0]["key"]
    assert credential != key and key not in credential
    # The process list and the container's own configuration do not have it either.
    container.reload()
    assert not any(key in " ".join(p) for p in container.top(ps_args="-eo pid,args")["Processes"])
    assert not any(key in v for v in container.attrs["Config"]["Env"] or [])
    # That credential works at the proxy only, never on the cc-docker API.
    resp = requests.get(f"{stack_env['base']}/api/v1/sessions/{sid}", timeout=10,
                        headers={"Authorization": f"Bearer {credential}"})
    assert resp.status_code == 401 and resp.json()["error"]["code"] == "invalid_token", resp.text


def test_a_sessions_network_left_with_a_route_out_is_made_again_internal(docker_client, settings):
    from dataclasses import replace

    from workers.runtime import DockerRuntime

    name = f"{settings.key_prefix}-oldnet"
    docker_client.networks.create(name, driver="bridge", labels={"ccd.test": "1"})  # as older versions made it
    try:
        network = DockerRuntime(replace(settings, session_network=name), docker_client).ensure_network()
        network.reload()
        assert network.attrs["Internal"] is True
        assert network.attrs["Options"].get("com.docker.network.bridge.enable_icc") == "false"
    finally:
        docker_client.networks.get(name).remove()
