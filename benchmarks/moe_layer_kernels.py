"""One MoE layer alone in onnxruntime: time per call of each kernel moechat can lower to.

    python benchmarks/moe_layer_kernels.py [--shape qwen3_moe|mixtral] [--threads 2]
        [--rounds 3]

Kernels: ``com.microsoft.QMoE`` 8-bit at weight blocks 32 / 64 / 128 / per row, 4-bit at
block 32 with fp32 activations (``accuracy_level`` 0) and at blocks 32 / 64 / 128 with int8
activations (``accuracy_level`` 4, what moechat exports), and the fp32
``com.microsoft.MoE`` (swiglu, fused gate/up, normalised top-k),
each a one-node graph with random weights (quantised by moechat's own
``quantize_rows``), random router logits, at 1 token (decode) and 256 tokens (prefill).
Reports the median ms of single calls over ``--rounds`` rounds (kernels interleaved per
round; the median leaves out calls a busy machine preempted) and, at 1 token, the bytes of the k experts' weights read per call / time. Not a test.
"""

from __future__ import annotations

import argparse
import statistics
import time

import numpy as np

SHAPES = {"qwen3_moe": (1024, 256, 64, 8), "mixtral": (1024, 1408, 8, 2)}  # H, I, E, k


def graph(
    h: int, i: int, e: int, k: int, bits: int, block: int, level: int = 0, seed: int = 0
) -> bytes:
    from onnx import TensorProto, helper, numpy_helper

    from moechat.export.int8.quantize import pack_uint4, quantize_rows

    rng = np.random.default_rng(seed)
    fc1 = (rng.standard_normal((e, 2 * i, h)) * 0.5 / h**0.5).astype(np.float32)
    fc2 = (rng.standard_normal((e, h, i)) * 0.5 / i**0.5).astype(np.float32)
    attrs = dict(activation_type="swiglu", k=k, normalize_routing_weights=1, swiglu_fusion=1)
    inits, inputs = [], ["x", "r"]
    if bits == 32:
        inits = [numpy_helper.from_array(fc1, "fc1"), numpy_helper.from_array(fc2, "fc2")]
        node = helper.make_node("MoE", ["x", "r", "fc1", "", "fc2"], ["y"], "moe", None,
                                "com.microsoft", **attrs)  # fmt: skip
    else:
        for name, w in (("fc1", fc1), ("fc2", fc2)):
            q, scale = quantize_rows(w, block, bits)
            stored = (q.astype(np.int16) + 128).astype(np.uint8) if bits == 8 else pack_uint4(q)
            inits += [numpy_helper.from_array(stored, f"{name}_q"),
                      numpy_helper.from_array(scale, f"{name}_s")]  # fmt: skip
            inputs += [f"{name}_q", f"{name}_s", ""]
        attrs.update(expert_weight_bits=bits, **({"block_size": block} if block else {}))
        if level:
            attrs["accuracy_level"] = level
        node = helper.make_node("QMoE", inputs[:-1], ["y"], "qmoe", None, "com.microsoft", **attrs)
    value = helper.make_tensor_value_info
    g = helper.make_graph(
        [node], "layer",
        [value("x", TensorProto.FLOAT, ["T", h]), value("r", TensorProto.FLOAT, ["T", e])],
        [value("y", TensorProto.FLOAT, ["T", h])], inits,
    )  # fmt: skip
    opsets = [helper.make_opsetid("", 17), helper.make_opsetid("com.microsoft", 1)]
    return helper.make_model(g, opset_imports=opsets).SerializeToString()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shape", choices=list(SHAPES), default="qwen3_moe")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args(argv)

    import onnxruntime as ort

    h, i, e, k = SHAPES[args.shape]
    kernels = {"QMoE 8-bit block 32": (8, 32, 0), "QMoE 8-bit block 64": (8, 64, 0),
               "QMoE 8-bit block 128": (8, 128, 0), "QMoE 8-bit per row": (8, 0, 0),
               "QMoE 4-bit block 32": (4, 32, 0),
               "QMoE 4-bit block 32, accuracy_level 4": (4, 32, 4),
               "QMoE 4-bit block 64, accuracy_level 4": (4, 64, 4),
               "QMoE 4-bit block 128, accuracy_level 4": (4, 128, 4),
               "MoE fp32": (32, 0, 0)}  # fmt: skip
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = args.threads
    sessions = {
        name: ort.InferenceSession(
            graph(h, i, e, k, bits, block, level), opts, ["CPUExecutionProvider"]
        )
        for name, (bits, block, level) in kernels.items()
    }
    rng = np.random.default_rng(1)
    feeds = {t: {"x": rng.standard_normal((t, h)).astype(np.float32),
                 "r": rng.standard_normal((t, e)).astype(np.float32)} for t in (1, 256)}  # fmt: skip
    times: dict[tuple[str, int], list[float]] = {}
    for _ in range(args.rounds):
        for name, session in sessions.items():
            for t, feed in feeds.items():
                session.run(None, feed)
                for _ in range(50 if t == 1 else 2):
                    start = time.perf_counter()
                    session.run(None, feed)
                    times.setdefault((name, t), []).append(time.perf_counter() - start)
    print(f"{args.shape}: hidden {h}, {e} experts of {i}, top-{k}; {args.threads} threads, "
          f"onnxruntime {ort.__version__}")  # fmt: skip
    print("| kernel | 1 token ms | GB/s of the k experts' weights | 256 tokens ms | tok/s |")
    print("|---|---|---|---|---|")
    for name, (bits, block, _) in kernels.items():
        one = statistics.median(times[(name, 1)]) * 1000
        many = statistics.median(times[(name, 256)]) * 1000
        per_weight = 4 if bits == 32 else bits / 8 + 4 / (block or h)
        gbps = k * 3 * h * i * per_weight / one / 1e6
        print(f"| {name} | {one:.3f} | {gbps:.1f} | {many:.1f} | {256 / many * 1000:.0f} |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
