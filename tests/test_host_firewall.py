"""The host firewall fails closed: sessions start only while its rules guard their very bridge (INPUT, forwarded
traffic through DOCKER-USER, IPv6), installed by the worker or by compose's keeper. Real iptables, and only for
bridges and networks this run made."""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from dataclasses import replace

import docker
import pytest

from client.tokens import mint_token
from tests import stack
from tests.conftest import RUN_ID, wait_for
from tests.test_e2e import Api, container_of
from tests.test_hardening_e2e import probe, sh, started_session
from workers import host_firewall
from workers.runtime import DockerRuntime

pytestmark = pytest.mark.docker


@pytest.fixture(scope="module", autouse=True)
def iptables_installed():
    if shutil.which("iptables") is None or shutil.which("ip6tables") is None:
        pytest.fail("iptables is missing: apt-get install iptables (docker.io brings it)")


@pytest.fixture(scope="module")
def named_network(settings, docker_client):
    """A sessions' network made with a fixed bridge name (CCD_SESSION_BRIDGE), as compose's worker makes it."""
    named = replace(settings, session_network=f"ccdt{RUN_ID}-fw", session_bridge=f"ccdt{RUN_ID}fw",
                    session_api_url="http://{gateway}:8123")
    runtime = DockerRuntime(named, docker_client)
    network = runtime.ensure_network()
    yield named, runtime, network
    host_firewall.unguard(network)
    network.remove()


def chain_rules(bridge: str) -> list[str]:
    """The rules on the bridge in the chains the firewall writes to (not Docker's own), as iptables-save prints them."""
    found = []
    for tool, chains in (("iptables", ("INPUT", "DOCKER-USER")), ("ip6tables", ("INPUT", "FORWARD"))):
        out = subprocess.run([f"{tool}-save", "-t", "filter"], capture_output=True, text=True, check=True).stdout
        found += [f"{tool} {line}" for line in out.splitlines()
                  if f" {bridge} " in f"{line} " and line.split()[:2] in (["-A", c] for c in chains)]
    return found


def keeper_env(settings, bridge: str, status: str) -> dict[str, str]:
    return {**{k: v for k, v in os.environ.items() if not k.startswith("CCD_")}, "JWT_SECRET": settings.jwt_secret,
            "CCD_SESSION_BRIDGE": bridge, "CCD_MODEL_PROXY_PORT": "8111", "CCD_SESSION_API_URL": "http://{gateway}:8123",
            "CCD_HOST_FIREWALL_STATUS": status, "DOCKER_HOST": "unix:///nonexistent/docker.sock"}  # no Docker needed


def test_the_bridge_gets_the_configured_name_and_the_api_url_its_gateway(named_network, docker_client):
    named, runtime, network = named_network
    assert host_firewall.bridge_name(network) == named.session_bridge
    gateway = stack.network_gateway(docker_client, named.session_network)
    assert runtime.session_api_url() == f"http://{gateway}:8123"
    assert host_firewall.interface_address(named.session_bridge) == gateway  # the engine's bridge is that interface


def test_the_keeper_guards_input_forwarding_and_ipv6_of_the_named_bridge_and_reports_it(named_network, settings,
                                                                                        tmp_path, docker_client):
    named, _, network = named_network
    bridge, status_path = named.session_bridge, tmp_path / "status.json"
    keeper = stack.Process("host-firewall", [sys.executable, "-m", "workers", "firewall"],
                           keeper_env(settings, bridge, str(status_path)))
    try:
        status = wait_for(lambda: status_path.exists() and json.loads(status_path.read_text()), timeout=30,
                          what="the keeper's status file")
        assert keeper.alive(), keeper.tail()
    finally:
        keeper.stop()
    gateway = stack.network_gateway(docker_client, named.session_network)
    assert status["ok"] and status["bridge"] == bridge and status["address"] == gateway, status
    assert status["ports"] == [8111, 8123] and time.time() - status["at"] < 30
    assert host_firewall.missing(bridge, [8111, 8123]) == []
    rules = chain_rules(bridge)
    assert f"iptables -A INPUT -i {bridge} -j DROP" in rules
    assert not any("--dport 5432" in rule for rule in rules)
    assert f"iptables -A DOCKER-USER -i {bridge} -j DROP" in rules and f"iptables -A DOCKER-USER -o {bridge} -j DROP" in rules
    assert {f"ip6tables -A INPUT -i {bridge} -j DROP", f"ip6tables -A FORWARD -i {bridge} -j DROP",
            f"ip6tables -A FORWARD -o {bridge} -j DROP"} <= set(rules)
    host_firewall.unguard(network)
    assert chain_rules(bridge) == []
    assert host_firewall.missing(bridge, [8111, 8123]) == ["iptables INPUT", "iptables DOCKER-USER",
                                                          "ip6tables INPUT", "ip6tables FORWARD"]


