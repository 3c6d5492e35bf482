"""What a file is: its type told from its first bytes and whether it is UTF-8
text, and the check of that against what the client declared (the part's
`Content-Type` and the file name's extension).

Declarations are only held against what can be told for sure. A client's
`Content-Type` is often a guess from the name (`.ts` is "video/mp2t" to
Python's `mimetypes`), so a declared type counts only when it says text, or
one of the binary types whose signature is known here; anything else declares
nothing, and the content decides.
"""

from __future__ import annotations

import codecs
import mimetypes
import posixpath
import attrs

#: Bytes of the start of a file the signatures are looked for in.
HEAD_BYTES = 32

OCTET_STREAM = "application/octet-stream"
PDF = "application/pdf"
ZIP = "application/zip"

#: (offset, signature, type): the types told from a file's first bytes.
SIGNATURES: tuple[tuple[int, bytes, str], ...] = (
    (0, b"%PDF-", PDF),
    (0, b"\x89PNG\r\n\x1a\n", "image/png"),
    (0, b"\xff\xd8\xff", "image/jpeg"),
    (0, b"GIF87a", "image/gif"),
    (0, b"GIF89a", "image/gif"),
    (0, b"PK\x03\x04", ZIP),
    (0, b"PK\x05\x06", ZIP),
    (0, b"\x1f\x8b", "application/gzip"),
    (0, b"7z\xbc\xaf\x27\x1c", "application/x-7z-compressed"),
    (0, b"Rar!\x1a\x07", "application/vnd.rar"),
    (0, b"\xd0\xcf\x11\xe0\xa1\xb1\x1a\xe1", "application/x-ole-storage"),
    (0, b"SQLite format 3\x00", "application/vnd.sqlite3"),
    (0, b"\x7fELF", "application/x-executable"),
    (0, b"OggS", "audio/ogg"),
    (0, b"fLaC", "audio/flac"),
    (0, b"ID3", "audio/mpeg"),
    (4, b"ftyp", "video/mp4"),
)
#: RIFF containers, told by the four bytes at offset 8.
RIFF = {b"WEBP": "image/webp", b"WAVE": "audio/wav", b"AVI ": "video/x-msvideo"}

#: Signatures of printable ASCII: valid UTF-8 text that starts with one is
#: text, not that type.
WEAK = frozenset({"audio/ogg", "audio/flac", "audio/mpeg", "video/mp4"})

#: Types that are a ZIP archive inside (office documents, Java archives...).
ZIP_FAMILY = frozenset(
    {
        ZIP,
        "application/x-zip-compressed",
        "application/vnd.openxmlformats-officedocument.wordprocessingml.document",
        "application/vnd.openxmlformats-officedocument.spreadsheetml.sheet",
        "application/vnd.openxmlformats-officedocument.presentationml.presentation",
        "application/vnd.oasis.opendocument.text",
        "application/vnd.oasis.opendocument.spreadsheet",
        "application/vnd.oasis.opendocument.presentation",
        "application/epub+zip",
        "application/java-archive",
    }
)
#: Other names clients use for a type, and the type they mean.
ALIASES = {
    "image/jpg": "image/jpeg",
    "image/pjpeg": "image/jpeg",
    "application/x-pdf": PDF,
    "application/x-gzip": "application/gzip",
    "audio/x-wav": "audio/wav",
    "audio/mp3": "audio/mpeg",
}
#: Binary types a declaration may be held to: their signatures are known.
CHECKED_BINARY = frozenset(t for _, _, t in SIGNATURES) | frozenset(RIFF.values()) | ZIP_FAMILY

#: Extensions of text files (plain text, markup, data and source code), with
#: the type served for them; a text file of another extension is text/plain.
TEXT_EXTENSIONS = {
    ".md": "text/markdown",
    ".markdown": "text/markdown",
    ".csv": "text/csv",
    ".tsv": "text/tab-separated-values",
    ".json": "application/json",
    ".jsonl": "application/jsonl",
    ".ndjson": "application/jsonl",
    ".html": "text/html",
    ".htm": "text/html",
    ".xml": "application/xml",
    ".css": "text/css",
    ".yaml": "application/yaml",
    ".yml": "application/yaml",
    **{
        ext: "text/plain"
        for ext in (
            ".txt .text .log .rst .org .adoc .tex .ini .cfg .conf .toml .env .properties .sql .graphql .proto "
            ".py .pyi .ipynb .js .mjs .cjs .ts .tsx .jsx .vue .svelte .java .kt .kts .scala .groovy .go .rs .c .h .cc .cpp "
            ".cxx .hpp .hh .cs .fs .swift .m .mm .rb .php .pl .pm .lua .r .jl .dart .ex .exs .erl .hrl .hs .ml .mli "
            ".clj .cljs .el .lisp .scm .sh .bash .zsh .fish .ps1 .bat .cmd .mk .cmake .gradle .tf .hcl .nix .zig .sol "
            ".diff .patch .srt .vtt .bib"
        ).split()
    },
}
#: Extensions of the checked binary types (a name says what its content must be).
BINARY_EXTENSIONS = {
    ".pdf": PDF,
    ".png": "image/png",
    ".jpg": "image/jpeg",
    ".jpeg": "image/jpeg",
    ".gif": "image/gif",
    ".webp": "image/webp",
    ".zip": ZIP,
    ".gz": "application/gzip",
    ".docx": "application/vnd.openxmlformats-officedocument.wordprocessingml.document",
    ".xlsx": "application/vnd.openxmlformats-officedocument.spreadsheetml.sheet",
    ".pptx": "application/vnd.openxmlformats-officedocument.presentationml.presentation",
    ".odt": "application/vnd.oasis.opendocument.text",
    ".ods": "application/vnd.oasis.opendocument.spreadsheet",
    ".odp": "application/vnd.oasis.opendocument.presentation",
    ".epub": "application/epub+zip",
    ".jar": "application/java-archive",
    ".7z": "application/x-7z-compressed",
    ".rar": "application/vnd.rar",
    ".ogg": "audio/ogg",
    ".flac": "audio/flac",
    ".mp3": "audio/mpeg",
    ".wav": "audio/wav",
    ".mp4": "video/mp4",
    ".m4a": "video/mp4",
    ".mov": "video/mp4",
    ".avi": "video/x-msvideo",
    ".sqlite": "application/vnd.sqlite3",
    ".db": "application/vnd.sqlite3",
}
#: Declared types that say "text" without starting with text/.
TEXT_TYPES = frozenset(
    {
        "application/json",
        "application/jsonl",
        "application/x-ndjson",
        "application/xml",
        "application/yaml",
        "application/x-yaml",
        "application/javascript",
        "application/x-javascript",
        "application/typescript",
        "application/x-sh",
        "application/x-python",
        "application/sql",
        "application/toml",
        "application/x-tex",
        "application/x-httpd-php",
    }
)


