"""Results whose scores hold NaN or an infinity become errors of their own.

A model with diverged weights once stored `[NaN, ...]`: SQLite keeps it as text
that is not JSON, so every read over the results (the review queue, exports)
failed for the whole database. Those results become `error` /
`non_finite_score`, their labels go, and the record is classified again by the
next run (an error result is always retried). PostgreSQL's JSON refuses such
values, so only SQLite can hold them. Going down changes nothing back: the
scores were never usable.

Revision ID: 0010
Revises: 0009
Create Date: 2026-12-06
"""

import sqlalchemy as sa
from alembic import op

revision = "0010"
down_revision = "0009"
branch_labels = None
depends_on = None

NON_FINITE = (
    "(CAST(results.scores AS TEXT) LIKE '%NaN%' OR CAST(results.scores AS TEXT) LIKE '%Infinity%')"
)


def upgrade() -> None:
    if op.get_bind().dialect.name != "sqlite":
        return
    op.execute(
        sa.text(
            "DELETE FROM labels WHERE EXISTS (SELECT 1 FROM results"
            " WHERE results.record_id = labels.record_id"
            f" AND results.model_version = labels.model_version AND {NON_FINITE})"
        )
    )
    op.execute(
        sa.text(
            "UPDATE results SET status = 'error', error_reason = 'non_finite_score',"
            " error_message = 'the model gave a score that is not a finite number"
            f" (NaN or infinite)', scores = NULL WHERE {NON_FINITE}"
        )
    )


def downgrade() -> None:
    pass
