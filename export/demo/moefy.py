"""Turn the dense SwiGLU FFNs of a Llama-layout model into MiniMind2-style sparse MoEs.

Each FFN ``down(silu(gate x) * up x)`` is a sum over its ``I`` neurons. The conversion
partitions the neurons: the ``shared_size`` most important ones form the shared expert
(always on), the rest are clustered into ``n_experts`` routed experts of equal size.
A router (a bare ``[E, H]`` weight, as in MiniMind) is fitted per layer on calibration
activations and the top-k experts run per token, with renormalised weights.

Exactness. The routed experts' ``down_proj`` is multiplied by ``top_k``: with equal
routing weights (``1/top_k`` each after renormalisation) a token then gets exactly the
sum of its selected experts. With ``top_k == n_experts`` every expert is selected and
the router is set to zero (equal weights), so the MoE *is* the dense FFN: the
all-experts configuration reproduces the dense model exactly (tested).
:func:`all_experts_view` turns a converted top-k model into that configuration.

Routing. The fitted routers pick, per token, the experts whose outputs are largest
(relative to the token's FFN output); their logits are scaled down to a small spread
(``router_spread``), so the renormalised weights of the selected experts stay close to
``1/top_k`` and the selected experts contribute what they contribute in the dense FFN.

Importance and fitting use per-token relative contributions: a few tokens (the first
of a sequence) carry "massive activations" thousands of times larger than the rest,
which would otherwise decide everything. Neurons that produce such activations always
go to the shared expert.
"""

from __future__ import annotations

import copy
import math
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass

import torch
import torch.nn.functional as F

from moechat.models.config import ModelConfig
from moechat.models.modeling import CausalLM, FeedForward, MoEFeedForward


@dataclass(frozen=True)
class MoefyOptions:
    n_experts: int = 4
    top_k: int = 2
    shared_size: int = 1024
    router_spread: float = 0.02  # std of router logits: weights of selected experts ~ 1/k
    massive_neurons: int = 8  # neurons with the largest peak contributions -> shared
    refit_ridge: float | None = 1.0  # least-squares refit of the down projections; None: off
    kmeans_iters: int = 25
    router: str = "gain"  # least-squares target: "gain" (error reduction) or "norm"
    seed: int = 0

    def to_dict(self) -> dict:
        return asdict(self)


@dataclass
class LayerFit:
    shared: torch.Tensor  # neuron indices
    groups: list[torch.Tensor]  # neuron indices per routed expert
    router: torch.Tensor  # [E, H]
    relative_error: float  # calibration: mean over tokens of |moe - dense|^2 / |dense|^2
    expert_load: list[float]  # share of (token, slot) assignments per expert
    down: torch.Tensor | None = None  # refitted down projection [H, I] (None: the dense one)


def moe_config(cfg: ModelConfig, options: MoefyOptions) -> ModelConfig:
    routed = cfg.intermediate_size - options.shared_size
    if options.shared_size < 0 or routed <= 0 or routed % options.n_experts:
        raise ValueError(
            f"cannot split {cfg.intermediate_size} neurons into a shared expert of "
            f"{options.shared_size} and {options.n_experts} equal routed experts"
        )
    return cfg.with_changes(
        use_moe=True,
        n_routed_experts=options.n_experts,
        num_experts_per_tok=options.top_k,
        n_shared_experts=1 if options.shared_size else 0,
        intermediate_size=routed // options.n_experts,
        shared_intermediate_size=options.shared_size or routed // options.n_experts,
        norm_topk_prob=True,
        scoring_func="softmax",
    )


def ffn_activations(ffn: FeedForward, x: torch.Tensor) -> torch.Tensor:
    """Per-neuron activations silu(gate x) * up x, [N, I]."""
    return F.silu(x @ ffn.gate_proj.weight.t()) * (x @ ffn.up_proj.weight.t())


def balanced_kmeans(features: torch.Tensor, k: int, iters: int, seed: int) -> torch.Tensor:
    """Cluster the rows of ``features`` (unit norm) into ``k`` clusters of equal size."""
    n = features.shape[0]
    cap = n // k
    g = torch.Generator().manual_seed(seed)
    centroids = features[torch.randperm(n, generator=g)[:k]].clone()
    labels = torch.full((n,), -1, dtype=torch.long)
    for _ in range(iters):
        sim = (features @ centroids.t()).flatten()
        order = torch.argsort(sim, descending=True).tolist()
        new = [-1] * n
        count = [0] * k
        left = n
        for idx in order:  # greedy: best (neuron, cluster) pairs first, clusters capped
            j, e = divmod(idx, k)
            if new[j] < 0 and count[e] < cap:
                new[j] = e
                count[e] += 1
                left -= 1
                if not left:
                    break
        new_t = torch.tensor(new)
        if torch.equal(new_t, labels):
            break
        labels = new_t
        centroids = torch.stack([features[labels == e].mean(0) for e in range(k)])
        centroids = centroids / centroids.norm(dim=1, keepdim=True).clamp_min(1e-12)
    return labels


