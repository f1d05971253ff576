"""``moechat experts prune``: keep the N most useful routed experts of every MoE layer.

Usefulness is REAP-style, measured on calibration text (default
export/data/calibration.txt; perplexity is measured on export/data/heldout.txt): for each expert, how often it is
chosen (share of tokens) x its mean routing weight when chosen x the mean norm of its
output on those tokens. The routing comes from the graph's router logits through the
family's own rule (runtime/routing.py); the outputs from the expert weights (contrib
MoE / QMoE: fp32 or dequantised, on the layer's FFN input, which the calibration run
fetches as an extra graph output) or, in the standard-op lowering, straight from each
expert branch's output. Each layer keeps its own best N (an expert kept in one layer may
be dropped in another), in their original order.

The rewrite (export/experts/moe_graph.py): the router keeps the kept experts' columns;
MoE / QMoE nodes keep their rows of every expert tensor; standard-op graphs lose the
dropped experts' branches and the kept ones read their new column. ``k`` stays: N must be
at least the trained top-k. DeepSeek's group-limited and noaux_tc routers choose within
contiguous groups of experts: N must then be a multiple of ``n_group``, each group keeps
its best N / n_group, and the group shapes and noaux_tc's correction bias (graph and
moechat.json) follow (export/experts/grouped.py).
"""

from __future__ import annotations

import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import onnx
from onnx import helper, numpy_helper
from onnx.external_data_helper import load_external_data_for_model

from moechat.export.experts.grouped import keep_per_group, prune_grouped_router, valid_keeps
from moechat.export.experts.moe_graph import (
    MoeLayer,
    find_moe_layers,
    remove_dead_nodes,
    rename_uses,
    replace_initializer,
    slice_contrib_experts,
    slice_router,
)
from moechat.export.experts.package_io import (
    CALIBRATION,
    check_outdir,
    eval_text,
    open_moe_package,
    write_package,
)
from moechat.export.experts.qmoe_weights import dequantize_qmoe
from moechat.export.graph_rewrites import attribute, initializers
from moechat.export.onnx_graph import save_model
from moechat.runtime.errors import MoechatError
from moechat.runtime.package import ModelPackage
from moechat.runtime.providers import create_session
from moechat.runtime.routing import RouterSpec, moe_layers, route

CALIBRATION_TOKENS = 4096  # enough for stable frequencies on small models, seconds to run
WINDOW = 256


@dataclass
class LayerScores:
    frequency: np.ndarray  # [E] share of tokens that chose each expert
    weight: np.ndarray  # [E] mean routing weight when chosen
    norm: np.ndarray  # [E] mean output norm when chosen

    @property
    def score(self) -> np.ndarray:
        return self.frequency * self.weight * self.norm


def _silu(x: np.ndarray) -> np.ndarray:
    return x / (1.0 + np.exp(-x))


def _contrib_weights(graph: onnx.GraphProto, layer: MoeLayer) -> tuple[np.ndarray, np.ndarray]:
    """fc1 [E, 2I, H] (gate/up rows interleaved) and fc2 [E, H, I] as float32."""
    node = layer.node
    assert node is not None
    inits = initializers(graph)

    def arr(i: int) -> np.ndarray:
        return numpy_helper.to_array(inits[node.input[i]])

    if node.op_type == "MoE":
        return arr(2).astype(np.float32), arr(4).astype(np.float32)
    bits = int(attribute(node, "expert_weight_bits", 8))
    block = int(attribute(node, "block_size", 0))
    return dequantize_qmoe(arr(2), arr(3), bits, block), dequantize_qmoe(
        arr(5), arr(6), bits, block
    )


def _expert_norms(x: np.ndarray, fc1: np.ndarray, fc2: np.ndarray) -> np.ndarray:
    """||SwiGLU expert(x)|| per token, x [n, H], one expert's fc1 [2I, H], fc2 [H, I]."""
    h = x @ fc1.T
    y = (_silu(h[:, 0::2]) * h[:, 1::2]) @ fc2.T
    return np.linalg.norm(y, axis=-1)


def _calibration_outputs(layers: list[MoeLayer]) -> list[str]:
    names = []
    for layer in layers:
        names.append(layer.router.output[0])
        if layer.node is not None:
            names.append(layer.x)
        else:
            names.extend(b.unweighted for b in layer.branches)
    return names


