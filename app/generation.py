"""One reply being generated: its state on the UI side and the worker-thread loop.

The engine's iterator runs in a thread worker. Tokens are batched there and posted to the
app at most every ``flush_interval`` seconds (the first token right away, so the time to
first token shows), so the UI does a bounded amount of work per second at any token rate.
Only messages cross the thread boundary; the UI thread owns widgets and the database.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any, Literal

from textual.message import Message

from moechat.runtime.errors import MoechatError
from moechat.runtime.events import DoneEvent, TokenEvent

FLUSH_INTERVAL_S = 0.05
SAVE_INTERVAL_S = 1.0


class GenChunk(Message):
    """Text that streamed in since the last chunk."""

    def __init__(self, gen_id: int, text: str, tokens: int, first_token_at: float | None) -> None:
        super().__init__()
        self.gen_id = gen_id
        self.text = text
        self.tokens = tokens
        self.first_token_at = first_token_at


class GenDone(Message):
    def __init__(self, gen_id: int, done: DoneEvent) -> None:
        super().__init__()
        self.gen_id = gen_id
        self.done = done


class GenFailed(Message):
    def __init__(self, gen_id: int, error: str) -> None:
        super().__init__()
        self.gen_id = gen_id
        self.error = error


GenerationKind = Literal["send", "regen"]


@dataclass
class Generation:
    """UI-side state of the reply being generated."""

    id: int
    kind: GenerationKind
    conversation_id: int
    seq: int  # the assistant message's seq in the store
    block: Any = None  # the AssistantMessage widget it streams into
    user_seq: int | None = None
    user_text: str = ""
    previous: tuple[str, bool, str | None] | None = None  # regen: text, partial, reason
    stop_event: threading.Event = field(default_factory=threading.Event)
    started_at: float = field(default_factory=time.monotonic)
    first_token_at: float | None = None
    tokens: int = 0
    text: str = ""
    last_save: float = field(default_factory=time.monotonic)
    last_status: float = 0.0
    saved_len: int = -1
    gate: FrameGate | None = None
    settings: dict[str, Any] | None = None  # sampling + system prompt, stored with the reply

    def should_stop(self) -> bool:
        return self.stop_event.is_set()


class FrameGate:
    """Paces chunks by what the UI can draw (shared by the worker and the UI thread).

    A chunk is posted no sooner than ``min_interval`` after the previous one, and only
    after the UI has drawn the previous one (``drawn`` is called after the refresh) and
    then stayed idle for as long as drawing it took. So the UI thread is busy at most
    about half the time at any token rate, and the generation thread, which needs the
    GIL between tokens, keeps its speed. Without acknowledgements (``drawn`` never
    called) it falls back to ``min_interval`` pacing after ``max_wait`` seconds.
    """

    def __init__(self, min_interval: float = FLUSH_INTERVAL_S, max_wait: float = 1.0) -> None:
        self.min_interval = min_interval
        self.max_wait = max_wait
        self._lock = threading.Lock()
        self._posted_at: float | None = None
        self._drawn_at: float | None = None

    def ready(self, now: float) -> bool:
        with self._lock:
            posted, drawn = self._posted_at, self._drawn_at
        if posted is None:
            return True
        if now - posted < self.min_interval:
            return False
        if drawn is None:
            return now - posted >= self.max_wait
        return now >= drawn + (drawn - posted)

    def posted(self, now: float) -> None:
        with self._lock:
            self._posted_at, self._drawn_at = now, None

    def drawn(self) -> None:
        with self._lock:
            if self._posted_at is not None and self._drawn_at is None:
                self._drawn_at = time.monotonic()


def pump_events(
    events: Iterable[TokenEvent | DoneEvent],
    gen_id: int,
    post: Callable[[Message], object],
    gate: FrameGate | None = None,
) -> None:
    """Drain the engine's events (in the worker thread), posting batched messages."""
    gate = gate or FrameGate()
    pending: list[str] = []
    pending_tokens = 0
    first_token_at: float | None = None

    def flush(now: float) -> None:
        nonlocal pending_tokens
        gate.posted(now)
        post(GenChunk(gen_id, "".join(pending), pending_tokens, first_token_at))
        pending.clear()
        pending_tokens = 0

    try:
        for event in events:
            if isinstance(event, TokenEvent):
                now = time.monotonic()
                if first_token_at is None:
                    first_token_at = now
                pending.append(event.text)
                pending_tokens += 1
                if gate.ready(now):
                    flush(now)
            elif isinstance(event, DoneEvent):
                if pending_tokens:
                    flush(time.monotonic())
                post(GenDone(gen_id, event))
                return
        if pending_tokens:
            flush(time.monotonic())
        post(GenFailed(gen_id, "the model stopped without finishing its reply"))
    except MoechatError as err:
        post(GenFailed(gen_id, str(err)))
    except Exception as err:  # noqa: BLE001 - any model failure must not kill the app
        post(GenFailed(gen_id, f"{type(err).__name__}: {err}"))
