"""Decode speed with and without the weights on transparent huge pages, in fresh
processes (results in docs/benchmarks.md, "Weights on transparent huge pages"). Not a test.

    python benchmarks/hugepages_ab.py PACKAGE [--pairs 10] [--threads 2]

Each pair runs two fresh processes, one with ``MOECHAT_HUGEPAGES=0``, alternating which
goes first. A process loads the package, runs one warm-up round and 5 timed rounds (a
256-token prompt, then 127 greedy steps through ``Decoder.forward``) and prints its
median decode speed; the pairs' ratios (huge pages / 4 KiB pages) are summarised.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys

ROUNDS = 5


def _child(package: str, threads: int) -> None:
    from session_option_ab import _round

    from moechat.runtime.bench import prompt_ids
    from moechat.runtime.model import load_model

    model = load_model(package, "cpu", None, threads)
    ids = prompt_ids(model.tokenizer, 256)
    _round(model, ids)  # warm-up
    decode = statistics.median(_round(model, ids)[1] for _ in range(ROUNDS))
    print(json.dumps({"decode": decode, "huge_page_bytes": model.huge_page_bytes}))


def _run(package: str, threads: int, huge: bool) -> dict:
    env = {**os.environ, "MOECHAT_HUGEPAGES": "1" if huge else "0"}
    cmd = [sys.executable, __file__, package, "--threads", str(threads), "--child"]
    out = subprocess.run(cmd, env=env, capture_output=True, text=True, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("package")
    parser.add_argument("--pairs", type=int, default=10)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        _child(args.package, args.threads)
        return
    ratios = []
    for pair in range(args.pairs):
        order = (True, False) if pair % 2 == 0 else (False, True)
        result = {huge: _run(args.package, args.threads, huge) for huge in order}
        on, off = result[True], result[False]
        ratios.append(on["decode"] / off["decode"])
        print(
            f"pair {pair + 1}: huge pages {on['decode']:.1f} tok/s "
            f"({on['huge_page_bytes'] / 2**20:.0f} MiB moved), 4 KiB pages "
            f"{off['decode']:.1f} tok/s: {ratios[-1]:.3f}x",
            flush=True,
        )
    wins = sum(r > 1 for r in ratios)
    print(
        f"huge pages faster in {wins} of {len(ratios)} pairs, "
        f"median ratio {statistics.median(ratios):.3f}x"
    )


if __name__ == "__main__":
    main()
