"""Export memory at scale (issue 17). Not a test.

    python benchmarks/export_scale.py [--layers 2 4] [--workdir DIR] [--json]
                                      [--whole-model] [--shape qwen1.5-moe|deepseek-v2-lite|small]

For each layer count: writes a random bf16 checkpoint as the Hub ships one
(safetensors shards of at most 2 GB + model.safetensors.index.json, config.json from
transformers' Qwen2MoeConfig at Qwen1.5-MoE-A2.7B's layer shape: hidden 2048, 60
experts of 1408, a shared expert of 5632 with its sigmoid gate, 16 heads, q/k/v bias,
vocabulary 151936, untied lm_head; or ``--shape deepseek-v2-lite``: DeepseekV2Config at
DeepSeek-V2-Lite's, multi-head latent attention with YaRN, 64 experts of 1408 top-6, two
shared, the first layer dense, vocabulary 102400), exports it with ``moechat export --int8`` in a
child process under ``/usr/bin/time -v`` (peak RSS, wall time), then runs
``moechat run`` on the package the same way. Prints, per layer count: checkpoint and
package sizes, export peak RSS and time, run peak RSS, and the targets:

- export peak RSS <= 0.4 x checkpoint + 1 GiB;
- run peak RSS <= 1.15 x package + 0.5 GiB;
- export time linear in the number of layers.

``--whole-model`` exports with ``--no-stream`` instead (the path that loads the model:
use ``--shape small`` unless the machine has the memory). Checkpoints and packages are
deleted afterwards unless ``--keep``.
"""

from __future__ import annotations

import argparse
import json
import re
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

from moechat.export.int8.fidelity import heldout_text

ROOT = Path(__file__).resolve().parents[1]
SHARD_BYTES = 2 * 10**9
GIB = 1 << 30

# Qwen/Qwen1.5-MoE-A2.7B's config.json, but the number of layers
QWEN = dict(
    vocab_size=151936, hidden_size=2048, intermediate_size=5632, num_attention_heads=16,
    num_key_value_heads=16, num_experts=60, num_experts_per_tok=4,
    moe_intermediate_size=1408, shared_expert_intermediate_size=5632,
    max_position_embeddings=8192, rope_theta=1000000.0, rms_norm_eps=1e-6,
    tie_word_embeddings=False, norm_topk_prob=False, decoder_sparse_step=1,
)  # fmt: skip
# deepseek-ai/DeepSeek-V2-Lite's config.json, but the number of layers (the first dense)
V2_LITE = dict(
    vocab_size=102400, hidden_size=2048, intermediate_size=10944, num_attention_heads=16,
    num_key_value_heads=16, n_routed_experts=64, n_shared_experts=2, num_experts_per_tok=6,
    moe_intermediate_size=1408, first_k_dense_replace=1, moe_layer_freq=1, kv_lora_rank=512,
    q_lora_rank=None, qk_nope_head_dim=128, qk_rope_head_dim=64, v_head_dim=128,
    n_group=1, topk_group=1, topk_method="greedy", norm_topk_prob=False,
    routed_scaling_factor=1.0, scoring_func="softmax", max_position_embeddings=163840,
    rope_theta=10000.0, rms_norm_eps=1e-6, tie_word_embeddings=False,
    rope_scaling={"type": "yarn", "factor": 40, "mscale": 0.707, "mscale_all_dim": 0.707,
                  "original_max_position_embeddings": 4096, "beta_fast": 32, "beta_slow": 1},
)  # fmt: skip
SHAPES = {
    "qwen1.5-moe": QWEN,
    "deepseek-v2-lite": V2_LITE,
    # the same structure, small enough for the whole-model path on a shared machine
    "small": {
        **QWEN, "vocab_size": 32000, "hidden_size": 1024, "intermediate_size": 2816,
        "moe_intermediate_size": 704, "shared_expert_intermediate_size": 2816,
    },
}  # fmt: skip


def hub_tensors(cfg) -> list[tuple[str, tuple[int, ...]]]:
    """The checkpoint keys and shapes as the Hub ships them (per-expert weights)."""
    if cfg.model_type == "deepseek_v2":
        return deepseek_v2_tensors(cfg)
    return qwen2_moe_tensors(cfg)


