"""The files plugin against real servers, with the official `openai` client:
the Files API (upload, list, retrieve, content, delete), blobs shared by
identical uploads, uploads streamed to disk with their limits, declared types
checked, quotas, privacy between identities, and files used in chats (text,
PDF, passed through to a provider that reads files itself, too large for the
model's context)."""

from __future__ import annotations

import base64
import time
from pathlib import Path
from typing import Any, Iterator

import httpx
import openai
import pytest

from streamvisor.hooks import unwrap
from streamvisor.testing import FakeUpstream

from .conftest import ServerThread, start_server

ADMIN_KEY = "files-test-admin-key"
ADMIN = {"Authorization": f"Bearer {ADMIN_KEY}"}

MODELS = """
[plugins.scripted]
[[plugins.scripted.models]]
name = "echo"
echo = true

[[plugins.scripted.models]]
name = "echo-small"
echo = true
context_length = 100
"""

NOTES = b"# Release notes\n\nThe launch code word is *marmalade*.\n\n| week | goal |\n| --- | --- |\n| 1 | ship |\n"


def files_toml(tmp_path: Path, files: str = "", extra: str = "") -> str:
    return f"""
{MODELS}
{extra}
[plugins.files]
folder = "{tmp_path / 'files'}"
{files}

[plugins.store]
url = "sqlite:///{tmp_path / 'store.db'}"
"""


@pytest.fixture
def server(tmp_path: Path) -> Iterator[ServerThread]:
    with start_server(files_toml(tmp_path, "max_file_bytes = 8388608"), log_level="info") as server:
        yield server


@pytest.fixture
def client(server: ServerThread) -> openai.OpenAI:
    return server.openai()


def blobs(tmp_path: Path) -> list[Path]:
    return sorted(p for p in (tmp_path / "files" / "blobs").rglob("*") if p.is_file())


def parts(tmp_path: Path) -> list[Path]:
    return sorted((tmp_path / "files" / "tmp").glob("*.part"))


def tiny_pdf(*lines: str) -> bytes:
    """A one-page PDF whose text is `lines`, written by hand (objects, xref
    table and trailer), as small as a valid PDF gets."""
    text = b" T* ".join(b"(" + line.encode("latin-1") + b") Tj" for line in lines)
    content = b"BT /F1 14 Tf 16 TL 72 720 Td " + text + b" ET"
    objects = [
        b"<< /Type /Catalog /Pages 2 0 R >>",
        b"<< /Type /Pages /Kids [3 0 R] /Count 1 >>",
        b"<< /Type /Page /Parent 2 0 R /MediaBox [0 0 612 792] /Contents 4 0 R /Resources << /Font << /F1 5 0 R >> >> >>",
        b"<< /Length %d >>\nstream\n" % len(content) + content + b"\nendstream",
        b"<< /Type /Font /Subtype /Type1 /BaseFont /Helvetica >>",
    ]
    out = b"%PDF-1.4\n"
    offsets = []
    for number, body in enumerate(objects, start=1):
        offsets.append(len(out))
        out += b"%d 0 obj\n" % number + body + b"\nendobj\n"
    xref = len(out)
    out += b"xref\n0 %d\n0000000000 65535 f \n" % (len(objects) + 1)
    out += b"".join(b"%010d 00000 n \n" % offset for offset in offsets)
    out += b"trailer\n<< /Size %d /Root 1 0 R >>\nstartxref\n%d\n%%%%EOF\n" % (len(objects) + 1, xref)
    return out


def asking(file_id: str, question: str = "What is the code word?") -> list[dict[str, Any]]:
    return [{"role": "user", "content": [{"type": "text", "text": question}, {"type": "file", "file": {"file_id": file_id}}]}]


# -- the Files API ----------------------------------------------------------------------


