"""a stable reason code on turns that did not succeed

Revision ID: 0004
Revises: 0003
Create Date: 2026-11-24 16:30:00
"""
from alembic import op
import sqlalchemy as sa

revision = '0004'
down_revision = '0003'
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.add_column('turns', sa.Column('reason', sa.String(length=40), nullable=True))


def downgrade() -> None:
    op.drop_column('turns', 'reason')
