"""Write small Llama GGUF files the way llama.cpp's converter does (for tests)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from model_factory import CHATML_TEMPLATE


def save(writer, path: Path) -> Path:
    """Write a ``gguf.GGUFWriter``'s header, metadata and tensors, and close it."""
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


def llamacpp_permute(w: np.ndarray, n_head: int) -> np.ndarray:
    """convert_hf_to_gguf.py's LlamaModel.permute (rotate-half -> interleaved RoPE rows)."""
    return (
        w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:])
        .swapaxes(1, 2)
        .reshape(w.shape)
    )


def write_llama_gguf(
    model, tokenizer_json: Path, path: Path, quantize: bool = False, user_defined: bool = False
) -> Path:
    """``model`` (a Llama-config CausalLM) + a byte-level BPE tokenizer.json -> GGUF.

    With ``quantize`` the 2-D weights are stored as Q8_0 (as llama.cpp would); with
    ``user_defined`` the special tokens are USER_DEFINED (4) rather than CONTROL (3), as
    many GGUF files on the Hub mark their chat tokens."""
    import gguf

    cfg = model.config
    w = gguf.GGUFWriter(str(path), "llama")
    w.add_name("tiny test llama")
    w.add_block_count(cfg.num_hidden_layers)
    w.add_context_length(cfg.max_position_embeddings)
    w.add_embedding_length(cfg.hidden_size)
    w.add_feed_forward_length(cfg.intermediate_size)
    w.add_head_count(cfg.num_attention_heads)
    w.add_head_count_kv(cfg.num_key_value_heads)
    w.add_rope_freq_base(cfg.rope_theta)
    w.add_layer_norm_rms_eps(cfg.rms_norm_eps)
    w.add_rope_dimension_count(cfg.head_dim)
    w.add_vocab_size(cfg.vocab_size)

    doc = json.loads(Path(tokenizer_json).read_text(encoding="utf-8"))
    vocab = doc["model"]["vocab"]
    tokens = [None] * len(vocab)
    for tok, i in vocab.items():
        tokens[i] = tok
    special = {t["id"] for t in doc["added_tokens"] if t.get("special")}
    merges = [m if isinstance(m, str) else " ".join(m) for m in doc["model"]["merges"]]
    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre("gpt2")
    w.add_token_list(tokens)
    kind = 4 if user_defined else 3
    w.add_token_types([kind if i in special else 1 for i in range(len(tokens))])
    w.add_token_merges(merges)
    w.add_bos_token_id(1)
    w.add_eos_token_id(2)
    w.add_chat_template(CHATML_TEMPLATE)

    names = {
        "model.embed_tokens.weight": "token_embd.weight",
        "model.norm.weight": "output_norm.weight",
    }
    if not cfg.tie_word_embeddings:
        names["lm_head.weight"] = "output.weight"
    hf = {
        "input_layernorm": "attn_norm",
        "post_attention_layernorm": "ffn_norm",
        "self_attn.q_proj": "attn_q",
        "self_attn.k_proj": "attn_k",
        "self_attn.v_proj": "attn_v",
        "self_attn.o_proj": "attn_output",
        "mlp.gate_proj": "ffn_gate",
        "mlp.up_proj": "ffn_up",
        "mlp.down_proj": "ffn_down",
    }
    for i in range(cfg.num_hidden_layers):
        for src, dst in hf.items():
            names[f"model.layers.{i}.{src}.weight"] = f"blk.{i}.{dst}.weight"
    state = model.state_dict()
    for key, name in names.items():
        data = state[key].detach().numpy().astype(np.float32)
        if name.endswith("attn_q.weight"):
            data = llamacpp_permute(data, cfg.num_attention_heads)
        elif name.endswith("attn_k.weight"):
            data = llamacpp_permute(data, cfg.num_key_value_heads)
        if quantize and data.ndim == 2:
            qtype = gguf.GGMLQuantizationType.Q8_0
            w.add_tensor(name, gguf.quants.quantize(data, qtype), raw_dtype=qtype)
        else:
            w.add_tensor(name, np.ascontiguousarray(data))
    return save(w, path)


# -- MoE families through llama.cpp's own converter ------------------------------------

# Per family, what llama.cpp's converter and graphs can hold: its qwen2moe/qwen3moe
# tensor maps have no dense FFN layers, its olmoe graph has no clip_qkv and the olmoe
# converter always writes rms_norm_eps 1e-5 (OLMoE's own value).
GGUF_OVERRIDES: dict[str, dict] = {
    "mixtral": {},
    "qwen2_moe": {"mlp_only_layers": []},
    "qwen3_moe": {"decoder_sparse_step": 1},
    "olmoe": {"clip_qkv": None, "rms_norm_eps": 1e-5},
    "granitemoe": {},
}

# K-quant block sizes in bytes and where their float16 scales sit (gguf.quants' layouts)
_K_BLOCKS = {"Q4_K": (144, (0, 2)), "Q5_K": (176, (0, 2)), "Q6_K": (210, (208,))}


