"""MLA attention forms (models/mla.py): weight absorption against decompression.

A DeepSeek-V2-Lite-shaped attention (hidden 2048, 16 heads, kv_lora_rank 512, rope 64,
nope 128, v 128, no q LoRA) in a 2-layer model with small experts, random weights,
exported once per form (contrib MoE, standard-op attention; the runtime's static
buffers, the new positions written in place). Decode = median ms per
step of 16 single-token steps after filling the cache to 512 and to 4096 tokens (in
512-token chunks, whose speed is the prefill column). KV bytes per token are per layer
(fp32): the latent + rope key against per-head keys and values.

    python benchmarks/mla_forms.py [--threads 2] [--layers 2]
    python benchmarks/mla_forms.py --compare-cache 3   # concatenating vs in-place cache
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np

from moechat.export.onnx_graph import export_decoder
from moechat.models.config import ModelConfig
from moechat.models.mla import MLAttention
from moechat.models.modeling import random_model
from moechat.runtime.decoder import Decoder
from moechat.runtime.providers import create_session

CHUNK, STEPS, CONTEXTS = 512, 16, (512, 4096)


def config(layers: int) -> ModelConfig:
    return ModelConfig(
        model_type="deepseek_v2", vocab_size=1000, hidden_size=2048, num_hidden_layers=layers,
        num_attention_heads=16, intermediate_size=256, tie_word_embeddings=False,
        use_moe=True, n_routed_experts=8, num_experts_per_tok=2, n_shared_experts=0,
        norm_topk_prob=False, kv_lora_rank=512, qk_nope_head_dim=128, qk_rope_head_dim=64,
        v_head_dim=128, rope_theta=10000.0, max_position_embeddings=8192,
    )  # fmt: skip


def measure(
    path: Path, cfg: ModelConfig, threads: int, static: bool = True, new_only: bool = True
) -> dict[int, tuple[float, float]]:
    session = create_session(path, "CPUExecutionProvider", threads)
    decoder = Decoder(
        session, cfg.num_hidden_layers, cfg.num_key_value_heads, cfg.head_dim,
        max_context=max(CONTEXTS) + STEPS, static_cache=static,
        value_head_dim=cfg.value_head_dim, present_new_only=new_only,
    )  # fmt: skip
    rng = np.random.default_rng(0)
    out = {}
    for context in CONTEXTS:
        decoder.reset()
        chunk_s = []
        while decoder.length < context:
            ids = rng.integers(3, cfg.vocab_size, CHUNK)
            t = time.perf_counter()
            decoder.forward(ids)
            chunk_s.append(time.perf_counter() - t)
        step_s = []
        for _ in range(STEPS):
            t = time.perf_counter()
            decoder.forward([int(rng.integers(3, cfg.vocab_size))])
            step_s.append(time.perf_counter() - t)
        out[context] = (statistics.median(step_s) * 1e3, CHUNK / chunk_s[-1])
    return out


def compare_cache(model, cfg: ModelConfig, threads: int, rounds: int, tmp: str) -> None:
    """Absorbed attention, graph concatenating the cache (present = all positions, growing
    arrays) against the shipped graph (present = new positions, static buffers written in
    place); rounds interleaved, medians."""
    paths = {}
    for variant in ("concat", "in-place"):
        if variant == "concat":  # the graph before kv_present "new": present = past + new
            MLAttention.new_only = property(lambda self: False, lambda self, value: None)
        try:
            paths[variant] = Path(tmp) / f"{variant}.onnx"
            export_decoder(model, paths[variant], "contrib", "ops")
        finally:
            if variant == "concat":
                del MLAttention.new_only
    times: dict[tuple[str, int], list[float]] = {}
    for _ in range(rounds):
        for variant, path in paths.items():
            results = measure(path, cfg, threads, static=variant == "in-place",
                              new_only=variant == "in-place")  # fmt: skip
            for context, (ms, _) in results.items():
                times.setdefault((variant, context), []).append(ms)
    for (variant, context), ms in times.items():
        median = statistics.median(ms)
        print(f"| {variant} | {context} | {median:.2f} ms ({1e3 / median:.1f} tok/s) |")


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--layers", type=int, default=2)
    parser.add_argument("--forms", default="absorb,decompress")
    parser.add_argument("--growing", action="store_true", help="numpy arrays, not static buffers")
    parser.add_argument("--compare-cache", type=int, metavar="ROUNDS", default=0)
    args = parser.parse_args()
    cfg = config(args.layers)
    model = random_model(cfg, max_positions=8192)
    per_head = cfg.num_attention_heads * (cfg.qk_nope_head_dim + cfg.qk_rope_head_dim)
    per_head += cfg.num_attention_heads * cfg.v_head_dim
    latent = cfg.kv_lora_rank + cfg.qk_rope_head_dim
    print(f"KV bytes per token and layer (fp32): latent {latent * 4}, per-head K/V {per_head * 4}"
          f" ({per_head / latent:.1f}x)")  # fmt: skip
    with tempfile.TemporaryDirectory() as tmp:
        if args.compare_cache:
            for layer in model.model.layers:
                layer.self_attn.form = "absorb"
            compare_cache(model, cfg, args.threads, args.compare_cache, tmp)
            return
        for form in args.forms.split(","):
            for layer in model.model.layers:
                layer.self_attn.form = form
            path = Path(tmp) / f"{form}.onnx"
            export_decoder(model, path, "contrib", "ops")
            results = measure(path, cfg, args.threads, static=not args.growing)
            for context, (ms, prefill) in results.items():
                print(
                    f"| {form} | {context} | {ms:.2f} ms ({1e3 / ms:.1f} tok/s) | "
                    f"{prefill:.0f} tok/s (chunk of {CHUNK} ending at {context}) |",
                    flush=True,
                )


if __name__ == "__main__":
    main()
