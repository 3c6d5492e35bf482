"""The `files` plugin: OpenAI's Files API (`/v1/files`), and files in chats.

- **Upload.** `POST /v1/files` takes a multipart form with `file` and
  `purpose`, streamed to disk as it arrives (plugins/files/upload.py; the
  route's body limit is its own, `max_file_bytes`), checked against the type
  the client declared (plugins/files/sniff.py), and kept once per content:
  files with the same bytes share one blob (plugins/files/blobs.py).
- **Files per identity.** A file's record is in the store (`RecordStore`),
  under a kind of its owner's (`files:file:<identity>`): listing is per
  identity, and another identity's id is a 404 like an unknown one. Each
  identity has a quota of bytes and of files, kept as amounts in the store.
- **In chats.** A gate checks that the files a chat names are the caller's
  before anything runs (so a cached answer about another's file is never
  served), and a middleware makes them into what the model called reads
  (plugins/files/chat.py), after retries and fallbacks chose that model.

File ids sort newest first (`file-` and the milliseconds to the year 10889
counted down, then random): the store lists records by id, so the default
listing (newest first) reads only the page it answers.
"""

from __future__ import annotations

import logging
import re
import secrets
import time
import urllib.parse
from contextlib import aclosing
from pathlib import Path
from typing import Any, AsyncIterator

import attrs
import trio
from quart import Response, request

from streamvisor.hooks import (
    APIError,
    ChatRequest,
    ConfigError,
    Delta,
    InvalidRequest,
    NotFound,
    RecordStore,
    Session,
    body_chunks,
    current_principal,
    hookimpl,
    json_response,
    positive,
)

from .blobs import BlobStore
from .chat import FileResolver, file_refs, may_have_files
from .sniff import is_text_type
from .upload import MultipartUpload, boundary_of, too_large

log = logging.getLogger("streamvisor.plugins.files")

__all__ = ["FilesPlugin", "Settings"]

#: Amounts per identity ("" period: all time).
BYTES_KIND = "files:bytes"
COUNT_KIND = "files:count"
#: What a multipart body may carry besides the file: boundaries, headers, fields.
FORM_OVERHEAD = 64 * 1024
#: The purposes OpenAI's Files API knows.
PURPOSES = ("assistants", "batch", "fine-tune", "vision", "user_data", "evals")
FILE_ID = re.compile(r"^file-[0-9a-f]{24}$")
#: Records read per store call when listing.
PAGE = 500
MAX_LIST = 10_000
#: Milliseconds are counted down from here in ids (12 hex digits).
_ID_CLOCK = (1 << 48) - 1


def _positive_values(instance: Any, attribute: attrs.Attribute, value: dict[str, int]) -> None:
    for model, tokens in value.items():
        if isinstance(tokens, bool) or not isinstance(tokens, int) or tokens < 1:
            raise ValueError(f"{attribute.name}.{model} must be a number of tokens greater than 0, got {tokens!r}")


@attrs.frozen
class Settings:
    #: Where the blobs are: relative to the folder of plugins.toml, like the
    #: store's SQLite file. Servers sharing a store must share this folder.
    folder: str = "data/files"
    #: The largest file an upload may carry (413 past it).
    max_file_bytes: int = attrs.field(default=512 * 1024 * 1024, validator=positive)
    #: What one identity's files may weigh together (403 past it).
    quota_bytes: int = attrs.field(default=10 * 1024**3, validator=positive)
    #: How many files one identity may have.
    max_files: int = attrs.field(default=10_000, validator=positive)
    #: The context of a model whose provider does not say it, in tokens ...
    default_context_length: int = attrs.field(default=128_000, validator=positive)
    #: ... or this model's, by the name clients use.
    context_lengths: dict[str, int] = attrs.field(factory=dict, validator=_positive_values)
    #: A PDF passed to a provider that reads files itself is at most this large.
    max_inline_bytes: int = attrs.field(default=32 * 1024 * 1024, validator=positive)
    #: A PDF whose text is extracted has at most this many pages.
    max_pdf_pages: int = attrs.field(default=2000, validator=positive)


