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
    # read-only for the app (an engine may make them plain attributes or properties)
    @property
    def model_name(self) -> str: ...
    @property
    def provider(self) -> str: ...
    @property
    def max_context(self) -> int: ...
    @property
    def context_used(self) -> int: ...
    @property
    def defaults(self) -> SamplingParams: ...

    system_prompt: str | None  # the app sets it
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
