"""GPTQ for the routed experts' 4-bit QMoE weights (``moechat export --int4``).

The matmuls' GPTQ (gptq.py) needs one Hessian per weight: the second moment of its
inputs on calibration text. An expert sees only the tokens routed to it, so each expert
gets its own: for fc1 (gate and up), the MoE node's input rows whose top-k router logits
include the expert; for fc2 (down), those rows' SwiGLU activations through the expert's
fp32 fc1. The values and scales change, the layout does not: the QMoE node and its
kernel are those of round-to-nearest.

An expert that calibration routes fewer than ``MIN_TOKENS`` tokens to keeps
round-to-nearest: a Hessian of a handful of tokens describes those tokens, not the text.
The others are damped as gptq.py damps (``gptq.DAMP``, measured for the experts too:
docs/decisions/0014, "GPTQ experts").
"""

from __future__ import annotations

import tempfile
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import onnx
from onnx import numpy_helper
from onnx.external_data_helper import load_external_data_for_model

from moechat.export.graph_rewrites import MSFT_DOMAIN, attribute, initializers
from moechat.export.int8.gptq import quantize_gptq
from moechat.export.int8.quantize import qmoe_block_size
from moechat.export.int8.smoothing import run_with_outputs
from moechat.export.onnx_graph import save_model

MIN_TOKENS = 64  # calibration tokens an expert needs for GPTQ (else round to nearest)

ExpertQuant = tuple[np.ndarray, np.ndarray] | None  # (q int8 [N, K], scale [N, K/block])


def second_moment(x: np.ndarray) -> np.ndarray:
    x = x.astype(np.float64)
    return x.T @ x / len(x)


def swiglu(x: np.ndarray, fc1: np.ndarray) -> np.ndarray:
    """The MoE op's fused SwiGLU (``swiglu_fusion`` 1): fc1's rows interleave gate and up."""
    h = x @ fc1.T
    gate, up = h[:, 0::2], h[:, 1::2]
    return gate / (1.0 + np.exp(-gate)) * up


def routed_rows(router_logits: np.ndarray, k: int) -> np.ndarray:
    """[tokens, experts] bool: which experts each token's top ``k`` logits choose (the
    kernel's choice: its softmax keeps the order)."""
    top = np.argpartition(-router_logits, k - 1, axis=1)[:, :k]
    chosen = np.zeros(router_logits.shape, bool)
    np.put_along_axis(chosen, top, True, axis=1)
    return chosen


def quantize_experts(
    x: np.ndarray, router_logits: np.ndarray, k: int, fc1: np.ndarray, fc2: np.ndarray, block: int
) -> tuple[list[ExpertQuant], list[ExpertQuant]]:
    """GPTQ of each expert's fc1 [E, 2I, H] and fc2 [E, H, I] on the rows of ``x`` [T, H]
    routed to it by ``router_logits`` [T, E] (top ``k``); None where too few."""
    chosen = routed_rows(router_logits, k)
    up: list[ExpertQuant] = []
    down: list[ExpertQuant] = []
    for e in range(fc1.shape[0]):
        xe = x[chosen[:, e]]
        if len(xe) < MIN_TOKENS:
            up.append(None)
            down.append(None)
            continue
        up.append(quantize_gptq(fc1[e], second_moment(xe), block))
        down.append(quantize_gptq(fc2[e], second_moment(swiglu(xe, fc1[e])), block))
    return up, down


def gptq_experts(
    model: onnx.ModelProto,
    token_ids: Sequence[int],
    block: int | None = None,
) -> dict[str, list[ExpertQuant]]:
    """GPTQ'd 4-bit values of every ``com.microsoft.MoE`` node's experts on ``token_ids``,
    by weight name (fc1 and fc2), one entry per expert (None: round to nearest).
    ``block``: the QMoE block asked for (None: moe_to_qmoe's default for the sizes)."""
    graph = model.graph
    moes = [n for n in graph.node if n.op_type == "MoE" and n.domain == MSFT_DOMAIN]
    if not moes:
        return {}
    names = sorted({name for n in moes for name in n.input[:2]})
    results: dict[str, list[ExpertQuant]] = {}
    with tempfile.TemporaryDirectory(prefix="moechat-gptq-experts-") as tmp:
        # saving moves the weights into the data file: they are read per layer from it
        path = Path(tmp) / "model.onnx"
        save_model(model, path)
        try:
            seen: dict[str, list[np.ndarray]] = {}
            for name, value in run_with_outputs(path, names, token_ids):
                seen.setdefault(name, []).append(value.reshape(-1, value.shape[-1]))
            inits = initializers(graph)
            for node in moes:
                fc1 = numpy_helper.to_array(inits[node.input[2]], tmp)  # [E, 2I, H]
                fc2 = numpy_helper.to_array(inits[node.input[4]], tmp)  # [E, H, I]
                size = block or qmoe_block_size(fc1.shape[2], fc2.shape[2])
                if not size or fc1.shape[2] % size or fc2.shape[2] % size:
                    continue  # moe_to_qmoe says why this block does not fit
                x = np.concatenate(seen[node.input[0]]).astype(np.float32)
                logits = np.concatenate(seen[node.input[1]])
                k = int(attribute(node, "k", 1))
                up, down = quantize_experts(x, logits, k, fc1, fc2, size)
                results[node.input[2]], results[node.input[4]] = up, down
        finally:
            load_external_data_for_model(model, tmp)
    return results
