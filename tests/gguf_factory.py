"""Write small Llama GGUF files the way llama.cpp's converter does (for tests)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from model_factory import CHATML_TEMPLATE


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
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path
