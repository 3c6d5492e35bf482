"""What the store writes and reads, as functions of a `Conn` (one transaction).

Every write is idempotent (INSERT ... ON CONFLICT), so a batch that failed can be
written again whole without duplicating a chunk or a usage record.
"""

from __future__ import annotations

import json
from typing import Any, Callable, Sequence

import orjson

from streamvisor.hooks import LIVE_STATES, Delta, QueuedItem, SessionQuery, StoredSession, Usage, UsageRow, delta_from_json, deltas_to_json

from .db import Conn


# -- the writes ------------------------------------------------------------------------


def encode_deltas(deltas: Sequence[Delta]) -> str:
    """A batch of deltas as the JSON text of a chunk row (`deltas_to_json`)."""
    return deltas_to_json(deltas).decode()


#: The columns of a session row, in the order of the tuples the plugin builds.
ROW_COLUMNS = (
    "id", "request_id", "identity", "model", "provider", "state", "owner", "background", "include_usage", "created_at", "updated_at",
    "finished_at", "started_ms", "first_token_ms", "duration_ms", "finish_reason", "error", "chunk_count", "output_chars",
    "prompt_estimate", "prompt_tokens", "completion_tokens", "reasoning_tokens", "usage_exact", "transcript", "request",
    "team", "cost_usd", "cached_tokens", "key_id",
)
#: What an upsert changes of a stored row: a state already final stays (a late
#: snapshot never revives a session), the request only when given.
_ROW_UPDATE = ", ".join(
    [
        "state = CASE WHEN sessions.state IN ('pending', 'running') THEN excluded.state ELSE sessions.state END",
        *(f"{c} = excluded.{c}" for c in (
            "updated_at", "finished_at", "started_ms", "first_token_ms", "duration_ms", "finish_reason", "error", "chunk_count",
            "output_chars", "prompt_tokens", "completion_tokens", "reasoning_tokens", "usage_exact", "cost_usd", "cached_tokens",
        )),
        "request = COALESCE(excluded.request, sessions.request)",
    ]
)
#: The columns of a usage record, in the order of the plugin's tuples.
USAGE_COLUMNS = (
    "session_id", "request_id", "model", "provider", "identity", "outcome", "finished_at", "prompt_tokens", "completion_tokens",
    "reasoning_tokens", "duration_ms", "first_token_ms", "exact", "team", "cost_usd", "cached_tokens", "key_id",
)
#: SQLite: rows per multi-row statement, largest first. A batch is written in
#: groups of these sizes, so each table has three statement texts, prepared
#: once and then reused from sqlite3's statement cache.
_GROUPS = (32, 8, 1)

def _insert_many(conn: Conn, table: str, columns: Sequence[str], rows: Sequence[Sequence[Any]], tail: str = "") -> None:
    """Insert many rows with few statements, whose text does not depend on the
    number of rows.

    - SQLite: multi-row VALUES in groups of `_GROUPS`. Each statement's step
      releases and retakes the GIL (and the trio thread waits for it); a row
      within a statement does not.
    - PostgreSQL: a one-row statement run for every row by psycopg's
      executemany, in one pipeline (one round trip). Its text is parsed once
      and prepared on its fifth use; psycopg never caches a statement of more
      than 50 parameters, so multi-row VALUES would be parsed in Python every
      time (measured: 2 to 4 times the client's CPU), and `unnest` of one array
      per column cost as much as executemany.
    """
    if not rows:
        return
    head = f"INSERT INTO {table} ({', '.join(columns)})"
    placeholders = "(" + ", ".join("?" * len(columns)) + ")"
    if conn.dialect == "postgres":
        conn.many(f"{head} VALUES {placeholders} {tail}", rows)
        return
    start, total = 0, len(rows)
    for size in _GROUPS:
        if total - start < size:
            continue
        sql = f"{head} VALUES {', '.join([placeholders] * size)} {tail}"
        while total - start >= size:
            part = rows[start : start + size]
            conn.execute(sql, [value for row in part for value in row])
            start += size


