"""Read Llama-layout GGUF files (llama.cpp) into a :class:`LoadedCheckpoint`.

Weights are dequantised with the ``gguf`` package (F32, F16, BF16, Q8_0, Q4_0, Q4_1,
K-quants ...). llama.cpp's converter permutes the rows of ``attn_q`` / ``attn_k`` so
that its interleaved RoPE (pairs ``x[2i], x[2i+1]``) sees the halves that Hugging
Face's rotate-half RoPE pairs (``x[i], x[i + d/2]``); :func:`unpermute_rope_rows`
undoes that for our rotate-half attention.

The GGUF also carries the tokenizer (``tokenizer.ggml.*``: byte-level BPE tokens,
merges, token types, pre-tokenizer name) and the chat template;
:func:`write_tokenizer_files` turns them into ``tokenizer.json`` for the ``tokenizers``
library and ``tokenizer_config.json`` with the ``chat_template``.
"""

from __future__ import annotations

import atexit
import json
import shutil
import tempfile
from pathlib import Path
from typing import Any

import numpy as np
import torch

from moechat.models.config import ModelConfig
from moechat.models.loading import LoadedCheckpoint, build_model
from moechat.runtime.errors import MoechatError

# GGUF token types (llama.cpp's llama_token_type)
TOKEN_NORMAL, TOKEN_UNKNOWN, TOKEN_CONTROL, TOKEN_USER_DEFINED, TOKEN_UNUSED, TOKEN_BYTE = (
    1,
    2,
    3,
    4,
    5,
    6,
)

# tokenizer.ggml.pre -> pre-tokenizer steps before the GPT-2 byte-level regex split.
# llama.cpp's "smollm" is "\p{N}" (digits one by one) then the GPT-2 regex.
_PRE_TOKENIZERS: dict[str, list[dict]] = {
    "default": [],
    "gpt2": [],
    "smollm": [{"type": "Digits", "individual_digits": True}],
}

_LAYER_KEYS = {
    "attn_norm.weight": "input_layernorm.weight",
    "ffn_norm.weight": "post_attention_layernorm.weight",
    "attn_q.weight": "self_attn.q_proj.weight",
    "attn_k.weight": "self_attn.k_proj.weight",
    "attn_v.weight": "self_attn.v_proj.weight",
    "attn_output.weight": "self_attn.o_proj.weight",
    "ffn_gate.weight": "mlp.gate_proj.weight",
    "ffn_up.weight": "mlp.up_proj.weight",
    "ffn_down.weight": "mlp.down_proj.weight",
}
_GLOBAL_KEYS = {
    "token_embd.weight": "model.embed_tokens.weight",
    "output_norm.weight": "model.norm.weight",
    "output.weight": "lm_head.weight",
}


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


def field(reader, key: str, default: Any = None) -> Any:
    """A metadata value (str, int, float, list) or ``default`` when absent."""
    f = reader.fields.get(key)
    if f is None:
        return default
    try:
        return f.contents()
    except Exception as err:
        raise MoechatError(f"GGUF metadata {key} is corrupt: {err}") from None


