"""Receiving one `POST /v1/files` body: a multipart/form-data stream parsed
as it arrives (python-multipart), its fields kept (small, bounded) and its one
file written to a part file, never held whole.

What is held at a time: one piece of the body from the network, and at most
`FLUSH_BYTES` of the file waiting for its write in a worker thread. The file
is checked against what the client declared as soon as its first bytes are
in (a PDF named notes.md is refused before the rest is read), and once more
at its end (a text file must be UTF-8 throughout).
"""

from __future__ import annotations

import logging
import unicodedata
from typing import Any, AsyncIterator

import trio
from python_multipart.exceptions import FormParserError
from python_multipart.multipart import MultipartParser, parse_options_header

from streamvisor.hooks import APIError, InvalidRequest

from .blobs import PartFile
from .sniff import HEAD_BYTES, Declared, Mismatch

# python-multipart logs a warning for each malformed byte a client sends
# before it raises: the client gets its 400, and the log is not the place.
logging.getLogger("python_multipart.multipart").setLevel(logging.ERROR)

#: File bytes gathered before they are written (in a worker thread).
FLUSH_BYTES = 1024 * 1024
#: The fields besides the file are small: `purpose` and the like.
MAX_FIELD_BYTES = 4096
MAX_PARTS = 16
MAX_FILENAME_CHARS = 255


def too_large(limit: int) -> APIError:
    return APIError(
        f"The file is larger than this server's limit of {limit} bytes (max_file_bytes).",
        status=413,
        type="invalid_request_error",
        code="file_too_large",
        param="file",
    )


def boundary_of(content_type: str | None) -> bytes:
    kind, options = parse_options_header(content_type or "")
    boundary = options.get(b"boundary")
    if kind != b"multipart/form-data" or not boundary:
        raise InvalidRequest(
            "A file is uploaded as multipart/form-data, with the fields 'file' and 'purpose'.",
            code="invalid_content_type",
        )
    return boundary


def clean_filename(raw: bytes) -> str:
    """The name a client gave a file, as a plain name: its folder (a browser
    may send a whole path) and control characters dropped, at most
    MAX_FILENAME_CHARS characters."""
    try:
        name = raw.decode("utf-8")
    except UnicodeDecodeError:
        name = raw.decode("latin-1")
    name = name.replace("\\", "/").rsplit("/", 1)[-1]
    name = "".join(ch for ch in name if unicodedata.category(ch)[0] != "C").strip()
    if len(name) > MAX_FILENAME_CHARS:
        stem, dot, ext = name.rpartition(".")
        ext = ext if dot and len(ext) <= 16 else ""
        name = name[: MAX_FILENAME_CHARS - len(ext) - 1] + "." + ext if ext else name[:MAX_FILENAME_CHARS]
    return name


