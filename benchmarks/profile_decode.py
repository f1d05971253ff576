"""Where a package's decode step spends its time: onnxruntime's profiler, per op type.

    python benchmarks/profile_decode.py PACKAGE [--context 256] [--steps 32] [--threads N]
        [--prefill]

Prefills ``--context`` tokens, then profiles ``--steps`` single-token decode steps with
``SessionOptions.enable_profiling`` and prints the time per op type (summed kernel time
per step), the number of kernel launches per step and the share of the step's wall time
spent outside kernels (session overhead, thread-pool waits, Python). ``--prefill``
profiles ``--steps`` prefills of the ``--context`` tokens instead (a fresh cache each).
Not a test.
"""

from __future__ import annotations

import argparse
import collections
import json
import os
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("package")
    parser.add_argument("--context", type=int, default=256)
    parser.add_argument("--steps", type=int, default=32)
    parser.add_argument("--threads", type=int, default=os.cpu_count())
    parser.add_argument("--top", type=int, default=15)
    parser.add_argument("--prefill", action="store_true", help="profile prefills instead")
    args = parser.parse_args(argv)

    import onnxruntime as ort

    from moechat.runtime.decoder import Decoder
    from moechat.runtime.package import load_package
    from moechat.runtime.providers import session_options

    package = load_package(args.package)
    arch = package.architecture
    rng = np.random.default_rng(0)
    context = rng.integers(0, arch["vocab_size"], size=args.context).tolist()

    def decoder(profile: bool) -> Decoder:
        opts = session_options("CPUExecutionProvider", args.threads)
        if profile:
            opts.enable_profiling = True
            opts.profile_file_prefix = str(Path(tempfile.mkdtemp()) / "decode")
        session = ort.InferenceSession(
            str(package.graph_path()), sess_options=opts, providers=["CPUExecutionProvider"]
        )
        return Decoder(
            session, arch["num_hidden_layers"], arch["num_key_value_heads"], arch["head_dim"],
            max_context=args.context + args.steps + 8, static_cache=True,
        )  # fmt: skip

    def step(dec: Decoder) -> None:
        if args.prefill:
            dec.reset()
            dec.forward(context)
        else:
            dec.forward([1])

    # Wall time per step without the profiler (it adds its own overhead).
    plain = decoder(False)
    plain.forward(context)
    walls = []
    for _ in range(args.steps):
        t = time.perf_counter()
        step(plain)
        walls.append(time.perf_counter() - t)
    wall_ms = statistics.median(walls) * 1000

    prof = decoder(True)
    prof.forward(context)
    for _ in range(args.steps):
        step(prof)
    trace = json.loads(Path(prof.session.end_profiling()).read_text())
    runs = [e for e in trace if e.get("cat") == "Session" and e["name"] == "model_run"]
    decode_runs = runs[-args.steps :]
    t0 = decode_runs[0]["ts"]
    kernels = [
        e
        for e in trace
        if e.get("cat") == "Node" and e["name"].endswith("_kernel_time") and e["ts"] >= t0
    ]
    by_type: dict[str, float] = collections.defaultdict(float)
    count: dict[str, int] = collections.defaultdict(int)
    for e in kernels:
        op = e.get("args", {}).get("op_name", "?")
        by_type[op] += e["dur"] / 1000 / args.steps
        count[op] += 1
    kernel_ms = sum(by_type.values())
    run_ms = statistics.median(r["dur"] for r in decode_runs) / 1000
    what = (
        f"prefill {args.context} tokens" if args.prefill else f"decode 1 token onto {args.context}"
    )
    print(f"{package.name}: {what}, {args.threads} threads, onnxruntime {ort.__version__}")
    tokens = args.context if args.prefill else 1
    print(
        f"wall per step (no profiler) {wall_ms:.2f} ms = {1000 * tokens / wall_ms:.1f} tok/s; "
        f"profiled model_run {run_ms:.2f} ms, kernels {kernel_ms:.2f} ms, "
        f"{len(kernels) / args.steps:.0f} kernel launches per step"
    )
    print("| op type | ms/step | share of kernel time | launches/step |")
    print("|---|---|---|---|")
    for op, ms in sorted(by_type.items(), key=lambda kv: -kv[1])[: args.top]:
        print(f"| {op} | {ms:.3f} | {ms / kernel_ms:.1%} | {count[op] / args.steps:.0f} |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
