"""Per-family knowledge: config.json fields and checkpoint key names.

Each supported ``model_type`` has a config reader (field names and defaults exactly as
transformers reads them) and a key map from the names its checkpoints use to the names
of :class:`moechat.models.modeling.CausalLM`, where every family looks like MiniMind:
``mlp.gate.weight`` [E, H], ``mlp.experts.N.{gate,up,down}_proj``,
``mlp.shared_experts.N.*``. Nothing from a checkpoint folder is ever executed.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch

from moechat.models.config import (
    SUPPORTED_MODEL_TYPES,
    Family,
    ModelConfig,
    minimind_intermediate_size,
)
from moechat.models.mla import prepare_mla_state
from moechat.runtime.errors import MoechatError


class ConfigFields:
    """Typed reads of config.json values: a wrong type is a one-line error, not a crash."""

    def __init__(self, raw: dict[str, Any]) -> None:
        if not isinstance(raw, dict):
            raise MoechatError("config.json must hold a JSON object")
        self.raw = raw

    def _get(self, key: str, default: Any) -> Any:
        value = self.raw.get(key)
        return default if value is None else value

    def integer(self, key: str, default: int | None = None, minimum: int = 0) -> int:
        value = self._get(key, default)
        if value is None:
            raise MoechatError(f"config.json has no {key!r}")
        if (
            isinstance(value, bool)
            or not isinstance(value, int | float)
            or (isinstance(value, float) and not value.is_integer())  # also NaN, infinity
        ):
            raise MoechatError(f"config.json: {key!r} must be an integer, got {value!r}")
        if int(value) < minimum:
            raise MoechatError(f"config.json: {key!r} must be at least {minimum}, got {value}")
        return int(value)

    def number(self, key: str, default: float) -> float:
        value = self._get(key, default)
        if isinstance(value, bool) or not isinstance(value, int | float) or value != value:
            raise MoechatError(f"config.json: {key!r} must be a number, got {value!r}")
        return float(value)

    def flag(self, key: str, default: bool) -> bool:
        value = self._get(key, default)
        if not isinstance(value, bool):
            raise MoechatError(f"config.json: {key!r} must be true or false, got {value!r}")
        return value

    def int_list(self, key: str) -> list[int]:
        value = self._get(key, [])
        if not isinstance(value, list) or not all(isinstance(v, int) for v in value):
            raise MoechatError(f"config.json: {key!r} must be a list of integers")
        return value

    def token_id(self, key: str, default: int) -> int:
        value = self._get(key, default)
        if isinstance(value, list):  # several eos ids: the first one is the model's own
            value = value[0] if value else default
        if isinstance(value, bool) or not isinstance(value, int):
            raise MoechatError(f"config.json: {key!r} must be a token id, got {value!r}")
        return value


def rope_theta(f: ConfigFields, default: float) -> float:
    """``rope_parameters`` (transformers 5) or ``rope_theta``; scaled RoPE is refused."""
    params = f.raw.get("rope_parameters") or f.raw.get("rope_scaling") or {}
    if not isinstance(params, dict):
        raise MoechatError("config.json: 'rope_parameters' must be an object")
    kind = params.get("rope_type", params.get("type", "default"))
    if kind not in ("default", None):
        raise MoechatError(f"RoPE scaling {kind!r} is not supported yet (config.json)")
    theta = params.get("rope_theta", f.raw.get("rope_theta", default))
    return ConfigFields({"rope_theta": theta}).number("rope_theta", default)


def _common(f: ConfigFields, family: Family, rope_default: float = 10000.0) -> dict[str, Any]:
    hidden = f.integer("hidden_size", minimum=1)
    heads = f.integer("num_attention_heads", minimum=1)
    return {
        "model_type": family,
        "vocab_size": f.integer("vocab_size", minimum=1),
        "hidden_size": hidden,
        "num_hidden_layers": f.integer("num_hidden_layers", minimum=1),
        "num_attention_heads": heads,
        "num_key_value_heads": f.integer("num_key_value_heads", heads, minimum=1),
        "head_dim": f.integer("head_dim", hidden // heads, minimum=1),
        "rms_norm_eps": f.number("rms_norm_eps", 1e-6),
        "rope_theta": rope_theta(f, rope_default),
        "max_position_embeddings": f.integer("max_position_embeddings", 4096, minimum=1),
        "tie_word_embeddings": f.flag("tie_word_embeddings", False),
        "attention_bias": f.flag("attention_bias", False),
        "bos_token_id": f.token_id("bos_token_id", 1),
        "eos_token_id": f.token_id("eos_token_id", 2),
    }


def _minimind(f: ConfigFields) -> dict[str, Any]:
    hidden = f.integer("hidden_size", 640, minimum=1)
    inter = f.integer("intermediate_size", 0) or minimind_intermediate_size(hidden)
    # MiniMind-3 / Qwen3-MoE naming: num_experts and moe_intermediate_size.
    n_routed = f.integer("n_routed_experts", f.integer("num_experts", 0))
    use_moe = f.flag("use_moe", n_routed > 0)
    heads = f.integer("num_attention_heads", 8, minimum=1)
    return {
        "model_type": "minimind",
        "vocab_size": f.integer("vocab_size", 6400, minimum=1),
        "hidden_size": hidden,
        "num_hidden_layers": f.integer("num_hidden_layers", 8, minimum=1),
        "num_attention_heads": heads,
        "num_key_value_heads": f.integer("num_key_value_heads", heads, minimum=1),
        "head_dim": f.integer("head_dim", hidden // heads, minimum=1),
        "intermediate_size": f.integer("moe_intermediate_size", inter) if use_moe else inter,
        "rms_norm_eps": f.number("rms_norm_eps", 1e-5),
        "rope_theta": rope_theta(f, 1e6),
        "max_position_embeddings": f.integer("max_position_embeddings", 32768, minimum=1),
        "tie_word_embeddings": f.flag("tie_word_embeddings", True),
        "qk_norm": "head" if f.flag("qk_norm", f.flag("use_qk_norm", False)) else "none",
        "use_moe": use_moe,
        "n_routed_experts": n_routed or 4,
        "num_experts_per_tok": f.integer("num_experts_per_tok", 2, minimum=1),
        "n_shared_experts": f.integer("n_shared_experts", 1 if "n_routed_experts" in f.raw else 0)
        if use_moe
        else 0,
        "shared_intermediate_size": f.integer(
            "shared_expert_intermediate_size", f.integer("shared_intermediate_size", inter)
        ),
        "norm_topk_prob": f.flag("norm_topk_prob", True),
        "scoring_func": f.raw.get("scoring_func") or "softmax",
        "bos_token_id": f.token_id("bos_token_id", 1),
        "eos_token_id": f.token_id("eos_token_id", 2),
    }


def _llama(f: ConfigFields) -> dict[str, Any]:
    return {
        **_common(f, "llama"),
        "rms_norm_eps": f.number("rms_norm_eps", 1e-6),
        "intermediate_size": f.integer("intermediate_size", minimum=1),
        "tie_word_embeddings": f.flag("tie_word_embeddings", True),
        "use_moe": False,
        "n_shared_experts": 0,
    }


def _routed(f: ConfigFields, experts_key: str, expert_size_key: str, norm: bool) -> dict:
    return {
        "use_moe": True,
        "n_routed_experts": f.integer(experts_key, minimum=1),
        "num_experts_per_tok": f.integer("num_experts_per_tok", minimum=1),
        "intermediate_size": f.integer(expert_size_key, minimum=1),
        "norm_topk_prob": norm,
        "n_shared_experts": 0,
    }


def _window(f: ConfigFields) -> int | None:
    """The sliding window when the config turns it on (Qwen: use_sliding_window)."""
    if not f.flag("use_sliding_window", True):
        return None
    window = f.integer("sliding_window", 0)
    return window or None


def _qwen_dense_layers(f: ConfigFields, n_layers: int) -> tuple[int, ...]:
    step = f.integer("decoder_sparse_step", 1, minimum=1)
    only_mlp = set(f.int_list("mlp_only_layers"))
    return tuple(i for i in range(n_layers) if i in only_mlp or (i + 1) % step != 0)


def _mixtral(f: ConfigFields) -> dict[str, Any]:
    return {
        **_common(f, "mixtral", 1e6),
        "rms_norm_eps": f.number("rms_norm_eps", 1e-5),
        **_routed(f, "num_local_experts", "intermediate_size", norm=True),
        "sliding_window": _window(f),
    }


def _qwen2_moe(f: ConfigFields) -> dict[str, Any]:
    common = _common(f, "qwen2_moe")
    shared = f.integer("shared_expert_intermediate_size", 0)
    return {
        **common,
        # Qwen2-MoE's q/k/v always carry a bias; transformers 5 writes it as qkv_bias.
        "attention_bias": f.flag("qkv_bias", True),
        **_routed(f, "num_experts", "moe_intermediate_size", f.flag("norm_topk_prob", False)),
        "n_shared_experts": 1 if shared else 0,
        "shared_intermediate_size": shared or 1,
        "shared_expert_gate": bool(shared),
        "dense_layers": _qwen_dense_layers(f, common["num_hidden_layers"]),
        "dense_intermediate_size": f.integer("intermediate_size", minimum=1),
        "sliding_window": _window(f),
    }


def _qwen3_moe(f: ConfigFields) -> dict[str, Any]:
    common = _common(f, "qwen3_moe")
    experts_key = "num_experts" if "num_experts" in f.raw else "num_local_experts"
    return {
        **common,
        "qk_norm": "head",
        **_routed(f, experts_key, "moe_intermediate_size", f.flag("norm_topk_prob", False)),
        "dense_layers": _qwen_dense_layers(f, common["num_hidden_layers"]),
        "dense_intermediate_size": f.integer("intermediate_size", minimum=1),
        "sliding_window": _window(f),
    }


def _olmoe(f: ConfigFields) -> dict[str, Any]:
    clip = f.raw.get("clip_qkv")
    return {
        **_common(f, "olmoe"),
        "rms_norm_eps": f.number("rms_norm_eps", 1e-5),
        "qk_norm": "full",
        "clip_qkv": None if clip is None else f.number("clip_qkv", 0.0),
        **_routed(f, "num_experts", "intermediate_size", f.flag("norm_topk_prob", False)),
    }


def _granitemoe(f: ConfigFields) -> dict[str, Any]:
    return {
        **_common(f, "granitemoe"),
        # top-k of the logits, then softmax over the k = a renormalised softmax top-k
        **_routed(f, "num_local_experts", "intermediate_size", norm=True),
        "attention_scale": f.number("attention_multiplier", 1.0),
        "embedding_multiplier": f.number("embedding_multiplier", 1.0),
        "residual_multiplier": f.number("residual_multiplier", 1.0),
        "logits_scaling": f.number("logits_scaling", 1.0),
    }


def _deepseek(f: ConfigFields) -> dict[str, Any]:
    common = _common(f, "deepseek")
    if f.raw.get("topk_method", "greedy") != "greedy":
        raise MoechatError(f"DeepSeek topk_method {f.raw['topk_method']!r} is not supported")
    if f.raw.get("scoring_func", "softmax") != "softmax":
        raise MoechatError(f"DeepSeek scoring_func {f.raw['scoring_func']!r} is not supported")
    expert = f.integer("moe_intermediate_size", minimum=1)
    n_shared = f.integer("n_shared_experts", 0)
    first_dense = f.integer("first_k_dense_replace", 0)
    freq = f.integer("moe_layer_freq", 1, minimum=1)
    n_layers = common["num_hidden_layers"]
    return {
        **common,
        **_routed(f, "n_routed_experts", "moe_intermediate_size", f.flag("norm_topk_prob", False)),
        # DeepSeek's shared experts are one MLP n_shared_experts times an expert's width
        "n_shared_experts": 1 if n_shared else 0,
        "shared_intermediate_size": expert * max(n_shared, 1),
        "dense_layers": tuple(i for i in range(n_layers) if i < first_dense or i % freq != 0),
        "dense_intermediate_size": f.integer("intermediate_size", minimum=1),
    }


def _mla_rope(f: ConfigFields) -> dict[str, Any]:
    """rope_theta and YaRN's parameters (``rope_parameters`` or deepseek-ai's ``rope_scaling``);
    other scaled RoPE types are refused."""
    params = f.raw.get("rope_parameters") or f.raw.get("rope_scaling") or {}
    if not isinstance(params, dict):
        raise MoechatError("config.json: 'rope_parameters' must be an object")
    kind = params.get("rope_type", params.get("type", "default"))
    theta = ConfigFields({"rope_theta": params.get("rope_theta", f.raw.get("rope_theta"))})
    values: dict[str, Any] = {"rope_theta": theta.number("rope_theta", 10000.0)}
    if kind in ("default", None):
        return values
    if kind != "yarn":
        raise MoechatError(f"RoPE scaling {kind!r} is not supported yet (config.json)")
    p = ConfigFields(params)
    original = p.integer("original_max_position_embeddings", minimum=1)
    factor = p.number("factor", f.integer("max_position_embeddings", 4096) / original)
    if factor <= 0:
        raise MoechatError("config.json: YaRN 'factor' must be positive")
    return values | {
        "yarn_factor": factor,
        "yarn_original_max_position": original,
        "yarn_beta_fast": p.number("beta_fast", 32.0) or 32.0,
        "yarn_beta_slow": p.number("beta_slow", 1.0) or 1.0,
        "yarn_mscale": p.number("mscale", 0.0),
        "yarn_mscale_all_dim": p.number("mscale_all_dim", 0.0),
        "yarn_attention_factor": p.number("attention_factor", 0.0),
        "yarn_truncate": p.flag("truncate", True),
    }


def _deepseek_mla(f: ConfigFields, family: Family) -> dict[str, Any]:
    """DeepSeek-V2/V3 as transformers' classes read them (models/mla.py)."""
    rope = _mla_rope(f)
    plain = {k: v for k, v in f.raw.items() if k not in ("rope_parameters", "rope_scaling")}
    common = _common(ConfigFields({**plain, "rope_theta": rope["rope_theta"]}), family)
    if f.flag("mlp_bias", False):
        raise MoechatError("DeepSeek with mlp_bias is not supported")
    expert = f.integer("moe_intermediate_size", minimum=1)
    n_shared = f.integer("n_shared_experts", 0)
    n_group = f.integer("n_group", 1, minimum=1)
    return {
        **common,
        **_routed(f, "n_routed_experts", "moe_intermediate_size", norm=False),
        "n_shared_experts": 1 if n_shared else 0,
        "shared_intermediate_size": expert * max(n_shared, 1),
        # transformers: MoE from layer first_k_dense_replace on (moe_layer_freq unused)
        "dense_layers": tuple(range(min(f.integer("first_k_dense_replace", 0),
                                        common["num_hidden_layers"]))),
        "dense_intermediate_size": f.integer("intermediate_size", minimum=1),
        "n_group": n_group,
        "topk_group": f.integer("topk_group", n_group, minimum=1),
        "routed_scaling_factor": f.number("routed_scaling_factor", 1.0),
        "kv_lora_rank": f.integer("kv_lora_rank", 512, minimum=1),
        "q_lora_rank": f.integer("q_lora_rank", 0),
        "qk_nope_head_dim": f.integer("qk_nope_head_dim", 128, minimum=1),
        "qk_rope_head_dim": f.integer("qk_rope_head_dim", 64, minimum=2),
        "v_head_dim": f.integer("v_head_dim", 128, minimum=1),
        **rope,
    }  # fmt: skip