def new_file_id(now: float) -> str:
    countdown = _ID_CLOCK - int(now * 1000)
    return f"file-{countdown:012x}{secrets.token_hex(6)}"


def file_object(data: dict[str, Any]) -> dict[str, Any]:
    """A file as OpenAI's Files API shows it."""
    return {
        "id": data["id"],
        "object": "file",
        "bytes": data["bytes"],
        "created_at": data["created_at"],
        "filename": data["filename"],
        "purpose": data["purpose"],
        "status": "processed",
        "expires_at": None,
        "status_details": None,
    }


def quota_exceeded(message: str) -> APIError:
    return APIError(message, status=403, type="invalid_request_error", code="quota_exceeded", param="file")


def not_found(file_id: str, param: str | None = None) -> NotFound:
    return NotFound(f"No such File object: {file_id[:80]}", param=param, code="file_not_found")


class FilesPlugin:
    Settings = Settings
    streamvisor_contract = "1.5"

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.runtime: Any = None
        self.records: Any = None
        self.blobs: BlobStore | None = None
        self.resolver: FileResolver | None = None
        self.uploads = 0
        self.refused: dict[str, int] = {}

    # -- hooks ---------------------------------------------------------------------------

    @hookimpl
    def register_middleware(self, register: Any) -> None:
        register(self.middleware)

    @hookimpl
    def register_routes(self, register: Any, runtime: Any) -> None:
        self.runtime = runtime
        upload = {
            "summary": "Upload a file (OpenAI's Files API)",
            "description": "A multipart form with `file` and `purpose`; streamed to disk (docs/plugins/files.md).",
            "requestBody": {
                "required": True,
                "content": {
                    "multipart/form-data": {
                        "schema": {
                            "type": "object",
                            "required": ["file", "purpose"],
                            "properties": {
                                "file": {"type": "string", "format": "binary"},
                                "purpose": {"type": "string", "enum": list(PURPOSES)},
                            },
                        }
                    }
                },
            },
            "responses": {"200": _json("The file.", _FILE_SCHEMA), "413": _error("The file is larger than max_file_bytes.")},
        }
        listing = {
            "summary": "The caller's files, newest first",
            "parameters": [
                _query("purpose", {"type": "string"}, "Only files of this purpose."),
                _query("limit", {"type": "integer", "minimum": 1, "maximum": MAX_LIST}, "At most this many (10000)."),
                _query("order", {"type": "string", "enum": ["asc", "desc"]}, "By creation time (desc)."),
                _query("after", {"type": "string"}, "The files after this id, in this order."),
            ],
            "responses": {"200": _json("A list of files.", {"type": "object"})},
        }
        found = {"404": _error("No file of the caller's has this id.")}
        register("/v1/files", self.upload_view, methods=("POST",), openapi=upload, max_body_bytes=self.settings.max_file_bytes + FORM_OVERHEAD)
        register("/v1/files", self.list_view, openapi=listing)
        register("/v1/files/<file_id>", self.retrieve_view, openapi={"summary": "A file", "responses": {"200": _json("The file.", _FILE_SCHEMA), **found}})
        register(
            "/v1/files/<file_id>",
            self.delete_view,
            methods=("DELETE",),
            openapi={"summary": "Delete a file", "responses": {"200": _json("Deleted.", {"type": "object"}), **found}},
        )
        register(
            "/v1/files/<file_id>/content",
            self.content_view,
            openapi={
                "summary": "A file's bytes",
                "responses": {"200": {"description": "The bytes, with the file's type.", "content": {"*/*": {"schema": {"type": "string", "format": "binary"}}}}, **found},
            },
        )

    @hookimpl
    def register_gates(self, register: Any, runtime: Any) -> None:
        # The first hook after the store is registered.
        store = runtime.store
        if store is None or not isinstance(store, RecordStore):
            raise ConfigError(
                runtime.config.source,
                "plugins.files",
                "a store that keeps records (enable the store plugin: [plugins.store])",
                "no store" if store is None else f"the store {type(store).__name__} has no records",
            )
        self.records = store
        source = Path(runtime.config.source)
        base = source.parent if source.suffix == ".toml" else Path.cwd()
        folder = Path(self.settings.folder)
        self.blobs = BlobStore((folder if folder.is_absolute() else base / folder).resolve(), store)
        self.resolver = FileResolver(self, self.blobs, self.settings)
        register(self.gate)

    @hookimpl
    async def startup(self) -> None:
        assert self.blobs is not None
        await self.blobs.open()

    @hookimpl
    def shutdown(self) -> None:
        if self.blobs is not None:
            self.blobs.close()

    @hookimpl
    def register_status_panels(self, register: Any) -> None:
        register("files", lambda: {"folder": str(self.blobs.folder) if self.blobs else None, "uploads": self.uploads, "refused": dict(self.refused)})

    # -- records -------------------------------------------------------------------------

    @staticmethod
    def kind(identity: str) -> str:
        return f"files:file:{identity}"

    async def file(self, identity: str, file_id: str, param: str | None = None) -> dict[str, Any]:
        """The record of one of `identity`'s files; a 404 for any other id."""
        data = None
        if FILE_ID.fullmatch(file_id):
            data = await self.records.get_record(self.kind(identity), file_id)
        if data is None or data.get("deleted"):
            raise not_found(file_id, param)
        return data

    def _refuse(self, error: APIError) -> APIError:
        self.refused[error.code or str(error.status)] = self.refused.get(error.code or str(error.status), 0) + 1
        return error

    # -- the routes ----------------------------------------------------------------------

    async def upload_view(self) -> Response:
        try:
            return await self._upload()
        except APIError as exc:
            raise self._refuse(exc) from None

    async def _upload(self) -> Response:
        identity = current_principal().identity
        boundary = boundary_of(request.headers.get("Content-Type"))
        settings = self.settings
        length = request.content_length
        if length is not None and length > settings.max_file_bytes + FORM_OVERHEAD:
            raise too_large(settings.max_file_bytes)
        used = int(await self.records.amount(BYTES_KIND, identity, ""))
        room = settings.quota_bytes - used
        if room <= 0:
            raise quota_exceeded(f"Your files use {used} bytes of your quota of {settings.quota_bytes} (quota_bytes): delete some first.")
        if await self.records.amount(COUNT_KIND, identity, "") >= settings.max_files:
            raise quota_exceeded(f"You have {settings.max_files} files, as many as you may (max_files): delete some first.")
        if room < settings.max_file_bytes:
            limit = room

            def over_limit() -> APIError:
                return quota_exceeded(f"The file is larger than the {room} bytes left of your quota of {settings.quota_bytes} (quota_bytes).")
        else:
            limit = settings.max_file_bytes

            def over_limit() -> APIError:
                return too_large(settings.max_file_bytes)

        assert self.blobs is not None
        part = self.blobs.part_file()
        kept = False
        try:
            upload = MultipartUpload(boundary, part, limit, over_limit)
            await upload.receive(body_chunks())
            purpose = _purpose(upload.fields)
            if upload.filename is None:
                raise InvalidRequest("'file' is required: the file to upload.", param="file")
            if part.size == 0:
                raise InvalidRequest(f"The file '{upload.filename}' is empty.", param="file")
            mime = upload.check_type()
            data = await self._keep(identity, part, upload.filename, purpose, mime)
            kept = True
        finally:
            if not kept:
                part.discard()
        self.uploads += 1
        log.info("files: %s uploaded %s (%s, %d bytes, %s)", identity, data["id"], mime, data["bytes"], purpose)
        return json_response(file_object(data))

    async def _keep(self, identity: str, part: Any, filename: str, purpose: str, mime: str) -> dict[str, Any]:
        """The file's blob, its place in the identity's quota and its record;
        on any failure (a quota another upload filled meanwhile, the store
        gone, a cancellation), what was done is undone."""
        assert self.blobs is not None
        settings, records, size = self.settings, self.records, part.size
        await self.blobs.keep(part)
        undo: list[tuple[str, float]] = []
        try:
            total = await records.add_amount(BYTES_KIND, identity, "", size)
            undo.append((BYTES_KIND, -size))
            if total > settings.quota_bytes:
                raise quota_exceeded(f"The file ({size} bytes) does not fit in what is left of your quota of {settings.quota_bytes} bytes (quota_bytes).")
            count = await records.add_amount(COUNT_KIND, identity, "", 1)
            undo.append((COUNT_KIND, -1))
            if count > settings.max_files:
                raise quota_exceeded(f"You have {settings.max_files} files, as many as you may (max_files): delete some first.")
            now = time.time()
            data = {
                "id": new_file_id(now),
                "bytes": size,
                "created_at": int(now),
                "filename": filename,
                "purpose": purpose,
                "mime": mime,
                "sha256": part.sha256,
            }
            await records.put_record(self.kind(identity), data["id"], data)
            return data
        except BaseException:
            with trio.CancelScope(shield=True), trio.move_on_after(10):
                try:
                    for kind, amount in undo:
                        await records.add_amount(kind, identity, "", amount)
                    await self.blobs.release(part.sha256)
                except Exception as exc:
                    log.error("files: an upload of %s that failed could not be undone in the store (%s)", identity, exc)
            raise

    async def list_view(self) -> Response:
        identity = current_principal().identity
        args = request.args
        purpose = args.get("purpose")
        limit = _integer(args.get("limit"), "limit", MAX_LIST)
        order = args.get("order", "desc")
        if order not in ("asc", "desc"):
            raise InvalidRequest("'order' must be 'asc' or 'desc'", param="order")
        after = args.get("after")
        if after is not None and not FILE_ID.fullmatch(after):
            raise InvalidRequest("'after' must be the id of a file (file-...)", param="after")
        kind = self.kind(identity)
        found: list[dict[str, Any]] = []
        if order == "desc":
            # Ids sort newest first: the store's order is this listing's.
            cursor = after
            while len(found) <= limit:
                batch = await self.records.list_records(kind, PAGE, cursor)
                found += [data for _, data in batch if _selected(data, purpose)]
                if len(batch) < PAGE:
                    break
                cursor = batch[-1][0]
        else:
            # Oldest first: every record of the identity (at most max_files).
            every: list[dict[str, Any]] = []
            cursor = None
            while True:
                batch = await self.records.list_records(kind, PAGE, cursor)
                every += [data for record_id, data in batch if _selected(data, purpose) and (after is None or record_id < after)]
                if len(batch) < PAGE:
                    break
                cursor = batch[-1][0]
            found = every[::-1]
        page = found[:limit]
        return json_response(
            {
                "object": "list",
                "data": [file_object(data) for data in page],
                "first_id": page[0]["id"] if page else None,
                "last_id": page[-1]["id"] if page else None,
                "has_more": len(found) > limit,
            }
        )

    async def retrieve_view(self, file_id: str) -> Response:
        return json_response(file_object(await self.file(current_principal().identity, file_id)))

    async def content_view(self, file_id: str) -> Response:
        data = await self.file(current_principal().identity, file_id)
        assert self.blobs is not None
        if not await self.blobs.exists(data["sha256"]):
            log.error("files: the bytes of %s (%s) are missing from %s", data["id"], data["sha256"], self.blobs.folder)
            raise APIError("The content of this file is missing on this server.", status=500, type="server_error", code="file_content_missing")
        kind = data["mime"] + ("; charset=utf-8" if is_text_type(data["mime"]) else "")
        quoted = urllib.parse.quote(data["filename"], safe="")
        response = Response(
            self.blobs.chunks(data["sha256"]),
            content_type=kind,
            headers={
                "Content-Length": str(data["bytes"]),
                # Never shown as a page by a browser: it is the client's content.
                "Content-Disposition": f"attachment; filename*=UTF-8''{quoted}",
                "X-Content-Type-Options": "nosniff",
            },
        )
        response.timeout = None  # a large file to a slow client takes its time
        return response

    async def delete_view(self, file_id: str) -> Response:
        identity = current_principal().identity
        data = await self.file(identity, file_id)
        kind = self.kind(identity)
        delete = getattr(self.records, "delete_record", None)
        if delete is not None:
            if not await delete(kind, file_id):
                raise not_found(file_id)  # deleted meanwhile by another request
        else:
            # A store without delete_record (contract 1.5): a tombstone.
            await self.records.put_record(kind, file_id, {"deleted": True, "at": time.time()})
        assert self.blobs is not None
        # The file is gone for its owner: what it counted is given back even
        # when the client leaves now.
        with trio.CancelScope(shield=True), trio.move_on_after(10):
            try:
                await self.records.add_amount(BYTES_KIND, identity, "", -data["bytes"])
                await self.records.add_amount(COUNT_KIND, identity, "", -1)
                await self.blobs.release(data["sha256"])
            except Exception as exc:
                log.error("files: %s was deleted, but its quota and blob could not be given back in the store (%s)", file_id, exc)
        return json_response({"id": file_id, "object": "file", "deleted": True})

    # -- chats ---------------------------------------------------------------------------

    def gate(self, request: ChatRequest, principal: Any) -> Any:
        """Refuse a chat that names a file that is not the caller's, before
        anything (the cache among others) answers it."""
        if not may_have_files(request.messages):
            return None
        refs = file_refs(request.messages)
        if not refs:
            return None
        return self._check(request.identity, refs)

    async def _check(self, identity: str, refs: list[Any]) -> None:
        for ref in refs:
            await self.file(identity, ref.file_id, ref.param)

    def middleware(self, request: ChatRequest, call_next: Any, session: Session) -> AsyncIterator[Delta]:
        if not may_have_files(request.messages):
            return call_next(request)
        refs = file_refs(request.messages)
        if not refs:
            return call_next(request)
        return self._with_files(request, refs, call_next)

    async def _with_files(self, request: ChatRequest, refs: list[Any], call_next: Any) -> AsyncIterator[Delta]:
        assert self.resolver is not None
        route = self.runtime.providers.resolve(request.model, request.provider)
        resolved = await self.resolver.resolve(request, refs, route)
        async with aclosing(call_next(resolved)) as stream:
            async for delta in stream:
                yield delta


