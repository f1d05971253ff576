"""One configuration for every decoder family moechat exports.

A family is not a class: it is a set of values here (read from each family's
config.json by :mod:`moechat.models.families`):

- attention: q/k/v bias, q/k RMSNorm per head (Qwen3-MoE, MiniMind-3) or over the whole
  projection (OLMoE), ``clip_qkv``, the softmax scale (Granite's attention_multiplier);
- the router: softmax over the experts, top-k, renormalised or not. Granite's "top-k of
  the logits, then softmax over the k" gives the same weights as a renormalised softmax,
  so it is ``norm_topk_prob=True``;
- shared experts: none, ``n_shared_experts`` added unweighted, or one scaled by
  ``sigmoid(shared_expert_gate(x))`` (Qwen2-MoE);
- the layer schedule: ``dense_layers`` are plain FFNs of ``dense_intermediate_size`` in an
  otherwise MoE model (DeepSeek's first_k_dense_replace, Qwen's mlp_only_layers);
- Granite's embedding / residual multipliers and logits scaling;
- DeepSeek-V2/V3's multi-head latent attention (``kv_lora_rank`` > 0, models/mla.py):
  the KV cache holds per token the normalised latent as the "key" (one KV head,
  ``head_dim`` = kv_lora_rank) and the shared rotary key as the "value"
  (``value_head_dim`` = qk_rope_head_dim); and their routers (``topk_method``:
  greedy, group_limited_greedy, noaux_tc; sigmoid scores, ``routed_scaling_factor``).
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, fields, replace
from typing import Any, Literal, get_args

from moechat.runtime.errors import MoechatError
from moechat.runtime.manifest import SUPPORTED_ARCHITECTURES

Family = Literal[
    "minimind", "llama", "mixtral", "qwen2_moe", "qwen3_moe", "olmoe", "granitemoe", "deepseek",
    "deepseek_v2", "deepseek_v3",
]  # fmt: skip
SUPPORTED_MODEL_TYPES: tuple[str, ...] = get_args(Family)
assert SUPPORTED_MODEL_TYPES == SUPPORTED_ARCHITECTURES, "the runtime must accept every family"
QKNorm = Literal["none", "head", "full"]  # RMSNorm per head, or over the whole q / k width
TopkMethod = Literal["greedy", "group_limited_greedy", "noaux_tc"]


def minimind_intermediate_size(hidden_size: int) -> int:
    """MiniMind's rule: 8/3 of hidden, rounded up to a multiple of 64 (640 -> 1728)."""
    return 64 * math.ceil(int(hidden_size * 8 / 3) / 64)


