"""ONNX graph helpers and exact rewrites shared by export and int8 quantisation.

- finding the fp32 router matmuls (they must stay fp32 and unfused);
- Gemm -> MatMul (the quantisers only convert MatMul);
- merging matmuls that share an input (q/k/v, gate/up) into one MatMul + Split.
"""

from __future__ import annotations

import collections

import numpy as np
import onnx
from onnx import helper, numpy_helper

MSFT_DOMAIN = "com.microsoft"


def producers(graph: onnx.GraphProto) -> dict[str, onnx.NodeProto]:
    return {out: node for node in graph.node for out in node.output if out}


def consumers(graph: onnx.GraphProto) -> dict[str, list[onnx.NodeProto]]:
    users: dict[str, list[onnx.NodeProto]] = {}
    for node in graph.node:
        for name in node.input:
            if name:
                users.setdefault(name, []).append(node)
    return users


def initializers(graph: onnx.GraphProto) -> dict[str, onnx.TensorProto]:
    return {t.name: t for t in graph.initializer}


def ensure_node_names(graph: onnx.GraphProto) -> None:
    seen: set[str] = set()
    for i, node in enumerate(graph.node):
        if not node.name or node.name in seen:
            node.name = f"{node.op_type}_{i}"
        seen.add(node.name)


def attribute(node: onnx.NodeProto, name: str, default=None):
    for a in node.attribute:
        if a.name == name:
            return helper.get_attribute_value(a)
    return default


def find_routers(model: onnx.ModelProto) -> list[onnx.NodeProto]:
    """The MatMul/Gemm nodes that compute router logits, in graph order.

    A router feeds input 1 (``router_probs``) of a ``MoE``/``QMoE`` node, or a Softmax
    whose output goes into a TopK (the standard-op lowering). Only a MatMul/Gemm with a
    constant weight counts (a Reshape/Cast in between is looked through).
    """
    graph = model.graph
    producer_of = producers(graph)
    users = consumers(graph)
    inits = initializers(graph)
    logits: list[str] = []
    for node in graph.node:
        if node.op_type in ("MoE", "QMoE") and node.domain == MSFT_DOMAIN and len(node.input) > 1:
            logits.append(node.input[1])
        elif node.op_type == "Softmax" and any(
            u.op_type == "TopK" for u in users.get(node.output[0], [])
        ):
            logits.append(node.input[0])
    found: dict[str, onnx.NodeProto] = {}
    for name in logits:
        node = producer_of.get(name)
        while node is not None and node.op_type in ("Reshape", "Cast", "Identity"):
            node = producer_of.get(node.input[0])
        if node is not None and node.op_type in ("MatMul", "Gemm") and node.input[1] in inits:
            found[node.name] = node
    order = {id(n): i for i, n in enumerate(graph.node)}
    return sorted(found.values(), key=lambda n: order[id(n)])


def gemm_to_matmul(model: onnx.ModelProto, keep: set[str] = frozenset()) -> int:
    """Rewrite Gemm(A, const B[, C]) as MatMul(A, B') (+ Add C); returns how many."""
    graph = model.graph
    inits = initializers(graph)
    new_nodes = []
    count = 0
    for node in graph.node:
        if (
            node.op_type != "Gemm"
            or node.name in keep
            or node.input[1] not in inits
            or attribute(node, "transA", 0)
            or attribute(node, "alpha", 1.0) != 1.0
        ):
            new_nodes.append(node)
            continue
        w = numpy_helper.to_array(inits[node.input[1]])
        if attribute(node, "transB", 0):
            w = w.T
        w_name = f"{node.input[1]}_matmul"
        graph.initializer.append(numpy_helper.from_array(np.ascontiguousarray(w), w_name))
        has_bias = len(node.input) > 2 and node.input[2]
        out = node.output[0]
        mm_out = f"{out}_matmul" if has_bias else out
        new_nodes.append(helper.make_node("MatMul", [node.input[0], w_name], [mm_out], node.name))
        if has_bias:
            c = node.input[2]
            if attribute(node, "beta", 1.0) != 1.0:
                beta = numpy_helper.to_array(inits[c]) * attribute(node, "beta", 1.0)
                c = f"{c}_beta"
                graph.initializer.append(numpy_helper.from_array(beta.astype(np.float32), c))
            new_nodes.append(helper.make_node("Add", [mm_out, c], [out], f"{node.name}_bias"))
        count += 1
    del graph.node[:]
    graph.node.extend(new_nodes)
    drop_unused_initializers(graph)
    return count


def drop_unused_initializers(graph: onnx.GraphProto) -> None:
    used = {name for node in graph.node for name in node.input}
    used |= {o.name for o in graph.output}
    keep = [t for t in graph.initializer if t.name in used]
    del graph.initializer[:]
    graph.initializer.extend(keep)


def _fusable_groups(graph: onnx.GraphProto, inits: dict, skip: set[str]) -> list[list]:
    """MatMuls with a constant 2-D weight, grouped by input and weight rows/dtype."""
    uses = collections.Counter(name for node in graph.node for name in node.input)
    groups = collections.defaultdict(list)
    for node in graph.node:
        if node.op_type != "MatMul" or node.name in skip or node.input[1] not in inits:
            continue
        w = inits[node.input[1]]
        if len(w.dims) == 2 and uses[node.input[1]] == 1:  # tied/shared weights stay put
            groups[(node.input[0], w.dims[0], w.data_type)].append(node)
    return [nodes for nodes in groups.values() if len(nodes) > 1]


def fuse_shared_input_matmuls(model: onnx.ModelProto, skip: set[str] = frozenset()) -> int:
    """Merge MatMuls that read one input into one MatMul + Split; returns groups fused.

    q/k/v and gate/up projections read the same activation through separate kernels;
    onnxruntime does not merge them, and with one decoded token every kernel is a
    thread-pool fork/join (docs/benchmarks.md, "Anchors"). Concatenating the weights
    along N gives the same numbers with fewer launches, and an int8 quantiser then
    makes one MatMulNBits per group (its blocks run along K, so nothing changes).
    ``skip``: nodes to leave alone (the fp32 routers, which must stay findable).
    Run :func:`gemm_to_matmul` first so Gemm projections take part.
    """
    graph = model.graph
    inits = initializers(graph)
    groups = _fusable_groups(graph, inits, set(skip))
    for i, nodes in enumerate(groups):
        base = f"{nodes[0].name}_fused{i}"
        arrays = [numpy_helper.to_array(inits[n.input[1]]) for n in nodes]
        widths = np.array([a.shape[1] for a in arrays], dtype=np.int64)
        graph.initializer.extend([
            numpy_helper.from_array(np.concatenate(arrays, axis=1), base + "_weight"),
            numpy_helper.from_array(widths, base + "_widths"),
        ])  # fmt: skip
        matmul = helper.make_node(
            "MatMul", [nodes[0].input[0], base + "_weight"], [base + "_out"], name=base
        )
        split = helper.make_node(
            "Split", [base + "_out", base + "_widths"], [n.output[0] for n in nodes],
            name=base + "_split", axis=-1,
        )  # fmt: skip
        at = min(list(graph.node).index(n) for n in nodes)
        for n in nodes:
            graph.node.remove(n)
        graph.node.insert(at, split)
        graph.node.insert(at, matmul)
    drop_unused_initializers(graph)
    return len(groups)
