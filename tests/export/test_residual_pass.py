"""The residual pass: a second MatMulNBits over the activation rounding error."""

import numpy as np
import onnx
import onnxruntime as ort
from onnx import TensorProto, helper, numpy_helper
from test_int8 import _ids, _logits

from moechat.export.int8.quantize import QuantizeOptions, _quantize_matmuls, quantize_decoder
from moechat.export.int8.residual_pass import add_residual_passes
from moechat.export.onnx_graph import export_decoder
from moechat.models.modeling import random_model

from model_factory import TINY_DENSE


def _int8_matmul(k: int, n: int, block: int, rng) -> tuple[onnx.ModelProto, np.ndarray]:
    """A one-MatMul graph quantised to 8-bit MatMulNBits, and its dequantised weight."""
    w = rng.standard_normal((k, n)).astype(np.float32)
    graph = helper.make_graph(
        [helper.make_node("MatMul", ["x", "w"], ["y"], "mm")], "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [None, None, k])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)],
        [numpy_helper.from_array(w, "w")],
    )  # fmt: skip
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 21)])
    model = _quantize_matmuls(model, QuantizeOptions(block=block), [])
    node = next(n for n in model.graph.node if n.op_type == "MatMulNBits")
    inits = {t.name: numpy_helper.to_array(t) for t in model.graph.initializer}
    q = inits[node.input[1]].astype(np.float32) - 128  # [N, K/block, block], zero point 128
    w_deq = (q * inits[node.input[2]].reshape(n, -1, 1)).reshape(n, k).T
    return model, w_deq


def _run(model: onnx.ModelProto, x: np.ndarray) -> np.ndarray:
    return ort.InferenceSession(model.SerializeToString()).run(None, {"x": x})[0]


def test_residual_pass_removes_the_activation_rounding_error():
    rng = np.random.default_rng(0)
    k, n, block = 256, 48, 32
    model, w_deq = _int8_matmul(k, n, block, rng)
    # activations with a few large channels (what trained models have) and one all-zero block
    x = rng.standard_normal((1, 24, k)).astype(np.float32) * np.exp(2 * rng.standard_normal(k))
    x[..., :block] = 0
    x = x.astype(np.float32)
    exact = x @ w_deq  # int8 weights, float activations
    one_pass = _run(model, x)
    assert add_residual_passes(model) == 1
    two_pass = _run(model, x)
    assert np.isfinite(two_pass).all()
    err1, err2 = np.abs(one_pass - exact).max(), np.abs(two_pass - exact).max()
    assert err2 < err1 / 30, (err1, err2)
    # one kernel call over x and its rounding error stacked, on the same weights
    ops = [node.op_type for node in model.graph.node]
    assert ops.count("MatMulNBits") == 1 and ops[-1] == "ReduceSum"
    assert len(model.graph.initializer) == 2 + 6  # weight, scales + the pass's constants


def _float_activations(src, dst) -> None:
    """``src`` with every MatMulNBits but the lm_head replaced by a float MatMul on its
    dequantised weights: int8 weights, float activations (what the pass aims at)."""
    model = onnx.load(str(src), load_external_data=True)
    inits = {t.name: numpy_helper.to_array(t) for t in model.graph.initializer}
    for node in model.graph.node:
        if node.op_type != "MatMulNBits" or {"logits", "logits_int8"} & set(node.output):
            continue
        q = inits[node.input[1]].astype(np.float32) - 128
        n = q.shape[0]
        w = (q * inits[node.input[2]].reshape(n, -1, 1)).reshape(n, -1).T
        model.graph.initializer.append(numpy_helper.from_array(w, f"{node.name}_float"))
        node.CopyFrom(
            helper.make_node(
                "MatMul", [node.input[0], f"{node.name}_float"], node.output, node.name
            )
        )
    onnx.save_model(model, str(dst), save_as_external_data=True)


def test_residual_pass_on_an_exported_graph_leaves_only_the_weight_error(tmp_path):
    cfg = TINY_DENSE
    fp32 = tmp_path / "fp32.onnx"
    export_decoder(random_model(cfg, seed=1, max_positions=256), fp32, "contrib")
    calibration = _ids(cfg, 64, seed=7)
    plain = quantize_decoder(fp32, tmp_path / "a.onnx", QuantizeOptions(block=32), calibration)
    twice = QuantizeOptions(block=32, residual_pass=True)
    info = quantize_decoder(fp32, tmp_path / "b.onnx", twice, calibration)
    assert "second pass" in info["matmuls"] and "second pass" not in plain["matmuls"]
    graph = onnx.load(str(tmp_path / "b.onnx"), load_external_data=False).graph
    stacked = [n for n in graph.node if n.op_type == "MatMulNBits" and "residual" in n.input[0]]
    # per layer q/k/v, o_proj, gate/up, down; not the lm_head (its top logits are rescored)
    assert len(stacked) == 4 * cfg.num_hidden_layers
    _float_activations(tmp_path / "a.onnx", tmp_path / "ref.onnx")
    ids = _ids(cfg)
    ref = _logits(tmp_path / "ref.onnx", cfg, ids)
    # the best logits, which the lm_head rescoring recomputes in float in all three graphs
    top = np.argsort(-ref, axis=-1)[:, :8]

    def err(path) -> float:
        got = _logits(path, cfg, ids)
        return float(np.abs(np.take_along_axis(got - ref, top, axis=-1)).max())

    err_plain, err_twice = err(tmp_path / "a.onnx"), err(tmp_path / "b.onnx")
    assert err_twice < err_plain / 10, (err_plain, err_twice)


def test_residual_pass_needs_matmulnbits():
    import pytest

    with pytest.raises(ValueError, match="MatMulNBits"):
        QuantizeOptions(dense="dynamic", residual_pass=True)


def test_export_warning_suggests_the_residual_pass_only_where_it_applies(capsys):
    from moechat.export.cli import print_int8_summary

    def warning(matmuls: str, top1: float, size_ratio: float = 0.25) -> str:
        manifest = {
            "graph": {"quantization": {
                "fp32_package_bytes": 4e8, "int8_package_bytes": 1e8, "size_ratio": size_ratio,
                "matmuls": matmuls,
            }},
            "fidelity": {
                "tokens": 100, "top1_agreement": top1, "mean_kl": 0.004, "perplexity_ratio": 1.01,
                "routing_agreement": None, "thresholds": {"perplexity_ratio_max": 1.02, "top1_agreement_min": 0.97},
            },
        }  # fmt: skip
        print_int8_summary(manifest)
        return capsys.readouterr().err

    nbits = "MatMulNBits 8-bit, accuracy_level 4, block 32"
    assert "--int8-residual-pass" in warning(nbits, 0.96)
    assert "WARNING" in warning(
        f"{nbits}; 120 with a second pass over the activation rounding error", 0.96
    )
    assert "--int8-residual-pass" not in warning(f"{nbits}; 120 with a second pass", 0.96)
    assert "--int8-residual-pass" not in warning("MatMulInteger (quantize_dynamic)", 0.96)
    assert "--int8-residual-pass" not in warning(nbits, 0.98, size_ratio=0.31)  # size only
    assert warning(nbits, 0.98) == ""
