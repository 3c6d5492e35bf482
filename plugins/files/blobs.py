"""Content-addressed blobs on disk: a file's bytes live once, under their
SHA-256, however many files (of however many identities) have them.

Each blob has a count of the files that use it, an amount in the store
(`files:blob`), so that every server sharing the store and the folder agrees
on it; the blob goes when the count falls to 0. Counting and placing or
removing the blob happen under one lock, held across processes (`serve
--workers`) by an advisory lock on a file in the folder, so an upload of the
same bytes cannot land between a count reaching 0 and its blob's removal.

Every disk operation runs in a worker thread, never on the trio loop.

    FOLDER/blobs/ab/abcdef...        the bytes
    FOLDER/blobs/ab/abcdef....txt    a PDF's extracted text, made on first use
    FOLDER/tmp/*.part                uploads being received
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import hashlib
import logging
import os
import secrets
import time
from pathlib import Path
from typing import Any, AsyncIterator, BinaryIO

import trio

from .sniff import HEAD_BYTES, TextCheck

log = logging.getLogger("streamvisor.plugins.files")

BLOB_KIND = "files:blob"
#: A leftover upload (its server died mid-way) older than this is removed at
#: start-up; a younger one may be another worker's upload in progress.
STALE_PART_SECONDS = 24 * 3600
#: How often a lock held by another process is tried again.
LOCK_POLL_SECONDS = 0.005
#: The pieces a blob is read in.
READ_BYTES = 256 * 1024


class FolderLock:
    """A lock held across the tasks of this process (a trio lock) and across
    processes sharing the folder (`flock` on a lock file, tried without
    blocking so that waiting for it can be cancelled)."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self._lock = trio.Lock()
        self._fd: int | None = None

    @contextlib.asynccontextmanager
    async def held(self) -> AsyncIterator[None]:
        async with self._lock:
            if self._fd is None:
                self._fd = await trio.to_thread.run_sync(lambda: os.open(self.path, os.O_RDWR | os.O_CREAT, 0o600))
            fd = self._fd
            while True:
                try:
                    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                    break
                except OSError as exc:
                    if exc.errno not in (errno.EAGAIN, errno.EACCES):
                        raise
                await trio.sleep(LOCK_POLL_SECONDS)
            try:
                yield
            finally:
                fcntl.flock(fd, fcntl.LOCK_UN)

    def close(self) -> None:
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None


class PartFile:
    """An upload being written to a temporary file: its size, SHA-256, first
    bytes and whether it is UTF-8 text, all taken as it is written. `write`
    and `finish` run in a worker thread."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.size = 0
        self.head = b""
        self.sha256 = ""
        self.is_text = True
        self._hash = hashlib.sha256()
        self._text = TextCheck()
        self._file: BinaryIO | None = None

    def write(self, data: bytes) -> None:
        if self._file is None:
            self._file = open(self.path, "xb")
        self._file.write(data)
        self._hash.update(data)
        self._text.feed(data)
        if len(self.head) < HEAD_BYTES:
            self.head += data[: HEAD_BYTES - len(self.head)]
        self.size += len(data)

    @property
    def text_so_far(self) -> bool:
        """Whether what was written so far is UTF-8 text (a later byte may
        still make it not)."""
        return self._text.text

    def finish(self) -> None:
        """Flush the bytes to disk (the store will point at them)."""
        if self._file is None:
            self._file = open(self.path, "xb")
        self._file.flush()
        os.fsync(self._file.fileno())
        self._file.close()
        self.sha256 = self._hash.hexdigest()
        self.is_text = self._text.finish()

    def discard(self) -> None:
        """Remove what was written (not in a thread: on the way out of a
        cancelled request too; closing and unlinking do not wait for the disk)."""
        if self._file is not None and not self._file.closed:
            self._file.close()
        with contextlib.suppress(FileNotFoundError):
            self.path.unlink()


class BlobStore:
    """The blobs under one folder, and their counts in a `RecordStore`."""

    def __init__(self, folder: Path, records: Any) -> None:
        self.folder = folder
        self.records = records
        self.blobs = folder / "blobs"
        self.tmp = folder / "tmp"
        self.lock = FolderLock(folder / ".lock")

    async def open(self) -> None:
        def prepare() -> int:
            self.blobs.mkdir(parents=True, exist_ok=True)
            self.tmp.mkdir(parents=True, exist_ok=True)
            removed = 0
            cutoff = time.time() - STALE_PART_SECONDS
            for part in self.tmp.glob("*.part"):
                with contextlib.suppress(FileNotFoundError):
                    if part.stat().st_mtime < cutoff:
                        part.unlink()
                        removed += 1
            return removed

        removed = await trio.to_thread.run_sync(prepare)
        if removed:
            log.info("files: removed %d uploads left unfinished over a day ago in %s", removed, self.tmp)

    def close(self) -> None:
        self.lock.close()

    def part_file(self) -> PartFile:
        return PartFile(self.tmp / f"{os.getpid()}-{secrets.token_hex(8)}.part")

    def path(self, sha256: str) -> Path:
        return self.blobs / sha256[:2] / sha256

    def text_path(self, sha256: str) -> Path:
        return self.blobs / sha256[:2] / f"{sha256}.txt"

    async def keep(self, part: PartFile) -> None:
        """Count one more file using `part`'s bytes, and put them in place
        unless the same bytes are there already (the part is removed then)."""
        target = self.path(part.sha256)

        def place() -> None:
            target.parent.mkdir(parents=True, exist_ok=True)
            if target.exists():
                part.discard()
            else:
                os.replace(part.path, target)

        async with self.lock.held():
            await self.records.add_amount(BLOB_KIND, part.sha256, "", 1)
            try:
                await trio.to_thread.run_sync(place)
            except BaseException:
                with trio.CancelScope(shield=True), trio.move_on_after(5):
                    await self.records.add_amount(BLOB_KIND, part.sha256, "", -1)
                raise

    async def release(self, sha256: str) -> None:
        """One file fewer uses these bytes: the last one takes them away."""
        async with self.lock.held():
            left = await self.records.add_amount(BLOB_KIND, sha256, "", -1)
            if left > 0:
                return

            def remove() -> None:
                for path in (self.path(sha256), self.text_path(sha256)):
                    with contextlib.suppress(FileNotFoundError):
                        path.unlink()

            await trio.to_thread.run_sync(remove)

    async def exists(self, sha256: str) -> bool:
        return await trio.to_thread.run_sync(self.path(sha256).exists)

    async def read(self, sha256: str) -> bytes:
        return await trio.to_thread.run_sync(self.path(sha256).read_bytes)

    async def chunks(self, sha256: str) -> AsyncIterator[bytes]:
        """The blob's bytes, a piece at a time; the file is opened by the
        caller's first read and closed when the iteration ends or is dropped."""
        handle = await trio.to_thread.run_sync(open, self.path(sha256), "rb")
        try:
            while True:
                data = await trio.to_thread.run_sync(handle.read, READ_BYTES)
                if not data:
                    return
                yield data
        finally:
            handle.close()
