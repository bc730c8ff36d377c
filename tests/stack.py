"""Test plumbing for the real parts: a private database, dockerd, the session image, web and worker processes."""
from __future__ import annotations

import os
import secrets
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import docker
import requests
from sqlalchemy import create_engine
from sqlalchemy.engine import make_url

from core.migrate import prepare_database
from workers import host_firewall

ROOT = Path(__file__).resolve().parent.parent
LOG_DIR = ROOT / ".run" / "test-logs"


def drop_database(url: str) -> None:
    parsed = make_url(url)
    admin = create_engine(parsed.set(database="postgres"), isolation_level="AUTOCOMMIT")
    with admin.connect() as conn:
        conn.exec_driver_sql(f'DROP DATABASE IF EXISTS "{parsed.database}" WITH (FORCE)')
    admin.dispose()


def ensure_dockerd(timeout: float = 60.0) -> docker.DockerClient:
    """The Docker engine, started from the installed dockerd when none is running."""
    try:
        client = docker.from_env(timeout=120)
        client.ping()
        return client
    except docker.errors.DockerException:
        pass
    dockerd = shutil.which("dockerd")
    if not dockerd:
        raise RuntimeError("no Docker engine answers and dockerd is not installed: "
                           "apt-get install docker.io (or run .ci/run)")
    LOG_DIR.mkdir(parents=True, exist_ok=True)
    with open(LOG_DIR / "dockerd.log", "ab") as log:
        subprocess.Popen([dockerd], stdout=log, stderr=log, start_new_session=True)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            client = docker.from_env(timeout=120)
            client.ping()
            return client
        except docker.errors.DockerException:
            time.sleep(0.5)
    raise RuntimeError(f"dockerd did not answer within {timeout:.0f}s; see {LOG_DIR / 'dockerd.log'}")


def restart_dockerd(timeout: float = 60.0) -> docker.DockerClient:
    """Stops the running dockerd (which stops every container) and starts it again."""
    pids = subprocess.run(["pgrep", "-x", "dockerd"], capture_output=True, text=True).stdout.split()
    for pid in pids:
        os.kill(int(pid), signal.SIGTERM)
    deadline = time.monotonic() + timeout
    while any(Path(f"/proc/{pid}").exists() for pid in pids):
        if time.monotonic() > deadline:
            raise RuntimeError("dockerd did not stop")
        time.sleep(0.2)
    return ensure_dockerd(timeout)


def build_image(image: str) -> None:
    """Builds (or reuses) the session image, once per test run."""
    env = dict(os.environ, CCD_IMAGE=image)
    proc = subprocess.run(["bash", str(ROOT / "container" / "build.sh")], env=env,
                          capture_output=True, text=True)
    if proc.returncode != 0:
        raise RuntimeError(f"building {image} failed:\n{proc.stdout}\n{proc.stderr}")


def network_gateway(client: docker.DockerClient, name: str) -> str:
    """Creates the sessions' network (internal, as the worker makes it) and returns the host's address on it."""
    try:
        network = client.networks.get(name)
    except docker.errors.NotFound:
        network = client.networks.create(name, driver="bridge", internal=True, labels={"ccd.test": "1"},
                                         options={"com.docker.network.bridge.enable_icc": "false"})
    network.reload()
    return network.attrs["IPAM"]["Config"][0]["Gateway"]


def service_env(settings, gateway: str, model_url: str, port: int, **extra: str) -> dict[str, str]:
    """The environment of a private stack's processes (web, worker, beat, proxy): this run's database, key prefix,
    network and image, the scripted model server, ports of their own; `extra` adds or overrides variables."""
    env = {
        **{k: v for k, v in os.environ.items() if not k.startswith(("ANTHROPIC_", "CCD_"))},
        "JWT_SECRET": settings.jwt_secret, "DATABASE_URL": settings.database_url,
        "REDIS_URL": settings.redis_url, "CCD_KEY_PREFIX": settings.key_prefix,
        "CCD_SESSION_NETWORK": settings.session_network, "CCD_IMAGE": settings.image,
        "ANTHROPIC_API_KEY": settings.anthropic_api_key, "ANTHROPIC_BASE_URL": model_url,
        "CONTAINER_TIMEOUT_DEFAULT": "900", "LOG_LEVEL": "INFO", "CCD_PORT": str(port),
        "CCD_MODEL_PROXY_PORT": str(free_port()),
        "CCD_WORKER_METRICS_PORT": str(free_port()),  # the stack worker's; other workers from this env log it taken
    }
    env.update(extra)
    return env


def private_stack_env(base_env: dict[str, str], settings, tag: str, **extra: str) -> dict[str, str]:
    """The environment of a private stack beside the run's (same image, network and model server): its own database
    (made here), key prefix and queues, API and model proxy ports, no spawn tools; `extra` adds or overrides."""
    suffix = secrets.token_hex(2)
    base, name = settings.database_url.rsplit("/", 1)
    database_url = f"{base}/{name}_{tag}{suffix}"
    prepare_database(database_url)
    env = {**base_env, "DATABASE_URL": database_url, "CCD_KEY_PREFIX": f"{settings.key_prefix}{tag}{suffix}",
           "CCD_PORT": str(free_port()), "CCD_SESSION_API_URL": "", "CCD_MODEL_PROXY_PORT": str(free_port())}
    env.update(extra)
    return env