def write(
    conn: Conn, sessions: Sequence[Sequence[Any]], chunks: Sequence[Sequence[Any]], records: Sequence[Sequence[Any]], outbox: Sequence[Sequence[Any]] = ()
) -> None:
    """Write a batch in three multi-row statements, whatever its size: session
    rows (`ROW_COLUMNS`, upserted), chunk batches (session, first offset,
    count, `encode_deltas`) and usage records (`USAGE_COLUMNS`); and the outbox
    items of the sessions that ended (`OUTBOX_COLUMNS`), in the same
    transaction. The rows are made by the caller, on the trio thread: here only
    the database works."""
    _insert_many(conn, "sessions", ROW_COLUMNS, sessions, f"ON CONFLICT (id) DO UPDATE SET {_ROW_UPDATE}")
    _insert_many(conn, "chunks", ("session_id", "seq", "count", "data"), chunks, "ON CONFLICT (session_id, seq) DO NOTHING")
    _insert_many(conn, "usage_records", USAGE_COLUMNS, records, "ON CONFLICT (session_id) DO NOTHING")
    if outbox:
        _insert_many(conn, "outbox", OUTBOX_COLUMNS, outbox, "ON CONFLICT (queue, id) DO NOTHING")


def recover(conn: Conn, owner: str, *, every_run: bool = False, outbox: Callable[[StoredSession, float], list[tuple[Any, ...]]] | None = None) -> list[str]:
    """Mark the sessions of `owner` (a `Runtime.instance_id`) that were live
    when its process died `interrupted`, keeping the output they reached, and
    record their usage: the counts they had, else estimates (never exact: the
    stream was cut). With `every_run`, `owner` is an instance *name*, and the
    sessions of every earlier run of it count (start-up: its own). `outbox`
    gives the outbox rows of each interrupted session, written with it."""
    if every_run:
        # The name alone (rows from before contract 1.3), or the name, "@" and a tag.
        where, args = "(owner = ? OR (owner > ? AND owner < ?))", (owner, owner + "@", owner + "A")
    else:
        where, args = "owner = ?", (owner,)
    ids = [row[0] for row in conn.all(f"SELECT id FROM sessions WHERE state IN ('pending', 'running') AND {where}", args)]
    for session_id in ids:
        conn.execute(
            "UPDATE sessions SET state = 'interrupted', finished_at = updated_at, duration_ms = (updated_at - created_at) * 1000,"
            " prompt_tokens = COALESCE(prompt_tokens, prompt_estimate),"
            " completion_tokens = CASE WHEN completion_tokens IS NULL OR completion_tokens * 4 < output_chars THEN (output_chars + 3) / 4 ELSE completion_tokens END,"
            " reasoning_tokens = COALESCE(reasoning_tokens, 0), usage_exact = 0 WHERE id = ? AND state IN ('pending', 'running')",
            (session_id,),
        )
        conn.execute(
            "INSERT INTO usage_records (session_id, request_id, model, provider, identity, outcome, finished_at, prompt_tokens, completion_tokens,"
            " reasoning_tokens, duration_ms, first_token_ms, exact, team, cost_usd, cached_tokens, key_id) SELECT id, request_id, model, provider,"
            " identity, 'interrupted', finished_at, prompt_tokens, completion_tokens, reasoning_tokens, duration_ms, first_token_ms, 0, team,"
            " cost_usd, cached_tokens, key_id FROM sessions WHERE id = ?"
            " ON CONFLICT (session_id) DO NOTHING",
            (session_id,),
        )
        if outbox is not None:
            stored = get(conn, session_id)
            if stored is not None:
                row = conn.one("SELECT finished_at FROM sessions WHERE id = ?", (session_id,))
                _insert_many(conn, "outbox", OUTBOX_COLUMNS, outbox(stored, float(row[0])), "ON CONFLICT (queue, id) DO NOTHING")
    return ids


# -- the reads ---------------------------------------------------------------------------

