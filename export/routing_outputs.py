"""Routing out of the graph: each MoE layer's router logits as a graph output.

The router MatMul runs on every step anyway; naming its output ``router_logits.{layer}``
and declaring it a graph output lets the runtime fetch it when asked (``moechat experts
stats``, the chat's routing view) and costs nothing when it does not: onnxruntime
computes only what the fetched outputs need, and the router logits are needed by the
MoE op regardless (measured in docs/benchmarks.md). runtime/routing.py turns them into
experts and weights; moechat.json's ``routing`` section (:func:`routing_section`) names
the outputs and records DeepSeek-V3's correction bias, a graph constant the runtime
cannot read without onnx.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import onnx
import torch

from moechat.export.graph_rewrites import find_routers
from moechat.models.config import ModelConfig
from moechat.runtime.errors import MoechatError
from moechat.runtime.routing import RoutedGraph, moe_layers, output_name


def expose_router_logits(model: onnx.ModelProto, layers: list[int]) -> list[str]:
    """Rename each router MatMul's output to ``router_logits.{layer}`` and make it a graph
    output (``layers``: the MoE layer indices, in graph order). Returns the names."""
    graph = model.graph
    routers = find_routers(model)
    if len(routers) != len(layers):
        raise MoechatError(
            f"found {len(routers)} routers in the graph for {len(layers)} MoE layers"
        )
    names: list[str] = []
    existing = {o.name for o in graph.output}
    for node, layer in zip(routers, layers, strict=True):
        old, new = node.output[0], output_name(layer)
        if old != new:
            node.output[0] = new
            for other in graph.node:
                for i, name in enumerate(other.input):
                    if name == old:
                        other.input[i] = new
            for info in graph.value_info:
                if info.name == old:
                    info.name = new
        if new not in existing:
            graph.output.append(
                onnx.helper.make_tensor_value_info(
                    new, onnx.TensorProto.FLOAT, ["num_tokens", None]
                )
            )
        names.append(new)
    return names


def routing_section(
    cfg: ModelConfig, weight: Callable[[str], torch.Tensor | None]
) -> dict[str, Any] | None:
    """moechat.json ``routing``: the outputs per MoE layer and noaux_tc's correction bias
    (float32 values written as exact decimals; JSON round-trips them). ``weight``: a
    tensor of the checkpoint by its internal name (None: absent)."""
    layers = moe_layers(cfg.to_dict())
    if not layers:
        return None
    bias: dict[str, list[float]] = {}
    if cfg.topk_method == "noaux_tc":
        for i in layers:
            value = weight(f"model.layers.{i}.mlp.gate.e_score_correction_bias")
            values = value.float().tolist() if value is not None else [0.0] * cfg.n_routed_experts
            bias[str(i)] = values
    return {
        "layers": layers,
        "outputs": [output_name(i) for i in layers],
        "correction_bias": bias or None,
    }


def routed_graph(graph_path: Path, arch: dict[str, Any]) -> RoutedGraph:
    """For a package exported before routing left the graph: its graph with the router
    outputs added (in memory; the package is not touched). Not for noaux_tc routers,
    whose correction bias only an export records."""
    if arch.get("topk_method") == "noaux_tc":
        raise MoechatError(
            f"{graph_path.parent} predates routing outputs and its router needs the score "
            "correction bias that only `moechat export` records: re-export it"
        )
    model = onnx.load(str(graph_path), load_external_data=False)
    layers = moe_layers(arch)
    outputs = expose_router_logits(model, layers)
    return RoutedGraph(
        model.SerializeToString(), {"layers": layers, "outputs": outputs, "correction_bias": None}
    )
