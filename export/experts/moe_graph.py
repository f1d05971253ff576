"""The MoE layers of an exported decoder graph, found by structure, for expert rewrites.

Two lowerings (export/lowering.py) hold the routed experts:
- ``contrib``: one ``com.microsoft.MoE`` or ``QMoE`` node per layer; every input from
  index 2 on (weights, scales, biases) has the experts along axis 0;
- ``ops``: per expert e a branch that starts at ``Gather(dense, e, axis=1)`` (``dense``:
  [tokens, experts] routing weights), picks its tokens (NonZero -> GatherND of the
  layer input), runs the SwiGLU MatMuls (MatMulNBits in int8 graphs), multiplies by
  the weight and adds a ScatterND onto the running sum (``Add(previous, scatter)``).
The router is the MatMul/Gemm that export/graph_rewrites.py's ``find_routers`` finds;
a layer's experts and its router columns are in the same order.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import onnx
from onnx import numpy_helper

from moechat.export.graph_rewrites import (
    MSFT_DOMAIN,
    attribute,
    consumers,
    find_routers,
    initializers,
    producers,
)
from moechat.runtime.errors import MoechatError


@dataclass
class Branch:
    """One routed expert of a standard-op layer."""

    expert: int
    gather: onnx.NodeProto  # Gather(dense, e, axis=1): the expert's column of weights
    take_x: onnx.NodeProto  # GatherND(x, tokens): the expert's tokens
    weighted: onnx.NodeProto  # Mul(expert output, weight)
    unweighted: str  # the expert output before the weight
    add: onnx.NodeProto  # Add(previous sum, ScatterND(...))
    scatter: str  # the ScatterND output: this expert's weighted outputs on all tokens
    matmuls: list[onnx.NodeProto] = field(default_factory=list)  # fc1 then fc2

    @property
    def previous(self) -> str:
        """The running sum before this expert (read live: rewrites may rewire it)."""
        return next(i for i in self.add.input if i != self.scatter)


@dataclass
class MoeLayer:
    router: onnx.NodeProto
    x: str  # the layer's FFN input
    num_experts: int
    node: onnx.NodeProto | None = None  # contrib: the MoE / QMoE node
    branches: list[Branch] = field(default_factory=list)  # ops, in chain order
    output: str = ""  # the routed experts' sum (ops: the last Add)
    rescale: onnx.NodeProto | None = None  # contrib grouped routers: Mul(out, sum of weights)

    @property
    def kind(self) -> str:
        return "contrib" if self.node is not None else "ops"


def router_weight(graph: onnx.GraphProto, router: onnx.NodeProto) -> tuple[np.ndarray, int]:
    """The router's weight and the axis along which its experts lie."""
    w = numpy_helper.to_array(initializers(graph)[router.input[1]])
    axis = 0 if router.op_type == "Gemm" and attribute(router, "transB", 0) else 1
    return w, axis


def _const_int(name: str, inits: dict) -> int | None:
    if name not in inits:
        return None
    value = numpy_helper.to_array(inits[name])
    return int(value) if value.size == 1 else None


