"""Decode and prefill speed of one package with and without onnxruntime session config
entries, in one process, alternating rounds (results in docs/benchmarks.md, "Thread-pool
options, and a bias in one-process A/B runs"). Not a test.

    python benchmarks/session_option_ab.py PACKAGE session.dynamic_block_base=4 [...] \\
        [--rounds 16] [--threads 2]

Each variant loads the package once with the runtime's own session options plus its
entries. Per round and variant: a 256-token prompt, then 127 greedy decode steps
through ``Decoder.forward``; each round starts with the next variant. Loading order
matters on its own (the first session loaded decoded 3-11% slower than an identical
later one): ``--control`` adds a second, identical baseline session, the fair
reference for every variant.
"""

from __future__ import annotations

import argparse
import statistics
import time

import numpy as np

from moechat.runtime import providers
from moechat.runtime.bench import prompt_ids
from moechat.runtime.model import load_model

STEPS = 127


def _load(package: str, threads: int, entries: dict[str, str]):
    base = providers.session_options

    def with_entries(provider: str, threads: int | None = None):
        options = base(provider, threads)
        for key, value in entries.items():
            options.add_session_config_entry(key, value)
        return options

    providers.session_options = with_entries
    try:
        return load_model(package, "cpu", None, threads)
    finally:
        providers.session_options = base


def _round(model, ids: list[int]) -> tuple[float, float]:
    """(prefill tok/s, decode tok/s) for one prompt and STEPS greedy steps."""
    decoder = model.decoder
    decoder.reset()
    start = time.perf_counter()
    logits = decoder.forward(ids)
    prefilled = time.perf_counter()
    for _ in range(STEPS):
        logits = decoder.forward([int(np.argmax(logits[-1]))])
    end = time.perf_counter()
    return len(ids) / (prefilled - start), STEPS / (end - prefilled)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("package")
    parser.add_argument("entries", nargs="+", help="KEY=VALUE session config entries")
    parser.add_argument("--rounds", type=int, default=16)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--control", action="store_true", help="a second baseline session")
    args = parser.parse_args()
    variants: dict[str, dict[str, str]] = {"runtime default": {}}
    if args.control:
        variants["runtime default, loaded again"] = {}
    for entry in args.entries:
        key, value = entry.split("=", 1)
        variants[entry] = {key: value}
    models = {name: _load(args.package, args.threads, e) for name, e in variants.items()}
    ids = prompt_ids(next(iter(models.values())).tokenizer, 256)
    results: dict[str, list[tuple[float, float]]] = {name: [] for name in models}
    for model in models.values():
        _round(model, ids)  # warm-up
    names = list(models)
    for r in range(args.rounds):  # each round starts with the next variant: no order bias
        for name in names[r % len(names) :] + names[: r % len(names)]:
            results[name].append(_round(models[name], ids))
    baseline = [d for _, d in results["runtime default"]]
    for name, rounds in results.items():
        decode = [d for _, d in rounds]
        faster = sum(d > b for d, b in zip(decode, baseline, strict=True))
        print(
            f"{name}: decode median {statistics.median(decode):.1f} tok/s "
            f"(faster than the default in {faster} of {len(decode)} rounds), "
            f"prefill median {statistics.median(p for p, _ in rounds):.0f} tok/s"
        )


if __name__ == "__main__":
    main()
