"""A fresh PostgreSQL database for a test or a benchmark, dropped after."""

from __future__ import annotations

import secrets
from contextlib import contextmanager
from typing import Iterator

__all__ = ["postgres_database"]


@contextmanager
def postgres_database(admin_url: str, prefix: str = "sv_test") -> Iterator[str]:
    """Create an empty database on the server of `admin_url` (a URL whose user
    may create databases) and yield its URL; drop it, with any connection still
    open to it, when the block ends."""
    import psycopg  # a dependency of streamvisor (the store's PostgreSQL backend)

    name = f"{prefix}_{secrets.token_hex(6)}"
    with psycopg.connect(admin_url, autocommit=True) as conn:
        conn.execute(f'CREATE DATABASE "{name}"')
    try:
        yield admin_url.rsplit("/", 1)[0] + f"/{name}"
    finally:
        with psycopg.connect(admin_url, autocommit=True) as conn:
            conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
