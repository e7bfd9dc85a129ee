"""Conversation metadata and structured items: conversations.metadata; messages.item_type, call_id, name.

Revision ID: 0002
Revises: 0001
Create Date: 2026-11-30
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0002"
down_revision: str | None = "0001"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

MESSAGE_COLUMNS = ("item_type", "call_id", "name")


def upgrade() -> None:
    # nullable columns without defaults: a plain ADD COLUMN on SQLite, MySQL and MariaDB alike
    op.add_column("conversations", sa.Column("metadata", sa.Text(), nullable=True))
    op.add_column("messages", sa.Column("item_type", sa.String(24), nullable=True))
    op.add_column("messages", sa.Column("call_id", sa.String(64), nullable=True))
    op.add_column("messages", sa.Column("name", sa.String(128), nullable=True))


def downgrade() -> None:
    # batch mode: SQLite before 3.35 has no DROP COLUMN, so Alembic copies the table there
    with op.batch_alter_table("messages") as batch:
        for column in MESSAGE_COLUMNS:
            batch.drop_column(column)
    with op.batch_alter_table("conversations") as batch:
        batch.drop_column("metadata")