def test_the_firewall_role_refuses_to_start_without_a_bridge_name(settings):
    env = {**{k: v for k, v in os.environ.items() if not k.startswith("CCD_")}, "JWT_SECRET": settings.jwt_secret}
    proc = subprocess.run([sys.executable, "-m", "workers", "firewall"], capture_output=True, text=True, env=env,
                          timeout=30)
    assert proc.returncode != 0 and "CCD_SESSION_BRIDGE" in proc.stderr


def test_a_network_whose_bridge_is_not_the_guarded_one_or_has_ipv6_is_refused(settings, docker_client):
    """A network made before CCD_SESSION_BRIDGE was set keeps Docker's br-<id>: a keeper guarding the name guards
    nothing, so the worker refuses to start sessions on it; so it does on a network with IPv6."""
    name = f"ccdt{RUN_ID}-fwold"
    old = docker_client.networks.create(name, driver="bridge", internal=True, labels={"ccd.test": "1"})
    v6 = docker_client.networks.create(f"{name}6", driver="bridge", internal=True, enable_ipv6=True,
                                       labels={"ccd.test": "1"}, ipam=docker.types.IPAMConfig(pool_configs=[
                                           docker.types.IPAMPool(subnet=f"fd00:ccd:{int(RUN_ID[:4], 16):x}::/64")]))
    try:
        gate = host_firewall.Gate(replace(settings, session_network=name, session_bridge=f"ccdt{RUN_ID}zz"))
        with pytest.raises(host_firewall.FirewallMissing, match=f"has bridge br-{old.id[:12]}, not CCD_SESSION_BRIDGE"):
            gate.require(docker_client.networks.get(name), "0.0.0.0")
        v6 = docker_client.networks.get(v6.id)
        with pytest.raises(host_firewall.FirewallMissing, match="has IPv6 enabled"):
            host_firewall.Gate(settings).require(v6, "0.0.0.0")
    finally:
        old.remove()
        v6.remove()


# -- forwarded traffic: a published port is DNAT'd, so reaching it from the sessions' bridge is forwarding -----------

CLIENT = """
import json, sys, urllib.request
out = {}
for port in sys.argv[2:]:
    try:
        out[port] = urllib.request.urlopen(f"http://{sys.argv[1]}:{port}/", timeout=4).status
    except Exception as exc:
        out[port] = type(exc).__name__
print(json.dumps(out))
"""


