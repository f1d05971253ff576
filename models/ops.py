"""Custom torch ops that the exporter lowers to onnxruntime kernels.

``moechat::moe_routed`` is real per-token routing (softmax, top-k, renormalise,
weighted experts). Its eager implementation only runs the experts that tokens were
routed to. The exporter translates it either to ``com.microsoft.MoE`` or to standard
ONNX ops (see ``moechat.export.lowering``); tracing never sees the routing decisions,
so nothing about the example input is frozen into the graph.

``moechat::gqa_attention`` is causal grouped-query attention with rotary embedding
and a KV cache, with the semantics of ``com.microsoft.GroupQueryAttention``
(rotate-half RoPE, BNSH cache, cos/sin caches of half the head size).
"""

from __future__ import annotations

from typing import Protocol

import torch
import torch.nn.functional as F


class ExpertWeights(Protocol):
    """Per-expert weight matrices: a stacked tensor [E, ...], or a reader that gives one
    expert's matrix at a time (the streamed export's reference layer, export/layer_parity.py)."""

    def __len__(self) -> int: ...
    def __getitem__(self, expert: int) -> torch.Tensor: ...


def route(router_logits: torch.Tensor, top_k: int, normalize: bool):
    """Softmax over all experts, then the top-k; optionally renormalise the kept weights."""
    probs = torch.softmax(router_logits.float(), dim=-1)
    weights, experts = torch.topk(probs, top_k, dim=-1)
    if normalize:
        weights = weights / weights.sum(dim=-1, keepdim=True)
    return weights, experts


@torch.library.custom_op("moechat::moe_routed", mutates_args=())
def moe_routed(
    x: torch.Tensor,
    router_logits: torch.Tensor,
    fc1: torch.Tensor,
    fc2: torch.Tensor,
    top_k: int,
    normalize: bool,
) -> torch.Tensor:
    """Routed experts of a SwiGLU MoE.

    x [T, H]; router_logits [T, E]; fc1 [E, 2I, H] with gate/up rows interleaved
    (g0, u0, g1, u1, ...: the layout of com.microsoft.MoE with swiglu_fusion=1);
    fc2 [E, H, I]. Returns [T, H].
    """
    weights, experts = route(router_logits, top_k, normalize)
    return run_experts(x, weights, experts, fc1, fc2)


def run_experts(
    x: torch.Tensor,
    weights: torch.Tensor,
    experts: torch.Tensor,
    fc1: ExpertWeights,
    fc2: ExpertWeights,
) -> torch.Tensor:
    """Each expert over the tokens routed to it, weighted: only chosen experts run."""
    out = torch.zeros_like(x)
    for e in range(len(fc1)):
        token, slot = torch.where(experts == e)
        if token.numel() == 0:
            continue
        h = x[token] @ fc1[e].t()
        h = F.silu(h[:, 0::2]) * h[:, 1::2]
        y = (h @ fc2[e].t()) * weights[token, slot, None].to(x.dtype)
        # a token picks an expert at most once: plain indexing adds exactly what
        # index_add_ would, and index_add_ is slow on a busy CPU (>1 ms with 2 threads)
        out[token] += y
    return out


@moe_routed.register_fake
def _(x, router_logits, fc1, fc2, top_k, normalize):
    return torch.empty_like(x)


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x [B, N, S, D]; cos/sin [S, D/2] (half frequencies, as in onnxruntime's caches)."""
    cos = torch.cat((cos, cos), dim=-1)
    sin = torch.cat((sin, sin), dim=-1)
    return (x * cos + rotate_half(x) * sin).to(x.dtype)


def attention_with_cache(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    past_k: torch.Tensor,
    past_v: torch.Tensor,
    cos_cache: torch.Tensor,
    sin_cache: torch.Tensor,
    num_heads: int,
    kv_heads: int,
    scale: float,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Plain-torch causal GQA: q [B,S,N*D], k/v [B,S,Nkv*D], past [B,Nkv,P,D].

    ``scale`` is the softmax scale (0: ``D ** -0.5``). Returns (out [B,S,N*D], present_k,
    present_v [B,Nkv,P+S,D]). Exported as standard
    ONNX ops for providers without GroupQueryAttention.
    """
    b, s, _ = q.shape
    d = past_k.shape[-1]
    past = past_k.shape[2]
    positions = torch.arange(s, device=q.device) + past
    cos, sin = cos_cache[positions], sin_cache[positions]
    q = apply_rope(q.view(b, s, num_heads, d).transpose(1, 2), cos, sin)
    k = apply_rope(k.view(b, s, kv_heads, d).transpose(1, 2), cos, sin)
    v = v.view(b, s, kv_heads, d).transpose(1, 2)
    present_k = torch.cat((past_k, k), dim=2)
    present_v = torch.cat((past_v, v), dim=2)
    groups = num_heads // kv_heads
    total = present_k.shape[2]
    keys = (
        present_k[:, :, None].expand(b, kv_heads, groups, total, d).reshape(b, num_heads, total, d)
    )
    values = (
        present_v[:, :, None].expand(b, kv_heads, groups, total, d).reshape(b, num_heads, total, d)
    )
    scores = (q @ keys.transpose(-1, -2)) * (scale or d**-0.5)
    future = torch.arange(total, device=q.device)[None, :] > positions[:, None]
    scores = scores.float().masked_fill(future, float("-inf"))
    out = torch.softmax(scores, dim=-1).to(q.dtype) @ values
    return out.transpose(1, 2).reshape(b, s, num_heads * d), present_k, present_v


@torch.library.custom_op("moechat::gqa_attention", mutates_args=())
def gqa_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    past_k: torch.Tensor,
    past_v: torch.Tensor,
    attention_mask: torch.Tensor,
    cos_cache: torch.Tensor,
    sin_cache: torch.Tensor,
    num_heads: int,
    kv_heads: int,
    scale: float,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Same as :func:`attention_with_cache`; lowered to com.microsoft.GroupQueryAttention.

    ``attention_mask`` [B, P+S] (all ones) carries the total length the contrib op needs.
    """
    return attention_with_cache(
        q, k, v, past_k, past_v, cos_cache, sin_cache, num_heads, kv_heads, scale
    )


@gqa_attention.register_fake
def _(q, k, v, past_k, past_v, attention_mask, cos_cache, sin_cache, num_heads, kv_heads, scale):
    b, s, _ = q.shape
    shape = (b, kv_heads, past_k.shape[2] + s, past_k.shape[3])
    return torch.empty_like(q), past_k.new_empty(shape), past_v.new_empty(shape)
