"""One configuration for the decoder families moechat exports.

Covers MiniMind2 dense and MoE (``model_type: minimind``), MiniMind-3 checkpoints
(``num_experts``, per-head q/k RMSNorm, no shared experts) and Llama-layout dense
checkpoints (``model_type: llama``), with separate routed and shared expert sizes.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, fields, replace
from typing import Any

from moechat.runtime.errors import MoechatError

SUPPORTED_MODEL_TYPES = ("minimind", "llama")


def minimind_intermediate_size(hidden_size: int) -> int:
    """MiniMind's rule: 8/3 of hidden, rounded up to a multiple of 64 (640 -> 1728)."""
    return 64 * math.ceil(int(hidden_size * 8 / 3) / 64)


@dataclass(frozen=True)
class ModelConfig:
    model_type: str = "minimind"
    vocab_size: int = 6400
    hidden_size: int = 640
    num_hidden_layers: int = 8
    num_attention_heads: int = 8
    num_key_value_heads: int = 2
    head_dim: int = 0  # 0: hidden_size // num_attention_heads
    intermediate_size: int = 1728  # dense FFN and each routed expert
    rms_norm_eps: float = 1e-5
    rope_theta: float = 1e6
    max_position_embeddings: int = 32768
    tie_word_embeddings: bool = True
    qk_norm: bool = False  # MiniMind-3: RMSNorm over each head of q and k
    use_moe: bool = False
    n_routed_experts: int = 4
    num_experts_per_tok: int = 2
    n_shared_experts: int = 1
    shared_intermediate_size: int = 0  # 0: intermediate_size
    norm_topk_prob: bool = True
    scoring_func: str = "softmax"
    bos_token_id: int = 1
    eos_token_id: int = 2

    def __post_init__(self) -> None:
        if self.model_type not in SUPPORTED_MODEL_TYPES:
            raise MoechatError(
                f"unsupported architecture {self.model_type!r} "
                f"(supported: {', '.join(SUPPORTED_MODEL_TYPES)})"
            )
        if self.head_dim == 0:
            object.__setattr__(self, "head_dim", self.hidden_size // self.num_attention_heads)
        if self.shared_intermediate_size == 0:
            object.__setattr__(self, "shared_intermediate_size", self.intermediate_size)
        if self.num_attention_heads % self.num_key_value_heads:
            raise MoechatError("num_attention_heads must be a multiple of num_key_value_heads")
        if self.use_moe:
            if self.scoring_func != "softmax":
                raise MoechatError(f"unsupported MoE scoring function {self.scoring_func!r}")
            if not 1 <= self.num_experts_per_tok <= self.n_routed_experts:
                raise MoechatError("num_experts_per_tok must be between 1 and n_routed_experts")

    @property
    def num_key_value_groups(self) -> int:
        return self.num_attention_heads // self.num_key_value_heads

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> ModelConfig:
        known = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in data.items() if k in known})

    def with_changes(self, **changes: Any) -> ModelConfig:
        return replace(self, **changes)

    @classmethod
    def from_hf_config(cls, cfg: dict[str, Any]) -> ModelConfig:
        """Read a Hugging Face ``config.json`` written by MiniMind2, MiniMind-3 or Llama."""
        model_type = cfg.get("model_type", "minimind")
        hidden = int(cfg.get("hidden_size", 640))
        heads = int(cfg.get("num_attention_heads", 8))
        kv_heads = int(cfg.get("num_key_value_heads") or heads)
        inter = cfg.get("intermediate_size") or minimind_intermediate_size(hidden)
        # MiniMind-3 / Qwen3-MoE naming: num_experts and moe_intermediate_size.
        n_routed = int(cfg.get("n_routed_experts", cfg.get("num_experts", 0)) or 0)
        use_moe = bool(cfg.get("use_moe", n_routed > 0 and model_type != "llama"))
        expert_inter = int(cfg.get("moe_intermediate_size") or inter)
        n_shared = int(cfg.get("n_shared_experts", 1 if "n_routed_experts" in cfg else 0))
        eos = cfg.get("eos_token_id", 2)
        if isinstance(eos, list):
            eos = eos[0]
        return cls(
            model_type="llama" if model_type == "llama" else "minimind",
            vocab_size=int(cfg.get("vocab_size", 6400)),
            hidden_size=hidden,
            num_hidden_layers=int(cfg.get("num_hidden_layers", 8)),
            num_attention_heads=heads,
            num_key_value_heads=kv_heads,
            head_dim=int(cfg.get("head_dim") or hidden // heads),
            intermediate_size=expert_inter if use_moe else int(inter),
            rms_norm_eps=float(cfg.get("rms_norm_eps", 1e-5)),
            rope_theta=float(cfg.get("rope_theta", 1e6)),
            max_position_embeddings=int(cfg.get("max_position_embeddings", 32768)),
            tie_word_embeddings=bool(cfg.get("tie_word_embeddings", True)),
            qk_norm=bool(cfg.get("qk_norm", cfg.get("use_qk_norm", False))),
            use_moe=use_moe,
            n_routed_experts=n_routed or 4,
            num_experts_per_tok=int(cfg.get("num_experts_per_tok", 2)),
            n_shared_experts=n_shared if use_moe else 0,
            shared_intermediate_size=int(
                cfg.get("shared_expert_intermediate_size")
                or cfg.get("shared_intermediate_size")
                or inter
            ),
            norm_topk_prob=bool(cfg.get("norm_topk_prob", True)),
            scoring_func=str(cfg.get("scoring_func", "softmax")),
            bos_token_id=int(cfg.get("bos_token_id", 1) or 1),
            eos_token_id=int(eos),
        )


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
