"""DeepSeek-V2/V3: multi-head latent attention (MLA) and their routers.

MLA as transformers' deepseek_v2 / deepseek_v3 compute it: the query from ``q_proj``
(or ``q_a_proj`` -> RMSNorm -> ``q_b_proj``), ``kv_a_proj_with_mqa`` -> [latent | rope
key]; the latent is RMS-normed and cached, the rope key (one for all heads) is rotated
and cached; ``kv_b_proj`` rebuilds each head's k_nope and v from the latent. The KV
cache of a layer is then ("key" = latent [B, 1, S, kv_lora_rank], "value" = rope key
[B, 1, S, qk_rope_head_dim]), kv_lora_rank + qk_rope_head_dim values per token instead
of 2 x heads x head size.

Two exact forms of the same attention, both in standard ONNX ops:
- ``decompress``: kv_b_proj applied to every cached latent, then ordinary attention;
- ``absorb``: kv_b_proj's k part folded into the query (scores against the latent
  itself) and its v part applied after the softmax-weighted sum of latents (the weight
  absorption of the DeepSeek-V2 paper): per step it costs heads x cached x
  (kv_lora_rank + rope) instead of decompressing every cached token.
docs/benchmarks.md has both measured; :data:`DEFAULT_FORM` is the faster one.

RoPE: checkpoints lay the rotary dimensions out in interleaved pairs (x0, x1), (x2,
x3)... (V2's complex rotation, V3's ``rope_interleave``). Attention only needs q.k, which
is the same for any common permutation of q and k, so :func:`deinterleave_rope_rows`
permutes those rows of the projections once at load time to the rotate-half layout.

Routers (``moechat::moe_grouped``): softmax or sigmoid scores; V2 ``greedy`` and
``group_limited_greedy`` (group score = its best expert), V3 ``noaux_tc`` (the correction
bias is added for the choice only; group score = the sum of its best two); ``topk_group``
groups kept; weights are the unbiased scores of the chosen experts, renormalised when
asked, times ``routed_scaling_factor``.
"""

from __future__ import annotations

import math
import re
from typing import Literal

import torch
from torch import nn

from moechat.models import ops
from moechat.models.config import ModelConfig

MLAForm = Literal["absorb", "decompress"]
DEFAULT_FORM: MLAForm = "absorb"


# -- routing ------------------------------------------------------------------------


