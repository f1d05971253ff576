"""Tiny checkpoints of every MoE family, written by transformers' own classes.

``save_pretrained`` lays the files out as the Hub ships them (config.json with the
family's field names, safetensors with its key names). Weights are redrawn at a
realistic scale so that logits are large and routing differs across tokens.
DeepSeek-MoE (v1) has no transformers class: its checkpoint is written here with the
key names of deepseek-ai's releases (see :func:`make_deepseek_folder`).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch

from model_factory import write_tokenizer_files

VOCAB = 400
BASE: dict[str, Any] = dict(
    vocab_size=VOCAB, hidden_size=64, intermediate_size=96, num_hidden_layers=3,
    num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
    tie_word_embeddings=False, bos_token_id=0, eos_token_id=2, pad_token_id=0,
    rms_norm_eps=1e-6,
)  # fmt: skip

# Per family: transformers class names and the settings that exercise its quirks.
FAMILIES: dict[str, tuple[str, str, dict[str, Any]]] = {
    "mixtral": ("MixtralConfig", "MixtralForCausalLM", dict(num_local_experts=4)),
    "qwen2_moe": (
        "Qwen2MoeConfig", "Qwen2MoeForCausalLM",
        dict(num_experts=4, num_experts_per_tok=2, moe_intermediate_size=32,
             shared_expert_intermediate_size=48, mlp_only_layers=[1], norm_topk_prob=False),
    ),
    "qwen3_moe": (
        "Qwen3MoeConfig", "Qwen3MoeForCausalLM",
        dict(num_experts=6, num_experts_per_tok=2, moe_intermediate_size=32, head_dim=32,
             decoder_sparse_step=2, norm_topk_prob=True),
    ),
    "olmoe": (
        "OlmoeConfig", "OlmoeForCausalLM",
        dict(num_experts=4, num_experts_per_tok=2, clip_qkv=1.5, norm_topk_prob=False),
    ),
    "granitemoe": (
        "GraniteMoeConfig", "GraniteMoeForCausalLM",
        dict(num_local_experts=4, num_experts_per_tok=2, embedding_multiplier=3.0,
             attention_multiplier=0.2, residual_multiplier=0.5, logits_scaling=2.0),
    ),
}  # fmt: skip


def randomize(model: torch.nn.Module, seed: int) -> None:
    """Weights of realistic scale: norms near 1, matrices ~ 0.5/sqrt(fan-in), biases small."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            noise = torch.randn(p.shape, generator=gen)
            if "norm" in name:
                p.copy_(1.0 + 0.1 * noise)
            elif "embed" in name:
                p.copy_(noise)
            elif p.dim() == 1:
                p.copy_(0.1 * noise)
            else:
                p.copy_(noise * 0.5 / p.shape[-1] ** 0.5)


def make_family_folder(family: str, folder: Path, seed: int = 0, **overrides: Any):
    """Write a tiny ``family`` checkpoint with transformers; return the transformers model."""
    import transformers

    config_cls, model_cls, extra = FAMILIES[family]
    config = getattr(transformers, config_cls)(**{**BASE, **extra, **overrides})
    torch.manual_seed(seed)
    model = getattr(transformers, model_cls)(config)
    randomize(model, seed)
    model.eval()
    model.save_pretrained(folder)
    write_tokenizer_files(folder, VOCAB)
    return model


DEEPSEEK_CONFIG: dict[str, Any] = {
    **BASE, "model_type": "deepseek", "architectures": ["DeepseekForCausalLM"],
    "n_routed_experts": 4, "num_experts_per_tok": 2, "moe_intermediate_size": 32,
    "n_shared_experts": 2, "first_k_dense_replace": 1, "moe_layer_freq": 1,
    "norm_topk_prob": False, "scoring_func": "softmax", "topk_method": "greedy",
    "rope_theta": 10000.0, "rope_scaling": None, "attention_bias": False,
}  # fmt: skip