def test_the_openai_client_uploads_lists_retrieves_reads_and_deletes(server, client, tmp_path):
    notes = client.files.create(file=("notes.md", NOTES), purpose="user_data")
    assert notes.id.startswith("file-") and notes.object == "file" and notes.status == "processed"
    assert (notes.bytes, notes.filename, notes.purpose) == (len(NOTES), "notes.md", "user_data")
    assert abs(notes.created_at - time.time()) < 60

    data = client.files.create(file=("rows.csv", b"a,b\n1,2\n"), purpose="assistants")
    assert client.files.retrieve(notes.id).model_dump() == notes.model_dump()
    assert client.files.content(notes.id).read() == NOTES

    # Newest first; a purpose filters; pages follow `after` (the client's
    # auto-pagination walks them).
    assert [f.id for f in client.files.list()] == [data.id, notes.id]
    assert [f.id for f in client.files.list(purpose="user_data")] == [notes.id]
    assert [f.id for f in client.files.list(order="asc")] == [notes.id, data.id]
    first = client.files.list(limit=1)
    assert [f.id for f in first.data] == [data.id] and first.has_more
    assert [f.id for f in client.files.list(limit=1)] == [data.id, notes.id]  # page after page
    assert [f.id for f in client.files.list(after=data.id)] == [notes.id]

    raw = server.http().get(f"/v1/files/{notes.id}/content")
    assert raw.headers["content-type"] == "text/markdown; charset=utf-8"
    assert raw.headers["content-disposition"] == "attachment; filename*=UTF-8''notes.md"
    assert raw.headers["x-content-type-options"] == "nosniff"

    deleted = client.files.delete(notes.id)
    assert (deleted.id, deleted.deleted) == (notes.id, True)
    with pytest.raises(openai.NotFoundError):
        client.files.retrieve(notes.id)
    with pytest.raises(openai.NotFoundError):
        client.files.delete(notes.id)
    assert [f.id for f in client.files.list()] == [data.id]


def test_identical_uploads_share_one_blob_that_goes_with_the_last_of_them(client, tmp_path):
    first = client.files.create(file=("notes.md", NOTES), purpose="user_data")
    second = client.files.create(file=("copy-of-notes.txt", NOTES), purpose="assistants")
    other = client.files.create(file=("other.txt", b"something else\n"), purpose="user_data")
    assert first.id != second.id
    assert len(blobs(tmp_path)) == 2  # the notes once, the other file once

    client.files.delete(first.id)
    assert client.files.content(second.id).read() == NOTES
    assert len(blobs(tmp_path)) == 2
    client.files.delete(second.id)
    assert len(blobs(tmp_path)) == 1
    client.files.delete(other.id)
    assert blobs(tmp_path) == [] and parts(tmp_path) == []


def test_an_upload_is_written_as_it_arrives_and_one_past_the_limit_is_413_and_leaves_nothing(server, client, tmp_path):
    # Larger than [server] max_body_bytes (4 MiB), within the route's own limit.
    big = client.files.create(file=("big.txt", b"x" * (6 << 20)), purpose="user_data")
    assert big.bytes == 6 << 20
    chat_body = {"model": "echo", "messages": [{"role": "user", "content": "x" * (5 << 20)}]}
    assert server.http().post("/v1/chat/completions", json=chat_body).status_code == 413

    # A client streaming 12 MiB (chunked, no Content-Length) to a limit of 8:
    # the file is on disk while it arrives, and gone after the refusal.
    seen_on_disk = []

    def body() -> Iterator[bytes]:
        yield b'--B\r\nContent-Disposition: form-data; name="purpose"\r\n\r\nuser_data\r\n'
        yield b'--B\r\nContent-Disposition: form-data; name="file"; filename="huge.txt"\r\nContent-Type: text/plain\r\n\r\n'
        for sent in range(1, 25):
            yield b"y" * (512 << 10)
            if sent == 6:  # 3 MiB sent: at least 2 of them are written by now
                deadline = time.monotonic() + 5
                while time.monotonic() < deadline:
                    found = [p.stat().st_size for p in parts(tmp_path)]
                    if found and found[0] >= 2 << 20:
                        seen_on_disk.append(found[0])
                        break
                    time.sleep(0.01)
        yield b"\r\n--B--\r\n"

    refused = httpx.post(f"{server.url}/v1/files", content=body(), headers={"Content-Type": "multipart/form-data; boundary=B"}, timeout=30)
    assert refused.status_code == 413, refused.text
    assert refused.json()["error"]["code"] == "file_too_large" and "8388608" in refused.json()["error"]["message"]
    assert seen_on_disk, "the upload was not written to disk while it arrived"
    assert parts(tmp_path) == []

    # With a Content-Length past the limit, the refusal comes before the body.
    with pytest.raises(openai.APIStatusError) as caught:
        client.files.create(file=("huge.txt", b"z" * (9 << 20)), purpose="user_data")
    assert caught.value.status_code == 413
    assert parts(tmp_path) == [] and [f.id for f in client.files.list()] == [big.id]