def deepseek_v2_tensors(cfg) -> list[tuple[str, tuple[int, ...]]]:
    h, v, e, heads = cfg.hidden_size, cfg.vocab_size, cfg.n_routed_experts, cfg.num_attention_heads
    lora, nope, rope = cfg.kv_lora_rank, cfg.qk_nope_head_dim, cfg.qk_rope_head_dim
    i, s = cfg.moe_intermediate_size, cfg.moe_intermediate_size * cfg.n_shared_experts
    mlp = lambda p, width: [  # noqa: E731
        (p + "gate_proj.weight", (width, h)), (p + "up_proj.weight", (width, h)),
        (p + "down_proj.weight", (h, width)),
    ]  # fmt: skip
    out = [("model.embed_tokens.weight", (v, h))]
    for n in range(cfg.num_hidden_layers):
        p = f"model.layers.{n}."
        out += [(p + "input_layernorm.weight", (h,)), (p + "post_attention_layernorm.weight", (h,))]
        out += [
            (p + "self_attn.q_proj.weight", (heads * (nope + rope), h)),
            (p + "self_attn.kv_a_proj_with_mqa.weight", (lora + rope, h)),
            (p + "self_attn.kv_a_layernorm.weight", (lora,)),
            (p + "self_attn.kv_b_proj.weight", (heads * (nope + cfg.v_head_dim), lora)),
            (p + "self_attn.o_proj.weight", (h, heads * cfg.v_head_dim)),
        ]
        if n < cfg.first_k_dense_replace:
            out += mlp(p + "mlp.", cfg.intermediate_size)
            continue
        out.append((p + "mlp.gate.weight", (e, h)))
        for x in range(e):
            out += mlp(p + f"mlp.experts.{x}.", i)
        out += mlp(p + "mlp.shared_experts.", s)
    return out + [("model.norm.weight", (h,)), ("lm_head.weight", (v, h))]


def qwen2_moe_tensors(cfg) -> list[tuple[str, tuple[int, ...]]]:
    h, v, e = cfg.hidden_size, cfg.vocab_size, cfg.num_experts
    i, s = cfg.moe_intermediate_size, cfg.shared_expert_intermediate_size
    out = [("model.embed_tokens.weight", (v, h))]
    for n in range(cfg.num_hidden_layers):
        p = f"model.layers.{n}."
        out += [(p + "input_layernorm.weight", (h,)), (p + "post_attention_layernorm.weight", (h,))]
        for proj in ("q", "k", "v"):
            out += [
                (p + f"self_attn.{proj}_proj.weight", (h, h)),
                (p + f"self_attn.{proj}_proj.bias", (h,)),
            ]
        out += [(p + "self_attn.o_proj.weight", (h, h)), (p + "mlp.gate.weight", (e, h))]
        for x in range(e):
            q = p + f"mlp.experts.{x}."
            out += [
                (q + "gate_proj.weight", (i, h)),
                (q + "up_proj.weight", (i, h)),
                (q + "down_proj.weight", (h, i)),
            ]
        q = p + "mlp.shared_expert."
        out += [
            (q + "gate_proj.weight", (s, h)),
            (q + "up_proj.weight", (s, h)),
            (q + "down_proj.weight", (h, s)),
        ]
        out.append((p + "mlp.shared_expert_gate.weight", (1, h)))
    return out + [("model.norm.weight", (h,)), ("lm_head.weight", (v, h))]


