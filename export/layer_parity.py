"""Parity without the model in memory: PyTorch one layer at a time vs the written graph.

The streamed export (export/streamed.py) never holds the model. Its parity check runs
the prompts through PyTorch layer by layer — each :class:`DecoderLayer` built on the
meta device and given that layer's weights from the memory-mapped shards, then dropped
— and compares what every layer computes with the graph's own outputs for the same
prompts: the KV cache a layer writes (``present.{i}.*``, from the hidden state that
enters layer i), the router logits of each MoE layer (``router_logits.{i}``, after its
attention) and the logits. The first probe off by more than the tolerance names the
layer whose weights differ (tests/export/test_streamed_package.py corrupts one).
Prefill only: the cache path is the whole-model path's, whose graph bytes are equal
(tests/export/test_streamed_export.py) and whose parity covers decoding.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import onnx
import torch

from moechat.export.graph_pieces import PromptOutputs, run_by_layer
from moechat.export.int8.fidelity import FidelityReport, same_topk
from moechat.export.lazy_weights import PackedExperts, Recipe, Source, row_blocks
from moechat.export.parity import ParityReport, check_finite
from moechat.export.streamed import packed_experts
from moechat.models.modeling import DecoderLayer, MoEFeedForward, RMSNorm, model_rope_caches
from moechat.models.streaming import StreamedCheckpoint
from moechat.runtime.errors import MoechatError
from moechat.runtime.evaluate import log_softmax
from moechat.runtime.routing import moe_layers, output_name

METRIC_ROWS = 32  # positions whose log-softmax is computed at once
LOGIT_ROWS = 128  # positions whose logits are held at once (both sides)


@dataclass
class LayerParity:
    report: ParityReport
    probes: dict[str, float] = field(default_factory=dict)  # probe -> max |Δ| / its scale

    def to_dict(self) -> dict:
        worst = max(self.probes.values(), default=0.0)
        return {
            **self.report.to_dict(),
            "method": "PyTorch layer by layer vs the graph's outputs (prefill)",
            "worst_layer_probe": worst,
        }


def _layer(ckpt: StreamedCheckpoint, index: int) -> DecoderLayer:
    """Layer ``index`` with its weights; routed experts read from the shards when they run."""
    with torch.device("meta"):
        layer = DecoderLayer(ckpt.config, index)
    state = {k: torch.from_numpy(v) for k, v in _layer_state(ckpt, index) if ".experts." not in k}
    missing, unexpected = layer.load_state_dict(state, strict=False, assign=True)
    if unexpected or any(".experts." not in k for k in missing):
        raise MoechatError(f"layer {index}: weights do not match ({(missing + unexpected)[:3]})")
    if isinstance(layer.mlp, MoEFeedForward):
        fc1, fc2 = (
            _ShardExperts(packed_experts(ckpt, index, fc), ckpt.release) for fc in ("fc1", "fc2")
        )
        if layer.mlp.grouped_routing:  # DeepSeek's router op takes whole tensors
            layer.mlp.packed = (fc1.stacked(), fc2.stacked())
        else:
            layer.mlp.streamed = (fc1, fc2)
    ckpt.release()
    return layer.eval()


@dataclass
class _ShardExperts:
    """One layer's packed routed experts (fc1 or fc2), one expert at a time from the shards:
    a layer's experts in float32 are 2.1 GB at Qwen1.5-MoE's shape, one expert 35 MB.
    The values are the packed layout's (bf16/fp16 -> float32 is exact)."""

    recipe: PackedExperts
    release: Callable[[], None]

    def __len__(self) -> int:
        return self.recipe.shape[0]

    def __getitem__(self, expert: int) -> torch.Tensor:
        weight = torch.from_numpy(self.recipe.rows(expert, expert + 1)[0])
        self.release()  # the shard's pages leave the resident set
        return weight

    def stacked(self) -> torch.Tensor:
        return torch.from_numpy(_filled(self.recipe, self.release))


def _filled(recipe: Recipe, release: Callable[[], None]) -> np.ndarray:
    """The recipe's values in one array, filled block by block (never twice in memory;
    the shards' pages released after each block)."""
    out = np.empty(recipe.shape, recipe.dtype)
    start = 0
    for block in row_blocks(recipe):
        out[start : start + len(block)] = block
        start += len(block)
        release()
    return out


def _layer_state(ckpt: StreamedCheckpoint, index: int) -> Iterator[tuple[str, np.ndarray]]:
    prefix = f"model.layers.{index}."
    for name in ckpt.keys:
        if name.startswith(prefix) and ".experts." not in name:
            yield name[len(prefix) :], ckpt.tensor(name).numpy()


def _embed(ckpt: StreamedCheckpoint, ids: list[int]) -> torch.Tensor:
    rows = [ckpt.read("model.embed_tokens.weight", (slice(i, i + 1),)) for i in ids]
    return torch.cat(rows)[None] * ckpt.config.embedding_multiplier