def test_a_file_whose_content_is_not_what_it_declares_is_400(client, tmp_path):
    pdf = tiny_pdf("Quarterly report")
    for name, content in [("notes.md", pdf), ("report.pdf", b"just some text\n"), ("photo.png", pdf), ("data.json", b"\x00\x01\x02\xff")]:
        with pytest.raises(openai.BadRequestError) as caught:
            client.files.create(file=(name, content), purpose="user_data")
        error = caught.value.body
        assert error["code"] == "file_type_mismatch" and name in error["message"], error
    # The same bytes under an honest name are fine; an unknown name takes the content's word.
    assert client.files.create(file=("report.pdf", pdf), purpose="user_data").bytes == len(pdf)
    assert client.files.create(file=("README", b"plain words\n"), purpose="user_data").filename == "README"
    assert parts(tmp_path) == []


def test_bad_forms_are_400_with_what_is_wrong(server):
    http = server.http()
    form = {"purpose": (None, "user_data")}
    cases = [
        ({"file": ("a.txt", b"hi")}, "purpose"),
        ({"purpose": (None, "homework"), "file": ("a.txt", b"hi")}, "purpose"),
        (form, "file"),
        ({**form, "file": ("a.txt", b"")}, "empty"),
        ({**form, "expires_after[seconds]": (None, "3600"), "file": ("a.txt", b"hi")}, "expires_after"),
    ]
    for files, word in cases:
        answer = http.post("/v1/files", files=files)
        assert answer.status_code == 400 and word in answer.json()["error"]["message"], (word, answer.text)
    assert http.post("/v1/files", json={"purpose": "user_data"}).json()["error"]["code"] == "invalid_content_type"
    truncated = http.post("/v1/files", content=b'--B\r\nContent-Disposition: form-data; name="purpose"\r\n\r\nuser_data', headers={"Content-Type": "multipart/form-data; boundary=B"})
    assert truncated.status_code == 400 and "closing boundary" in truncated.json()["error"]["message"]
    assert http.get("/v1/files", params={"limit": "0"}).status_code == 400
    assert http.get("/v1/files/not-a-file-id").status_code == 404


def test_the_quota_of_an_identity_is_refused_with_403_and_freed_by_a_delete(tmp_path):
    with start_server(files_toml(tmp_path, "quota_bytes = 1000\nmax_files = 3")) as server:
        client = server.openai()
        first = client.files.create(file=("a.txt", b"a" * 600), purpose="user_data")
        with pytest.raises(openai.PermissionDeniedError) as caught:
            client.files.create(file=("b.txt", b"b" * 600), purpose="user_data")
        assert caught.value.body["code"] == "quota_exceeded" and "400 bytes left" in caught.value.body["message"]
        client.files.create(file=("b.txt", b"b" * 300), purpose="user_data")
        client.files.create(file=("c.txt", b"c" * 10), purpose="user_data")
        with pytest.raises(openai.PermissionDeniedError) as caught:
            client.files.create(file=("d.txt", b"d"), purpose="user_data")
        assert "max_files" in caught.value.body["message"]
        client.files.delete(first.id)
        assert client.files.create(file=("e.txt", b"e" * 600), purpose="user_data").bytes == 600
        assert parts(tmp_path) == []


