"""`python -m core.migrate`: creates the configured database if missing and applies every migration."""
from __future__ import annotations

import sys

from core.db import create_database_if_missing, migrate
from core.errors import ConfigError
from core.settings import Settings


def prepare_database(database_url: str) -> bool:
    """Creates (if needed) and migrates the database; True when it had to be created."""
    created = create_database_if_missing(database_url)
    migrate(database_url)
    return created


def main() -> int:
    try:
        settings = Settings.from_env()
    except ConfigError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    created = prepare_database(settings.database_url)
    print(f"database {'created and ' if created else ''}migrated to the newest revision")
    return 0


if __name__ == "__main__":
    sys.exit(main())
