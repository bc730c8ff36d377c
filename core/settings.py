"""Settings: the environment, read once into a frozen object that every process passes around."""
from __future__ import annotations

import math
import os
import socket
from dataclasses import dataclass, field, fields
from typing import Mapping

from core.errors import ConfigError
from core.limits import DEFAULT_LIMITS, host_cpus, host_memory_mb
from core.pricing import PriceTable

# A session token outlives its turn by this much, so a spawn tool call at the very end still works. Here, not in
# core/session_tokens.py: settings must not import jwt (its ssl references, loaded before gevent patches ssl).
TOKEN_SLACK_SECONDS = 300
DEFAULT_DATABASE_URL = "postgresql+psycopg://postgres@127.0.0.1:5432/ccd"
DEFAULT_REDIS_URL = "redis://127.0.0.1:6379/0"
# HS256 keys shorter than the hash are guessable offline from one token (RFC 7518 3.2 asks for 256 bits).
MIN_SECRET_BYTES = 32
# CCD_SESSION_API_URL's keywords: the API at the sessions' gateway (what make run and compose use), or no spawn tools.
SESSION_API_AUTO = "auto"
SESSION_API_OFF = "off"
# CCD_HOST_FIREWALL: the worker installs and checks the rules itself, or another component (compose's keeper) does.
HOST_FIREWALL_MODES = ("true", "external")


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
    owner_max_memory_mb: int = 0  # 0: CCD_OWNER_MAX_SESSIONS default sessions' worth
    owner_max_cpus: float = 0.0
    owner_max_pending_items: int = 100_000
    max_memory_mb: int = field(default_factory=host_memory_mb)
    max_cpus: float = field(default_factory=host_cpus)
    max_pids: int = 32768  # the most the schema took before ceilings were settings
    max_turn_seconds: int = 0  # 0: CONTAINER_TIMEOUT_DEFAULT
    max_idle_seconds: int = 30 * 86400  # likewise
    nofile: int = 4096
    idempotency_ttl_seconds: int = 86400
    max_token_ttl_seconds: int = 2_592_000
    owner_revocations_per_hour: int = 100
    webhook_secret: str = field(default="", repr=False)
    webhooks_enabled: bool = True
    webhook_allow_private: bool = False
    webhook_max_attempts: int = 8
    webhook_concurrency: int = 4
    ws_ping_seconds: int = 25
    max_children: int = 10
    session_api_url: str = ""
    host_firewall: str = "true"
    host_firewall_status: str = ""
    session_bridge: str = ""
    firewall_check_seconds: int = 10
    idle_check_seconds: int = 60
    max_upload_bytes: int = 104_857_600
    max_unpacked_bytes: int = 0  # an uploaded archive once decompressed; 0: ten times max_upload_bytes
    max_archive_members: int = 100_000
    max_download_bytes: int = 1_073_741_824
    files_timeout_seconds: int = 120
    lease_seconds: int = 60
    worker_lost_seconds: int = 120
    reap_seconds: int = 30
    visibility_timeout_seconds: int = 0
    max_event_bytes: int = 1_048_576
    max_turn_output_bytes: int = 67_108_864
    model_proxy_host: str = ""
    model_proxy_port: int = 8011
    model_proxy_allow_any_address: bool = False
    model_proxy_idle_seconds: int = 60
    model_proxy_client_connections: int = 32
    tmp_mb: int = 256
    disk_mb_default: int = 10240
    max_disk_mb: int = 102400
    disk_check_seconds: int = 15
    worker_metrics_port: int = 9808
    metrics_token: str = ""
    warm_pool_size: int = 2
    stream_buffer_events: int = 1000
    stream_send_timeout_seconds: int = 30
    model_prices: str = ""
    hot_seconds: int = 300
    max_hot_per_host: int = 0  # 0: derived from the host's memory (see hot_limit)
    approval_timeout_seconds: int = 600

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
            elif f.type in ("float", float):
                try:
                    values[f.name] = float(raw)
                except ValueError:
                    raise ConfigError(f"{name} must be a number, got {raw!r}") from None
                if not math.isfinite(values[f.name]):
                    raise ConfigError(f"{name} must be a finite number, got {raw!r}")
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
        # Webhooks are on where they can be signed, unless the operator says otherwise (then a missing key is an error).
        values.setdefault("webhooks_enabled", bool(values.get("webhook_secret")))
        values["session_api_url"] = resolve_session_api_url(values.get("session_api_url", ""),
                                                            values.get("port", 8000))
        settings = cls(**values)
        settings.check()
        return settings

    def check(self) -> None:
        """Rejects values that would only fail later, far from their cause."""
        if len(self.jwt_secret.encode()) < MIN_SECRET_BYTES:
            raise ConfigError(f"JWT_SECRET is {len(self.jwt_secret.encode())} bytes: it must be at least "
                              f"{MIN_SECRET_BYTES} (a short key can be guessed from any token). "
                              "Set JWT_SECRET=$(openssl rand -hex 32)")
        if self.webhooks_enabled and len(self.webhook_secret.encode()) < MIN_SECRET_BYTES:
            raise ConfigError(f"CCD_WEBHOOK_SECRET is {'empty' if not self.webhook_secret else 'too short'} while "
                              f"webhooks are on: it signs every webhook, so it must be at least {MIN_SECRET_BYTES} "
                              "bytes. Set CCD_WEBHOOK_SECRET=$(openssl rand -hex 32), or CCD_WEBHOOKS_ENABLED=false "
                              "to refuse requests that ask for one")
        if self.host_firewall not in HOST_FIREWALL_MODES:
            raise ConfigError(f"CCD_HOST_FIREWALL must be true (the worker installs the host firewall) or external "
                              f"(another component does, e.g. compose's host-firewall service), got "
                              f"{self.host_firewall!r}: sessions never start without it")
        if self.log_level.upper() not in ("DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL"):
            raise ConfigError(f"LOG_LEVEL must be DEBUG, INFO, WARNING or ERROR, got {self.log_level!r}")
        if self.log_format not in ("text", "json"):
            raise ConfigError(f"LOG_FORMAT must be text or json, got {self.log_format!r}")
        for name in ("port", "container_timeout_default", "max_spawn_depth", "events_maxlen",
                     "max_body_bytes", "max_batch_bytes", "worker_concurrency", "cancel_grace_seconds", "max_wait_seconds",
                     "owner_max_sessions", "owner_max_running_turns", "owner_max_queued_turns",
                     "idempotency_ttl_seconds", "webhook_max_attempts", "webhook_concurrency", "ws_ping_seconds", "max_children",
                     "idle_check_seconds", "max_upload_bytes", "max_archive_members", "max_download_bytes",
                     "files_timeout_seconds",
                     "lease_seconds", "worker_lost_seconds", "reap_seconds", "max_event_bytes", "max_turn_output_bytes", "max_prompt_chars",
                     "model_proxy_port", "model_proxy_idle_seconds", "model_proxy_client_connections",
                     "tmp_mb", "stream_buffer_events", "stream_send_timeout_seconds",
                     "owner_max_pending_items", "max_idle_seconds", "nofile",
                     "disk_mb_default", "max_disk_mb", "disk_check_seconds", "firewall_check_seconds",
                     "events_max_bytes", "events_page_max_bytes", "max_token_ttl_seconds",
                     "owner_revocations_per_hour", "approval_timeout_seconds"):
            if getattr(self, name) <= 0:
                raise ConfigError(f"{ENV_NAMES[name]} must be positive, got {getattr(self, name)}")
        for name in ("owner_max_memory_mb", "owner_max_cpus", "max_turn_seconds", "hot_seconds", "max_hot_per_host"):
            if getattr(self, name) < 0:
                raise ConfigError(f"{ENV_NAMES[name]} must be 0 (the default) or more, got {getattr(self, name)}")
        for name, default in (("max_memory_mb", "memory_mb"), ("max_cpus", "cpus"), ("max_pids", "pids")):
            if getattr(self, name) < DEFAULT_LIMITS[default]:  # else a session that asks for nothing is refused
                raise ConfigError(f"{ENV_NAMES[name]} must be at least {DEFAULT_LIMITS[default]}, a session's "
                                  f"default limits.{default}; got {getattr(self, name)}")
        if self.disk_mb_default > self.max_disk_mb:
            raise ConfigError(f"CCD_DISK_MB_DEFAULT ({self.disk_mb_default}) is over CCD_MAX_DISK_MB ({self.max_disk_mb})")
        if self.nofile < 256:
            raise ConfigError(f"CCD_NOFILE must be at least 256 (Claude Code and its tools need files), got {self.nofile}")
        if self.max_unpacked_bytes < 0:
            raise ConfigError(f"CCD_MAX_UNPACKED_BYTES must be 0 (ten times CCD_MAX_UPLOAD_BYTES) or more, "
                              f"got {self.max_unpacked_bytes}")
        if self.warm_pool_size < 0:
            raise ConfigError(f"CCD_WARM_POOL_SIZE must be 0 (off) or more, got {self.warm_pool_size}")
        if not 0 <= self.worker_metrics_port <= 65535:
            raise ConfigError(f"CCD_WORKER_METRICS_PORT must be a port number (0 = off), got {self.worker_metrics_port}")
        if self.idempotency_ttl_seconds < 86400:
            raise ConfigError("CCD_IDEMPOTENCY_TTL_SECONDS must be at least 86400 (24 h): "
                              "clients may retry a request a day later")
        try:
            PriceTable.parse(self.model_prices)
        except ValueError as exc:
            raise ConfigError(f"CCD_MODEL_PRICES: {exc}") from None
        if self.events_max_bytes < self.max_event_bytes:
            raise ConfigError(f"CCD_EVENTS_MAX_BYTES ({self.events_max_bytes}) must be at least CCD_MAX_EVENT_BYTES "
                              f"({self.max_event_bytes}): a session's stream must hold its largest event")
        # A session token lives for its turn's timeout (at most the turn ceiling) and a slack.
        agent_ttl = self.turn_ceiling + TOKEN_SLACK_SECONDS
        if self.max_token_ttl_seconds < agent_ttl:
            raise ConfigError(f"CCD_MAX_TOKEN_TTL_SECONDS ({self.max_token_ttl_seconds}) must be at least the turn "
                              f"ceiling (CCD_MAX_TURN_SECONDS, else CONTAINER_TIMEOUT_DEFAULT) + {TOKEN_SLACK_SECONDS} "
                              f"({agent_ttl}): agents' session tokens live that long")
        if not self.key_prefix.replace("-", "").replace("_", "").isalnum():
            raise ConfigError(f"CCD_KEY_PREFIX may hold letters, digits, - and _ only, got {self.key_prefix!r}")

    @property
    def turn_ceiling(self) -> int:
        """The longest turn a session may ask for (CCD_MAX_TURN_SECONDS, else CONTAINER_TIMEOUT_DEFAULT)."""
        return self.max_turn_seconds or self.container_timeout_default

    @property
    def hot_limit(self) -> int:
        """How many idle hot Claude Code processes one host keeps (CCD_MAX_HOT_PER_HOST, else one per GiB of the
        host's memory: an idle one holds about 250 MB, so a quarter of the memory at most)."""
        return self.max_hot_per_host or max(1, self.max_memory_mb // 1024)

    @property
    def owner_memory_quota(self) -> int:
        """MB of memory limits one owner's live sessions may hold together."""
        return self.owner_max_memory_mb or self.owner_max_sessions * DEFAULT_LIMITS["memory_mb"]

    @property
    def owner_cpu_quota(self) -> float:
        """CPUs one owner's live sessions may hold together."""
        return self.owner_max_cpus or self.owner_max_sessions * DEFAULT_LIMITS["cpus"]

    @property
    def unpacked_limit(self) -> int:
        """How large an uploaded archive may be once decompressed (its tar stream, headers included), and how much
        the files of a workspace download may add up to."""
        return self.max_unpacked_bytes or self.max_upload_bytes * 10

    @property
    def placement_queue(self) -> str:
        """The shared queue for work any host can take (session placement, the reaper)."""
        return f"{self.key_prefix}.placement"

    @property
    def webhook_queue(self) -> str:
        """The webhook deliveries' queue, consumed by `python -m workers webhooks` alone (no Docker socket there)."""
        return f"{self.key_prefix}.webhooks"

    def host_queue(self, host: str | None = None) -> str:
        """The queue of one Docker host: its sessions' turns go there."""
        return f"{self.key_prefix}.host.{host or self.host_name}"


def resolve_session_api_url(value: str, port: int) -> str:
    """CCD_SESSION_API_URL as the runtime uses it: `auto` is the web port at the sessions' gateway (a `{gateway}`
    template), `off` or empty gives agents no spawn tools (""), anything else is the URL itself."""
    if value == SESSION_API_AUTO:
        return f"http://{{gateway}}:{port}"
    return "" if value == SESSION_API_OFF else value


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
    "owner_max_memory_mb": "CCD_OWNER_MAX_MEMORY_MB",
    "owner_max_cpus": "CCD_OWNER_MAX_CPUS",
    "owner_max_pending_items": "CCD_OWNER_MAX_PENDING_ITEMS",
    "max_memory_mb": "CCD_MAX_MEMORY_MB",
    "max_cpus": "CCD_MAX_CPUS",
    "max_pids": "CCD_MAX_PIDS",
    "max_turn_seconds": "CCD_MAX_TURN_SECONDS",
    "max_idle_seconds": "CCD_MAX_IDLE_SECONDS",
    "nofile": "CCD_NOFILE",
    "idempotency_ttl_seconds": "CCD_IDEMPOTENCY_TTL_SECONDS",
    "max_token_ttl_seconds": "CCD_MAX_TOKEN_TTL_SECONDS",
    "owner_revocations_per_hour": "CCD_OWNER_REVOCATIONS_PER_HOUR",
    "webhook_secret": "CCD_WEBHOOK_SECRET",
    "webhooks_enabled": "CCD_WEBHOOKS_ENABLED",
    "webhook_allow_private": "CCD_WEBHOOK_ALLOW_PRIVATE",
    "webhook_max_attempts": "CCD_WEBHOOK_MAX_ATTEMPTS",
    "webhook_concurrency": "CCD_WEBHOOK_CONCURRENCY",
    "ws_ping_seconds": "CCD_WS_PING_SECONDS",
    "max_children": "CCD_MAX_CHILDREN",
    "session_api_url": "CCD_SESSION_API_URL",
    "host_firewall": "CCD_HOST_FIREWALL",
    "host_firewall_status": "CCD_HOST_FIREWALL_STATUS",
    "firewall_check_seconds": "CCD_FIREWALL_CHECK_SECONDS",
    "session_bridge": "CCD_SESSION_BRIDGE",
    "idle_check_seconds": "CCD_IDLE_CHECK_SECONDS",
    "max_upload_bytes": "CCD_MAX_UPLOAD_BYTES",
    "max_unpacked_bytes": "CCD_MAX_UNPACKED_BYTES",
    "max_archive_members": "CCD_MAX_ARCHIVE_MEMBERS",
    "max_download_bytes": "CCD_MAX_DOWNLOAD_BYTES",
    "files_timeout_seconds": "CCD_FILES_TIMEOUT_SECONDS",
    "lease_seconds": "CCD_LEASE_SECONDS",
    "worker_lost_seconds": "CCD_WORKER_LOST_SECONDS",
    "reap_seconds": "CCD_REAP_SECONDS",
    "visibility_timeout_seconds": "CCD_VISIBILITY_TIMEOUT_SECONDS",
    "max_event_bytes": "CCD_MAX_EVENT_BYTES",
    "max_turn_output_bytes": "CCD_MAX_TURN_OUTPUT_BYTES",
    "model_proxy_host": "CCD_MODEL_PROXY_HOST",
    "model_proxy_port": "CCD_MODEL_PROXY_PORT",
    "model_proxy_allow_any_address": "CCD_MODEL_PROXY_ALLOW_ANY_ADDRESS",
    "model_proxy_idle_seconds": "CCD_MODEL_PROXY_IDLE_SECONDS",
    "model_proxy_client_connections": "CCD_MODEL_PROXY_CLIENT_CONNECTIONS",
    "tmp_mb": "CCD_TMP_MB",
    "disk_mb_default": "CCD_DISK_MB_DEFAULT",
    "max_disk_mb": "CCD_MAX_DISK_MB",
    "disk_check_seconds": "CCD_DISK_CHECK_SECONDS",
    "worker_metrics_port": "CCD_WORKER_METRICS_PORT",
    "metrics_token": "CCD_METRICS_TOKEN",
    "warm_pool_size": "CCD_WARM_POOL_SIZE",
    "stream_buffer_events": "CCD_STREAM_BUFFER_EVENTS",
    "stream_send_timeout_seconds": "CCD_STREAM_SEND_TIMEOUT_SECONDS",
    "model_prices": "CCD_MODEL_PRICES",
    "hot_seconds": "CCD_HOT_SECONDS",
    "max_hot_per_host": "CCD_MAX_HOT_PER_HOST",
    "approval_timeout_seconds": "CCD_APPROVAL_TIMEOUT_SECONDS",
}
