"""A fake chat engine for app tests: the ChatSession protocol with controllable timing.

It yields a scripted reply word by word (``delay`` seconds apart), honours ``should_stop``
between tokens, records every call (params and the message list it saw) and can fail on
demand. Also ``wait_until`` for pilot tests.
"""

from __future__ import annotations

import asyncio
import functools
import re
import threading
import time
from collections.abc import Callable, Iterator

from moechat.runtime.errors import MoechatError
from moechat.runtime.events import DoneEvent, GenerationStats, TokenEvent
from moechat.runtime.sampling import SamplingParams

DEFAULT_REPLY = (
    "Hello! Here is some **bold** text and code:\n\n```python\nprint('hi')\n```\n\nDone."
)


def split_tokens(text: str) -> list[str]:
    return re.findall(r"\S+\s*|\s+", text)


class FakeEngine:
    model_name = "fake-moe"
    provider = "CPUExecutionProvider"
    max_context = 2048

    def __init__(
        self,
        reply: str | Callable[[str, int], str] = DEFAULT_REPLY,
        *,
        delay: float = 0.0,
        fail_after: int | None = None,
        fail_message: str = "model exploded",
    ) -> None:
        self.reply = reply
        self.delay = delay
        self.fail_after = fail_after
        self.fail_message = fail_message
        self.defaults = SamplingParams(temperature=0.6, top_p=0.9, max_new_tokens=256)
        self.system_prompt: str | None = None
        self._turns: list[dict] = []
        self.calls: list[dict] = []  # one per send/regenerate
        self.resets: list[list[dict] | None] = []
        self.started = threading.Event()  # set when a generation yields its first token
        self.rolls = 0
        self.prefill_delay = 0.0  # seconds per prefill chunk (4 chunks)
        self.prefills: list[int] = []  # tokens read ahead, one entry per finished prefill
        self.prefill_started = threading.Event()

    # -- protocol --------------------------------------------------------------------

    @property
    def messages(self) -> list[dict]:
        head = [{"role": "system", "content": self.system_prompt}] if self.system_prompt else []
        return head + [dict(m) for m in self._turns]

    @property
    def context_used(self) -> int:
        return sum(len(m["content"]) // 4 + 4 for m in self.messages)

    def _reply_text(self, user_text: str) -> str:
        self.rolls += 1
        if callable(self.reply):
            return self.reply(user_text, self.rolls)
        return self.reply

    def _generate(
        self, params: SamplingParams, should_stop: Callable[[], bool], kind: str
    ) -> Iterator[TokenEvent | DoneEvent]:
        user_text = self._turns[-1]["content"]
        self.calls.append(
            {
                "kind": kind,
                "params": params,
                "messages": self.messages,
                "system_prompt": self.system_prompt,
            }
        )
        text = self._reply_text(user_text)
        pieces = split_tokens(text)[: params.max_new_tokens]
        out: list[str] = []
        start = time.perf_counter()
        first = None
        reason = "eos"
        for i, piece in enumerate(pieces):
            if should_stop():
                reason = "cancelled"
                break
            if self.fail_after is not None and i >= self.fail_after:
                raise MoechatError(self.fail_message)
            if self.delay:
                time.sleep(self.delay)
            if first is None:
                first = time.perf_counter()
            out.append(piece)
            self.started.set()
            yield TokenEvent(piece, i + 10)
        else:
            if len(split_tokens(text)) > params.max_new_tokens:
                reason = "length"
        final = "".join(out)
        self._turns.append({"role": "assistant", "content": final})
        elapsed = max(time.perf_counter() - (first or start), 1e-6)
        stats = GenerationStats(
            prompt_tokens=self.context_used,
            new_tokens=len(out),
            ttft_ms=((first or start) - start) * 1000.0,
            decode_tokens_per_s=len(out) / elapsed,
            provider=self.provider,
            context_used=self.context_used,
            max_context=self.max_context,
        )
        yield DoneEvent(final, list(range(len(out))), reason, stats)

    def send(
        self, user_text: str, params: SamplingParams, should_stop: Callable[[], bool]
    ) -> Iterator[TokenEvent | DoneEvent]:
        self._turns.append({"role": "user", "content": user_text})
        return self._guard(self._generate(params, should_stop, "send"), rollback=1)

    def regenerate(
        self, params: SamplingParams, should_stop: Callable[[], bool]
    ) -> Iterator[TokenEvent | DoneEvent]:
        if not self._turns or self._turns[-1]["role"] != "assistant":
            raise MoechatError("nothing to regenerate")
        self._turns.pop()
        return self._guard(self._generate(params, should_stop, "regen"), rollback=0)

    def _guard(self, events: Iterator, rollback: int) -> Iterator:
        try:
            yield from events
        except MoechatError:
            # like a real engine: a failed turn leaves the history as it was
            if rollback and self._turns and self._turns[-1]["role"] == "user":
                self._turns.pop()
            raise

    def pop_last_exchange(self) -> str:
        if self._turns and self._turns[-1]["role"] == "assistant":
            self._turns.pop()
        if not self._turns or self._turns[-1]["role"] != "user":
            raise MoechatError("no message to edit")
        return self._turns.pop()["content"]

    def prefill(self, should_stop: Callable[[], bool]) -> int:
        """Like ChatSession.prefill: read the conversation ahead, in chunks."""
        self.prefill_started.set()
        for _ in range(4):
            if should_stop():
                return 0
            time.sleep(self.prefill_delay)
        self.prefills.append(self.context_used)
        return self.context_used

    def reset(self, messages: list[dict] | None = None) -> None:
        self.resets.append(messages)
        self._turns = [dict(m) for m in (messages or []) if m["role"] != "system"]


async def wait_until(pilot, predicate: Callable[[], object], timeout: float = 5.0) -> None:
    """Let the app run until ``predicate()`` is true; fail after ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    while True:
        await pilot.pause()
        if pilot.app._exception is not None:
            raise pilot.app._exception
        if predicate():
            return
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {predicate}")
        await asyncio.sleep(0.02)


def pilot_test(fn):
    """Run an ``async def`` test with asyncio.run (no pytest async plugin needed)."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        return asyncio.run(fn(*args, **kwargs))

    return wrapper
