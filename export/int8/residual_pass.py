"""A second pass of each int8 matmul over its activations' rounding error.

onnxruntime's 8-bit ``MatMulNBits`` with ``accuracy_level=4`` quantises its input
activations to int8 per block of ``block_size`` along K (symmetric, scale = block
max / 127, round half to even) before the integer dot products. That rounding is most
of the int8 error of a small trained model (docs/decisions/0006-*). This rewrite computes
the same rounding with standard ops, ``e = x - dequant(quant(x))``, and runs the
kernel once over ``x`` and ``e`` stacked on a new first axis, summing the two results:

    y = MatMulNBits([x, e]).sum(axis=0) = MatMulNBits(x) + MatMulNBits(e)

``e``'s own rounding error is 1/127 of ``e``, so the activations act as if they had
about 14 bits; the weights stay int8, stored and prepacked once (two separate kernel
nodes on one weight ran the second at twice the cost of the first). It decodes
27% slower (about a quarter less decode speed) and prefills at half the speed on the demo MoE
(docs/decisions/0006-int8-residual-pass.md), so ``moechat export`` runs it only on request
(``--int8-residual-pass``).
"""

from __future__ import annotations

import numpy as np
import onnx
from onnx import helper, numpy_helper

from moechat.export.graph_rewrites import MSFT_DOMAIN, attribute

_SKIP_OUTPUTS = {"logits", "logits_int8"}  # the lm_head: its top logits are rescored in float


def _constants(graph: onnx.GraphProto, k: int, block: int, added: set[str]) -> dict[str, str]:
    """Names of the pass's constant inputs, added to ``graph`` once (``added`` tracks them)."""
    names = {
        "blocks": f"residual_pass_blocks_{k}_{block}",
        "levels": "residual_pass_127",
        "tiny": "residual_pass_tiny",
        "last": "residual_pass_last_axis",
        "first": "residual_pass_first_axis",
        "two": "residual_pass_two",
    }
    values = {
        names["blocks"]: np.array([-1, k // block, block], np.int64),
        names["levels"]: np.array(127.0, np.float32),
        names["tiny"]: np.array(1e-30, np.float32),  # an all-zero block: 0 / tiny = 0
        names["last"]: np.array([-1], np.int64),
        names["first"]: np.array([0], np.int64),
        names["two"]: np.array([2], np.int64),
    }
    for name, value in values.items():
        if name not in added:
            graph.initializer.append(numpy_helper.from_array(value, name))
            added.add(name)
    return names


def add_residual_passes(model: onnx.ModelProto) -> int:
    """Give every 8-bit, ``accuracy_level`` 4 MatMulNBits except the lm_head a second
    pass over its activation rounding error; returns how many were rewritten."""
    graph = model.graph
    nodes: list[onnx.NodeProto] = []
    added: set[str] = set()
    count = 0
    for node in graph.node:
        k, block = attribute(node, "K", 0), attribute(node, "block_size", 0)
        if (
            node.op_type != "MatMulNBits"
            or attribute(node, "bits", 4) != 8
            or attribute(node, "accuracy_level", 0) != 4
            or _SKIP_OUTPUTS & set(node.output)
            or not block
            or k % block
        ):
            nodes.append(node)
            continue
        c = _constants(graph, k, block, added)
        x, p = node.input[0], f"{node.name}_residual"
        attrs = {a.name: helper.get_attribute_value(a) for a in node.attribute}
        # one MatMulNBits call over [x, e] stacked on a new first axis, then summed: the
        # weights are read (and prepacked) once
        nodes += [
            helper.make_node("Shape", [x], [f"{p}_shape"], f"{p}_shape"),
            helper.make_node("Reshape", [x, c["blocks"]], [f"{p}_x"], f"{p}_blocks"),
            helper.make_node("Abs", [f"{p}_x"], [f"{p}_abs"], f"{p}_abs"),
            helper.make_node("ReduceMax", [f"{p}_abs", c["last"]], [f"{p}_max"], f"{p}_max", keepdims=1),
            helper.make_node("Max", [f"{p}_max", c["tiny"]], [f"{p}_max1"], f"{p}_nonzero"),
            helper.make_node("Div", [f"{p}_max1", c["levels"]], [f"{p}_scale"], f"{p}_scale"),
            helper.make_node("Div", [f"{p}_x", f"{p}_scale"], [f"{p}_r"], f"{p}_div"),
            helper.make_node("Round", [f"{p}_r"], [f"{p}_q"], f"{p}_round"),
            helper.make_node("Mul", [f"{p}_q", f"{p}_scale"], [f"{p}_dq"], f"{p}_dequant"),
            helper.make_node("Sub", [f"{p}_x", f"{p}_dq"], [f"{p}_e"], f"{p}_error"),
            # [x; e] in block layout, then [2, *x.shape]
            helper.make_node("Concat", [f"{p}_x", f"{p}_e"], [f"{p}_xe"], f"{p}_stack", axis=0),
            helper.make_node("Concat", [c["two"], f"{p}_shape"], [f"{p}_shape2"], f"{p}_shape2", axis=0),
            helper.make_node("Reshape", [f"{p}_xe", f"{p}_shape2"], [f"{p}_both"], f"{p}_unblock"),
            helper.make_node(
                "MatMulNBits", [f"{p}_both", *node.input[1:]], [f"{p}_out"], node.name,
                domain=MSFT_DOMAIN, **attrs,
            ),
            helper.make_node("ReduceSum", [f"{p}_out", c["first"]], list(node.output), f"{p}_sum", keepdims=0),
        ]  # fmt: skip
        count += 1
    del graph.node[:]
    graph.node.extend(nodes)
    return count
