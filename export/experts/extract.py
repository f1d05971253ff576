"""``moechat experts extract``: one routed expert (or their mean) as the FFN of every layer.

The result is the MoE with its router forced to send every token to expert E with
weight 1 (plus the shared expert, and its gate, untouched), written as a normal
package. How, per lowering (export/experts/moe_graph.py):
- ``contrib`` (MoE / QMoE node): the node keeps one expert (its weights, scales) and
  ``k`` 1; the router keeps that expert's column, so the node's softmax over one score is
  exactly 1. DeepSeek's grouped routing ops are bypassed (the node reads the router
  directly, its output is no longer rescaled by the weights' sum).
- ``ops``: expert E's branch reads all tokens and its unweighted output replaces the
  layer's sum; the routing ops and other branches are dead and removed.
moechat.json then describes a MoE of one routed expert, 1 active per token (the runtime
and ``moechat experts stats`` handle it like any MoE); ``experts.extract`` says which
expert it was and both perplexities.

``--merge``: the elementwise mean of all routed experts' weights (mergekit's merge of a
MoE into a dense model), one expert of that SwiGLU. int8/int4 QMoE weights are
dequantised, averaged and quantised again with the same bits and blocks; int8 graphs of
the standard-op lowering (MatMulNBits) cannot be merged.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import onnx
from onnx import numpy_helper

from moechat.export.experts.moe_graph import (
    MoeLayer,
    find_moe_layers,
    remove_dead_nodes,
    rename_uses,
    set_attribute,
    set_input,
    slice_contrib_experts,
    slice_router,
)
from moechat.export.experts.package_io import (
    check_outdir,
    eval_text,
    open_moe_package,
    write_package,
)
from moechat.export.experts.qmoe_weights import dequantize_qmoe, quantize_qmoe
from moechat.export.graph_rewrites import attribute, initializers
from moechat.runtime.errors import MoechatError


def _merge_contrib(graph: onnx.GraphProto, layer: MoeLayer) -> None:
    """Replace the node's experts by one expert: the mean of their weights."""
    node = layer.node
    assert node is not None
    inits = initializers(graph)
    if node.op_type == "MoE":
        for i in (2, 4):
            w = numpy_helper.to_array(inits[node.input[i]])
            set_input(graph, node, i, w.mean(axis=0, keepdims=True).astype(w.dtype))
        for i in (3, 5):
            if len(node.input) > i and node.input[i]:
                b = numpy_helper.to_array(inits[node.input[i]])
                set_input(graph, node, i, b.mean(axis=0, keepdims=True).astype(b.dtype))
        return
    bits = int(attribute(node, "expert_weight_bits", 8))
    block = int(attribute(node, "block_size", 0))
    for w_i, s_i in ((2, 3), (5, 6)):
        q = numpy_helper.to_array(inits[node.input[w_i]])
        scale = numpy_helper.to_array(inits[node.input[s_i]])
        mean = dequantize_qmoe(q, scale, bits, block).mean(axis=0, keepdims=True)
        q_new, s_new = quantize_qmoe(mean, bits, block, scale.dtype)
        set_input(graph, node, w_i, q_new)
        set_input(graph, node, s_i, s_new)


def _merge_ops(graph: onnx.GraphProto, layer: MoeLayer) -> None:
    """Expert 0's MatMuls get the mean of all experts' weights."""
    inits = initializers(graph)
    if any(m.op_type != "MatMul" for b in layer.branches for m in b.matmuls):
        raise MoechatError(
            "--merge needs float expert weights: this int8 graph of the standard-op lowering "
            "stores them as MatMulNBits (extract one expert, or merge the fp32 package)"
        )
    counts = {len(b.matmuls) for b in layer.branches}
    if counts != {2}:
        raise MoechatError(f"unexpected expert branch: {sorted(counts)} MatMuls, expected 2")
    first = next(b for b in layer.branches if b.expert == 0)
    for j in range(2):
        w = np.mean([numpy_helper.to_array(inits[b.matmuls[j].input[1]]) for b in layer.branches],
                    axis=0)  # fmt: skip
        set_input(graph, first.matmuls[j], 1, w.astype(np.float32))


