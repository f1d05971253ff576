"""A tiny MoE whose routers are set by hand, so that every token's experts are known.

Attention outputs and every expert's down projection are zero, so each layer's input is
the token's embedding, e_(id mod hidden) (one-hot); with unit norm weights the router of
layer l sees e_j times c = 1 / sqrt(1/hidden + eps) and its logits are c times column j
of the router weight. Column j holds LOGIT_HIGH for expert (j + l) mod E,
LOGIT_LOW for expert (j + 2l + 1) mod E and 0 elsewhere: the top-2 and their weights are
known in closed form (:func:`expected_routing`). The untied LM head makes a token of
class j predict token 64 + (j - 1) mod hidden (never a special token), so a greedy reply
walks through the classes and its routing changes at every token.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import torch
from safetensors.torch import save_file

from moechat.models.modeling import random_model

from model_factory import TINY_MOE, hf_config, write_tokenizer_files

RIGGED = TINY_MOE.with_changes(num_hidden_layers=3, tie_word_embeddings=False)
LOGIT_HIGH, LOGIT_LOW = 3.0, 2.0


def expected_routing(token_id: int, layer: int) -> list[tuple[int, float]]:
    """[(expert, weight)] best first, for ``token_id`` at ``layer`` of the rigged model."""
    cfg = RIGGED
    e, j = cfg.n_routed_experts, token_id % cfg.hidden_size
    scale = 1 / math.sqrt(1 / cfg.hidden_size + cfg.rms_norm_eps)
    high, low = LOGIT_HIGH * scale, LOGIT_LOW * scale
    z = math.exp(high) + math.exp(low)  # renormalised over the top 2 (norm_topk_prob)
    return [((j + layer) % e, math.exp(high) / z), ((j + 2 * layer + 1) % e, math.exp(low) / z)]


def make_rigged_folder(folder: Path) -> Path:
    cfg = RIGGED
    assert cfg.num_experts_per_tok == 2 and cfg.norm_topk_prob and cfg.n_routed_experts >= 4
    model = random_model(cfg, seed=3)
    h, e = cfg.hidden_size, cfg.n_routed_experts
    with torch.no_grad():
        model.model.embed_tokens.weight.copy_(torch.eye(h)[torch.arange(cfg.vocab_size) % h])
        for index, layer in enumerate(model.model.layers):
            layer.self_attn.o_proj.weight.zero_()
            layer.post_attention_layernorm.weight.fill_(1.0)
            for expert in [*layer.mlp.experts, *layer.mlp.shared_experts]:
                expert.down_proj.weight.zero_()
            router = torch.zeros(e, h)
            for j in range(h):
                router[(j + index) % e, j] = LOGIT_HIGH
                router[(j + 2 * index + 1) % e, j] = LOGIT_LOW
            layer.mlp.gate.weight.copy_(router)
        head = torch.zeros(cfg.vocab_size, h)
        for v in range(h, 2 * h):
            head[v, (v + 1) % h] = 1.0
        model.lm_head.weight.copy_(head)
    folder.mkdir(parents=True, exist_ok=True)
    state = {k: v.contiguous() for k, v in model.state_dict().items()}
    (folder / "config.json").write_text(json.dumps(hf_config(cfg)))
    save_file(state, str(folder / "model.safetensors"))
    write_tokenizer_files(folder, cfg.vocab_size)
    return folder
