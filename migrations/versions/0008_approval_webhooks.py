"""approval webhooks: an approval request is posted to its turn's webhook, claimed and retried as the turn's is

Revision ID: 0008
Revises: 0007
Create Date: 2026-12-04 10:00:00
"""
from alembic import op
import sqlalchemy as sa

revision = '0008'
down_revision = '0007'
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.add_column('approvals', sa.Column('webhook', sa.Text(), nullable=True))
    op.add_column('approvals', sa.Column('webhook_status', sa.String(length=16), nullable=True))
    op.add_column('approvals', sa.Column('webhook_attempts', sa.Integer(), server_default='0', nullable=False))
    op.add_column('approvals', sa.Column('webhook_claimed_until', sa.DateTime(timezone=True), nullable=True))


def downgrade() -> None:
    for column in ('webhook_claimed_until', 'webhook_attempts', 'webhook_status', 'webhook'):
        op.drop_column('approvals', column)
