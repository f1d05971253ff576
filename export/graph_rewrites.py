"""ONNX graph helpers and exact rewrites shared by export and int8 quantisation.

- finding the fp32 router matmuls (they must stay fp32 and unfused);
- Gemm -> MatMul (the quantisers only convert MatMul);
- merging matmuls that share an input (q/k/v, gate/up) into one MatMul + Split.
"""

from __future__ import annotations

import collections
from collections.abc import Set as AbstractSet

import numpy as np
import onnx
from onnx import helper, numpy_helper

from moechat.export.lazy_weights import concatenated, renamed, transposed

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
    whose output goes into a TopK (the standard-op lowering), or a Softmax / Sigmoid that
    reaches a TopK through at most two Add / Reshape / Reduce / Where (the DeepSeek-V2/V3
    routers, models/mla.py). Only a MatMul/Gemm with a
    constant weight counts (a Reshape/Cast in between is looked through).
    """
    graph = model.graph
    producer_of = producers(graph)
    users = consumers(graph)
    inits = initializers(graph)
    logits: list[str] = []

    def feeds_topk(name: str, hops: int) -> bool:
        """DeepSeek-V2/V3 routers (models/mla.py) reach their TopK through a few ops."""
        nodes = users.get(name, [])
        if any(u.op_type == "TopK" for u in nodes):
            return True
        return hops > 1 and any(
            u.op_type in ("Add", "Reshape", "ReduceMax", "ReduceSum", "Where")
            and feeds_topk(u.output[0], hops - 1)
            for u in nodes
        )

    for node in graph.node:
        if node.op_type in ("MoE", "QMoE") and node.domain == MSFT_DOMAIN and len(node.input) > 1:
            logits.append(node.input[1])
        elif node.op_type == "Softmax" and any(
            u.op_type == "TopK" for u in users.get(node.output[0], [])
        ):
            logits.append(node.input[0])
        elif node.op_type in ("Softmax", "Sigmoid") and feeds_topk(node.output[0], 3):
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


def gemm_to_matmul(model: onnx.ModelProto, keep: AbstractSet[str] = frozenset()) -> int:
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
        w_name = f"{node.input[1]}_matmul"
        if attribute(node, "transB", 0):
            graph.initializer.append(transposed(inits[node.input[1]], w_name))
        else:
            graph.initializer.append(renamed(inits[node.input[1]], w_name))
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


def fuse_shared_input_matmuls(model: onnx.ModelProto, skip: AbstractSet[str] = frozenset()) -> int:
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
        weights = [inits[n.input[1]] for n in nodes]
        widths = np.array([w.dims[1] for w in weights], dtype=np.int64)
        graph.initializer.extend([
            concatenated(weights, base + "_weight"),
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


def _constant(name: str, inits: dict) -> np.ndarray | None:
    return numpy_helper.to_array(inits[name]) if name in inits else None


def _rms_norm_at(pow_node, users, inits) -> tuple | None:
    """Match x -> Pow(2) -> ReduceMean(-1) -> Add(eps) -> Sqrt -> Div(x, .) -> Mul(gamma).

    Returns (nodes, gamma, epsilon, output) or None.
    """
    x = pow_node.input[0]
    exponent = _constant(pow_node.input[1], inits)
    if exponent is None or exponent.size != 1 or float(exponent) != 2.0:
        return None
    chain = [pow_node]
    for op in ("ReduceMean", "Add", "Sqrt", "Div", "Mul"):
        following = users.get(chain[-1].output[0], [])
        if len(following) != 1 or following[0].op_type != op:
            return None
        chain.append(following[0])
    mean, add_eps, _, div, mul = chain[1:]
    axes = _constant(mean.input[1], inits) if len(mean.input) > 1 else None
    eps = _constant(add_eps.input[1], inits)
    if axes is None or axes.tolist() not in ([-1], -1) or eps is None or eps.size != 1:
        return None
    if div.input[0] != x:
        return None
    gamma = next((i for i in mul.input if i != div.output[0]), None)
    if gamma not in inits or len(inits[gamma].dims) != 1:
        return None
    return chain, gamma, float(eps), mul.output[0]


def fuse_residual_norms(model: onnx.ModelProto) -> int:
    """Residual Add + RMSNorm -> com.microsoft.SkipSimplifiedLayerNormalization.

    Every layer adds its attention and FFN output to the residual stream and
    normalises the sum; onnxruntime fuses the RMSNorm chain into one kernel but not
    the Add in front of it (its SkipLayerNormFusion needs static shapes and a sum
    used nowhere else, while the residual sum feeds the next Add). The fused op
    returns the sum as its 4th output, so the residual stream is unchanged.
    Returns how many were fused. Only for graphs that may use contrib ops.
    """
    graph = model.graph
    nodes = list(graph.node)
    index = {n.output[0]: i for i, n in enumerate(nodes) if n.output}
    inits = initializers(graph)
    users = consumers(graph)
    producer_of = producers(graph)
    outputs = {o.name for o in graph.output}
    dropped: set[int] = set()
    fused_at: dict[int, onnx.NodeProto] = {}
    for node in nodes:
        if node.op_type != "Pow":
            continue
        add = producer_of.get(node.input[0])
        if add is None or add.op_type != "Add" or any(i in inits for i in add.input):
            continue
        match = _rms_norm_at(node, users, inits)
        if match is None or match[3] in outputs:
            continue
        chain, gamma, eps, out = match
        fused_at[index[add.output[0]]] = helper.make_node(
            "SkipSimplifiedLayerNormalization", [add.input[0], add.input[1], gamma],
            [out, "", "", add.output[0]], name=f"{add.name or 'add'}_skip_rmsnorm",
            domain=MSFT_DOMAIN, epsilon=eps,
        )  # fmt: skip
        dropped.update(index[n.output[0]] for n in chain)
    if fused_at:
        # The fused node takes the Add's place: its inputs exist there, and both of
        # its outputs are only read later (the sum where the Add's was, the norm
        # where the Mul's was).
        kept = [fused_at.get(i, n) for i, n in enumerate(nodes) if i not in dropped]
        del graph.node[:]
        graph.node.extend(kept)
        if not any(o.domain == MSFT_DOMAIN for o in model.opset_import):
            model.opset_import.append(helper.make_opsetid(MSFT_DOMAIN, 1))
    return len(fused_at)


def pack_attention_inputs(model: onnx.ModelProto) -> int:
    """Split(qkv) -> GroupQueryAttention(q, k, v) becomes GroupQueryAttention(qkv, "", "").

    GroupQueryAttention accepts q/k/v packed in one tensor ([q | k | v] along the last
    axis, exactly what the fused projection computes), which saves a Split kernel per
    layer. Only where the Split's three outputs feed inputs 0-2 in that order and
    nothing else (models with q/k norms keep their Split). Returns how many.
    """
    graph = model.graph
    users = consumers(graph)
    producer_of = producers(graph)
    packed = 0
    for node in graph.node:
        if node.op_type != "GroupQueryAttention" or node.domain != MSFT_DOMAIN:
            continue
        split = producer_of.get(node.input[0])
        if split is None or split.op_type != "Split" or list(split.output) != list(node.input[:3]):
            continue
        if any(len(users.get(out, [])) != 1 for out in split.output):
            continue
        node.input[0], node.input[1], node.input[2] = split.input[0], "", ""
        graph.node.remove(split)
        packed += 1
    drop_unused_initializers(graph)
    return packed
