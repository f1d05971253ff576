"""Checkpoint formats: HF folders (safetensors / .bin, tied / untied), MiniMind .pth, MiniMind-3."""

import json
import pickle

import pytest
import torch

from moechat.models.config import ModelConfig, preset
from moechat.models.loading import load_checkpoint
from moechat.models.modeling import random_model
from moechat.runtime.errors import MoechatError

from model_factory import TINY_DENSE, TINY_MOE, hf_config, make_hf_folder


def _same_logits(a, b):
    ids = torch.arange(1, 12)[None]
    la, _ = a.step(ids, a.empty_cache())
    lb, _ = b.step(ids, b.empty_cache())
    return torch.allclose(la, lb, atol=1e-5)


@pytest.mark.parametrize("untied", [False, True])
@pytest.mark.parametrize("bin_format", [False, True])
def test_hf_folder(tmp_path, untied, bin_format):
    folder = make_hf_folder(tmp_path / "m", TINY_MOE, seed=1, untied=untied, bin_format=bin_format)
    ckpt = load_checkpoint(folder)
    assert ckpt.config.use_moe and ckpt.config.tie_word_embeddings is (not untied)
    ref = random_model(TINY_MOE.with_changes(tie_word_embeddings=not untied), seed=1)
    assert _same_logits(ckpt.model, ref)
    keys = set(ckpt.model.state_dict())
    assert "model.layers.0.mlp.gate.weight" in keys
    assert "model.layers.1.mlp.experts.3.down_proj.weight" in keys
    assert "model.layers.0.mlp.shared_experts.0.up_proj.weight" in keys


def test_llama_layout_dense(tmp_path):
    cfg = TINY_DENSE.with_changes(model_type="llama", tie_word_embeddings=False)
    folder = make_hf_folder(tmp_path / "llama", cfg, seed=2)
    raw = json.loads((folder / "config.json").read_text())
    assert raw["model_type"] == "llama" and "use_moe" not in raw
    ckpt = load_checkpoint(folder)
    assert ckpt.config.model_type == "llama" and not ckpt.config.use_moe
    assert _same_logits(ckpt.model, random_model(cfg, seed=2))


def test_minimind3_config_with_qk_norm(tmp_path):
    """MiniMind-3 names: num_experts, moe_intermediate_size, q_norm/k_norm, no shared experts."""
    cfg = TINY_MOE.with_changes(qk_norm=True, n_shared_experts=0, intermediate_size=48)
    model = random_model(cfg, seed=4)
    folder = tmp_path / "mm3"
    folder.mkdir()
    raw = {
        "model_type": "minimind", "vocab_size": 400, "hidden_size": 64, "num_hidden_layers": 2,
        "num_attention_heads": 4, "num_key_value_heads": 2, "intermediate_size": 176,
        "num_experts": 4, "num_experts_per_tok": 2, "moe_intermediate_size": 48, "use_moe": True,
        "qk_norm": True, "n_shared_experts": 0, "rope_theta": 1e6,
    }  # fmt: skip
    (folder / "config.json").write_text(json.dumps(raw))
    from safetensors.torch import save_file

    state = {k: v for k, v in model.state_dict().items() if k != "lm_head.weight"}
    assert "model.layers.0.self_attn.q_norm.weight" in state
    save_file(state, str(folder / "model.safetensors"))
    ckpt = load_checkpoint(folder)
    assert ckpt.config.qk_norm and ckpt.config.n_shared_experts == 0
    assert ckpt.config.intermediate_size == 48
    assert _same_logits(ckpt.model, model)


def test_minimind_pth_with_preset(tmp_path):
    cfg = preset("minimind2-moe").with_changes(num_hidden_layers=1, vocab_size=6400)
    model = random_model(cfg, seed=7)
    path = tmp_path / "moe_640.pth"
    # MiniMind's trainer saves half-precision state dicts with an lm_head key.
    torch.save({k: v.half() for k, v in model.state_dict().items()}, path)
    ckpt = load_checkpoint(path, preset_name="minimind2-moe", overrides={"num_hidden_layers": 1})
    assert ckpt.config.hidden_size == 640 and ckpt.config.use_moe
    la, _ = ckpt.model.step(torch.arange(5)[None], ckpt.model.empty_cache())
    lb, _ = model.half().float().step(torch.arange(5)[None], model.empty_cache())
    assert torch.allclose(la, lb, atol=1e-3)


def test_pth_needs_a_size(tmp_path):
    path = tmp_path / "x.pth"
    torch.save({"a": torch.zeros(1)}, path)
    with pytest.raises(MoechatError, match="--preset"):
        load_checkpoint(path)


def test_wrong_preset_is_a_clear_error(tmp_path):
    model = random_model(TINY_MOE)
    path = tmp_path / "tiny.pth"
    torch.save(model.state_dict(), path)
    with pytest.raises(MoechatError, match="does not match"):
        load_checkpoint(path, preset_name="minimind2-moe")


class _Evil:
    def __reduce__(self):
        return (print, ("pwned",))


def test_arbitrary_pickles_are_refused(tmp_path, capsys):
    path = tmp_path / "evil.pth"
    with open(path, "wb") as fh:
        pickle.dump({"w": _Evil()}, fh)
    with pytest.raises(MoechatError, match="weights-only"):
        load_checkpoint(path, preset_name="minimind2-moe")
    assert "pwned" not in capsys.readouterr().out


def test_remote_code_is_never_imported(tmp_path):
    folder = make_hf_folder(tmp_path / "m", TINY_DENSE)
    marker = tmp_path / "executed"
    (folder / "modeling_minimind.py").write_text(f"open({str(marker)!r}, 'w').write('x')\n")
    raw = json.loads((folder / "config.json").read_text())
    raw["auto_map"] = {"AutoModelForCausalLM": "modeling_minimind.MiniMindForCausalLM"}
    (folder / "config.json").write_text(json.dumps(raw))
    load_checkpoint(folder)
    assert not marker.exists()


def test_config_roundtrip_and_errors():
    cfg = ModelConfig.from_hf_config(hf_config(TINY_MOE))
    assert cfg == TINY_MOE.with_changes(shared_intermediate_size=TINY_MOE.intermediate_size)
    with pytest.raises(MoechatError, match="unsupported architecture"):
        ModelConfig(model_type="phimoe")
    with pytest.raises(MoechatError, match="preset"):
        preset("nope")
