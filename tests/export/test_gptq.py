"""GPTQ for 4-bit MatMulNBits: lower output error than round-to-nearest on inputs with
outlier channels, and the packing is the kernel's layout."""

from __future__ import annotations

import numpy as np
import onnxruntime as ort
from onnx import TensorProto, helper, numpy_helper

from moechat.export.int8.gptq import block_scales, pack_nbits, quantize_gptq
from moechat.export.int8.quantize import more_bits_layers

BLOCK = 32


def _dequant(q: np.ndarray, scale: np.ndarray) -> np.ndarray:
    n, k = q.shape
    return (q.reshape(n, k // BLOCK, BLOCK) * scale[..., None]).reshape(n, k)


def _outlier_inputs(rng: np.random.Generator, k: int, *tokens: int) -> list[np.ndarray]:
    """Correlated activations (a low-rank mix plus noise) with a few large channels, the
    shape of a trained model's norm outputs; one array per ``tokens`` count, one mix."""
    mix, big = rng.normal(size=(16, k)), rng.choice(k, 4, replace=False)
    out = []
    for t in tokens:
        x = rng.normal(size=(t, 16)) @ mix + 0.3 * rng.normal(size=(t, k))
        x[:, big] *= 20.0
        out.append(x.astype(np.float32))
    return out


def _rtn(w: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Round-to-nearest with the same block scales (what GPTQ must beat)."""
    n, k = w.shape
    blocks = w.reshape(n, k // BLOCK, BLOCK)
    scale = np.stack([block_scales(blocks[:, b]) for b in range(k // BLOCK)], axis=1)
    return np.clip(np.rint(blocks / scale[..., None]), -8, 7).reshape(n, k), scale


def test_gptq_has_lower_output_error_than_round_to_nearest():
    rng = np.random.default_rng(0)
    k, n = 256, 96
    calib, held_out = _outlier_inputs(rng, k, 2048, 512)
    w = (rng.normal(size=(n, k)) * 0.05).astype(np.float32)
    q, scale = quantize_gptq(w, calib.T.astype(np.float64) @ calib / len(calib), BLOCK)
    assert q.dtype == np.int8 and q.min() >= -8 and q.max() <= 7
    ref = held_out @ w.T

    def error(q: np.ndarray, scale: np.ndarray) -> float:
        return float(np.linalg.norm(held_out @ _dequant(q, scale).T - ref))

    rtn = error(*_rtn(w))
    assert error(q, scale) < 0.7 * rtn
    # with no input statistics (identity H) GPTQ is round-to-nearest: the gain is H's
    q_id, s_id = quantize_gptq(w, np.eye(k), BLOCK, damp=0.0)
    assert np.array_equal(q_id, _rtn(w)[0])


def test_pack_nbits_is_the_matmulnbits_layout():
    rng = np.random.default_rng(1)
    k, n = 64, 24
    w = rng.normal(size=(n, k)).astype(np.float32)
    x = rng.normal(size=(3, k)).astype(np.float32)
    q, scale = quantize_gptq(w, np.eye(k), BLOCK)
    node = helper.make_node(
        "MatMulNBits", ["x", "b", "s"], ["y"], domain="com.microsoft",
        K=k, N=n, bits=4, block_size=BLOCK,
    )  # fmt: skip
    graph = helper.make_graph(
        [node], "nbits",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [3, k])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [3, n])],
        [numpy_helper.from_array(pack_nbits(q, BLOCK), "b"), numpy_helper.from_array(scale, "s")],
    )  # fmt: skip
    model = helper.make_model(
        graph, opset_imports=[helper.make_opsetid("", 20), helper.make_opsetid("com.microsoft", 1)]
    )
    session = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    (y,) = session.run(None, {"x": x})
    np.testing.assert_allclose(y, x @ _dequant(q, scale).T, rtol=1e-4, atol=1e-4)


def test_more_bits_layers_are_llama_cpp_q4_k_m_choice():
    # the layers whose ffn_down llama.cpp 0.3.36's Q4_K_M wrote as q6_K for SmolLM2 (30)
    assert more_bits_layers(30) == [0, 1, 2, 5, 8, 11, 14, 17, 20, 23, 26, 27, 28, 29]
    assert more_bits_layers(8) == [0, 3, 6, 7]