_SESSION_COLUMNS = (
    "id, request_id, identity, model, provider, state, created_at, finish_reason, error, chunk_count, started_ms, first_token_ms,"
    " duration_ms, prompt_tokens, completion_tokens, reasoning_tokens, usage_exact, background, include_usage, transcript, updated_at,"
    " team, cost_usd, cached_tokens, key_id"
)


def _stored(row: Sequence[Any]) -> StoredSession:
    (
        session_id, request_id, identity, model, provider, state, created_at, finish_reason, error, chunk_count, started_ms,
        first_token_ms, duration_ms, prompt_tokens, completion_tokens, reasoning_tokens, usage_exact, background, include_usage,
        transcript, updated_at, team, cost_usd, cached_tokens, key_id,
    ) = row
    usage = None
    if prompt_tokens is not None or completion_tokens is not None:
        usage = Usage(
            int(prompt_tokens or 0),
            int(completion_tokens or 0),
            int(reasoning_tokens or 0),
            exact=bool(usage_exact),
            cached_tokens=int(cached_tokens or 0),
            cost_usd=None if cost_usd is None else float(cost_usd),
        )
    if duration_ms is None:
        duration_ms = round((updated_at - created_at) * 1000, 3)
    return StoredSession(
        id=session_id,
        request_id=request_id,
        identity=identity,
        model=model,
        provider=provider,
        state=state,
        created_at=float(created_at),
        finish_reason=finish_reason,
        usage=usage,
        error=None if error is None else json.loads(error),
        chunks=int(chunk_count),
        timings={
            "started_ms": started_ms,
            "first_token_ms": first_token_ms,
            "finished_ms": duration_ms if state not in LIVE_STATES else None,
            "duration_ms": duration_ms,
        },
        background=bool(background),
        include_usage=bool(include_usage),
        transcript=transcript,
        team=team,
        key_id=key_id,
    )


def get(conn: Conn, session_id: str) -> StoredSession | None:
    row = conn.one(f"SELECT {_SESSION_COLUMNS} FROM sessions WHERE id = ?", (session_id,))
    return None if row is None else _stored(row)


def request_of(conn: Conn, session_id: str) -> dict[str, Any] | None:
    row = conn.one("SELECT request FROM sessions WHERE id = ?", (session_id,))
    return None if row is None or row[0] is None else orjson.loads(row[0])


def gone(conn: Conn, session_id: str) -> str | None:
    row = conn.one("SELECT reason FROM tombstones WHERE session_id = ?", (session_id,))
    return None if row is None else row[0]


def chunks(conn: Conn, session_id: str, start: int, limit: int) -> list[Delta]:
    rows = conn.all(
        "SELECT seq, count, data FROM chunks WHERE session_id = ? AND seq < ? AND seq + count > ? ORDER BY seq",
        (session_id, start + limit, start),
    )
    out: list[Delta] = []
    expected = start
    for seq, count, data in rows:
        deltas = orjson.loads(data)
        if seq > expected:
            break  # a gap (a batch not written yet): stop before it
        skip = expected - seq
        for item in deltas[skip:]:
            out.append(delta_from_json(item))
        expected = seq + count
    return out[:limit]


def _where(equal: Sequence[tuple[str, Any]], time_column: str, since: float | None, until: float | None) -> tuple[list[str], list[Any]]:
    """The conditions of a filtered read, and their parameters: each column
    of `equal` whose value is not None, and `since <= time_column < until`."""
    where: list[str] = []
    params: list[Any] = []
    for column, value in equal:
        if value is not None:
            where.append(f"{column} = ?")
            params.append(value)
    if since is not None:
        where.append(f"{time_column} >= ?")
        params.append(since)
    if until is not None:
        where.append(f"{time_column} < ?")
        params.append(until)
    return where, params


def _clause(where: list[str]) -> str:
    return f" WHERE {' AND '.join(where)}" if where else ""


