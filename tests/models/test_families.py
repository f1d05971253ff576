"""Every MoE family against transformers' own implementation, through `moechat export`.

A tiny checkpoint of each family is written by transformers (``save_pretrained``),
exported with the real CLI, and the package's graph is run on onnxruntime: prefill,
16 greedy decode steps and a chunked append, compared position by position with
transformers' logits for the same ids (<= 1e-4 of the logit scale, same greedy tokens).
"""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from family_factory import (
    DEEPSEEK_CONFIG,
    FAMILIES,
    VOCAB,
    make_deepseek_folder,
    make_family_folder,
)

from moechat.export.parity import cpu_decoder
from moechat.models import ops
from moechat.models.config import ModelConfig
from moechat.models.loading import load_checkpoint
from moechat.runtime.decoder import Decoder
from moechat.runtime.errors import MoechatError

from model_factory import export_tiny_package

PROMPT, DECODE, APPEND = 12, 16, 5


def run_package(decoder: Decoder, seed: int = 0) -> tuple[list[int], np.ndarray, int]:
    """Prefill, greedy decode, chunked append: (all ids, logits per position, prompt length)."""
    rng = np.random.default_rng(seed)
    ids = rng.integers(3, VOCAB, size=PROMPT).tolist()
    decoder.reset()
    logits = [decoder.forward(ids, logits_for="all")]
    for _ in range(DECODE):
        token = int(np.argmax(logits[-1][-1]))
        ids.append(token)
        logits.append(decoder.forward([token]))
    chunk = rng.integers(3, VOCAB, size=APPEND).tolist()
    ids += chunk
    logits.append(decoder.forward(chunk, logits_for="all"))
    return ids, np.concatenate(logits), PROMPT


def assert_matches(got: np.ndarray, ref: np.ndarray, ids: list[int], prompt: int) -> float:
    assert got.shape == ref.shape
    assert np.isfinite(got).all()
    relative = float(np.abs(got - ref).max() / np.abs(ref).max())
    assert relative <= 1e-4, relative
    # each greedy token is transformers' argmax at the position before it
    for step in range(DECODE):
        assert int(ref[prompt - 1 + step].argmax()) == ids[prompt + step]
    return relative


def distinct_routings(source, ids: list[int]) -> int:
    """How many different expert sets the first MoE layer picks for these tokens."""
    ckpt = load_checkpoint(source)
    layer = next(i for i in range(ckpt.config.num_hidden_layers) if ckpt.config.is_moe_layer(i))
    captured: list[torch.Tensor] = []
    mlp = ckpt.model.model.layers[layer].mlp
    hook = mlp.gate.register_forward_hook(lambda m, i, o: captured.append(o))
    ckpt.model.step(torch.tensor([ids]), ckpt.model.empty_cache())
    hook.remove()
    _, experts = ops.route(captured[0], ckpt.config.num_experts_per_tok, True)
    return len({tuple(sorted(e)) for e in experts.tolist()})


@pytest.mark.parametrize("moe_impl", ["contrib", "ops"])
@pytest.mark.parametrize("family", list(FAMILIES))
def test_family_package_matches_transformers(tmp_path, family, moe_impl):
    hf_model = make_family_folder(family, tmp_path / "ckpt", seed=1)
    pkg = export_tiny_package(tmp_path / "ckpt", tmp_path / "pkg", "--moe-impl", moe_impl)
    manifest = json.loads((pkg / "moechat.json").read_text())
    assert manifest["architecture"]["model_type"] == family
    cfg = ModelConfig.from_hf_config(json.loads((tmp_path / "ckpt" / "config.json").read_text()))
    for static in (False, True):
        decoder = cpu_decoder(pkg / "model.onnx", cfg, 128)
        if static:
            decoder = Decoder(
                decoder.session, cfg.num_hidden_layers, cfg.num_key_value_heads,
                cfg.head_dim, max_context=128, static_cache=True,
            )  # fmt: skip
        ids, got, prompt = run_package(decoder)
        with torch.no_grad():
            ref = hf_model(torch.tensor([ids])).logits[0].float().numpy()
        assert_matches(got, ref, ids, prompt)
    assert distinct_routings(tmp_path / "ckpt", ids) >= 3


def test_qwen2_moe_mixes_dense_and_moe_layers(tmp_path):
    make_family_folder("qwen2_moe", tmp_path / "ckpt")
    cfg = load_checkpoint(tmp_path / "ckpt").config
    assert cfg.dense_layers == (1,) and cfg.shared_expert_gate and cfg.attention_bias
    assert [cfg.is_moe_layer(i) for i in range(3)] == [True, False, True]


def test_qwen3_moe_sparse_step(tmp_path):
    make_family_folder("qwen3_moe", tmp_path / "ckpt")
    cfg = load_checkpoint(tmp_path / "ckpt").config
    assert cfg.dense_layers == (0, 2) and cfg.qk_norm == "head"