def route_grouped(
    router_logits: torch.Tensor,
    bias: torch.Tensor,
    top_k: int,
    scoring: str,
    topk_method: str,
    n_group: int,
    topk_group: int,
    normalize: bool,
    scale: float,
) -> tuple[torch.Tensor, torch.Tensor]:
    """(weights [T, k], experts [T, k]) as transformers' DeepSeek-V2/V3 routers pick them."""
    logits = router_logits.float()
    scores = torch.softmax(logits, dim=-1) if scoring == "softmax" else torch.sigmoid(logits)
    choice = scores + bias.float() if topk_method == "noaux_tc" else scores
    if topk_method != "greedy":
        t, e = choice.shape
        grouped = choice.view(t, n_group, e // n_group)
        if topk_method == "noaux_tc":
            group_scores = grouped.topk(2, dim=-1)[0].sum(dim=-1)
        else:
            group_scores = grouped.max(dim=-1).values
        keep = torch.topk(group_scores, k=topk_group, dim=-1)[1]
        mask = torch.zeros_like(group_scores).scatter(1, keep, 1.0)
        mask = mask[:, :, None].expand(t, n_group, e // n_group).reshape(t, e).bool()
        fill = float("-inf") if topk_method == "noaux_tc" else 0.0
        choice = choice.masked_fill(~mask, fill)
    experts = torch.topk(choice, k=top_k, dim=-1)[1]
    weights = scores.gather(1, experts)
    if normalize:
        weights = weights / (weights.sum(dim=-1, keepdim=True) + 1e-20)
    return weights * scale, experts


@torch.library.custom_op("moechat::moe_grouped", mutates_args=())
def moe_grouped(
    x: torch.Tensor,
    router_logits: torch.Tensor,
    bias: torch.Tensor,
    fc1: torch.Tensor,
    fc2: torch.Tensor,
    top_k: int,
    scoring: str,
    topk_method: str,
    n_group: int,
    topk_group: int,
    normalize: bool,
    scale: float,
) -> torch.Tensor:
    """Routed SwiGLU experts (layout of ``moechat::moe_routed``) behind a DeepSeek router."""
    weights, experts = route_grouped(
        router_logits, bias, top_k, scoring, topk_method, n_group, topk_group, normalize, scale
    )
    return ops.run_experts(x, weights, experts, fc1, fc2)


@moe_grouped.register_fake
def _(x, router_logits, bias, fc1, fc2, top_k, scoring, topk_method, n_group, topk_group,
      normalize, scale):  # fmt: skip
    return torch.empty_like(x)


# -- attention ----------------------------------------------------------------------


def rope_permutation(dim: int) -> torch.Tensor:
    """Interleaved pairs -> rotate-half layout: evens first, then odds."""
    return torch.cat((torch.arange(0, dim, 2), torch.arange(1, dim, 2)))


def rope_row_order(key: str, cfg: ModelConfig) -> torch.Tensor | None:
    """The rows of weight ``key`` in the rotate-half layout (None: it keeps its rows):
    q_proj / q_b_proj have their rope rows permuted per head, kv_a_proj_with_mqa after the
    latent's."""
    rope, nope, lora = cfg.qk_rope_head_dim, cfg.qk_nope_head_dim, cfg.kv_lora_rank
    perm = rope_permutation(rope)
    if key.endswith(("self_attn.q_proj.weight", "self_attn.q_b_proj.weight")):
        head = nope + rope
        return torch.cat(
            [torch.cat((torch.arange(h * head, h * head + nope), h * head + nope + perm))
             for h in range(cfg.num_attention_heads)]
        )  # fmt: skip
    if key.endswith(("self_attn.kv_a_proj_with_mqa.weight", "kv_a_proj_with_mqa.bias")):
        return torch.cat((torch.arange(lora), lora + perm))
    return None


def deinterleave_rope_rows(
    state: dict[str, torch.Tensor], cfg: ModelConfig
) -> dict[str, torch.Tensor]:
    """Permute the rope rows of q_proj / q_b_proj (per head) and kv_a_proj_with_mqa."""
    out = dict(state)
    for key, tensor in state.items():
        order = rope_row_order(key, cfg)
        if order is not None:
            out[key] = tensor[order].contiguous()
    return out


def beyond_last_layer(key: str, cfg: ModelConfig) -> bool:
    """A weight of a layer past num_hidden_layers (V3's multi-token-prediction layer)."""
    return bool((m := _LAYER.match(key)) and int(m[1]) >= cfg.num_hidden_layers)


def prepare_mla_state(state: dict[str, torch.Tensor], cfg: ModelConfig) -> dict[str, torch.Tensor]:
    """Drop layers past num_hidden_layers (V3's multi-token-prediction layer, which a chat
    never runs) and bring interleaved rope rows to the rotate-half layout."""
    state = {k: v for k, v in state.items() if not beyond_last_layer(k, cfg)}
    return deinterleave_rope_rows(state, cfg) if cfg.rope_interleave else state


_LAYER = re.compile(r"^model\.layers\.(\d+)\.")


def yarn_mscale(scale: float, mscale: float = 1.0) -> float:
    return 1.0 if scale <= 1 else 0.1 * mscale * math.log(scale) + 1.0


def yarn_rope_caches(cfg: ModelConfig, max_positions: int) -> tuple[torch.Tensor, torch.Tensor]:
    """cos/sin [max_positions, rope/2] of YaRN as transformers computes them (its
    _compute_yarn_parameters): inverse frequencies ramped between interpolation and
    extrapolation, both tables times the attention factor."""
    dim, base, factor = cfg.rope_dim, cfg.rope_theta, cfg.yarn_factor
    attention_factor = cfg.yarn_attention_factor
    if not attention_factor:
        if cfg.yarn_mscale and cfg.yarn_mscale_all_dim:
            attention_factor = yarn_mscale(factor, cfg.yarn_mscale) / yarn_mscale(
                factor, cfg.yarn_mscale_all_dim
            )
        else:
            attention_factor = yarn_mscale(factor)

    def correction_dim(rotations: float) -> float:
        original = cfg.yarn_original_max_position
        return (dim * math.log(original / (rotations * 2 * math.pi))) / (2 * math.log(base))

    low, high = correction_dim(cfg.yarn_beta_fast), correction_dim(cfg.yarn_beta_slow)
    if cfg.yarn_truncate:
        low, high = math.floor(low), math.ceil(high)
    low, high = max(low, 0), min(high, dim - 1)
    if low == high:
        high += 0.001
    ramp = torch.clamp((torch.arange(dim // 2, dtype=torch.float32) - low) / (high - low), 0, 1)
    pos_freqs = base ** (torch.arange(0, dim, 2, dtype=torch.float32) / dim)
    extrapolation = 1 - ramp
    inv_freq = (1.0 / (factor * pos_freqs)) * (1 - extrapolation) + (
        1.0 / pos_freqs
    ) * extrapolation
    angles = torch.outer(torch.arange(max_positions, dtype=torch.float32), inv_freq)
    return torch.cos(angles) * attention_factor, torch.sin(angles) * attention_factor


def softmax_scale(cfg: ModelConfig) -> float:
    """qk_head_dim ** -0.5, times YaRN's mscale(factor, mscale_all_dim) squared."""
    scale = (cfg.qk_nope_head_dim + cfg.qk_rope_head_dim) ** -0.5
    if cfg.yarn_factor and cfg.yarn_mscale_all_dim:
        scale *= yarn_mscale(cfg.yarn_factor, cfg.yarn_mscale_all_dim) ** 2
    return scale


class MLAttention(nn.Module):
    """Multi-head latent attention with the latent KV cache (see the module docstring)."""

    def __init__(self, cfg: ModelConfig) -> None:
        from moechat.models.modeling import RMSNorm

        super().__init__()
        self.num_heads = cfg.num_attention_heads
        self.nope, self.rope, self.v_dim = (
            cfg.qk_nope_head_dim,
            cfg.qk_rope_head_dim,
            cfg.v_head_dim,
        )
        self.lora = cfg.kv_lora_rank
        q_width = self.num_heads * (self.nope + self.rope)
        bias = cfg.attention_bias
        self.q_lora_rank = cfg.q_lora_rank
        if cfg.q_lora_rank:
            self.q_a_proj = nn.Linear(cfg.hidden_size, cfg.q_lora_rank, bias=bias)
            self.q_a_layernorm = RMSNorm(cfg.q_lora_rank, cfg.mla_norm_eps)
            self.q_b_proj = nn.Linear(cfg.q_lora_rank, q_width, bias=False)
        else:
            self.q_proj = nn.Linear(cfg.hidden_size, q_width, bias=False)
        self.kv_a_proj_with_mqa = nn.Linear(cfg.hidden_size, self.lora + self.rope, bias=bias)
        self.kv_a_layernorm = RMSNorm(self.lora, cfg.mla_norm_eps)
        self.kv_b_proj = nn.Linear(self.lora, self.num_heads * (self.nope + self.v_dim), bias=False)
        self.o_proj = nn.Linear(self.num_heads * self.v_dim, cfg.hidden_size, bias=bias)
        self.scale = cfg.attention_scale or softmax_scale(cfg)
        self.form: MLAForm = DEFAULT_FORM
        self.use_contrib_op = False  # no contrib kernel for MLA: always standard ops
        # exported graphs: present = the new positions only, the cache never concatenated
        self.new_only = False

    def forward(self, x, attention_mask, past_latent, past_rope, cos_cache, sin_cache):
        b, s, _ = x.shape
        n = self.num_heads
        if self.q_lora_rank:
            q = self.q_b_proj(self.q_a_layernorm(self.q_a_proj(x)))
        else:
            q = self.q_proj(x)
        q = q.view(b, s, n, self.nope + self.rope).transpose(1, 2)
        q_nope, q_pe = q[..., : self.nope], q[..., self.nope :]
        kv = self.kv_a_proj_with_mqa(x)
        latent = self.kv_a_layernorm(kv[..., : self.lora]).view(b, 1, s, self.lora)
        k_pe = kv[..., self.lora :].view(b, 1, s, self.rope)
        positions = torch.arange(s, device=x.device) + past_latent.shape[2]
        cos, sin = cos_cache[positions], sin_cache[positions]
        q_pe, k_pe = ops.apply_rope(q_pe, cos, sin), ops.apply_rope(k_pe, cos, sin)
        w = self.kv_b_proj.weight.view(n, self.nope + self.v_dim, self.lora)
        w_k, w_v = w[:, : self.nope], w[:, self.nope :]  # [N, nope, R], [N, v, R]
        if self.new_only:
            out = self._attend_split(q_nope, q_pe, past_latent, past_rope, latent, k_pe, positions)
            out = out.transpose(1, 2).reshape(b, s, n * self.v_dim)
            return self.o_proj(out), latent, k_pe
        present_latent = torch.cat((past_latent, latent), dim=2)
        present_rope = torch.cat((past_rope, k_pe), dim=2)
        total = present_latent.shape[2]
        rope_scores = q_pe @ present_rope.transpose(-1, -2)  # [B, N, S, T]
        if self.form == "absorb":
            q_latent = q_nope @ w_k  # [B, N, S, R]
            scores = q_latent @ present_latent.transpose(-1, -2) + rope_scores
        else:
            keys = present_latent @ w_k.transpose(-1, -2)  # [B, N, T, nope]
            scores = q_nope @ keys.transpose(-1, -2) + rope_scores
        future = torch.arange(total, device=x.device)[None, :] > positions[:, None]
        probs = torch.softmax((scores * self.scale).masked_fill(future, float("-inf")), dim=-1)
        if self.form == "absorb":
            out = (probs @ present_latent) @ w_v.transpose(-1, -2)  # [B, N, S, v]
        else:
            out = probs @ (present_latent @ w_v.transpose(-1, -2))
        out = out.transpose(1, 2).reshape(b, s, n * self.v_dim)
        return self.o_proj(out), present_latent, present_rope

    def _attend_split(self, q_nope, q_pe, past_latent, past_rope, latent, k_pe, positions):
        """The same attention with the cached and the new positions kept apart: scores
        and weighted sums per part, so the graph never copies the cache (its present
        outputs are the new positions; the runtime appends them to its buffers)."""
        n = self.num_heads
        w = self.kv_b_proj.weight.view(n, self.nope + self.v_dim, self.lora)
        w_k, w_v = w[:, : self.nope], w[:, self.nope :]
        parts = ((past_latent, past_rope), (latent, k_pe))
        if self.form == "absorb":
            q_latent = q_nope @ w_k
            scores = [q_latent @ lat.transpose(-1, -2) + q_pe @ r.transpose(-1, -2)
                      for lat, r in parts]  # fmt: skip
        else:
            scores = [q_nope @ (lat @ w_k.transpose(-1, -2)).transpose(-1, -2)
                      + q_pe @ r.transpose(-1, -2) for lat, r in parts]  # fmt: skip
        past = past_latent.shape[2]
        total = past + latent.shape[2]
        future = torch.arange(total, device=q_nope.device)[None, :] > positions[:, None]
        joined = torch.cat(scores, dim=-1) * self.scale
        probs = torch.softmax(joined.masked_fill(future, float("-inf")), dim=-1)
        p_past, p_new = probs[..., :past], probs[..., past:]
        if self.form == "absorb":
            return (p_past @ past_latent + p_new @ latent) @ w_v.transpose(-1, -2)
        return p_past @ (past_latent @ w_v.transpose(-1, -2)) + p_new @ (
            latent @ w_v.transpose(-1, -2)
        )