@torch.no_grad()
def torch_probes(
    ckpt: StreamedCheckpoint,
    prompts: list[list[int]],
    presents: bool = True,
    progress: Callable[[str], None] = lambda msg: None,
) -> Iterator[PromptOutputs]:
    """Per prompt: every layer's present key/value (``presents``) and router logits, and
    its logits on demand (the final norm's output kept, the lm_head read block by block
    from the shards at each call)."""
    cfg = ckpt.config
    cos, sin = model_rope_caches(cfg, ckpt.model.cos_cache.shape[0])
    hidden = [_embed(ckpt, p) for p in prompts]
    probes: list[dict[str, np.ndarray]] = [{} for _ in prompts]
    empty = [
        torch.zeros(1, cfg.num_key_value_heads, 0, d) for d in (cfg.head_dim, cfg.value_head_dim)
    ]
    start = time.perf_counter()
    for i in range(cfg.num_hidden_layers):
        if i:
            elapsed = time.perf_counter() - start
            eta = elapsed / i * (cfg.num_hidden_layers - i)
            progress(f"PyTorch reference: layer {i + 1}/{cfg.num_hidden_layers}, ETA {eta:.0f}s")
        layer = _layer(ckpt, i)
        routed: list[torch.Tensor] = []
        if isinstance(layer.mlp, MoEFeedForward):
            layer.mlp.gate.register_forward_hook(lambda m, a, out, kept=routed: kept.append(out))
        for n, x in enumerate(hidden):
            mask = torch.ones(1, x.shape[1], dtype=torch.long)
            hidden[n], pk, pv = layer(x, mask, *empty, cos, sin)
            if presents:
                probes[n][f"present.{i}.key"], probes[n][f"present.{i}.value"] = (
                    pk.numpy(),
                    pv.numpy(),
                )
            if routed:
                probes[n][output_name(i)] = routed.pop().numpy()
        del layer
    norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
    norm.weight.data = ckpt.tensor("model.norm.weight")
    head = Source("lm_head.weight", ckpt.shapes["lm_head.weight"], ckpt.read)

    def logits_of(h: torch.Tensor) -> Callable[[np.ndarray], np.ndarray]:
        @torch.no_grad()
        def at(positions: np.ndarray) -> np.ndarray:
            rows = h[torch.from_numpy(positions)]
            out = np.empty((len(rows), cfg.vocab_size), np.float32)
            start = 0
            for w in row_blocks(head):
                out[:, start : start + len(w)] = (rows @ torch.from_numpy(w).T).numpy()
                start += len(w)
                ckpt.release()  # the head's pages leave the resident set
            out /= cfg.logits_scaling
            return out

        return at

    for n, found in enumerate(probes):
        yield PromptOutputs(dict(found), logits_of(norm(hidden[n])[0]))
        found.clear()
        hidden[n] = torch.empty(0)


def logit_blocks(
    ref: PromptOutputs, got: PromptOutputs, count: int
) -> Iterator[tuple[int, np.ndarray, np.ndarray]]:
    """(first position, reference logits, graph logits) for positions 0..count-1,
    LOGIT_ROWS positions at a time."""
    for a in range(0, count, LOGIT_ROWS):
        positions = np.arange(a, min(a + LOGIT_ROWS, count), dtype=np.int64)
        yield a, ref.logits(positions), got.logits(positions)


def graph_probes(
    graph: Path, ckpt: StreamedCheckpoint, prompts: list[list[int]], names: list[str]
) -> Iterator[PromptOutputs]:
    """Per prompt, ``names`` (those the graph outputs) from onnxruntime, the graph run one
    layer at a time (export/graph_pieces.py: one layer's weights loaded at once)."""
    cfg = ckpt.config
    outputs = {o.name for o in onnx.load(str(graph), load_external_data=False).graph.output}
    names = [n for n in names if n in outputs]
    feeds = []
    for prompt in prompts:
        n = len(prompt)
        feed = {
            "input_ids": np.array([prompt], np.int64),
            "attention_mask": np.ones((1, n), np.int64),
            "logits_positions": np.arange(n, dtype=np.int64),
        }
        for i in range(cfg.num_hidden_layers):
            for kind, d in (("key", cfg.head_dim), ("value", cfg.value_head_dim)):
                feed[f"past_key_values.{i}.{kind}"] = np.zeros(
                    (1, cfg.num_key_value_heads, 0, d), np.float32
                )
        feeds.append(feed)
    return run_by_layer(graph, cfg.num_hidden_layers, feeds, names)


def _blame(probe: str, layers: int) -> str:
    """Where a probe that differs points: the weights computed before it, after the last
    probe that matched."""
    if probe == "logits":
        return f"layer {layers - 1}'s feed-forward, the final norm or the lm_head"
    i = int(probe.split(".")[1])
    if probe.startswith("router_logits"):
        return f"layer {i}'s attention (query/output projections), its post-attention norm or its router"
    before = f"layer {i - 1}'s feed-forward, or " if i else "the embedding, or "
    return f"{before}layer {i}'s input norm or key/value projections"


