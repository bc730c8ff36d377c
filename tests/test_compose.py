"""compose.yaml as docker-compose reads it: every service, healthchecks and start order, secrets where they belong."""
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parent.parent
ONE_SHOT = {"migrate", "session-image"}
# Every secret compose.yaml reads: each must be required (`${NAME:?...}`), never defaulted.
SECRETS = ("JWT_SECRET", "CCD_WEBHOOK_SECRET", "POSTGRES_PASSWORD", "MINIO_ACCESS_KEY", "MINIO_SECRET_KEY",
           "FLOWER_BASIC_AUTH")
SECRET_VALUES = {name: f"compose-check-{name.lower()}" for name in SECRETS}
# An empty .env: a developer's own .env must not fill in what a test leaves out.
EMPTY_ENV = ROOT / "tests" / "empty.env"


def compose_config(env: dict) -> subprocess.CompletedProcess:
    exe = shutil.which("docker-compose")
    if exe is None:
        pytest.fail("docker-compose is not installed: apt-get install docker-compose (.ci/run does)")
    base = {k: v for k, v in os.environ.items() if k not in (*SECRETS, "COMPOSE_PROFILES")}
    return subprocess.run([exe, "-f", str(ROOT / "compose.yaml"), "--env-file", str(EMPTY_ENV),
                           "--profile", "flower", "config"],
                          capture_output=True, text=True, env={**base, **env}, cwd=ROOT)


@pytest.fixture(scope="module")
def config() -> dict:
    proc = compose_config({**SECRET_VALUES, "ANTHROPIC_API_KEY": "sk-compose-check"})
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
    worker = config["services"]["worker"]
    assert worker["environment"]["CCD_HOST_FIREWALL"] == "external"
    # The worker starts sessions on the keeper's status file, which they share; the keeper must be healthy first.
    status = worker["environment"]["CCD_HOST_FIREWALL_STATUS"]
    assert firewall["environment"]["CCD_HOST_FIREWALL_STATUS"] == status
    assert worker["depends_on"]["host-firewall"] == {"condition": "service_healthy"}
    assert status in str(firewall["healthcheck"]["test"])
    mounts = {name: {volume_mount(v) for v in service.get("volumes") or []}
              for name, service in (("worker", worker), ("firewall", firewall))}
    assert ("firewall-status", os.path.dirname(status), True) in mounts["worker"]
    assert ("firewall-status", os.path.dirname(status), False) in mounts["firewall"]


def volume_mount(volume) -> tuple[str, str, bool]:
    """(source, target, read only) of a volume as `config` prints it (a string or a mapping)."""
    if isinstance(volume, dict):
        return volume["source"], volume["target"], bool(volume.get("read_only"))
    source, target, *mode = volume.split(":")
    return source, target, mode == ["ro"]


def test_data_lives_in_named_volumes_on_the_internal_network(config):
    assert set(config["volumes"]) == {"pgdata", "redisdata", "miniodata", "firewall-status"}
    assert config["networks"]["backend"].get("internal") is True
    for service, volume in (("postgres", "pgdata"), ("redis", "redisdata"), ("minio", "miniodata")):
        sources = [v["source"] if isinstance(v, dict) else v.split(":")[0]
                   for v in config["services"][service]["volumes"]]
        assert volume in sources, service
        assert set(config["services"][service]["networks"]) == {"backend"}, service
    assert "--appendonly" in config["services"]["redis"]["command"]


def published_ports(service: dict) -> list[tuple[str | None, int]]:
    return [(p.get("host_ip"), int(p["target"])) if isinstance(p, dict) else (None, int(str(p).split(":")[-1]))
            for p in service.get("ports") or []]


def test_only_the_web_and_flower_in_its_profile_are_published(config):
    published = {name for name, service in config["services"].items() if service.get("ports")}
    # model-proxy: published on the sessions' gateway address only (below).
    assert published - {"model-proxy"} == {"web", "flower"}, published
    assert [port for _, port in published_ports(config["services"]["web"])] == [8000]
    assert config["services"]["flower"]["profiles"] == ["flower"]
    assert config["services"]["flower"]["environment"]["FLOWER_BASIC_AUTH"] == SECRET_VALUES["FLOWER_BASIC_AUTH"]


def test_no_secret_has_a_default_and_compose_names_each_missing_one():
    text = (ROOT / "compose.yaml").read_text()
    for name in SECRETS:
        uses = re.findall(r"\$\{" + name + r"(:?[-?])?", text)
        assert uses and all(op == ":?" for op in uses), (name, uses)
        proc = compose_config({k: v for k, v in SECRET_VALUES.items() if k != name})
        assert proc.returncode != 0 and f"set {name}" in proc.stderr, (name, proc.stderr)


