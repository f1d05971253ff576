"""The chat-engine protocol the app drives (the real one is ``moechat.runtime.chat.ChatSession``).

The app never imports the runtime model code at module level: tests pass a fake engine,
and :func:`moechat.app.launch.run_chat_app` builds the real one lazily.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Protocol, runtime_checkable

from moechat.runtime.events import DoneEvent, TokenEvent
from moechat.runtime.sampling import SamplingParams


@runtime_checkable
class ChatEngine(Protocol):
    model_name: str
    provider: str
    max_context: int
    context_used: int
    defaults: SamplingParams
    system_prompt: str | None
    messages: list[dict]

    def send(
        self, user_text: str, params: SamplingParams, should_stop: Callable[[], bool]
    ) -> Iterator[TokenEvent | DoneEvent]: ...

    def regenerate(
        self, params: SamplingParams, should_stop: Callable[[], bool]
    ) -> Iterator[TokenEvent | DoneEvent]: ...

    def pop_last_exchange(self) -> str: ...

    def reset(self, messages: list[dict] | None = None) -> None: ...


EngineSource = ChatEngine | Callable[[], ChatEngine]
"""An engine, or a factory the app calls in a worker thread (model loading is slow)."""


def short_provider(provider: str) -> str:
    """``"CUDAExecutionProvider"`` -> ``"CUDA"``."""
    return provider.removesuffix("ExecutionProvider") or provider
