"""Settings come from the environment once, with defaults, and bad values fail clearly."""
import pytest

from core.errors import ConfigError
from core.settings import Settings

SECRET = "k" * 32  # the shortest JWT_SECRET the server accepts


def test_missing_jwt_secret_is_refused_with_a_clear_message():
    with pytest.raises(ConfigError, match="JWT_SECRET is not set"):
        Settings.from_env({})


def test_defaults_match_the_documented_ones():
    s = Settings.from_env({"JWT_SECRET": SECRET})
    assert s.database_url == "postgresql+psycopg://postgres@127.0.0.1:5432/ccd"
    assert s.redis_url == "redis://127.0.0.1:6379/0"
    assert (s.port, s.container_timeout_default, s.max_spawn_depth, s.log_level) == (8000, 3600, 5, "INFO")


def test_environment_values_override_defaults_and_are_typed():
    s = Settings.from_env({"JWT_SECRET": SECRET, "CCD_PORT": "9001", "CCD_IMAGE": "img:1",
                           "MAX_SPAWN_DEPTH": "2", "ANTHROPIC_BASE_URL": "http://h:1"})
    assert s.port == 9001 and s.image == "img:1" and s.max_spawn_depth == 2
    assert s.anthropic_base_url == "http://h:1"


@pytest.mark.parametrize("name,value,message", [
    ("CCD_PORT", "eighty", "CCD_PORT must be an integer"),
    ("CONTAINER_TIMEOUT_DEFAULT", "0", "CONTAINER_TIMEOUT_DEFAULT must be positive"),
    ("LOG_LEVEL", "LOUD", "LOG_LEVEL must be"),
    ("CCD_KEY_PREFIX", "a:b", "CCD_KEY_PREFIX may hold"),
    ("CCD_MAX_CPUS", "many", "CCD_MAX_CPUS must be a number"),
    ("CCD_MAX_CPUS", "inf", "CCD_MAX_CPUS must be a finite number"),
    ("CCD_MAX_CPUS", "0.5", "CCD_MAX_CPUS must be at least 1.0"),
    ("CCD_MAX_MEMORY_MB", "1024", "CCD_MAX_MEMORY_MB must be at least 2048"),
    ("CCD_MAX_PIDS", "100", "CCD_MAX_PIDS must be at least 512"),
    ("CCD_OWNER_MAX_CPUS", "-1", "CCD_OWNER_MAX_CPUS must be 0"),
    ("CCD_NOFILE", "16", "CCD_NOFILE must be at least 256"),
    ("CCD_DISK_MB_DEFAULT", "999999", r"CCD_DISK_MB_DEFAULT \(999999\) is over CCD_MAX_DISK_MB"),
    ("CCD_DISK_CHECK_SECONDS", "0", "CCD_DISK_CHECK_SECONDS must be positive"),
])
def test_bad_values_name_the_variable(name, value, message):
    with pytest.raises(ConfigError, match=message):
        Settings.from_env({"JWT_SECRET": SECRET, name: value})


def test_ceilings_and_quotas_default_to_the_host_and_to_todays_limits():
    import os

    s = Settings.from_env({"JWT_SECRET": "s" * 32})
    memory = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") >> 20
    assert s.max_memory_mb == max(memory, 2048) and s.max_cpus == max(float(os.cpu_count()), 1.0)
    assert (s.max_pids, s.max_idle_seconds, s.nofile, s.owner_max_pending_items) == (32768, 30 * 86400, 4096, 100_000)
    # The turn ceiling is CONTAINER_TIMEOUT_DEFAULT unless set; owner quotas are CCD_OWNER_MAX_SESSIONS
    # default sessions' worth unless set.
    assert s.turn_ceiling == 3600 and (s.owner_memory_quota, s.owner_cpu_quota) == (100 * 2048, 100.0)
    s = Settings.from_env({"JWT_SECRET": "s" * 32, "CCD_MAX_TURN_SECONDS": "7200", "CCD_MAX_CPUS": "1.5",
                           "CCD_OWNER_MAX_SESSIONS": "3", "CCD_OWNER_MAX_CPUS": "2.5"})
    assert (s.turn_ceiling, s.max_cpus, s.owner_memory_quota, s.owner_cpu_quota) == (7200, 1.5, 3 * 2048, 2.5)


def test_queues_are_named_from_prefix_and_host():
    s = Settings.from_env({"JWT_SECRET": SECRET, "CCD_HOST_NAME": "box1"})
    assert s.placement_queue == "ccd.placement"
    assert s.host_queue() == "ccd.host.box1"
    assert s.webhook_queue == "ccd.webhooks"


def test_server_refuses_to_start_without_jwt_secret():
    import subprocess
    import sys

    env = {"PATH": "/usr/bin:/bin"}
    proc = subprocess.run([sys.executable, "-c", "import web.wsgi"], env=env, capture_output=True, text=True)
    assert proc.returncode != 0
    assert "JWT_SECRET is not set" in proc.stderr


def test_every_setting_is_documented_in_readme_and_env_example():
    from pathlib import Path

    from core.settings import ENV_NAMES

    root = Path(__file__).resolve().parent.parent
    readme, example = (root / "README.md").read_text(), (root / ".env.example").read_text()
    for name in ENV_NAMES.values():
        assert f"`{name}`" in readme, f"{name} missing from README"
        assert f"{name}=" in example, f"{name} missing from .env.example"