@pytest.mark.parametrize("internal", [True, False], ids=["internal-network", "network-with-a-route-out"])
def test_sessions_reach_only_the_allowed_published_port_of_another_container(settings, docker_client, internal):
    """As under compose: the web and proxy containers publish their ports, and sessions reach them at their gateway.
    The allowed port gets through (Docker's isolation alone drops it on an internal network); any other published
    port does not, even from a network that has a route out."""
    tag = "i" if internal else "r"
    bridge = f"ccdt{RUN_ID}p{tag}"
    sessions = docker_client.networks.create(f"ccdt{RUN_ID}-fwp{tag}", driver="bridge", internal=internal,
                                             labels={"ccd.test": "1"},
                                             options={"com.docker.network.bridge.enable_icc": "false",
                                                      "com.docker.network.bridge.name": bridge})
    apps = docker_client.networks.create(f"ccdt{RUN_ID}-fwa{tag}", driver="bridge", labels={"ccd.test": "1"})
    allowed, other = stack.free_port(), stack.free_port()
    servers = [docker_client.containers.run(settings.image, ["-m", "http.server", "8000"], entrypoint="python3",
                                            detach=True, network=apps.name, ports={"8000/tcp": port},
                                            labels={"ccd.prefix": settings.key_prefix}, user="agent")
               for port in (allowed, other)]
    try:
        sessions.reload()
        gateway = sessions.attrs["IPAM"]["Config"][0]["Gateway"]

        def reach() -> dict:
            out = docker_client.containers.run(settings.image, ["-c", CLIENT, gateway, str(allowed), str(other)],
                                               entrypoint="python3", network=sessions.name, user="agent",
                                               cap_drop=["ALL"], remove=True)
            return json.loads(out)

        wait_for(lambda: all(s.reload() or s.status == "running" for s in servers), 30, what="the published servers")
        time.sleep(1)
        if not internal:  # without the rules, a session network with a route out reaches any published port
            assert reach()[str(other)] == 200
        host_firewall.install(bridge, [allowed])
        assert reach() == {str(allowed): 200, str(other): "URLError"}
    finally:
        for server in servers:
            server.remove(force=True)
        host_firewall.unguard(sessions)
        sessions.remove()
        apps.remove()


# -- fail closed: sessions of a real stack start only while the rules are in place -----------------------------------

@pytest.fixture(scope="module")
def private_stack(settings, docker_client, tmp_path_factory):
    """A web and the environment of a worker on a sessions' network with a fixed bridge name; each test starts the
    worker it needs (CCD_HOST_FIREWALL=external with a status file, or true without iptables)."""
    stack.build_image(settings.image)
    prefix, network = f"{settings.key_prefix}fc", f"ccdt{RUN_ID}-fc"
    database_url = settings.database_url.rsplit("/", 1)[0] + f"/ccd_test_{RUN_ID}_fc"
    from core.migrate import prepare_database

    prepare_database(database_url)
    port = stack.free_port()
    env = stack.service_env(replace(settings, key_prefix=prefix, session_network=network, database_url=database_url),
                            "", "http://127.0.0.1:9", port, CCD_SESSION_BRIDGE=f"ccdt{RUN_ID}fc",
                            CCD_WARM_POOL_SIZE="0", LOG_LEVEL="INFO")
    web = stack.start_web(env, port, name="web-fc")
    status = tmp_path_factory.mktemp("fc") / "status.json"
    yield {"env": env, "api": Api(f"http://127.0.0.1:{port}", mint_token(settings.jwt_secret, "fc-owner", 900)),
           "status": status, "bridge": f"ccdt{RUN_ID}fc", "network": network}
    web.stop()
    stack.remove_prefixed(docker_client, prefix, network)
    stack.drop_database(database_url)


def failed_start(api: Api) -> str:
    sid = api.session()["id"]
    return api.session_status(sid, "failed", timeout=90)["error"]


