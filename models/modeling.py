"""PyTorch reference decoder for every supported family (see ``moechat.models.config``).

Parameter names follow MiniMind's own code (and Hugging Face Llama); other families'
checkpoints are renamed to them by ``moechat.models.families``. Used for export and
parity only.

The forward signature is the ONNX graph's (see docs/architecture.md):
``forward(input_ids, attention_mask, logits_positions, *past) -> (logits, *present)``
with ``past``/``present`` flattened as key0, value0, key1, value1, ...
"""

from __future__ import annotations

import torch
from torch import nn

from moechat.models import mla, ops
from moechat.models.config import ModelConfig


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float) -> None:
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        xf = x.float()
        # x / sqrt(...) rather than x * rsqrt(...): onnxruntime fuses only this form
        # into one SimplifiedLayerNormalization kernel (five kernels otherwise).
        normed = xf / torch.sqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * normed.type_as(x)


def rope_caches(
    head_dim: int, max_positions: int, theta: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """cos/sin [max_positions, head_dim/2] for rotate-half RoPE."""
    inv_freq = 1.0 / (theta ** (torch.arange(0, head_dim, 2, dtype=torch.float32) / head_dim))
    angles = torch.outer(torch.arange(max_positions, dtype=torch.float32), inv_freq)
    return torch.cos(angles), torch.sin(angles)


def model_rope_caches(cfg: ModelConfig, max_positions: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The model's cos/sin tables: YaRN's (DeepSeek-V2/V3) or plain RoPE's."""
    if cfg.yarn_factor:
        return mla.yarn_rope_caches(cfg, max_positions)
    return rope_caches(cfg.rope_dim, max_positions, cfg.rope_theta)


class Attention(nn.Module):
    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.num_heads = cfg.num_attention_heads
        self.kv_heads = cfg.num_key_value_heads
        self.head_dim = cfg.head_dim
        q_width, kv_width = self.num_heads * self.head_dim, self.kv_heads * self.head_dim
        bias = cfg.attention_bias
        self.q_proj = nn.Linear(cfg.hidden_size, q_width, bias=bias)
        self.k_proj = nn.Linear(cfg.hidden_size, kv_width, bias=bias)
        self.v_proj = nn.Linear(cfg.hidden_size, kv_width, bias=bias)
        self.o_proj = nn.Linear(q_width, cfg.hidden_size, bias=False)
        self.qk_norm = cfg.qk_norm
        if cfg.qk_norm == "head":
            self.q_norm = RMSNorm(self.head_dim, cfg.rms_norm_eps)
            self.k_norm = RMSNorm(self.head_dim, cfg.rms_norm_eps)
        elif cfg.qk_norm == "full":  # OLMoE: over the whole projection, before the split
            self.q_norm = RMSNorm(q_width, cfg.rms_norm_eps)
            self.k_norm = RMSNorm(kv_width, cfg.rms_norm_eps)
        self.clip_qkv = cfg.clip_qkv
        self.scale = cfg.attention_scale  # 0: head_dim ** -0.5, as the contrib op reads it
        self.use_contrib_op = True  # the exporter flips this for the standard-op variant

    def forward(self, x, attention_mask, past_k, past_v, cos_cache, sin_cache):
        b, s, _ = x.shape
        q, k, v = self.q_proj(x), self.k_proj(x), self.v_proj(x)
        if self.qk_norm == "head":
            q = self.q_norm(q.view(b, s, self.num_heads, self.head_dim)).view(b, s, -1)
            k = self.k_norm(k.view(b, s, self.kv_heads, self.head_dim)).view(b, s, -1)
        elif self.qk_norm == "full":
            q, k = self.q_norm(q), self.k_norm(k)
        if self.clip_qkv is not None:
            c = self.clip_qkv
            q, k, v = q.clamp(-c, c), k.clamp(-c, c), v.clamp(-c, c)
        if self.use_contrib_op:
            out, pk, pv = ops.gqa_attention(
                q, k, v, past_k, past_v, attention_mask, cos_cache, sin_cache,
                self.num_heads, self.kv_heads, self.scale,
            )  # fmt: skip
        else:
            out, pk, pv = ops.attention_with_cache(
                q, k, v, past_k, past_v, cos_cache, sin_cache,
                self.num_heads, self.kv_heads, self.scale,
            )  # fmt: skip
        return self.o_proj(out), pk, pv


class FeedForward(nn.Module):
    """SwiGLU FFN: down(silu(gate(x)) * up(x))."""

    def __init__(self, hidden: int, intermediate: int) -> None:
        super().__init__()
        self.gate_proj = nn.Linear(hidden, intermediate, bias=False)
        self.up_proj = nn.Linear(hidden, intermediate, bias=False)
        self.down_proj = nn.Linear(intermediate, hidden, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(nn.functional.silu(self.gate_proj(x)) * self.up_proj(x))


class MoEGate(nn.Module):
    """MiniMind's router: a bare weight [E, H] (key ``mlp.gate.weight``)."""

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.empty(cfg.n_routed_experts, cfg.hidden_size))
        nn.init.kaiming_uniform_(self.weight, a=5**0.5)
        if cfg.score_correction_bias:  # DeepSeek-V3: added to the scores for the choice only
            self.register_buffer("e_score_correction_bias", torch.zeros(cfg.n_routed_experts))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x @ self.weight.t()


class MoEFeedForward(nn.Module):
    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.top_k = cfg.num_experts_per_tok
        self.normalize = cfg.norm_topk_prob
        self.gate = MoEGate(cfg)
        self.grouped_routing = cfg.grouped_routing  # DeepSeek-V2/V3 routers (models/mla.py)
        self.routing = (cfg.scoring_func, cfg.topk_method, cfg.n_group, cfg.topk_group)
        self.routed_scaling_factor = cfg.routed_scaling_factor
        self.experts = nn.ModuleList(
            FeedForward(cfg.hidden_size, cfg.intermediate_size) for _ in range(cfg.n_routed_experts)
        )
        self.shared_experts = nn.ModuleList(
            FeedForward(cfg.hidden_size, cfg.shared_intermediate_size)
            for _ in range(cfg.n_shared_experts)
        )
        # Qwen2-MoE scales its shared expert by sigmoid(shared_expert_gate(x)).
        self.shared_expert_gate = (
            nn.Linear(cfg.hidden_size, 1, bias=False) if cfg.shared_expert_gate else None
        )
        self.packed: tuple[torch.Tensor, torch.Tensor] | None = None
        # routed experts read one at a time instead (eager only): the streamed export's
        # reference layer never holds a layer's experts in float32 (export/layer_parity.py)
        self.streamed: tuple[ops.ExpertWeights, ops.ExpertWeights] | None = None
        self._pack_key: tuple | None = None
        self._cache: tuple[torch.Tensor, torch.Tensor] | None = None

    def pack_experts(self) -> tuple[torch.Tensor, torch.Tensor]:
        """fc1 [E, 2I, H] (gate/up rows interleaved) and fc2 [E, H, I]."""
        gate = torch.stack([e.gate_proj.weight for e in self.experts])
        up = torch.stack([e.up_proj.weight for e in self.experts])
        fc1 = torch.stack((gate, up), dim=2).reshape(gate.shape[0], -1, gate.shape[2])
        fc2 = torch.stack([e.down_proj.weight for e in self.experts])
        return fc1.detach().contiguous(), fc2.detach().contiguous()

    def freeze_packed(self) -> None:
        """Keep packed copies as constants so the exported graph stores them once, packed."""
        self.packed = self.pack_experts()

    def _packed_weights(self) -> tuple[torch.Tensor, torch.Tensor]:
        """Packed expert weights, repacked only when a weight changed (packing is costly)."""
        if self.packed is not None:
            return self.packed
        key = tuple((id(p), p._version) for p in self.experts.parameters())
        if key != self._pack_key or self._cache is None:
            self._cache, self._pack_key = self.pack_experts(), key
        return self._cache

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shape = x.shape
        flat = x.reshape(-1, shape[-1])
        if self.streamed is not None:
            weights, experts = ops.route(self.gate(flat), self.top_k, self.normalize)
            y = ops.run_experts(flat, weights, experts, *self.streamed)
        elif self.grouped_routing:
            fc1, fc2 = self._packed_weights()
            bias = getattr(self.gate, "e_score_correction_bias", None)
            if bias is None:
                bias = flat.new_zeros(fc1.shape[0])
            y = mla.moe_grouped(
                flat, self.gate(flat), bias, fc1, fc2, self.top_k, *self.routing,
                self.normalize, self.routed_scaling_factor,
            )  # fmt: skip
        else:
            fc1, fc2 = self._packed_weights()
            y = ops.moe_routed(flat, self.gate(flat), fc1, fc2, self.top_k, self.normalize)
        if self.shared_experts:
            shared = sum(expert(flat) for expert in self.shared_experts)
            if self.shared_expert_gate is not None:
                shared = torch.sigmoid(self.shared_expert_gate(flat)) * shared
            y = y + shared
        return y.reshape(shape)


class DecoderLayer(nn.Module):
    def __init__(self, cfg: ModelConfig, index: int) -> None:
        super().__init__()
        self.self_attn: nn.Module = mla.MLAttention(cfg) if cfg.is_mla else Attention(cfg)
        self.input_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.mlp: nn.Module = (
            MoEFeedForward(cfg)
            if cfg.is_moe_layer(index)
            else FeedForward(cfg.hidden_size, cfg.dense_ffn_size)
        )
        self.residual_multiplier = cfg.residual_multiplier

    def _residual(self, x: torch.Tensor, update: torch.Tensor) -> torch.Tensor:
        if self.residual_multiplier != 1.0:  # Granite
            update = update * self.residual_multiplier
        return x + update

    def forward(self, x, attention_mask, past_k, past_v, cos_cache, sin_cache):
        h, pk, pv = self.self_attn(
            self.input_layernorm(x), attention_mask, past_k, past_v, cos_cache, sin_cache
        )
        x = self._residual(x, h)
        return self._residual(x, self.mlp(self.post_attention_layernorm(x))), pk, pv


class DecoderModel(nn.Module):
    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.embed_tokens = nn.Embedding(cfg.vocab_size, cfg.hidden_size)
        self.layers = nn.ModuleList(DecoderLayer(cfg, i) for i in range(cfg.num_hidden_layers))
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)


class CausalLM(nn.Module):
    """Decoder + LM head. ``model.*`` and ``lm_head.weight`` match MiniMind's keys."""

    def __init__(self, cfg: ModelConfig, max_positions: int = 4096) -> None:
        super().__init__()
        self.config = cfg
        self.model = DecoderModel(cfg)
        self.lm_head = nn.Linear(cfg.hidden_size, cfg.vocab_size, bias=False)
        if cfg.tie_word_embeddings:
            self.lm_head.weight = self.model.embed_tokens.weight
        cos, sin = model_rope_caches(cfg, max_positions)
        self.register_buffer("cos_cache", cos, persistent=False)
        self.register_buffer("sin_cache", sin, persistent=False)

    def set_attention_variant(self, use_contrib_op: bool) -> None:
        for layer in self.model.layers:
            layer.self_attn.use_contrib_op = use_contrib_op

    def forward(self, input_ids, attention_mask, logits_positions, *past):
        cfg = self.config
        x = self.model.embed_tokens(input_ids)
        if cfg.embedding_multiplier != 1.0:  # Granite
            x = x * cfg.embedding_multiplier
        presents = []
        for i, layer in enumerate(self.model.layers):
            x, pk, pv = layer(
                x, attention_mask, past[2 * i], past[2 * i + 1], self.cos_cache, self.sin_cache
            )
            presents += [pk, pv]
        x = self.model.norm(torch.index_select(x, 1, logits_positions))
        logits = self.lm_head(x)
        if cfg.logits_scaling != 1.0:  # Granite
            logits = logits / cfg.logits_scaling
        return (logits, *presents)

    def empty_cache(self, batch: int = 1) -> list[torch.Tensor]:
        cfg = self.config
        widths = (cfg.head_dim, cfg.value_head_dim) * cfg.num_hidden_layers
        return [torch.zeros(batch, cfg.num_key_value_heads, 0, d) for d in widths]

    @torch.no_grad()
    def step(self, input_ids: torch.Tensor, past: list[torch.Tensor]):
        """Logits for every new position and the grown cache (eager convenience)."""
        s = input_ids.shape[1]
        total = past[0].shape[2] + s
        mask = torch.ones(input_ids.shape[0], total, dtype=torch.long)
        out = self(input_ids, mask, torch.arange(s), *past)
        return out[0], list(out[1:])


def parameter_counts(model: CausalLM) -> tuple[int, int]:
    """(total, active per token): a token runs top-k of each MoE layer's routed experts."""
    total = sum(p.numel() for p in model.parameters())  # a tied table counts once
    active = total
    cfg = model.config
    for layer in model.model.layers:
        if isinstance(layer.mlp, MoEFeedForward):
            per_expert = sum(p.numel() for p in layer.mlp.experts[0].parameters())
            active -= per_expert * (cfg.n_routed_experts - cfg.num_experts_per_tok)
    return total, active


def random_model(cfg: ModelConfig, seed: int = 0, max_positions: int = 4096) -> CausalLM:
    """A model of any config with random weights of realistic scale (tests, benchmarks)."""
    torch.manual_seed(seed)
    model = CausalLM(cfg, max_positions=max_positions)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("norm.weight"):
                p.copy_(1.0 + 0.1 * torch.randn_like(p))
            elif p.dim() == 2:
                p.normal_(0.0, 0.5 / p.shape[1] ** 0.5 if "embed" not in name else 1.0)
    return model.eval()
