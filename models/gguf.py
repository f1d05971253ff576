"""Read llama.cpp's GGUF files into a :class:`LoadedCheckpoint`.

Architectures: ``llama`` (dense, or Mixtral with ``llama.expert_count``), ``qwen2moe``,
``qwen3moe``, ``olmoe``, ``granitemoe``, ``deepseek`` (DeepSeek-MoE v1) and ``deepseek2``
(DeepSeek-V2/V3 with MLA attention: models/gguf_mla.py). Weights are dequantised with
the ``gguf`` package (F32, F16, BF16, Q8_0, Q4_0, Q4_1, K-quants ...).

What llama.cpp's converter (``convert_hf_to_gguf.py``) does to a checkpoint, undone here:

- for the architectures llama.cpp runs with its interleaved RoPE (pairs ``x[2i],
  x[2i+1]``: llama, granitemoe, deepseek) it permutes the rows of ``attn_q`` / ``attn_k``
  (weights and biases) so that they pair what Hugging Face's rotate-half RoPE pairs
  (``x[i], x[i + d/2]``); :func:`unpermute_rope_rows` undoes it. The NeoX-RoPE
  architectures (qwen2moe, qwen3moe, olmoe) are stored unpermuted;
- routed experts are stacked: ``ffn_{gate,up,down}_exps`` [E, out, in], split here into
  MiniMind's per-expert keys; ``--fuse-qkv`` files hold q, k and v in one ``attn_qkv``;
- routing facts the file does not carry are fixed per architecture in llama.cpp's graphs
  (renormalised top-k for llama and granitemoe and qwen3moe, not for qwen2moe, olmoe and
  deepseek) and are read from :data:`ARCHITECTURES` the same way;
- widths (expert, shared expert, dense layers) and the dense/MoE layer schedule come from
  the tensors (a layer with ``ffn_gate_inp`` is MoE): llama.cpp's metadata for them is
  optional and differs between architectures.

The GGUF also carries the tokenizer (``tokenizer.ggml.*``: byte-level BPE or
SentencePiece vocabulary) and the chat template; :func:`write_tokenizer_files`
(models/gguf_tokenizer.py) turns them into ``tokenizer.json`` for the ``tokenizers``
library and ``tokenizer_config.json`` with the ``chat_template``.
"""

from __future__ import annotations

import atexit
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from moechat.models.config import Family, ModelConfig, QKNorm
from moechat.models.gguf_mla import MLA_LAYER_KEYS, join_kv_b, mla_values
from moechat.models.gguf_tokenizer import field as field  # re-exported
from moechat.models.gguf_tokenizer import tokenizer_json as tokenizer_json  # re-exported
from moechat.models.gguf_tokenizer import write_tokenizer_files
from moechat.models.loading import LoadedCheckpoint, build_model
from moechat.runtime.errors import MoechatError

_LAYER_KEYS = {
    "attn_norm.weight": "input_layernorm.weight",
    "ffn_norm.weight": "post_attention_layernorm.weight",
    "attn_q.weight": "self_attn.q_proj.weight",
    "attn_k.weight": "self_attn.k_proj.weight",
    "attn_v.weight": "self_attn.v_proj.weight",
    "attn_q.bias": "self_attn.q_proj.bias",
    "attn_k.bias": "self_attn.k_proj.bias",
    "attn_v.bias": "self_attn.v_proj.bias",
    "attn_output.weight": "self_attn.o_proj.weight",
    "attn_q_norm.weight": "self_attn.q_norm.weight",
    "attn_k_norm.weight": "self_attn.k_norm.weight",
    "ffn_gate.weight": "mlp.gate_proj.weight",
    "ffn_up.weight": "mlp.up_proj.weight",
    "ffn_down.weight": "mlp.down_proj.weight",
    "ffn_gate_inp.weight": "mlp.gate.weight",
    "ffn_gate_inp_shexp.weight": "mlp.shared_expert_gate.weight",
    "ffn_gate_shexp.weight": "mlp.shared_experts.0.gate_proj.weight",
    "ffn_up_shexp.weight": "mlp.shared_experts.0.up_proj.weight",
    "ffn_down_shexp.weight": "mlp.shared_experts.0.down_proj.weight",
    **MLA_LAYER_KEYS,
}
# Stacked routed experts [E, out, in] -> the projection each expert's slice is.
_STACKED_EXPERTS = {
    "ffn_gate_exps.weight": "gate_proj",
    "ffn_up_exps.weight": "up_proj",
    "ffn_down_exps.weight": "down_proj",
}
_FUSED_QKV = ("attn_qkv.weight", "attn_qkv.bias")  # convert --fuse-qkv
_GLOBAL_KEYS = {
    "token_embd.weight": "model.embed_tokens.weight",
    "output_norm.weight": "model.norm.weight",
    "output.weight": "lm_head.weight",
}


