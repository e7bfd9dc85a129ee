"""Persistence: API keys, usage accounting, server-side conversations (SQLAlchemy 2 async + Alembic).

`Storage` (runtime.py) is the entry point the server uses; the repositories are usable alone
(CLI, tests). MySQL 8 / MariaDB through asyncmy, SQLite through aiosqlite.
"""

from deepseek_serve.storage.runtime import Storage

__all__ = ["Storage"]