def make_gguf_family_folder(family: str, folder: Path, seed: int = 0):
    """A tiny checkpoint of ``family`` that llama.cpp's converter takes; returns the
    transformers model (or, for DeepSeek, its state dict)."""
    from family_factory import make_deepseek_folder, make_family_folder

    if family == "deepseek":
        model = make_deepseek_folder(folder, seed=seed)
    else:
        model = make_family_folder(family, folder, seed=seed, **GGUF_OVERRIDES[family])
    name_tokenizer_class(folder)
    return model


def name_tokenizer_class(folder: Path) -> None:
    """The converter loads the tokenizer with AutoTokenizer: without a class it would pick
    the model type's default (GPT-NeoX's for OLMoE, which adds a pad token)."""
    config_file = folder / "tokenizer_config.json"
    config = json.loads(config_file.read_text())
    config_file.write_text(json.dumps({**config, "tokenizer_class": "PreTrainedTokenizerFast"}))


def convert_with_llamacpp(llama_cpp: Path, jobs: list[tuple]) -> None:
    """Run llama.cpp's convert_hf_to_gguf.py on each (folder, out.gguf, outtype, *flags),
    in one process (see llamacpp_convert.py); a failure raises with its output."""
    import subprocess
    import sys

    driver = Path(__file__).with_name("llamacpp_convert.py")
    args = [
        [str(src), "--outtype", outtype, "--outfile", str(out), *flags]
        for src, out, outtype, *flags in jobs
    ]
    result = subprocess.run(
        [sys.executable, str(driver), str(llama_cpp), json.dumps(args)],
        capture_output=True,
        text=True,
        timeout=600,
    )
    if result.returncode != 0:
        raise RuntimeError(f"convert_hf_to_gguf.py failed:\n{result.stderr[-4000:]}")


def random_k_quant(kind: str, shape: tuple[int, ...], rng: np.random.Generator) -> np.ndarray:
    """Valid random blocks of a K-quant type for a tensor of ``shape`` (rows of 256k):
    random bits, with the float16 block scales small and finite."""
    block_bytes, scale_offsets = _K_BLOCKS[kind]
    *outer, row = shape
    blocks = rng.integers(0, 256, size=(*outer, row // 256, block_bytes), dtype=np.uint8)
    for offset in scale_offsets:
        scale = rng.uniform(1e-3, 1e-2, size=blocks.shape[:-1]).astype(np.float16)
        blocks[..., offset : offset + 2] = scale[..., None].view(np.uint8)
    return blocks.reshape(*outer, row // 256 * block_bytes)


def write_k_quant_moe_gguf(path: Path, types: dict[str, str], seed: int = 0) -> Path:
    """A one-block Mixtral-layout GGUF (hidden 256, 4 experts of 256) whose tensors named
    in ``types`` (e.g. {"ffn_gate_exps": "Q4_K"}) hold random K-quant blocks; the rest
    are F32. No tokenizer: for the weight loader only."""
    import gguf

    rng = np.random.default_rng(seed)
    hidden, inter, experts, vocab, heads = 256, 256, 4, 32, 4
    w = gguf.GGUFWriter(str(path), "llama")
    w.add_block_count(1)
    w.add_context_length(128)
    w.add_embedding_length(hidden)
    w.add_feed_forward_length(inter)
    w.add_head_count(heads)
    w.add_head_count_kv(heads)
    w.add_rope_freq_base(10000.0)
    w.add_layer_norm_rms_eps(1e-5)
    w.add_expert_count(experts)
    w.add_expert_used_count(2)
    w.add_vocab_size(vocab)
    shapes = {
        "token_embd.weight": (vocab, hidden),
        "output_norm.weight": (hidden,),
        "blk.0.attn_norm.weight": (hidden,),
        "blk.0.ffn_norm.weight": (hidden,),
        "blk.0.attn_q.weight": (hidden, hidden),
        "blk.0.attn_k.weight": (hidden, hidden),
        "blk.0.attn_v.weight": (hidden, hidden),
        "blk.0.attn_output.weight": (hidden, hidden),
        "blk.0.ffn_gate_inp.weight": (experts, hidden),
        "blk.0.ffn_gate_exps.weight": (experts, inter, hidden),
        "blk.0.ffn_up_exps.weight": (experts, inter, hidden),
        "blk.0.ffn_down_exps.weight": (experts, hidden, inter),
    }
    for name, shape in shapes.items():
        kind = types.get(name.removeprefix("blk.0.").removesuffix(".weight"))
        if kind is None:
            scale = 1.0 if len(shape) == 1 else shape[-1] ** -0.5
            w.add_tensor(name, (rng.standard_normal(shape) * scale).astype(np.float32))
        else:
            qtype = gguf.GGMLQuantizationType[kind]
            w.add_tensor(name, random_k_quant(kind, shape, rng), raw_dtype=qtype)
    return save(w, path)
