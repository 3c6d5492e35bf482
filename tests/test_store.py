"""The store plugin on both backends (a SQLite file, and a fresh database on the
machine's PostgreSQL): sessions, transcripts and usage that survive restarts and
kill -9, background sessions, following and resuming, deletion and retention."""

from __future__ import annotations

import json
import os
import re
import signal
import socket
import sqlite3
import subprocess
import sys
import threading
import time
from pathlib import Path

import httpx
import pytest

from streamvisor.testing import closed_port

from .conftest import ServerThread, make_config

ROOT = Path(__file__).resolve().parent.parent
ADMIN_KEY = "store-test-admin-key"
ADMIN = {"Authorization": f"Bearer {ADMIN_KEY}"}


@pytest.fixture(autouse=True)
def admin_key(monkeypatch: pytest.MonkeyPatch) -> None:
    # Listing sessions needs the admin key; the server thread reads it per request.
    monkeypatch.setenv("STREAMVISOR_ADMIN_KEY", ADMIN_KEY)

MODELS = """
[plugins.scripted]
[[plugins.scripted.models]]
name = "fox"
text = "The quick brown fox jumps over the lazy dog."

[[plugins.scripted.models]]
name = "count"
text = "w00 w01 w02 w03 w04 w05 w06 w07 w08 w09 w10 w11 w12 w13 w14 w15 w16 w17 w18 w19 w20 w21 w22 w23 w24 w25 w26 w27 w28 w29"
delay = 0.03

[[plugins.scripted.models]]
name = "slow"
text = "tick"
repeat = 100000
delay = 0.01

[[plugins.scripted.models]]
name = "late"
text = "finally here"
first_delay = 1.0

[[plugins.scripted.models]]
name = "broken-midway"
text = "one two three four five six"
fail_after = 3
"""


def store_toml(url: str, extra: str = "") -> str:
    return f"""
[plugins.store]
url = "{url}"
{extra}

[plugins.usage]
{MODELS}
"""


def start(toml: str, **server) -> ServerThread:
    server.setdefault("session_retention_seconds", 0.5)
    return ServerThread(make_config(toml, **server)).start()


def events(response: httpx.Response | str) -> list[tuple[int | None, str]]:
    """(id, data) of each event of an SSE body, in order."""
    out = []
    body = response if isinstance(response, str) else response.text
    for block in body.split("\n\n"):
        ident, data = None, []
        for line in block.split("\n"):
            if line.startswith("id: "):
                ident = int(line[4:])
            elif line.startswith("data: "):
                data.append(line[6:])
        if data:
            out.append((ident, "\n".join(data)))
    return out


def text_of(evs: list[tuple[int | None, str]]) -> str:
    parts = []
    for _, data in evs:
        if data == "[DONE]":
            continue
        body = json.loads(data)
        for choice in body.get("choices", []):
            parts.append(choice["delta"].get("content") or "")
    return "".join(parts)


def wait_state(http: httpx.Client, session_id: str, states: tuple[str, ...], timeout: float = 15.0) -> dict:
    deadline = time.monotonic() + timeout
    while True:
        body = http.get(f"/v1/sessions/{session_id}").json()
        if body.get("state") in states:
            return body
        assert time.monotonic() < deadline, f"session {session_id} is {body.get('state')}, not {states}"
        time.sleep(0.05)


def wait_stored(server: ServerThread) -> None:
    """Until the store has written everything it tracks."""
    deadline = time.monotonic() + 10
    while True:
        panels = server.run(server.runtime.status_panels)
        if panels["store"]["status"]["pending_sessions"] == 0:
            return
        assert time.monotonic() < deadline, panels["store"]
        time.sleep(0.05)


# -- restart -----------------------------------------------------------------------------------


def test_restart_keeps_sessions_transcripts_and_usage(store_url):
    toml = store_toml(store_url)
    server = start(toml)
    try:
        client = server.openai()
        http = server.http()
        plain = client.chat.completions.with_raw_response.create(model="fox", messages=[{"role": "user", "content": "hi there"}])
        streamed = client.chat.completions.with_raw_response.create(
            model="fox", messages=[{"role": "user", "content": "again"}], stream=True, stream_options={"include_usage": True}
        )
        streamed_text = "".join(c.choices[0].delta.content or "" for c in streamed.parse() if c.choices)
        failed = http.post("/v1/chat/completions", json={"model": "broken-midway", "messages": [{"role": "user", "content": "x"}], "stream": True})
        ids = [plain.headers["x-session-id"], streamed.headers["x-session-id"], failed.headers["x-session-id"]]
        wait_stored(server)
        before = {i: http.get(f"/v1/sessions/{i}").json() for i in ids}
        completions = {i: http.get(f"/v1/sessions/{i}/completion").json() for i in ids}
        usage = http.get("/v1/usage").json()
        replay = http.get(f"/v1/sessions/{ids[1]}/stream")
    finally:
        server.stop()
    assert plain.parse().choices[0].message.content == "The quick brown fox jumps over the lazy dog."
    assert streamed_text == "The quick brown fox jumps over the lazy dog."
    assert [before[i]["state"] for i in ids] == ["completed", "completed", "failed"]
    assert usage["totals"]["sessions"] == 3

    server = start(toml)
    try:
        http = server.http()
        for i in ids:
            after = http.get(f"/v1/sessions/{i}").json()
            for key in ("state", "usage", "chunks", "finish_reason", "model", "identity", "request_id", "error"):
                assert after[key] == before[i][key], (i, key)
            assert http.get(f"/v1/sessions/{i}/completion").json()["choices"] == completions[i]["choices"]
        assert completions[ids[0]]["choices"][0]["message"]["content"] == "The quick brown fox jumps over the lazy dog."
        assert http.get("/v1/usage").json()["totals"] == usage["totals"]
        # The replay after the restart is the same bytes as before it.
        assert http.get(f"/v1/sessions/{ids[1]}/stream").text == replay.text
        assert "usage" in events(replay)[-2][1]  # the original asked for the usage chunk
        listed = http.get("/v1/sessions", headers=ADMIN).json()
        assert [s["id"] for s in listed["data"]] == ids[::-1]
        records = http.get("/v1/usage/sessions").json()["data"]
        assert {r["session_id"] for r in records} == set(ids)
    finally:
        server.stop()


