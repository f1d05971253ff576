"""llama.cpp's ``deepseek2`` GGUF architecture: DeepSeek-V2/V3 (MLA attention, models/mla.py).

What llama.cpp's converter (``DeepseekV2Model`` in convert_hf_to_gguf.py) writes, and
how it is read back into the ModelConfig / state dict of the Hugging Face path:

- attention: ``attn_q`` (V2-Lite) or ``attn_q_a`` -> ``attn_q_a_norm`` -> ``attn_q_b``;
  ``attn_kv_a_mqa`` ([latent | rope key] rows), ``attn_kv_a_norm``, ``attn_output``.
  ``kv_b_proj`` is stored split for llama.cpp's absorbed attention: ``attn_k_b`` per head
  transposed ([heads, kv_lora_rank, qk_nope] in PyTorch order) and ``attn_v_b``
  ([heads, v_head_dim, kv_lora_rank]); files from older converters hold the unsplit
  ``attn_kv_b``. :func:`join_kv_b` rebuilds ``kv_b_proj`` exactly.
- RoPE: no rows are permuted (llama.cpp runs deepseek2 with interleaved pairs, the
  checkpoints' own layout), so the file is read as ``rope_interleave`` and
  models/mla.py deinterleaves the rope rows as it does for Hugging Face folders.
- metadata: ``attention.kv_lora_rank``, ``key_length_mla`` (qk_nope + qk_rope),
  ``value_length_mla`` (v_head_dim) (older files: ``key_length`` / ``value_length``),
  ``rope.dimension_count`` (qk_rope); ``key_length`` / ``value_length`` of newer files
  describe llama.cpp's latent cache, not the heads. ``attention.layer_norm_rms_epsilon``
  is also the eps of ``attn_q_a_norm`` / ``attn_kv_a_norm``, as llama.cpp runs them
  (transformers fixes 1e-6 there, kept for Hugging Face folders: ``mla_norm_eps``).
- routing, as llama.cpp's ``build_moe_ffn`` runs it (the file carries no topk_method):
  ``expert_gating_func`` softmax (also when absent, but for llama.cpp's GLM-4.7 Lite
  exception) or sigmoid; ``exp_probs_b`` (V3's
  correction bias) added for the choice only; with ``expert_group_count`` > 1 a group
  scores the sum of its best two and ``expert_group_used_count`` groups are kept (V3's
  noaux_tc; a V2 group_limited_greedy checkpoint is run this way too, as llama.cpp runs
  it); ``expert_weights_norm`` renormalises, ``expert_weights_scale`` scales.
- YaRN: ``rope.scaling.*`` and ``rope.scaling.yarn_log_multiplier`` (0.1 x
  mscale_all_dim); llama.cpp takes mscale = mscale_all_dim, so the rotary tables are
  unscaled and the softmax scale carries mscale_all_dim's factor squared.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import torch

from moechat.models.config import ModelConfig
from moechat.runtime.errors import MoechatError

if TYPE_CHECKING:
    from moechat.models.gguf import Metadata

# blk.N.<name> -> CausalLM keys; k_b / v_b are joined into kv_b_proj by join_kv_b
MLA_LAYER_KEYS = {
    "attn_q_a.weight": "self_attn.q_a_proj.weight",
    "attn_q_a_norm.weight": "self_attn.q_a_layernorm.weight",
    "attn_q_b.weight": "self_attn.q_b_proj.weight",
    "attn_kv_a_mqa.weight": "self_attn.kv_a_proj_with_mqa.weight",
    "attn_kv_a_norm.weight": "self_attn.kv_a_layernorm.weight",
    "attn_kv_b.weight": "self_attn.kv_b_proj.weight",
    "attn_k_b.weight": "self_attn.k_b_proj.weight",
    "attn_v_b.weight": "self_attn.v_b_proj.weight",
    "exp_probs_b.bias": "mlp.gate.e_score_correction_bias",
}
_SOFTMAX, _SIGMOID = 1, 2  # llama.cpp's LLAMA_EXPERT_GATING_FUNC_TYPE_*; 0 (none): softmax


def mla_values(meta: Metadata, shapes: dict[str, tuple[int, ...]]) -> dict[str, Any]:
    """The MLA attention, YaRN and router fields of a ``deepseek2`` file's ModelConfig."""
    rope = meta.integer("rope.dimension_count", minimum=2)
    # newer files: key_length / value_length describe llama.cpp's latent cache, the
    # *_mla keys the heads; older files only have the heads' sizes
    has_mla_keys = meta.has("attention.key_length_mla")
    suffix = "_mla" if has_mla_keys else ""
    key_length = meta.integer(f"attention.key_length{suffix}", minimum=1)
    if key_length <= rope:
        raise MoechatError(
            f"GGUF {meta.arch}.attention.key_length{suffix} ({key_length}) must exceed "
            f"rope.dimension_count ({rope})"
        )
    q_a = shapes.get("blk.0.attn_q_a.weight")
    return {
        "kv_lora_rank": meta.integer("attention.kv_lora_rank", minimum=1),
        "q_lora_rank": q_a[0] if q_a else 0,
        "qk_nope_head_dim": key_length - rope,
        "qk_rope_head_dim": rope,
        "v_head_dim": meta.integer(f"attention.value_length{suffix}", minimum=1),
        "rope_interleave": True,
        # llama.cpp's build_norm: the file's eps for every RMSNorm, q_a / kv_a included
        "mla_norm_eps": meta.number("attention.layer_norm_rms_epsilon", 1e-5),
        "attention_bias": False,
        **_yarn(meta),
        **_router(meta, shapes),
    }


