"""Files in chats: a content part `{"type": "file", "file": {"file_id":
"file-…"}}`, as in OpenAI's chat API, made into what the model called can
read, just before it is called.

- A text file (plain text, markdown, CSV, JSON, source code) becomes a text
  part that carries its name: `<file name="notes.md" type="text/markdown">`,
  its text, `</file>`.
- A PDF goes to a provider that takes files itself (`accepts_files = True`)
  as OpenAI's inline form, `{"type": "file", "file": {"filename",
  "file_data": "data:application/pdf;base64,…"}}`; for any other its text is
  extracted (pypdf, in a worker thread, once: the text is kept beside the
  blob) and becomes a text part like a text file's.
- Anything else is refused: a model cannot be given an image or an archive
  as a file here.

Nothing is cut: when the messages with the files' text do not fit the
model's context (its `ModelInfo.context_length`, else the plugin's
settings), the request is refused with a 400 `context_length_exceeded` that
names the files. The estimate is the runtime's (about four characters a
token); a provider that counts exactly still refuses what the estimate let
through.
"""

from __future__ import annotations

import base64
import html
import logging
import os
from typing import Any

import attrs
import trio

from streamvisor.hooks import ChatRequest, InvalidRequest

from .sniff import PDF, is_text_type

log = logging.getLogger("streamvisor.plugins.files")

#: Files one request may reference.
MAX_FILES_PER_REQUEST = 32
#: Characters per token in the estimate (the runtime's own, for usage).
CHARS_PER_TOKEN = 4
#: A UTF-8 character is at most 4 bytes: a text file of more than
#: 4 * CHARS_PER_TOKEN bytes per token of context cannot fit, read or not.
MAX_BYTES_PER_TOKEN = 4 * CHARS_PER_TOKEN


@attrs.frozen
class FileRef:
    """A file part of a request: where it is, and the file it names."""

    message: int
    part: int
    file_id: str

    @property
    def param(self) -> str:
        return f"messages[{self.message}].content[{self.part}].file.file_id"


def file_refs(messages: tuple[dict[str, Any], ...] | list[dict[str, Any]]) -> list[FileRef]:
    """The file parts of these messages that name an uploaded file (a part
    with `file_data` carries its file itself and is left as it is)."""
    refs: list[FileRef] = []
    for i, message in enumerate(messages):
        content = message.get("content")
        if not isinstance(content, list):
            continue
        for j, part in enumerate(content):
            if not isinstance(part, dict) or part.get("type") != "file":
                continue
            param = f"messages[{i}].content[{j}].file"
            file = part.get("file")
            if not isinstance(file, dict):
                raise InvalidRequest(f"'{param}' must be an object with a 'file_id' (or 'file_data')", param=param)
            file_id = file.get("file_id")
            if file_id is None and file.get("file_data") is not None:
                continue
            if not isinstance(file_id, str) or not file_id:
                raise InvalidRequest(f"'{param}.file_id' must be the id of an uploaded file (or give 'file_data')", param=f"{param}.file_id")
            refs.append(FileRef(i, j, file_id))
            if len(refs) > MAX_FILES_PER_REQUEST:
                raise InvalidRequest(f"A request may reference at most {MAX_FILES_PER_REQUEST} files.", param=param)
    return refs


def may_have_files(messages: tuple[dict[str, Any], ...]) -> bool:
    """Whether any message has content parts (the cheap test every request
    passes through)."""
    for message in messages:
        if isinstance(message.get("content"), list):
            return True
    return False


def text_part(name: str, kind: str, text: str) -> dict[str, Any]:
    end = "" if text.endswith("\n") else "\n"
    return {"type": "text", "text": f'<file name="{html.escape(name)}" type="{kind}">\n{text}{end}</file>'}


def context_error(model: str, context: int, total: int, sizes: list[tuple[str, int]]) -> InvalidRequest:
    files = ", ".join(f"'{name}' (about {tokens} tokens)" for name, tokens in sizes)
    return InvalidRequest(
        f"The files {files} do not fit in the context of the model '{model}': with the messages, the prompt comes to about "
        f"{total} tokens, and the model holds {context}. Nothing was cut: send a smaller file, or use a model with a larger context.",
        param="messages",
        code="context_length_exceeded",
    )


def extract_pdf_text(path: str, max_chars: int, max_pages: int) -> tuple[str, bool]:
    """A PDF's text, page after page, and whether it is all there: the
    extraction stops past `max_chars`. Runs in a worker thread."""
    from pypdf import PdfReader

    try:
        reader = PdfReader(path)
        if reader.is_encrypted and not reader.decrypt(""):
            raise ValueError("it is encrypted")
        if len(reader.pages) > max_pages:
            raise ValueError(f"it has {len(reader.pages)} pages, more than max_pdf_pages ({max_pages})")
        texts: list[str] = []
        size = 0
        for page in reader.pages:
            text = (page.extract_text() or "").strip()
            texts.append(text)
            size += len(text) + 2
            if size > max_chars:
                return "\n\n".join(texts), False
        return "\n\n".join(t for t in texts if t), True
    except FileNotFoundError:
        raise
    except Exception as exc:
        # A PDF comes from a client: whatever pypdf makes of a broken one
        # (its own errors, struct, zlib, recursion) is the file's fault.
        raise PdfUnreadable(str(exc).splitlines()[0][:200] if str(exc) else type(exc).__name__) from None


