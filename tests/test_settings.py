"""Settings come from the environment once, with defaults, and bad values fail clearly."""
import pytest

from core.errors import ConfigError
from core.settings import Settings


def test_missing_jwt_secret_is_refused_with_a_clear_message():
    with pytest.raises(ConfigError, match="JWT_SECRET is not set"):
        Settings.from_env({})


def test_defaults_match_the_documented_ones():
    s = Settings.from_env({"JWT_SECRET": "x" * 32})
    assert s.database_url == "postgresql+psycopg://postgres@127.0.0.1:5432/ccd"
    assert s.redis_url == "redis://127.0.0.1:6379/0"
    assert (s.port, s.container_timeout_default, s.max_spawn_depth, s.log_level) == (8000, 3600, 5, "INFO")


def test_environment_values_override_defaults_and_are_typed():
    s = Settings.from_env({"JWT_SECRET": "s", "CCD_PORT": "9001", "CCD_IMAGE": "img:1",
                           "MAX_SPAWN_DEPTH": "2", "ANTHROPIC_BASE_URL": "http://h:1"})
    assert s.port == 9001 and s.image == "img:1" and s.max_spawn_depth == 2
    assert s.anthropic_base_url == "http://h:1"


@pytest.mark.parametrize("name,value,message", [
    ("CCD_PORT", "eighty", "CCD_PORT must be an integer"),
    ("CONTAINER_TIMEOUT_DEFAULT", "0", "CONTAINER_TIMEOUT_DEFAULT must be positive"),
    ("LOG_LEVEL", "LOUD", "LOG_LEVEL must be"),
    ("CCD_KEY_PREFIX", "a:b", "CCD_KEY_PREFIX may hold"),
    ("CCD_DISK_MB_DEFAULT", "999999", r"CCD_DISK_MB_DEFAULT \(999999\) is over CCD_MAX_DISK_MB"),
    ("CCD_DISK_CHECK_SECONDS", "0", "CCD_DISK_CHECK_SECONDS must be positive"),
])
def test_bad_values_name_the_variable(name, value, message):
    with pytest.raises(ConfigError, match=message):
        Settings.from_env({"JWT_SECRET": "s", name: value})


def test_queues_are_named_from_prefix_and_host():
    s = Settings.from_env({"JWT_SECRET": "s", "CCD_HOST_NAME": "box1"})
    assert s.placement_queue == "ccd.placement"
    assert s.host_queue() == "ccd.host.box1"


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
    assert Settings.from_env({"JWT_SECRET": "x", "CCD_WEBHOOK_ALLOW_PRIVATE": "true"}).webhook_allow_private is True
    assert Settings.from_env({"JWT_SECRET": "x", "CCD_WEBHOOK_ALLOW_PRIVATE": "no"}).webhook_allow_private is False
    with pytest.raises(ConfigError, match="CCD_WEBHOOK_ALLOW_PRIVATE"):
        Settings.from_env({"JWT_SECRET": "x", "CCD_WEBHOOK_ALLOW_PRIVATE": "maybe"})
    with pytest.raises(ConfigError, match="24 h"):
        Settings.from_env({"JWT_SECRET": "x", "CCD_IDEMPOTENCY_TTL_SECONDS": "60"})
