"""`make run`: sets up what is missing, then runs web, worker, the webhook consumer, beat and the model proxy in the
foreground.

Uses Postgres and Redis at the configured URLs; when one does not answer on this machine, starts a
private one from the local binaries under .run/. Ctrl-C stops everything this script started.
"""
from __future__ import annotations

import glob
import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path
from urllib.parse import urlparse

ROOT = Path(__file__).resolve().parent.parent
RUN_DIR = ROOT / ".run"
sys.path.insert(0, str(ROOT))

from core.errors import ConfigError  # noqa: E402
from core.settings import SESSION_API_AUTO, Settings  # noqa: E402

children: list[subprocess.Popen] = []


def say(message: str) -> None:
    print(f"[run] {message}", flush=True)


def load_dotenv(path: Path) -> None:
    """KEY=VALUE lines from .env, without overriding the real environment."""
    if not path.exists():
        return
    for line in path.read_text().splitlines():
        line = line.strip()
        if line and not line.startswith("#") and "=" in line:
            key, value = line.split("=", 1)
            os.environ.setdefault(key.strip(), value.strip().strip('"').strip("'"))


# The secrets make run keeps for this machine under .run/ when the environment has none: tokens stay valid and
# webhook receivers keep their key across restarts.
SECRET_FILES = {"JWT_SECRET": "jwt_secret", "CCD_WEBHOOK_SECRET": "webhook_secret"}


def ensure_secrets() -> None:
    """Each secret that is not set comes from its file under .run/, made with a fresh value the first time."""
    for name, file in SECRET_FILES.items():
        if os.environ.get(name):
            continue
        path = RUN_DIR / file
        if not path.exists():
            path.write_text(secrets.token_hex(32))
            path.chmod(0o600)
            say(f"{name} was not set: generated one in {path.relative_to(ROOT)}")
        os.environ[name] = path.read_text().strip()


def apply_defaults(environ) -> None:
    """What make run sets that a bare process does not: agents reach the API at the sessions' network gateway,
    where the web listens (on every address), so they get the spawn tools; CCD_SESSION_API_URL=off turns them off."""
    if not environ.get("CCD_SESSION_API_URL"):
        environ["CCD_SESSION_API_URL"] = SESSION_API_AUTO


def answers(host: str, port: int) -> bool:
    try:
        with socket.create_connection((host, port), timeout=1):
            return True
    except OSError:
        return False


def is_local(host: str) -> bool:
    return host in ("127.0.0.1", "localhost", "::1")


def spawn(name: str, argv: list[str], **kwargs) -> subprocess.Popen:
    proc = subprocess.Popen(argv, cwd=ROOT, **kwargs)
    proc.name = name  # type: ignore[attr-defined]
    children.append(proc)
    return proc