def sessions(conn: Conn, query: SessionQuery) -> list[StoredSession]:
    where, params = _where(
        (("state", query.state), ("model", query.model), ("identity", query.identity), ("team", query.team)), "created_at", query.since, query.until
    )
    if query.after is not None:
        at, session_id = query.after
        where.append("(created_at < ? OR (created_at = ? AND id < ?))")
        params.extend((at, at, session_id))
    rows = conn.all(f"SELECT {_SESSION_COLUMNS} FROM sessions{_clause(where)} ORDER BY created_at DESC, id DESC LIMIT ?", (*params, query.limit))
    return [_stored(row) for row in rows]


def delete(conn: Conn, session_id: str, at: float, known: bool = False) -> bool:
    """Delete a session's rows and leave a tombstone (later reads answer 410),
    when there was something to delete or the caller `known`s the session."""
    found = conn.one("SELECT 1 FROM sessions WHERE id = ?", (session_id,)) is not None
    found = conn.one("SELECT 1 FROM usage_records WHERE session_id = ?", (session_id,)) is not None or found
    if not (found or known):
        return False
    conn.execute("DELETE FROM chunks WHERE session_id = ?", (session_id,))
    conn.execute("DELETE FROM usage_records WHERE session_id = ?", (session_id,))
    conn.execute("DELETE FROM sessions WHERE id = ?", (session_id,))
    conn.execute(
        "INSERT INTO tombstones (session_id, reason, at) VALUES (?, 'deleted', ?) ON CONFLICT (session_id) DO UPDATE SET reason = excluded.reason, at = excluded.at",
        (session_id, at),
    )
    return found


def _usage_where(
    model: str | None, provider: str | None, identity: str | None, since: float | None, until: float | None, team: str | None
) -> tuple[str, list[Any]]:
    where, params = _where((("model", model), ("provider", provider), ("identity", identity), ("team", team)), "finished_at", since, until)
    return _clause(where), params


def usage(
    conn: Conn, model: str | None, provider: str | None, identity: str | None, since: float | None, until: float | None, team: str | None = None
) -> list[UsageRow]:
    clause, params = _usage_where(model, provider, identity, since, until, team)
    rows = conn.all(
        "SELECT model, provider, identity, outcome, COUNT(*), SUM(prompt_tokens), SUM(completion_tokens), SUM(reasoning_tokens),"
        f" SUM(duration_ms), SUM(1 - exact), SUM(cost_usd), key_id FROM usage_records{clause} GROUP BY model, provider, identity, outcome, key_id",
        params,
    )
    return [
        UsageRow(m, p, i, o, int(n), int(pt or 0), int(ct or 0), int(rt or 0), float(d or 0.0), int(e or 0), float(c or 0.0), k)
        for m, p, i, o, n, pt, ct, rt, d, e, c, k in rows
    ]


#: What `usage_series` may group by.
SERIES_GROUPS = ("model", "key_id", "outcome", "identity", "provider")


def usage_series(
    conn: Conn, since: float, until: float, bucket: float, by: str, identity: str | None = None, team: str | None = None
) -> list[dict[str, Any]]:
    """The ledger in time buckets of `bucket` seconds from `since`, per `by`."""
    if by not in SERIES_GROUPS:
        raise ValueError(f"usage_series groups by one of {', '.join(SERIES_GROUPS)}, not {by!r}")
    clause, params = _usage_where(None, None, identity, since, until, team)
    index = "FLOOR((finished_at - ?) / ?)" if conn.dialect == "postgres" else "CAST((finished_at - ?) / ? AS INTEGER)"
    rows = conn.all(
        f"SELECT {index} AS b, {by}, COUNT(*), SUM(prompt_tokens), SUM(completion_tokens), SUM(reasoning_tokens), SUM(cost_usd)"
        f" FROM usage_records{clause} GROUP BY b, {by} ORDER BY b",
        (since, bucket, *params),
    )
    return [
        {
            "at": since + int(b) * bucket, "group": g, "sessions": int(n), "prompt_tokens": int(pt or 0), "completion_tokens": int(ct or 0),
            "reasoning_tokens": int(rt or 0), "cost_usd": float(c or 0.0),
        }
        for b, g, n, pt, ct, rt, c in rows
    ]