class Mismatch(ValueError):
    """The content is not what the client declared."""


def signature_type(head: bytes) -> str | None:
    """The type the first bytes of a file say, or None when they say none
    known here."""
    for offset, magic, kind in SIGNATURES:
        if head[offset : offset + len(magic)] == magic:
            return kind
    if head[:4] == b"RIFF":
        return RIFF.get(head[8:12])
    return None


class TextCheck:
    """Whether a stream of bytes is UTF-8 text without NULs, fed piece by piece."""

    def __init__(self) -> None:
        self._decoder = codecs.getincrementaldecoder("utf-8")()
        self.text = True

    def feed(self, data: bytes) -> None:
        if not self.text:
            return
        if b"\x00" in data:
            self.text = False
            return
        try:
            self._decoder.decode(data)
        except UnicodeDecodeError:
            self.text = False

    def finish(self) -> bool:
        if self.text:
            try:
                self._decoder.decode(b"", final=True)
            except UnicodeDecodeError:
                self.text = False
        return self.text


def _normal(content_type: str | None) -> str:
    kind = (content_type or "").split(";", 1)[0].strip().lower()
    return ALIASES.get(kind, kind)


def _says_text(kind: str) -> bool:
    return kind.startswith("text/") or kind in TEXT_TYPES or kind.endswith(("+json", "+xml"))


def extension(filename: str) -> str:
    return posixpath.splitext(filename.lower())[1]


@attrs.frozen
class Declared:
    """What the client said a file is: claims the content is held to."""

    #: (what said it, the type it says): the Content-Type, the name.
    claims: tuple[tuple[str, str], ...]
    #: A type to serve a binary file of no known signature as.
    fallback: str

    @classmethod
    def of(cls, content_type: str | None, filename: str) -> "Declared":
        claims = []
        header = _normal(content_type)
        if header and (header in CHECKED_BINARY or _says_text(header)):
            claims.append((f"its Content-Type ({header})", header))
        ext = extension(filename)
        by_name = TEXT_EXTENSIONS.get(ext) or BINARY_EXTENSIONS.get(ext)
        if by_name is not None:
            claims.append((f"its name ('{filename}')", by_name))
        guessed = mimetypes.guess_type(filename, strict=False)[0]
        fallback = header if header and header != OCTET_STREAM else (guessed or OCTET_STREAM)
        return cls(tuple(claims), fallback)

    def check(self, head: bytes, is_text: bool) -> str:
        """The file's type; `Mismatch` when the content contradicts a claim."""
        found = signature_type(head)
        if is_text and (found is None or found in WEAK):
            found = "text"
        for said_by, kind in self.claims:
            if _says_text(kind):
                if found != "text":
                    raise Mismatch(f"{said_by} says it is text ({kind}), but its content is {_described(found)}")
            elif found != kind and not (found == ZIP and kind in ZIP_FAMILY):
                raise Mismatch(f"{said_by} says it is {kind}, but its content is {_described(found)}")
        if found == "text":
            texts = [kind for _, kind in reversed(self.claims) if _says_text(kind)]
            return texts[0] if texts else "text/plain"
        if found == ZIP:
            family = [kind for _, kind in self.claims if kind in ZIP_FAMILY]
            return family[-1] if family else ZIP
        return found or (self.fallback if not _says_text(self.fallback) else OCTET_STREAM)


def _described(found: str | None) -> str:
    if found == "text":
        return "text"
    if found is None:
        return "binary data of no known type"
    return f"{found}"


def is_text_type(kind: str) -> bool:
    """Whether a stored file of this type is text (it was checked to be)."""
    return _says_text(kind)
