"""DeepSeek-V2 and V3 against transformers' DeepseekV2ForCausalLM / DeepseekV3ForCausalLM.

Tiny random checkpoints written by transformers (``save_pretrained``, weights redrawn at
a realistic scale) are exported with the real CLI and run on onnxruntime through the
runtime's own loader: prefill, 16 greedy decode steps, a chunked append, then a rewind
and the same decode regenerated; <= 1e-4 of the logit scale, identical greedy tokens.
The KV cache holds the latent and the shared rope key (models/mla.py). The routers are
checked against transformers' on the same hidden states, with tokens whose best expert
lies in a dropped group (V3), whose greedy pick does (V2), and a correction bias that
changes the choice.
"""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from family_factory import BASE, EXPERTS, GROUPS, KINDS, MLA, YARN, make_mla_folder, randomize
from test_families import APPEND, DECODE, PROMPT, assert_matches, run_package

from moechat.export.onnx_graph import export_decoder
from moechat.export.parity import cpu_decoder
from moechat.models.loading import load_checkpoint
from moechat.models.mla import route_grouped
from moechat.runtime.errors import MoechatError
from moechat.runtime.model import load_model

from model_factory import export_tiny_package


def reference_logits(hf_model, ids: list[int]) -> np.ndarray:
    with torch.no_grad():
        return hf_model(torch.tensor([ids])).logits[0].float().numpy()


@pytest.mark.parametrize("kind", list(KINDS))
def test_mla_package_matches_transformers(tmp_path, capsys, kind):
    hf_model = make_mla_folder(kind, tmp_path / "ckpt", seed=1)
    pkg = export_tiny_package(tmp_path / "ckpt", tmp_path / "pkg")
    manifest = json.loads((pkg / "moechat.json").read_text())
    arch = manifest["architecture"]
    assert arch["model_type"] == kind and manifest["graph"]["attention"] == "ops"
    # the cache per layer: the latent as the "key", the shared rope key as the "value"
    assert (arch["num_key_value_heads"], arch["head_dim"], arch["value_head_dim"]) == (1, 32, 8)
    # present = the new positions; the runtime writes them in place into static buffers
    assert manifest["graph"]["kv_present"] == "new"
    model = load_model(pkg, max_context=128)
    decoder = model.decoder
    assert decoder.static_cache
    ids, got, prompt = run_package(decoder)
    assert decoder.length == PROMPT + DECODE + APPEND
    ref = reference_logits(hf_model, ids)
    relative = assert_matches(got, ref, ids, prompt)
    # rewind to the prompt and regenerate the reply: the same greedy tokens and logits
    decoder.truncate(PROMPT)
    again = np.concatenate([decoder.forward([t]) for t in ids[PROMPT : PROMPT + DECODE]])
    assert np.abs(again - ref[PROMPT : PROMPT + DECODE]).max() <= 1e-4 * np.abs(ref).max()
    assert [int(r.argmax()) for r in again[:-1]] == ids[PROMPT + 1 : PROMPT + DECODE]
    # moechat info: 2 layers x (latent 32 + rope key 8) x 4 bytes; per-head K/V:
    # 2 layers x 4 heads x (16 + 8 + 16) x 4 bytes
    from moechat.app.cli import main

    capsys.readouterr()
    assert main(["info", str(pkg)]) == 0
    info = capsys.readouterr().out
    assert "kv cache      320 bytes per token (fp32; per layer the latent 32 + rope key 8" in info
    assert "per-head keys and values would take 1,280, 4.0x" in info
    with capsys.disabled():
        print(f"\n{kind}: parity {relative:.2g} of the logit scale")


@pytest.mark.parametrize(
    "kind,form,moe_impl",
    [("deepseek_v2", "decompress", "ops"), ("deepseek_v3", "decompress", "ops")],
)  # fmt: skip
def test_attention_forms_and_standard_op_routing(tmp_path, kind, form, moe_impl):
    """Also YaRN (the configs of DeepSeek-V2-Lite, V3 and Moonlight use it): frequencies,
    attention factor and the softmax's mscale**2 as transformers applies them."""
    hf_model = make_mla_folder(kind, tmp_path / "ckpt", seed=2, rope_parameters=YARN)
    ckpt = load_checkpoint(tmp_path / "ckpt")
    assert ckpt.config.yarn_factor == 4.0
    for layer in ckpt.model.model.layers:
        layer.self_attn.form = form
    export_decoder(ckpt.model, tmp_path / "model.onnx", moe_impl, "ops")
    ids, got, prompt = run_package(cpu_decoder(tmp_path / "model.onnx", ckpt.config, 128), seed=3)
    assert_matches(got, reference_logits(hf_model, ids), ids, prompt)


