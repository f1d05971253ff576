"""GPTQ for 4-bit QMoE experts: each expert's Hessians come from the tokens routed to it,
its down projection's from the SwiGLU the MoE kernel computes, and the result beats
round-to-nearest on held-out routed tokens."""

from __future__ import annotations

import json

import numpy as np
import onnx
import onnxruntime as ort
from onnx import TensorProto, helper, numpy_helper

from moechat.export.int8.gptq_experts import quantize_experts, routed_rows, swiglu
from moechat.export.int8.quantize import _stored_experts, quantize_rows

from model_factory import TINY_MOE, export_tiny_package, make_hf_folder

BLOCK = 32


def test_routed_rows_are_each_tokens_top_k():
    logits = np.array([[0.1, 3.0, 2.0, -1.0], [5.0, 0.0, -2.0, 4.0]], np.float32)
    assert routed_rows(logits, 2).tolist() == [
        [False, True, True, False],
        [True, False, False, True],
    ]


def test_swiglu_is_the_moe_kernels_activation():
    # one expert, chosen for every token at weight 1: the MoE op's output is fc2(swiglu)
    rng = np.random.default_rng(0)
    hidden, inter, tokens = 32, 16, 5
    fc1 = rng.normal(size=(1, 2 * inter, hidden)).astype(np.float32)
    fc2 = rng.normal(size=(1, hidden, inter)).astype(np.float32)
    x = rng.normal(size=(tokens, hidden)).astype(np.float32)
    node = helper.make_node(
        "MoE", ["x", "r", "fc1", "", "fc2"], ["y"], domain="com.microsoft",
        activation_type="swiglu", k=1, normalize_routing_weights=1, swiglu_fusion=1,
    )  # fmt: skip
    value = helper.make_tensor_value_info
    graph = helper.make_graph(
        [node], "moe",
        [value("x", TensorProto.FLOAT, [tokens, hidden]), value("r", TensorProto.FLOAT, [tokens, 1])],
        [value("y", TensorProto.FLOAT, [tokens, hidden])],
        [numpy_helper.from_array(fc1, "fc1"), numpy_helper.from_array(fc2, "fc2")],
    )  # fmt: skip
    opsets = [helper.make_opsetid("", 17), helper.make_opsetid("com.microsoft", 1)]
    session = ort.InferenceSession(
        helper.make_model(graph, opset_imports=opsets).SerializeToString(),
        providers=["CPUExecutionProvider"],
    )
    y = session.run(None, {"x": x, "r": np.zeros((tokens, 1), np.float32)})[0]
    ref = swiglu(x, fc1[0]) @ fc2[0].T
    assert np.abs(y - ref).max() < 1e-4 * np.abs(ref).max()


def _dequant(q: np.ndarray, scale: np.ndarray) -> np.ndarray:
    n, k = q.shape
    return (q.reshape(n, k // BLOCK, BLOCK) * scale[..., None]).reshape(n, k)


def test_gptq_experts_beat_round_to_nearest_on_held_out_routed_tokens():
    rng = np.random.default_rng(1)
    experts, hidden, inter, k = 4, 128, 64, 2
    mix, big = rng.normal(size=(8, hidden)), rng.choice(hidden, 3, replace=False)

    def tokens(n: int) -> np.ndarray:  # correlated, a few large channels (trained-like)
        x = rng.normal(size=(n, 8)) @ mix + 0.3 * rng.normal(size=(n, hidden))
        x[:, big] *= 20.0
        return x.astype(np.float32)

    calib, held_out = tokens(2048), tokens(512)
    router = (rng.normal(size=(experts, hidden)) * 0.1).astype(np.float32)
    fc1 = (rng.normal(size=(experts, 2 * inter, hidden)) * 0.05).astype(np.float32)
    fc2 = (rng.normal(size=(experts, hidden, inter)) * 0.05).astype(np.float32)
    logits = calib @ router.T
    logits[:, -1] -= 100.0  # the last expert is never chosen: it keeps round to nearest
    up, down = quantize_experts(calib, logits, k, fc1, fc2, BLOCK)
    assert up[-1] is None and down[-1] is None
    chosen = routed_rows(held_out @ router.T, k)
    for e in range(experts - 1):
        u, d = up[e], down[e]
        assert u is not None and d is not None
        xe = held_out[chosen[:, e]]
        ref = swiglu(xe, fc1[e]) @ fc2[e].T
        rtn = (_dequant(*quantize_rows(fc1[e], BLOCK, 4)), _dequant(*quantize_rows(fc2[e], BLOCK, 4)))  # fmt: skip
        errors = [
            float(np.linalg.norm(swiglu(xe, w1) @ w2.T - ref))
            for w1, w2 in (rtn, (_dequant(*u), _dequant(*d)))
        ]
        assert errors[1] < 0.8 * errors[0]


def test_stored_experts_take_the_chosen_values_else_round_to_nearest():
    rng = np.random.default_rng(2)
    w = rng.normal(size=(2, 8, 64)).astype(np.float32)
    mine = (np.full((8, 64), 3, np.int8), np.full((8, 2), 0.5, np.float32))
    q, scale = _stored_experts(numpy_helper.from_array(w, "w"), BLOCK, [None, mine])
    rtn_q, rtn_scale = quantize_rows(w[0], BLOCK, 4)
    assert np.array_equal(scale[0], rtn_scale) and np.array_equal(scale[1], mine[1])
    assert q.shape == (2, 8, 32) and np.all(q[1] == 0xBB)  # 3 + 8 in both nibbles
    assert np.array_equal(q[0] & 0x0F, (rtn_q[:, 0::2] + 8).astype(np.uint8))


def _qmoe_weights(pkg) -> dict[str, np.ndarray]:
    graph = onnx.load(str(pkg / "model.onnx")).graph
    names = {name for n in graph.node if n.op_type == "QMoE" for name in n.input[2:]}
    return {i.name: numpy_helper.to_array(i) for i in graph.initializer if i.name in names}


def test_int4_export_takes_the_experts_values_from_gptq(tmp_path, monkeypatch):
    import moechat.export.int8.gptq_experts as gptq_experts

    source = make_hf_folder(tmp_path / "ckpt", TINY_MOE, seed=4)
    pkg = export_tiny_package(source, tmp_path / "gptq", "--int4-experts")
    monkeypatch.setattr(gptq_experts, "MIN_TOKENS", 10**9)  # every expert rounds to nearest
    rtn = export_tiny_package(source, tmp_path / "rtn", "--int4-experts")

    def routed(p) -> str:
        return json.loads((p / "moechat.json").read_text())["graph"]["quantization"][
            "routed_experts"
        ]

    experts = 2 * TINY_MOE.num_hidden_layers * TINY_MOE.n_routed_experts  # fc1 and fc2 each
    assert routed(pkg).endswith(f"; {experts} of {experts} expert weights by GPTQ (1024 calibration tokens)")  # fmt: skip
    assert routed(rtn).endswith(f"; 0 of {experts} expert weights by GPTQ (1024 calibration tokens)")  # fmt: skip
    mine, nearest = _qmoe_weights(pkg), _qmoe_weights(rtn)
    assert mine.keys() == nearest.keys() and mine
    assert all(mine[n].shape == nearest[n].shape for n in mine)
    assert any(not np.array_equal(mine[n], nearest[n]) for n in mine)
