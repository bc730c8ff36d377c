"""hot sessions and approvals: the process a model credential names, remembered approval rules, permission prompts

Revision ID: 0007
Revises: 0006
Create Date: 2026-12-03 21:00:00
"""
from alembic import op
import sqlalchemy as sa
from sqlalchemy.dialects import postgresql

revision = '0007'
down_revision = '0006'
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.add_column('sessions', sa.Column('process_id', postgresql.UUID(as_uuid=True), nullable=True))
    op.add_column('sessions', sa.Column('approval_rules', postgresql.JSONB(astext_type=sa.Text()),
                                        server_default='[]', nullable=False))
    op.add_column('turns', sa.Column('process_id', postgresql.UUID(as_uuid=True), nullable=True))
    op.create_table(
        'approvals',
        sa.Column('id', postgresql.UUID(as_uuid=True), nullable=False),
        sa.Column('turn_id', postgresql.UUID(as_uuid=True), nullable=False),
        sa.Column('session_id', postgresql.UUID(as_uuid=True), nullable=False),
        sa.Column('request_id', sa.String(length=200), nullable=False),
        sa.Column('tool_name', sa.String(length=200), nullable=False),
        sa.Column('input', postgresql.JSONB(astext_type=sa.Text()), nullable=True),
        sa.Column('suggestions', postgresql.JSONB(astext_type=sa.Text()), nullable=True),
        sa.Column('status', sa.String(length=16), nullable=False),
        sa.Column('decision', postgresql.JSONB(astext_type=sa.Text()), nullable=True),
        sa.Column('decided_by', sa.String(length=255), nullable=True),
        sa.Column('deadline', sa.DateTime(timezone=True), nullable=True),
        sa.Column('created_at', sa.DateTime(timezone=True), nullable=False),
        sa.Column('resolved_at', sa.DateTime(timezone=True), nullable=True),
        sa.ForeignKeyConstraint(['session_id'], ['sessions.id'], name=op.f('fk_approvals_session_id_sessions'),
                                ondelete='CASCADE'),
        sa.ForeignKeyConstraint(['turn_id'], ['turns.id'], name=op.f('fk_approvals_turn_id_turns'),
                                ondelete='CASCADE'),
        sa.PrimaryKeyConstraint('id', name=op.f('pk_approvals')),
        sa.UniqueConstraint('turn_id', 'request_id', name=op.f('uq_approvals_turn_id')),
    )
    op.create_index(op.f('ix_approvals_session_id'), 'approvals', ['session_id'], unique=False)
    op.create_index(op.f('ix_approvals_status'), 'approvals', ['status'], unique=False)


def downgrade() -> None:
    op.drop_index(op.f('ix_approvals_status'), table_name='approvals')
    op.drop_index(op.f('ix_approvals_session_id'), table_name='approvals')
    op.drop_table('approvals')
    op.drop_column('turns', 'process_id')
    op.drop_column('sessions', 'approval_rules')
    op.drop_column('sessions', 'process_id')