def router_cases(kind: str, seed: int = 4):
    """transformers' router inputs/outputs at every MoE layer for a batch of tokens."""
    import transformers

    config_cls, model_cls, extra = KINDS[kind]
    values = {**BASE, "num_key_value_heads": BASE["num_attention_heads"], **extra}
    hf_model = getattr(transformers, model_cls)(getattr(transformers, config_cls)(**values))
    randomize(hf_model, seed)
    cases = []
    gen = torch.Generator().manual_seed(seed)
    gates = [layer.mlp.gate for layer in hf_model.model.layers[MLA["first_k_dense_replace"] :]]
    with torch.no_grad():
        for gate in gates:
            gate.weight.mul_(4.0)  # logits of a trained router's spread (std ~2)
            if kind == "deepseek_v3":
                gate.e_score_correction_bias.copy_(0.3 * torch.randn(EXPERTS, generator=gen))
            hidden = torch.randn(256, BASE["hidden_size"], generator=gen)
            logits, weights, experts = gate(hidden)
            bias = getattr(gate, "e_score_correction_bias", torch.zeros(EXPERTS))
            cases.append((logits, bias, weights, experts))
    return hf_model.config, cases


def test_routers_match_transformers_and_groups_and_bias_matter():
    for kind in KINDS:
        config, cases = router_cases(kind)
        method = "noaux_tc" if kind == "deepseek_v3" else "group_limited_greedy"
        scoring = "sigmoid" if kind == "deepseek_v3" else "softmax"
        k, norm = config.num_experts_per_tok, kind == "deepseek_v3"
        dropped_best = changed_by_bias = 0
        for logits, bias, weights, experts in cases:
            args = (k, scoring, method, GROUPS, 2, norm, config.routed_scaling_factor)
            ours_w, ours_e = route_grouped(logits, bias, *args)
            order, theirs = ours_e.sort(dim=-1), experts.sort(dim=-1)
            assert torch.equal(order.values, theirs.values)
            torch.testing.assert_close(
                ours_w.gather(1, order.indices), weights.gather(1, theirs.indices)
            )
            scores = logits.softmax(-1) if scoring == "softmax" else logits.sigmoid()
            choice = scores + bias if method == "noaux_tc" else scores
            # plain top-k of the (biased) scores, as if there were no groups
            greedy = choice.topk(k, dim=-1).indices
            in_group = (ours_e // (EXPERTS // GROUPS))[:, :, None]
            kept = torch.zeros(len(logits), GROUPS, dtype=torch.bool)
            kept.scatter_(1, in_group[:, :, 0], True)
            greedy_group_kept = kept.gather(1, greedy // (EXPERTS // GROUPS))
            if kind == "deepseek_v3":  # the best expert itself lies in a dropped group
                dropped_best += int((~greedy_group_kept[:, 0]).sum())
                _, unbiased = route_grouped(logits, torch.zeros(EXPERTS), *args)
                changed_by_bias += int((unbiased.sort(-1).values != theirs.values).any(-1).sum())
            else:  # V2 (max per group): a greedy pick lies in a dropped group
                dropped_best += int((~greedy_group_kept).any(-1).sum())
        assert dropped_best > 0, kind
        if kind == "deepseek_v3":
            assert changed_by_bias > 0


@pytest.mark.parametrize(
    "change,message",
    [
        ({"rope_parameters": {"rope_type": "linear", "factor": 4.0, "rope_theta": 1e4}},
         "RoPE scaling 'linear'"),
        ({"topk_method": "random"}, "topk_method 'random'"),
        ({"qk_rope_head_dim": 7}, "even qk_rope_head_dim"),
    ],
)  # fmt: skip
def test_bad_mla_configs_are_one_line_errors(tmp_path, change, message):
    make_mla_folder("deepseek_v2", tmp_path / "ckpt")
    config = json.loads((tmp_path / "ckpt" / "config.json").read_text())
    (tmp_path / "ckpt" / "config.json").write_text(json.dumps({**config, **change}))
    with pytest.raises(MoechatError, match=message):
        load_checkpoint(tmp_path / "ckpt")


@pytest.mark.slow
@pytest.mark.parametrize("kind", list(KINDS))
def test_int8_mla_package_exports_and_chats(tmp_path, capsys, kind):
    from moechat.app.cli import main

    make_mla_folder(kind, tmp_path / "ckpt")
    heldout = tmp_path / "heldout.txt"
    heldout.write_text("The quick brown fox jumps over the lazy dog. " * 40)
    pkg = export_tiny_package(
        tmp_path / "ckpt", tmp_path / "pkg", "--int8", "--heldout", str(heldout)
    )
    fidelity = json.loads((pkg / "moechat.json").read_text())["fidelity"]
    assert fidelity["tokens"] > 100 and 0.0 <= fidelity["mean_kl"] < 0.1
    out = capsys.readouterr().out
    assert "top-1 agreement" in out
    assert main(["run", str(pkg), "Hello there", "-n", "6", "--json", "--seed", "1"]) == 0
    reply = json.loads(capsys.readouterr().out)
    assert reply["prompt_tokens"] > 2 and len(reply["token_ids"]) >= 1
    with capsys.disabled():
        print(f"\n{kind} int8: {[line for line in out.splitlines() if 'agreement' in line]}")