def _selected(data: dict[str, Any], purpose: str | None) -> bool:
    return not data.get("deleted") and (purpose is None or data.get("purpose") == purpose)


def _purpose(fields: dict[str, str]) -> str:
    unknown = sorted(set(fields) - {"purpose"})
    if unknown:
        name = unknown[0][:64]
        raise InvalidRequest(f"'{name}' is not supported by this server's Files API (docs/plugins/files.md)", param=name)
    purpose = fields.get("purpose")
    if purpose is None:
        raise InvalidRequest("'purpose' is required: one of " + ", ".join(PURPOSES), param="purpose")
    if purpose not in PURPOSES:
        raise InvalidRequest(f"'purpose' must be one of {', '.join(PURPOSES)}, got '{purpose[:64]}'", param="purpose")
    return purpose


def _integer(raw: str | None, name: str, maximum: int) -> int:
    if raw is None:
        return maximum
    if not raw.isascii() or not raw.isdigit() or len(raw) > 6 or not 1 <= int(raw) <= maximum:
        raise InvalidRequest(f"'{name}' must be an integer from 1 to {maximum}, got '{raw[:40]}'", param=name)
    return int(raw)


_FILE_SCHEMA = {
    "type": "object",
    "required": ["id", "object", "bytes", "created_at", "filename", "purpose"],
    "properties": {
        "id": {"type": "string"},
        "object": {"const": "file"},
        "bytes": {"type": "integer"},
        "created_at": {"type": "integer"},
        "filename": {"type": "string"},
        "purpose": {"type": "string"},
        "status": {"type": "string"},
    },
}


def _json(description: str, schema: dict[str, Any]) -> dict[str, Any]:
    return {"description": description, "content": {"application/json": {"schema": schema}}}


def _error(description: str) -> dict[str, Any]:
    return {"description": description, "content": {"application/json": {"schema": {"$ref": "#/components/schemas/Error"}}}}


def _query(name: str, schema: dict[str, Any], description: str) -> dict[str, Any]:
    return {"name": name, "in": "query", "required": False, "schema": schema, "description": description}
