"""cancel, webhooks, batches, idempotency keys

Revision ID: 0002
Revises: 0001
Create Date: 2026-11-24 12:16:07.176734
"""
from alembic import op
import sqlalchemy as sa
from sqlalchemy.dialects import postgresql

revision = '0002'
down_revision = '0001'
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table('batches',
    sa.Column('id', sa.UUID(), nullable=False),
    sa.Column('owner', sa.String(length=255), nullable=False),
    sa.Column('status', sa.String(length=16), nullable=False),
    sa.Column('concurrency', sa.Integer(), nullable=False),
    sa.Column('total', sa.Integer(), nullable=False),
    sa.Column('webhook', sa.Text(), nullable=True),
    sa.Column('webhook_status', sa.String(length=16), nullable=True),
    sa.Column('created_at', sa.DateTime(timezone=True), nullable=False),
    sa.Column('finished_at', sa.DateTime(timezone=True), nullable=True),
    sa.PrimaryKeyConstraint('id', name=op.f('pk_batches'))
    )
    op.create_index(op.f('ix_batches_owner'), 'batches', ['owner'], unique=False)
    op.create_index(op.f('ix_batches_status'), 'batches', ['status'], unique=False)
    op.create_table('idempotency_keys',
    sa.Column('owner', sa.String(length=255), nullable=False),
    sa.Column('key', sa.String(length=255), nullable=False),
    sa.Column('fingerprint', sa.String(length=64), nullable=False),
    sa.Column('resource_type', sa.String(length=16), nullable=True),
    sa.Column('resource_id', sa.UUID(), nullable=True),
    sa.Column('status_code', sa.Integer(), nullable=True),
    sa.Column('created_at', sa.DateTime(timezone=True), nullable=False),
    sa.PrimaryKeyConstraint('owner', 'key', name=op.f('pk_idempotency_keys'))
    )
    op.create_index(op.f('ix_idempotency_keys_created_at'), 'idempotency_keys', ['created_at'], unique=False)
    op.create_table('batch_items',
    sa.Column('batch_id', sa.UUID(), nullable=False),
    sa.Column('index', sa.Integer(), nullable=False),
    sa.Column('custom_id', sa.String(length=255), nullable=True),
    sa.Column('prompt', sa.Text(), nullable=False),
    sa.Column('session_id', sa.UUID(), nullable=True),
    sa.Column('config', postgresql.JSONB(astext_type=sa.Text()), nullable=True),
    sa.Column('turn_id', sa.UUID(), nullable=True),
    sa.Column('status', sa.String(length=16), nullable=False),
    sa.Column('error', sa.Text(), nullable=True),
    sa.Column('finished_at', sa.DateTime(timezone=True), nullable=True),
    sa.ForeignKeyConstraint(['batch_id'], ['batches.id'], name=op.f('fk_batch_items_batch_id_batches'), ondelete='CASCADE'),
    sa.PrimaryKeyConstraint('batch_id', 'index', name=op.f('pk_batch_items'))
    )
    op.create_index('ix_batch_items_batch_status', 'batch_items', ['batch_id', 'status'], unique=False)
    op.create_index(op.f('ix_batch_items_turn_id'), 'batch_items', ['turn_id'], unique=False)
    op.add_column('turns', sa.Column('queued_event_id', sa.String(length=40), nullable=True))
    op.add_column('turns', sa.Column('cancel_requested_at', sa.DateTime(timezone=True), nullable=True))
    op.add_column('turns', sa.Column('webhook', sa.Text(), nullable=True))
    op.add_column('turns', sa.Column('webhook_status', sa.String(length=16), nullable=True))
    op.add_column('turns', sa.Column('batch_id', sa.UUID(), nullable=True))
    op.create_index(op.f('ix_turns_batch_id'), 'turns', ['batch_id'], unique=False)
    op.create_foreign_key(op.f('fk_turns_batch_id_batches'), 'turns', 'batches', ['batch_id'], ['id'], ondelete='SET NULL')


def downgrade() -> None:
    op.drop_constraint(op.f('fk_turns_batch_id_batches'), 'turns', type_='foreignkey')
    op.drop_index(op.f('ix_turns_batch_id'), table_name='turns')
    op.drop_column('turns', 'batch_id')
    op.drop_column('turns', 'webhook_status')
    op.drop_column('turns', 'webhook')
    op.drop_column('turns', 'cancel_requested_at')
    op.drop_column('turns', 'queued_event_id')
    op.drop_index(op.f('ix_batch_items_turn_id'), table_name='batch_items')
    op.drop_index('ix_batch_items_batch_status', table_name='batch_items')
    op.drop_table('batch_items')
    op.drop_index(op.f('ix_idempotency_keys_created_at'), table_name='idempotency_keys')
    op.drop_table('idempotency_keys')
    op.drop_index(op.f('ix_batches_status'), table_name='batches')
    op.drop_index(op.f('ix_batches_owner'), table_name='batches')
    op.drop_table('batches')
