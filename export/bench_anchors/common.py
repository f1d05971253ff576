"""What every anchor adapter shares: the adapter interface, source checks, timing."""

from __future__ import annotations

import importlib.util
import statistics
import sys
import time
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any, Protocol

Spec = dict[str, Any]  # what a worker gets: manifest, package, prompt ids, threads, cache dir
RunResult = dict[str, Any]  # one timed generation: ttft_ms, decode_tokens_per_s, token_ids
Runner = Callable[[int], RunResult]


class Anchor(Protocol):
    """One engine measured beside moechat (a module in this package)."""

    NAME: str
    INSTALL: str  # how to install what it needs

    def skip_reason(self, manifest: dict[str, Any], source: Path | None) -> str | None:
        """None when it can run on this package, else why it is skipped."""

    def prepare(self, spec: Spec) -> dict[str, Any]:
        """Convert the weights for this engine (cached); what ``load`` needs besides."""

    def load(self, spec: Spec) -> tuple[Runner, dict[str, Any]]:
        """Load the engine once: a function making ``n`` timed tokens, and version info."""


def installed(module: str) -> bool:
    try:
        return importlib.util.find_spec(module) is not None
    except (ImportError, ValueError):
        return False


def source_kind(source: Path) -> str:
    if source.is_dir():
        return "hf"
    if source.suffix == ".gguf":
        return "gguf"
    return "state_dict"


def source_missing(manifest: dict[str, Any]) -> str | None:
    """Why the package's recorded source cannot be used here, or None."""
    src = manifest.get("provenance", {}).get("source")
    if not src:
        return "the package records no source"
    if not Path(src).exists():
        return f"its source {src} is not available here"
    return None


def llama_engine_problem(
    manifest: dict[str, Any], module: str, not_installed: str, engine: str
) -> str | None:
    """Why an engine for dense Llama models (``module`` to import) cannot run this
    package's source, or None."""
    arch = manifest["architecture"]
    if not installed(module):
        return not_installed
    if arch.get("model_type") != "llama" or arch.get("use_moe"):
        return f"not applicable: {engine} has no MiniMind / MiniMind-MoE architecture"
    return source_missing(manifest)


def log(message: str) -> None:
    print(f"[bench-compare] {message}", file=sys.stderr, flush=True)


def timed_stream(tokens_iter: Iterable[int], start: float, new_tokens: int) -> RunResult:
    """Consume ``new_tokens`` ids from an iterator started at ``start``; time them."""
    ids: list[int] = []
    first = start
    for tok in tokens_iter:
        if not ids:
            first = time.perf_counter()
        ids.append(int(tok))
        if len(ids) >= new_tokens:
            break
    end = time.perf_counter()
    decode = (len(ids) - 1) / (end - first) if len(ids) > 1 and end > first else 0.0
    return {"ttft_ms": (first - start) * 1000, "decode_tokens_per_s": decode, "token_ids": ids}


def summarise(runs: list[RunResult], prompt_tokens: int) -> dict[str, Any]:
    """Medians over runs; the last run's token ids (greedy: all runs agree)."""

    def med(key: str) -> float:
        return round(float(statistics.median(r[key] for r in runs)), 3)

    ttft = med("ttft_ms")
    return {
        "status": "ok",
        "ttft_ms": ttft,
        "prefill_tokens_per_s": round(prompt_tokens / (ttft / 1000), 2) if ttft else None,
        "decode_tokens_per_s": med("decode_tokens_per_s"),
        "runs": [{k: round(v, 3) for k, v in r.items() if k != "token_ids"} for r in runs],
        "token_ids": runs[-1].get("token_ids", []),
    }
