"""Sampling parameters (validated, settable from text) and a vectorised numpy sampler."""

from __future__ import annotations

import dataclasses
import json
import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, ClassVar, NamedTuple

import numpy as np

from .errors import MoechatError

_F32_MAX = float(np.finfo(np.float32).max)


class NonFiniteLogitsError(MoechatError, ValueError):
    """No logit to sample from: the model's output is NaN or -infinity everywhere."""


class Range(NamedTuple):
    """An allowed numeric range; ``lo_open``/``hi_open`` exclude the bound."""

    lo: float
    hi: float
    lo_open: bool = False
    hi_open: bool = False

    def contains(self, value: float) -> bool:
        above = value > self.lo if self.lo_open else value >= self.lo
        below = value < self.hi if self.hi_open else value <= self.hi
        return above and below

    def describe(self) -> str:
        return (
            f"{'(' if self.lo_open else '['}{self.lo:g}, {self.hi:g}{')' if self.hi_open else ']'}"
        )


_INT_FIELDS = ("top_k", "max_new_tokens", "seed")
_ALIASES = {
    "temp": "temperature",
    "max_tokens": "max_new_tokens",
    "rep_penalty": "repetition_penalty",
}


@dataclass
class SamplingParams:
    """Generation settings; ``temperature == 0`` means greedy decoding."""

    temperature: float = 0.7
    top_k: int = 0  # 0 = off
    top_p: float = 1.0
    min_p: float = 0.0
    repetition_penalty: float = 1.0
    max_new_tokens: int = 512
    seed: int | None = None  # None = random
    stop: list[str] = field(default_factory=list)

    RANGES: ClassVar[dict[str, Range]] = {
        "temperature": Range(0.0, 2.0),
        "top_k": Range(0, 1_000_000),
        "top_p": Range(0.0, 1.0, lo_open=True),
        "min_p": Range(0.0, 1.0, hi_open=True),
        "repetition_penalty": Range(0.5, 2.0),
        "max_new_tokens": Range(1, 32768),
        "seed": Range(0, 2**63 - 1),
    }
    MAX_STOP: ClassVar[int] = 16

    @property
    def greedy(self) -> bool:
        return self.temperature == 0

    @classmethod
    def field_names(cls) -> list[str]:
        return [f.name for f in dataclasses.fields(cls)]

    def validate(self) -> SamplingParams:
        """Raise MoechatError naming the first invalid field; return self when valid."""
        for name, rng in self.RANGES.items():
            value = getattr(self, name)
            if name == "seed" and value is None:
                continue
            is_int = isinstance(value, (int, np.integer)) and not isinstance(value, bool)
            is_num = is_int or isinstance(value, (float, np.floating))
            ok = is_int if name in _INT_FIELDS else is_num and math.isfinite(value)
            if not ok or not rng.contains(value):
                kind = "an integer" if name in _INT_FIELDS else "a number"
                extra = " or none" if name == "seed" else ""
                raise MoechatError(
                    f"{name} must be {kind} in {rng.describe()}{extra}, got {value!r}"
                )
        stop = self.stop
        if not isinstance(stop, list) or not all(isinstance(s, str) and s for s in stop):
            raise MoechatError(f"stop must be a list of non-empty strings, got {stop!r}")
        if len(stop) > self.MAX_STOP:
            raise MoechatError(f"stop allows at most {self.MAX_STOP} strings, got {len(stop)}")
        return self

    def replace(self, **changes: Any) -> SamplingParams:
        """A validated copy with ``changes`` applied."""
        unknown = sorted(set(changes) - set(self.field_names()))
        if unknown:
            raise MoechatError(
                f"unknown sampling setting {unknown[0]!r}; valid: {', '.join(self.field_names())}"
            )
        if "stop" in changes and isinstance(changes["stop"], (list, tuple)):
            changes["stop"] = list(changes["stop"])
        return dataclasses.replace(self, **changes).validate()

    def set_from_text(self, name: str, value: str) -> SamplingParams:
        """Parse ``value`` for setting ``name`` (as in ``/set temperature 0.7``).

        ``seed``: an integer or ``none``/``random``. ``stop``: ``none``/empty for no stop
        strings, a JSON list (``["\\n\\n", "User:"]``), or one string where ``\\n`` and ``\\t``
        escapes are decoded.
        """
        key = name.strip().lower().replace("-", "_")
        key = _ALIASES.get(key, key)
        if key not in self.field_names():
            raise MoechatError(
                f"unknown sampling setting {name!r}; valid: {', '.join(self.field_names())}"
            )
        return self.replace(**{key: _parse(key, value)})

    def to_dict(self) -> dict[str, Any]:
        """A JSON-ready dict."""
        data = {k: v.item() if isinstance(v, np.generic) else v for k, v in vars(self).items()}
        return {**data, "stop": list(self.stop)}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> SamplingParams:
        """Build from a dict; unknown keys are ignored, missing ones take defaults."""
        known = {k: v for k, v in data.items() if k in cls.field_names()}
        return cls().replace(**known)


def _parse(key: str, value: str) -> Any:
    text = value.strip()
    if key == "stop":
        if text.lower() in ("", "none", "[]"):
            return []
        if text.startswith("["):
            try:
                parsed = json.loads(text)
            except json.JSONDecodeError as err:
                raise MoechatError(f"stop: cannot parse JSON list: {err.msg}") from None
            if not isinstance(parsed, list):
                raise MoechatError("stop: expected a JSON list of strings")
            return parsed
        return [value.replace("\\n", "\n").replace("\\t", "\t")]
    if key == "seed" and text.lower() in ("none", "random", ""):
        return None
    try:
        return int(text) if key in _INT_FIELDS else float(text)
    except ValueError:
        kind = "an integer" if key in _INT_FIELDS else "a number"
        raise MoechatError(f"{key} must be {kind}, got {value!r}") from None


