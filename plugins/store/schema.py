"""The store's schema, as numbered migrations.

Each migration is a list of statements that both SQLite and PostgreSQL accept:
TEXT, BIGINT, SMALLINT (0/1 for flags) and DOUBLE PRECISION columns, JSON kept as
TEXT, no foreign keys (a batch of chunks may be written before its session row
when the row's write was retried). `schema_migrations` records what ran; start-up
runs what is missing, and `streamvisor db upgrade` does the same by hand.
"""

from __future__ import annotations

#: (version, what it does, statements)
MIGRATIONS: list[tuple[int, str, list[str]]] = [
    (
        1,
        "sessions, chunks, usage records and tombstones",
        [
            """CREATE TABLE sessions (
                id TEXT PRIMARY KEY,
                request_id TEXT NOT NULL,
                identity TEXT NOT NULL,
                model TEXT NOT NULL,
                provider TEXT NOT NULL,
                state TEXT NOT NULL,
                owner TEXT NOT NULL,
                background SMALLINT NOT NULL DEFAULT 0,
                include_usage SMALLINT NOT NULL DEFAULT 0,
                created_at DOUBLE PRECISION NOT NULL,
                updated_at DOUBLE PRECISION NOT NULL,
                finished_at DOUBLE PRECISION,
                started_ms DOUBLE PRECISION,
                first_token_ms DOUBLE PRECISION,
                duration_ms DOUBLE PRECISION,
                finish_reason TEXT,
                error TEXT,
                chunk_count BIGINT NOT NULL DEFAULT 0,
                output_chars BIGINT NOT NULL DEFAULT 0,
                prompt_estimate BIGINT NOT NULL DEFAULT 0,
                prompt_tokens BIGINT,
                completion_tokens BIGINT,
                reasoning_tokens BIGINT,
                usage_exact SMALLINT,
                transcript TEXT NOT NULL DEFAULT 'kept',
                request TEXT
            )""",
            "CREATE INDEX sessions_created ON sessions (created_at, id)",
            # Partial: only live rows are in it, so a session costs it an insert
            # and a delete, and recovery at start-up finds its rows at once.
            "CREATE INDEX sessions_live ON sessions (owner) WHERE state IN ('pending', 'running')",
            """CREATE TABLE chunks (
                session_id TEXT NOT NULL,
                seq BIGINT NOT NULL,
                count INTEGER NOT NULL,
                data TEXT NOT NULL,
                PRIMARY KEY (session_id, seq)
            )""",
            """CREATE TABLE usage_records (
                session_id TEXT PRIMARY KEY,
                request_id TEXT NOT NULL,
                model TEXT NOT NULL,
                provider TEXT NOT NULL,
                identity TEXT NOT NULL,
                outcome TEXT NOT NULL,
                finished_at DOUBLE PRECISION NOT NULL,
                prompt_tokens BIGINT NOT NULL,
                completion_tokens BIGINT NOT NULL,
                reasoning_tokens BIGINT NOT NULL,
                duration_ms DOUBLE PRECISION NOT NULL,
                first_token_ms DOUBLE PRECISION,
                exact SMALLINT NOT NULL
            )""",
            "CREATE INDEX usage_finished ON usage_records (finished_at)",
            "CREATE INDEX usage_identity ON usage_records (identity, finished_at)",
            """CREATE TABLE tombstones (
                session_id TEXT PRIMARY KEY,
                reason TEXT NOT NULL,
                at DOUBLE PRECISION NOT NULL
            )""",
            "CREATE INDEX tombstones_at ON tombstones (at)",
        ],
    ),
    (
        2,
        "teams and costs; records and amounts for other plugins",
        [
            # One column per statement: SQLite adds one at a time.
            *(
                f"ALTER TABLE {table} ADD COLUMN {column}"
                for table in ("sessions", "usage_records")
                for column in ("team TEXT", "key_id TEXT", "cost_usd DOUBLE PRECISION", "cached_tokens BIGINT")
            ),
            # A team admin's usage: its team's records in a window.
            "CREATE INDEX usage_team ON usage_records (team, finished_at)",
            # RecordStore: small JSON records of other plugins (API keys, say), and
            # running amounts (their spend) that every instance adds to atomically.
            """CREATE TABLE records (
                kind TEXT NOT NULL,
                id TEXT NOT NULL,
                lookup TEXT,
                data TEXT NOT NULL,
                updated_at DOUBLE PRECISION NOT NULL,
                PRIMARY KEY (kind, id)
            )""",
            # Unique among the records that have one (NULLs are distinct in both).
            "CREATE UNIQUE INDEX records_lookup ON records (kind, lookup)",
            """CREATE TABLE amounts (
                kind TEXT NOT NULL,
                id TEXT NOT NULL,
                period TEXT NOT NULL,
                amount DOUBLE PRECISION NOT NULL,
                PRIMARY KEY (kind, id, period)
            )""",
        ],
    ),
    (
        3,
        "the outbox: other plugins' durable work items (contract 1.5)",
        [
            """CREATE TABLE outbox (
                queue TEXT NOT NULL,
                id TEXT NOT NULL,
                state TEXT NOT NULL,
                due_at DOUBLE PRECISION NOT NULL,
                lease_owner TEXT,
                lease_until DOUBLE PRECISION,
                data TEXT NOT NULL,
                created_at DOUBLE PRECISION NOT NULL,
                updated_at DOUBLE PRECISION NOT NULL,
                PRIMARY KEY (queue, id)
            )""",
            # Partial: a worker's claim scans only what is waiting.
            "CREATE INDEX outbox_due ON outbox (queue, due_at) WHERE state = 'pending'",
            "CREATE INDEX outbox_created ON outbox (queue, created_at, id)",
            # Retention purges finished items by age.
            "CREATE INDEX outbox_updated ON outbox (updated_at) WHERE state <> 'pending'",
        ],
    ),
]

LATEST = MIGRATIONS[-1][0]
