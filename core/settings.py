"""Settings: the environment, read once into a frozen object that every process passes around."""
from __future__ import annotations

import os
import socket
from dataclasses import dataclass, field, fields
from typing import Mapping

from core.errors import ConfigError
from core.session_tokens import TOKEN_SLACK_SECONDS

DEFAULT_DATABASE_URL = "postgresql+psycopg://postgres@127.0.0.1:5432/ccd"
DEFAULT_REDIS_URL = "redis://127.0.0.1:6379/0"


@dataclass(frozen=True)
class Settings:
    """Everything configurable; see README "Configuration" for each variable."""

    jwt_secret: str = field(repr=False)  # secrets stay out of reprs, and so out of logs and tracebacks
    jwt_audience: str = ""
    jwt_issuer: str = ""
    database_url: str = DEFAULT_DATABASE_URL
    redis_url: str = DEFAULT_REDIS_URL
    anthropic_api_key: str = field(default="", repr=False)
    anthropic_base_url: str = ""
    port: int = 8000
    image: str = "ccd-session:latest"
    session_network: str = "ccd-sessions"
    container_timeout_default: int = 3600
    max_spawn_depth: int = 5
    log_level: str = "INFO"
    log_format: str = "text"
    minio_endpoint: str = ""
    minio_access_key: str = ""
    minio_secret_key: str = field(default="", repr=False)
    minio_bucket: str = "ccd-workspaces"
    minio_secure: bool = False
    storage_dir: str = ".run/storage"
    key_prefix: str = "ccd"
    host_name: str = field(default_factory=socket.gethostname)
    events_maxlen: int = 100_000
    events_max_bytes: int = 67_108_864
    events_page_max_bytes: int = 4_194_304
    max_body_bytes: int = 1_048_576
    max_prompt_chars: int = 500_000
    max_batch_bytes: int = 67_108_864
    worker_concurrency: int = 4
    cancel_grace_seconds: int = 5
    max_wait_seconds: int = 300
    owner_max_sessions: int = 100
    owner_max_running_turns: int = 20
    owner_max_queued_turns: int = 1000
    idempotency_ttl_seconds: int = 86400
    max_token_ttl_seconds: int = 2_592_000
    owner_revocations_per_hour: int = 100
    webhook_secret: str = field(default="", repr=False)
    webhook_allow_private: bool = False
    webhook_max_attempts: int = 8
    ws_ping_seconds: int = 25
    max_children: int = 10
    session_api_url: str = ""
    host_firewall: bool = True
    session_bridge: str = ""
    idle_check_seconds: int = 60
    max_upload_bytes: int = 104_857_600
    files_timeout_seconds: int = 120
    lease_seconds: int = 60
    worker_lost_seconds: int = 120
    reap_seconds: int = 30
    visibility_timeout_seconds: int = 0
    max_event_bytes: int = 1_048_576
    max_turn_output_bytes: int = 67_108_864
    model_proxy_host: str = ""
    model_proxy_port: int = 8011
    tmp_mb: int = 256
    worker_metrics_port: int = 9808
    metrics_token: str = ""
    warm_pool_size: int = 2
    stream_buffer_events: int = 1000
    stream_send_timeout_seconds: int = 30

    @classmethod
    def from_env(cls, environ: Mapping[str, str] | None = None, **overrides) -> "Settings":
        """Builds settings from the environment; fails with a clear message when one is wrong."""
        env = os.environ if environ is None else environ
        values: dict = {}
        for f in fields(cls):
            name = ENV_NAMES[f.name]
            raw = env.get(name)
            if raw is None or raw == "":
                continue
            if f.type in ("int", int):
                try:
                    values[f.name] = int(raw)
                except ValueError:
                    raise ConfigError(f"{name} must be an integer, got {raw!r}") from None
            elif f.type in ("bool", bool):
                if raw.lower() not in ("1", "true", "yes", "0", "false", "no"):
                    raise ConfigError(f"{name} must be true or false, got {raw!r}")
                values[f.name] = raw.lower() in ("1", "true", "yes")
            else:
                values[f.name] = raw
        values.update(overrides)
        if not values.get("jwt_secret"):
            raise ConfigError(
                "JWT_SECRET is not set: cc-docker signs and checks API tokens with it. "
                "Set it to a long random string, e.g. JWT_SECRET=$(openssl rand -hex 32)"
            )
        settings = cls(**values)
        settings.check()
        return settings

    def check(self) -> None:
        """Rejects values that would only fail later, far from their cause."""
        if self.log_level.upper() not in ("DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL"):
            raise ConfigError(f"LOG_LEVEL must be DEBUG, INFO, WARNING or ERROR, got {self.log_level!r}")
        if self.log_format not in ("text", "json"):
            raise ConfigError(f"LOG_FORMAT must be text or json, got {self.log_format!r}")
        for name in ("port", "container_timeout_default", "max_spawn_depth", "events_maxlen",
                     "max_body_bytes", "max_batch_bytes", "worker_concurrency", "cancel_grace_seconds", "max_wait_seconds",
                     "owner_max_sessions", "owner_max_running_turns", "owner_max_queued_turns",
                     "idempotency_ttl_seconds", "webhook_max_attempts", "ws_ping_seconds", "max_children",
                     "idle_check_seconds", "max_upload_bytes", "files_timeout_seconds",
                     "lease_seconds", "worker_lost_seconds", "reap_seconds", "max_event_bytes", "max_turn_output_bytes", "max_prompt_chars",
                     "model_proxy_port", "tmp_mb", "stream_buffer_events", "stream_send_timeout_seconds",
                     "events_max_bytes", "events_page_max_bytes", "max_token_ttl_seconds",
                     "owner_revocations_per_hour"):
            if getattr(self, name) <= 0:
                raise ConfigError(f"{ENV_NAMES[name]} must be positive, got {getattr(self, name)}")
        if self.warm_pool_size < 0:
            raise ConfigError(f"CCD_WARM_POOL_SIZE must be 0 (off) or more, got {self.warm_pool_size}")
        if not 0 <= self.worker_metrics_port <= 65535:
            raise ConfigError(f"CCD_WORKER_METRICS_PORT must be a port number (0 = off), got {self.worker_metrics_port}")
        if self.idempotency_ttl_seconds < 86400:
            raise ConfigError("CCD_IDEMPOTENCY_TTL_SECONDS must be at least 86400 (24 h): "
                              "clients may retry a request a day later")
        if self.events_max_bytes < self.max_event_bytes:
            raise ConfigError(f"CCD_EVENTS_MAX_BYTES ({self.events_max_bytes}) must be at least CCD_MAX_EVENT_BYTES "
                              f"({self.max_event_bytes}): a session's stream must hold its largest event")
        # A session token lives for its turn's timeout (at most CONTAINER_TIMEOUT_DEFAULT) and a slack.
        agent_ttl = self.container_timeout_default + TOKEN_SLACK_SECONDS
        if self.max_token_ttl_seconds < agent_ttl:
            raise ConfigError(f"CCD_MAX_TOKEN_TTL_SECONDS ({self.max_token_ttl_seconds}) must be at least "
                              f"CONTAINER_TIMEOUT_DEFAULT + {TOKEN_SLACK_SECONDS} ({agent_ttl}): "
                              "agents' session tokens live that long")
        if not self.key_prefix.replace("-", "").replace("_", "").isalnum():
            raise ConfigError(f"CCD_KEY_PREFIX may hold letters, digits, - and _ only, got {self.key_prefix!r}")

    @property
    def placement_queue(self) -> str:
        """The shared queue for work any host can take (session placement, the reaper)."""
        return f"{self.key_prefix}.placement"

    def host_queue(self, host: str | None = None) -> str:
        """The queue of one Docker host: its sessions' turns go there."""
        return f"{self.key_prefix}.host.{host or self.host_name}"


