"""Small real checkpoints on disk for tests: HF folders and MiniMind .pth files."""

from __future__ import annotations

import json
from pathlib import Path

from moechat.models.config import ModelConfig
from moechat.models.modeling import random_model

from tokenizer_factory import train_tiny_tokenizer

TINY_MOE = ModelConfig(
    vocab_size=400, hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
    num_key_value_heads=2, intermediate_size=96, use_moe=True, max_position_embeddings=512,
)  # fmt: skip
TINY_DENSE = TINY_MOE.with_changes(use_moe=False, n_shared_experts=0, intermediate_size=128)

CHATML_TEMPLATE = (
    "{% for m in messages %}{{'<|im_start|>' + m['role'] + '\\n' + m['content'] + '<|im_end|>\\n'}}"
    "{% endfor %}{% if add_generation_prompt %}{{'<|im_start|>assistant\\n'}}{% endif %}"
    "{# default: <|im_start|>system\\nYou are a tiny test model<|im_end|> #}"
)


def hf_config(cfg: ModelConfig) -> dict:
    d = {k: v for k, v in cfg.to_dict().items() if k not in ("shared_intermediate_size", "qk_norm")}
    if cfg.model_type == "llama":
        for k in (
            "use_moe",
            "n_routed_experts",
            "num_experts_per_tok",
            "n_shared_experts",
            "norm_topk_prob",
            "scoring_func",
        ):
            d.pop(k)
    return d


def write_tokenizer_files(folder: Path, vocab_size: int = 400) -> None:
    train_tiny_tokenizer(folder / "tokenizer.json", vocab_size=vocab_size)
    (folder / "tokenizer_config.json").write_text(json.dumps({"chat_template": CHATML_TEMPLATE}))


def make_hf_folder(
    folder: Path,
    cfg: ModelConfig = TINY_MOE,
    seed: int = 0,
    untied: bool = False,
    bin_format: bool = False,
) -> Path:
    """config.json + model.safetensors (or pytorch_model.bin) + a tiny tokenizer."""
    import torch
    from safetensors.torch import save_file

    folder.mkdir(parents=True, exist_ok=True)
    if untied:
        cfg = cfg.with_changes(tie_word_embeddings=False)
    model = random_model(cfg, seed=seed)
    state = {k: v.contiguous() for k, v in model.state_dict().items()}
    if cfg.tie_word_embeddings:
        state.pop("lm_head.weight")
    (folder / "config.json").write_text(json.dumps(hf_config(cfg)))
    if bin_format:
        torch.save(state, folder / "pytorch_model.bin")
    else:
        save_file(state, str(folder / "model.safetensors"))
    write_tokenizer_files(folder, cfg.vocab_size)
    return folder


def export_tiny_package(src: Path, out: Path, *extra: str) -> Path:
    from moechat.app.cli import main

    rc = main(["export", str(src), str(out), *extra])
    assert rc == 0, f"export failed with {rc}"
    return out