def _deepseek_v2(f: ConfigFields) -> dict[str, Any]:
    method = f.raw.get("topk_method") or "greedy"
    if method not in ("greedy", "group_limited_greedy"):
        raise MoechatError(f"DeepSeek-V2 topk_method {method!r} is not supported")
    # transformers' V2 router: softmax, no renormalisation (norm_topk_prob is not read);
    # its rotary embedding is complex, i.e. interleaved pairs
    return {**_deepseek_mla(f, "deepseek_v2"), "topk_method": method, "rope_interleave": True}


def _deepseek_v3(f: ConfigFields) -> dict[str, Any]:
    method = f.raw.get("topk_method") or "noaux_tc"
    if method != "noaux_tc" or (f.raw.get("scoring_func") or "sigmoid") != "sigmoid":
        raise MoechatError(f"DeepSeek-V3 routing {method!r} is not supported (noaux_tc only)")
    values = _deepseek_mla(f, "deepseek_v3")
    return {
        **values,
        "bos_token_id": f.token_id("bos_token_id", 0),
        "eos_token_id": f.token_id("eos_token_id", 1),
        "topk_method": "noaux_tc",
        "scoring_func": "sigmoid",
        "score_correction_bias": True,
        "norm_topk_prob": f.flag("norm_topk_prob", True),
        "n_group": f.integer("n_group", 8, minimum=1),
        "topk_group": f.integer("topk_group", 4, minimum=1),
        "routed_scaling_factor": f.number("routed_scaling_factor", 2.5),
        "rope_interleave": f.flag("rope_interleave", True),
    }


