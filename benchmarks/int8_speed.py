"""int8 vs fp32 decoder speed on CPU at the MiniMind2-MoE shape (random weights).

    python benchmarks/int8_speed.py [--workdir DIR] [--variants a,b,...] [--repeats N]

Exports the random ``minimind2-moe`` model once per MoE lowering (fp32), quantises
it in every int8 variant, then times each graph through the runtime's Decoder
(static KV cache, as `moechat run` uses it):
  decode   one token onto a 256-token cache (median of the steps);
  prefill  256 tokens onto an empty cache (median of the repeats).
Graphs are cached in --workdir, so a rerun only times. Not a test: numbers depend on
the machine and its load; the variants are interleaved per round to share the noise.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time
from pathlib import Path

import numpy as np

VARIANTS = {
    # name: (fp32 lowering, int8 options or None)
    "fp32-contrib": ("contrib", None),
    "fp32-ops": ("ops", None),
    "int8-qmoe-dynamic": ("contrib", ("qmoe", "dynamic")),
    "int8-qmoe-nbits": ("contrib", ("qmoe", "nbits")),
    # MatMulNBits block 32: what `moechat export --int8` uses for MoE models (the variant
    # above has QuantizeOptions' default, 64, the dense-model default)
    "int8-qmoe-nbits32": ("contrib", ("qmoe", "nbits", {}, {"block": 32})),
    # the same with --int8-residual-pass (what the demo uses)
    "int8-qmoe-nbits32-residual": (
        "contrib",
        ("qmoe", "nbits", {}, {"block": 32, "residual_pass": True}),
    ),
    "int8-qmoe64-nbits": ("contrib", ("qmoe", "nbits", {"QMOE_BLOCK_SIZES": (64,)})),
    "int8-ops-dynamic": ("ops", ("ops", "dynamic")),
    "int8-ops-nbits": ("ops", ("ops", "nbits")),
}
CONTEXT = 256
PREFILL = 256
MAX_CONTEXT = 1024


def build(workdir: Path, names: list[str]) -> dict[str, Path]:
    from moechat.export.int8 import quantize
    from moechat.export.int8.quantize import QuantizeOptions, quantize_decoder
    from moechat.export.onnx_graph import export_decoder
    from moechat.models.config import preset
    from moechat.models.modeling import random_model

    workdir.mkdir(parents=True, exist_ok=True)
    paths = {}
    model = None
    for name in names:
        lowering, q = VARIANTS[name]
        fp32 = workdir / f"fp32-{lowering}.onnx"
        if not fp32.exists():
            if model is None:
                model = random_model(preset("minimind2-moe"), seed=0)
            t = time.perf_counter()
            export_decoder(model, fp32, lowering)
            print(f"exported {fp32.name} in {time.perf_counter() - t:.0f}s", file=sys.stderr)
        path = fp32
        if q is not None:
            path = workdir / f"{name}.onnx"
            if not path.exists():
                t = time.perf_counter()
                overrides = q[2] if len(q) > 2 else {}  # module constants for this variant
                saved = {k: getattr(quantize, k) for k in overrides}
                vars(quantize).update(overrides)
                try:
                    options = QuantizeOptions(moe=q[0], dense=q[1], **(q[3] if len(q) > 3 else {}))
                    quantize_decoder(fp32, path, options)
                finally:
                    vars(quantize).update(saved)
                print(f"quantised {path.name} in {time.perf_counter() - t:.0f}s", file=sys.stderr)
        paths[name] = path
    return paths


def graph_size(path: Path) -> int:
    data = path.with_name(path.name + ".data")
    return path.stat().st_size + (data.stat().st_size if data.exists() else 0)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--workdir", default="/tmp/moechat-int8-bench")
    parser.add_argument("--variants", default=",".join(VARIANTS))
    parser.add_argument("--repeats", type=int, default=5, help="rounds over all variants")
    parser.add_argument("--decode-steps", type=int, default=16, help="decode steps per round")
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--json", help="also write the results here")
    args = parser.parse_args(argv)
    names = [n for n in args.variants.split(",") if n]
    unknown = set(names) - set(VARIANTS)
    if unknown:
        parser.error(f"unknown variants {sorted(unknown)} (known: {', '.join(VARIANTS)})")

    import onnxruntime

    from moechat.models.config import preset
    from moechat.runtime.decoder import Decoder
    from moechat.runtime.providers import create_session

    cfg = preset("minimind2-moe")
    paths = build(Path(args.workdir), names)
    rng = np.random.default_rng(0)
    prompt = rng.integers(0, cfg.vocab_size, size=PREFILL).tolist()
    context = rng.integers(0, cfg.vocab_size, size=CONTEXT).tolist()
    decoders = {}
    for name in names:
        session = create_session(paths[name], "CPUExecutionProvider", args.threads)
        decoders[name] = Decoder(
            session, cfg.num_hidden_layers, cfg.num_key_value_heads, cfg.head_dim,
            max_context=MAX_CONTEXT, static_cache=True,
        )  # fmt: skip
        decoders[name].forward(prompt[:8])  # warm-up
    decode: dict[str, list[float]] = {n: [] for n in names}
    prefill: dict[str, list[float]] = {n: [] for n in names}
    for _ in range(args.repeats):
        for name in names:
            dec = decoders[name]
            dec.reset()
            t = time.perf_counter()
            dec.forward(prompt)
            prefill[name].append(time.perf_counter() - t)
            dec.reset()
            dec.forward(context)
            token = 1
            for _ in range(args.decode_steps):
                t = time.perf_counter()
                token = int(np.argmax(dec.forward([token])[-1]))
                decode[name].append(time.perf_counter() - t)
    results = {}
    for name in names:
        d_ms = statistics.median(decode[name]) * 1000
        p_ms = statistics.median(prefill[name]) * 1000
        results[name] = {
            "decode_ms": round(d_ms, 2),
            "decode_tok_s": round(1000 / d_ms, 1),
            "prefill_ms": round(p_ms, 1),
            "prefill_tok_s": round(PREFILL * 1000 / p_ms, 1),
            "size_mb": round(graph_size(paths[name]) / 1e6, 1),
        }
    base = results.get("fp32-contrib")
    print(
        f"onnxruntime {onnxruntime.__version__}, {platform.machine()}, {os.cpu_count()} CPUs, "
        f"threads {args.threads or 'default'}; decode: 1 token onto {CONTEXT} cached, "
        f"prefill: {PREFILL} tokens"
    )
    print("| graph | decode ms | decode tok/s | prefill ms | prefill tok/s | size MB |")
    print("|---|---|---|---|---|---|")
    for name, r in results.items():
        speed = ""
        if base and name != "fp32-contrib":
            speed = (
                f" ({base['decode_ms'] / r['decode_ms']:.2f}x / "
                f"{base['prefill_ms'] / r['prefill_ms']:.2f}x)"
            )
        print(
            f"| {name}{speed} | {r['decode_ms']} | {r['decode_tok_s']} | {r['prefill_ms']} | "
            f"{r['prefill_tok_s']} | {r['size_mb']} |"
        )
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
