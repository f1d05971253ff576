"""Exported graphs match the PyTorch reference: prefill, decode, append; real routing."""

import numpy as np
import onnx
import pytest
import torch

from moechat.export.onnx_graph import export_decoder
from moechat.export.parity import measure_parity, parity_prompts
from moechat.models import ops
from moechat.models.modeling import random_model
from moechat.runtime.decoder import Decoder
from moechat.runtime.providers import create_session

from model_factory import TINY_DENSE, TINY_MOE


def _decoder(path, cfg, static=False):
    session = create_session(path, "CPUExecutionProvider")
    return Decoder(
        session, cfg.num_hidden_layers, cfg.num_key_value_heads, cfg.head_dim, 256, static
    )


@pytest.mark.parametrize(
    "cfg,moe_impl,attention",
    [
        (TINY_MOE, "contrib", "gqa"),
        (TINY_MOE, "ops", "gqa"),
        (TINY_MOE, "ops", "ops"),
        (TINY_DENSE, "contrib", "gqa"),
        (TINY_MOE.with_changes(qk_norm=True, n_shared_experts=0), "contrib", "gqa"),
        (TINY_DENSE.with_changes(model_type="llama", tie_word_embeddings=False), "contrib", "ops"),
    ],
)
def test_parity_prefill_decode_append(tmp_path, cfg, moe_impl, attention):
    model = random_model(cfg, seed=3, max_positions=256)
    path = tmp_path / "model.onnx"
    export_decoder(model, path, moe_impl, attention)
    for static in [False, True] if attention == "gqa" else [False]:
        report = measure_parity(model, _decoder(path, cfg, static), parity_prompts(cfg.vocab_size))
        assert report.relative < 1e-5, report
        assert report.greedy_match
        assert report.tokens > 100


def test_routing_is_data_dependent_in_the_graph(tmp_path):
    """Tokens go to different experts, and the graph follows them (nothing frozen)."""
    cfg = TINY_MOE
    model = random_model(cfg, seed=5, max_positions=256)
    ids = torch.randint(0, cfg.vocab_size, (1, 40), generator=torch.Generator().manual_seed(0))
    x = model.model.embed_tokens(ids)[0]
    layer = model.model.layers[0]
    h = layer.post_attention_layernorm(x)
    _, experts = ops.route(layer.mlp.gate(h), cfg.num_experts_per_tok, True)
    assert len({tuple(sorted(e)) for e in experts.tolist()}) >= 3  # routing differs across tokens

    for impl in ("contrib", "ops"):
        path = tmp_path / f"{impl}.onnx"
        export_decoder(model, path, impl, "gqa")
        dec = _decoder(path, cfg)
        got = dec.forward(ids[0].tolist(), logits_for="all")
        ref, _ = model.step(ids, model.empty_cache())
        assert np.abs(got - ref[0].numpy()).max() < 1e-3
        # A differently routed input after export: still exact (routing is not baked in).
        other = torch.randint(
            0, cfg.vocab_size, (1, 13), generator=torch.Generator().manual_seed(9)
        )
        dec.reset()
        got = dec.forward(other[0].tolist(), logits_for="all")
        ref, _ = model.step(other, model.empty_cache())
        assert np.abs(got - ref[0].numpy()).max() < 1e-3


def test_graph_variants_use_the_expected_ops(tmp_path):
    model = random_model(TINY_MOE, max_positions=256)
    export_decoder(model, tmp_path / "c.onnx", "contrib", "gqa")
    export_decoder(model, tmp_path / "o.onnx", "ops", "ops")
    contrib = {
        n.op_type for n in onnx.load(tmp_path / "c.onnx", load_external_data=False).graph.node
    }
    plain = {
        n.op_type: n.domain
        for n in onnx.load(tmp_path / "o.onnx", load_external_data=False).graph.node
    }
    assert {"MoE", "GroupQueryAttention"} <= contrib
    assert {"TopK", "NonZero", "ScatterND"} <= set(plain)
    assert all(domain in ("", "ai.onnx") for domain in plain.values())