@dataclass(frozen=True)
class Architecture:
    """What a GGUF architecture means, as llama.cpp's graph for it runs the model."""

    family: Family
    permuted_qk: bool  # the converter permuted q/k rows for llama.cpp's interleaved RoPE
    norm_topk_prob: bool  # fixed in llama.cpp's graph, not stored in the file
    qk_norm: QKNorm = "none"


ARCHITECTURES: dict[str, Architecture] = {
    "llama": Architecture("llama", permuted_qk=True, norm_topk_prob=True),  # MoE: Mixtral
    "qwen2moe": Architecture("qwen2_moe", permuted_qk=False, norm_topk_prob=False),
    "qwen3moe": Architecture("qwen3_moe", permuted_qk=False, norm_topk_prob=True, qk_norm="head"),
    "olmoe": Architecture("olmoe", permuted_qk=False, norm_topk_prob=False, qk_norm="full"),
    "granitemoe": Architecture("granitemoe", permuted_qk=True, norm_topk_prob=True),
    "deepseek": Architecture("deepseek", permuted_qk=True, norm_topk_prob=False),
    # MLA; family, routing and the rope layout come from models/gguf_mla.py
    "deepseek2": Architecture("deepseek_v2", permuted_qk=False, norm_topk_prob=False),
}
_SOFTMAX_GATING = 1  # llama.cpp's LLAMA_EXPERT_GATING_FUNC_TYPE_SOFTMAX


def open_gguf(path: Path):
    """A ``gguf.GGUFReader`` for ``path``; a truncated or corrupt file is a MoechatError."""
    try:
        import gguf
    except ImportError:
        raise MoechatError(
            "reading GGUF files needs the gguf package (pip install 'moechat[export]')"
        ) from None
    path = Path(path)
    if not path.is_file():
        raise MoechatError(f"GGUF file not found: {path}")
    try:
        reader = gguf.GGUFReader(str(path))
        for tensor in reader.tensors:  # touch every tensor's extent: catches truncation
            end = int(tensor.data_offset) + int(tensor.n_bytes)
            if end > path.stat().st_size or tensor.data.nbytes != tensor.n_bytes:
                raise ValueError(f"tensor {tensor.name} extends past the end of the file")
    except MoechatError:
        raise
    except Exception as err:  # the reader raises ValueError, IndexError, struct errors ...
        first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise MoechatError(
            f"{path.name} is not a readable GGUF file (truncated or corrupt?): {first}"
        ) from None
    return reader


def architecture(reader) -> tuple[str, Architecture]:
    """``general.architecture`` and what it means; unknown ones are a one-line error."""
    name = field(reader, "general.architecture")
    if isinstance(name, str) and name in ARCHITECTURES:
        return name, ARCHITECTURES[name]
    raise MoechatError(
        f"unsupported GGUF architecture {name!r} (supported: {', '.join(ARCHITECTURES)})"
    )


class Metadata:
    """Typed reads of ``<arch>.*`` metadata: a missing or wrong value is a one-line error."""

    def __init__(self, reader, arch: str) -> None:
        self.reader, self.arch = reader, arch

    def _value(self, key: str, default: Any) -> Any:
        return field(self.reader, f"{self.arch}.{key}", default)

    def has(self, key: str) -> bool:
        return f"{self.arch}.{key}" in self.reader.fields

    def text(self, key: str, default: str) -> str:
        value = self._value(key, default)
        if not isinstance(value, str):
            raise MoechatError(f"GGUF metadata {self.arch}.{key} must be a string, got {value!r}")
        return value

    def flag(self, key: str, default: bool) -> bool:
        value = self._value(key, default)
        if not isinstance(value, bool):
            raise MoechatError(
                f"GGUF metadata {self.arch}.{key} must be true or false, got {value!r}"
            )
        return value

    def integer(self, key: str, default: int | None = None, minimum: int = 0) -> int:
        value = self._value(key, default)
        name = f"GGUF metadata {self.arch}.{key}"
        if value is None:
            raise MoechatError(f"{name} is missing")
        if isinstance(value, bool) or not isinstance(value, int):
            raise MoechatError(f"{name} must be an integer, got {value!r}")
        if value < minimum:
            raise MoechatError(f"{name} must be at least {minimum}, got {value}")
        return value

    def number(self, key: str, default: float) -> float:
        """A float32 value as the decimal it was written from (1e-06, not 9.99999997e-07)."""
        value = self._value(key, default)
        if isinstance(value, bool) or not isinstance(value, int | float) or value != value:
            raise MoechatError(f"GGUF metadata {self.arch}.{key} must be a number, got {value!r}")
        return float(str(np.float32(value)))