def db_rows(store_url: str, sql: str, params: tuple = ()) -> list[tuple]:
    """Rows straight from the store's database, either backend (`?` placeholders)."""
    if store_url.startswith("sqlite"):
        with sqlite3.connect(store_url.removeprefix("sqlite:///")) as conn:
            return conn.execute(sql, params).fetchall()
    import psycopg

    with psycopg.connect(store_url) as conn:
        return conn.execute(sql.replace("?", "%s"), params).fetchall()


def stored_counts(store_url: str) -> tuple[dict[str, int], int, int, int]:
    """Straight from the database: sessions by state, usage records, their
    completion tokens, and stored chunks."""
    states = db_rows(store_url, "SELECT state, COUNT(*) FROM sessions GROUP BY state")
    ((records, tokens),) = db_rows(store_url, "SELECT COUNT(*), COALESCE(SUM(completion_tokens), 0) FROM usage_records")
    ((chunks,),) = db_rows(store_url, "SELECT COALESCE(SUM(count), 0) FROM chunks")
    return dict(states), int(records), int(tokens), int(chunks)


def test_a_burst_of_sessions_is_stored_whole(store_url):
    """Sessions end while a batch is being written: each still gets its final
    row, its usage record and every chunk (a finished session was once dropped
    when its end came during the write of its first row)."""
    server = start(store_toml(store_url))
    count = 400
    try:
        from streamvisor.hooks import ChatRequest

        async def burst() -> None:
            import trio

            request = ChatRequest.from_openai({"model": "fox", "messages": [{"role": "user", "content": "x"}], "stream": True})
            limit = trio.Semaphore(32)

            async def one() -> None:
                async with limit:
                    session = server.runtime.open_session(request)
                    await session.wait_done()
                    session.release()

            async with trio.open_nursery() as nursery:
                for _ in range(count):
                    nursery.start_soon(one)

        server.run(burst)
        wait_stored(server)
    finally:
        server.stop()
    states, records, tokens, chunks = stored_counts(store_url)
    assert states == {"completed": count}
    assert (records, tokens) == (count, 9 * count)
    assert chunks == 10 * count  # nine words and the final chunk


def test_a_streaming_session_is_written_every_64_chunks_when_that_comes_first(store_url):
    server = start(store_toml(store_url, "flush_interval_ms = 60000"))
    try:
        http = server.http()
        started = http.post("/v1/chat/completions", json={"model": "slow", "messages": [{"role": "user", "content": "x"}], "background": True})
        session_id = started.json()["id"]
        time.sleep(1.5)  # about 150 chunks, at one per 10 ms
        rows = db_rows(store_url, "SELECT seq, count FROM chunks WHERE session_id = ? ORDER BY seq", (session_id,))
        http.post(f"/v1/sessions/{session_id}/stop")
    finally:
        server.stop()
    # Long before the 60 s interval, batches of 64 (and the few more that
    # arrived before the writer's next 50 ms tick).
    assert len(rows) >= 2, rows
    assert all(64 <= count <= 80 for _, count in rows), rows
    assert [seq for seq, _ in rows] == [sum(c for _, c in rows[:i]) for i in range(len(rows))]


def test_a_long_usage_window_is_one_indexed_query(tmp_path):
    from streamvisor.plugins.store.db import Database, Target

    db = Database(Target("sqlite", str(tmp_path / "plan.db")))
    db.open()
    db.migrate()
    with db.connection(write=False) as conn:
        plan = conn.all(
            "EXPLAIN QUERY PLAN SELECT model, SUM(prompt_tokens) FROM usage_records WHERE finished_at >= ? AND finished_at < ? GROUP BY model",
            (0, 1),
        )
        by_identity = conn.all("EXPLAIN QUERY PLAN SELECT COUNT(*) FROM usage_records WHERE identity = ? AND finished_at >= ?", ("a", 0))
    db.close()
    assert "usage_finished" in str(plan), plan
    assert "usage_identity" in str(by_identity), by_identity


# -- background sessions ------------------------------------------------------------------------


def test_background_request_answers_202_and_is_collected_later(store_url):
    server = start(store_toml(store_url))
    try:
        http = server.http()
        response = http.post("/v1/chat/completions", json={"model": "count", "messages": [{"role": "user", "content": "go"}], "background": True})
        assert response.status_code == 202
        body = response.json()
        session_id = body["id"]
        assert body["object"] == "session" and body["background"] is True
        assert response.headers["location"] == f"/v1/sessions/{session_id}"
        assert response.headers["x-session-id"] == session_id
        # Partial while it runs.
        deadline = time.monotonic() + 5
        while not (partial := http.get(f"/v1/sessions/{session_id}/completion").json())["choices"][0]["message"]["content"]:
            assert time.monotonic() < deadline
            time.sleep(0.02)
        assert partial["session"]["state"] == "running"
        assert partial["choices"][0]["finish_reason"] is None
        assert 0 < len(partial["choices"][0]["message"]["content"]) < 119
        done = wait_state(http, session_id, ("completed",))
        assert done["usage"]["completion_tokens"] == 30
        final = http.get(f"/v1/sessions/{session_id}/completion").json()
        assert final["choices"][0]["message"]["content"].split() == [f"w{i:02d}" for i in range(30)]
        assert final["choices"][0]["finish_reason"] == "stop"
        # It stays readable from the store after it left memory.
        time.sleep(0.8)
        assert server.call(lambda: server.runtime.sessions.find(session_id)) is None
        assert http.get(f"/v1/sessions/{session_id}").json()["state"] == "completed"
        assert http.get(f"/v1/sessions/{session_id}/completion").json()["choices"] == final["choices"]
    finally:
        server.stop()


