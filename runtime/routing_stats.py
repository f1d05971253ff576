"""Statistics of a text's routing, per MoE layer (``moechat experts stats``; numpy only).

From each layer's :class:`~moechat.runtime.routing.Routing` of the same T tokens:
  counts            how often each expert was chosen (sums to T x k)
  mean_weight       its mean weight when chosen (None: never chosen)
  entropy           of the selection shares, in nats; ``balance`` = entropy / ln(E)
                    (1.0: every expert chosen equally often)
  same_as_previous  share of tokens whose expert set equals the one the previous MoE
                    layer chose (expert i of one layer is unrelated to expert i of the
                    next, so this says how often routing repeats by index)
  top_pairs         the expert pairs most often chosen together for one token
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass

import numpy as np

from moechat.runtime.routing import Routing

TOP_PAIRS = 5


@dataclass(frozen=True)
class LayerStats:
    layer: int
    counts: list[int]
    mean_weight: list[float | None]
    entropy: float
    balance: float
    same_as_previous: float | None
    top_pairs: list[tuple[int, int, int]]  # (expert, expert, tokens)


def layer_stats(
    layer: int, routing: Routing, num_experts: int, previous: Routing | None = None
) -> LayerStats:
    experts, weights = routing.experts, routing.weights
    tokens = len(experts)
    flat = experts.ravel()
    counts = np.bincount(flat, minlength=num_experts)
    sums = np.bincount(flat, weights=weights.ravel().astype(np.float64), minlength=num_experts)
    mean = [float(s / c) if c else None for s, c in zip(sums, counts, strict=True)]
    shares = counts[counts > 0] / max(counts.sum(), 1)
    entropy = float(-(shares * np.log(shares)).sum())
    balance = entropy / math.log(num_experts) if num_experts > 1 else 1.0
    same = None
    if previous is not None and tokens:
        same = float((np.sort(experts, -1) == np.sort(previous.experts, -1)).all(-1).mean())
    pairs = np.zeros((num_experts, num_experts), np.int64)
    k = experts.shape[1] if experts.ndim == 2 else 0
    for a in range(k):
        for b in range(a + 1, k):
            lo = np.minimum(experts[:, a], experts[:, b])
            hi = np.maximum(experts[:, a], experts[:, b])
            np.add.at(pairs, (lo, hi), 1)
    order = np.argsort(-pairs, axis=None, kind="stable")[:TOP_PAIRS]
    top = [
        (int(i), int(j), int(pairs[i, j]))
        for i, j in zip(*np.unravel_index(order, pairs.shape), strict=True)
        if pairs[i, j] > 0
    ]
    return LayerStats(
        layer=layer,
        counts=counts.tolist(),
        mean_weight=mean,
        entropy=entropy,
        balance=balance,
        same_as_previous=same,
        top_pairs=top,
    )


def text_stats(layers: list[int], routings: list[Routing], num_experts: int) -> list[LayerStats]:
    """One :class:`LayerStats` per MoE layer (``layers``: their indices)."""
    out: list[LayerStats] = []
    for i, (layer, routing) in enumerate(zip(layers, routings, strict=True)):
        out.append(layer_stats(layer, routing, num_experts, routings[i - 1] if i else None))
    return out


def stats_dict(stats: LayerStats) -> dict:
    d = asdict(stats)
    d["mean_weight"] = [None if w is None else round(w, 6) for w in stats.mean_weight]
    d["entropy"], d["balance"] = round(stats.entropy, 6), round(stats.balance, 6)
    if stats.same_as_previous is not None:
        d["same_as_previous"] = round(stats.same_as_previous, 6)
    d["top_pairs"] = [list(p) for p in stats.top_pairs]
    return d