def _ops_branches(graph: onnx.GraphProto, router: onnx.NodeProto) -> tuple[list[Branch], str]:
    """The expert branches reachable from ``router`` (ops lowering), in chain order."""
    users = consumers(graph)
    inits = initializers(graph)
    # forward from the router to the [T, E] weights matrix that the Gathers read
    seen: set[int] = set()
    frontier: list[str] = [router.output[0]]
    gathers: list[onnx.NodeProto] = []
    while frontier and not gathers:
        nxt = []
        for name in frontier:
            for u in users.get(name, []):
                if id(u) in seen:
                    continue
                seen.add(id(u))
                if u.op_type == "ScatterElements":
                    gathers = [
                        g for g in users.get(u.output[0], [])
                        if g.op_type == "Gather" and attribute(g, "axis", 0) == 1
                    ]  # fmt: skip
                    if gathers:
                        break
                nxt.extend(u.output)
            if gathers:
                break
        frontier = nxt
    branches = []
    for g in gathers:
        e = _const_int(g.input[1], inits)
        nonzero = [u for u in users.get(g.output[0], []) if u.op_type == "NonZero"]
        if e is None or len(nonzero) != 1:
            raise MoechatError(
                "unexpected standard-op MoE layout: an expert branch without NonZero"
            )
        (tokens,) = [u.output[0] for u in users[nonzero[0].output[0]] if u.op_type == "Reshape"]
        take = [u for u in users[tokens] if u.op_type == "GatherND"]
        take_x = next(u for u in take if u.input[0] != g.output[0])
        take_w = next(u for u in take if u.input[0] == g.output[0])
        (unsq,) = [u for u in users[take_w.output[0]] if u.op_type == "Unsqueeze"]
        (weighted,) = [u for u in users[unsq.output[0]] if u.op_type == "Mul"]
        unweighted = next(i for i in weighted.input if i != unsq.output[0])
        (scatter,) = [u for u in users[tokens] if u.op_type == "ScatterND"]
        (add,) = [u for u in users[scatter.output[0]] if u.op_type == "Add"]
        # the branch's weight MatMuls, from its tokens forward to the weighting Mul
        matmuls, walk, visited = [], [take_x.output[0]], set()
        while walk:
            name = walk.pop()
            for u in users.get(name, []):
                if id(u) in visited or u is weighted:
                    continue
                visited.add(id(u))
                if u.op_type in ("MatMul", "MatMulNBits") and u.input[1] in inits:
                    matmuls.append(u)
                walk.extend(u.output)
        order = {id(n): i for i, n in enumerate(graph.node)}
        matmuls.sort(key=lambda n: order[id(n)])
        branches.append(Branch(e, g, take_x, weighted, unweighted, add, scatter.output[0], matmuls))
    # chain order: follow previous -> add
    by_previous = {b.previous: b for b in branches}
    starts = [b for b in branches if b.previous not in {c.add.output[0] for c in branches}]
    if len(starts) != 1:
        raise MoechatError("unexpected standard-op MoE layout: the expert sums are not one chain")
    chain = [starts[0]]
    while chain[-1].add.output[0] in by_previous:
        chain.append(by_previous[chain[-1].add.output[0]])
    if len(chain) != len(branches) or sorted(b.expert for b in chain) != list(range(len(chain))):
        raise MoechatError("unexpected standard-op MoE layout: experts missing from the chain")
    return chain, chain[-1].add.output[0]


def find_moe_layers(model: onnx.ModelProto) -> list[MoeLayer]:
    """Every MoE layer of the graph, in graph order; MoechatError if none is found."""
    graph = model.graph
    producer_of = producers(graph)
    users = consumers(graph)
    layers = []
    for router in find_routers(model):
        w, axis = router_weight(graph, router)
        num_experts = w.shape[axis]
        # contrib: the MoE/QMoE node reached from the router (directly, or through the
        # DeepSeek routing ops whose dense weights become its log-weights)
        node, walk, seen = None, [router.output[0]], set()
        while walk and node is None:
            name = walk.pop(0)
            for u in users.get(name, []):
                if u.op_type in ("MoE", "QMoE") and u.domain == MSFT_DOMAIN:
                    node = u
                    break
                if id(u) not in seen and u.op_type not in ("Gather", "NonZero"):
                    seen.add(id(u))
                    walk.extend(u.output)
        if node is not None:
            rescale = None
            if node.input[1] != router.output[0] and producer_of.get(node.input[1]) is not None:
                muls = [u for u in users.get(node.output[0], []) if u.op_type == "Mul"]
                rescale = muls[0] if len(muls) == 1 else None
            layer = MoeLayer(router, node.input[0], num_experts, node=node, rescale=rescale)
            layer.output = (rescale or node).output[0]
        else:
            branches, output = _ops_branches(graph, router)
            if len(branches) != num_experts:
                raise MoechatError(
                    f"router {router.name} scores {num_experts} experts, the graph has "
                    f"{len(branches)} expert branches"
                )
            layer = MoeLayer(router, branches[0].take_x.input[0], num_experts, branches=branches)
            layer.output = output
        layers.append(layer)
    if not layers:
        raise MoechatError("the graph has no MoE layers (no router found)")
    return layers


