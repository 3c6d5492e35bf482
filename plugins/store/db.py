"""The store's database: SQLite or PostgreSQL, behind one synchronous API that
the plugin calls from worker threads (`trio.to_thread`), never on the trio loop.

SQL is written once, with `?` placeholders, in the subset both databases accept
(upserts with ON CONFLICT, no RETURNING); for psycopg the placeholders become `%s`.

- SQLite: one connection per thread that uses it (WAL lets readers run beside
  the one writer), `synchronous = NORMAL`, a busy timeout.
- PostgreSQL: psycopg 3 with a `psycopg_pool.ConnectionPool`; every statement
  has a timeout, so a hung server cannot hold a worker thread for ever.
"""

from __future__ import annotations

import sqlite3
import threading
import time
import urllib.parse
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterable, Iterator, Sequence

import attrs

from .schema import LATEST, MIGRATIONS


class StoreUnavailable(Exception):
    """The database cannot be reached or refused the work."""


class Conflict(StoreUnavailable):
    """A write broke a unique index (another record has that lookup). A
    `StoreUnavailable` too, so that a writer's batch treats it as any failure."""


@attrs.frozen
class Target:
    """Where the store lives, parsed from its `url`."""

    dialect: str  # "sqlite" or "postgres"
    #: The database file (SQLite) or the conninfo URL (PostgreSQL).
    location: str

    @property
    def shown(self) -> str:
        """The URL with any password masked, for logs and status."""
        if self.dialect == "sqlite":
            return f"sqlite:///{self.location}"
        parts = urllib.parse.urlsplit(self.location)
        if parts.password:
            return self.location.replace(f":{parts.password}@", ":***@", 1)
        return self.location


def parse_url(url: str, config_source: str) -> Target:
    """`sqlite:///relative/path.db` (relative to the folder of plugins.toml, the
    file `config_source` names; to the working directory for a config made
    from the command line), `sqlite:////absolute/path.db`, or `postgresql://...`."""
    if url.startswith("sqlite:///"):
        source = Path(config_source)
        base = (source.parent if source.suffix == ".toml" else Path.cwd()).resolve()
        path = url.removeprefix("sqlite:///")
        if not path:
            raise ValueError("a sqlite URL names a file: sqlite:///data/streamvisor.db")
        file = Path(path) if path.startswith("/") else base / path
        return Target("sqlite", str(file))
    if url.startswith(("postgresql://", "postgres://")):
        return Target("postgres", url)
    raise ValueError(f"the url must start with sqlite:/// or postgresql://, got {url[:40]!r}")


