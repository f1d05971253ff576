"""Values that flow from generation to its callers (CLI, app, benchmarks)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

FinishReason = Literal["eos", "stop", "length", "cancelled", "context"]


@dataclass
class GenerationStats:
    prompt_tokens: int = 0
    new_tokens: int = 0
    ttft_ms: float = 0.0
    decode_tokens_per_s: float = 0.0
    prefill_tokens_per_s: float = 0.0
    provider: str = "CPUExecutionProvider"
    context_used: int = 0
    max_context: int = 0


@dataclass
class TokenEvent:
    """Newly complete text (may be empty while a multi-byte character is pending)."""

    text: str
    token_id: int


@dataclass
class DoneEvent:
    text: str
    token_ids: list[int]
    finish_reason: FinishReason
    stats: GenerationStats = field(default_factory=GenerationStats)
    dropped_turns: int = 0  # oldest turns dropped to fit the context


GenerationEvent = TokenEvent | DoneEvent