def score_experts(
    package: ModelPackage,
    model: onnx.ModelProto,
    layers: list[MoeLayer],
    text: str,
    max_tokens: int = CALIBRATION_TOKENS,
) -> tuple[list[LayerScores], int]:
    """Run the calibration text through the graph (with the routing tensors as extra
    outputs) and score every expert of every layer; returns the scores and tokens used."""
    from moechat.runtime.tokenizer import TextTokenizer

    arch = package.architecture
    spec = RouterSpec.from_arch(arch)
    tokenizer = TextTokenizer.from_file(package.tokenizer_path)
    ids = tokenizer.encode_text(text)[:max_tokens]
    if len(ids) < 16:
        raise MoechatError(f"the calibration text is {len(ids)} tokens: at least 16 are needed")
    graph = model.graph
    names = _calibration_outputs(layers)
    existing = {o.name for o in graph.output}
    added = [n for n in dict.fromkeys(names) if n not in existing]
    graph.output.extend(helper.make_empty_tensor_value_info(n) for n in added)
    bias = (package.manifest.get("routing") or {}).get("correction_bias") or {}
    try:
        with tempfile.TemporaryDirectory() as tmp:
            path = Path(tmp) / "calibration.onnx"
            save_model(model, path)
            # saving moved the weights out of the proto into the file: read them back
            load_external_data_for_model(model, tmp)
            session = create_session(path, "CPUExecutionProvider")
            fetched: list[list[np.ndarray]] = [[] for _ in names]
            for start in range(0, len(ids), WINDOW):
                outs = _run_window(session, ids[start : start + WINDOW], names)
                for bucket, out in zip(fetched, outs, strict=True):
                    bucket.append(np.asarray(out))
            del session
    finally:
        del graph.output[len(graph.output) - len(added) :]
    tokens = len(ids)
    scores, at = [], 0
    moe_ids = moe_layers(arch)
    for index, layer in enumerate(layers):
        logits = np.concatenate([a.reshape(-1, layer.num_experts) for a in fetched[at]])
        at += 1
        routing = route(logits, spec, _bias(bias, moe_ids, index))
        e = layer.num_experts
        freq, mean_w, norm = np.zeros(e), np.zeros(e), np.zeros(e)
        if layer.node is not None:
            x = np.concatenate([a.reshape(-1, a.shape[-1]) for a in fetched[at]])
            at += 1
            fc1, fc2 = _contrib_weights(graph, layer)
        for expert in range(e):
            rows, ranks = np.nonzero(routing.experts == expert)
            if not len(rows):
                continue
            freq[expert] = len(rows) / tokens
            mean_w[expert] = float(np.abs(routing.weights[rows, ranks]).mean())
            if layer.node is not None:
                norm[expert] = float(_expert_norms(x[rows], fc1[expert], fc2[expert]).mean())
        if layer.node is None:
            for branch in layer.branches:
                y = np.concatenate([a.reshape(-1, a.shape[-1]) for a in fetched[at]])
                at += 1
                if len(y):
                    norm[branch.expert] = float(np.linalg.norm(y, axis=-1).mean())
        scores.append(LayerScores(freq, mean_w, norm))
    return scores, tokens


def _run_window(session: Any, ids: list[int], names: list[str]) -> list[np.ndarray]:
    """One window of tokens on an empty cache; returns the ``names`` outputs."""
    feeds: dict[str, np.ndarray] = {
        "input_ids": np.asarray([ids], dtype=np.int64),
        "attention_mask": np.ones((1, len(ids)), dtype=np.int64),
        "logits_positions": np.asarray([len(ids) - 1], dtype=np.int64),
    }
    for i in session.get_inputs():
        if i.name.startswith("past_key_values."):
            dtype = np.float16 if i.type == "tensor(float16)" else np.float32
            feeds[i.name] = np.zeros((1, i.shape[1], 0, i.shape[3]), dtype=dtype)
    return list(session.run(names, feeds))


def _bias(bias: dict, moe_ids: list[int], index: int) -> np.ndarray | None:
    values = bias.get(str(moe_ids[index])) if index < len(moe_ids) else None
    return None if values is None else np.asarray(values, dtype=np.float32)


