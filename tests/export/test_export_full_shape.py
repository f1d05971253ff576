"""Parity at the real MiniMind2-MoE shape (random weights): 8 layers, hidden 640, 4+1 experts."""

import pytest
import torch

from moechat.export.onnx_graph import export_decoder
from moechat.export.parity import measure_parity
from moechat.models import ops
from moechat.models.config import preset
from moechat.models.modeling import random_model
from moechat.runtime.decoder import Decoder
from moechat.runtime.providers import create_session


@pytest.mark.slow  # the full 145M-parameter shape: trace, export and run
def test_minimind2_moe_shape_parity(tmp_path):
    cfg = preset("minimind2-moe")
    model = random_model(cfg, seed=11, max_positions=512)
    path = tmp_path / "model.onnx"
    export_decoder(model, path, "contrib", "gqa")
    session = create_session(path, "CPUExecutionProvider")
    decoder = Decoder(
        session, cfg.num_hidden_layers, cfg.num_key_value_heads, cfg.head_dim, 512, True
    )
    prompt = torch.randint(0, cfg.vocab_size, (24,), generator=torch.Generator().manual_seed(2))
    # The prompt's tokens are routed to different expert pairs in the first layer.
    h = model.model.layers[0].post_attention_layernorm(model.model.embed_tokens(prompt))
    _, experts = ops.route(model.model.layers[0].mlp.gate(h), cfg.num_experts_per_tok, True)
    assert len({tuple(sorted(e)) for e in experts.tolist()}) >= 3
    report = measure_parity(model, decoder, [prompt.tolist()])  # prefill, 16 decode steps, append
    assert report.relative < 1e-4, report
    assert report.greedy_match