def test_with_an_external_keeper_sessions_start_only_while_its_status_says_this_bridge_is_guarded(private_stack):
    env = {**private_stack["env"], "CCD_HOST_FIREWALL": "external",
           "CCD_HOST_FIREWALL_STATUS": str(private_stack["status"])}
    worker = stack.start_worker(env, name="worker-fc-external", concurrency=2)
    api, bridge = private_stack["api"], private_stack["bridge"]
    try:
        error = failed_start(api)  # no keeper has written anything
        assert "host firewall status" in error and "python -m workers firewall" in error, error
        # A keeper that guards another bridge (say, a name set after the network was made) is not enough.
        host_firewall.keep_guarding(keeper_settings(env, f"ccdt{RUN_ID}xx"), rounds=1)
        error = failed_start(api)
        assert f"it guards 'ccdt{RUN_ID}xx', the sessions' bridge is '{bridge}'" in error, error
        # The keeper for the sessions' bridge: now they start.
        host_firewall.keep_guarding(keeper_settings(env, bridge), rounds=1)
        sid = api.session()["id"]
        api.session_status(sid, "ready", timeout=90)
        # A keeper that stopped (its status going stale) stops new sessions again.
        stale = json.loads(private_stack["status"].read_text())
        private_stack["status"].write_text(json.dumps({**stale, "at": stale["at"] - 3600}))
        time.sleep(host_firewall.RECHECK_SECONDS)
        assert "s old" in failed_start(api)
    finally:
        worker.stop()
        host_firewall.unguard_bridge(bridge)
        host_firewall.unguard_bridge(f"ccdt{RUN_ID}xx")


def keeper_settings(env: dict, bridge: str):
    """The keeper's settings, from the worker's environment: the same ports and status file, this bridge."""
    return settings_of({**env, "CCD_SESSION_BRIDGE": bridge})


def test_a_worker_that_cannot_install_the_rules_starts_no_session_and_says_what_to_do(private_stack):
    # No iptables on its PATH: as on a host without it, or a worker without the right to use it.
    path = ":".join(p for p in os.environ["PATH"].split(":") if not os.path.exists(os.path.join(p, "iptables")))
    env = {**private_stack["env"], "CCD_HOST_FIREWALL": "true", "PATH": path}
    worker = stack.start_worker(env, name="worker-fc-noiptables", concurrency=2)
    try:
        error = failed_start(private_stack["api"])
        assert "iptables is not installed" in error and "CCD_HOST_FIREWALL=external" in error, error
        assert "no session will start on this host" in worker.tail(200)
    finally:
        worker.stop()


def test_the_worker_puts_back_rules_removed_under_it_before_the_next_session_starts(private_stack, docker_client):
    env = {**private_stack["env"], "CCD_HOST_FIREWALL": "true"}
    worker = stack.start_worker(env, name="worker-fc-own", concurrency=2)
    api, bridge = private_stack["api"], private_stack["bridge"]
    try:
        sid = api.session()["id"]
        api.session_status(sid, "ready", timeout=90)
        ports = host_firewall.allowed_ports(settings_of(env))
        assert host_firewall.missing(bridge, ports) == []
        # A firewall reload drops the sessions' rules: the next start puts them back first.
        subprocess.run(["iptables", "-D", "INPUT", "-i", bridge, "-j", "DROP"], check=True)
        subprocess.run(["ip6tables", "-D", "FORWARD", "-i", bridge, "-j", "DROP"], check=True)
        assert host_firewall.missing(bridge, ports) == ["iptables INPUT", "ip6tables FORWARD"]
        time.sleep(host_firewall.RECHECK_SECONDS)
        sid = api.session()["id"]
        api.session_status(sid, "ready", timeout=90)
        assert host_firewall.missing(bridge, ports) == []
        assert "were missing (iptables INPUT, ip6tables FORWARD): installed them again" in worker.tail(200)
    finally:
        worker.stop()