class Database:
    """Connections and transactions. Thread-safe: any worker thread may call it."""

    def __init__(self, target: Target, *, pool_size: int = 4, timeout: float = 5.0, statement_timeout: float = 10.0) -> None:
        self.target = target
        self.dialect = target.dialect
        self.timeout = timeout
        self.statement_timeout = statement_timeout
        self.pool_size = pool_size
        self._pool: Any = None
        self._local = threading.local()
        self._sqlite_conns: list[sqlite3.Connection] = []
        self._lock = threading.Lock()
        self._closed = False

    # -- connections -------------------------------------------------------------

    def open(self) -> None:
        """Connect, or raise `StoreUnavailable` saying why."""
        if self.dialect == "sqlite":
            folder = Path(self.target.location).parent
            try:
                folder.mkdir(parents=True, exist_ok=True)
                with self.connection() as conn:
                    conn.execute("SELECT 1")
            except (OSError, sqlite3.Error) as exc:
                raise StoreUnavailable(f"cannot open {self.target.location}: {exc}") from None
            return
        try:
            import psycopg_pool
        except ImportError:  # pragma: no cover - a dependency
            raise StoreUnavailable("PostgreSQL needs psycopg and psycopg_pool (pip install 'psycopg[binary]' psycopg_pool)") from None
        options = f"-c statement_timeout={int(self.statement_timeout * 1000)}"
        self._pool = psycopg_pool.ConnectionPool(
            self.target.location,
            min_size=1,
            max_size=self.pool_size,
            open=False,
            timeout=self.timeout,
            kwargs={"connect_timeout": max(1, int(self.timeout)), "options": options},
            name="streamvisor-store",
        )
        try:
            self._pool.open(wait=True, timeout=self.timeout)
        except Exception as exc:
            self._pool.close()
            self._pool = None
            raise StoreUnavailable(f"cannot connect to {self.target.shown}: {_reason(exc)}") from None

    def close(self) -> None:
        self._closed = True
        if self._pool is not None:
            self._pool.close()
        with self._lock:
            conns, self._sqlite_conns = self._sqlite_conns, []
        for conn in conns:
            try:
                conn.close()
            except sqlite3.Error:
                pass

    def _sqlite(self) -> sqlite3.Connection:
        conn = getattr(self._local, "conn", None)
        if conn is None:
            conn = sqlite3.connect(self.target.location, timeout=self.timeout, isolation_level=None, check_same_thread=False)
            conn.execute("PRAGMA journal_mode=WAL")
            conn.execute("PRAGMA synchronous=NORMAL")
            self._local.conn = conn
            with self._lock:
                self._sqlite_conns.append(conn)
        return conn

    @contextmanager
    def connection(self, write: bool = True) -> Iterator["Conn"]:
        """A connection in a transaction, committed when the block ends (rolled
        back when it raises). Database errors become `StoreUnavailable`. A read
        (`write=False`) on SQLite takes no write lock."""
        if self._closed:
            raise StoreUnavailable("the store is closed")
        try:
            if self.dialect == "sqlite":
                raw = self._sqlite()
                raw.execute("BEGIN IMMEDIATE" if write else "BEGIN")
                try:
                    yield Conn(raw, "sqlite")
                except BaseException:
                    raw.execute("ROLLBACK")
                    raise
                raw.execute("COMMIT")
            else:
                assert self._pool is not None
                with self._pool.connection(timeout=self.timeout) as raw:
                    with raw.transaction():
                        yield Conn(raw, "postgres")
        except StoreUnavailable:
            raise
        except Exception as exc:
            if _is_db_error(exc):
                raise (Conflict if _is_unique_violation(exc) else StoreUnavailable)(_reason(exc)) from exc
            raise

    # -- migrations ----------------------------------------------------------------

    def migrate(self) -> list[int]:
        """Run the migrations not yet applied, each in its own transaction.
        Returns the versions applied now."""
        applied: list[int] = []
        with self.connection() as conn:
            if self.dialect == "postgres":
                # Even CREATE TABLE IF NOT EXISTS fails in one of two processes
                # that run it at once on a fresh database (a unique violation in
                # pg_type): the workers of `serve --workers N` start together.
                conn.execute("SELECT pg_advisory_xact_lock(7361829)")
            conn.execute(
                "CREATE TABLE IF NOT EXISTS schema_migrations (version BIGINT PRIMARY KEY, description TEXT NOT NULL, applied_at DOUBLE PRECISION NOT NULL)"
            )
        for version, description, statements in MIGRATIONS:
            with self.connection() as conn:
                if self.dialect == "postgres":
                    # Two processes starting at once: one migrates, the other waits.
                    conn.execute("SELECT pg_advisory_xact_lock(7361829)")
                if conn.one("SELECT version FROM schema_migrations WHERE version = ?", (version,)) is not None:
                    continue
                for statement in statements:
                    conn.execute(statement)
                conn.execute("INSERT INTO schema_migrations (version, description, applied_at) VALUES (?, ?, ?)", (version, description, time.time()))
                applied.append(version)
        return applied

    def status(self) -> dict[str, Any]:
        with self.connection(write=False) as conn:
            exists = conn.one(
                "SELECT 1 FROM sqlite_master WHERE type = 'table' AND name = 'schema_migrations'"
                if self.dialect == "sqlite"
                else "SELECT 1 FROM information_schema.tables WHERE table_name = 'schema_migrations' AND table_schema = current_schema()"
            )
            rows = conn.all("SELECT version, description, applied_at FROM schema_migrations ORDER BY version") if exists else []
        done = {int(r[0]) for r in rows}
        return {
            "url": self.target.shown,
            "current": max(done) if done else 0,
            "latest": LATEST,
            "applied": [{"version": int(r[0]), "description": r[1], "applied_at": r[2]} for r in rows],
            "pending": [{"version": v, "description": d} for v, d, _ in MIGRATIONS if v not in done],
        }

    def ping(self) -> None:
        with self.connection(write=False) as conn:
            conn.one("SELECT 1")


class Conn:
    """A connection inside a transaction, with `?` placeholders for both databases."""

    __slots__ = ("raw", "dialect")

    def __init__(self, raw: Any, dialect: str) -> None:
        self.raw = raw
        self.dialect = dialect

    def _sql(self, sql: str) -> str:
        return sql if self.dialect == "sqlite" else sql.replace("?", "%s")

    def execute(self, sql: str, params: Sequence[Any] = ()) -> Any:
        return self.raw.execute(self._sql(sql), params)

    def many(self, sql: str, rows: Iterable[Sequence[Any]]) -> None:
        rows = list(rows)
        if not rows:
            return
        if self.dialect == "sqlite":
            self.raw.executemany(sql, rows)
        else:
            with self.raw.cursor() as cur:
                cur.executemany(self._sql(sql), rows)

    def one(self, sql: str, params: Sequence[Any] = ()) -> Any:
        return self.execute(sql, params).fetchone()

    def all(self, sql: str, params: Sequence[Any] = ()) -> list[Any]:
        return list(self.execute(sql, params).fetchall())


def _is_db_error(exc: BaseException) -> bool:
    if isinstance(exc, sqlite3.Error):
        return True
    module = type(exc).__module__
    return module.startswith(("psycopg", "psycopg_pool"))


def _is_unique_violation(exc: BaseException) -> bool:
    if isinstance(exc, sqlite3.IntegrityError):
        return "UNIQUE" in str(exc)
    return getattr(exc, "sqlstate", None) == "23505"


def _reason(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {text[0] if text else ''}".rstrip(": ")