class MultipartUpload:
    """One upload's parser state. `receive(chunks)` reads the body; then
    `fields`, `filename`, `declared` and `part` (written and flushed) are set.

    `limit` is what the file may weigh (the smaller of max_file_bytes and
    what the identity's quota has left); `over_limit` builds the error for
    a file past it.
    """

    def __init__(self, boundary: bytes, part: PartFile, limit: int, over_limit: Any) -> None:
        self.part = part
        self.limit = limit
        self.over_limit = over_limit
        self.fields: dict[str, str] = {}
        self.filename: str | None = None
        self.declared: Declared | None = None
        self.ended = False
        self._parts = 0
        self._headers: dict[str, bytes] = {}
        self._header_name = bytearray()
        self._header_value = bytearray()
        self._in_file = False
        self._field: str | None = None
        self._value = bytearray()
        self._pending = bytearray()
        self._size = 0
        self._checked = False
        self.parser = MultipartParser(
            boundary,
            {
                "on_part_begin": self._part_begin,
                "on_header_field": lambda data, start, end: self._header_name.extend(data[start:end]),
                "on_header_value": lambda data, start, end: self._header_value.extend(data[start:end]),
                "on_header_end": self._header_end,
                "on_headers_finished": self._headers_finished,
                "on_part_data": self._part_data,
                "on_part_end": self._part_end,
                "on_end": self._end,
            },
            max_header_count=8,
            max_header_size=4096,
        )

    # -- the parser's callbacks (synchronous, within parser.write) ---------------------------

    def _part_begin(self) -> None:
        self._parts += 1
        if self._parts > MAX_PARTS:
            raise InvalidRequest(f"The form has more than {MAX_PARTS} parts.")
        self._headers = {}

    def _header_end(self) -> None:
        self._headers[bytes(self._header_name).decode("latin-1").strip().lower()] = bytes(self._header_value).strip()
        self._header_name.clear()
        self._header_value.clear()

    def _headers_finished(self) -> None:
        disposition, options = parse_options_header(self._headers.get("content-disposition", b"").decode("latin-1"))
        name = options.get(b"name", b"").decode("latin-1")
        if disposition != b"form-data" or not name:
            raise InvalidRequest("Each part of the form needs a Content-Disposition: form-data with a name.")
        if name == "file":
            if self.filename is not None:
                raise InvalidRequest("Send one file per upload ('file' came twice).", param="file")
            filename = clean_filename(options.get(b"filename", b""))
            if not filename:
                raise InvalidRequest("The file needs a name (the filename of the 'file' part).", param="file")
            self.filename = filename
            self.declared = Declared.of(self._headers.get("content-type", b"").decode("latin-1"), filename)
            self._in_file = True
        else:
            if name in self.fields:
                raise InvalidRequest(f"'{name[:64]}' came twice.", param=name[:64])
            self._in_file = False
            self._field = name
            self._value.clear()

    def _part_data(self, data: bytes, start: int, end: int) -> None:
        if self._in_file:
            self._size += end - start
            if self._size > self.limit:
                raise self.over_limit()
            self._pending += data[start:end]
        else:
            self._value += data[start:end]
            if len(self._value) > MAX_FIELD_BYTES:
                raise InvalidRequest(f"The field '{(self._field or '')[:64]}' is longer than {MAX_FIELD_BYTES} bytes.")

    def _part_end(self) -> None:
        if self._in_file:
            self._in_file = False
        elif self._field is not None:
            try:
                self.fields[self._field] = self._value.decode("utf-8")
            except UnicodeDecodeError:
                raise InvalidRequest(f"The field '{self._field[:64]}' is not UTF-8 text.") from None
            self._field = None

    def _end(self) -> None:
        self.ended = True

    # -- reading the body ------------------------------------------------------------------

    async def receive(self, chunks: AsyncIterator[bytes]) -> None:
        """Read the whole body, writing the file as it comes; raises an
        `APIError` for what the client must change."""
        async for chunk in chunks:
            if self.ended:
                continue  # an epilogue after the last boundary: ignored
            try:
                self.parser.write(chunk)
            except FormParserError as exc:
                raise InvalidRequest(f"The multipart body is malformed: {exc}.") from None
            if len(self._pending) >= FLUSH_BYTES:
                await self._flush()
        if not self.ended:
            raise InvalidRequest("The multipart body ended before its closing boundary.")
        await self._flush()
        await trio.to_thread.run_sync(self.part.finish)

    async def _flush(self) -> None:
        if not self._pending:
            return
        data, self._pending = bytes(self._pending), bytearray()
        await trio.to_thread.run_sync(self.part.write, data)
        if not self._checked and len(self.part.head) >= HEAD_BYTES:
            self._checked = True
            self.check_type(final=False)

    def check_type(self, final: bool = True) -> str:
        """The file's type; a 400 when its content contradicts its declared
        type. Before the end, only the start of the file is judged."""
        assert self.declared is not None
        try:
            return self.declared.check(self.part.head, self.part.is_text if final else self.part.text_so_far)
        except Mismatch as exc:
            raise InvalidRequest(f"The file '{self.filename}' is not what it is declared to be: {exc}.", param="file", code="file_type_mismatch") from None