def test_a_slow_upload_outlasts_the_route_timeout_while_its_bytes_keep_coming(tmp_path):
    with start_server(files_toml(tmp_path), route_timeout_seconds=0.5) as server:

        def body() -> Iterator[bytes]:
            yield b'--B\r\nContent-Disposition: form-data; name="purpose"\r\n\r\nuser_data\r\n'
            yield b'--B\r\nContent-Disposition: form-data; name="file"; filename="slow.txt"\r\n\r\n'
            for _ in range(8):
                time.sleep(0.15)
                yield b"s" * 1024
            yield b"\r\n--B--\r\n"

        answer = httpx.post(f"{server.url}/v1/files", content=body(), headers={"Content-Type": "multipart/form-data; boundary=B"}, timeout=30)
        assert answer.status_code == 200, answer.text
        assert answer.json()["bytes"] == 8 * 1024


# -- identities --------------------------------------------------------------------------


def test_another_identitys_file_is_404_in_the_files_api_and_in_chats(tmp_path, monkeypatch):
    monkeypatch.setenv("STREAMVISOR_ADMIN_KEY", ADMIN_KEY)
    with start_server(files_toml(tmp_path, extra="[plugins.keys]\n")) as server:

        def key(identity: str) -> str:
            created = httpx.post(f"{server.url}/admin/keys", json={"identity": identity}, headers=ADMIN)
            assert created.status_code == 201, created.text
            return created.json()["secret"]

        alice, bob = server.openai(api_key=key("alice")), server.openai(api_key=key("bob"))
        secret = alice.files.create(file=("diary.md", b"Alice's secret: the tulips.\n"), purpose="user_data")
        mine = bob.files.create(file=("bob.md", b"Bob's notes.\n"), purpose="user_data")

        assert [f.id for f in bob.files.list()] == [mine.id]
        for call in (bob.files.retrieve, bob.files.content, bob.files.delete):
            with pytest.raises(openai.NotFoundError) as caught:
                call(secret.id)
            assert caught.value.body["message"] == f"No such File object: {secret.id}"
        for stream in (False, True):
            with pytest.raises(openai.NotFoundError) as caught:
                bob.chat.completions.create(model="echo", messages=asking(secret.id), stream=stream)
            assert caught.value.body["code"] == "file_not_found" and caught.value.body["param"] == "messages[0].content[1].file.file_id"

        # Alice still has it, and her chat reads it.
        assert alice.files.content(secret.id).read() == b"Alice's secret: the tulips.\n"
        answer = alice.chat.completions.create(model="echo", messages=asking(secret.id, "Which flowers?"))
        assert "the tulips" in answer.choices[0].message.content


# -- files in chats ----------------------------------------------------------------------


def test_a_chat_that_references_a_markdown_file_answers_from_its_content(client):
    notes = client.files.create(file=("notes.md", NOTES), purpose="user_data")
    answer = client.chat.completions.create(model="echo", messages=asking(notes.id))
    text = answer.choices[0].message.content
    assert text.startswith('What is the code word?<file name="notes.md" type="text/markdown">')
    assert "The launch code word is *marmalade*." in text and text.endswith("</file>")
    assert answer.usage.prompt_tokens > 15  # the file's words reached the model's prompt

    streamed = client.chat.completions.create(model="echo", messages=asking(notes.id), stream=True)
    assert "".join(c.choices[0].delta.content or "" for c in streamed if c.choices) == text


