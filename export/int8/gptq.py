"""GPTQ for the 4-bit ``MatMulNBits`` weights (``moechat export --int4``).

Round-to-nearest gives each weight its nearest 4-bit level on its own. GPTQ (Frantar et
al., 2022) quantises a weight matrix one input channel at a time and spreads each
channel's rounding error over the channels not yet quantised, weighted by the inverse
of ``H = X^T X``, the second moment of the matmul's inputs on calibration text. That
minimises the error of the *outputs* ``x W`` on inputs like the calibration's rather
than of the weights, which matters where a few input channels carry most of the
activation energy.

Only the values and the scales change: the result is the same symmetric 4-bit
MatMulNBits (block along K, no zero points, ``accuracy_level`` 4) that round-to-nearest
produces, so decoding keeps onnxruntime's fast int4 kernel (the lesson of HQQ, whose
float zero points take a slow path: docs/decisions/0014).

The Hessians come from one pass of the calibration tokens through the (smoothed) fp32
graph; layers are not re-calibrated on the quantised graph's outputs (a simplification
of the paper's sequential pass).
"""

from __future__ import annotations

import tempfile
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import onnx
from onnx import helper, numpy_helper
from onnx.external_data_helper import load_external_data_for_model

from moechat.export.graph_rewrites import MSFT_DOMAIN, drop_unused_initializers, initializers
from moechat.export.int8.quantize import pack_uint4
from moechat.export.int8.smoothing import run_with_outputs
from moechat.export.onnx_graph import save_model

# added to H's diagonal, as a share of its mean: 30 times the paper's 0.01. The
# calibration text is ~1,000 tokens of one kind, and the damping keeps GPTQ from fitting
# it too closely: on SmolLM2 --int4 (activation order) the KL to fp32 is 0.132 at 0.1,
# 0.126 at 0.3 and 0.137 at 1.0 (docs/decisions/0014, "Damping", "Activation order")
DAMP = 0.3
LAZY = 128  # columns updated together (the paper's lazy batch)


def block_scales(w: np.ndarray) -> np.ndarray:
    """Symmetric 4-bit scales of the rows of ``w`` [N, block]: the largest magnitude maps
    to -8 (signed scale, as onnxruntime's and llama.cpp's Q4_0 round-to-nearest do)."""
    idx = np.abs(w).argmax(axis=1)
    extreme = w[np.arange(len(w)), idx]
    scale = extreme / -8.0
    return np.where(scale == 0, 1.0, scale).astype(np.float32)