def _router(meta: Metadata, shapes: dict[str, tuple[int, ...]]) -> dict[str, Any]:
    gating = meta.integer("expert_gating_func", 0)
    if gating == 0 and _is_glm47_lite(meta):  # llama.cpp's default for these older files
        gating = _SIGMOID
    if gating not in (0, _SOFTMAX, _SIGMOID):
        raise MoechatError(f"GGUF expert_gating_func {gating} is not supported (softmax, sigmoid)")
    bias = any(name.endswith(".exp_probs_b.bias") for name in shapes)
    groups = meta.integer("expert_group_count", 1, minimum=1)
    v3 = gating == _SIGMOID or bias
    return {
        "model_type": "deepseek_v3" if v3 else "deepseek_v2",
        "scoring_func": "sigmoid" if gating == _SIGMOID else "softmax",
        # llama.cpp's groups are always V3's (sum of the best two per group), and the
        # bias is added for the choice: noaux_tc; neither: plain top-k
        "topk_method": "noaux_tc" if groups > 1 or bias else "greedy",
        "score_correction_bias": bias,
        "n_group": groups,
        "topk_group": meta.integer("expert_group_used_count", groups, minimum=1),
        "norm_topk_prob": meta.flag("expert_weights_norm", False),
        "routed_scaling_factor": meta.number("expert_weights_scale", 0.0) or 1.0,
    }


def _is_glm47_lite(meta: Metadata) -> bool:
    """GLM-4.7 Lite files (deepseek2, 47 or 48 blocks, 154880 tokens) written without
    expert_gating_func: llama.cpp gives them sigmoid scores (softmax to all others)."""
    vocab = meta.integer("vocab_size", 0)
    return meta.integer("block_count", 0) in (47, 48) and vocab == 154880


def _yarn(meta: Metadata) -> dict[str, Any]:
    kind = meta.text("rope.scaling.type", "none")
    if kind == "none":
        return {}
    if kind != "yarn":
        raise MoechatError(f"GGUF RoPE scaling ({kind}) is not supported for {meta.arch}")
    for key in ("rope.scaling.attn_factor", "rope.scaling.yarn_ext_factor"):
        if meta.number(key, 1.0) != 1.0:
            raise MoechatError(f"GGUF {meta.arch}.{key} other than 1 is not supported")
    if meta.number("attention.temperature_scale", 0.0):
        raise MoechatError(f"GGUF {meta.arch}.attention.temperature_scale is not supported")
    factor = meta.number("rope.scaling.factor", 0.0)
    if factor <= 0:
        raise MoechatError(f"GGUF {meta.arch}.rope.scaling.factor must be positive")
    # the converter writes 0.1 x mscale_all_dim; llama.cpp uses mscale = mscale_all_dim
    mscale_all_dim = meta.number("rope.scaling.yarn_log_multiplier", 0.0) / 0.1
    return {
        "yarn_factor": factor,
        "yarn_original_max_position": meta.integer(
            "rope.scaling.original_context_length", minimum=1
        ),
        "yarn_beta_fast": meta.number("rope.scaling.yarn_beta_fast", 32.0),
        "yarn_beta_slow": meta.number("rope.scaling.yarn_beta_slow", 1.0),
        "yarn_mscale": mscale_all_dim,
        "yarn_mscale_all_dim": mscale_all_dim,
        "yarn_attention_factor": 1.0,  # mscale / mscale_all_dim: unscaled rotary tables
    }


def join_kv_b(state: dict[str, torch.Tensor], cfg: ModelConfig) -> dict[str, torch.Tensor]:
    """Rebuild each layer's ``kv_b_proj`` [heads x (qk_nope + v), kv_lora_rank] from
    llama.cpp's split ``attn_k_b`` (transposed per head) and ``attn_v_b``."""
    n, nope, v, lora = (
        cfg.num_attention_heads, cfg.qk_nope_head_dim, cfg.v_head_dim, cfg.kv_lora_rank
    )  # fmt: skip
    out: dict[str, torch.Tensor] = {}
    for key, tensor in state.items():
        if key.endswith(".self_attn.v_b_proj.weight"):
            continue
        if not key.endswith(".self_attn.k_b_proj.weight"):
            out[key] = tensor
            continue
        prefix = key.removesuffix("k_b_proj.weight")
        v_b = state.get(f"{prefix}v_b_proj.weight")
        if v_b is None:
            raise MoechatError(f"GGUF block {prefix.split('.')[2]} has attn_k_b but no attn_v_b")
        if tuple(tensor.shape) != (n, lora, nope) or tuple(v_b.shape) != (n, v, lora):
            raise MoechatError(
                f"GGUF attn_k_b / attn_v_b of block {prefix.split('.')[2]} have shapes "
                f"{tuple(tensor.shape)} / {tuple(v_b.shape)}, expected {(n, lora, nope)} / "
                f"{(n, v, lora)}"
            )
        # per head: k_nope rows (k_b transposed back), then v rows, as kv_b_proj holds them
        joined = torch.cat((tensor.transpose(1, 2), v_b), dim=1).reshape(n * (nope + v), lora)
        out[f"{prefix}kv_b_proj.weight"] = joined.contiguous()
    orphans = [k for k in state if k.endswith(".v_b_proj.weight")
               and k.replace("v_b_proj", "k_b_proj") not in state]  # fmt: skip
    if orphans:
        raise MoechatError(f"GGUF block {orphans[0].split('.')[2]} has attn_v_b but no attn_k_b")
    return out