def make_deepseek_folder(folder: Path, seed: int = 0) -> dict[str, torch.Tensor]:
    """DeepSeek-MoE (v1) as deepseek-ai ships it: Llama attention, ``mlp.gate.weight``,
    ``mlp.experts.N.*`` and one ``mlp.shared_experts.*`` MLP; returns the state dict."""
    from safetensors.torch import save_file

    cfg = DEEPSEEK_CONFIG
    gen = torch.Generator().manual_seed(seed)
    h, heads, kv = cfg["hidden_size"], cfg["num_attention_heads"], cfg["num_key_value_heads"]
    d = h // heads

    def mat(rows: int, cols: int) -> torch.Tensor:
        return torch.randn(rows, cols, generator=gen) * 0.5 / cols**0.5

    def mlp(prefix: str, inter: int) -> dict[str, torch.Tensor]:
        return {
            f"{prefix}.gate_proj.weight": mat(inter, h),
            f"{prefix}.up_proj.weight": mat(inter, h),
            f"{prefix}.down_proj.weight": mat(h, inter),
        }

    state = {
        "model.embed_tokens.weight": torch.randn(VOCAB, h, generator=gen),
        "model.norm.weight": 1 + 0.1 * torch.randn(h, generator=gen),
        "lm_head.weight": mat(VOCAB, h),
    }
    for i in range(cfg["num_hidden_layers"]):
        p = f"model.layers.{i}"
        state |= {
            f"{p}.self_attn.q_proj.weight": mat(heads * d, h),
            f"{p}.self_attn.k_proj.weight": mat(kv * d, h),
            f"{p}.self_attn.v_proj.weight": mat(kv * d, h),
            f"{p}.self_attn.o_proj.weight": mat(h, heads * d),
            f"{p}.input_layernorm.weight": 1 + 0.1 * torch.randn(h, generator=gen),
            f"{p}.post_attention_layernorm.weight": 1 + 0.1 * torch.randn(h, generator=gen),
        }
        if i < cfg["first_k_dense_replace"]:
            state |= mlp(f"{p}.mlp", cfg["intermediate_size"])
            continue
        state[f"{p}.mlp.gate.weight"] = mat(cfg["n_routed_experts"], h)
        for e in range(cfg["n_routed_experts"]):
            state |= mlp(f"{p}.mlp.experts.{e}", cfg["moe_intermediate_size"])
        shared = cfg["moe_intermediate_size"] * cfg["n_shared_experts"]
        state |= mlp(f"{p}.mlp.shared_experts", shared)
    folder.mkdir(parents=True, exist_ok=True)
    save_file({k: v.contiguous() for k, v in state.items()}, str(folder / "model.safetensors"))
    (folder / "config.json").write_text(json.dumps(cfg))
    write_tokenizer_files(folder, VOCAB)
    return state


# -- DeepSeek-V2 / V3 (multi-head latent attention) ---------------------------------

EXPERTS, GROUPS = 8, 4
MLA: dict[str, Any] = dict(
    kv_lora_rank=32, qk_nope_head_dim=16, qk_rope_head_dim=8, v_head_dim=16,
    n_routed_experts=EXPERTS, moe_intermediate_size=32, n_shared_experts=1,
    first_k_dense_replace=1, n_group=GROUPS, topk_group=2,
    num_hidden_layers=2,  # one dense layer, one MoE layer: export time
)  # fmt: skip
KINDS: dict[str, tuple[str, str, dict[str, Any]]] = {
    # V2: group-limited greedy top-3 of softmax scores (top-3: with top-2 and 2 groups
    # kept, max-per-group scoring always keeps the greedy pick), scaled, no q LoRA
    "deepseek_v2": (
        "DeepseekV2Config", "DeepseekV2ForCausalLM",
        dict(MLA, q_lora_rank=None, topk_method="group_limited_greedy", num_experts_per_tok=3,
             routed_scaling_factor=1.5),
    ),
    # V3: noaux_tc (sigmoid, correction bias, sum of the top 2 per group), q LoRA
    "deepseek_v3": (
        "DeepseekV3Config", "DeepseekV3ForCausalLM",
        dict(MLA, q_lora_rank=24, num_experts_per_tok=2, norm_topk_prob=True,
             routed_scaling_factor=2.5),
    ),
}  # fmt: skip


# max_position_embeddings 512 = factor x original; mscale as in DeepSeek-V2-Lite's config
YARN = {
    "rope_type": "yarn", "rope_theta": 10000.0, "factor": 4.0, "mscale": 0.707,
    "mscale_all_dim": 0.707, "original_max_position_embeddings": 128, "beta_fast": 32,
    "beta_slow": 1,
}  # fmt: skip


def make_mla_folder(kind: str, folder: Path, seed: int = 0, **overrides: Any):
    """A tiny ``kind`` checkpoint written by transformers; returns the transformers model."""
    import transformers

    config_cls, model_cls, extra = KINDS[kind]
    values = {**BASE, "num_key_value_heads": BASE["num_attention_heads"], **extra, **overrides}
    model = getattr(transformers, model_cls)(getattr(transformers, config_cls)(**values))
    randomize(model, seed)
    if kind == "deepseek_v3":  # a correction bias of the scores' scale (sigmoid: 0..1)
        gen = torch.Generator().manual_seed(seed + 100)
        with torch.no_grad():
            for layer in model.model.layers[MLA["first_k_dense_replace"] :]:
                layer.mlp.gate.e_score_correction_bias.copy_(
                    0.3 * torch.randn(EXPERTS, generator=gen)
                )
    model.eval()
    model.save_pretrained(folder)
    write_tokenizer_files(folder, VOCAB)
    return model