class PdfUnreadable(Exception):
    pass


class FileResolver:
    """Turns the file parts of a request into what its model can read.

    `files.file(identity, file_id, param)` gives a file's record (a 404 for
    another identity's), `blobs` its bytes, `settings` the plugin's.
    """

    def __init__(self, files: Any, blobs: Any, settings: Any) -> None:
        self.files = files
        self.blobs = blobs
        self.settings = settings
        #: PDFs are extracted one at a time: a large one takes a core for a while.
        self.extracting = trio.CapacityLimiter(1)

    def context_of(self, model: Any) -> int:
        return model.context_length or self.settings.context_lengths.get(model.id) or self.settings.default_context_length

    async def resolve(self, request: ChatRequest, refs: list[FileRef], route: Any) -> ChatRequest:
        native = getattr(route.provider, "accepts_files", False) is True
        context = self.context_of(route.model)
        messages = list(request.messages)
        contents: dict[int, list[Any]] = {}
        sizes: list[tuple[str, int]] = []
        for ref in refs:
            data = await self.files.file(request.identity, ref.file_id, ref.param)
            part, tokens = await self._part(data, native, context, request.model, ref.param)
            contents.setdefault(ref.message, list(messages[ref.message]["content"]))[ref.part] = part
            if tokens is not None:
                sizes.append((data["filename"], tokens))
        for index, content in contents.items():
            messages[index] = {**messages[index], "content": content}
        resolved = attrs.evolve(request, messages=tuple(messages))
        if sizes:
            total = resolved.estimate_prompt_tokens()
            if total > context:
                raise context_error(request.model, context, total, sizes)
        return resolved

    async def _part(self, data: dict[str, Any], native: bool, context: int, model: str, param: str) -> tuple[dict[str, Any], int | None]:
        """The part a file becomes, and its tokens in the estimate (None when
        the provider reads the file itself)."""
        name, kind, size = data["filename"], data["mime"], data["bytes"]
        if is_text_type(kind):
            if size > context * MAX_BYTES_PER_TOKEN:
                tokens = size // MAX_BYTES_PER_TOKEN
                raise context_error(model, context, tokens, [(name, tokens)])
            text = (await self._read(data)).decode("utf-8-sig")
            return text_part(name, kind, text), len(text) // CHARS_PER_TOKEN
        if kind == PDF:
            if native:
                if size > self.settings.max_inline_bytes:
                    raise InvalidRequest(
                        f"The file '{name}' ({size} bytes) is larger than the {self.settings.max_inline_bytes} bytes a file "
                        "passed to the provider may be (max_inline_bytes).",
                        param=param,
                        code="file_too_large",
                    )
                encoded = base64.b64encode(await self._read(data)).decode("ascii")
                return {"type": "file", "file": {"filename": name, "file_data": f"data:{PDF};base64,{encoded}"}}, None
            text = await self._pdf_text(data, context, model, param)
            return text_part(name, kind, text), len(text) // CHARS_PER_TOKEN
        raise InvalidRequest(
            f"The file '{name}' ({kind}) cannot be used in a chat: text files and PDFs can.",
            param=param,
            code="unsupported_file_type",
        )

    async def _read(self, data: dict[str, Any]) -> bytes:
        try:
            return await self.blobs.read(data["sha256"])
        except FileNotFoundError:
            log.error("files: the bytes of %s (%s) are missing from %s", data["id"], data["sha256"], self.blobs.folder)
            raise InvalidRequest(f"The content of the file '{data['filename']}' is missing on this server.", code="file_content_missing") from None

    async def _pdf_text(self, data: dict[str, Any], context: int, model: str, param: str) -> str:
        sha256, name = data["sha256"], data["filename"]
        kept = self.blobs.text_path(sha256)
        try:
            return await trio.to_thread.run_sync(lambda: kept.read_text(encoding="utf-8"))
        except FileNotFoundError:
            pass
        max_chars = context * CHARS_PER_TOKEN + 1
        path = str(self.blobs.path(sha256))
        try:
            text, complete = await trio.to_thread.run_sync(
                extract_pdf_text, path, max_chars, self.settings.max_pdf_pages, limiter=self.extracting, abandon_on_cancel=True
            )
        except PdfUnreadable as exc:
            raise InvalidRequest(f"The text of the PDF '{name}' cannot be read: {exc}.", param=param, code="unreadable_file") from None
        except FileNotFoundError:
            await self._read(data)  # the 400 of a missing blob
            raise
        if not complete:
            tokens = len(text) // CHARS_PER_TOKEN
            raise context_error(model, context, tokens, [(name, tokens)])
        if not text.strip():
            raise InvalidRequest(
                f"The PDF '{name}' has no text to extract (a scan?), and the model '{model}' does not read PDFs itself.",
                param=param,
                code="unreadable_file",
            )

        def keep() -> None:
            temporary = kept.with_name(f"{kept.name}.{os.getpid()}.tmp")
            temporary.write_text(text, encoding="utf-8")
            os.replace(temporary, kept)

        try:
            await trio.to_thread.run_sync(keep)
        except OSError as exc:  # a cache: the next chat extracts it again
            log.warning("files: the text of %s could not be kept (%s)", sha256, exc)
        return text
