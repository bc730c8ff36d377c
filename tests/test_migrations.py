"""Migrations: one head, and the migrated schema matches the models."""
from alembic.autogenerate import compare_metadata
from alembic.migration import MigrationContext
from alembic.script import ScriptDirectory
from sqlalchemy import create_engine

from core.db import alembic_config
from core.models import Base


def test_there_is_exactly_one_head(settings):
    heads = ScriptDirectory.from_config(alembic_config(settings.database_url)).get_heads()
    assert len(heads) == 1, heads


def test_migrated_database_matches_the_models(settings):
    engine = create_engine(settings.database_url)
    with engine.connect() as conn:
        diff = compare_metadata(MigrationContext.configure(conn), Base.metadata)
    engine.dispose()
    assert diff == [], f"models and migrations differ; add a migration: {diff}"