@dataclass(frozen=True)
class ModelConfig:
    model_type: Family = "minimind"
    vocab_size: int = 6400
    hidden_size: int = 640
    num_hidden_layers: int = 8
    num_attention_heads: int = 8
    num_key_value_heads: int = 2
    head_dim: int = 0  # 0: hidden_size // num_attention_heads
    intermediate_size: int = 1728  # each routed expert, or the FFN of a dense model
    rms_norm_eps: float = 1e-5
    rope_theta: float = 1e6
    max_position_embeddings: int = 32768
    tie_word_embeddings: bool = True
    qk_norm: QKNorm = "none"  # True/False (older callers) read as "head"/"none"
    attention_bias: bool = False  # q/k/v projections with bias (Qwen2-MoE)
    clip_qkv: float | None = None  # OLMoE: clamp q, k, v to [-c, c] after the projections
    attention_scale: float = 0.0  # softmax scale; 0: head_dim ** -0.5
    embedding_multiplier: float = 1.0  # Granite
    residual_multiplier: float = 1.0  # Granite: x + f(x) * m
    logits_scaling: float = 1.0  # Granite: logits / s
    sliding_window: int | None = None  # attention window; contexts are capped at it
    use_moe: bool = False
    n_routed_experts: int = 4
    num_experts_per_tok: int = 2
    n_shared_experts: int = 1
    shared_intermediate_size: int = 0  # 0: intermediate_size
    shared_expert_gate: bool = False  # Qwen2-MoE: shared output * sigmoid(gate(x))
    norm_topk_prob: bool = True
    scoring_func: Literal["softmax", "sigmoid"] = "softmax"
    topk_method: TopkMethod = "greedy"  # DeepSeek-V2/V3 routers (models/mla.py)
    n_group: int = 1  # expert groups; topk_group of them are kept per token
    topk_group: int = 1
    routed_scaling_factor: float = 1.0  # routed experts' weights times this
    score_correction_bias: bool = False  # V3: e_score_correction_bias, for the choice only
    dense_layers: tuple[int, ...] = ()  # plain FFN layers of a MoE model
    dense_intermediate_size: int = 0  # 0: intermediate_size
    value_head_dim: int = 0  # width of the cached "value"; 0: head_dim
    # multi-head latent attention (DeepSeek-V2/V3); kv_lora_rank 0: not MLA
    kv_lora_rank: int = 0
    q_lora_rank: int = 0  # 0: q_proj; else q_a_proj -> RMSNorm -> q_b_proj
    qk_nope_head_dim: int = 0
    qk_rope_head_dim: int = 0
    v_head_dim: int = 0
    # eps of the q_a / kv_a RMSNorms: transformers (and deepseek-ai's code) fix 1e-6;
    # llama.cpp runs a deepseek2 GGUF with its attention.layer_norm_rms_epsilon there
    mla_norm_eps: float = 1e-6
    rope_interleave: bool = False  # rotary pairs (x0, x1), (x2, x3)... in the checkpoint
    # YaRN RoPE scaling (DeepSeek-V2/V3 configs); yarn_factor 0: none
    yarn_factor: float = 0.0
    yarn_original_max_position: int = 0
    yarn_beta_fast: float = 32.0
    yarn_beta_slow: float = 1.0
    yarn_mscale: float = 0.0
    yarn_mscale_all_dim: float = 0.0
    yarn_attention_factor: float = 0.0  # 0: derived from factor and the mscales
    yarn_truncate: bool = True
    bos_token_id: int = 1
    eos_token_id: int = 2

    def __post_init__(self) -> None:
        if self.model_type not in SUPPORTED_MODEL_TYPES:
            raise MoechatError(
                f"unsupported architecture {self.model_type!r} "
                f"(supported: {', '.join(SUPPORTED_MODEL_TYPES)})"
            )
        if isinstance(self.qk_norm, bool):
            object.__setattr__(self, "qk_norm", "head" if self.qk_norm else "none")
        if self.qk_norm not in get_args(QKNorm):
            raise MoechatError(f"unknown qk_norm {self.qk_norm!r}")
        object.__setattr__(self, "dense_layers", tuple(sorted(set(self.dense_layers))))
        if self.head_dim == 0:
            object.__setattr__(self, "head_dim", self.hidden_size // self.num_attention_heads)
        if self.shared_intermediate_size == 0:
            object.__setattr__(self, "shared_intermediate_size", self.intermediate_size)
        if self.kv_lora_rank:
            if min(self.qk_rope_head_dim, self.v_head_dim) < 1 or self.qk_rope_head_dim % 2:
                raise MoechatError("MLA needs an even qk_rope_head_dim and a v_head_dim")
            # the cache: the latent as the "key" of one KV head, the rope key as its "value"
            object.__setattr__(self, "num_key_value_heads", 1)
            object.__setattr__(self, "head_dim", self.kv_lora_rank)
            object.__setattr__(self, "value_head_dim", self.qk_rope_head_dim)
        if self.value_head_dim == 0:
            object.__setattr__(self, "value_head_dim", self.head_dim)
        if self.num_attention_heads % self.num_key_value_heads:
            raise MoechatError("num_attention_heads must be a multiple of num_key_value_heads")
        if self.use_moe:
            if self.scoring_func not in ("softmax", "sigmoid"):
                raise MoechatError(f"unsupported MoE scoring function {self.scoring_func!r}")
            if not 1 <= self.num_experts_per_tok <= self.n_routed_experts:
                raise MoechatError("num_experts_per_tok must be between 1 and n_routed_experts")
            if self.topk_method not in get_args(TopkMethod):
                raise MoechatError(f"unsupported topk_method {self.topk_method!r}")
            if self.n_routed_experts % self.n_group or not 1 <= self.topk_group <= self.n_group:
                raise MoechatError(
                    "n_group must divide n_routed_experts and topk_group be in 1..n_group"
                )
            if self.topk_method == "noaux_tc" and self.n_routed_experts // self.n_group < 2:
                raise MoechatError("noaux_tc routing needs at least 2 experts per group")

    @property
    def is_mla(self) -> bool:
        return self.kv_lora_rank > 0

    @property
    def rope_dim(self) -> int:
        """Width of the rotated part of a query/key head."""
        return self.qk_rope_head_dim if self.is_mla else self.head_dim

    @property
    def grouped_routing(self) -> bool:
        """A router other than softmax / top-k / optional renormalisation (models/mla.py)."""
        return (
            self.topk_method != "greedy"
            or self.scoring_func != "softmax"
            or self.routed_scaling_factor != 1.0
            or self.score_correction_bias
        )

    def kv_bytes_per_token(self, dtype_bytes: int = 4) -> int:
        """KV cache bytes per token (all layers): per-head K/V, or MLA's latent + rope key."""
        width = self.num_key_value_heads * (self.head_dim + self.value_head_dim)
        return width * self.num_hidden_layers * dtype_bytes

    @property
    def num_key_value_groups(self) -> int:
        return self.num_attention_heads // self.num_key_value_heads

    def is_moe_layer(self, index: int) -> bool:
        return self.use_moe and index not in self.dense_layers

    @property
    def dense_ffn_size(self) -> int:
        """FFN width of a dense layer (of a dense model, or a dense layer of a MoE model)."""
        if not self.use_moe:
            return self.intermediate_size
        return self.dense_intermediate_size or self.intermediate_size

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> ModelConfig:
        known = {f.name for f in fields(cls)}
        values = {k: v for k, v in data.items() if k in known}
        if "dense_layers" in values:
            values["dense_layers"] = tuple(values["dense_layers"])
        return cls(**values)

    def with_changes(self, **changes: Any) -> ModelConfig:
        return replace(self, **changes)

    @classmethod
    def from_hf_config(cls, cfg: dict[str, Any]) -> ModelConfig:
        """Read a Hugging Face ``config.json`` of any supported family."""
        from moechat.models.families import config_from_hf

        return config_from_hf(cfg)


PRESETS: dict[str, ModelConfig] = {
    "minimind2-moe": ModelConfig(use_moe=True),
    "minimind2-small": ModelConfig(hidden_size=512, intermediate_size=1408),
    "minimind2": ModelConfig(hidden_size=768, num_hidden_layers=16, intermediate_size=2048),
    "minimind2-small-moe": ModelConfig(hidden_size=512, intermediate_size=1408, use_moe=True),
}


def preset(name: str) -> ModelConfig:
    try:
        return PRESETS[name]
    except KeyError:
        raise MoechatError(f"unknown preset {name!r} (known: {', '.join(PRESETS)})") from None