def usage_records(
    conn: Conn,
    model: str | None,
    provider: str | None,
    identity: str | None,
    since: float | None,
    until: float | None,
    limit: int,
    team: str | None = None,
) -> list[dict[str, Any]]:
    clause, params = _usage_where(model, provider, identity, since, until, team)
    rows = conn.all(
        "SELECT session_id, request_id, model, provider, identity, outcome, finished_at, prompt_tokens, completion_tokens, reasoning_tokens,"
        f" duration_ms, first_token_ms, exact, team, cost_usd, cached_tokens, key_id FROM usage_records{clause} ORDER BY finished_at DESC LIMIT ?",
        (*params, limit),
    )
    return [
        {
            "session_id": r[0], "request_id": r[1], "model": r[2], "provider": r[3], "identity": r[4], "team": r[13], "key_id": r[16],
            "outcome": r[5],
            "finished_at": round(float(r[6]), 3), "prompt_tokens": int(r[7]), "completion_tokens": int(r[8]), "reasoning_tokens": int(r[9]),
            "cached_tokens": int(r[15] or 0), "total_tokens": int(r[7]) + int(r[8]), "cost_usd": None if r[14] is None else float(r[14]),
            "duration_ms": float(r[10]), "first_token_ms": r[11], "exact": bool(r[12]),
        }
        for r in rows
    ]


# -- records and amounts (RecordStore) -----------------------------------------------------


def put_record(conn: Conn, kind: str, record_id: str, data: str, lookup: str | None, at: float) -> None:
    """Create or replace a record (`data` is its JSON). A lookup another
    record of the kind has breaks the unique index (kind, lookup): the
    database raises, and the store answers ValueError. The index, not a read
    before the write, decides, so two servers racing for a lookup cannot both
    get it."""
    conn.execute(
        "INSERT INTO records (kind, id, lookup, data, updated_at) VALUES (?, ?, ?, ?, ?) ON CONFLICT (kind, id) DO UPDATE SET"
        " lookup = excluded.lookup, data = excluded.data, updated_at = excluded.updated_at",
        (kind, record_id, lookup, data, at),
    )


def put_records(conn: Conn, kind: str, rows: Sequence[tuple[str, str]], at: float) -> None:
    """Create or replace several records of a kind (no lookups), in the one
    transaction of `conn`."""
    conn.many(
        "INSERT INTO records (kind, id, lookup, data, updated_at) VALUES (?, ?, NULL, ?, ?) ON CONFLICT (kind, id) DO UPDATE SET"
        " data = excluded.data, updated_at = excluded.updated_at",
        [(kind, record_id, data, at) for record_id, data in rows],
    )


def get_record(conn: Conn, kind: str, record_id: str) -> dict[str, Any] | None:
    row = conn.one("SELECT data FROM records WHERE kind = ? AND id = ?", (kind, record_id))
    return None if row is None else orjson.loads(row[0])


def find_record(conn: Conn, kind: str, lookup: str) -> tuple[str, dict[str, Any]] | None:
    row = conn.one("SELECT id, data FROM records WHERE kind = ? AND lookup = ?", (kind, lookup))
    return None if row is None else (row[0], orjson.loads(row[1]))


def delete_record(conn: Conn, kind: str, record_id: str) -> bool:
    return conn.execute("DELETE FROM records WHERE kind = ? AND id = ?", (kind, record_id)).rowcount == 1


def list_records(conn: Conn, kind: str, limit: int, after: str | None) -> list[tuple[str, dict[str, Any]]]:
    if after is None:
        rows = conn.all("SELECT id, data FROM records WHERE kind = ? ORDER BY id LIMIT ?", (kind, limit))
    else:
        rows = conn.all("SELECT id, data FROM records WHERE kind = ? AND id > ? ORDER BY id LIMIT ?", (kind, after, limit))
    return [(r[0], orjson.loads(r[1])) for r in rows]