ENV_NAMES = {
    "jwt_secret": "JWT_SECRET",
    "jwt_audience": "JWT_AUDIENCE",
    "jwt_issuer": "JWT_ISSUER",
    "database_url": "DATABASE_URL",
    "redis_url": "REDIS_URL",
    "anthropic_api_key": "ANTHROPIC_API_KEY",
    "anthropic_base_url": "ANTHROPIC_BASE_URL",
    "port": "CCD_PORT",
    "image": "CCD_IMAGE",
    "session_network": "CCD_SESSION_NETWORK",
    "container_timeout_default": "CONTAINER_TIMEOUT_DEFAULT",
    "max_spawn_depth": "MAX_SPAWN_DEPTH",
    "log_level": "LOG_LEVEL",
    "log_format": "LOG_FORMAT",
    "minio_endpoint": "MINIO_ENDPOINT",
    "minio_access_key": "MINIO_ACCESS_KEY",
    "minio_secret_key": "MINIO_SECRET_KEY",
    "minio_bucket": "MINIO_BUCKET",
    "minio_secure": "MINIO_SECURE",
    "storage_dir": "CCD_STORAGE_DIR",
    "key_prefix": "CCD_KEY_PREFIX",
    "host_name": "CCD_HOST_NAME",
    "events_maxlen": "CCD_EVENTS_MAXLEN",
    "events_max_bytes": "CCD_EVENTS_MAX_BYTES",
    "events_page_max_bytes": "CCD_EVENTS_PAGE_MAX_BYTES",
    "max_body_bytes": "CCD_MAX_BODY_BYTES",
    "max_prompt_chars": "CCD_MAX_PROMPT_CHARS",
    "max_batch_bytes": "CCD_MAX_BATCH_BYTES",
    "worker_concurrency": "CCD_WORKER_CONCURRENCY",
    "cancel_grace_seconds": "CCD_CANCEL_GRACE_SECONDS",
    "max_wait_seconds": "CCD_MAX_WAIT_SECONDS",
    "owner_max_sessions": "CCD_OWNER_MAX_SESSIONS",
    "owner_max_running_turns": "CCD_OWNER_MAX_RUNNING_TURNS",
    "owner_max_queued_turns": "CCD_OWNER_MAX_QUEUED_TURNS",
    "idempotency_ttl_seconds": "CCD_IDEMPOTENCY_TTL_SECONDS",
    "max_token_ttl_seconds": "CCD_MAX_TOKEN_TTL_SECONDS",
    "owner_revocations_per_hour": "CCD_OWNER_REVOCATIONS_PER_HOUR",
    "webhook_secret": "CCD_WEBHOOK_SECRET",
    "webhook_allow_private": "CCD_WEBHOOK_ALLOW_PRIVATE",
    "webhook_max_attempts": "CCD_WEBHOOK_MAX_ATTEMPTS",
    "ws_ping_seconds": "CCD_WS_PING_SECONDS",
    "max_children": "CCD_MAX_CHILDREN",
    "session_api_url": "CCD_SESSION_API_URL",
    "host_firewall": "CCD_HOST_FIREWALL",
    "session_bridge": "CCD_SESSION_BRIDGE",
    "idle_check_seconds": "CCD_IDLE_CHECK_SECONDS",
    "max_upload_bytes": "CCD_MAX_UPLOAD_BYTES",
    "files_timeout_seconds": "CCD_FILES_TIMEOUT_SECONDS",
    "lease_seconds": "CCD_LEASE_SECONDS",
    "worker_lost_seconds": "CCD_WORKER_LOST_SECONDS",
    "reap_seconds": "CCD_REAP_SECONDS",
    "visibility_timeout_seconds": "CCD_VISIBILITY_TIMEOUT_SECONDS",
    "max_event_bytes": "CCD_MAX_EVENT_BYTES",
    "max_turn_output_bytes": "CCD_MAX_TURN_OUTPUT_BYTES",
    "model_proxy_host": "CCD_MODEL_PROXY_HOST",
    "model_proxy_port": "CCD_MODEL_PROXY_PORT",
    "tmp_mb": "CCD_TMP_MB",
    "worker_metrics_port": "CCD_WORKER_METRICS_PORT",
    "metrics_token": "CCD_METRICS_TOKEN",
    "warm_pool_size": "CCD_WARM_POOL_SIZE",
    "stream_buffer_events": "CCD_STREAM_BUFFER_EVENTS",
    "stream_send_timeout_seconds": "CCD_STREAM_SEND_TIMEOUT_SECONDS",
}
