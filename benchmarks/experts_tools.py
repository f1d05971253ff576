"""Expert tools measured (issue 19): runtime top-k, pruning and extraction.

    python benchmarks/experts_tools.py [--package DIR] [--minimind WORK] [--repeat 3]
        [--skip-prune] [--skip-extract] [--json OUT]

- top-k: for every K from 1 to the trained k (``--experts-per-token K``): decode speed
  (64 greedy-free steps after a 64-token prompt, one token per step, K interleaved across
  ``--repeat`` rounds, medians) and teacher-forced perplexity on export/data/heldout.txt;
- prune (``moechat experts prune --keep N`` for every N from k to the experts): package
  size and perplexity (calibration and scoring text: the held-out text);
- extract (``moechat experts extract``: every expert, and ``--merge``): perplexity.

``--package``: default the demo package (``moechat info`` says where); ``--minimind
WORK``: also a random-weight MiniMind2-MoE shape package (int8, built once into WORK
with transformers-free moechat export of a random state dict; its perplexity is that of
random weights and only the speed column means something). Not a test: results go to
docs/benchmarks.md with the machine and load.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
HELDOUT = ROOT / "export" / "data" / "heldout.txt"


def decode_ms(path: Path, k: int, steps: int = 64) -> float:
    from moechat.runtime.model import load_model

    model = load_model(path, "cpu", experts_per_token=k)
    rng = np.random.default_rng(0)
    prompt = rng.integers(10, model.package.spec.architecture.vocab_size - 10, 64)
    model.decoder.forward(prompt)
    start = time.perf_counter()
    for t in rng.integers(10, 1000, steps):
        model.decoder.forward([int(t)])
    return (time.perf_counter() - start) / steps * 1e3


def perplexity(path: Path, k: int | None = None) -> float:
    from moechat.runtime.evaluate import evaluate_perplexity
    from moechat.runtime.model import load_model

    model = load_model(path, "cpu", max_context=512, experts_per_token=k)
    ids = model.tokenizer.encode_text(HELDOUT.read_text(encoding="utf-8"))
    return evaluate_perplexity(model.decoder, ids).perplexity


def top_k_table(path: Path, repeat: int) -> list[dict[str, Any]]:
    arch = json.loads((path / "moechat.json").read_text())["architecture"]
    ks = list(range(1, int(arch["num_experts_per_tok"]) + 1))
    times: dict[int, list[float]] = {k: [] for k in ks}
    for _ in range(repeat):
        for k in ks:
            times[k].append(decode_ms(path, k))
    return [
        {"k": k, "decode_ms": round(statistics.median(times[k]), 2),
         "decode_tok_s": round(1e3 / statistics.median(times[k]), 1),
         "perplexity": round(perplexity(path, k), 3)}
        for k in ks
    ]  # fmt: skip


def prune_table(path: Path, work: Path) -> list[dict[str, Any]]:
    from moechat.export.experts.prune import run_prune

    arch = json.loads((path / "moechat.json").read_text())["architecture"]
    rows = []
    for keep in range(int(arch["n_routed_experts"]), int(arch["num_experts_per_tok"]) - 1, -1):
        out = work / f"keep{keep}"
        record = run_prune(str(path), str(out), keep, force=True, progress=lambda _: None)
        rows.append({
            "keep": keep, "bytes": record["bytes"]["after"],
            "bytes_before": record["bytes"]["before"],
            "perplexity": record["perplexity"]["new"]["perplexity"],
            "perplexity_before": record["perplexity"]["source"]["perplexity"],
            "dropped_layer0": next(iter(record["prune"]["dropped"].values())),
        })  # fmt: skip
    return rows


def extract_table(path: Path, work: Path) -> list[dict[str, Any]]:
    from moechat.export.experts.extract import run_extract

    arch = json.loads((path / "moechat.json").read_text())["architecture"]
    rows = []
    for expert in [*range(int(arch["n_routed_experts"])), None]:
        out = work / f"expert{expert}"
        record = run_extract(str(path), str(out), expert, force=True, progress=lambda _: None)
        rows.append({
            "expert": "merge" if expert is None else expert, "bytes": record["bytes"]["after"],
            "perplexity": record["perplexity"]["new"]["perplexity"],
            "perplexity_source": record["perplexity"]["source"]["perplexity"],
        })  # fmt: skip
    return rows


def minimind_package(work: Path) -> Path:
    """A random-weight MiniMind2-MoE (the preset's shape) as an int8 package, built once."""
    out = work / "minimind2-moe-int8"
    if (out / "moechat.json").is_file():
        return out
    import torch

    sys.path.insert(0, str(ROOT / "tests"))
    from moechat.app.cli import main
    from moechat.models.config import PRESETS
    from moechat.models.modeling import random_model

    from tokenizer_factory import train_tiny_tokenizer

    cfg = PRESETS["minimind2-moe"]
    work.mkdir(parents=True, exist_ok=True)
    torch.save(random_model(cfg, seed=0).state_dict(), work / "minimind2-moe.pth")
    tok = work / "tokenizer"
    tok.mkdir(exist_ok=True)
    train_tiny_tokenizer(tok / "tokenizer.json", vocab_size=cfg.vocab_size)
    rc = main(["export", str(work / "minimind2-moe.pth"), str(out), "--preset", "minimind2-moe",
               "--tokenizer", str(tok), "--int8", "--force"])  # fmt: skip
    if rc:
        raise SystemExit(f"export failed ({rc})")
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--package", help="MoE package (default: the demo)")
    parser.add_argument("--minimind", metavar="WORK", help="also a MiniMind2-MoE shape package")
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--skip-top-k", action="store_true")
    parser.add_argument("--skip-prune", action="store_true")
    parser.add_argument("--skip-extract", action="store_true")
    parser.add_argument("--json", help="write the results here")
    args = parser.parse_args(argv)
    if args.package:
        package = Path(args.package)
    else:
        from moechat.app.model_discovery import demo_package_dir

        package = demo_package_dir()
    results: dict[str, Any] = {"load_before": os.getloadavg()[0], "package": str(package)}
    if not args.skip_top_k:
        results["top_k"] = top_k_table(package, args.repeat)
        print(json.dumps({"top_k": results["top_k"]}), flush=True)
    with tempfile.TemporaryDirectory() as tmp:
        if not args.skip_prune:
            results["prune"] = prune_table(package, Path(tmp))
            print(json.dumps({"prune": results["prune"]}), flush=True)
        if not args.skip_extract:
            results["extract"] = extract_table(package, Path(tmp))
            print(json.dumps({"extract": results["extract"]}), flush=True)
    if args.minimind:
        mm = minimind_package(Path(args.minimind))
        results["minimind_top_k"] = top_k_table(mm, args.repeat)
        results["minimind_package"] = str(mm)
        print(json.dumps({"minimind_top_k": results["minimind_top_k"]}), flush=True)
    results["load_after"] = os.getloadavg()[0]
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=2))
    print(json.dumps(results))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
