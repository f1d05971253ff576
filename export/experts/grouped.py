"""DeepSeek's grouped routers (export/lowering.py ``_route_grouped``) under expert pruning.

Groups are contiguous blocks of ``E / n_group`` experts. Pruning keeps the same number
in every group, so the groups stay contiguous blocks and group-limited routing keeps
its meaning; the graph then needs its group shape constants rewritten: the
``Reshape(choice, [-1, G, E/G])``, the ``Expand(group mask, [1, 1, E/G])`` and the
``Reshape(mask, [-1, E])`` back, plus noaux_tc's ``Add(scores, correction bias [E])``.
They are found among the nodes between the router and the ``Where`` that masks the
dropped groups (so no constant of the same value elsewhere in the graph is touched).
"""

from __future__ import annotations

from typing import Any

import numpy as np
import onnx
from onnx import numpy_helper

from moechat.export.experts.moe_graph import MoeLayer, set_input
from moechat.export.graph_rewrites import consumers, initializers, producers
from moechat.runtime.errors import MoechatError


def valid_keeps(arch: dict[str, Any]) -> list[int]:
    """The expert counts a grouped router can be pruned to: a multiple of ``n_group``,
    at least 2 per group for noaux_tc (groups score by their best two), and enough
    experts in the ``topk_group`` chosen groups for top-k."""
    num, top_k = int(arch["n_routed_experts"]), int(arch["num_experts_per_tok"])
    groups, chosen = int(arch.get("n_group", 1)), int(arch.get("topk_group", 1))
    least = 2 if arch.get("topk_method") == "noaux_tc" else 1
    return [
        n for n in range(groups, num + 1, groups)
        if n // groups >= least and chosen * (n // groups) >= top_k
    ]  # fmt: skip


def keep_per_group(score: np.ndarray, n_group: int, keep: int) -> list[int]:
    """The best ``keep / n_group`` experts of every group (ascending; ties: lower index)."""
    per, each = len(score) // n_group, keep // n_group
    kept: list[int] = []
    for g in range(n_group):
        order = np.argsort(-score[g * per : (g + 1) * per], kind="stable")
        kept.extend(g * per + int(e) for e in order[:each])
    return sorted(kept)


def _routing_nodes(
    graph: onnx.GraphProto, layer: MoeLayer
) -> tuple[list[onnx.NodeProto], set[str]]:
    """The nodes that both read the router's logits and feed the group-masking Where,
    and the names of every tensor computed from the router's logits."""
    users, producer_of = consumers(graph), producers(graph)
    below: set[int] = set()
    derived: set[str] = set()
    walk, wheres = [layer.router.output[0]], []
    while walk:  # breadth first: the group mask is the Where nearest the router
        for u in users.get(walk.pop(0), []):
            if id(u) in below or u.op_type in ("MoE", "QMoE", "NonZero"):
                continue
            below.add(id(u))
            if u.op_type == "Where":
                wheres.append(u)
            walk.extend(u.output)
            derived.update(u.output)
    if not wheres:
        raise MoechatError(
            f"router {layer.router.name}: no group mask found (not a grouped router)"
        )
    found, walk, seen = [], list(wheres[0].input), set()
    while walk:
        node = producer_of.get(walk.pop())
        if node is None or id(node) in seen or id(node) not in below:
            continue
        seen.add(id(node))
        found.append(node)
        walk.extend(node.input)
    return found, derived


def prune_grouped_router(
    graph: onnx.GraphProto, layer: MoeLayer, keep: list[int], n_group: int, bias: bool
) -> None:
    """Rewrite the group shape constants (and slice the correction bias) of one layer's
    grouped routing for experts ``keep`` (``keep_per_group``'s layout)."""
    num, new = layer.num_experts, len(keep)
    inits = initializers(graph)
    nodes, derived = _routing_nodes(graph, layer)
    edits = {"group": 0, "expand": 0, "back": 0, "bias": 0}

    def const(name: str) -> np.ndarray | None:
        return numpy_helper.to_array(inits[name]) if name in inits else None

    for node in nodes:
        shape = const(node.input[1]) if len(node.input) > 1 else None
        if shape is None:
            continue
        values = shape.tolist() if shape.ndim == 1 else None
        if node.op_type == "Reshape" and values == [-1, n_group, num // n_group]:
            set_input(graph, node, 1, np.array([-1, n_group, new // n_group], dtype=shape.dtype))
            edits["group"] += 1
        elif node.op_type == "Expand" and values == [1, 1, num // n_group]:
            set_input(graph, node, 1, np.array([1, 1, new // n_group], dtype=shape.dtype))
            edits["expand"] += 1
        elif node.op_type == "Reshape" and values == [-1, num]:
            set_input(graph, node, 1, np.array([-1, new], dtype=shape.dtype))
            edits["back"] += 1
        elif node.op_type == "Add" and bias and shape.shape == (num,):
            set_input(graph, node, 1, shape[keep])
            edits["bias"] += 1
    # the exporter's recorded shapes say E (or E / G) experts: onnxruntime would reject
    # them against the new constants, so they go (shape inference redoes them)
    sizes = {num, num // n_group}
    infos = [
        v for v in graph.value_info
        if v.name not in derived
        or not sizes & {d.dim_value for d in v.type.tensor_type.shape.dim}
    ]  # fmt: skip
    del graph.value_info[:]
    graph.value_info.extend(infos)
    want = {"group": 1, "expand": 1, "back": 1, "bias": int(bias)}
    if edits != want:
        raise MoechatError(
            f"router {layer.router.name}: unexpected grouped routing layout (found {edits} "
            f"group shape constants, expected {want})"
        )