def test_a_running_worker_puts_back_rules_dropped_under_it_with_no_session_starting(private_stack):
    """A firewall reload (or an engine restart) drops the rules while sessions and pool containers run: the worker's
    periodic check puts them back within CCD_FIREWALL_CHECK_SECONDS, with no session start to trigger it."""
    period = 2
    env = {**private_stack["env"], "CCD_HOST_FIREWALL": "true", "CCD_FIREWALL_CHECK_SECONDS": str(period)}
    worker = stack.start_worker(env, name="worker-fc-watch", concurrency=1)
    bridge, ports = private_stack["bridge"], host_firewall.allowed_ports(settings_of(env))
    try:
        wait_for(lambda: host_firewall.missing(bridge, ports) == [], timeout=30, what="the worker's rules")
        time.sleep(period)  # past the worker's first check, so the deletions below are what the next one finds
        subprocess.run(["iptables", "-D", "INPUT", "-i", bridge, "-j", "DROP"], check=True)
        subprocess.run(["iptables", "-D", "DOCKER-USER", "-o", bridge, "-j", "DROP"], check=True)
        subprocess.run(["ip6tables", "-D", "INPUT", "-i", bridge, "-j", "DROP"], check=True)
        dropped = time.monotonic()
        assert host_firewall.missing(bridge, ports)
        # One period, and a pass's own time (iptables-save under this machine's load: seconds, at worst).
        wait_for(lambda: host_firewall.missing(bridge, ports) == [], timeout=period + 15, what="the rules back")
        assert time.monotonic() - dropped < period + 15
        log = worker.tail(300)
        assert f"host firewall rules for {bridge} were missing" in log and "installed them again" in log, log
        assert "ready in container" not in log  # no session start put them back
    finally:
        worker.stop()


def test_a_running_worker_that_cannot_check_the_rules_says_so_periodically(private_stack):
    env = {**private_stack["env"], "CCD_HOST_FIREWALL": "external", "CCD_FIREWALL_CHECK_SECONDS": "1",
           "CCD_HOST_FIREWALL_STATUS": str(private_stack["status"]) + ".none"}
    worker = stack.start_worker(env, name="worker-fc-watch-external", concurrency=1)
    try:
        wait_for(lambda: worker.tail(300).count("running sessions on this host are not guarded") >= 2, timeout=20,
                 what="the periodic error")
    finally:
        worker.stop()


def settings_of(env: dict):
    from core.settings import Settings

    return Settings.from_env(env)


# -- from inside a real session of the shared stack ---------------------------------------------------------------

V6_PROBE = """
import json, socket, sys
try:
    with open("/proc/net/if_inet6") as f:
        addresses = [line.split()[-1] for line in f if line.split()[-1] != "lo"]
except FileNotFoundError:
    addresses = []
try:
    socket.create_connection((sys.argv[1] + "%eth0", int(sys.argv[2])), timeout=3).close()
    connect = "open"
except OSError as exc:
    connect = f"{type(exc).__name__} {exc.errno}"
print(json.dumps({"addresses": addresses, "connect": connect}))
"""


def test_a_session_has_no_ipv6_and_its_bridge_drops_ipv6_both_ways(stack_env, settings, token, docker_client):
    api = Api(stack_env["base"], token("firewall-owner"))
    sid = started_session(api)
    container = container_of(docker_client, settings, sid)
    network = docker_client.networks.get(settings.session_network)
    bridge = host_firewall.bridge_name(network)
    # The host's side of the bridge has a link-local IPv6 address, where services on [::] would answer.
    link_local = subprocess.run(["ip", "-6", "-o", "addr", "show", "dev", bridge, "scope", "link"],
                                capture_output=True, text=True).stdout.split()
    target = link_local[3].split("/")[0] if len(link_local) > 3 else "fe80::1"
    code, out = sh(container, f"python3 /tmp/v6.py {target} {stack_env['env']['CCD_PORT']}",
                   stdin_file=("/tmp/v6.py", V6_PROBE))
    seen = json.loads(out)
    assert seen["addresses"] == [] and seen["connect"] != "open", seen  # no IPv6 on its side, no way to the host
    ports = host_firewall.allowed_ports(settings_of(stack_env["env"]))
    assert host_firewall.missing(bridge, ports) == []
    rules = chain_rules(bridge)
    assert {f"ip6tables -A INPUT -i {bridge} -j DROP", f"ip6tables -A FORWARD -o {bridge} -j DROP"} <= set(rules)
    # And IPv4 to a host port that is not allowed stays closed, while the API's is open.
    seen = probe(container, f"{stack_env['gateway']}:{stack_env['env']['CCD_PORT']}",
                 f"{stack_env['gateway']}:{stack.free_port()}")
    assert list(seen.values())[0] == "open" and list(seen.values())[1].startswith("closed"), seen
