"""Decode speed of a moechat package against an onnxruntime-genai model, one engine per
fresh process, alternating (the cleanest A/B of the two graphs on a noisy machine).

    python benchmarks/decode_ab.py PACKAGE GENAI_DIR [--threads 2] [--rounds 3] [--context N]

GENAI_DIR: onnxruntime-genai model builder output (``moechat bench --compare`` leaves
one in its cache, ``.../genai-int8-cpu``). Each process prefills the same 256 token
ids, then times 128 greedy decode steps three times: moechat through ``Decoder``
(static IO-bound KV cache), genai through its own generator loop. Both engines size
their KV buffers to ``--context`` tokens (default: prompt + steps = 384, what
``moechat bench --compare`` gives genai; moechat's chat default is the package's
context). Not a test.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time

PROMPT = list(range(1000, 1256))
STEPS = 128


def _moechat(package: str, threads: int, context: int) -> list[float]:
    import numpy as np

    from moechat.runtime.model import load_model

    model = load_model(package, "cpu", max_context=context, threads=threads)
    speeds = []
    for _ in range(3):
        model.decoder.reset()
        logits = model.decoder.forward(PROMPT)
        start = time.perf_counter()
        for _ in range(STEPS):
            logits = model.decoder.forward([int(np.argmax(logits[-1]))])
        speeds.append(STEPS / (time.perf_counter() - start))
    return speeds


def _genai(folder: str, threads: int, context: int) -> list[float]:
    import onnxruntime_genai as og

    config = og.Config(folder)
    options = {"intra_op_num_threads": threads, "inter_op_num_threads": 1}
    config.overlay(json.dumps({"model": {"decoder": {"session_options": options}}}))
    model = og.Model(config)
    speeds = []
    for _ in range(3):
        params = og.GeneratorParams(model)
        total = len(PROMPT) + STEPS
        params.set_search_options(do_sample=False, max_length=context, min_length=total)
        generator = og.Generator(model, params)
        generator.append_tokens(PROMPT)
        start = time.perf_counter()
        for _ in range(STEPS):
            generator.generate_next_token()
        speeds.append(STEPS / (time.perf_counter() - start))
    return speeds


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("package")
    parser.add_argument("genai_dir")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--context", type=int, default=len(PROMPT) + STEPS)
    parser.add_argument("--worker", choices=["moechat", "genai"], help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.worker:
        run = _moechat if args.worker == "moechat" else _genai
        folder = args.package if args.worker == "moechat" else args.genai_dir
        print(json.dumps(run(folder, args.threads, args.context)))
        return 0
    results: dict[str, list[float]] = {"moechat": [], "genai": []}
    for _ in range(args.rounds):
        for engine in results:
            cmd = [sys.executable, __file__, args.package, args.genai_dir, "--worker", engine,
                   "--threads", str(args.threads), "--context", str(args.context)]  # fmt: skip
            out = subprocess.run(cmd, capture_output=True, text=True, check=True).stdout
            results[engine] += json.loads(out.strip().splitlines()[-1])
    for engine, speeds in results.items():
        print(f"{engine}: decode {min(speeds):.1f}-{max(speeds):.1f} tok/s "
              f"(median {sorted(speeds)[len(speeds) // 2]:.1f}, {len(speeds)} runs)")  # fmt: skip
    ours, theirs = (sorted(r)[len(r) // 2] for r in results.values())
    print(f"moechat / genai: {ours / theirs:.2f}x")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