def gguf_config(reader, max_positions: int | None = None) -> ModelConfig:
    """A Llama :class:`ModelConfig` from the ``llama.*`` metadata."""
    arch = field(reader, "general.architecture")
    if arch != "llama":
        raise MoechatError(f"unsupported GGUF architecture {arch!r} (supported: llama)")

    def need(key: str):
        value = field(reader, f"llama.{key}")
        if value is None:
            raise MoechatError(f"GGUF metadata llama.{key} is missing")
        return value

    if field(reader, "llama.expert_count", 0):
        raise MoechatError("GGUF MoE checkpoints (llama.expert_count) are not supported yet")
    scaling = field(reader, "llama.rope.scaling.type", "none")
    if scaling not in ("none", None) or any(t.name == "rope_freqs.weight" for t in reader.tensors):
        raise MoechatError(f"GGUF RoPE scaling ({scaling}) is not supported")
    hidden = int(need("embedding_length"))
    heads = int(need("attention.head_count"))
    head_dim = int(field(reader, "llama.rope.dimension_count", hidden // heads))
    if head_dim * heads != hidden:
        raise MoechatError("GGUF with partial rotary or head_dim*heads != hidden is not supported")
    tokens = field(reader, "tokenizer.ggml.tokens") or []
    vocab = int(field(reader, "llama.vocab_size", len(tokens)))
    has_output = any(t.name == "output.weight" for t in reader.tensors)
    return ModelConfig(
        model_type="llama",
        vocab_size=vocab,
        hidden_size=hidden,
        num_hidden_layers=int(need("block_count")),
        num_attention_heads=heads,
        num_key_value_heads=int(field(reader, "llama.attention.head_count_kv", heads)),
        head_dim=head_dim,
        intermediate_size=int(need("feed_forward_length")),
        rms_norm_eps=float(field(reader, "llama.attention.layer_norm_rms_epsilon", 1e-5)),
        rope_theta=float(field(reader, "llama.rope.freq_base", 10000.0)),
        max_position_embeddings=int(field(reader, "llama.context_length", 4096)),
        tie_word_embeddings=not has_output,
        use_moe=False,
        n_shared_experts=0,
        bos_token_id=int(field(reader, "tokenizer.ggml.bos_token_id", 1)),
        eos_token_id=int(field(reader, "tokenizer.ggml.eos_token_id", 2)),
    )


def unpermute_rope_rows(weight: np.ndarray, n_heads: int) -> np.ndarray:
    """Undo llama.cpp's ``permute`` of q/k rows (interleaved -> rotate-half RoPE).

    llama.cpp: ``w.reshape(n, 2, d/2, H).swapaxes(1, 2).reshape(w.shape)``; the inverse
    reshapes to ``(n, d/2, 2, H)`` and swaps back.
    """
    rows = weight.shape[0]
    return (
        weight.reshape(n_heads, rows // n_heads // 2, 2, *weight.shape[1:])
        .swapaxes(1, 2)
        .reshape(weight.shape)
    )


def dequantize(tensor) -> np.ndarray:
    """float32 array in PyTorch layout ([out, in] for matrices)."""
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


def gguf_state_dict(reader, cfg: ModelConfig) -> dict[str, torch.Tensor]:
    state: dict[str, torch.Tensor] = {}
    for tensor in reader.tensors:
        name = tensor.name
        if name in _GLOBAL_KEYS:
            key = _GLOBAL_KEYS[name]
        elif name.startswith("blk."):
            _, idx, rest = name.split(".", 2)
            if rest not in _LAYER_KEYS:
                raise MoechatError(f"unsupported GGUF tensor {name}")
            key = f"model.layers.{int(idx)}.{_LAYER_KEYS[rest]}"
        else:
            raise MoechatError(f"unsupported GGUF tensor {name}")
        weight = dequantize(tensor)
        if rest_is(name, "attn_q.weight"):
            weight = unpermute_rope_rows(weight, cfg.num_attention_heads)
        elif rest_is(name, "attn_k.weight"):
            weight = unpermute_rope_rows(weight, cfg.num_key_value_heads)
        if not np.isfinite(weight).all():
            raise MoechatError(f"GGUF tensor {name} holds NaN or infinite values (corrupt file?)")
        state[key] = torch.from_numpy(weight)
    return state


def rest_is(name: str, suffix: str) -> bool:
    return name.startswith("blk.") and name.endswith("." + suffix)


# ---------------------------------------------------------------- tokenizer


def tokenizer_json(reader) -> dict:
    """The ``tokenizer.json`` document (as a dict) of the GGUF's byte-level BPE vocabulary."""
    model = field(reader, "tokenizer.ggml.model")
    if model != "gpt2":
        raise MoechatError(
            f"unsupported GGUF tokenizer model {model!r} (supported: gpt2 byte-level BPE)"
        )
    pre = field(reader, "tokenizer.ggml.pre", "default")
    if pre not in _PRE_TOKENIZERS:
        raise MoechatError(
            f"unsupported GGUF pre-tokenizer {pre!r} (supported: {', '.join(_PRE_TOKENIZERS)})"
        )
    tokens: list[str] = field(reader, "tokenizer.ggml.tokens")
    merges: list[str] = field(reader, "tokenizer.ggml.merges")
    if not tokens or merges is None:
        raise MoechatError("the GGUF has no tokenizer (tokenizer.ggml.tokens/merges)")
    types = field(reader, "tokenizer.ggml.token_type") or [TOKEN_NORMAL] * len(tokens)
    if len(types) != len(tokens) or len(set(tokens)) != len(tokens):
        raise MoechatError("the GGUF tokenizer is corrupt (token list and types disagree)")
    added = []
    for i, (tok, kind) in enumerate(zip(tokens, types, strict=True)):
        if kind in (TOKEN_CONTROL, TOKEN_USER_DEFINED, TOKEN_UNKNOWN):
            added.append(
                {
                    "id": i,
                    "content": tok,
                    "single_word": False,
                    "lstrip": False,
                    "rstrip": False,
                    "normalized": False,
                    "special": kind != TOKEN_USER_DEFINED,
                }
            )
    pre_steps = _PRE_TOKENIZERS[pre] + [
        {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": True, "use_regex": True}
    ]
    return {
        "version": "1.0",
        "truncation": None,
        "padding": None,
        "added_tokens": added,
        "normalizer": None,
        "pre_tokenizer": pre_steps[0]
        if len(pre_steps) == 1
        else {"type": "Sequence", "pretokenizers": pre_steps},
        "post_processor": {
            "type": "ByteLevel",
            "add_prefix_space": True,
            "trim_offsets": False,
            "use_regex": True,
        },
        "decoder": {
            "type": "ByteLevel",
            "add_prefix_space": True,
            "trim_offsets": True,
            "use_regex": True,
        },
        "model": {
            "type": "BPE",
            "dropout": None,
            "unk_token": None,
            "continuing_subword_prefix": None,
            "end_of_word_suffix": None,
            "fuse_unk": False,
            "byte_fallback": False,
            "ignore_merges": False,
            "vocab": {tok: i for i, tok in enumerate(tokens)},
            "merges": [m.split(" ", 1) for m in merges],
        },
    }


def write_tokenizer_files(reader, folder: Path) -> Path:
    """Write tokenizer.json and tokenizer_config.json (with the chat template) to ``folder``."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    doc = tokenizer_json(reader)
    (folder / "tokenizer.json").write_text(json.dumps(doc, ensure_ascii=False), encoding="utf-8")
    tokens = field(reader, "tokenizer.ggml.tokens")

    def token(key: str) -> str | None:
        idx = field(reader, f"tokenizer.ggml.{key}")
        return tokens[int(idx)] if idx is not None and 0 <= int(idx) < len(tokens) else None

    config = {
        "tokenizer_class": "GPT2Tokenizer",
        "add_bos_token": bool(field(reader, "tokenizer.ggml.add_bos_token", False)),
        "bos_token": token("bos_token_id"),
        "eos_token": token("eos_token_id"),
        "pad_token": token("padding_token_id"),
        "unk_token": token("unknown_token_id"),
        "model_max_length": int(field(reader, "llama.context_length", 2048)),
        "chat_template": field(reader, "tokenizer.chat_template"),
    }
    (folder / "tokenizer_config.json").write_text(
        json.dumps(config, indent=2, ensure_ascii=False) + "\n", encoding="utf-8"
    )
    return folder


def load_gguf(
    path: Path, max_positions: int = 4096, tokenizer_dir: Path | None = None
) -> LoadedCheckpoint:
    """Load a Llama GGUF; the tokenizer files go to ``tokenizer_dir`` (default: a temp dir
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