def test_every_image_is_pinned_and_ours_carry_the_package_version(config):
    version = re.search(r"^version = (\S+)$", (ROOT / "setup.cfg").read_text(), re.MULTILINE).group(1)
    for name, service in config["services"].items():
        image = service.get("image", "")
        repository, _, tag = image.rpartition(":")
        assert repository and "/" not in tag and tag not in ("", "latest"), (name, image)
        if repository in ("cc-docker-app", "ccd-session"):
            assert tag == version, (name, image)
    assert config["services"]["worker"]["environment"]["CCD_IMAGE"] == config["services"]["session-image"]["image"]


def test_redis_has_a_memory_ceiling_and_never_evicts(config):
    command = config["services"]["redis"]["command"]
    assert command[command.index("--maxmemory-policy") + 1] == "noeviction"
    assert command[command.index("--maxmemory") + 1] == "1gb"


def test_agents_reach_the_api_by_default_and_the_firewall_lets_that_port_through(config):
    from core.settings import Settings
    from workers.host_firewall import allowed_ports

    services = config["services"]
    for name in ("worker", "host-firewall"):
        env = services[name]["environment"]
        settings = Settings.from_env({**{k: str(v) for k, v in env.items()}, "JWT_SECRET": "k" * 32})
        assert settings.session_api_url == "http://{gateway}:8000", name
        assert 8000 in allowed_ports(settings), name
    web_published = [p for p in services["web"]["ports"]]
    assert int(web_published[0]["published"]) == 8000


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
    proc = compose_config({k: v for k, v in SECRET_VALUES.items() if k != "JWT_SECRET"})
    assert proc.returncode != 0 and "JWT_SECRET" in proc.stderr


def test_the_model_proxy_is_published_on_the_sessions_gateway_only(config):
    proxy = config["services"]["model-proxy"]
    sessions = config["networks"]["sessions"]
    gateway = sessions["ipam"]["config"][0]["gateway"]
    ports = proxy["ports"]
    bound = [(p["host_ip"], int(p["published"]), int(p["target"])) if isinstance(p, dict)
             else tuple(int(v) if v.isdigit() else v for v in p.split("/")[0].split(":")) for p in ports]
    assert bound == [(gateway, 8011, 8011)], ports
    assert proxy.get("network_mode") != "host" and "sessions" in proxy["networks"], proxy
    # The network is the one the worker uses, made as the worker would make it: no route out, no traffic between
    # its containers, the bridge name the host firewall guards, no IPv6.
    env = config["services"]["worker"]["environment"]
    assert sessions["name"] == env["CCD_SESSION_NETWORK"] and sessions["internal"] is True
    assert sessions["driver_opts"] == {"com.docker.network.bridge.enable_icc": "false",
                                       "com.docker.network.bridge.name": env["CCD_SESSION_BRIDGE"]}
    assert not sessions.get("enable_ipv6")
    # It listens on every address of its own namespace only because compose says so explicitly.
    assert proxy["environment"]["CCD_MODEL_PROXY_ALLOW_ANY_ADDRESS"] == "true"


def test_make_up_generates_every_required_secret_and_keeps_set_ones(tmp_path):
    env = tmp_path / ".env"
    env.write_text("JWT_SECRET=mine-" + "k" * 32 + "\nPOSTGRES_PASSWORD=\n")
    proc = subprocess.run([sys.executable, str(ROOT / "scripts" / "env_secrets.py"), str(env)], capture_output=True,
                          text=True)
    assert proc.returncode == 0, proc.stderr
    values = dict(line.split("=", 1) for line in env.read_text().splitlines() if "=" in line)
    assert values["JWT_SECRET"] == "mine-" + "k" * 32
    assert all(len(values[name]) >= 16 for name in SECRETS), values
    assert len(values["CCD_WEBHOOK_SECRET"].encode()) >= 32 and values["FLOWER_BASIC_AUTH"].startswith("ccd:")
    compose = compose_config({k: v for k, v in values.items() if k in SECRETS})
    assert compose.returncode == 0, compose.stderr
    again = env.read_text()
    subprocess.run([sys.executable, str(ROOT / "scripts" / "env_secrets.py"), str(env)], check=True)
    assert env.read_text() == again  # a second make up changes nothing
    fresh = tmp_path / "new.env"  # no .env yet: .env.example with every secret filled in
    subprocess.run([sys.executable, str(ROOT / "scripts" / "env_secrets.py"), str(fresh)], check=True)
    made = dict(line.split("=", 1) for line in fresh.read_text().splitlines() if "=" in line and line[0] != "#")
    assert all(made[name] for name in SECRETS) and made["CCD_PORT"] == "8000"
