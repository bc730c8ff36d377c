"""Fixtures: a private database and key prefix per run; the real stack for end-to-end tests."""
from __future__ import annotations

import os
import secrets
import shutil
import time
from dataclasses import replace

import pytest
import redis
from sqlalchemy.engine import make_url

from client.tokens import mint_token
from core.migrate import prepare_database
from core.settings import DEFAULT_DATABASE_URL, DEFAULT_REDIS_URL, Settings
from tests import stack
from tests.model_server import ModelServer

RUN_ID = secrets.token_hex(4)


@pytest.fixture(scope="session")
def settings() -> Settings:
    """Settings of this run: its own database and Redis key prefix, cleaned up afterwards."""
    base_db = make_url(os.environ.get("DATABASE_URL") or DEFAULT_DATABASE_URL)
    database_url = base_db.set(database=f"ccd_test_{RUN_ID}").render_as_string(hide_password=False)
    prepare_database(database_url)
    s = Settings.from_env({}, jwt_secret=secrets.token_hex(32), database_url=database_url,
                          redis_url=os.environ.get("REDIS_URL") or DEFAULT_REDIS_URL,
                          key_prefix=f"ccdt{RUN_ID}", session_network=f"ccdt{RUN_ID}-net",
                          image=os.environ.get("CCD_IMAGE") or "ccd-session:latest",
                          anthropic_api_key="sk-test-not-a-real-key", webhook_secret=secrets.token_hex(32),
                          webhook_allow_private=True, cancel_grace_seconds=2)
    yield s
    client = redis.Redis.from_url(s.redis_url)
    keys = list(client.scan_iter(match=f"{s.key_prefix}*", count=1000))
    if keys:
        client.delete(*keys)
    stack.drop_database(database_url)


@pytest.fixture(scope="session")
def token(settings):
    """Mints a valid token for an owner."""
    return lambda sub="alice", ttl=600: mint_token(settings.jwt_secret, sub, ttl)


@pytest.fixture
def auth(token):
    """Authorization headers for an owner."""
    return lambda sub="alice": {"Authorization": f"Bearer {token(sub)}"}


@pytest.fixture(scope="session")
def api_settings(settings):
    """For tests without a worker: their tasks go to queues no worker of this run consumes."""
    return replace(settings, key_prefix=f"{settings.key_prefix}api")


@pytest.fixture(scope="session")
def app(api_settings):
    from web import create_app

    return create_app(api_settings)


@pytest.fixture
def client(app):
    return app.test_client()


@pytest.fixture(scope="session")
def docker_client():
    return stack.ensure_dockerd()


@pytest.fixture(scope="session")
def stack_env(settings, docker_client, s3_endpoint):
    """The real stack: session image, network, scripted model server, S3 server, web, worker, webhook consumer, beat."""
    stack.build_image(settings.image)
    gateway = stack.network_gateway(docker_client, settings.session_network)
    model = ModelServer("127.0.0.1", 0).start()  # on loopback: containers reach it only through the proxy
    port = stack.free_port()
    env = stack.service_env(
        settings, gateway, model.url, port,
        # Agents reach the API where they reach the host; spawn chains stop at depth 1 here.
        CCD_SESSION_API_URL=f"http://{gateway}:{port}", MAX_SPAWN_DEPTH="1", CCD_IDLE_CHECK_SECONDS="2",
        MINIO_ENDPOINT=s3_endpoint["endpoint"], MINIO_ACCESS_KEY=s3_endpoint["access_key"],
        MINIO_SECRET_KEY=s3_endpoint["secret_key"], MINIO_BUCKET=f"ccdt{RUN_ID}",
        # Webhook receivers in the tests listen on loopback; a failing webhook gives up after 3 attempts (1 s and
        # 2 s apart); cancels escalate quickly.
        CCD_WEBHOOK_SECRET=settings.webhook_secret, CCD_WEBHOOK_ALLOW_PRIVATE="true", CCD_WEBHOOK_MAX_ATTEMPTS="3",
        CCD_CANCEL_GRACE_SECONDS=str(settings.cancel_grace_seconds), CCD_WS_PING_SECONDS="3",
        # The proxy closes idle connections sooner than by default: Claude Code must cope, and a flood test can wait.
        CCD_MODEL_PROXY_IDLE_SECONDS="40")
    proxy = stack.start_proxy(env)
    web = stack.start_web(env, port, also_on=gateway)
    worker = stack.start_worker(env)
    docker_trap = stack.Tripwire()  # the webhook consumer's DOCKER_HOST: it must never connect there
    webhooks = stack.start_webhooks(env, f"unix://{docker_trap.path}")
    beat = stack.start_beat(env)
    yield {"base": f"http://127.0.0.1:{port}", "ws": f"ws://127.0.0.1:{port}", "model": model,
           "web": web, "worker": worker, "beat": beat, "env": env, "proxy": proxy, "gateway": gateway,
           "webhooks": webhooks, "docker_trap": docker_trap,
           "worker_metrics": f"http://127.0.0.1:{env['CCD_WORKER_METRICS_PORT']}",
           "settings": replace(settings, anthropic_base_url=model.url, minio_endpoint=env["MINIO_ENDPOINT"],
                               minio_access_key=env["MINIO_ACCESS_KEY"], minio_secret_key=env["MINIO_SECRET_KEY"],
                               minio_bucket=env["MINIO_BUCKET"], max_spawn_depth=1,
                               model_proxy_port=int(env["CCD_MODEL_PROXY_PORT"]))}
    beat.stop()
    webhooks.stop()
    docker_trap.close()
    worker.stop()
    web.stop()
    proxy.stop()
    model.stop()
    stack.remove_prefixed(docker_client, settings.key_prefix, settings.session_network)


def pytest_collection_modifyitems(items):
    """Tests that restart the Docker engine run last: they stop every container of the run."""
    items.sort(key=lambda item: item.get_closest_marker("engine_restart") is not None)


def wait_for(predicate, timeout: float = 60.0, interval: float = 0.2, what: str = "condition"):
    """Polls until predicate() returns something truthy; fails the test with `what` otherwise."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(interval)
    raise AssertionError(f"timed out after {timeout:.0f}s waiting for {what}")


@pytest.fixture(scope="session")
def s3_endpoint():
    """A real S3-protocol server (moto_server) on loopback, once per run."""
    from tests.s3_server import ACCESS_KEY, SECRET_KEY, S3Server

    server = S3Server().start()
    yield {"endpoint": server.endpoint, "access_key": ACCESS_KEY, "secret_key": SECRET_KEY}
    server.stop()


# Without the background-networking switches Chromium waits on services this closed network never answers.
CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync"]


@pytest.fixture(scope="session")
def browser():
    """Debian's Chromium, driven by Playwright (which brings its driver, not a browser)."""
    from playwright.sync_api import sync_playwright

    chromium = shutil.which("chromium")
    if chromium is None:
        pytest.fail("Chromium is not installed: apt-get install chromium (the console and /docs are tested in it)")
    with sync_playwright() as playwright:
        found = playwright.chromium.launch(executable_path=chromium, args=CHROMIUM_ARGS)
        yield found
        found.close()