def quantize_gptq(
    w: np.ndarray, hessian: np.ndarray, block: int, damp: float = DAMP
) -> tuple[np.ndarray, np.ndarray]:
    """GPTQ of ``w`` [N, K] (rows: outputs, columns: inputs) given ``hessian`` [K, K].

    Returns (q int8 [N, K] in [-8, 7], scale float32 [N, K/block]); ``w ~ q * scale``.
    Columns are quantised in activation order (largest ``H`` diagonal first: the inputs
    that carry the most energy are rounded while every other column can still absorb
    their error), with static groups: each block's scale is round-to-nearest's, taken
    from the original weights, since the order crosses blocks.
    """
    n, k = w.shape
    if k % block:
        raise ValueError(f"K={k} is not a multiple of the block {block}")
    w = w.astype(np.float32)  # float32 updates, as the paper's code; H inverted in float64
    h = hessian.astype(np.float64).copy()
    dead = np.diag(h) == 0  # inputs never active in calibration: any value will do
    h[dead, dead] = 1.0
    w[:, dead] = 0.0
    blocks = w.reshape(n, k // block, block)
    scale = np.stack([block_scales(blocks[:, b]) for b in range(k // block)], axis=1)
    order = np.argsort(-np.diag(h), kind="stable")
    w = w[:, order]
    h = h[np.ix_(order, order)]
    h[np.diag_indices(k)] += damp * np.mean(np.diag(h))
    # the upper Cholesky factor of H^-1 holds every update coefficient the loop needs
    hinv = np.linalg.cholesky(np.linalg.inv(h)).T.astype(np.float32)
    column_scale = scale[:, order // block]  # [N, K]: each ordered column's block scale
    q = np.zeros((n, k), np.int8)
    for i1 in range(0, k, LAZY):
        i2 = min(i1 + LAZY, k)
        w1 = w[:, i1:i2].copy()
        err1 = np.zeros_like(w1)
        for i in range(i2 - i1):
            col = i1 + i
            s = column_scale[:, col]
            qc = np.clip(np.rint(w1[:, i] / s), -8, 7)
            q[:, col] = qc
            err = (w1[:, i] - qc * s) / hinv[col, col]
            w1[:, i:] -= np.outer(err, hinv[col, col:i2])
            err1[:, i] = err
        w[:, i2:] -= err1 @ hinv[i1:i2, i2:]
    unordered = np.empty_like(q)
    unordered[:, order] = q
    return unordered, scale


def pack_nbits(q: np.ndarray, block: int) -> np.ndarray:
    """q [N, K] in [-8, 7] -> MatMulNBits' B, uint8 [N, K/block, block/2] (zero point 8,
    the even index in the low nibble: QMoE's 4-bit layout too)."""
    n, k = q.shape
    return pack_uint4(q.reshape(n, k // block, block))


def hessians(
    graph_path: Path, tensors: Sequence[str], token_ids: Sequence[int]
) -> dict[str, np.ndarray]:
    """``X^T X / n`` of each of ``tensors`` (the matmul inputs) over ``token_ids``."""
    sums: dict[str, np.ndarray] = {}
    count: dict[str, int] = {}
    for name, value in run_with_outputs(graph_path, tensors, token_ids):
        x = value.reshape(-1, value.shape[-1]).astype(np.float64)
        sums[name] = sums.get(name, 0) + x.T @ x
        count[name] = count.get(name, 0) + len(x)
    return {name: sums[name] / count[name] for name in sums}


def gptq_matmuls(
    model: onnx.ModelProto, token_ids: Sequence[int], block: int, exclude: Sequence[str]
) -> int:
    """Replace every MatMul with a constant 2-D weight (but ``exclude``) by a GPTQ'd
    4-bit MatMulNBits; return how many. ``model`` is calibrated as it is (smoothed)."""
    graph = model.graph
    inits = initializers(graph)
    targets = [
        n for n in graph.node
        if n.op_type == "MatMul" and n.name not in exclude and n.input[1] in inits
        and len(inits[n.input[1]].dims) == 2 and inits[n.input[1]].dims[0] % block == 0
    ]  # fmt: skip
    if not targets:
        return 0
    with tempfile.TemporaryDirectory(prefix="moechat-gptq-") as tmp:
        # saving moves the weights out of the proto into the data file (no second copy in
        # memory while onnxruntime holds one); they are read back afterwards
        save_model(model, Path(tmp) / "model.onnx")
        try:
            h = hessians(Path(tmp) / "model.onnx", sorted({n.input[0] for n in targets}), token_ids)
        finally:
            load_external_data_for_model(model, tmp)
        inits = initializers(graph)
    for node in targets:
        w = numpy_helper.to_array(inits[node.input[1]])  # [K, N]
        k, n = w.shape
        q, scale = quantize_gptq(w.T, h[node.input[0]], block)
        b_name, s_name = f"{node.input[1]}_gptq4", f"{node.input[1]}_gptq4_scales"
        graph.initializer.append(numpy_helper.from_array(pack_nbits(q, block), b_name))
        graph.initializer.append(numpy_helper.from_array(scale, s_name))
        new = helper.make_node(
            "MatMulNBits", [node.input[0], b_name, s_name], list(node.output), f"{node.name}_Q4",
            domain=MSFT_DOMAIN, K=k, N=n, bits=4, block_size=block, accuracy_level=4,
        )  # fmt: skip
        node.CopyFrom(new)
    drop_unused_initializers(graph)
    return len(targets)
