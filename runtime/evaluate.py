"""Perplexity of a package on a text file, teacher-forced through the KV cache.

The text is tokenized as plain data (no BOS, no chat template). Tokens are fed in
chunks of ``chunk`` tokens onto the growing cache, and the logits at every position
score the next token. A text longer than the context is split into windows of the
context length; consecutive windows share one token, so every token but the first is
predicted exactly once (the first tokens of a later window see less context).

Torch-free: used by ``moechat eval`` and by the exporter's fidelity report.
"""

from __future__ import annotations

import math
import sys
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, TextIO

import numpy as np

from moechat.runtime.errors import MoechatError

if TYPE_CHECKING:
    from moechat.runtime.decoder import Decoder

DEFAULT_CHUNK = 256


@dataclass
class EvalResult:
    perplexity: float
    tokens: int  # predicted (scored) tokens
    tokens_per_s: float  # tokens fed through the model per second
    seconds: float
    windows: int

    def to_dict(self) -> dict:
        return {
            # JSON has no NaN or Infinity: a perplexity too large for a float is null
            "perplexity": round(self.perplexity, 4) if math.isfinite(self.perplexity) else None,
            "tokens": self.tokens,
            "tokens_per_s": round(self.tokens_per_s, 1),
        }


def read_text_file(path: str | Path) -> str:
    """UTF-8 text (a BOM is accepted); MoechatError for missing, binary or empty files."""
    path = Path(path)
    if not path.exists():
        raise MoechatError(f"text file not found: {path}")
    if not path.is_file():
        raise MoechatError(f"{path} is not a file")
    data = path.read_bytes()
    try:
        text = data.decode("utf-8-sig")
    except UnicodeDecodeError as err:
        raise MoechatError(
            f"{path} is not UTF-8 text (byte 0x{data[err.start]:02x} at offset {err.start})"
        ) from None
    if not text.strip():
        raise MoechatError(f"{path} is empty: there is no text to score")
    return text


def log_softmax(logits: np.ndarray) -> np.ndarray:
    x = logits.astype(np.float64)
    x = x - x.max(axis=-1, keepdims=True)
    return x - np.log(np.exp(x).sum(axis=-1, keepdims=True))


def windows(num_tokens: int, window: int) -> list[tuple[int, int]]:
    """[start, end) spans of at most ``window`` tokens, each sharing one token with the next."""
    if window < 2:
        raise ValueError("a window needs at least 2 tokens")
    spans, start = [], 0
    while True:
        end = min(start + window, num_tokens)
        spans.append((start, end))
        if end >= num_tokens:
            return spans
        start = end - 1


def teacher_forced_chunks(
    num_tokens: int, window: int, chunk: int
) -> Iterator[tuple[bool, int, int, int]]:
    """(starts a new window, chunk start, chunk end, scored) over the whole text.

    A chunk's logits at positions [start, start + scored) score the tokens
    [start + 1, start + scored + 1); the last position of a window has no target.
    """
    for w_start, w_end in windows(num_tokens, window):
        for c in range(w_start, w_end, chunk):
            end = min(c + chunk, w_end)
            yield c == w_start, c, end, min(end, w_end - 1) - c


class ProgressBar:
    """A one-line progress bar on stderr, redrawn with \\r (no dependency)."""

    def __init__(
        self, total: int, label: str = "eval", stream: TextIO | None = None, width: int = 30
    ) -> None:
        self.total, self.label, self.width = max(total, 1), label, width
        self.stream = stream if stream is not None else sys.stderr
        self.start = time.perf_counter()
        self._last = 0.0
        self._shown = -1

    def update(self, done: int, force: bool = False) -> None:
        now = time.perf_counter()
        if not force and now - self._last < 0.1:
            return
        if force and done == self._shown:
            return
        self._last, self._shown = now, done
        frac = min(done / self.total, 1.0)
        filled = int(frac * self.width)
        rate = done / max(now - self.start, 1e-9)
        bar = "#" * filled + "." * (self.width - filled)
        self.stream.write(
            f"\r{self.label} [{bar}] {done}/{self.total} tokens {frac:4.0%} {rate:7.1f} tok/s"
        )
        self.stream.flush()

    def close(self, done: int) -> None:
        self.update(done, force=True)
        self.stream.write("\n")
        self.stream.flush()


def evaluate_perplexity(
    decoder: Decoder,
    token_ids: Sequence[int],
    chunk: int = DEFAULT_CHUNK,
    window: int | None = None,
    progress: Callable[[int], None] | None = None,
) -> EvalResult:
    """Teacher-forced perplexity of ``token_ids`` on a :class:`~moechat.runtime.decoder.Decoder`.

    ``window`` defaults to the decoder's context; ``progress(tokens_fed)`` is called
    after every chunk.
    """
    ids = np.asarray(token_ids, dtype=np.int64)
    if len(ids) < 2:
        raise MoechatError(
            f"the text is {len(ids)} token{'s' if len(ids) != 1 else ''}: "
            "perplexity needs at least 2"
        )
    if chunk < 1:
        raise MoechatError(f"--chunk must be at least 1 (got {chunk})")
    window = min(window or decoder.max_context, decoder.max_context)
    if window < 2:
        raise MoechatError("the context is too small to score any token")
    nll = 0.0
    scored = fed = 0
    spans = 0
    start = time.perf_counter()
    for new_window, a, b, n in teacher_forced_chunks(len(ids), window, chunk):
        if new_window:
            decoder.reset()
            spans += 1
        logits = decoder.forward(ids[a:b], logits_for="all")
        fed += b - a
        if n:
            if not np.isfinite(logits[:n]).all():
                raise MoechatError(
                    f"the model computed non-finite logits (NaN or infinity) around token {a}: "
                    "its graph or weights are broken, there is no perplexity to report"
                )
            lp = log_softmax(logits[:n])
            nll -= float(lp[np.arange(n), ids[a + 1 : a + 1 + n]].sum())
            scored += n
        if progress is not None:
            progress(fed)
    seconds = time.perf_counter() - start
    decoder.reset()
    return EvalResult(
        perplexity=math.exp(nll / scored) if nll / scored < 700 else math.inf,
        tokens=scored,
        tokens_per_s=fed / seconds if seconds > 0 else 0.0,
        seconds=seconds,
        windows=spans,
    )