def test_a_pdfs_text_reaches_the_prompt(client, tmp_path):
    report = client.files.create(file=("report.pdf", tiny_pdf("Revenue grew by 42 percent.", "Costs fell.")), purpose="user_data")
    text = client.chat.completions.create(model="echo", messages=asking(report.id, "Summarise:")).choices[0].message.content
    assert text.startswith('Summarise:<file name="report.pdf" type="application/pdf">')
    assert "Revenue grew by 42 percent." in text and "Costs fell." in text
    # Extracted once: the text is kept beside the blob for the next chat.
    assert [p.suffix for p in blobs(tmp_path)] == ["", ".txt"]
    again = client.chat.completions.create(model="echo", messages=asking(report.id, "Summarise:")).choices[0].message.content
    assert again == text

    broken = client.files.create(file=("broken.pdf", b"%PDF-1.4\nthis is not really a PDF\n"), purpose="user_data")
    with pytest.raises(openai.BadRequestError) as caught:
        client.chat.completions.create(model="echo", messages=asking(broken.id))
    assert caught.value.body["code"] == "unreadable_file" and "broken.pdf" in caught.value.body["message"]


def test_a_file_too_large_for_the_models_context_is_400_streamed_or_not(client):
    long = client.files.create(file=("long.md", b"word " * 200), purpose="user_data")  # about 250 tokens
    for stream in (False, True):
        with pytest.raises(openai.BadRequestError) as caught:
            client.chat.completions.create(model="echo-small", messages=asking(long.id), stream=stream)
        error = caught.value.body
        assert error["code"] == "context_length_exceeded" and error["param"] == "messages"
        assert "'long.md'" in error["message"] and "holds 100" in error["message"] and "Nothing was cut" in error["message"]
    # The same file fits a model of a larger context.
    assert "word word" in client.chat.completions.create(model="echo", messages=asking(long.id)).choices[0].message.content
    image = client.files.create(file=("dot.png", b"\x89PNG\r\n\x1a\n" + b"\x00" * 64), purpose="vision")
    with pytest.raises(openai.BadRequestError) as caught:
        client.chat.completions.create(model="echo", messages=asking(image.id))
    assert caught.value.body["code"] == "unsupported_file_type"


def test_a_provider_that_reads_files_gets_the_pdf_itself_and_a_fallback_gets_its_text(tmp_path):
    pdf = tiny_pdf("The answer is forty-two.")
    with FakeUpstream(models=["gpt-files"]) as upstream:
        upstream.stream("I read it.")
        extra = f"""
[plugins.openai]
[[plugins.openai.upstreams]]
name = "fake"
base_url = "{upstream.url}"
models = ["gpt-files"]

[plugins.retry]
attempts = 1
[plugins.retry.fallbacks]
gpt-files = ["echo"]
"""
        with start_server(files_toml(tmp_path, extra=extra)) as server:
            client = server.openai()
            report = client.files.create(file=("answer.pdf", pdf), purpose="user_data")
            assert client.chat.completions.create(model="gpt-files", messages=asking(report.id)).choices[0].message.content == "I read it."
            part = upstream.seen_bodies[-1]["messages"][0]["content"][1]
            assert part["type"] == "file" and part["file"]["filename"] == "answer.pdf"
            assert part["file"]["file_data"].startswith("data:application/pdf;base64,")
            assert base64.b64decode(part["file"]["file_data"].split(",", 1)[1]) == pdf

            # The upstream fails: the fallback (which reads no files) gets the text.
            upstream.fail_next(1, status=503)
            text = client.chat.completions.create(model="gpt-files", messages=asking(report.id)).choices[0].message.content
            assert "The answer is forty-two." in text and text.startswith("What is the code word?<file name=\"answer.pdf\"")


def test_without_a_store_that_keeps_records_start_up_stops_saying_so(tmp_path):
    with pytest.raises(RuntimeError) as caught:
        with start_server(f'{MODELS}\n[plugins.files]\nfolder = "{tmp_path}"\n'):
            pass
    error = str(unwrap(caught.value.__cause__))
    assert "plugins.files" in error and "enable the store plugin" in error