class Sampler:
    """Pick the next token from logits according to :class:`SamplingParams`.

    Tokens whose tempered logit is more than ``CUTOFF`` below the maximum are dropped
    before the softmax (their total probability is below 1e-12 even for a 1M vocab), so
    most of the work runs on a small candidate set.
    """

    CUTOFF = 40.0
    #: first candidate pool (growing x8) tried before a full sort for top-p
    NUCLEUS_POOL = 512

    def __init__(self, params: SamplingParams) -> None:
        self.params = params.validate()
        self.rng = np.random.default_rng(params.seed)

    def sample(self, logits: np.ndarray, context_ids: Sequence[int] = ()) -> int:
        """One token id from 1-D ``logits``; ``context_ids`` get the repetition penalty."""
        p = self.params
        logits = np.asarray(logits, dtype=np.float32)
        if logits.ndim != 1 or logits.size == 0:
            raise ValueError(f"expected 1-D non-empty logits, got shape {logits.shape}")
        vocab = logits.size
        if p.repetition_penalty != 1.0 and len(context_ids):
            ids = np.unique(np.asarray(context_ids, dtype=np.int64))
            ids = ids[(ids >= 0) & (ids < vocab)]
            logits = logits.copy()  # the caller's logits stay as they were
            sel = logits[ids]
            with np.errstate(over="ignore"):  # a penalty below 1 on a huge logit
                new = np.where(sel > 0, sel / p.repetition_penalty, sel * p.repetition_penalty)
            # saturate instead of overflowing: a finite logit stays finite
            logits[ids] = np.where(np.isfinite(sel), np.clip(new, -_F32_MAX, _F32_MAX), sel)
        if p.greedy:  # one pass over the vocabulary in the common case (argmax sees NaN as max)
            best = int(np.argmax(logits))
            if np.isfinite(logits[best]):
                return best
        top = logits.max()
        has_nan = bool(np.isnan(top))
        if has_nan:
            top = np.nanmax(logits) if not np.isnan(logits).all() else top
        if top == np.inf:  # an fp16 overflow: the +inf tokens are the most likely ones
            winners = np.flatnonzero(np.isposinf(logits))
            pick = 0 if p.greedy else int(self.rng.integers(winners.size))
            return int(winners[pick])
        if not np.isfinite(top):
            raise NonFiniteLogitsError(
                "the model computed no usable logits (all NaN or -infinity): its graph or "
                "weights are broken (moechat info --verify PACKAGE checks the files)"
            )
        if p.greedy:
            return int(np.nanargmax(logits) if has_nan else np.argmax(logits))

        # Candidates: ids within CUTOFF of the max after temperature (NaN compares False).
        idx = np.flatnonzero(logits >= top - self.CUTOFF * p.temperature)
        cand = logits[idx]
        if 0 < p.top_k < idx.size:  # temperature is monotonic: top-k on raw logits
            part = np.argpartition(cand, idx.size - p.top_k)[idx.size - p.top_k :]
            idx, cand = idx[part], cand[part]
        probs = np.exp((cand.astype(np.float64) - float(top)) / p.temperature)
        probs /= probs.sum()

        if p.top_p < 1.0:
            pool_size = self.NUCLEUS_POOL
            while idx.size > 2 * pool_size:  # avoid sorting the whole candidate set
                n = idx.size - pool_size
                pool = np.argpartition(probs, n)[n:]
                if probs[pool].sum() >= p.top_p:  # the nucleus lies inside the pool
                    idx, probs = idx[pool], probs[pool]
                    break
                pool_size *= 8
            order = np.argsort(-probs, kind="stable")
            cum = np.cumsum(probs[order])
            keep = order[: int(np.searchsorted(cum, p.top_p, side="left")) + 1]
            idx, probs = idx[keep], probs[keep]
        if p.min_p > 0.0:
            mask = probs >= p.min_p * probs.max()
            idx, probs = idx[mask], probs[mask]

        return int(idx[_draw(probs, self.rng.random())])


def _draw(probs: np.ndarray, u: float, block: int = 256) -> int:
    """Index drawn with probability proportional to ``probs`` for a uniform ``u`` in [0, 1).

    Large arrays use a two-level (block sums, then one block) search: ``np.cumsum`` over a
    whole 50k vocabulary is surprisingly slow.
    """
    if probs.size <= 4 * block:
        cum = np.cumsum(probs)
        return min(int(np.searchsorted(cum, u * cum[-1], side="right")), probs.size - 1)
    pad = -probs.size % block
    blocks = np.concatenate([probs, np.zeros(pad)]).reshape(-1, block)
    bcum = np.cumsum(blocks.sum(axis=1))
    target = u * bcum[-1]
    b = min(int(np.searchsorted(bcum, target, side="right")), bcum.size - 1)
    while b > 0 and bcum[b] == bcum[b - 1]:  # never land in an all-zero block
        b -= 1
    rest = target - (bcum[b - 1] if b else 0.0)
    cum = np.cumsum(blocks[b])
    i = min(int(np.searchsorted(cum, rest, side="right")), block - 1)
    while blocks[b, i] == 0:  # float rounding at a block's end: step back to mass
        i -= 1
    return b * block + i
