"""metered spend on turns: cost_usd is what the model proxy metered, reported_cost_usd what Claude Code printed

Revision ID: 0005
Revises: 0004
Create Date: 2026-12-03 18:00:00
"""
from alembic import op
import sqlalchemy as sa
from sqlalchemy.dialects import postgresql

revision = '0005'
down_revision = '0004'
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.alter_column('turns', 'cost_usd', new_column_name='reported_cost_usd')
    op.add_column('turns', sa.Column('cost_usd', sa.Numeric(precision=14, scale=6), nullable=False,
                                     server_default='0'))
    op.add_column('turns', sa.Column('metered_usage', postgresql.JSONB(astext_type=sa.Text()), nullable=True))
    # Turns from before metering have only the figure Claude Code printed. A negative one was forged (the agent
    # can write that line): it counts as nothing, and the sessions' totals are summed again from what stands, so
    # an old forgery leaves no room in a budget.
    op.execute("UPDATE turns SET cost_usd = GREATEST(reported_cost_usd, 0) WHERE reported_cost_usd IS NOT NULL")
    op.execute("UPDATE sessions SET cost_usd = COALESCE((SELECT SUM(t.cost_usd) FROM turns t "
               "WHERE t.session_id = sessions.id), 0)")


def downgrade() -> None:
    op.drop_column('turns', 'metered_usage')
    op.drop_column('turns', 'cost_usd')
    op.alter_column('turns', 'reported_cost_usd', new_column_name='cost_usd')
