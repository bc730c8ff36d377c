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


def test_a_forged_negative_cost_from_before_metering_leaves_no_room_in_a_budget(settings):
    """A turn recorded before 0005 with a forged -1000 (Claude Code's result line, which the agent can write) counts
    as nothing after the upgrade, and its session's total is summed again from its turns."""
    import uuid

    from alembic import command
    from sqlalchemy import text

    from core.db import create_database_if_missing
    from tests import stack

    url = settings.database_url.rsplit("/", 1)[0] + f"/ccd_mig_{uuid.uuid4().hex[:8]}"
    create_database_if_missing(url)
    try:
        cfg = alembic_config(url)
        command.upgrade(cfg, "0004")
        engine = create_engine(url)
        sid, forged, real = uuid.uuid4(), uuid.uuid4(), uuid.uuid4()
        with engine.begin() as conn:
            insert(conn, "sessions", id=sid, cost_usd=-999.5, root_id=sid)
            insert(conn, "turns", id=forged, session_id=sid, seq=1, cost_usd=-1000)
            insert(conn, "turns", id=real, session_id=sid, seq=2, cost_usd=0.5)
        command.upgrade(cfg, "head")
        with engine.connect() as conn:
            costs = dict(conn.execute(text("SELECT id, cost_usd FROM turns")).all())
            total = conn.execute(text("SELECT cost_usd FROM sessions WHERE id = :id"), {"id": sid}).scalar()
        engine.dispose()
        assert (costs[forged], costs[real], total) == (0, 0.5, 0.5), (costs, total)
    finally:
        stack.drop_database(url)


def insert(conn, table: str, **values) -> None:
    """A row with these values and a plain value in every other column that must have one."""
    from sqlalchemy import text

    plain = {"uuid": "00000000-0000-0000-0000-000000000000", "jsonb": "{}", "boolean": False, "text": "x",
             "character varying": "x", "integer": 0, "bigint": 0, "numeric": 0, "timestamp with time zone": "now()"}
    required = conn.execute(text("SELECT column_name, data_type FROM information_schema.columns WHERE table_name = :t "
                                 "AND is_nullable = 'NO' AND column_default IS NULL"), {"t": table}).all()
    row = {name: plain[kind] for name, kind in required if name not in values}
    row.update(values)
    names = ", ".join(row)
    conn.execute(text(f"INSERT INTO {table} ({names}) VALUES ({', '.join(':' + n for n in row)})"), row)