def extract_graph(model: onnx.ModelProto, expert: int | None) -> int:
    """Rewrite ``model`` in place: expert ``expert`` (None: the mean of all) in every MoE
    layer, weight 1. Returns the number of MoE layers."""
    graph = model.graph
    layers = find_moe_layers(model)
    for layer in layers:
        if expert is not None and not 0 <= expert < layer.num_experts:
            raise MoechatError(
                f"--expert {expert} is out of range: the model has {layer.num_experts} "
                f"routed experts (0..{layer.num_experts - 1})"
            )
    for layer in layers:
        chosen = 0 if expert is None else expert
        if layer.node is not None:
            node = layer.node
            if expert is None:
                _merge_contrib(graph, layer)
            else:
                slice_contrib_experts(graph, layer, [chosen])
            if node.input[1] != layer.router.output[0] and layer.rescale is not None:
                # grouped routers: read the router's single score, drop the rescaling
                node.input[1] = layer.router.output[0]
                rename_uses(graph, layer.rescale.output[0], node.output[0])
            set_attribute(node, "k", 1)
            set_attribute(node, "normalize_routing_weights", 0)
        else:
            if expert is None:
                _merge_ops(graph, layer)
            branch = next(b for b in layer.branches if b.expert == chosen)
            rename_uses(graph, branch.take_x.output[0], layer.x)
            rename_uses(graph, layer.output, branch.unweighted)
        slice_router(graph, layer, [chosen])
    remove_dead_nodes(graph)
    return len(layers)


def extracted_architecture(arch: dict[str, Any]) -> dict[str, Any]:
    """A MoE of one routed expert, 1 active per token, weight 1 (no groups, no scale)."""
    return {
        **arch, "n_routed_experts": 1, "num_experts_per_tok": 1, "norm_topk_prob": False,
        "scoring_func": "softmax", "topk_method": "greedy", "n_group": 1, "topk_group": 1,
        "routed_scaling_factor": 1.0, "score_correction_bias": False,
    }  # fmt: skip


def expert_parameters(arch: dict[str, Any]) -> int:
    """One routed expert's weights plus its router column (SwiGLU: gate, up, down)."""
    return 3 * int(arch["hidden_size"]) * int(arch["intermediate_size"]) + int(arch["hidden_size"])


def run_extract(
    model_dir: str,
    out_dir: str,
    expert: int | None,
    textfile: str | None = None,
    force: bool = False,
    progress=print,
) -> dict[str, Any]:
    """Write the extracted package; returns its moechat.json ``experts`` record."""
    out = Path(out_dir)
    check_outdir(Path(model_dir), out, force)
    text, text_name = eval_text(textfile)
    package, model = open_moe_package(model_dir)
    arch = package.architecture
    layers = extract_graph(model, expert)
    what = "the mean of all routed experts" if expert is None else f"routed expert {expert}"
    progress(f"extracted {what} in {layers} MoE layers")

    def edit(manifest: dict[str, Any]) -> None:
        manifest["architecture"] = extracted_architecture(arch)
        manifest["name"] = f"{package.name}-{'merge' if expert is None else f'expert{expert}'}"
        params = manifest.get("parameters")
        if isinstance(params, dict):
            per = expert_parameters(arch)
            n, k = int(arch["n_routed_experts"]), int(arch["num_experts_per_tok"])
            params["total"] = int(params["total"]) - layers * (n - 1) * per
            params["active_per_token"] = int(params["active_per_token"]) - layers * (k - 1) * (
                per - int(arch["hidden_size"])
            )
        routing = manifest.get("routing")
        if isinstance(routing, dict) and routing.get("correction_bias"):
            routing["correction_bias"] = None  # no choice left to correct
        manifest["experts"] = {
            "extract": {
                "expert": "merge" if expert is None else expert,
                "of": int(arch["n_routed_experts"]),
                "layers": layers,
                "source": package.name,
                "source_top_k": int(arch["num_experts_per_tok"]),
            },
            "text": text_name,
        }

    before, after, _ = write_package(package, model, out, edit, text, progress)
    record = dict(package_record(out))
    progress(
        f"wrote {out}: perplexity {before.value:.3f} (source, {arch['n_routed_experts']} experts "
        f"top-{arch['num_experts_per_tok']}) -> {after.value:.3f} ({what}) on "
        f"{after.tokens} tokens of {text_name}"
    )
    return record


def package_record(out: Path) -> dict[str, Any]:
    from moechat.runtime.package import load_package

    return load_package(out).manifest["experts"]