def check_layers(
    ckpt: StreamedCheckpoint,
    graph: Path,
    prompts: list[list[int]],
    tolerance: float,
    progress: Callable[[str], None] = lambda msg: None,
) -> LayerParity:
    """Compare layer by layer; raise naming the first layer that differs."""
    cfg = ckpt.config
    order = []
    for i in range(cfg.num_hidden_layers):
        order += [f"present.{i}.key", f"present.{i}.value"]
        order += [output_name(i)] if i in moe_layers(cfg.to_dict()) else []
    order.append("logits")
    diff_of: dict[str, float] = {}
    scale_of: dict[str, float] = {}

    def seen(name: str, r: np.ndarray, g: np.ndarray) -> None:
        check_finite(r, g)
        diff_of[name] = max(diff_of.get(name, 0.0), float(np.abs(r - g).max()))
        scale_of[name] = max(scale_of.get(name, 0.0), float(np.abs(r).max()))

    greedy = True
    pairs = zip(
        torch_probes(ckpt, prompts, progress=progress),
        graph_probes(graph, ckpt, prompts, order),
        prompts,
        strict=True,
    )
    for ref, got, prompt in pairs:
        for name in order[:-1]:
            if name in got.values:
                seen(name, ref.values[name], got.values[name])
        for first, r, g in logit_blocks(ref, got, len(prompt)):
            seen("logits", r, g)
            if first + len(r) == len(prompt):
                greedy = greedy and int(r[-1].argmax()) == int(g[-1].argmax())
    diffs: dict[str, float] = {}
    for name in [x for x in order if x in diff_of]:
        diff, scale = diff_of[name], scale_of[name]
        diffs[name] = diff / max(scale, 1e-9)
        if diffs[name] > tolerance:
            raise MoechatError(
                f"parity check failed at {name}: max |Δ| {diff:.3g} is {diffs[name]:.2g} of its "
                f"scale {scale:.3g} (limit {tolerance}); the weights of "
                f"{_blame(name, cfg.num_hidden_layers)} differ from the checkpoint"
            )
    diff, scale = diff_of["logits"], scale_of["logits"]
    tokens = sum(len(p) for p in prompts)
    report = ParityReport(diff, scale, diff / max(scale, 1e-9), greedy, len(prompts), tokens, 0)
    return LayerParity(report, diffs)


def measure_fidelity_layerwise(
    ckpt: StreamedCheckpoint,
    graph: Path,
    token_ids: list[int],
    text_name: str,
    window: int,
    progress: Callable[[str], None] = lambda msg: None,
) -> FidelityReport:
    """The quantised graph against PyTorch fp32 (layer by layer) on held-out text: each
    window of ``window`` tokens is one prefill in both; the metrics of
    export/int8/fidelity.py over every position that predicts a next token."""
    cfg = ckpt.config
    windows = [token_ids[s : s + window] for s in range(0, len(token_ids), window)]
    windows = [w for w in windows if len(w) > 1]
    if not windows:
        raise ValueError("fidelity needs at least 2 held-out tokens")
    routers = [output_name(i) for i in moe_layers(cfg.to_dict())]
    top_k = cfg.num_experts_per_tok
    agree = scored = 0
    kl = nll_ref = nll_q = 0.0
    route_same = np.zeros(len(routers))
    route_tokens = 0
    pairs = zip(
        torch_probes(ckpt, windows, presents=False, progress=progress),
        graph_probes(graph, ckpt, windows, routers),
        windows,
        strict=True,
    )
    for ref, got, ids in pairs:
        n = len(ids) - 1
        for first, ref_rows, got_rows in logit_blocks(ref, got, n):
            for name, logits in (("fp32", ref_rows), ("quantised", got_rows)):
                if not np.isfinite(logits).all():
                    raise MoechatError(f"the {name} model computed non-finite logits")
            for a in range(0, len(ref_rows), METRIC_ROWS):  # log-softmax: a few rows at a time
                b = min(a + METRIC_ROWS, len(ref_rows))
                pr, pq = log_softmax(ref_rows[a:b]), log_softmax(got_rows[a:b])
                target = np.asarray(ids[first + a + 1 : first + b + 1])
                rows = np.arange(b - a)
                nll_ref -= float(pr[rows, target].sum())
                nll_q -= float(pq[rows, target].sum())
                kl += float((np.exp(pr) * (pr - pq)).sum())
                agree += int((pr.argmax(-1) == pq.argmax(-1)).sum())
        scored += n
        for i, name in enumerate(routers):
            route_same[i] += same_topk(
                ref.values[name], got.values[name].reshape(len(ids), -1), top_k
            ).sum()
        route_tokens += len(ids)
    per_layer = (route_same / max(route_tokens, 1)).tolist()
    ppl_ref, ppl_q = math.exp(nll_ref / scored), math.exp(nll_q / scored)
    return FidelityReport(
        text=text_name, tokens=scored, top1_agreement=agree / scored,
        mean_kl=max(kl / scored, 0.0), perplexity_fp32=ppl_ref, perplexity_int8=ppl_q,
        perplexity_ratio=ppl_q / ppl_ref,
        routing_agreement=float(np.mean(per_layer)) if per_layer else None,
        routing_agreement_per_layer=per_layer,
    )  # fmt: skip