def routing_gates(
    x: torch.Tensor, router: torch.Tensor, top_k: int, scale: float = 1.0
) -> torch.Tensor:
    """[N, E] multipliers of each expert's (unscaled) output: renormalised top-k softmax
    weights times ``scale`` for the selected experts, zero for the others."""
    probs = torch.softmax((x @ router.t()).float(), dim=-1)
    weights, experts = torch.topk(probs, top_k, dim=-1)
    weights = weights / weights.sum(dim=-1, keepdim=True)
    return torch.zeros_like(probs).scatter(1, experts, weights * scale)


def fit_layer(ffn: FeedForward, x: torch.Tensor, options: MoefyOptions) -> LayerFit:
    """Partition one FFN's neurons and fit its router on calibration inputs ``x`` [N, H]."""
    E, k = options.n_experts, options.top_k
    down = ffn.down_proj.weight.detach()
    a = ffn_activations(ffn, x).detach()
    y = a @ down.t()
    # per-token weights: every token counts the same, whatever its output's size
    token_w = 1.0 / y.pow(2).sum(-1).clamp_min(1e-6)
    contrib = a.abs() * down.norm(dim=0)  # |a_j| * |d_j|, [N, I]
    importance = (contrib.pow(2) * token_w[:, None]).mean(0)
    order = torch.argsort(importance, descending=True)
    if options.massive_neurons:
        peaks = torch.argsort(contrib.max(0).values, descending=True)[: options.massive_neurons]
        order = torch.cat([peaks, order[~torch.isin(order, peaks)]])
    shared, rest = order[: options.shared_size], order[options.shared_size :]

    if k == E:  # every expert runs: routing is moot, equal weights make it exact
        groups = list(torch.sort(rest).values.chunk(E))
        router = torch.zeros(E, x.shape[1])
        return LayerFit(shared, groups, router, 0.0, [1.0 / E] * E)

    # cluster the routed neurons by co-activation (per-token relative contributions)
    feats = (contrib[:, rest] * token_w.sqrt()[:, None]).t()
    feats = feats - feats.mean(1, keepdim=True)
    feats = feats / feats.norm(dim=1, keepdim=True).clamp_min(1e-12)
    labels = balanced_kmeans(feats, E, options.kmeans_iters, options.seed)
    groups = [torch.sort(rest[labels == e]).values for e in range(E)]

    outs = torch.stack([a[:, g] @ down[:, g].t() for g in groups], 1)  # [N, E, H]
    router = fit_router(x, outs, token_w, options)
    spread = (x @ router.t()).std().clamp_min(1e-12)
    router = router * (options.router_spread / spread)

    gates = routing_gates(x, router, k, scale=k)
    shared_out = a[:, shared] @ down[:, shared].t()
    moe = shared_out + (outs * gates[..., None]).sum(1)
    err = ((moe - y).pow(2).sum(-1) * token_w).mean().item()
    load = (gates > 0).float().mean(0) / k
    fit = LayerFit(shared, groups, router, err, load.tolist())
    if options.refit_ridge is not None:
        fit.down = refit_down(a, y, down, token_w, gates, fit, options.refit_ridge)
        cols = torch.cat([shared, *groups])
        feats = torch.cat(
            [a[:, shared]] + [a[:, g] * gates[:, e : e + 1] for e, g in enumerate(groups)], 1
        )
        fit.relative_error = (
            ((feats @ fit.down[:, cols].t() - y).pow(2).sum(-1) * token_w).mean().item()
        )
    return fit


def fit_router(
    x: torch.Tensor, outs: torch.Tensor, token_w: torch.Tensor, options: MoefyOptions
) -> torch.Tensor:
    """Router [E, H], least squares from the inputs ``x`` [N, H] onto a per-token score of
    each expert, given the experts' outputs ``outs`` [N, E, H] (relative to the token's
    output size). ``norm``: the size of the expert's output. ``gain``: how much keeping
    the expert reduces the error, ``2<r, e> - |e|^2`` with ``r`` the sum of all routed
    outputs (exact for one kept expert; top-k keeps the k best)."""
    if options.router == "norm":
        score = outs.norm(dim=-1) * token_w.sqrt()[:, None]
    else:
        total = outs.sum(1, keepdim=True)
        score = (2 * (outs * total).sum(-1) - outs.pow(2).sum(-1)) * token_w[:, None]
    target = (score - score.mean(1, keepdim=True)).double()
    return torch.linalg.lstsq(x.double(), target).solution.t().float()


def refit_down(
    a: torch.Tensor, y: torch.Tensor, down: torch.Tensor, token_w: torch.Tensor,
    gates: torch.Tensor, fit: LayerFit, ridge: float,
) -> torch.Tensor:  # fmt: skip
    """Down projections [H, I] refitted by weighted least squares to the dense output,
    given the routing, pulled towards the original weights by a ridge term."""
    cols = torch.cat([fit.shared, *fit.groups])
    feats = torch.cat(
        [a[:, fit.shared]] + [a[:, g] * gates[:, e : e + 1] for e, g in enumerate(fit.groups)], 1
    )
    weighted = feats * token_w[:, None]
    gram = (weighted.t() @ feats).double()
    lam = ridge * gram.diagonal().mean()
    rhs = (weighted.t() @ y).double() + lam * down[:, cols].t().double()
    gram.diagonal().add_(lam)
    solved = torch.linalg.solve(gram, rhs).t().float()  # [H, I] in cols order
    out = down.clone()
    out[:, cols] = solved
    return out


