"""Compose's host-firewall service: `python -m workers firewall` guards a bridge it knows only by name."""
from __future__ import annotations

import os
import shutil
import subprocess
import sys
from dataclasses import replace

import pytest

from tests import stack
from tests.conftest import RUN_ID, wait_for
from workers import host_firewall
from workers.runtime import DockerRuntime


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


def iptables_has(rule: list[str]) -> bool:
    return subprocess.run(["iptables", "-C", "INPUT", *rule], capture_output=True).returncode == 0


def test_the_bridge_gets_the_configured_name_and_the_api_url_its_gateway(named_network, docker_client):
    named, runtime, network = named_network
    assert host_firewall.bridge_name(network) == named.session_bridge
    gateway = stack.network_gateway(docker_client, named.session_network)
    assert runtime.session_api_url() == f"http://{gateway}:8123"


def test_the_firewall_role_guards_the_named_bridge_without_docker(named_network, settings):
    if shutil.which("iptables") is None:
        pytest.fail("iptables is missing: apt-get install iptables (docker.io brings it)")
    named, _, network = named_network
    bridge = named.session_bridge
    env = {**{k: v for k, v in os.environ.items() if not k.startswith("CCD_")}, "JWT_SECRET": settings.jwt_secret,
           "CCD_SESSION_BRIDGE": bridge, "CCD_MODEL_PROXY_PORT": "8111", "CCD_SESSION_API_URL": "http://{gateway}:8123",
           "DOCKER_HOST": "unix:///nonexistent/docker.sock"}  # it must not need Docker
    keeper = stack.Process("host-firewall", [sys.executable, "-m", "workers", "firewall"], env)
    try:
        accepts = [["-i", bridge, "-p", "tcp", "--dport", port, "-j", "ACCEPT"] for port in ("8111", "8123")]
        # The refusals go in first, then the accepts above them: wait for the whole set.
        wait_for(lambda: all(map(iptables_has, [["-i", bridge, "-j", "DROP"], *accepts])), timeout=30,
                 what="the firewall rules (DROP, then ACCEPT for the proxy's and the API's ports)")
        assert not iptables_has(["-i", bridge, "-p", "tcp", "--dport", "5432", "-j", "ACCEPT"])
        assert keeper.alive(), keeper.tail()
    finally:
        keeper.stop()
    host_firewall.unguard(network)
    assert not iptables_has(["-i", bridge, "-j", "DROP"])


def test_the_firewall_role_refuses_to_start_without_a_bridge_name(settings):
    env = {**{k: v for k, v in os.environ.items() if not k.startswith("CCD_")}, "JWT_SECRET": settings.jwt_secret}
    proc = subprocess.run([sys.executable, "-m", "workers", "firewall"], capture_output=True, text=True, env=env,
                          timeout=30)
    assert proc.returncode != 0 and "CCD_SESSION_BRIDGE" in proc.stderr