def add_amount(conn: Conn, kind: str, amount_id: str, period: str, amount: float) -> float:
    """Add in one upsert, then read the sum back in the same transaction: the
    upsert holds the row (PostgreSQL's row lock, SQLite's write lock) until
    the commit, so the value read is this addition's result."""
    conn.execute(
        "INSERT INTO amounts (kind, id, period, amount) VALUES (?, ?, ?, ?)"
        " ON CONFLICT (kind, id, period) DO UPDATE SET amount = amounts.amount + excluded.amount",
        (kind, amount_id, period, amount),
    )
    return float(conn.one("SELECT amount FROM amounts WHERE kind = ? AND id = ? AND period = ?", (kind, amount_id, period))[0])


def amount(conn: Conn, kind: str, amount_id: str, period: str) -> float:
    row = conn.one("SELECT amount FROM amounts WHERE kind = ? AND id = ? AND period = ?", (kind, amount_id, period))
    return 0.0 if row is None else float(row[0])


# -- the outbox (QueueStore) ----------------------------------------------------------------

#: The columns of an outbox row, in the order of the plugin's tuples.
OUTBOX_COLUMNS = ("queue", "id", "state", "due_at", "data", "created_at", "updated_at")
_ITEM_COLUMNS = "queue, id, data, state, due_at, created_at, updated_at, lease_owner, lease_until"


def _item(row: Sequence[Any]) -> QueuedItem:
    queue, item_id, data, state, due_at, created_at, updated_at, lease_owner, lease_until = row
    return QueuedItem(queue, item_id, orjson.loads(data), state, float(due_at), float(created_at), float(updated_at), lease_owner, lease_until)


def enqueue(conn: Conn, rows: Sequence[Sequence[Any]]) -> None:
    _insert_many(conn, "outbox", OUTBOX_COLUMNS, rows, "ON CONFLICT (queue, id) DO NOTHING")


def claim(conn: Conn, queue: str, owner: str, limit: int, now: float, lease_until: float) -> list[QueuedItem]:
    """Lease what is due, in one statement. Under SQLite the write transaction
    serializes claims. Under PostgreSQL the rows picked are locked, and a
    concurrent claim skips them (SKIP LOCKED) rather than wait; once this one
    commits they are leased, so an item goes to one worker."""
    free = "state = 'pending' AND due_at <= ? AND (lease_until IS NULL OR lease_until <= ?)"
    lock = " FOR UPDATE SKIP LOCKED" if conn.dialect == "postgres" else ""
    rows = conn.all(
        f"UPDATE outbox SET lease_owner = ?, lease_until = ? WHERE queue = ? AND {free} AND id IN"
        f" (SELECT id FROM outbox WHERE queue = ? AND {free} ORDER BY due_at, id LIMIT ?{lock}) RETURNING {_ITEM_COLUMNS}",
        (owner, lease_until, queue, now, now, queue, now, now, limit),
    )
    return sorted((_item(r) for r in rows), key=lambda item: (item.due_at, item.id))


def settle(conn: Conn, queue: str, item_id: str, owner: str, state: str, data: str, due_at: float | None, at: float) -> bool:
    cursor = conn.execute(
        "UPDATE outbox SET state = ?, data = ?, due_at = COALESCE(?, due_at), lease_owner = NULL, lease_until = NULL, updated_at = ?"
        " WHERE queue = ? AND id = ? AND lease_owner = ?",
        (state, data, due_at, at, queue, item_id, owner),
    )
    return cursor.rowcount == 1


def settle_many(conn: Conn, queue: str, owner: str, rows: Sequence[tuple[str, str, str, float | None]], at: float) -> list[bool]:
    """Several settlements, (id, state, data, due_at) each, in one transaction."""
    return [settle(conn, queue, item_id, owner, state, data, due_at, at) for item_id, state, data, due_at in rows]