def write_checkpoint(folder: Path, shape: str, layers: int) -> int:
    """Random bf16 weights of realistic scale, sharded; returns the weight bytes."""
    import transformers
    from safetensors.torch import save_file

    sys.path.insert(0, str(ROOT / "tests"))
    from model_factory import write_tokenizer_files

    folder.mkdir(parents=True)
    config_class = (
        transformers.DeepseekV2Config
        if shape == "deepseek-v2-lite"
        else (transformers.Qwen2MoeConfig)
    )
    cfg = config_class(num_hidden_layers=layers, **SHAPES[shape])
    cfg.architectures = [config_class.__name__.replace("Config", "ForCausalLM")]  # as saved
    (folder / "config.json").write_text(cfg.to_json_string())
    gen = torch.Generator().manual_seed(0)
    shard: dict[str, torch.Tensor] = {}
    files: list[list[str]] = []
    total = 0

    def flush() -> None:  # one shard in memory at a time
        save_file(shard, str(folder / f"shard-{len(files)}.safetensors"), metadata={"format": "pt"})
        files.append(list(shard))
        shard.clear()

    for name, dims in hub_tensors(cfg):
        if "norm" in name:
            t = 1.0 + 0.1 * torch.randn(dims, generator=gen)
        elif name.endswith("bias"):
            t = 0.1 * torch.randn(dims, generator=gen)
        else:
            t = torch.randn(dims, generator=gen) * (
                1.0 if "embed" in name else 0.5 / dims[-1] ** 0.5
            )
        if shard and 2 * (sum(x.numel() for x in shard.values()) + t.numel()) > SHARD_BYTES:
            flush()
        shard[name] = t.to(torch.bfloat16)
        total += 2 * t.numel()
    flush()
    weight_map = {}
    for n, names in enumerate(files):  # the Hub's names: model-00001-of-0000N.safetensors
        file = f"model-{n + 1:05d}-of-{len(files):05d}.safetensors"
        (folder / f"shard-{n}.safetensors").rename(folder / file)
        weight_map.update(dict.fromkeys(names, file))
    index = {"metadata": {"total_size": total}, "weight_map": weight_map}
    (folder / "model.safetensors.index.json").write_text(json.dumps(index, indent=2))
    write_tokenizer_files(folder, 400)  # a small real tokenizer: ids below the vocabulary
    return total


def to_gguf(folder: Path, out: Path, outtype: str) -> Path:
    """``folder`` converted by llama.cpp's own convert_hf_to_gguf.py (the tests' driver)."""
    import os

    sys.path.insert(0, str(ROOT / "tests"))
    from gguf_factory import convert_with_llamacpp, name_tokenizer_class
    from llamacpp_sdist import CACHE, LLAMA_CPP_PYTHON

    llama_cpp = Path(
        os.environ.get("MOECHAT_LLAMA_CPP") or CACHE / LLAMA_CPP_PYTHON.replace("==", "-")
    )
    if not (llama_cpp / "convert_hf_to_gguf.py").is_file():
        raise SystemExit(f"no convert_hf_to_gguf.py in {llama_cpp}: set MOECHAT_LLAMA_CPP")
    name_tokenizer_class(folder)
    convert_with_llamacpp(llama_cpp, [(folder, out, outtype)])
    return out


def measured(command: list[str]) -> tuple[float, int, str]:
    """(wall seconds, peak RSS bytes, output) of ``command`` under /usr/bin/time -v."""
    start = time.perf_counter()
    proc = subprocess.run(["/usr/bin/time", "-v", *command], capture_output=True, text=True)
    wall = time.perf_counter() - start
    if proc.returncode:
        raise SystemExit(f"{' '.join(command)} failed ({proc.returncode}):\n{proc.stderr[-3000:]}")
    peak = re.search(r"Maximum resident set size \(kbytes\): (\d+)", proc.stderr)
    assert peak is not None, proc.stderr[-2000:]
    return wall, int(peak[1]) * 1024, proc.stdout + proc.stderr