def remove_private_stack(client: docker.DockerClient, prefix: str, database_url: str) -> None:
    """What a test's private stack leaves: its containers and volumes (by prefix label), and its database."""
    for container in client.containers.list(all=True, filters={"label": f"ccd.prefix={prefix}"}):
        container.remove(force=True)
    for volume in client.volumes.list(filters={"label": f"ccd.prefix={prefix}"}):
        volume.remove(force=True)
    drop_database(database_url)


def remove_prefixed(client: docker.DockerClient, prefix: str, network: str) -> None:
    """Removes every container and volume this run made, and its network."""
    for container in client.containers.list(all=True, filters={"label": f"ccd.prefix={prefix}"}):
        container.remove(force=True)
    for volume in client.volumes.list(filters={"label": f"ccd.prefix={prefix}"}):
        volume.remove(force=True)
    try:
        found = client.networks.get(network)
    except docker.errors.NotFound:
        return
    host_firewall.unguard(found)
    found.remove()


class Process:
    """A service process of ours, with its output in a log file for when a test fails."""

    def __init__(self, name: str, argv: list[str], env: dict[str, str]) -> None:
        LOG_DIR.mkdir(parents=True, exist_ok=True)
        self.name = name
        self.log_path = LOG_DIR / f"{name}.log"
        self._log = open(self.log_path, "wb")
        self.proc = subprocess.Popen(argv, cwd=ROOT, env=env, stdout=self._log,
                                     stderr=subprocess.STDOUT, start_new_session=True)

    def tail(self, lines: int = 40) -> str:
        return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])

    def alive(self) -> bool:
        return self.proc.poll() is None

    def kill(self) -> None:
        """SIGKILL to the process and everything it started (a crash, not a shutdown)."""
        if self.alive():
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait()

    def stop(self) -> None:
        if self.alive():
            self.proc.terminate()
            try:
                self.proc.wait(15)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self._log.close()


def start_web(env: dict[str, str], port: int, also_on: str | None = None, name: str = "web",
              processes: int = 1) -> Process:
    """The web tier on loopback, and on `also_on` too (where session containers reach the host)."""
    binds = ["-b", f"127.0.0.1:{port}"] + (["-b", f"{also_on}:{port}"] if also_on else [])
    web = Process(name, [sys.executable, "-m", "gunicorn", "-c", "python:web.gunicorn_conf", *binds,
                          "-w", str(processes), "--graceful-timeout", "3", "web.wsgi:app"], env)
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        if not web.alive():
            raise RuntimeError(f"web exited:\n{web.tail()}")
        try:
            if requests.get(f"http://127.0.0.1:{port}/healthz", timeout=1).ok:
                return web
        except requests.RequestException:
            time.sleep(0.2)
    raise RuntimeError(f"web did not answer /healthz:\n{web.tail()}")


def wait_for_log(process: Process, marker: str, what: str, timeout: float = 30) -> Process:
    """The process, once its log shows `marker`; stopped, and the test run failed, if it never does."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if not process.alive():
            raise RuntimeError(f"{process.name} exited:\n{process.tail()}")
        if marker in process.log_path.read_text(errors="replace"):
            return process
        time.sleep(0.2)
    process.stop()
    raise RuntimeError(f"{process.name} did not {what}:\n{process.tail()}")


def start_worker(env: dict[str, str], name: str = "worker", concurrency: int = 4) -> Process:
    worker = Process(name, [sys.executable, "-m", "workers", "worker", "--concurrency", str(concurrency)], env)
    return wait_for_log(worker, " ready.", "become ready")


def start_webhooks(env: dict[str, str], docker_host: str, name: str = "webhooks") -> Process:
    """The webhook consumer, with DOCKER_HOST at `docker_host` (a tripwire: it must never make a Docker client)."""
    return wait_for_log(Process(name, [sys.executable, "-m", "workers", "webhooks", "--concurrency", "2"],
                                {**env, "DOCKER_HOST": docker_host}), " ready.", "become ready")


class Tripwire:
    """A Unix socket that counts who connects to it: where a process that must not reach it is pointed."""

    def __init__(self) -> None:
        import socket
        import tempfile
        import threading

        self.path = str(Path(tempfile.mkdtemp(prefix="ccd-trip-")) / "docker.sock")
        self.connections = 0
        self._server = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self._server.bind(self.path)
        self._server.listen(16)
        threading.Thread(target=self._count, daemon=True).start()

    def _count(self) -> None:
        while True:
            try:
                conn, _ = self._server.accept()
            except OSError:
                return  # closed
            self.connections += 1
            conn.close()

    def close(self) -> None:
        self._server.close()
        shutil.rmtree(Path(self.path).parent, ignore_errors=True)


def start_proxy(env: dict[str, str], name: str = "model-proxy") -> Process:
    """The model proxy: on the sessions' network gateway, at CCD_MODEL_PROXY_PORT."""
    return wait_for_log(Process(name, [sys.executable, "-m", "workers", "proxy"], env), "model proxy listening on",
                        "start listening")


def start_beat(env: dict[str, str], name: str = "beat") -> Process:
    """The scheduler: the reaper and the idle-session sweep run from it."""
    return wait_for_log(Process(name, [sys.executable, "-m", "workers", "beat"], env), "is starting.", "start")


def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def signal_group(process: Process, sig: int) -> None:
    """Sends `sig` (e.g. SIGSTOP, SIGCONT) to the process and everything it started: a fault, not a stop."""
    os.killpg(process.proc.pid, sig)