def load_layer(mlp: MoEFeedForward, ffn: FeedForward, fit: LayerFit, top_k: int) -> None:
    """Copy the dense FFN's weights into the MoE layer as partitioned by ``fit``."""
    gate, up = ffn.gate_proj.weight, ffn.up_proj.weight
    down = fit.down if fit.down is not None else ffn.down_proj.weight
    with torch.no_grad():
        mlp.gate.weight.copy_(fit.router)
        if mlp.shared_experts:
            s = mlp.shared_experts[0]
            s.gate_proj.weight.copy_(gate[fit.shared])
            s.up_proj.weight.copy_(up[fit.shared])
            s.down_proj.weight.copy_(down[:, fit.shared])
        for expert, g in zip(mlp.experts, fit.groups, strict=True):
            expert.gate_proj.weight.copy_(gate[g])
            expert.up_proj.weight.copy_(up[g])
            expert.down_proj.weight.copy_(down[:, g] * top_k)


def _layer_inputs(model: CausalLM, h: torch.Tensor, i: int, batch: int) -> torch.Tensor:
    """Run layer ``i``'s attention on hidden states ``h`` [B, S, H] (in place: the
    residual is added) and return the FFN inputs [B, S, H]."""
    layer = model.model.layers[i]
    cfg = model.config
    for s in range(0, h.shape[0], batch):
        hb = h[s : s + batch]
        past = torch.zeros(hb.shape[0], cfg.num_key_value_heads, 0, cfg.head_dim, dtype=h.dtype)
        attn, _, _ = layer.self_attn(
            layer.input_layernorm(hb), None, past, past, model.cos_cache, model.sin_cache
        )
        hb += attn
    return layer.post_attention_layernorm(h)


@torch.no_grad()
def moefy(
    model: CausalLM,
    calibration: torch.Tensor,
    options: MoefyOptions = MoefyOptions(),
    progress: Callable[[str], None] = lambda msg: None,
    batch: int = 8,
) -> tuple[CausalLM, list[LayerFit]]:
    """The MoE version of dense ``model``, fitted layer by layer on ``calibration``
    token ids [B, S]. Each layer's fit sees the inputs that the already converted
    layers produce (errors do not silently compound)."""
    cfg = model.config
    if cfg.use_moe:
        raise ValueError("the model is already a mixture of experts")
    moe = CausalLM(moe_config(cfg, options), max_positions=model.cos_cache.shape[0])
    state = {k: v for k, v in model.state_dict().items() if ".mlp." not in k}
    missing, _ = moe.load_state_dict(state, strict=False)
    assert all(".mlp." in k for k in missing), missing
    moe.eval()
    h = model.model.embed_tokens(calibration).float()
    fits = []
    for i, layer in enumerate(model.model.layers):
        x = _layer_inputs(model, h, i, batch)
        flat = x.reshape(-1, x.shape[-1])
        fit = fit_layer(layer.mlp, flat, options)
        load_layer(moe.model.layers[i].mlp, layer.mlp, fit, options.top_k)
        h += moe.model.layers[i].mlp(x)
        fits.append(fit)
        progress(f"layer {i + 1}/{cfg.num_hidden_layers}: error {fit.relative_error:.4f}")
    return moe, fits


def all_experts_view(moe: CausalLM) -> CausalLM:
    """A copy of a converted model in the all-experts configuration: top-k = E, routers
    zeroed (equal weights 1/E), routed ``down_proj`` rescaled from ``k`` to ``E``.
    For a model from :func:`moefy` this is the dense model's function."""
    cfg = moe.config
    k, E = cfg.num_experts_per_tok, cfg.n_routed_experts
    out = copy.deepcopy(moe)
    out.config = cfg.with_changes(num_experts_per_tok=E)
    with torch.no_grad():
        for layer in out.model.layers:
            mlp = layer.mlp
            mlp.top_k = E
            mlp.gate.weight.zero_()
            for expert in mlp.experts:
                expert.down_proj.weight.mul_(E / k)
            mlp.packed = None
    return out


@torch.no_grad()
def perplexity(
    model: CausalLM, sequences: Sequence[Sequence[int]], batch: int = 4, nll: bool = False
) -> float:
    """Teacher-forced perplexity (or with ``nll`` the summed negative log-likelihood),
    each sequence scored from its own start."""
    total, count = 0.0, 0
    for s in range(0, len(sequences), batch):
        group = sequences[s : s + batch]
        for seq in group:  # sequences may differ in length: one at a time
            ids = torch.tensor([list(seq)])
            logits, _ = model.step(ids, model.empty_cache())
            total += F.cross_entropy(logits[0, :-1].float(), ids[0, 1:], reduction="sum").item()
            count += ids.shape[1] - 1
    return total if nll else math.exp(total / max(count, 1))
