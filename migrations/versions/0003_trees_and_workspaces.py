"""spawn trees (root_id) and named persistent workspaces

Revision ID: 0003
Revises: 0002
Create Date: 2026-11-24 10:00:00
"""
from alembic import op
import sqlalchemy as sa

revision = '0003'
down_revision = '0002'
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.add_column('sessions', sa.Column('root_id', sa.UUID(), nullable=True))
    op.create_index(op.f('ix_sessions_root_id'), 'sessions', ['root_id'], unique=False)
    # Sessions made before trees existed are roots of their own.
    op.execute("UPDATE sessions SET root_id = id WHERE root_id IS NULL")
    op.create_table('workspaces',
    sa.Column('owner', sa.String(length=255), nullable=False),
    sa.Column('name', sa.String(length=100), nullable=False),
    sa.Column('holder_id', sa.UUID(), nullable=True),
    sa.Column('claude_session_id', sa.UUID(), nullable=True),
    sa.Column('conversation_started', sa.Boolean(), nullable=False),
    sa.Column('generation', sa.Integer(), nullable=False),
    sa.Column('snapshot_key', sa.String(length=400), nullable=True),
    sa.Column('size_bytes', sa.BigInteger(), nullable=True),
    sa.Column('sha256', sa.String(length=64), nullable=True),
    sa.Column('saved_at', sa.DateTime(timezone=True), nullable=True),
    sa.Column('created_at', sa.DateTime(timezone=True), nullable=False),
    sa.PrimaryKeyConstraint('owner', 'name', name=op.f('pk_workspaces'))
    )


def downgrade() -> None:
    op.drop_table('workspaces')
    op.drop_index(op.f('ix_sessions_root_id'), table_name='sessions')
    op.drop_column('sessions', 'root_id')
