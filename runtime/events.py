"""Values that flow from generation to its callers (CLI, app, benchmarks)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

import numpy as np

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


@dataclass(frozen=True)
class TokenRouting:
    """The routing of the decode step that produced one generated token (the position
    before it): per MoE layer the chosen experts, best first, and their weights."""

    text: str  # the token's share of the streamed text (UTF-8-safe pieces)
    experts: np.ndarray  # [moe layers, k] int64
    weights: np.ndarray  # [moe layers, k] float32


@dataclass
class DoneEvent:
    text: str
    token_ids: list[int]
    finish_reason: FinishReason
    stats: GenerationStats = field(default_factory=GenerationStats)
    dropped_turns: int = 0  # oldest turns dropped to fit the context
    # one per token of token_ids when the routing was asked for (generate(routing=...))
    routing: list[TokenRouting] | None = None


GenerationEvent = TokenEvent | DoneEvent