def folder_bytes(folder: Path) -> int:
    return sum(f.stat().st_size for f in folder.iterdir() if f.is_file())


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--layers", type=int, nargs="+", default=[2, 4])
    parser.add_argument("--shape", choices=sorted(SHAPES), default="qwen1.5-moe")
    parser.add_argument("--workdir", type=Path, default=None)
    parser.add_argument("--whole-model", action="store_true", help="export with --no-stream")
    parser.add_argument("--keep", action="store_true")
    parser.add_argument("--heldout-chars", type=int, default=0,
                        help="fidelity on the first N characters of the held-out text (0: all)")  # fmt: skip
    parser.add_argument("--level", choices=["int8", "int4", "int4-experts"], default="int8")
    parser.add_argument("--gguf", choices=["q8_0", "bf16"], default=None,
                        help="convert the checkpoint with llama.cpp's convert_hf_to_gguf.py "
                        "(MOECHAT_LLAMA_CPP, or the tests' cache) and export that file")  # fmt: skip
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()
    if args.workdir is not None:
        args.workdir.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix="moechat-export-scale-", dir=args.workdir))
    moechat = [sys.executable, "-m", "moechat"]
    rows = []
    try:
        for layers in args.layers:
            ckpt, pkg = work / f"ckpt{layers}", work / f"pkg{layers}"
            weights = write_checkpoint(ckpt, args.shape, layers)
            source = to_gguf(ckpt, work / f"ckpt{layers}.gguf", args.gguf) if args.gguf else ckpt
            stream = "--no-stream" if args.whole_model else "--stream"
            export = [*moechat, "export", str(source), str(pkg), f"--{args.level}", stream]
            if args.heldout_chars:  # a shorter fidelity text: fidelity is not what is timed
                heldout = work / "heldout.txt"
                heldout.write_text(heldout_text()[: args.heldout_chars], encoding="utf-8")
                export += ["--heldout", str(heldout)]
            wall, peak, log = measured(export)
            run_wall, run_peak, _ = measured(
                [
                    *moechat,
                    "run",
                    str(pkg),
                    "Hello",
                    "--raw",
                    "--max-new-tokens",
                    "8",
                    "--temperature",
                    "0",
                ]
            )
            size = folder_bytes(pkg)
            manifest = json.loads((pkg / "moechat.json").read_text())
            row = {
                "layers": layers, "checkpoint_bytes": weights, "package_bytes": size,
                "gguf_bytes": source.stat().st_size if args.gguf else None,
                "export_seconds": round(wall, 1), "export_peak_rss": peak,
                "export_target": int(0.4 * weights + GIB),
                "run_seconds": round(run_wall, 1), "run_peak_rss": run_peak,
                "run_target": int(1.15 * size + 0.5 * GIB),
                "parity_relative": manifest["parity"]["relative"],
                "fidelity": {k: manifest["fidelity"][k] for k in ("tokens", "top1_agreement", "mean_kl", "perplexity_ratio", "routing_agreement")},
                "steps": [line for line in log.splitlines() if line.startswith("[")],
            }  # fmt: skip
            rows.append(row)
            if not args.keep:
                shutil.rmtree(ckpt)
                if source != ckpt:
                    source.unlink()
                shutil.rmtree(pkg)
            if not args.json:
                print(_line(row), flush=True)
    finally:
        if not args.keep:
            shutil.rmtree(work, ignore_errors=True)
    if len(rows) > 1:
        a, b = rows[0], rows[-1]
        per_layer = (b["export_seconds"] - a["export_seconds"]) / (b["layers"] - a["layers"])
        fixed = a["export_seconds"] - per_layer * a["layers"]
        summary = f"export time ~ {fixed:.0f} s + {per_layer:.0f} s per layer"
        print(summary if not args.json else json.dumps({"rows": rows, "time_model": summary}))
    elif args.json:
        print(json.dumps({"rows": rows}))
    return 0


def _line(row: dict) -> str:
    ok = lambda got, limit: "ok" if got <= limit else "MISSED"  # noqa: E731
    return (
        f"{row['layers']} layers: checkpoint {row['checkpoint_bytes'] / GIB:.2f} GiB, "
        + (f"GGUF {row['gguf_bytes'] / GIB:.2f} GiB, " if row["gguf_bytes"] else "")
        + f"package {row['package_bytes'] / GIB:.2f} GiB; export {row['export_seconds']:.0f} s, "
        f"peak RSS {row['export_peak_rss'] / GIB:.2f} GiB (target {row['export_target'] / GIB:.2f}: "
        f"{ok(row['export_peak_rss'], row['export_target'])}); run peak RSS "
        f"{row['run_peak_rss'] / GIB:.2f} GiB (target {row['run_target'] / GIB:.2f}: "
        f"{ok(row['run_peak_rss'], row['run_target'])}); parity {row['parity_relative']:.2g}; "
        f"fidelity {row['fidelity']}"
    )


if __name__ == "__main__":
    raise SystemExit(main())