def test_greedy_sequences_identical(tiny_checkpoint, tiny_package):
    from moechat.models.loading import load_checkpoint
    from moechat.runtime.generator import generate
    from moechat.runtime.model import load_model
    from moechat.runtime.sampling import SamplingParams

    model = load_checkpoint(tiny_checkpoint).model
    runtime = load_model(tiny_package)
    prompt = runtime.template.render_ids([{"role": "user", "content": "hello, how are you?"}])
    events = list(generate(runtime, prompt, SamplingParams(temperature=0.0, max_new_tokens=24)))
    got = events[-1].token_ids
    assert len(got) >= 8
    ids, past, expected = torch.tensor([prompt]), model.empty_cache(), []
    for _ in range(len(got)):
        logits, past = model.step(ids, past)
        token = int(logits[0, -1].argmax())
        expected.append(token)
        ids = torch.tensor([[token]])
    assert got == expected


def test_fusions_in_the_exported_graph_and_routers_left_alone(tmp_path):
    from moechat.export.graph_rewrites import find_routers

    cfg = TINY_MOE
    export_decoder(random_model(cfg, max_positions=256), tmp_path / "m.onnx", "contrib", "gqa")
    model = onnx.load(tmp_path / "m.onnx", load_external_data=False)
    ops_ = [n.op_type for n in model.graph.node]
    layers = cfg.num_hidden_layers
    assert ops_.count("Split") == layers  # the shared expert's gate/up
    gqa = [n for n in model.graph.node if n.op_type == "GroupQueryAttention"]
    assert len(gqa) == layers and all(list(n.input[1:3]) == ["", ""] for n in gqa)  # packed qkv
    # per layer: q/k/v, o_proj, router, shared gate/up, shared down; then lm_head
    assert ops_.count("MatMul") + ops_.count("Gemm") == 5 * layers + 1
    routers = find_routers(model)
    assert len(routers) == layers and all(n.op_type in ("MatMul", "Gemm") for n in routers)
    # residual Add + RMSNorm fused, except the final norm (it follows the logits Gather)
    assert ops_.count("SkipSimplifiedLayerNormalization") == 2 * layers - 1


def _plain_and_static_decoders(tmp_path, cfg, seed, max_context, **static_options):
    """One exported GQA graph behind a growing-array decoder and a static-cache one."""
    model = random_model(cfg, seed=seed, max_positions=256)
    path = tmp_path / "model.onnx"
    export_decoder(model, path, "contrib", "gqa")
    session = create_session(path, "CPUExecutionProvider")
    dims = (cfg.num_hidden_layers, cfg.num_key_value_heads, cfg.head_dim)
    plain = Decoder(session, *dims, max_context, static_cache=False)
    static = Decoder(session, *dims, max_context, static_cache=True, **static_options)
    return plain, static


def test_static_cpu_cache_grows_in_place_and_matches_the_plain_cache(tmp_path):
    """The CPU buffers start small and double (re-laid out in place) up to max_context."""
    cfg = TINY_MOE.with_changes(num_key_value_heads=4)  # heads that move past each other
    plain, grown = _plain_and_static_decoders(tmp_path, cfg, 4, 50, initial_capacity=4)
    assert grown.capacity == 4
    rng = np.random.default_rng(0)
    capacities = []

    def step(ids):
        want, got = plain.forward(ids, "all"), grown.forward(ids, "all")
        np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)
        capacities.append(grown.capacity)

    step(rng.integers(0, cfg.vocab_size, 3))
    for _ in range(6):  # 9 cached
        step(rng.integers(0, cfg.vocab_size, 1))
    step(rng.integers(0, cfg.vocab_size, 7))  # 16 cached
    plain.truncate(10)
    grown.truncate(10)
    for _ in range(3):
        step(rng.integers(0, cfg.vocab_size, 13))  # 23, 36 (64 is past the cap), 49
    step(rng.integers(0, cfg.vocab_size, 1))  # 50: the cap, not 64
    assert capacities == [4, 4, 8, 8, 8, 8, 16, 16, 32, 50, 50, 50]
    with pytest.raises(Exception, match="context full"):
        grown.forward([1])


def test_decode_steps_return_logits_that_the_next_step_does_not_overwrite(tmp_path):
    """Decode steps write their logits into one reused output buffer; what they return is
    a copy, so earlier results survive later steps and prefills, and match the plain cache."""
    plain, fast = _plain_and_static_decoders(tmp_path, TINY_MOE, 5, 40)
    assert fast._last_logits is not None  # the reused logits buffer is in use
    kept = []
    for ids in ([3, 1, 4], [1], [5], [9, 2], [6], [5], [3]):
        want, got = plain.forward(ids), fast.forward(ids)
        np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)
        assert got.dtype == np.float32
        kept.append((got, got.copy()))
    for got, snapshot in kept:
        np.testing.assert_array_equal(got, snapshot)
