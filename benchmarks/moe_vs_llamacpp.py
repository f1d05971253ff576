"""moechat vs llama.cpp on the same MoE weights, side by side, with the machine's bandwidth.

    MOECHAT_LLAMA_CPP=LLAMA_CPP_DIR python benchmarks/moe_vs_llamacpp.py [--work DIR] \\
        [--shapes qwen3_moe mixtral] [--levels int8 int4] [--threads 2] [--repeat 3]

For each shape: a random-weight model written by transformers' own classes
(``save_pretrained``; weights drawn at a realistic scale, tests/family_factory.py), the
moechat packages (``moechat export --int8`` / ``--int4``) and, through ``moechat bench
--compare --anchors llama.cpp[,llama.cpp-Q4_K_M]``, llama.cpp's converter + quantiser on
the same HF folder (Q8_0 for int8; Q4_0 and Q4_K_M for int4) timed interleaved with
moechat: prefill 256 prompt tokens, decode 128 greedy tokens, medians of ``--repeat``.
On a busy machine run it under ``MOECHAT_SPIN=0``: idle threads of both engines block
instead of spinning (llama.cpp's OpenMP threads spinning on an oversubscribed CPU make
it ~30x slower).

Shapes (random weights, vocab 6400 untied, 8 layers, hidden 1024, 16 heads / 4 KV heads
of 64):
- qwen3_moe: 64 experts of 256, top-8 (437M parameters, ~78M active per token);
- mixtral: 8 experts of 1408, top-2 (311M, ~97M active): active expert weights per
  layer near the Qwen3 shape's (8.7M vs 6.3M), so the two differ mostly in expert
  granularity; half of Mixtral's real 2816 ratio, to export in minutes on 2 cores.
``--layers`` fewer than 8 when the export does not fit in memory.

Memory bandwidth is measured in the same run. Decode only reads weights, so the limit is
the read bandwidth: the faster of numpy's max over a 512 MiB array (1 and N threads, each
on its part) and onnxruntime's 8-bit MatMulNBits at one token over 256 MiB of weights
(numpy alone reads slower than the kernels do; the copy bandwidth, bytes read + written,
is printed beside it). "% of limit" is decode tok/s x the bytes one token reads /
the read bandwidth. The bytes come from the files each engine runs: every weight of
the package (ONNX initializers) or the GGUF, but the token embedding (one row is
read), the rotary caches (one row) and the routed experts, of which top-k of n are read. Not a test; results go to docs/benchmarks.md. Needs torch,
transformers, llama-cpp-python and llama.cpp's converter (``MOECHAT_LLAMA_CPP``).
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
COMMON: dict[str, Any] = dict(
    vocab_size=6400, hidden_size=1024, num_hidden_layers=8, num_attention_heads=16,
    num_key_value_heads=4, head_dim=64, max_position_embeddings=4096,
    tie_word_embeddings=False, bos_token_id=0, eos_token_id=2, pad_token_id=0,
    rms_norm_eps=1e-6, rope_theta=1e6,
)  # fmt: skip
SHAPES: dict[str, tuple[str, str, dict[str, Any]]] = {
    "qwen3_moe": ("Qwen3MoeConfig", "Qwen3MoeForCausalLM", dict(
        num_experts=64, num_experts_per_tok=8, moe_intermediate_size=256,
        intermediate_size=3072, decoder_sparse_step=1, norm_topk_prob=True)),
    "mixtral": ("MixtralConfig", "MixtralForCausalLM", dict(
        num_local_experts=8, num_experts_per_tok=2, intermediate_size=1408)),
}  # fmt: skip
EXPORT_FLAGS = {"int8": ["--int8"], "int4": ["--int4"]}
HEADER = (
    "| shape | level | engine | prefill tok/s | decode tok/s | MB read per token |"
    " bandwidth-limit tok/s | % of limit | moechat speed-up decode / prefill |\n"
    "|---|---|---|---|---|---|---|---|---|"
)


def log(message: str) -> None:
    print(f"[moe_vs_llamacpp {time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)


def write_model(shape: str, folder: Path, layers: int) -> dict[str, int]:
    """The HF folder of ``shape`` (cached); its total and per-token active weights."""
    import torch
    import transformers

    config_cls, model_cls, extra = SHAPES[shape]
    config = getattr(transformers, config_cls)(**{**COMMON, **extra, "num_hidden_layers": layers})
    if not (folder / "config.json").is_file():
        sys.path.insert(0, str(ROOT / "tests"))
        from family_factory import randomize
        from gguf_factory import name_tokenizer_class

        from model_factory import write_tokenizer_files

        log(f"writing {shape} to {folder}")
        torch.manual_seed(0)
        model = getattr(transformers, model_cls)(config).eval()
        randomize(model, 0)
        model.save_pretrained(folder)
        write_tokenizer_files(folder, 400)  # the converter pads the vocabulary to 6400
        name_tokenizer_class(folder)
        del model
    return weight_counts(config, shape)


def weight_counts(config: Any, shape: str) -> dict[str, int]:
    h, layers, vocab = config.hidden_size, config.num_hidden_layers, config.vocab_size
    d, heads, kv = config.head_dim, config.num_attention_heads, config.num_key_value_heads
    attention = layers * (h * d * (2 * heads + 2 * kv))
    if shape == "qwen3_moe":
        n, k, inter = config.num_experts, config.num_experts_per_tok, config.moe_intermediate_size
    else:
        n, k, inter = config.num_local_experts, config.num_experts_per_tok, config.intermediate_size
    expert = 3 * h * inter
    routers = layers * n * h
    return {
        "total": attention + routers + layers * n * expert + 2 * vocab * h,
        # one token reads: attention, routers, k experts per layer, lm_head (embedding: a row)
        "active": attention + routers + layers * k * expert + vocab * h,
        "active_quantised": attention + layers * k * expert + vocab * h,
        "active_float": routers,
    }


def export(hf: Path, level: str, out: Path, expert_block: int | None = None) -> None:
    if (out / "moechat.json").is_file():
        return
    log(f"moechat export {hf.name} {level}")
    block = ["--expert-block", str(expert_block)] if expert_block else []
    cmd = [sys.executable, "-m", "moechat", "export", str(hf), str(out), *EXPORT_FLAGS[level],
           *block, "--force"]  # fmt: skip
    subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL)


def bench(package: Path, anchors: str, args: argparse.Namespace) -> dict[str, Any]:
    log(f"moechat bench {package.name} --compare --anchors {anchors}")
    cmd = [sys.executable, "-m", "moechat", "bench", str(package), "--compare", "--anchors",
           anchors, "--prompt-tokens", "256", "--new-tokens", "128", "--repeat",
           str(args.repeat), "--turns", "0", "--threads", str(args.threads), "--cache-dir",
           str(args.work / "cache"), "--json"]  # fmt: skip
    out = subprocess.run(cmd, check=True, capture_output=True, text=True)
    return json.loads(out.stdout)


def bandwidth(threads: int, mib: int = 512) -> dict[str, float]:
    """Memory bandwidth in GB/s, best of 10 (the least disturbed by other jobs), with 1
    and ``threads`` threads each on its part of a ``mib`` array (numpy releases the GIL):
    ``read_gbps_N``: the faster of ``np.max`` (vectorised, each byte read once; a sum is
    no measure: numpy's pairwise summation is compute-bound at ~3 GB/s here) and
    :func:`gemv_gbps` (numpy alone reads slower than onnxruntime's kernels do);
    ``copy_gbps_N``: copies into a second array (bytes read + bytes written)."""
    a = np.ones(mib * 2**20 // 8)
    b = np.zeros_like(a)  # both faulted in

    def best(target: Any, calls: list[tuple[Any, ...]]) -> float:
        fastest = float("inf")
        for _ in range(10):
            workers = [threading.Thread(target=target, args=c) for c in calls]
            start = time.perf_counter()
            for w in workers:
                w.start()
            for w in workers:
                w.join()
            fastest = min(fastest, time.perf_counter() - start)
        return fastest

    out = {}
    for n in sorted({1, threads}):
        parts = np.array_split(a, n)
        read = a.nbytes / best(np.max, [(p,) for p in parts]) / 1e9
        out[f"read_gbps_{n}"] = round(max(read, gemv_gbps(n, mib // 2)), 2)
        pairs = list(zip(parts, np.array_split(b, n), strict=True))
        copies = [(dst, src) for src, dst in pairs]
        out[f"copy_gbps_{n}"] = round(2 * a.nbytes / best(np.copyto, copies) / 1e9, 2)
    return out


def gemv_gbps(threads: int, mib: int) -> float:
    """GB/s of weights streamed by onnxruntime's 8-bit ``MatMulNBits`` at one token over
    ``mib`` of weights (block 32, moechat's int8 layout: far larger than any cache), best
    of 20 runs on ``threads`` threads."""
    import onnxruntime as ort
    from onnx import TensorProto, helper, numpy_helper

    k = 8192
    n = mib * 2**20 // k
    weights = np.random.default_rng(0).integers(0, 256, (n, k // 32, 32), dtype=np.uint8)
    scales = np.ones(n * k // 32, np.float32)
    node = helper.make_node(
        "MatMulNBits", ["x", "b", "s"], ["y"], domain="com.microsoft",
        K=k, N=n, bits=8, block_size=32, accuracy_level=4,
    )  # fmt: skip
    graph = helper.make_graph(
        [node], "gemv",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, k])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, n])],
        [numpy_helper.from_array(weights, "b"), numpy_helper.from_array(scales, "s")],
    )  # fmt: skip
    opsets = [helper.make_opsetid("", 20), helper.make_opsetid("com.microsoft", 1)]
    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    session = ort.InferenceSession(
        helper.make_model(graph, opset_imports=opsets).SerializeToString(), options,
        providers=["CPUExecutionProvider"],
    )  # fmt: skip
    x = {"x": np.ones((1, k), np.float32)}
    session.run(None, x)
    fastest = float("inf")
    for _ in range(20):
        start = time.perf_counter()
        session.run(None, x)
        fastest = min(fastest, time.perf_counter() - start)
    return (weights.nbytes + scales.nbytes) / fastest / 1e9


def routing(hf: Path) -> tuple[int, int]:
    """(top-k, experts) of the HF folder's config."""
    config = json.loads((hf / "config.json").read_text())
    n = config.get("num_experts") or config["num_local_experts"]
    return config["num_experts_per_tok"], n


def gguf_bytes_per_token(path: Path, k: int, n: int) -> float:
    """Bytes of a GGUF file one decode step reads: every tensor but the token embedding
    (one row), the routed experts' (``*_exps``) k of n."""
    from gguf import GGUFReader

    return sum(
        int(t.n_bytes) * (k / n if "_exps" in t.name else 1)
        for t in GGUFReader(path).tensors
        if not t.name.startswith("token_embd")
    )


def package_bytes_per_token(package: Path, k: int, n: int) -> float:
    """Bytes of a moechat package one decode step reads: every initializer but those of a
    Gather (the embedding table: one row) and GroupQueryAttention's rotary caches (one
    row); QMoE's expert weights, scales and biases k of n."""
    import onnx
    from onnx.helper import tensor_dtype_to_np_dtype

    graph = onnx.load(str(package / "model.onnx"), load_external_data=False).graph
    experts = {i for node in graph.node if node.op_type in ("QMoE", "MoE") for i in node.input[2:]}
    rows = {i for node in graph.node if node.op_type.startswith("Gather") for i in node.input[:1]}
    rows |= {
        i for node in graph.node if node.op_type == "GroupQueryAttention" for i in node.input[7:9]
    }
    total = 0.0
    for init in graph.initializer:
        if init.name in rows:
            continue
        size = int(np.prod(init.dims)) * np.dtype(tensor_dtype_to_np_dtype(init.data_type)).itemsize
        total += size * (k / n if init.name in experts else 1)
    return total


def rows(shape: str, level: str, r: dict[str, Any], bw: float, package: Path) -> list[str]:
    """Table rows of one bench --compare of ``package`` (in the work folder, beside its HF
    folder and ``moechat bench``'s cache of the anchors' GGUF files): moechat and the
    llama.cpp anchors."""
    hf = package.with_name(re.sub(r"-(int8|int4)(-b\d+)?$", "", package.name))
    k, n = routing(hf)
    out = []
    for name, c in r["compare"].items():
        if name != "moechat" and c.get("status") != "ok":
            out.append(f"| {shape} | {level} | {name} | {c.get('status')}: {c.get('reason')} |"
                       " | | | | |")  # fmt: skip
            continue
        if name == "moechat":
            fmt = f"moechat {level}"
            per_token = package_bytes_per_token(package, k, n)
        else:
            fmt = c["weights"].split()[0]
            gguf = next((package.parent / "cache").glob(f"{hf.name}-*/*.{fmt}.gguf"))
            per_token = gguf_bytes_per_token(gguf, k, n)
        decode = c["decode_tokens_per_s"]
        limit = bw * 1e9 / per_token
        speed = "1.00x / 1.00x" if name == "moechat" else (
            f"{c['moechat_decode_speedup']:.2f}x / {c['moechat_prefill_speedup']:.2f}x")  # fmt: skip
        build = "" if name == "moechat" else f", n_batch {c['n_batch']}"
        out.append(
            f"| {shape} | {level} | {fmt}{build} | {c['prefill_tokens_per_s']:.0f} | {decode:.1f} |"
            f" {per_token / 1e6:.1f} | {limit:.0f} | {100 * decode / limit:.0f}% | {speed} |"
        )
    return out


def package_name(shape: str, level: str, args: argparse.Namespace) -> str:
    block = f"-b{args.expert_block}" if args.expert_block else ""
    return f"{shape}-{args.layers}l-{level}{block}"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--work", type=Path, default=Path.home() / ".cache" / "moechat-bench-moe")
    parser.add_argument("--shapes", nargs="+", default=list(SHAPES), choices=list(SHAPES))
    parser.add_argument("--levels", nargs="+", default=["int8", "int4"], choices=["int8", "int4"])
    parser.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument(
        "--layers",
        type=int,
        default=8,
        help="decoder layers (default 8; fewer: less export memory)",
    )
    parser.add_argument("--expert-block", type=int, choices=[16, 32, 64, 128], default=None,
                        help="moechat's QMoE block (packages named ...-bN; default: export's)")  # fmt: skip
    parser.add_argument("--prepare-only", action="store_true", help="write and export only")
    parser.add_argument(
        "--table", action="store_true",
        help="only the table again, from --work's results*.json, with the bandwidth measured now",
    )  # fmt: skip
    args = parser.parse_args(argv)
    if not os.environ.get("MOECHAT_LLAMA_CPP"):
        parser.error("set MOECHAT_LLAMA_CPP to llama.cpp's converter folder")
    args.work.mkdir(parents=True, exist_ok=True)
    if args.table:
        return print_table(args)
    plan = []
    for shape in args.shapes:
        hf = args.work / f"{shape}-{args.layers}l"
        counts = write_model(shape, hf, args.layers)
        for level in args.levels:
            export(hf, level, args.work / package_name(shape, level, args), args.expert_block)
            plan.append((shape, level, counts))
    if args.prepare_only:
        return 0
    bw = bandwidth(args.threads)
    log(f"bandwidth {bw}")
    table = [HEADER]
    results = {}
    for shape, level, counts in plan:
        anchors = "llama.cpp" + (",llama.cpp-Q4_K_M" if level == "int4" else "")
        r = bench(args.work / package_name(shape, level, args), anchors, args)
        results[package_name(shape, level, args)] = {"counts": counts, "compare": r["compare"]}
        table += rows(
            shape,
            level,
            r,
            bw[f"read_gbps_{args.threads}"],
            args.work / package_name(shape, level, args),
        )
        print("\n".join(table[-3:]), flush=True)  # (a row per engine)
    load = os.getloadavg()
    spin = os.environ.get("MOECHAT_SPIN", "1")
    print(f"\nbandwidth (GB/s; read: the limit; copy: read + write): {bw}; load average {load[0]:.2f} {load[1]:.2f}"
          f" {load[2]:.2f}; threads {args.threads}; MOECHAT_SPIN={spin}\n")  # fmt: skip
    print("\n".join(table))
    block = [f"b{args.expert_block}"] if args.expert_block else []
    name = "-".join(["results", *args.shapes, *args.levels, f"{args.layers}l", *block]) + ".json"
    (args.work / name).write_text(json.dumps({"bandwidth": bw, **results}, indent=1))
    return 0


def print_table(args: argparse.Namespace) -> int:
    bw = bandwidth(args.threads)
    table = [HEADER]
    for path in sorted(args.work.glob("results*.json")):
        for key, r in json.loads(path.read_text()).items():
            if key != "bandwidth":
                shape, _, level = re.sub(r"-b\d+$", "", key).rpartition("-")
                table += rows(shape, level, r, bw[f"read_gbps_{args.threads}"], args.work / key)
    load = os.getloadavg()
    print(f"bandwidth (GB/s; read: the limit; copy: read + write): {bw}; load average {load[0]:.2f} "
          f"{load[1]:.2f} {load[2]:.2f}\n")  # fmt: skip
    print("\n".join(table))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