def tensor_shapes(reader) -> dict[str, tuple[int, ...]]:
    """Tensor name -> shape in PyTorch order ([E, out, in] for stacked experts)."""
    return {t.name: tuple(int(d) for d in reversed(t.shape)) for t in reader.tensors}


def _width(shapes: dict[str, tuple[int, ...]], kind: str, default: int) -> int:
    """The FFN width of the first block holding ``kind`` ("", "_exps" or "_shexp")."""
    for name, shape in shapes.items():
        if name.startswith("blk.") and name.endswith(f".ffn_up{kind}.weight"):
            return shape[-2]
    return default


def gguf_config(reader, max_positions: int | None = None) -> ModelConfig:
    """A :class:`ModelConfig` from the GGUF's ``<arch>.*`` metadata and tensor shapes."""
    arch_name, arch = architecture(reader)
    meta = Metadata(reader, arch_name)
    mla = arch_name == "deepseek2"  # its head sizes, YaRN and routing: models/gguf_mla.py
    scaling = field(reader, f"{arch_name}.rope.scaling.type", "none")
    if (scaling not in ("none", None) and not mla) or any(
        t.name == "rope_freqs.weight" for t in reader.tensors
    ):
        raise MoechatError(f"GGUF RoPE scaling ({scaling}) is not supported")
    hidden = meta.integer("embedding_length", minimum=1)
    heads = meta.integer("attention.head_count", minimum=1)
    layers = meta.integer("block_count", minimum=1)
    head_dim = meta.integer("attention.key_length", hidden // heads, minimum=1)
    if not mla and meta.integer("rope.dimension_count", head_dim) != head_dim:
        raise MoechatError("GGUF with partial rotary embeddings is not supported")
    if not mla and (meta.integer("attention.value_length", head_dim) != head_dim or head_dim % 2):
        raise MoechatError(f"GGUF head size {head_dim} (keys/values) is not supported")
    shapes = tensor_shapes(reader)
    blocks = {name.split(".")[1] for name in shapes if name.startswith("blk.")}
    if layers > len(blocks):  # before anything loops over (or builds) block_count layers
        raise MoechatError(
            f"GGUF metadata says {layers} layers (block_count), the file holds tensors for "
            f"{len(blocks)}"
        )
    moe_layers = [i for i in range(layers) if f"blk.{i}.ffn_gate_inp.weight" in shapes]
    experts = meta.integer("expert_count", 0)
    _check_routing(meta, experts, moe_layers, mla)
    ffn = meta.integer("feed_forward_length", 0)
    tokens = field(reader, "tokenizer.ggml.tokens") or []
    window = meta.integer("attention.sliding_window", 0)
    family: Family = "mixtral" if arch.family == "llama" and experts else arch.family
    values: dict[str, Any] = {
        "model_type": family,
        "vocab_size": meta.integer("vocab_size", len(tokens) or None, minimum=1),
        "hidden_size": hidden,
        "num_hidden_layers": layers,
        "num_attention_heads": heads,
        "num_key_value_heads": meta.integer("attention.head_count_kv", heads, minimum=1),
        "head_dim": head_dim,
        "intermediate_size": _width(shapes, "_exps" if experts else "", ffn) or 1,
        "rms_norm_eps": meta.number("attention.layer_norm_rms_epsilon", 1e-5),
        "rope_theta": meta.number("rope.freq_base", 10000.0),
        "max_position_embeddings": meta.integer("context_length", 4096, minimum=1),
        "tie_word_embeddings": "output.weight" not in shapes,
        "qk_norm": arch.qk_norm,
        "attention_bias": any(n.endswith((".attn_q.bias", ".attn_qkv.bias")) for n in shapes),
        "sliding_window": window or None,
        "use_moe": bool(experts),
        "n_routed_experts": experts or 4,
        "num_experts_per_tok": meta.integer("expert_used_count", minimum=1) if experts else 2,
        "norm_topk_prob": arch.norm_topk_prob,
        "bos_token_id": int(field(reader, "tokenizer.ggml.bos_token_id", 1)),
        "eos_token_id": int(field(reader, "tokenizer.ggml.eos_token_id", 2)),
        **_shared_experts(shapes),
        **(_dense_layers(shapes, layers, moe_layers, ffn) if experts else {}),
        **(_granite_scales(meta) if family == "granitemoe" else {}),
        **(mla_values(meta, shapes) if mla else {}),
    }
    return ModelConfig(**values)


def _check_routing(meta: Metadata, experts: int, moe_layers: list[int], mla: bool) -> None:
    """Refuse routing this model cannot run: softmax top-k, unscaled, is what it has
    (deepseek2's sigmoid, grouped and scaled routers: models/gguf_mla.py)."""
    if bool(experts) != bool(moe_layers):
        raise MoechatError(
            f"GGUF {meta.arch}.expert_count is {experts} but {len(moe_layers)} blocks have "
            "a router (ffn_gate_inp)"
        )
    if mla:
        return
    if meta.integer("expert_gating_func", _SOFTMAX_GATING) != _SOFTMAX_GATING:
        raise MoechatError("GGUF expert gating other than softmax is not supported")
    if meta.number("expert_weights_scale", 1.0) not in (0.0, 1.0):
        raise MoechatError("GGUF expert_weights_scale (scaled routing weights) is not supported")


def _shared_experts(shapes: dict[str, tuple[int, ...]]) -> dict[str, Any]:
    """One always-on shared expert (DeepSeek's n shared experts are one MLP n times as
    wide), scaled by sigmoid(ffn_gate_inp_shexp . x) where that tensor exists (Qwen2)."""
    width = _width(shapes, "_shexp", 0)
    gated = any(name.endswith(".ffn_gate_inp_shexp.weight") for name in shapes)
    return {
        "n_shared_experts": 1 if width else 0,
        "shared_intermediate_size": width or 1,
        "shared_expert_gate": bool(width) and gated,
    }


def _dense_layers(
    shapes: dict[str, tuple[int, ...]], layers: int, moe_layers: list[int], ffn: int
) -> dict[str, Any]:
    """The blocks without a router are plain FFNs (DeepSeek's leading dense blocks)."""
    return {
        "dense_layers": tuple(i for i in range(layers) if i not in moe_layers),
        "dense_intermediate_size": _width(shapes, "", ffn),
    }


def _granite_scales(meta: Metadata) -> dict[str, float]:
    """Granite's multipliers; llama.cpp reads 0 (or absent) as "no scaling"."""
    return {
        "attention_scale": meta.number("attention.scale", 0.0),
        "embedding_multiplier": meta.number("embedding_scale", 0.0) or 1.0,
        "residual_multiplier": meta.number("residual_scale", 0.0) or 1.0,
        "logits_scaling": meta.number("logit_scale", 0.0) or 1.0,
    }


def unpermute_rope_rows(weight: np.ndarray, n_heads: int) -> np.ndarray:
    """Undo llama.cpp's ``permute`` of q/k rows (interleaved -> rotate-half RoPE).

    llama.cpp: ``w.reshape(n, 2, d/2, H).swapaxes(1, 2).reshape(w.shape)``; the inverse
    reshapes to ``(n, d/2, 2, H)`` and swaps back. Biases (1-D) are permuted the same way.
    """
    rows = weight.shape[0]
    return (
        weight.reshape(n_heads, rows // n_heads // 2, 2, *weight.shape[1:])
        .swapaxes(1, 2)
        .reshape(weight.shape)
    )


def dequantize(tensor) -> np.ndarray:
    """float32 array in PyTorch layout ([out, in] for matrices, [E, out, in] for experts)."""
    from gguf.quants import dequantize as _dequantize

    try:
        data = _dequantize(tensor.data, tensor.tensor_type)
    except Exception as err:
        raise MoechatError(
            f"cannot dequantise {tensor.name} ({tensor.tensor_type.name}): {err}"
        ) from None
    shape = tuple(int(d) for d in reversed(tensor.shape))
    out = np.ascontiguousarray(data.reshape(shape), dtype=np.float32)
    return out if out.flags.writeable else out.copy()  # F32 tensors are views of the file


@dataclass(frozen=True)
class Place:
    """Where a :class:`CausalLM` layer weight lies in a ``blk.N.*`` tensor (PyTorch
    layout): ``tensor[expert]`` if stacked, then rows ``offset : offset + rows``."""

    expert: int | None
    offset: int
    rows: int

    def of(self, weight: np.ndarray) -> np.ndarray:
        whole = weight if self.expert is None else weight[self.expert]
        return whole[self.offset : self.offset + self.rows]


def block_layout(rest: str, shape: tuple[int, ...], cfg: ModelConfig) -> dict[str, Place]:
    """One ``blk.N.<rest>`` tensor of ``shape`` as :class:`CausalLM` layer keys (under
    ``model.layers.N.``): stacked experts and fused q/k/v are split."""
    if rest in _STACKED_EXPERTS:
        if len(shape) != 3 or shape[0] != cfg.n_routed_experts:
            raise MoechatError(
                f"GGUF tensor {rest} has shape {tuple(shape)}, expected "
                f"[{cfg.n_routed_experts}, ...] (expert_count)"
            )
        proj = _STACKED_EXPERTS[rest]
        return {f"mlp.experts.{e}.{proj}.weight": Place(e, 0, shape[1]) for e in range(shape[0])}
    if rest in _FUSED_QKV:
        kind = rest.split(".")[1]
        q = cfg.num_attention_heads * cfg.head_dim
        kv = cfg.num_key_value_heads * cfg.head_dim
        if shape[0] != q + 2 * kv:
            raise MoechatError(f"GGUF tensor {rest} has {shape[0]} rows, expected {q + 2 * kv}")
        return {
            f"self_attn.q_proj.{kind}": Place(None, 0, q),
            f"self_attn.k_proj.{kind}": Place(None, q, kv),
            f"self_attn.v_proj.{kind}": Place(None, q + kv, kv),
        }
    if rest not in _LAYER_KEYS:
        raise MoechatError(f"unsupported GGUF tensor {rest!r}")
    return {_LAYER_KEYS[rest]: Place(None, 0, shape[0])}


def tensor_places(name: str, shape: tuple[int, ...], cfg: ModelConfig) -> dict[str, Place]:
    """The :class:`CausalLM` weights GGUF tensor ``name`` (of ``shape``) holds."""
    if name in _GLOBAL_KEYS:
        return {_GLOBAL_KEYS[name]: Place(None, 0, shape[0])}
    if name.startswith("blk.") and name.count(".") >= 2 and name.split(".")[1].isdigit():
        _, idx, rest = name.split(".", 2)
        layer = block_layout(rest, shape, cfg)
        return {f"model.layers.{int(idx)}.{key}": place for key, place in layer.items()}
    raise MoechatError(f"unsupported GGUF tensor {name}")


def rope_row_order(key: str, rows: int, cfg: ModelConfig) -> np.ndarray | None:
    """For q/k of an architecture whose q/k rows llama.cpp permuted: the stored row of
    each row in Hugging Face's order (None: rows as stored)."""
    if ".q_proj." in key:
        return unpermute_rope_rows(np.arange(rows), cfg.num_attention_heads)
    if ".k_proj." in key:
        return unpermute_rope_rows(np.arange(rows), cfg.num_key_value_heads)
    return None


def gguf_state_dict(reader, cfg: ModelConfig) -> dict[str, torch.Tensor]:
    """The GGUF's tensors, dequantised, under :class:`CausalLM`'s names."""
    _, arch = architecture(reader)
    state: dict[str, torch.Tensor] = {}
    for tensor in reader.tensors:
        name = tensor.name
        weight = dequantize(tensor)
        places = tensor_places(name, weight.shape, cfg)
        parts = {key: place.of(weight) for key, place in places.items()}
        if not np.isfinite(weight).all():
            raise MoechatError(f"GGUF tensor {name} holds NaN or infinite values (corrupt file?)")
        for key, weight in parts.items():
            order = rope_row_order(key, len(weight), cfg) if arch.permuted_qk else None
            if order is not None:
                weight = weight[order]
            state[key] = torch.from_numpy(np.ascontiguousarray(weight))
    return join_kv_b(state, cfg) if cfg.is_mla else state


def load_gguf(
    path: Path, max_positions: int = 4096, tokenizer_dir: Path | None = None
) -> LoadedCheckpoint:
    """Load a GGUF checkpoint; the tokenizer files go to ``tokenizer_dir`` (default: a temp dir
    removed at exit)."""
    path = Path(path)
    reader = open_gguf(path)
    cfg = gguf_config(reader)
    state = gguf_state_dict(reader, cfg)
    if tokenizer_dir is None:
        tokenizer_dir = Path(tempfile.mkdtemp(prefix="moechat-gguf-tokenizer-"))
        atexit.register(shutil.rmtree, tokenizer_dir, ignore_errors=True)
    write_tokenizer_files(reader, tokenizer_dir)
    model = build_model(cfg, state, max_positions=max_positions)
    return LoadedCheckpoint(model.config, model, path, [path], Path(tokenizer_dir))