def test_reconnect_with_last_event_id_continues_without_gap_or_duplicate(store_url):
    server = start(store_toml(store_url))
    try:
        http = server.http()
        body = {"model": "count", "messages": [{"role": "user", "content": "go"}], "stream": True, "background": True}
        seen: list[tuple[int, str]] = []
        with http.stream("POST", "/v1/chat/completions", json=body) as response:
            session_id = response.headers["x-session-id"]
            for line in response.iter_lines():
                if line.startswith("id: "):
                    ident = int(line[4:])
                elif line.startswith("data: "):
                    seen.append((ident, json.loads(line[6:])["choices"][0]["delta"].get("content") or ""))
                    if ident == 9:
                        break  # the client drops the connection at chunk 10
        assert [i for i, _ in seen] == list(range(10))
        # The session goes on without its client.
        time.sleep(0.1)
        assert http.get(f"/v1/sessions/{session_id}").json()["state"] == "running"
        resumed = http.get(f"/v1/sessions/{session_id}/stream", headers={"Last-Event-ID": "9"})
        assert resumed.status_code == 200
        assert resumed.text.startswith("retry: ")
        evs = events(resumed)
        ids = [i for i, _ in evs if i is not None]
        assert ids == list(range(10, ids[-1] + 1)) and ids[0] == 10
        assert evs[-1][1] == "[DONE]"
        text = "".join(t for _, t in seen) + text_of(evs)
        # The same text as a client that never lost its connection.
        whole = http.post("/v1/chat/completions", json={"model": "count", "messages": [{"role": "user", "content": "go"}], "stream": True})
        assert text == text_of(events(whole))
        # starting_after is the same as Last-Event-ID.
        assert http.get(f"/v1/sessions/{session_id}/stream", params={"starting_after": 9}).text == resumed.text
    finally:
        server.stop()


def test_a_replay_right_after_the_stream_waits_for_the_last_write(store_url):
    """The buffer of a served session is let go before the store has written its
    last chunks: a replay asked for at once waits for them, and is whole."""
    server = start(store_toml(store_url, "flush_interval_ms = 200"), session_retention_seconds=30)
    try:
        http = server.http()
        for _ in range(5):
            original = http.post("/v1/chat/completions", json={"model": "fox", "messages": [{"role": "user", "content": "x"}], "stream": True})
            replay = http.get(f"/v1/sessions/{original.headers['x-session-id']}/stream")
            assert replay.status_code == 200
            assert events(replay) == events(original)
            assert replay.text == "retry: 2000\n" + original.text
    finally:
        server.stop()


