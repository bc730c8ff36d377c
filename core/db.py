"""Database plumbing: one engine per process, sessions per request or task step, migrations."""
from __future__ import annotations

from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

from sqlalchemy import create_engine, text
from sqlalchemy.engine import Engine, make_url
from sqlalchemy.orm import Session as DbSession, sessionmaker

from core.settings import Settings

MIGRATIONS_DIR = Path(__file__).resolve().parent.parent / "migrations"


# While Postgres is down or unreachable a request fails fast with a 503 instead of hanging:
# connecting gives up after CONNECT_TIMEOUT_SECONDS, waiting for a pooled connection after POOL_TIMEOUT_SECONDS.
CONNECT_TIMEOUT_SECONDS = 5
POOL_TIMEOUT_SECONDS = 10


def make_engine(settings: Settings) -> Engine:
    """The process's engine; pre-ping so a restarted Postgres costs one retry, not an error."""
    # hide_parameters: a failed statement's text names its parameters, and those hold prompts; errors get logged.
    return create_engine(settings.database_url, pool_pre_ping=True, pool_size=5, max_overflow=10,
                         pool_timeout=POOL_TIMEOUT_SECONDS, hide_parameters=True,
                         connect_args={"connect_timeout": CONNECT_TIMEOUT_SECONDS})


def make_session_factory(engine: Engine) -> sessionmaker[DbSession]:
    return sessionmaker(engine, expire_on_commit=False)


@contextmanager
def transaction(factory: sessionmaker[DbSession]) -> Iterator[DbSession]:
    """One unit of work: commits on success, rolls back on error, always closes."""
    with factory() as db:
        with db.begin():
            yield db


def create_database_if_missing(database_url: str) -> bool:
    """Creates the configured database when the server has none by that name; True if it did."""
    url = make_url(database_url)
    admin = create_engine(url.set(database="postgres"), isolation_level="AUTOCOMMIT")
    try:
        with admin.connect() as conn:
            exists = conn.execute(text("SELECT 1 FROM pg_database WHERE datname = :n"),
                                  {"n": url.database}).scalar()
            if not exists:
                conn.exec_driver_sql(f'CREATE DATABASE "{url.database}"')
            return not exists
    finally:
        admin.dispose()


def alembic_config(database_url: str):
    """An Alembic config pointing at migrations/, for code and for `alembic` alike."""
    from alembic.config import Config

    cfg = Config(str(MIGRATIONS_DIR / "alembic.ini"))
    cfg.set_main_option("script_location", str(MIGRATIONS_DIR))
    cfg.set_main_option("sqlalchemy.url", database_url.replace("%", "%%"))
    return cfg


def migrate(database_url: str) -> None:
    """Brings the schema to the newest migration."""
    from alembic import command

    command.upgrade(alembic_config(database_url), "head")
