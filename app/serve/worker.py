"""The served model: loaded in the background, one generation at a time, one shared KV cache.

Requests queue for the model (at most ``max_queue`` waiting; more is a 429) and run one by
one on a single generation thread (onnxruntime releases the GIL, so the event loop keeps
answering). Text reaches the request through an asyncio queue.

The KV cache is reused across requests as in :class:`~moechat.runtime.chat.ChatSession`:
the worker remembers which ids the cache holds and feeds only what follows the longest
common prefix with the new prompt. A client sends a reply back as text; the ids generated
for it are remembered (by text) and stand in for it when the next prompt is rendered, so
the second turn of a conversation re-feeds only its new tokens.
"""

from __future__ import annotations

import asyncio
import logging
import threading
from collections import OrderedDict
from collections.abc import AsyncIterator, Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Literal

from moechat.app.serve.schema import ApiError, Message
from moechat.runtime.errors import MoechatError
from moechat.runtime.events import DoneEvent
from moechat.runtime.generator import generate
from moechat.runtime.model import LoadedModel
from moechat.runtime.sampling import SamplingParams

log = logging.getLogger("moechat.serve")

State = Literal["loading", "ready", "failed"]
FinishReason = Literal["stop", "length"]
PREFILL_CHUNK = 256  # prompt tokens fed per step: a cancelled request stops between chunks
REMEMBERED_REPLIES = 64


@dataclass
class Job:
    """One generation: the prompt's ids and how to sample."""

    prompt_ids: list[int]
    params: SamplingParams
    remember_reply: bool = False  # a chat reply: keep its ids for the next turn
    cancel: threading.Event = field(default_factory=threading.Event)


@dataclass
class Outcome:
    """The end of a generation (the text came before it, piece by piece)."""

    text: str
    finish_reason: FinishReason
    prompt_tokens: int
    cached_tokens: int
    completion_tokens: int
    cancelled: bool = False

    def usage(self) -> dict[str, object]:
        return {
            "prompt_tokens": self.prompt_tokens,
            "completion_tokens": self.completion_tokens,
            "total_tokens": self.prompt_tokens + self.completion_tokens,
            "prompt_tokens_details": {"cached_tokens": self.cached_tokens},
        }


Item = str | Outcome | ApiError


class JobHandle:
    """A submitted job as its request sees it: text pieces, then one :class:`Outcome`."""

    def __init__(self, job: Job) -> None:
        self.job = job
        self.queue: asyncio.Queue[Item] = asyncio.Queue()
        self.finished = False

    def cancel(self) -> None:
        """Stop the generation (between tokens) or skip it if it has not started."""
        self.job.cancel.set()

    async def events(self) -> AsyncIterator[str | Outcome]:
        """Text pieces, then the outcome; an :class:`ApiError` is raised. Leaving early
        (a client that went away) cancels the job."""
        try:
            while True:
                item = await self.queue.get()
                if isinstance(item, ApiError):
                    raise item
                yield item
                if isinstance(item, Outcome):
                    return
        finally:
            self.finished = True
            self.cancel()


def common_prefix(a: Sequence[int], b: Sequence[int]) -> int:
    n = 0
    for x, y in zip(a, b, strict=False):
        if x != y:
            break
        n += 1
    return n


