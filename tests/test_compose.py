"""compose.yaml as docker-compose reads it: every service, healthchecks and start order, secrets where they belong."""
import os
import re
import shutil
import subprocess
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parent.parent
ONE_SHOT = {"migrate", "session-image"}


def compose_config(env: dict) -> subprocess.CompletedProcess:
    exe = shutil.which("docker-compose")
    if exe is None:
        pytest.fail("docker-compose is not installed: apt-get install docker-compose (.ci/run does)")
    base = {k: v for k, v in os.environ.items() if k not in ("JWT_SECRET", "COMPOSE_PROFILES")}
    return subprocess.run([exe, "-f", str(ROOT / "compose.yaml"), "--profile", "flower", "config"],
                          capture_output=True, text=True, env={**base, **env}, cwd=ROOT)


@pytest.fixture(scope="module")
def config() -> dict:
    proc = compose_config({"JWT_SECRET": "compose-check", "ANTHROPIC_API_KEY": "sk-compose-check"})
    assert proc.returncode == 0, proc.stderr
    return yaml.safe_load(proc.stdout)


def test_compose_has_every_service_of_the_deployment(config):
    assert set(config["services"]) == {"migrate", "web", "worker", "webhooks", "beat", "model-proxy", "host-firewall",
                                       "session-image", "postgres", "redis", "minio", "flower"}


def test_every_long_running_service_has_a_healthcheck_and_one_shots_do_not_restart(config):
    for name, service in config["services"].items():
        if name in ONE_SHOT:
            assert service.get("restart") == "no", name
        else:
            assert service.get("healthcheck", {}).get("test"), f"{name} has no healthcheck"
            assert service.get("restart") == "unless-stopped", name


def test_services_start_in_order_on_health_and_completed_one_shots(config):
    services = config["services"]
    for name, service in services.items():
        for dep, cond in (service.get("depends_on") or {}).items():
            expected = "service_completed_successfully" if dep in ONE_SHOT else "service_healthy"
            assert cond == {"condition": expected}, (name, dep, cond)
            assert dep in ONE_SHOT or "healthcheck" in services[dep], (name, dep)
    for name in ("web", "worker", "webhooks", "beat", "model-proxy"):
        assert "migrate" in services[name]["depends_on"], name
    assert "session-image" in services["worker"]["depends_on"]


def test_only_the_worker_has_the_docker_socket_and_only_the_proxy_the_model_key(config):
    for name, service in config["services"].items():
        mounts = " ".join(str(v) for v in service.get("volumes") or [])
        assert ("docker.sock" in mounts) == (name == "worker"), name
        env = service.get("environment") or {}
        assert ("sk-compose-check" in str(env)) == (name == "model-proxy"), name
    firewall = config["services"]["host-firewall"]
    assert firewall["network_mode"] == "host" and "NET_ADMIN" in firewall["cap_add"]
    assert config["services"]["worker"]["environment"]["CCD_HOST_FIREWALL"] == "false"


def test_webhooks_go_out_from_their_own_service_without_the_docker_socket(config):
    webhooks = config["services"]["webhooks"]
    assert webhooks["command"] == ["python", "-m", "workers", "webhooks"]
    assert not webhooks.get("volumes") and "network_mode" not in webhooks
    assert "CCD_WEBHOOK_SECRET" in webhooks["environment"]
    assert "CCD_WEBHOOK_SECRET" not in config["services"]["worker"]["environment"]


def test_data_lives_in_named_volumes_and_minio_publishes_api_and_console(config):
    assert set(config["volumes"]) == {"pgdata", "redisdata", "miniodata"}
    for service, volume in (("postgres", "pgdata"), ("redis", "redisdata"), ("minio", "miniodata")):
        sources = [v["source"] if isinstance(v, dict) else v.split(":")[0]
                   for v in config["services"][service]["volumes"]]
        assert volume in sources, service
    published = {(str(p["published"]), p["target"]) if isinstance(p, dict) else tuple(p.split(":"))
                 for p in config["services"]["minio"]["ports"]}
    assert {("9000", 9000), ("9001", 9001)} <= {(a, int(b)) for a, b in published}
    assert "--appendonly" in config["services"]["redis"]["command"]


def test_web_runs_gunicorn_with_a_worker_class_for_many_websockets(config):
    command = config["services"]["web"]["command"]
    assert command[:3] == ["gunicorn", "-c", "python:web.gunicorn_conf"]
    env = {k: v for k, v in os.environ.items() if not k.startswith("WEB_")}
    probe = ("import gevent, web.gunicorn_conf as c; "
             "print(c.worker_class, c.worker_connections)")
    out = subprocess.run([str(ROOT / ".venv" / "bin" / "python"), "-c", probe], capture_output=True, text=True,
                         cwd=ROOT, env=env)
    assert out.returncode == 0, out.stderr
    worker_class, connections = out.stdout.split()
    assert worker_class == "gevent" and int(connections) >= 1000
    assert config["services"]["web"]["environment"]["WEB_WORKER_CLASS"] == "gevent"


def test_every_variable_compose_reads_is_in_env_example():
    names = set(re.findall(r"\$\{([A-Z0-9_]+)", (ROOT / "compose.yaml").read_text()))
    example = {line.split("=", 1)[0] for line in (ROOT / ".env.example").read_text().splitlines()
               if "=" in line and not line.startswith("#")}
    assert names and names - example == set()


def test_compose_refuses_to_run_without_a_jwt_secret():
    proc = compose_config({})
    assert proc.returncode != 0 and "JWT_SECRET" in proc.stderr


def test_the_model_proxy_is_published_nowhere(config):
    proxy = config["services"]["model-proxy"]
    assert not proxy.get("ports") and proxy.get("network_mode") != "host", proxy
    # It listens on every address of its own namespace only because compose says so explicitly.
    assert proxy["environment"]["CCD_MODEL_PROXY_ALLOW_ANY_ADDRESS"] == "true"