def test_booleans_and_the_idempotency_floor_are_checked():
    assert Settings.from_env({"JWT_SECRET": SECRET, "CCD_WEBHOOK_ALLOW_PRIVATE": "true"}).webhook_allow_private is True
    assert Settings.from_env({"JWT_SECRET": SECRET, "CCD_WEBHOOK_ALLOW_PRIVATE": "no"}).webhook_allow_private is False
    with pytest.raises(ConfigError, match="CCD_WEBHOOK_ALLOW_PRIVATE"):
        Settings.from_env({"JWT_SECRET": SECRET, "CCD_WEBHOOK_ALLOW_PRIVATE": "maybe"})
    with pytest.raises(ConfigError, match="24 h"):
        Settings.from_env({"JWT_SECRET": SECRET, "CCD_IDEMPOTENCY_TTL_SECONDS": "60"})


def test_a_jwt_secret_shorter_than_32_bytes_is_refused_saying_what_to_set():
    with pytest.raises(ConfigError, match=r"JWT_SECRET is 31 bytes: it must be at least 32.*openssl rand -hex 32"):
        Settings.from_env({"JWT_SECRET": "k" * 31})
    assert Settings.from_env({"JWT_SECRET": "k" * 32}).jwt_secret == "k" * 32


def test_webhooks_are_on_exactly_when_they_can_be_signed():
    assert Settings.from_env({"JWT_SECRET": SECRET}).webhooks_enabled is False
    assert Settings.from_env({"JWT_SECRET": SECRET, "CCD_WEBHOOK_SECRET": "w" * 32}).webhooks_enabled is True
    off = Settings.from_env({"JWT_SECRET": SECRET, "CCD_WEBHOOK_SECRET": "w" * 32, "CCD_WEBHOOKS_ENABLED": "false"})
    assert off.webhooks_enabled is False
    for secret in ("", "short"):
        with pytest.raises(ConfigError, match="CCD_WEBHOOK_SECRET is .* while webhooks are on.*CCD_WEBHOOKS_ENABLED"):
            Settings.from_env({"JWT_SECRET": SECRET, "CCD_WEBHOOKS_ENABLED": "true", "CCD_WEBHOOK_SECRET": secret})
    with pytest.raises(ConfigError, match="CCD_WEBHOOK_SECRET is too short"):
        Settings.from_env({"JWT_SECRET": SECRET, "CCD_WEBHOOK_SECRET": "short"})


def test_the_session_api_url_is_auto_off_or_a_url():
    def url(value):
        return Settings.from_env({"JWT_SECRET": SECRET, "CCD_PORT": "8123", "CCD_SESSION_API_URL": value}).session_api_url

    assert url("auto") == "http://{gateway}:8123"
    assert url("off") == "" and url("") == ""
    assert url("http://api.internal:9000") == "http://api.internal:9000"


def test_the_host_firewall_cannot_be_turned_off():
    assert Settings.from_env({"JWT_SECRET": SECRET, "CCD_HOST_FIREWALL": "external"}).host_firewall == "external"
    with pytest.raises(ConfigError, match="CCD_HOST_FIREWALL must be true .* or external"):
        Settings.from_env({"JWT_SECRET": SECRET, "CCD_HOST_FIREWALL": "false"})


@pytest.mark.parametrize("argv", [["-c", "import web.wsgi"], ["-m", "workers", "worker"], ["-m", "workers", "beat"],
                                  ["-m", "workers", "proxy"], ["-m", "workers", "firewall"]],
                         ids=["web", "worker", "beat", "proxy", "firewall"])
@pytest.mark.parametrize("env,says", [
    ({"JWT_SECRET": "too-short"}, "JWT_SECRET is 9 bytes: it must be at least 32"),
    ({"JWT_SECRET": SECRET, "CCD_WEBHOOKS_ENABLED": "true"}, "CCD_WEBHOOK_SECRET is empty while webhooks are on"),
], ids=["short-jwt-secret", "webhooks-on-without-secret"])
def test_every_process_refuses_to_start_with_a_weak_secret_and_says_what_to_set(argv, env, says):
    import subprocess
    import sys
    from pathlib import Path

    root = Path(__file__).resolve().parent.parent
    proc = subprocess.run([sys.executable, *argv], env={"PATH": "/usr/bin:/bin", **env}, capture_output=True,
                          text=True, cwd=root, timeout=60)
    assert proc.returncode != 0
    assert says in proc.stderr and "openssl rand -hex 32" in proc.stderr, proc.stderr[-2000:]


def test_the_webhook_consumer_refuses_to_start_without_a_secret_to_sign_with():
    import subprocess
    import sys
    from pathlib import Path

    proc = subprocess.run([sys.executable, "-m", "workers", "webhooks"], env={"PATH": "/usr/bin:/bin", "JWT_SECRET": SECRET},
                          capture_output=True, text=True, cwd=Path(__file__).resolve().parent.parent, timeout=60)
    assert proc.returncode == 2 and "set CCD_WEBHOOK_SECRET" in proc.stderr, proc.stderr[-2000:]


def test_the_unpacked_archive_cap_defaults_to_ten_uploads_and_the_archive_caps_are_checked():
    assert Settings.from_env({"JWT_SECRET": SECRET, "CCD_MAX_UPLOAD_BYTES": "1000"}).unpacked_limit == 10_000
    assert Settings.from_env({"JWT_SECRET": SECRET, "CCD_MAX_UNPACKED_BYTES": "5"}).unpacked_limit == 5
    for name in ("CCD_MAX_UNPACKED_BYTES", "CCD_MAX_ARCHIVE_MEMBERS", "CCD_MAX_DOWNLOAD_BYTES"):
        with pytest.raises(ConfigError, match=name):
            Settings.from_env({"JWT_SECRET": SECRET, name: "-1"})