def wait_until(check, what: str, timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if check():
            return
        time.sleep(0.3)
    raise SystemExit(f"[run] {what} did not come up within {timeout:.0f}s; see .run/*.log")


def ensure_redis(url: str) -> None:
    parsed = urlparse(url)
    host, port = parsed.hostname or "127.0.0.1", parsed.port or 6379
    if answers(host, port):
        return
    server = shutil.which("redis-server")
    if not is_local(host) or not server:
        raise SystemExit(f"[run] Redis does not answer at {host}:{port}. Start one, or install "
                         "redis-server (apt-get install redis-server) and run make run again.")
    say(f"Redis not running: starting a private one on {host}:{port}")
    log = open(RUN_DIR / "redis.log", "ab")
    spawn("redis", [server, "--bind", "127.0.0.1", "--port", str(port), "--save", "", "--appendonly", "no",
                    "--dir", str(RUN_DIR)], stdout=log, stderr=log)
    wait_until(lambda: answers(host, port), "Redis")


def postgres_bin(name: str) -> str | None:
    found = shutil.which(name)
    if found:
        return found
    candidates = sorted(glob.glob(f"/usr/lib/postgresql/*/bin/{name}"))
    return candidates[-1] if candidates else None


def ensure_postgres(url: str) -> None:
    parsed = urlparse(url.replace("postgresql+psycopg", "postgresql"))
    host, port = parsed.hostname or "127.0.0.1", parsed.port or 5432
    if answers(host, port):
        return
    initdb, postgres = postgres_bin("initdb"), postgres_bin("postgres")
    if not is_local(host) or not initdb or not postgres:
        raise SystemExit(f"[run] Postgres does not answer at {host}:{port}. Start one, or install "
                         "postgresql (apt-get install postgresql) and run make run again.")
    data = RUN_DIR / "pgdata"
    # Postgres will not run as root: run it as the postgres user when we are root.
    as_user = ["runuser", "-u", "postgres", "--"] if os.geteuid() == 0 else []
    if not (data / "PG_VERSION").exists():
        say(f"Postgres not running: initialising a private cluster in {data.relative_to(ROOT)}")
        data.mkdir(parents=True, exist_ok=True)
        if as_user:
            shutil.chown(data, "postgres")
            os.chmod(RUN_DIR, 0o755)
        subprocess.run(as_user + [initdb, "-D", str(data), "-U", parsed.username or "postgres",
                                  "--auth=trust"], check=True, stdout=subprocess.DEVNULL)
    say(f"starting a private Postgres on {host}:{port}")
    log = open(RUN_DIR / "postgres.log", "ab")
    spawn("postgres", as_user + [postgres, "-D", str(data), "-p", str(port), "-k", "/tmp",
                                 "-c", "listen_addresses=127.0.0.1"], stdout=log, stderr=log)
    wait_until(lambda: answers(host, port), "Postgres")


def ensure_docker() -> None:
    try:
        import docker

        docker.from_env().ping()
    except Exception:
        raise SystemExit("[run] the Docker engine does not answer. Install it (apt-get install docker.io) "
                         "and start it (dockerd &, or systemctl start docker), then run make run again.") from None


def stop_children(*_args) -> None:
    for proc in reversed(children):
        if proc.poll() is None:
            proc.terminate()
    for proc in reversed(children):
        try:
            proc.wait(15)
        except subprocess.TimeoutExpired:
            proc.kill()


def main() -> int:
    RUN_DIR.mkdir(exist_ok=True)
    load_dotenv(ROOT / ".env")
    ensure_secrets()
    apply_defaults(os.environ)
    try:
        settings = Settings.from_env()
    except ConfigError as exc:
        print(f"[run] {exc}", file=sys.stderr)
        return 2
    # Explicit handlers: a shell may start us with SIGINT ignored (background jobs), and
    # Ctrl-C or a SIGTERM must always stop everything we started.
    signal.signal(signal.SIGINT, signal.default_int_handler)
    signal.signal(signal.SIGTERM, lambda *_: (stop_children(), sys.exit(0)))
    try:
        ensure_redis(settings.redis_url)
        ensure_postgres(settings.database_url)
        from core.migrate import prepare_database

        created = prepare_database(settings.database_url)
        say(f"database {'created and ' if created else ''}migrated")
        ensure_docker()
        say(f"building the session image {settings.image} (first time: a few minutes; then seconds)")
        subprocess.run(["bash", str(ROOT / "container" / "build.sh")], check=True)
        python = sys.executable
        # The model proxy holds ANTHROPIC_API_KEY; session containers get per-session credentials for it.
        spawn("model-proxy", [python, "-m", "workers", "proxy"])
        # Several gunicorn processes: their /metrics counts add up through one multiprocess directory.
        web_env = {**os.environ, "PROMETHEUS_MULTIPROC_DIR": str(RUN_DIR / "web-metrics")}
        # Every address: the sessions' gateway among them, where agents' spawn tools reach it (CCD_SESSION_API_URL).
        spawn("web", [python, "-m", "gunicorn", "-c", "python:web.gunicorn_conf", "-b", f"0.0.0.0:{settings.port}",
                      "web.wsgi:app"], env=web_env)
        spawn("worker", [python, "-m", "workers", "worker"])
        # Webhooks go out from a process of their own, which makes no Docker client (README "Webhooks").
        spawn("webhooks", [python, "-m", "workers", "webhooks"])
        spawn("beat", [python, "-m", "workers", "beat"])
        wait_until(lambda: answers("127.0.0.1", settings.port), "web")
        print_welcome(settings)
        while all(p.poll() is None for p in children):
            time.sleep(1)
        dead = next(p for p in children if p.poll() is not None)
        say(f"{dead.name} exited with code {dead.returncode}; stopping the rest")  # type: ignore[attr-defined]
        return 1
    except KeyboardInterrupt:
        say("stopping")
        return 0
    finally:
        stop_children()


def print_welcome(settings: Settings) -> None:
    from client.tokens import mint_token

    token = mint_token(settings.jwt_secret, "dev", 7 * 24 * 3600, audience=settings.jwt_audience,
                       issuer=settings.jwt_issuer)
    base = f"http://127.0.0.1:{settings.port}"
    model = settings.anthropic_base_url or "the Anthropic API"
    print(f"""
cc-docker is running at {base}  (sessions talk to {model}; Ctrl-C stops everything)
  console: {base}/   API docs: {base}/docs   (paste the token below)

  export CCD={base} TOKEN={token}
  curl -s -X POST $CCD/api/v1/sessions -H "Authorization: Bearer $TOKEN" \\
       -H 'Content-Type: application/json' -d '{{"workspace": {{"type": "ephemeral"}}}}'
""", flush=True)
    if settings.session_api_url:
        say(f"agents get the spawn tools, reaching the API at {settings.session_api_url} (CCD_SESSION_API_URL=off: none)")
    if settings.host_firewall == "true" and os.geteuid() != 0:
        say("warning: not root, so the worker cannot install the host firewall and no session will start; run make "
            "run as root, or see README \"The host firewall\" for CCD_HOST_FIREWALL=external")
    if not settings.anthropic_api_key:
        say("warning: ANTHROPIC_API_KEY is not set; turns will fail until it is (see README)")


if __name__ == "__main__":
    sys.exit(main())