CONFIG_READERS: dict[str, Callable[[ConfigFields], dict[str, Any]]] = {
    "minimind": _minimind,
    "llama": _llama,
    "mixtral": _mixtral,
    "qwen2_moe": _qwen2_moe,
    "qwen3_moe": _qwen3_moe,
    "olmoe": _olmoe,
    "granitemoe": _granitemoe,
    "deepseek": _deepseek,
    "deepseek_v2": _deepseek_v2,
    "deepseek_v3": _deepseek_v3,
}
assert set(CONFIG_READERS) == set(SUPPORTED_MODEL_TYPES)


def config_from_hf(raw: dict[str, Any]) -> ModelConfig:
    """A :class:`ModelConfig` from a Hugging Face ``config.json`` of a supported family."""
    f = ConfigFields(raw)
    model_type = raw.get("model_type") or "minimind"
    reader = CONFIG_READERS.get(model_type) if isinstance(model_type, str) else None
    if reader is None:
        raise MoechatError(
            f"unsupported architecture {model_type!r} "
            f"(supported: {', '.join(SUPPORTED_MODEL_TYPES)})"
        )
    return ModelConfig(**reader(f))


# -- checkpoint keys ------------------------------------------------------------------

_RENAMES: list[tuple[re.Pattern[str], str]] = [
    (re.compile(p), r)
    for p, r in [
        # Mixtral
        (r"\.block_sparse_moe\.gate\.", ".mlp.gate."),
        (r"\.block_sparse_moe\.experts\.(\d+)\.w1\.", r".mlp.experts.\1.gate_proj."),
        (r"\.block_sparse_moe\.experts\.(\d+)\.w3\.", r".mlp.experts.\1.up_proj."),
        (r"\.block_sparse_moe\.experts\.(\d+)\.w2\.", r".mlp.experts.\1.down_proj."),
        # Granite's router
        (r"\.block_sparse_moe\.router\.layer\.", ".mlp.gate."),
        # Qwen2-MoE: one shared expert; DeepSeek: the shared experts as one MLP
        (r"\.mlp\.shared_expert\.", ".mlp.shared_experts.0."),
        (r"\.mlp\.shared_experts\.(gate|up|down)_proj\.", r".mlp.shared_experts.0.\1_proj."),
    ]
]