def requeue(conn: Conn, queue: str, item_id: str, due_at: float, at: float) -> bool:
    cursor = conn.execute(
        "UPDATE outbox SET state = 'pending', due_at = ?, lease_owner = NULL, lease_until = NULL, updated_at = ?"
        " WHERE queue = ? AND id = ? AND (lease_until IS NULL OR lease_until <= ?)",
        (due_at, at, queue, item_id, at),
    )
    return cursor.rowcount == 1


def queue_item(conn: Conn, queue: str, item_id: str) -> QueuedItem | None:
    row = conn.one(f"SELECT {_ITEM_COLUMNS} FROM outbox WHERE queue = ? AND id = ?", (queue, item_id))
    return None if row is None else _item(row)


def queue_items(conn: Conn, queue: str, limit: int, before: tuple[float, str] | None, state: str | None) -> list[QueuedItem]:
    where, args = ["queue = ?"], [queue]
    if before is not None:
        where.append("(created_at < ? OR (created_at = ? AND id < ?))")
        args += [before[0], before[0], before[1]]
    if state is not None:
        where.append("state = ?")
        args.append(state)
    rows = conn.all(f"SELECT {_ITEM_COLUMNS} FROM outbox WHERE {' AND '.join(where)} ORDER BY created_at DESC, id DESC LIMIT ?", (*args, limit))
    return [_item(r) for r in rows]


def purge_outbox(conn: Conn, before: float) -> int:
    """Items done or dead since before `before`; pending ones always stay."""
    keys = conn.all("SELECT queue, id FROM outbox WHERE state <> 'pending' AND updated_at < ? LIMIT ?", (before, PURGE_BATCH))
    conn.many("DELETE FROM outbox WHERE queue = ? AND id = ?", [(r[0], r[1]) for r in keys])
    return len(keys)


# -- retention ---------------------------------------------------------------------------

#: Rows one purge statement touches at most: a purge never holds a long lock.
PURGE_BATCH = 500


def purge_transcripts(conn: Conn, before: float) -> int:
    # created_at's index finds the candidates; a session finishes after it was created.
    ids = [r[0] for r in conn.all(
        "SELECT id FROM sessions WHERE created_at < ? AND finished_at < ? AND transcript = 'kept' LIMIT ?", (before, before, PURGE_BATCH)
    )]
    for session_id in ids:
        conn.execute("DELETE FROM chunks WHERE session_id = ?", (session_id,))
        conn.execute("UPDATE sessions SET transcript = 'purged', request = NULL WHERE id = ?", (session_id,))
    return len(ids)


def purge_metadata(conn: Conn, before: float, at: float) -> int:
    ids = [r[0] for r in conn.all("SELECT id FROM sessions WHERE created_at < ? AND finished_at < ? LIMIT ?", (before, before, PURGE_BATCH))]
    for session_id in ids:
        conn.execute("DELETE FROM chunks WHERE session_id = ?", (session_id,))
        conn.execute("DELETE FROM sessions WHERE id = ?", (session_id,))
        conn.execute(
            "INSERT INTO tombstones (session_id, reason, at) VALUES (?, 'purged', ?) ON CONFLICT (session_id) DO NOTHING", (session_id, at)
        )
    return len(ids)


def purge_usage(conn: Conn, before: float) -> int:
    ids = [r[0] for r in conn.all("SELECT session_id FROM usage_records WHERE finished_at < ? LIMIT ?", (before, PURGE_BATCH))]
    conn.many("DELETE FROM usage_records WHERE session_id = ?", [(i,) for i in ids])
    return len(ids)


def purge_tombstones(conn: Conn, before: float) -> int:
    ids = [r[0] for r in conn.all("SELECT session_id FROM tombstones WHERE at < ? LIMIT ?", (before, PURGE_BATCH))]
    conn.many("DELETE FROM tombstones WHERE session_id = ?", [(i,) for i in ids])
    return len(ids)
