"""Alembic migration scripts (run through storage/migrate.py, or `alembic` with `-x url=...`)."""