# Stacked expert tensors: Granite's fused input/output linears, and the packed layout
# recent transformers versions write (gate_up_proj [E, 2I, H], down_proj [E, H, I]).
_STACKED = re.compile(
    r"^(?P<layer>.*)\.(?:block_sparse_moe\.(?P<granite>input_linear|output_linear)"
    r"|mlp\.experts\.(?P<packed>gate_up_proj|down_proj))(?:\.weight)?$"
)


@dataclass(frozen=True)
class ExpertView:
    """One expert's matrix ([rows, cols], as :class:`CausalLM` names it) inside a stacked
    tensor: ``stored[expert, offset : offset + rows]`` of a ``[E, rows_total, cols]``
    tensor, or, ``transposed`` (``[E, cols, rows_total]``), the same rows as columns."""

    expert: int
    offset: int
    rows: int
    cols: int
    transposed: bool

    def of(self, stacked: torch.Tensor) -> torch.Tensor:
        rows = slice(self.offset, self.offset + self.rows)
        return stacked[self.expert, :, rows].T if self.transposed else stacked[self.expert, rows]

    def stored_index(self, index: tuple | slice) -> tuple[slice, slice, slice]:
        """Where ``matrix[index]`` (a slice of rows, and of columns) lies in the stacked
        tensor: read it there and transpose if :attr:`transposed`."""
        parts = index if isinstance(index, tuple) else (index,)
        rows, cols = (*parts, slice(None), slice(None))[:2]
        if rows.step not in (None, 1) or cols.step not in (None, 1):
            raise ValueError(f"an expert view reads contiguous slices, not {index}")
        r0, r1, _ = rows.indices(self.rows)
        c0, c1, _ = cols.indices(self.cols)
        expert = slice(self.expert, self.expert + 1)
        rows = slice(self.offset + r0, self.offset + max(r0, r1))
        cols = slice(c0, max(c0, c1))
        return (expert, cols, rows) if self.transposed else (expert, rows, cols)


