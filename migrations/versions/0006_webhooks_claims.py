"""webhook deliveries are claimed (attempt counter and claim expiry) before the POST, not locked during it

Revision ID: 0006
Revises: 0005
Create Date: 2026-12-03 18:00:00
"""
from alembic import op
import sqlalchemy as sa

revision = '0006'
down_revision = '0005'
branch_labels = None
depends_on = None


def upgrade() -> None:
    for table in ('turns', 'batches'):
        op.add_column(table, sa.Column('webhook_attempts', sa.Integer(), server_default='0', nullable=False))
        op.add_column(table, sa.Column('webhook_claimed_until', sa.DateTime(timezone=True), nullable=True))


def downgrade() -> None:
    for table in ('turns', 'batches'):
        op.drop_column(table, 'webhook_claimed_until')
        op.drop_column(table, 'webhook_attempts')