class ModelWorker:
    """The model behind the server (see the module docstring)."""

    def __init__(
        self,
        load: Callable[[], LoadedModel],
        model_id: str,
        max_queue: int = 8,
        on_load_error: Callable[[str], None] | None = None,
    ) -> None:
        self.model_id = model_id
        self.on_load_error = on_load_error
        self.max_queue = max_queue
        self.state: State = "loading"
        self.error: str | None = None
        self._load = load
        self._model: LoadedModel | None = None
        self._cache_ids: list[int] = []  # what the decoder's KV cache holds
        self._replies: OrderedDict[str, list[int]] = OrderedDict()  # reply text -> its ids
        self._replies_lock = threading.Lock()
        self._lock = asyncio.Lock()  # one generation at a time, first come first served
        self._executor = ThreadPoolExecutor(1, thread_name_prefix="moechat-generate")
        self._pending = 0  # running + waiting
        self._handles: set[JobHandle] = set()
        self._tasks: set[asyncio.Task[None]] = set()
        self._closed = False

    # -- loading ------------------------------------------------------------------
    def start_loading(self) -> threading.Thread:
        """Load the model on a background thread (``/health`` says when it is ready)."""
        thread = threading.Thread(target=self._load_now, name="moechat-load", daemon=True)
        thread.start()
        return thread

    def _load_now(self) -> None:
        try:
            self._model = self._load()
            self.state = "ready"
            log.info("model %s ready (%s)", self.model_id, self._model.provider)
        except Exception as err:  # reported by /health and every request
            self.error = (
                str(err) if isinstance(err, MoechatError) else f"{type(err).__name__}: {err}"
            )
            self.state = "failed"
            log.error("could not load the model: %s", self.error)
            if self.on_load_error is not None:
                self.on_load_error(self.error)

    @property
    def model(self) -> LoadedModel:
        """The loaded model; a 503 while it loads (or when loading failed)."""
        if self._model is not None:
            return self._model
        if self.state == "failed":
            raise ApiError(503, f"the model failed to load: {self.error}", "service_unavailable")
        raise ApiError(503, "the model is still loading", "service_unavailable", code="loading")

    @property
    def pending(self) -> int:
        """Jobs running or waiting."""
        return self._pending

    @property
    def cached_tokens(self) -> int:
        """Tokens the KV cache holds for the next request to reuse."""
        return len(self._cache_ids)

    # -- prompts ------------------------------------------------------------------
    def reply_ids(self, messages: Sequence[Message]) -> dict[int, list[int]]:
        """Generated ids for the assistant messages this server wrote (by index)."""
        with self._replies_lock:
            return {
                i: ids
                for i, m in enumerate(messages)
                if m.role == "assistant" and (ids := self._replies.get(m.content)) is not None
            }

    # -- jobs ---------------------------------------------------------------------
    def submit(self, job: Job) -> JobHandle:
        """Queue ``job`` (call on the event loop); a 429 when the queue is full."""
        if self._closed:
            raise ApiError(503, "the server is shutting down", "service_unavailable")
        if self._pending > self.max_queue:
            raise ApiError(
                429,
                f"the server is busy: {self.max_queue} requests are already waiting for the "
                "model; retry later",
                "rate_limit_exceeded",
                code="rate_limit_exceeded",
            )
        handle = JobHandle(job)
        self._pending += 1
        self._handles.add(handle)
        task = asyncio.get_running_loop().create_task(self._run(handle))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        return handle

    def close(self) -> None:
        """Refuse new jobs and stop the running and waiting ones (safe from a signal handler)."""
        self._closed = True
        for handle in list(self._handles):
            handle.cancel()
        self._executor.shutdown(wait=False, cancel_futures=True)

    async def _run(self, handle: JobHandle) -> None:
        loop = asyncio.get_running_loop()

        def emit(item: Item) -> None:  # from the generation thread
            try:
                loop.call_soon_threadsafe(handle.queue.put_nowait, item)
            except RuntimeError:  # the loop is closed: nobody is listening any more
                pass

        try:
            async with self._lock:
                if handle.job.cancel.is_set():
                    n = len(handle.job.prompt_ids)
                    handle.queue.put_nowait(Outcome("", "stop", n, 0, 0, cancelled=True))
                    return
                await loop.run_in_executor(self._executor, self._generate, handle.job, emit)
        except RuntimeError:  # the executor was shut down (the server is stopping)
            handle.queue.put_nowait(
                ApiError(503, "the server is shutting down", "service_unavailable")
            )
        finally:
            self._pending -= 1
            self._handles.discard(handle)

    def _generate(self, job: Job, emit: Callable[[Item], None]) -> None:
        """Run one job on the generation thread."""
        try:
            emit(self._generate_unsafe(job, emit))
        except Exception as err:
            log.exception("generation failed")
            self._reset_cache()
            what = str(err) if isinstance(err, MoechatError) else f"{type(err).__name__}: {err}"
            emit(ApiError(500, f"generation failed: {what}", "server_error"))

    def _reset_cache(self) -> None:
        self._cache_ids = []
        if self._model is not None:
            self._model.decoder.truncate(0)

    def _generate_unsafe(self, job: Job, emit: Callable[[Item], None]) -> Outcome:
        model = self.model
        decoder = model.decoder
        ids = job.prompt_ids
        stop = job.cancel.is_set
        # Keep the cached prefix (never all of the prompt: its last token gives the logits).
        cached = common_prefix(self._cache_ids[: decoder.length], ids[:-1])
        decoder.truncate(cached)
        self._cache_ids = self._cache_ids[:cached]
        pos = cached
        while pos < len(ids) - 1 and not stop():
            end = min(pos + PREFILL_CHUNK, len(ids) - 1)
            decoder.forward(ids[pos:end])
            self._cache_ids = ids[:end]
            pos = end
        if pos < len(ids) - 1:
            return Outcome("", "stop", len(ids), cached, 0, cancelled=True)
        done: DoneEvent | None = None
        for event in generate(model, ids[pos:], job.params, stop):
            if isinstance(event, DoneEvent):
                done = event
            elif event.text:
                emit(event.text)
        assert done is not None
        self._cache_ids = (ids + done.token_ids)[: decoder.length]
        reason = done.finish_reason
        if job.remember_reply and reason in ("eos", "length", "context") and done.token_ids:
            with self._replies_lock:
                self._replies[done.text] = list(done.token_ids)
                self._replies.move_to_end(done.text)
                while len(self._replies) > REMEMBERED_REPLIES:
                    self._replies.popitem(last=False)
        return Outcome(
            done.text,
            "length" if reason in ("length", "context") else "stop",
            len(ids),
            cached,
            len(done.token_ids),
            cancelled=reason == "cancelled",
        )