def stacked_views(key: str, shape: tuple[int, ...], cfg: ModelConfig) -> dict[str, ExpertView]:
    """The per-expert matrices (internal names) a stacked expert tensor holds."""
    match = _STACKED.match(key)
    assert match is not None
    part = match["granite"] or match["packed"]
    prefix = f"{match['layer']}.mlp.experts"
    n, inter, hidden = cfg.n_routed_experts, cfg.intermediate_size, cfg.hidden_size
    fused = part in ("input_linear", "gate_up_proj")
    rows, cols = (2 * inter, hidden) if fused else (hidden, inter)
    if len(shape) != 3 or shape[0] != n or tuple(shape[1:]) not in ((rows, cols), (cols, rows)):
        raise MoechatError(f"{key} has shape {tuple(shape)}, expected [{n}, {rows}, {cols}]")
    out: dict[str, ExpertView] = {}
    if fused:
        # [E, 2I, H]; the older packed layout is [E, H, 2I]
        flipped = tuple(shape[1:]) == (hidden, 2 * inter) and hidden != 2 * inter
        for e in range(n):
            out[f"{prefix}.{e}.gate_proj.weight"] = ExpertView(e, 0, inter, hidden, flipped)
            out[f"{prefix}.{e}.up_proj.weight"] = ExpertView(e, inter, inter, hidden, flipped)
    else:
        flipped = tuple(shape[1:]) == (inter, hidden) and inter != hidden
        for e in range(n):
            out[f"{prefix}.{e}.down_proj.weight"] = ExpertView(e, 0, hidden, inter, flipped)
    return out


def is_stacked(key: str) -> bool:
    return _STACKED.match(key) is not None


def to_internal_keys(
    state: dict[str, torch.Tensor], cfg: ModelConfig, rearrange: bool = True
) -> dict[str, torch.Tensor]:
    """Rename a family's checkpoint keys to :class:`CausalLM`'s (and split stacked experts);
    ``rearrange``: also MLA's rows (False: names only, for a checkpoint read lazily, which
    applies :func:`moechat.models.mla.rope_row_order` as it reads)."""
    out: dict[str, torch.Tensor] = {}
    for key, tensor in state.items():
        if _STACKED.match(key):
            views = stacked_views(key, tuple(tensor.shape), cfg)
            out.update({name: view.of(tensor) for name, view in views.items()})
            continue
        for pattern, replacement in _RENAMES:
            key = pattern.sub(replacement, key)
        out[key] = tensor
    if cfg.is_mla and rearrange:
        out = prepare_mla_state(out, cfg)
    return out
