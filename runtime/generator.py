"""Token generation on a :class:`Decoder`: prefill, decode loop, stop conditions, stats."""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator, Sequence

import numpy as np

from moechat.runtime.events import (
    DoneEvent,
    FinishReason,
    GenerationEvent,
    GenerationStats,
    TokenEvent,
    TokenRouting,
)
from moechat.runtime.model import LoadedModel
from moechat.runtime.routing import PackageRouting
from moechat.runtime.sampling import Sampler, SamplingParams
from moechat.runtime.streaming import StreamDecoder


class _StopMatcher:
    """Holds back text that may be the start of a stop string."""

    def __init__(self, stops: Sequence[str]) -> None:
        self.stops = [s for s in stops if s]
        self.text = ""  # everything released so far
        self.pending = ""

    def feed(self, chunk: str) -> tuple[str, bool]:
        """Return (text safe to release, whether a stop string was hit)."""
        self.pending += chunk
        for stop in self.stops:
            idx = self.pending.find(stop)
            if idx >= 0:
                out = self.pending[:idx]
                self.pending = ""
                self.text += out
                return out, True
        keep = 0
        for stop in self.stops:
            for n in range(min(len(stop) - 1, len(self.pending)), 0, -1):
                if self.pending.endswith(stop[:n]):
                    keep = max(keep, n)
                    break
        out = self.pending[: len(self.pending) - keep]
        self.pending = self.pending[len(out) :]
        self.text += out
        return out, False

    def flush(self) -> str:
        out, self.pending = self.pending, ""
        self.text += out
        return out


def generate(
    model: LoadedModel,
    new_ids: Sequence[int],
    params: SamplingParams,
    should_stop: Callable[[], bool] = lambda: False,
    routing: PackageRouting | None = None,
) -> Iterator[GenerationEvent]:
    """Append ``new_ids`` to the model's cache and stream the continuation.

    The repetition penalty looks at the generated tokens only, so a long conversation
    is not penalised as a whole. The final sampled eos token is not fed to the cache.
    ``routing`` (the model's, runtime/routing.py): also fetch each step's router logits
    and return every generated token's routing in :attr:`DoneEvent.routing`; without it
    no routing output is fetched.
    """
    decoder = model.decoder
    routed: list[TokenRouting] = []
    step_routing: tuple[np.ndarray, np.ndarray] | None = None

    def step(ids: Sequence[int]) -> np.ndarray:
        nonlocal step_routing
        if routing is None:
            return decoder.forward(ids)[-1]
        logits, routers = decoder.forward_routed(ids)
        chosen = [routing.route_layer(i, r[-1:]) for i, r in enumerate(routers)]
        step_routing = (
            np.concatenate([c.experts for c in chosen]),
            np.concatenate([c.weights for c in chosen]),
        )
        return logits[-1]

    sampler = Sampler(params)
    stream = StreamDecoder(model.tokenizer)
    matcher = _StopMatcher(params.stop)
    stats = GenerationStats(
        prompt_tokens=len(new_ids), provider=model.provider, max_context=decoder.max_context
    )
    generated: list[int] = []
    finish: FinishReason = "length"
    start = time.perf_counter()
    first_token_at = start
    logits = step(new_ids)
    prefill_s = time.perf_counter() - start
    while len(generated) < params.max_new_tokens:
        if should_stop():
            finish = "cancelled"
            break
        token = sampler.sample(logits, generated)
        if not generated:
            first_token_at = time.perf_counter()
        if token in model.eos_token_ids:
            finish = "eos"
            break
        generated.append(token)
        piece = stream.push(token)
        if step_routing is not None:
            routed.append(TokenRouting(piece, *step_routing))
        text, hit = matcher.feed(piece)
        if text or not hit:
            yield TokenEvent(text, token)
        if hit:
            finish = "stop"
            break
        if len(generated) >= params.max_new_tokens:
            break
        if decoder.length >= decoder.max_context:
            finish = "context"
            break
        logits = step([token])
    if finish != "stop":
        tail, hit = matcher.feed(stream.flush())
        tail += "" if hit else matcher.flush()
        if tail:
            yield TokenEvent(tail, -1)
    end = time.perf_counter()
    stats.new_tokens = len(generated)
    stats.ttft_ms = (first_token_at - start) * 1000
    stats.prefill_tokens_per_s = len(new_ids) / prefill_s if prefill_s > 0 else 0.0
    if len(generated) > 1 and end > first_token_at:
        stats.decode_tokens_per_s = (len(generated) - 1) / (end - first_token_at)
    stats.context_used = decoder.length
    yield DoneEvent(
        matcher.text, generated, finish, stats, routing=routed if routing is not None else None
    )