def prune_graph(
    model: onnx.ModelProto,
    layers: list[MoeLayer],
    keep: list[list[int]],
    arch: dict[str, Any] | None = None,
) -> None:
    """Keep experts ``keep[i]`` (ascending) in layer i, in place; ``arch``: the source's
    architecture (grouped routers need their group shapes rewritten)."""
    graph = model.graph
    method = (arch or {}).get("topk_method", "greedy")
    for layer, kept in zip(layers, keep, strict=True):
        if method != "greedy":
            assert arch is not None
            n_group = int(arch["n_group"])
            prune_grouped_router(graph, layer, kept, n_group, bias=method == "noaux_tc")
        if layer.node is not None:
            slice_contrib_experts(graph, layer, kept)
        else:
            position = {e: j for j, e in enumerate(kept)}
            for branch in layer.branches:
                if branch.expert not in position:
                    rename_uses(graph, branch.add.output[0], branch.previous)
                elif position[branch.expert] != branch.expert:
                    index = np.array(position[branch.expert], dtype=np.int64)
                    branch.gather.input[1] = replace_initializer(
                        graph, branch.gather.input[1], index
                    )
        slice_router(graph, layer, kept)
    remove_dead_nodes(graph)


def run_prune(
    model_dir: str,
    out_dir: str,
    keep: int,
    calibration: str | None = None,
    textfile: str | None = None,
    force: bool = False,
    progress=print,
) -> dict[str, Any]:
    """Write the pruned package; returns its moechat.json ``experts`` record."""
    out = Path(out_dir)
    check_outdir(Path(model_dir), out, force)
    calib_text, calib_name = eval_text(calibration, CALIBRATION)
    text, text_name = eval_text(textfile)
    package, model = open_moe_package(model_dir)
    arch = package.architecture
    num, top_k = int(arch["n_routed_experts"]), int(arch["num_experts_per_tok"])
    if not top_k <= keep <= num:
        raise MoechatError(
            f"--keep must be between the experts per token ({top_k}) and the routed experts "
            f"({num}); got {keep}"
        )
    grouped = arch.get("topk_method", "greedy") != "greedy"
    if grouped and keep not in valid_keeps(arch):
        raise MoechatError(
            f"--keep must keep as many experts in each of the {arch['n_group']} expert groups "
            f"of {arch['topk_method']} routing (at least "
            f"{2 if arch['topk_method'] == 'noaux_tc' else 1} per group, top-{top_k} within "
            f"{arch['topk_group']} groups): one of {valid_keeps(arch)}; got {keep}"
        )
    layers = find_moe_layers(model)
    progress(f"scoring {num} experts in {len(layers)} MoE layers on {calib_name}")
    scores, tokens = score_experts(package, model, layers, calib_text)
    keep_sets = []
    for s in scores:
        if grouped:
            keep_sets.append(keep_per_group(s.score, int(arch["n_group"]), keep))
            continue
        order = np.argsort(-s.score, kind="stable")  # ties: the lower index stays
        keep_sets.append(sorted(int(e) for e in order[:keep]))
    moe_ids = moe_layers(arch)
    prune_graph(model, layers, keep_sets, arch)

    def edit(manifest: dict[str, Any]) -> None:
        manifest["architecture"] = {**arch, "n_routed_experts": keep}
        bias = (manifest.get("routing") or {}).get("correction_bias")
        if bias:  # noaux_tc: each layer's recorded bias loses the dropped experts
            kept_by_layer = {str(i): k for i, k in zip(moe_ids, keep_sets, strict=True)}
            for layer, values in bias.items():
                bias[layer] = [values[e] for e in kept_by_layer[layer]]
        manifest["name"] = f"{package.name}-keep{keep}"
        params = manifest.get("parameters")
        if isinstance(params, dict):
            from moechat.export.experts.extract import expert_parameters

            params["total"] = int(params["total"]) - len(layers) * (num - keep) * expert_parameters(
                arch
            )
        manifest["experts"] = {
            "prune": {
                "keep": keep, "of": num, "source": package.name,
                "calibration": calib_name, "calibration_tokens": tokens,
                "score": "frequency x mean weight x mean output norm",
                "kept": {str(i): k for i, k in zip(moe_ids, keep_sets, strict=True)},
                "dropped": {
                    str(i): [e for e in range(num) if e not in k]
                    for i, k in zip(moe_ids, keep_sets, strict=True)
                },
                "scores": {
                    str(i): [round(float(v), 6) for v in s.score]
                    for i, s in zip(moe_ids, scores, strict=True)
                },
            },
            "text": text_name,
        }  # fmt: skip

    before, after, sizes = write_package(package, model, out, edit, text, progress)
    progress(
        f"wrote {out}: {keep} of {num} routed experts per layer; {sizes['before'] / 1e6:.2f} MB "
        f"-> {sizes['after'] / 1e6:.2f} MB; perplexity {before.value:.3f} -> {after.value:.3f} "
        f"on {after.tokens} tokens of {text_name}"
    )
    from moechat.runtime.package import load_package

    return load_package(out).manifest["experts"]