def rename_uses(graph: onnx.GraphProto, old: str, new: str) -> None:
    """Every node input (and graph output) that reads ``old`` reads ``new`` instead."""
    for node in graph.node:
        for i, name in enumerate(node.input):
            if name == old:
                node.input[i] = new
    for out in graph.output:
        if out.name == old:
            raise MoechatError(f"cannot rewire {old}: it is a graph output")


def remove_dead_nodes(graph: onnx.GraphProto) -> int:
    """Drop nodes nothing reads (up to the graph outputs) and unused initializers."""
    needed = {o.name for o in graph.output}
    kept = []
    for node in reversed(graph.node):
        if any(o in needed for o in node.output if o):
            kept.append(node)
            needed.update(i for i in node.input if i)
    removed = len(graph.node) - len(kept)
    del graph.node[:]
    graph.node.extend(reversed(kept))
    inits = [t for t in graph.initializer if t.name in needed]
    del graph.initializer[:]
    graph.initializer.extend(inits)
    live = needed | {i.name for i in graph.input}
    infos = [v for v in graph.value_info if v.name in live]
    del graph.value_info[:]
    graph.value_info.extend(infos)
    return removed


def replace_initializer(graph: onnx.GraphProto, name: str, array: np.ndarray) -> str:
    """Store ``array`` under a new name derived from ``name`` (the old tensor may be
    shared); returns the new name."""
    taken = {t.name for t in graph.initializer}
    new, i = f"{name}_experts", 0
    while new in taken:
        i += 1
        new = f"{name}_experts{i}"
    # np.ascontiguousarray would turn a 0-d index into shape [1]
    graph.initializer.append(numpy_helper.from_array(np.array(array, order="C"), new))
    return new


def set_input(graph: onnx.GraphProto, node: onnx.NodeProto, index: int, array: np.ndarray) -> None:
    node.input[index] = replace_initializer(graph, node.input[index], array)


def slice_router(graph: onnx.GraphProto, layer: MoeLayer, keep: list[int]) -> None:
    """Keep only the router columns (its scores) of experts ``keep``, in that order."""
    w, axis = router_weight(graph, layer.router)
    set_input(graph, layer.router, 1, np.take(w, keep, axis=axis))
    inits = initializers(graph)
    if layer.router.op_type == "Gemm" and len(layer.router.input) > 2 and layer.router.input[2]:
        bias = numpy_helper.to_array(inits[layer.router.input[2]])
        if bias.ndim == 1 and bias.shape[0] == w.shape[axis]:
            set_input(graph, layer.router, 2, bias[keep])


def slice_contrib_experts(graph: onnx.GraphProto, layer: MoeLayer, keep: list[int]) -> None:
    """Keep experts ``keep`` of a MoE/QMoE node: every per-expert input along axis 0."""
    assert layer.node is not None
    inits = initializers(graph)
    for i in range(2, len(layer.node.input)):
        name = layer.node.input[i]
        if not name:
            continue
        if name not in inits:
            raise MoechatError(f"{layer.node.name}: expert input {name} is not a constant")
        array = numpy_helper.to_array(inits[name])
        if array.shape[0] != layer.num_experts:
            raise MoechatError(
                f"{layer.node.name}: input {name} has {array.shape[0]} rows for "
                f"{layer.num_experts} experts"
            )
        set_input(graph, layer.node, i, array[keep])


def set_attribute(node: onnx.NodeProto, name: str, value: int) -> None:
    for a in node.attribute:
        if a.name == name:
            a.i = value
            return
    node.attribute.append(onnx.helper.make_attribute(name, value))
