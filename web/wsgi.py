"""WSGI entry point for gunicorn: `gunicorn web.wsgi:app`."""
import sys

from core.errors import ConfigError
from core.logs import setup_logging
from core.settings import Settings
from web import create_app

try:
    _settings = Settings.from_env()
except ConfigError as exc:
    print(f"cc-docker web cannot start: {exc}", file=sys.stderr)
    raise SystemExit(2) from None
setup_logging(_settings.log_level, _settings.log_format)
app = create_app(_settings)
