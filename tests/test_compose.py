"""compose.yaml is accepted by docker-compose, with every service the deployment needs."""
import os
import shutil
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


def compose_config(env: dict) -> subprocess.CompletedProcess:
    exe = shutil.which("docker-compose")
    if exe is None:
        pytest.fail("docker-compose is not installed: apt-get install docker-compose (.ci/run does)")
    return subprocess.run([exe, "-f", str(ROOT / "compose.yaml"), "config"], capture_output=True, text=True,
                          env={**os.environ, **env}, cwd=ROOT)


def test_compose_file_is_valid_and_has_every_service():
    proc = compose_config({"JWT_SECRET": "compose-check"})
    assert proc.returncode == 0, proc.stderr
    for service in ("web:", "worker:", "beat:", "redis:", "postgres:", "minio:", "session-image:"):
        assert f"  {service}" in proc.stdout
    assert "/var/run/docker.sock" in proc.stdout.split("  worker:")[1].split("\n  [a-z]")[0]


def test_compose_refuses_to_run_without_a_jwt_secret():
    env = {k: v for k, v in os.environ.items() if k != "JWT_SECRET"}
    proc = subprocess.run([shutil.which("docker-compose") or "docker-compose", "-f", str(ROOT / "compose.yaml"),
                           "config"], capture_output=True, text=True, env=env, cwd=ROOT)
    assert proc.returncode != 0 and "JWT_SECRET" in proc.stderr