def test_two_followers_see_the_same_live_stream_and_keep_alives(store_url):
    server = start(store_toml(store_url), keepalive_seconds=0.2)
    try:
        http = server.http()
        response = http.post("/v1/chat/completions", json={"model": "late", "messages": [{"role": "user", "content": "x"}], "background": True})
        session_id = response.json()["id"]
        results: dict[int, str] = {}

        def follow(n: int) -> None:
            results[n] = httpx.get(f"{server.url}/v1/sessions/{session_id}/stream", timeout=10).text

        threads = [threading.Thread(target=follow, args=(n,)) for n in range(2)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(15)
        assert results[0].count(": keep-alive") >= 2  # a second of silence before the first token
        strip = lambda text: text.replace(": keep-alive\n\n", "")  # noqa: E731
        assert strip(results[0]) == strip(results[1])
        assert text_of(events(results[0])) == "finally here"
    finally:
        server.stop()


def test_background_sessions_per_identity_are_bounded():
    server = start(MODELS, max_background_sessions=2)
    try:
        http = server.http()
        body = {"model": "slow", "messages": [{"role": "user", "content": "x"}], "background": True}
        first = [http.post("/v1/chat/completions", json=body) for _ in range(2)]
        assert [r.status_code for r in first] == [202, 202]
        refused = http.post("/v1/chat/completions", json=body)
        assert refused.status_code == 429
        assert refused.json()["error"]["code"] == "too_many_background_sessions"
        assert "max_background_sessions" in refused.json()["error"]["message"]
        # Stopping one frees its place.
        stopped = http.post(f"/v1/sessions/{first[0].json()['id']}/stop").json()
        assert stopped["stopped"] is True and stopped["state"] == "stopped"
        assert http.post("/v1/chat/completions", json=body).status_code == 202
    finally:
        server.stop()


def test_without_a_store_a_finished_foreground_session_cannot_be_replayed_but_a_background_one_can():
    server = start(MODELS, session_retention_seconds=30)
    try:
        http = server.http()
        done = http.post("/v1/chat/completions", json={"model": "fox", "messages": [{"role": "user", "content": "x"}], "stream": True})
        gone = http.get(f"/v1/sessions/{done.headers['x-session-id']}/stream")
        assert gone.status_code == 410 and "background" in gone.json()["error"]["message"]
        bg = http.post("/v1/chat/completions", json={"model": "fox", "messages": [{"role": "user", "content": "x"}], "stream": True, "background": True})
        replay = http.get(f"/v1/sessions/{bg.headers['x-session-id']}/stream")
        assert text_of(events(replay)) == "The quick brown fox jumps over the lazy dog."
        assert [i for i, _ in events(replay) if i is not None] == [i for i, _ in events(bg) if i is not None]
        assert http.get("/v1/sessions/nope/stream").status_code == 404
        assert http.get(f"/v1/sessions/{bg.headers['x-session-id']}/stream", params={"starting_after": "x"}).status_code == 400
    finally:
        server.stop()


# -- listing, deletion, content and retention ---------------------------------------------------


def test_list_filters_and_cursor_pagination(store_url):
    server = start(store_toml(store_url))
    try:
        http = server.http()
        ids = []
        for i in range(5):
            model = "fox" if i % 2 == 0 else "broken-midway"
            r = http.post("/v1/chat/completions", json={"model": model, "messages": [{"role": "user", "content": "x"}], "stream": True})
            ids.append(r.headers["x-session-id"])
        wait_stored(server)
        time.sleep(0.8)  # all have left memory: the list comes from the store
        page1 = http.get("/v1/sessions", params={"limit": 2}, headers=ADMIN).json()
        assert [s["id"] for s in page1["data"]] == ids[::-1][:2] and page1["has_more"]
        page2 = http.get("/v1/sessions", params={"limit": 2, "after": page1["next_cursor"]}, headers=ADMIN).json()
        page3 = http.get("/v1/sessions", params={"limit": 2, "after": page2["next_cursor"]}, headers=ADMIN).json()
        assert [s["id"] for s in page2["data"] + page3["data"]] == ids[::-1][2:]
        assert page3["has_more"] is False and page3["next_cursor"] is None
        failed = http.get("/v1/sessions", params={"state": "failed"}, headers=ADMIN).json()["data"]
        assert {s["id"] for s in failed} == {ids[1], ids[3]}
        assert {s["id"] for s in http.get("/v1/sessions", params={"model": "fox"}, headers=ADMIN).json()["data"]} == {ids[0], ids[2], ids[4]}
        assert http.get("/v1/sessions", params={"since": time.time() + 60}, headers=ADMIN).json()["data"] == []
        bad = http.get("/v1/sessions", params={"state": "happy"}, headers=ADMIN)
        assert bad.status_code == 400 and bad.json()["error"]["param"] == "state"
        assert http.get("/v1/sessions", params={"after": "garbage!"}, headers=ADMIN).json()["error"]["param"] == "after"
    finally:
        server.stop()


def test_delete_removes_the_session_its_transcript_and_its_usage(store_url):
    server = start(store_toml(store_url))
    try:
        http = server.http()
        r = http.post("/v1/chat/completions", json={"model": "fox", "messages": [{"role": "user", "content": "private"}]})
        keep = http.post("/v1/chat/completions", json={"model": "fox", "messages": [{"role": "user", "content": "other"}]})
        session_id = r.headers["x-session-id"]
        wait_stored(server)
        deleted = http.delete(f"/v1/sessions/{session_id}")
        assert deleted.status_code == 200 and deleted.json() == {"id": session_id, "object": "session.deleted", "deleted": True}
        assert http.get(f"/v1/sessions/{session_id}").status_code == 410
        assert http.get(f"/v1/sessions/{session_id}/stream").status_code == 410
        assert http.delete(f"/v1/sessions/{session_id}").status_code == 410
        records = http.get("/v1/usage/sessions").json()["data"]
        assert [rec["session_id"] for rec in records] == [keep.headers["x-session-id"]]
        assert http.delete("/v1/sessions/sess_never").status_code == 404
        # A live background session is stopped, then deleted.
        bg = http.post("/v1/chat/completions", json={"model": "slow", "messages": [{"role": "user", "content": "x"}], "background": True}).json()
        assert http.delete(f"/v1/sessions/{bg['id']}").status_code == 200
        time.sleep(0.5)
        assert http.get(f"/v1/sessions/{bg['id']}").status_code == 410
    finally:
        server.stop()


def test_store_content_false_keeps_metadata_only(store_url):
    server = start(store_toml(store_url, "store_content = false"))
    try:
        http = server.http()
        r = http.post("/v1/chat/completions", json={"model": "fox", "messages": [{"role": "user", "content": "secret words"}]})
        session_id = r.headers["x-session-id"]
        wait_stored(server)
        time.sleep(0.8)
        meta = http.get(f"/v1/sessions/{session_id}").json()
        assert meta["state"] == "completed" and meta["transcript"] == "not_stored" and meta["usage"]["completion_tokens"] == 9
        assert http.get(f"/v1/sessions/{session_id}/stream").status_code == 410
    finally:
        server.stop()
    database = store_url.removeprefix("sqlite:///")
    if store_url.startswith("sqlite"):
        with sqlite3.connect(database) as conn:
            dump = "\n".join(conn.iterdump())
        assert "secret words" not in dump and "quick brown" not in dump


def test_retention_purges_transcripts_then_metadata(store_url):
    server = start(store_toml(store_url, "[plugins.store.retention_days]\ntranscripts = 1\nmetadata = 2\nusage = 3"))
    try:
        http = server.http()
        r = http.post("/v1/chat/completions", json={"model": "fox", "messages": [{"role": "user", "content": "x"}]})
        session_id = r.headers["x-session-id"]
        wait_stored(server)
        time.sleep(0.8)
        store = next(p.plugin for p in server.runtime._host if p.name == "store")
        day = 86400
        assert server.run(store.purge, time.time() + 0.5 * day) == {"transcripts": 0, "metadata": 0, "usage": 0, "outbox": 0, "tombstones": 0}
        assert server.run(store.purge, time.time() + 1.5 * day)["transcripts"] == 1
        assert http.get(f"/v1/sessions/{session_id}").json()["transcript"] == "purged"
        assert http.get(f"/v1/sessions/{session_id}/stream").status_code == 410
        assert http.get("/v1/usage").json()["totals"]["sessions"] == 1
        assert server.run(store.purge, time.time() + 2.5 * day)["metadata"] == 1
        gone = http.get(f"/v1/sessions/{session_id}")
        assert gone.status_code == 410 and gone.json()["error"]["code"] == "session_gone"
        assert server.run(store.purge, time.time() + 3.5 * day)["usage"] == 1
        assert http.get("/v1/usage").json()["totals"]["sessions"] == 0
    finally:
        server.stop()


# -- failures of the database ----------------------------------------------------------------------


@pytest.mark.parametrize("url", [f"postgresql://postgres@127.0.0.1:{closed_port()}/test", "sqlite:////proc/streamvisor/store.db"])
def test_a_store_that_cannot_be_opened_stops_start_up_with_a_clear_error(url):
    from streamvisor.hooks import ConfigError, unwrap

    thread = ServerThread(make_config(store_toml(url, "connect_timeout = 1")))
    with pytest.raises(RuntimeError):
        thread.start()
    inner = unwrap(thread.error)
    assert isinstance(inner, ConfigError), repr(thread.error)
    assert "plugins.store.url" in str(inner) and "a database the store can open" in str(inner)


class TcpProxy:
    """A loopback TCP forwarder to PostgreSQL that can be cut and restored:
    the database going down and coming back, as the server sees it."""

    def __init__(self, target_port: int) -> None:
        self.target_port = target_port
        self.sock = socket.socket()
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self.sock.bind(("127.0.0.1", 0))
        self.sock.listen(64)
        self.port = self.sock.getsockname()[1]
        self.up = True
        self.conns: list[socket.socket] = []
        self.lock = threading.Lock()
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        while True:
            try:
                client, _ = self.sock.accept()
            except OSError:
                return
            if not self.up:
                client.close()
                continue
            upstream = socket.create_connection(("127.0.0.1", self.target_port))
            with self.lock:
                self.conns += [client, upstream]
            for a, b in ((client, upstream), (upstream, client)):
                threading.Thread(target=self._pipe, args=(a, b), daemon=True).start()

    def _pipe(self, a: socket.socket, b: socket.socket) -> None:
        try:
            while data := a.recv(65536):
                b.sendall(data)
        except OSError:
            pass
        finally:
            for s in (a, b):
                try:
                    s.shutdown(socket.SHUT_RDWR)
                except OSError:
                    pass

    def cut(self) -> None:
        self.up = False
        with self.lock:
            conns, self.conns = self.conns, []
        for s in conns:
            try:
                s.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
            s.close()

    def restore(self) -> None:
        self.up = True

    def close(self) -> None:
        self.cut()
        self.sock.close()


def test_database_down_while_serving_shows_in_readiness_and_streams_keep_flowing(postgres_url):
    proxy = TcpProxy(5432)
    url = postgres_url.replace("127.0.0.1:5432", f"127.0.0.1:{proxy.port}")
    server = start(store_toml(url, "connect_timeout = 1\nstatement_timeout = 2") + "\n[plugins.health]\n")
    try:
        http = server.http()
        assert http.get("/health/ready").status_code == 200
        proxy.cut()
        t0 = time.monotonic()
        ids = []
        for _ in range(5):
            r = http.post("/v1/chat/completions", json={"model": "fox", "messages": [{"role": "user", "content": "x"}], "stream": True})
            assert text_of(events(r)) == "The quick brown fox jumps over the lazy dog."
            ids.append(r.headers["x-session-id"])
        assert time.monotonic() - t0 < 3  # the streams did not wait for the database
        # Not ready, and saying why: the writes that wait are failing.
        deadline = time.monotonic() + 10
        while True:
            ready = http.get("/health/ready")
            detail = json.dumps(ready.json())
            if ready.status_code == 503 and "writes failing" in detail:
                break
            assert time.monotonic() < deadline, ready.json()
            time.sleep(0.2)
        assert "store:database" in detail and "sessions wait" in detail
        proxy.restore()
        wait_stored(server)
        assert http.get("/health/ready").status_code == 200
        time.sleep(0.8)
        for session_id in ids:
            assert http.get(f"/v1/sessions/{session_id}").json()["state"] == "completed"
        assert http.get("/v1/usage").json()["totals"]["sessions"] == 5
        assert server.run(server.runtime.status_panels)["store"]["status"]["lost_sessions"] == 0
    finally:
        server.stop()
        proxy.close()


def test_sqlite_locked_by_another_writer_is_retried_then_written(tmp_path):
    url = f"sqlite:///{tmp_path}/store.db"
    server = start(store_toml(url, "connect_timeout = 0.2") + "\n[plugins.health]\n")
    try:
        http = server.http()
        blocker = sqlite3.connect(f"{tmp_path}/store.db", isolation_level=None)
        blocker.execute("BEGIN EXCLUSIVE")
        r = http.post("/v1/chat/completions", json={"model": "fox", "messages": [{"role": "user", "content": "x"}], "stream": True})
        assert text_of(events(r)) == "The quick brown fox jumps over the lazy dog."
        deadline = time.monotonic() + 10
        while http.get("/health/ready").status_code != 503:
            assert time.monotonic() < deadline
            time.sleep(0.1)
        blocker.execute("ROLLBACK")
        blocker.close()
        wait_stored(server)
        time.sleep(0.8)
        assert http.get(f"/v1/sessions/{r.headers['x-session-id']}").json()["state"] == "completed"
    finally:
        server.stop()


# -- kill -9 -------------------------------------------------------------------------------------------


def serve_process(config: Path) -> tuple[subprocess.Popen, str]:
    proc = subprocess.Popen(
        [sys.executable, "-m", "streamvisor.core.cli", "serve", "--config", str(config)],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        cwd=config.parent,
    )
    deadline = time.monotonic() + 60
    for line in proc.stdout:
        found = re.search(r"listening on (http://\S+)", line)
        if found:
            threading.Thread(target=lambda: [None for _ in proc.stdout], daemon=True).start()
            return proc, found.group(1)
        assert time.monotonic() < deadline
    raise AssertionError("serve did not start")


def test_kill_9_during_a_background_stream_keeps_what_a_follower_had_250_ms_before(store_url, tmp_path):
    config = tmp_path / "plugins.toml"
    config.write_text('[server]\nport = 0\nlog_level = "info"\n' + store_toml(store_url))
    proc, url = serve_process(config)
    received: list[tuple[float, int, str]] = []
    try:
        r = httpx.post(f"{url}/v1/chat/completions", json={"model": "slow", "messages": [{"role": "user", "content": "x"}], "background": True})
        session_id = r.json()["id"]

        def follow() -> None:
            try:
                with httpx.stream("GET", f"{url}/v1/sessions/{session_id}/stream", timeout=10) as response:
                    ident = -1
                    for line in response.iter_lines():
                        if line.startswith("id: "):
                            ident = int(line[4:])
                        elif line.startswith("data: "):
                            delta = json.loads(line[6:])["choices"][0]["delta"]
                            received.append((time.monotonic(), ident, delta.get("content") or ""))
            except httpx.HTTPError:
                pass  # the server died under it

        follower = threading.Thread(target=follow)
        follower.start()
        time.sleep(1.5)
        killed_at = time.monotonic()
        proc.send_signal(signal.SIGKILL)
        proc.wait(10)
        follower.join(10)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert len(received) > 50
    # The restarted server recovers the sessions of its instance name (host and
    # port): it listens on the port of the one that was killed.
    config.write_text(config.read_text().replace("port = 0", f"port = {url.rsplit(':', 1)[1]}", 1))
    proc, url = serve_process(config)
    try:
        session = httpx.get(f"{url}/v1/sessions/{session_id}").json()
        assert session["state"] == "interrupted"
        assert session["usage"]["exact"] is False and session["usage"]["completion_tokens"] > 0
        stored = httpx.get(f"{url}/v1/sessions/{session_id}/completion").json()["choices"][0]["message"]["content"]
        before = [content for at, _, content in received if at <= killed_at - 0.25]
        assert stored.startswith("".join(before)), (len(stored), len("".join(before)))
        # What the store holds is a prefix of what the follower saw (or more).
        seen = "".join(c for _, _, c in received)
        assert seen.startswith(stored) or stored.startswith(seen)
        replay = httpx.get(f"{url}/v1/sessions/{session_id}/stream")
        assert '"code":"session_interrupted"' in replay.text.replace(" ", "")
        records = httpx.get(f"{url}/v1/usage/sessions").json()["data"]
        assert [(r["session_id"], r["outcome"], r["exact"]) for r in records] == [(session_id, "interrupted", False)]
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.wait(30)


# -- streamvisor db ------------------------------------------------------------------------------------


def test_db_status_and_upgrade_by_hand(store_url, tmp_path):
    config = tmp_path / "plugins.toml"
    config.write_text(store_toml(store_url))
    cli = [sys.executable, "-m", "streamvisor.core.cli", "db"]
    status = subprocess.run([*cli, "status", "--config", str(config)], capture_output=True, text=True, timeout=60)
    assert status.returncode == 0, status.stderr
    assert "schema version: 0 (latest 3)" in status.stdout and "pending: 1 sessions" in status.stdout and "pending: 2 teams" in status.stdout
    assert "pending: 3 the outbox" in status.stdout
    upgrade = subprocess.run([*cli, "upgrade", "--config", str(config)], capture_output=True, text=True, timeout=60)
    assert upgrade.returncode == 0, upgrade.stderr
    assert all(f"applied migration {n}" in upgrade.stdout for n in (1, 2, 3)) and "up to date" in upgrade.stdout
    again = subprocess.run([*cli, "status", "--config", str(config)], capture_output=True, text=True, timeout=60)
    assert "schema version: 3 (latest 3)" in again.stdout and "up to date" in again.stdout
    if store_url.startswith("sqlite"):
        assert os.path.exists(store_url.removeprefix("sqlite:///"))


# -- teams and costs (migration 2) -------------------------------------------------------------------


def test_cost_team_and_cached_tokens_are_stored_and_read_back_after_a_restart(store_url):
    from streamvisor.hooks import SessionQuery

    from .test_plugin_usage import TokenAuth
    from .test_pricing import METERED, MeteredPlugin

    toml = store_toml(store_url) + """
[plugins.auth]
[plugins.metered]
[plugins.pricing]
[plugins.pricing.prices.metered]
input = 2.0
output = 8.0
cached = 0.5
"""
    plugins = {"auth": TokenAuth, "metered": MeteredPlugin}
    # 600 prompt tokens at $2, 400 cached at $0.5, 200 completion at $8 (reasoning at the output price).
    cost = (600 * 2.0 + 400 * 0.5 + 200 * 8.0) / 1e6
    server = ServerThread(make_config(toml, session_retention_seconds=0.5), plugins).start()
    try:
        alice = server.openai(api_key="tok-alice")
        streamed = alice.chat.completions.with_raw_response.create(
            model="metered", messages=[{"role": "user", "content": "x"}], stream=True, stream_options={"include_usage": True}
        )
        assert [c.usage for c in streamed.parse() if c.usage][-1].model_extra["cost_usd"] == pytest.approx(cost, rel=1e-9)
        carol = server.openai(api_key="tok-carol")
        carol.chat.completions.create(model="metered", messages=[{"role": "user", "content": "y"}])
        wait_stored(server)
    finally:
        server.stop()
    session_id = streamed.headers["x-session-id"]
    rows = db_rows(store_url, "SELECT identity, team, cost_usd, cached_tokens FROM usage_records ORDER BY identity")
    assert rows == [("alice", "red", pytest.approx(cost, rel=1e-9), 400), ("carol", "blue", pytest.approx(cost, rel=1e-9), 400)]
    assert db_rows(store_url, "SELECT team, cost_usd, cached_tokens FROM sessions WHERE id = ?", (session_id,)) == [
        ("red", pytest.approx(cost, rel=1e-9), 400)
    ]

    server = ServerThread(make_config(toml), plugins).start()
    try:
        http = server.http(headers={"Authorization": "Bearer tok-alice"})
        stored = http.get(f"/v1/sessions/{session_id}").json()
        assert stored["team"] == "red" and stored["identity"] == "alice"
        assert stored["usage"]["cost_usd"] == pytest.approx(cost, rel=1e-9)
        assert stored["usage"]["prompt_tokens_details"] == {"cached_tokens": 400}
        # The replay's usage chunk carries the cost, as the live stream's did.
        replayed = [json.loads(data) for _, data in events(http.get(f"/v1/sessions/{session_id}/stream")) if data != "[DONE]"]
        assert replayed[-1]["usage"]["cost_usd"] == pytest.approx(cost, rel=1e-9)
        admin = server.http(headers=ADMIN)
        usage = admin.get("/v1/usage").json()
        assert usage["totals"]["cost_usd"] == pytest.approx(2 * cost, rel=1e-6)
        assert usage["by_identity"]["alice"]["cost_usd"] == pytest.approx(cost, rel=1e-6)
        assert admin.get("/v1/usage", params={"team": "red"}).json()["totals"]["sessions"] == 1
        records = admin.get("/v1/usage/sessions", params={"team": "blue"}).json()["data"]
        assert [(r["identity"], r["team"], r["cached_tokens"]) for r in records] == [("carol", "blue", 400)]
        assert records[0]["cost_usd"] == pytest.approx(cost, rel=1e-9)
        # The store's session list selects by team.
        listed = server.run(server.runtime.store.sessions, SessionQuery(team="red"))
        assert [(s.id, s.team) for s in listed] == [(session_id, "red")]
        assert listed[0].usage.cached_tokens == METERED.cached_tokens
    finally:
        server.stop()


def test_a_database_of_schema_1_is_upgraded_in_place(store_url, monkeypatch):
    from streamvisor.plugins.store import db as store_db
    from streamvisor.plugins.store.db import Database
    from streamvisor.plugins.store.schema import MIGRATIONS

    target = store_db.parse_url(store_url, "test.toml")
    with monkeypatch.context() as patch:
        # The database as the previous release left it: migration 1 only.
        patch.setattr(store_db, "MIGRATIONS", MIGRATIONS[:1])
        old = Database(target)
        old.open()
        assert old.migrate() == [1]
        old.close()
    _execute(
        store_url,
        "INSERT INTO usage_records (session_id, request_id, model, provider, identity, outcome, finished_at, prompt_tokens,"
        " completion_tokens, reasoning_tokens, duration_ms, first_token_ms, exact) VALUES ('sess_old', '', 'fox', 'scripted',"
        " 'anonymous', 'completed', ?, 3, 9, 0, 1.0, 0.5, 1)",
        (time.time(),),
    )
    server = start(store_toml(store_url))
    try:
        http = server.http()
        assert server.run(server.runtime.status_panels)["store"]["status"]["schema_version"] == 3
        http.post("/v1/chat/completions", json={"model": "fox", "messages": [{"role": "user", "content": "a b c"}]})
        wait_stored(server)
        usage = http.get("/v1/usage").json()
        assert usage["totals"]["sessions"] == 2 and usage["totals"]["cost_usd"] == 0  # no pricing plugin: nothing priced
        records = {r["session_id"]: r for r in http.get("/v1/usage/sessions").json()["data"]}
        assert records["sess_old"]["team"] is None and records["sess_old"]["cost_usd"] is None
    finally:
        server.stop()


def _execute(store_url: str, sql: str, params: tuple = ()) -> None:
    if store_url.startswith("sqlite"):
        with sqlite3.connect(store_url.removeprefix("sqlite:///")) as conn:
            conn.execute(sql, params)
        return
    import psycopg

    with psycopg.connect(store_url) as conn:
        conn.execute(sql.replace("?", "%s"), params)


# -- records and amounts (RecordStore, contract 1.2) -------------------------------------------------


def test_records_and_amounts(store_url):
    from streamvisor.hooks import RecordStore

    server = start(store_toml(store_url))
    try:
        store = server.runtime.store
        assert isinstance(store, RecordStore)
        run = server.run
        assert run(store.get_record, "test:key", "k1") is None
        assert run(store.find_record, "test:key", "hash-1") is None
        run(store.put_record, "test:key", "k1", {"name": "first", "limits": [1, 2]}, "hash-1")
        run(store.put_record, "test:key", "k2", {"name": "second"})
        assert run(store.get_record, "test:key", "k1") == {"name": "first", "limits": [1, 2]}
        assert run(store.find_record, "test:key", "hash-1") == ("k1", {"name": "first", "limits": [1, 2]})
        # A lookup is unique within its kind: another record cannot take it ...
        with pytest.raises(ValueError):
            run(store.put_record, "test:key", "k2", {"name": "thief"}, "hash-1")
        assert run(store.get_record, "test:key", "k2") == {"name": "second"}
        # ... but another kind may have it, and the record itself may be replaced.
        run(store.put_record, "test:other", "k9", {}, "hash-1")
        run(store.put_record, "test:key", "k1", {"name": "renamed"}, "hash-2")
        assert run(store.find_record, "test:key", "hash-1") is None
        assert run(store.find_record, "test:key", "hash-2") == ("k1", {"name": "renamed"})
        run(store.put_record, "test:key", "k2", {"name": "second"}, "hash-1")  # free again
        # Listed by id, in pages.
        run(store.put_record, "test:key", "k3", {"name": "third"})
        assert [i for i, _ in run(store.list_records, "test:key", 2)] == ["k1", "k2"]
        assert run(store.list_records, "test:key", 2, "k2") == [("k3", {"name": "third"})]
        assert run(store.list_records, "test:other", 10) == [("k9", {})]
        # Amounts start at 0 and add up, per kind, id and period.
        assert run(store.amount, "test:spend", "k1", "2026-12") == 0
        assert run(store.add_amount, "test:spend", "k1", "2026-12", 1.25) == 1.25
        assert run(store.add_amount, "test:spend", "k1", "2026-12", 0.5) == 1.75
        assert run(store.add_amount, "test:spend", "k1", "", 2.0) == 2.0
        assert run(store.amount, "test:spend", "k1", "2026-12") == 1.75
        assert run(store.amount, "test:spend", "k2", "2026-12") == 0
    finally:
        server.stop()


def test_concurrent_lookups_and_additions_from_two_servers_are_exact(store_url):
    """Two servers on one database (two processes' worth of connections), each
    adding from its own thread with several additions in flight: every
    addition returns a distinct running total, and they sum exactly; of ten
    records racing for one lookup, exactly one gets it."""
    servers = [start(store_toml(store_url)), start(store_toml(store_url))]
    try:
        per_task, tasks = 10, 4

        def add_many(server: ServerThread, into: list) -> None:
            async def work() -> None:
                import trio

                async def one() -> None:
                    for _ in range(per_task):
                        into.append(await server.runtime.store.add_amount("test:spend", "shared", "", 0.5))

                async with trio.open_nursery() as nursery:
                    for _ in range(tasks):
                        nursery.start_soon(one)

            server.run(work)

        results: list[list[float]] = [[], []]
        threads = [threading.Thread(target=add_many, args=(server, into)) for server, into in zip(servers, results)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(60)
        total = 2 * tasks * per_task
        returned = sorted(results[0] + results[1])
        assert returned == [0.5 * n for n in range(1, total + 1)]
        assert servers[1].run(servers[1].runtime.store.amount, "test:spend", "shared", "") == 0.5 * total

        async def race(server: ServerThread) -> list[str]:
            import trio

            outcomes: list[str] = []

            async def put(i: int) -> None:
                try:
                    await server.runtime.store.put_record("test:key", f"racer-{i}", {"i": i}, "contested")
                    outcomes.append("won")
                except ValueError:
                    outcomes.append("taken")

            async with trio.open_nursery() as nursery:
                for i in range(10):
                    nursery.start_soon(put, i)
            return outcomes

        outcomes = servers[0].run(race, servers[0])
        assert sorted(outcomes) == ["taken"] * 9 + ["won"]
    finally:
        for server in servers:
            server.stop()


# -- the outbox (contract 1.5) ------------------------------------------------------------------------


def test_the_outbox_leases_each_item_to_one_worker_and_settles_it(store_url):
    """Two servers claiming one queue at once, from several tasks each: every
    item is leased to exactly one claimer; a lease that ran out is claimed
    again and the late owner's settle is refused; done items stay done, a
    retry by hand makes them pending."""
    from streamvisor.hooks import OutboxItem, QueueStore

    servers = [start(store_toml(store_url)), start(store_toml(store_url))]
    try:
        store = servers[0].runtime.store
        assert isinstance(store, QueueStore)
        run = servers[0].run
        items = [OutboxItem("test:q", f"m{i:03d}", {"n": i}) for i in range(60)]
        run(store.enqueue, items)
        run(store.enqueue, items[:5])  # ids already there: nothing more
        later = OutboxItem("test:q", "later", {}, due_at=time.time() + 3600)
        run(store.enqueue, [later])

        def claim_all(server: ServerThread, owner: str, into: list) -> None:
            async def work() -> None:
                import trio

                async def one() -> None:
                    while True:
                        got = await server.runtime.store.claim("test:q", owner, 4, 60)
                        if not got:
                            return
                        into.extend(got)

                async with trio.open_nursery() as nursery:
                    for _ in range(3):
                        nursery.start_soon(one)

            server.run(work)

        claimed: list[list] = [[], []]
        threads = [threading.Thread(target=claim_all, args=(server, f"w{n}", into)) for n, (server, into) in enumerate(zip(servers, claimed))]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(60)
        ids = [item.id for item in claimed[0] + claimed[1]]
        assert sorted(ids) == [f"m{i:03d}" for i in range(60)]  # each once; "later" is not due
        assert all(item.lease_owner == "w0" for item in claimed[0]) and all(item.lease_owner == "w1" for item in claimed[1])
        first = claimed[0][0] if claimed[0] else claimed[1][0]
        owner = first.lease_owner
        assert run(store.settle, "test:q", first.id, "someone-else", "done", {}) is False
        assert run(store.settle, "test:q", first.id, owner, "pending", {"tries": 1}, time.time() - 1) is True
        # Pending and due again: claimable, with its new data.
        again = run(store.claim, "test:q", "w2", 10, 0.2)
        assert [(i.id, i.data) for i in again] == [(first.id, {"tries": 1})]
        time.sleep(0.3)  # its lease runs out: another worker takes it, and w2 can no longer settle
        assert [i.id for i in run(store.claim, "test:q", "w3", 10, 60)] == [first.id]
        assert run(store.settle, "test:q", first.id, "w2", "done", {}) is False
        assert run(store.requeue, "test:q", first.id, time.time()) is False  # leased right now
        assert run(store.settle, "test:q", first.id, "w3", "done", {"ok": True}) is True
        assert run(store.claim, "test:q", "w4", 10, 60) == []
        shown = run(store.queue_item, "test:q", first.id)
        assert shown.state == "done" and shown.data == {"ok": True} and shown.lease_owner is None
        # Several at once, in one transaction: each answered on its own.
        second, third = [i for i in claimed[0] + claimed[1] if i.id != first.id and i.lease_owner == owner][:2]
        settlements = [(second.id, "dead", {"why": "gone"}, None), ("m999", "done", {}, None), (third.id, "done", {}, None)]
        assert run(store.settle_many, "test:q", owner, settlements) == [True, False, True]
        assert run(store.queue_item, "test:q", second.id).state == "dead"
        # By hand: pending again, claimable once more.
        assert run(store.requeue, "test:q", first.id, time.time()) is True
        assert [i.id for i in run(store.claim, "test:q", "w5", 10, 60)] == [first.id]
        # Newest first, in pages, by state.
        page = run(store.queue_items, "test:q", 3)
        assert [i.id for i in page] == ["later", "m059", "m058"]
        assert [i.id for i in run(store.queue_items, "test:q", 2, (page[-1].created_at, page[-1].id))] == ["m057", "m056"]
        assert [i.id for i in run(store.queue_items, "test:q", 100, None, "done")] == [third.id]
    finally:
        for server in servers:
            server.stop()
