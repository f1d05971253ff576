"""What int8 activations cost 4-bit QMoE experts on trained weights (decision 0021).

    python benchmarks/qmoe_int8_activations.py SmolLM2-135M-Instruct.Q4_1.gguf \\
        [--layers 2 10 20 28] [--experts 8] [--tokens 512]

SmolLM2's FFN of each layer, split into ``--experts`` experts (its neurons in order), runs
as one 4-bit QMoE node (moechat's packing, block 32) with every expert chosen at weight
1, so its output is the whole FFN's; the inputs are the layer's real FFN inputs on
moechat's held-out text, taken from the PyTorch reference. Reports the FFN output's
relative squared error to fp32 at ``accuracy_level`` 0 (fp32 activations) and 4 (int8
activations, what moechat exports). Not a test.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]


def qmoe_session(fc1: np.ndarray, fc2: np.ndarray, level: int):
    import onnxruntime as ort
    from onnx import TensorProto, helper, numpy_helper

    from moechat.export.int8.quantize import pack_uint4, quantize_rows

    inits, inputs = [], ["x", "r"]
    for name, w in (("fc1", fc1), ("fc2", fc2)):
        q, scale = quantize_rows(w, 32, 4)
        inits += [numpy_helper.from_array(pack_uint4(q), f"{name}_q"),
                  numpy_helper.from_array(scale, f"{name}_s")]  # fmt: skip
        inputs += [f"{name}_q", f"{name}_s", ""]
    experts, hidden = fc1.shape[0], fc1.shape[2]
    node = helper.make_node(
        "QMoE", inputs[:-1], ["y"], domain="com.microsoft", activation_type="swiglu",
        k=experts, normalize_routing_weights=0, swiglu_fusion=1, expert_weight_bits=4,
        block_size=32, accuracy_level=level,
    )  # fmt: skip
    value = helper.make_tensor_value_info
    graph = helper.make_graph(
        [node], "ffn",
        [value("x", TensorProto.FLOAT, ["T", hidden]), value("r", TensorProto.FLOAT, ["T", experts])],
        [value("y", TensorProto.FLOAT, ["T", hidden])], inits,
    )  # fmt: skip
    opsets = [helper.make_opsetid("", 17), helper.make_opsetid("com.microsoft", 1)]
    model = helper.make_model(graph, opset_imports=opsets)
    return ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("gguf", type=Path)
    parser.add_argument("--layers", type=int, nargs="+", default=[2, 10, 20, 28])
    parser.add_argument("--experts", type=int, default=8)
    parser.add_argument("--tokens", type=int, default=512)
    args = parser.parse_args(argv)

    import torch
    from tokenizers import Tokenizer

    from moechat.models.loading import load_checkpoint

    ckpt = load_checkpoint(args.gguf)
    model = ckpt.model.eval()
    assert ckpt.tokenizer_dir is not None
    tokenizer = Tokenizer.from_file(str(ckpt.tokenizer_dir / "tokenizer.json"))
    text = (ROOT / "export" / "data" / "heldout.txt").read_text()
    ids = torch.tensor([tokenizer.encode(text).ids[: args.tokens]])
    ffn_inputs: dict[int, np.ndarray] = {}
    for i in args.layers:
        norm = model.model.layers[i].post_attention_layernorm
        norm.register_forward_hook(lambda m, a, out, i=i: ffn_inputs.__setitem__(i, out[0].numpy()))
    with torch.no_grad():
        model.step(ids, model.empty_cache())
    e = args.experts
    print(f"{args.gguf.name}: FFN as {e} 4-bit experts (block 32), {ids.shape[1]} held-out tokens")
    print("| layer | fp32 activations | int8 activations | ratio |")
    print("|---|---|---|---|")
    for i in args.layers:
        mlp = model.model.layers[i].mlp
        gate, up, down = (m.weight.detach().numpy() for m in (mlp.gate_proj, mlp.up_proj, mlp.down_proj))  # fmt: skip
        per = gate.shape[0] // e
        # QMoE's fused SwiGLU layout: gate and up rows interleaved per expert
        fc1 = np.stack([
            np.stack([gate[j * per:(j + 1) * per], up[j * per:(j + 1) * per]], 1).reshape(2 * per, -1)
            for j in range(e)
        ])  # fmt: skip
        fc2 = np.stack([down[:, j * per : (j + 1) * per] for j in range(e)])
        x = ffn_inputs[i]
        g = x @ gate.T
        ref = (g / (1 + np.exp(-g)) * (x @ up.T)) @ down.T
        errors = []
        for level in (0, 4):
            # equal router logits: each expert weighted 1/e by the softmax, so scale by e
            y = qmoe_session(fc1, fc2, level).run(None, {"x": x, "r": np.zeros((len(x), e), np.float32)})[0] * e  # fmt: skip
            errors.append(float(((y - ref) ** 2).sum() / (ref**2).sum()))
        print(f"| {i} | {errors[0]:.5f} | {errors[1]:.5f} | {errors[1] / errors[0]:.3f}x |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
