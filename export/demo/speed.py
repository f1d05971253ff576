"""Decode speed of packages side by side: the demo against its dense parent.

Each round decodes ``NEW_TOKENS`` greedy tokens after the same ``PROMPT_TOKENS``-token
prompt on every package, the order alternating from round to round, so a machine that
gets busier or quieter mid-way affects both alike; the ratio is of the medians.
"""

from __future__ import annotations

import statistics
from collections.abc import Mapping
from pathlib import Path

from moechat.runtime.bench import measure_generation, prompt_ids
from moechat.runtime.model import load_model

PROMPT_TOKENS = 128
NEW_TOKENS = 64


def decode_rates(
    packages: Mapping[str, Path], threads: int | None, rounds: int
) -> dict[str, list[float]]:
    """Package name -> decode tok/s of each round (``threads`` None: the runtime's default)."""
    models = {name: load_model(path, "cpu", threads=threads) for name, path in packages.items()}
    ids = prompt_ids(next(iter(models.values())).tokenizer, PROMPT_TOKENS)
    rates: dict[str, list[float]] = {name: [] for name in models}
    for r in range(rounds):
        order = list(models) if r % 2 == 0 else list(reversed(models))
        for name in order:
            run = measure_generation(models[name], ids, NEW_TOKENS, 1)
            rates[name].append(run.decode_tokens_per_s)
    return rates


def speed_against(baseline: str, rates: Mapping[str, list[float]]) -> dict[str, dict]:
    """Median decode rate per package and its ratio to ``baseline``'s."""
    base = statistics.median(rates[baseline])
    return {
        name: {
            "decode_tokens_per_s": round(statistics.median(runs), 2),
            "ratio": round(statistics.median(runs) / base, 3),
            "rounds": runs,
        }
        for name, runs in rates.items()
    }