def deepseek_reference(state: dict[str, torch.Tensor]) -> torch.nn.Module:
    """DeepSeek-MoE (v1) assembled from transformers' modules: Llama attention and FFNs,
    and transformers' DeepSeek-V2 MoE block with v1's settings (softmax, greedy top-k,
    no renormalisation, no scaling, shared experts) in the MoE layers."""
    from transformers import DeepseekV2Config, LlamaConfig, LlamaForCausalLM
    from transformers.models.deepseek_v2.modeling_deepseek_v2 import DeepseekV2Moe

    c = DEEPSEEK_CONFIG
    llama_keys = (
        "vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers",
        "num_attention_heads", "num_key_value_heads", "max_position_embeddings",
        "rms_norm_eps", "tie_word_embeddings", "rope_theta",
    )  # fmt: skip
    model = LlamaForCausalLM(LlamaConfig(**{k: c[k] for k in llama_keys}))
    moe_config = DeepseekV2Config(
        hidden_size=c["hidden_size"], moe_intermediate_size=c["moe_intermediate_size"],
        n_routed_experts=c["n_routed_experts"], num_experts_per_tok=c["num_experts_per_tok"],
        n_shared_experts=c["n_shared_experts"], routed_scaling_factor=1.0,
        topk_method="greedy", norm_topk_prob=False,
    )  # fmt: skip
    state = dict(state)
    for i in range(c["first_k_dense_replace"], c["num_hidden_layers"]):
        model.model.layers[i].mlp = DeepseekV2Moe(moe_config)
        p = f"model.layers.{i}.mlp"
        experts = range(c["n_routed_experts"])
        gate_up = [
            torch.cat((state.pop(f"{p}.experts.{e}.gate_proj.weight"),
                       state.pop(f"{p}.experts.{e}.up_proj.weight")))
            for e in experts
        ]  # fmt: skip
        state[f"{p}.experts.gate_up_proj"] = torch.stack(gate_up)
        down = [state.pop(f"{p}.experts.{e}.down_proj.weight") for e in experts]
        state[f"{p}.experts.down_proj"] = torch.stack(down)
    model.load_state_dict(state, strict=True)
    return model.eval()


def test_deepseek_moe_matches_a_reference_from_transformers_modules(tmp_path):
    state = make_deepseek_folder(tmp_path / "ckpt", seed=2)
    reference = deepseek_reference(state)
    ckpt = load_checkpoint(tmp_path / "ckpt")
    cfg = ckpt.config
    assert cfg.dense_layers == (0,) and cfg.n_shared_experts == 1 and not cfg.norm_topk_prob
    assert cfg.shared_intermediate_size == 64  # two shared experts as one MLP
    # layer by layer: the MoE block and the attention on the same hidden states
    x = torch.randn(1, 9, cfg.hidden_size, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        ours, theirs = ckpt.model.model.layers[1].mlp, reference.model.layers[1].mlp
        torch.testing.assert_close(ours(x), theirs(x), rtol=1e-5, atol=1e-5)
    # the whole model through the exported package
    pkg = export_tiny_package(tmp_path / "ckpt", tmp_path / "pkg")
    ids, got, prompt = run_package(cpu_decoder(pkg / "model.onnx", cfg, 128))
    with torch.no_grad():
        ref = reference(torch.tensor([ids])).logits[0].numpy()
    assert_matches(got, ref, ids, prompt)
    assert distinct_routings(tmp_path / "ckpt", ids) >= 3


@pytest.mark.parametrize(
    "change,message",
    [
        ({"model_type": "phimoe"}, "unsupported architecture 'phimoe'"),
        ({"hidden_size": "64"}, "'hidden_size' must be an integer"),
        ({"num_hidden_layers": None}, "has no 'num_hidden_layers'"),
        ({"rope_parameters": {"rope_type": "yarn", "factor": 4.0}}, "RoPE scaling 'yarn'"),
        ({"num_hidden_layers": 1000000}, "checkpoint does not match"),
    ],
)
def test_bad_configs_are_one_line_errors(tmp_path, change, message):
    make_family_folder("mixtral", tmp_path / "ckpt")
    config = json.loads((tmp_path / "ckpt" / "config.json").read_text())
    (tmp_path / "ckpt" / "config.json").write_text(json.dumps({**config, **change}))
    with pytest.raises(MoechatError, match=message):
        load_checkpoint(tmp_path / "ckpt")


@pytest.mark.slow
@pytest.mark.parametrize("family", [*FAMILIES, "deepseek"])
def test_int8_package_of_every_family_exports_and_chats(tmp_path, capsys, family):
    from moechat.app.cli import main

    if family == "deepseek":
        make_deepseek_folder(tmp_path / "ckpt")
    else:
        make_family_folder(family, tmp_path / "ckpt")
    heldout = tmp_path / "heldout.txt"
    heldout.write_text("The quick brown fox jumps over the lazy dog. " * 40)
    args = ["--int8", "--heldout", str(heldout)]
    pkg = export_tiny_package(tmp_path / "ckpt", tmp_path / "pkg", *args)
    fidelity = json.loads((pkg / "moechat.json").read_text())["fidelity"]
    assert fidelity["tokens"] > 100 and 0.0 <= fidelity["mean_kl"] < 0.1
    assert "top-1 agreement" in capsys.readouterr().out  # the report is printed
    assert main(["run", str(pkg), "Hello there", "-n", "6", "--json", "--seed", "1"]) == 0
    reply = json.loads(capsys.readouterr().out)
    assert reply["prompt_tokens"] > 2 and len(reply["token_ids"]) >= 1
