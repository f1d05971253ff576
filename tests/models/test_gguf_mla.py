"""DeepSeek-V2/V3 GGUF files (llama.cpp's ``deepseek2``) written by llama.cpp's own converter.

Tiny DeepseekV2ForCausalLM / DeepseekV3ForCausalLM checkpoints are written by transformers
(test_deepseek_mla.make_mla_folder), converted by convert_hf_to_gguf.py (which splits
kv_b_proj into attn_k_b, transposed per head, and attn_v_b), loaded through
models/gguf.py, exported with the real CLI and run on onnxruntime: prefill, greedy
decode and a chunked append against transformers' logits (<= 1e-4 of the logit scale,
the same greedy tokens). The file must also give exactly the configuration and weights
the Hugging Face folder gives; F16 files the weights through float16's rounding; files of
older converters (one attn_kv_b, no *_mla keys) the same weights as the split ones. Where
llama-cpp-python is installed, llama.cpp's own runtime on the same files gives the same
logits, also where it departs from transformers (V2's groups, chosen V3's way).
"""

from __future__ import annotations

import dataclasses
import json
import math
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("gguf")
pytest.importorskip("transformers")

import gguf  # noqa: E402
import torch  # noqa: E402
from gguf_factory import convert_with_llamacpp, name_tokenizer_class, save  # noqa: E402
from test_deepseek_mla import YARN, make_mla_folder, reference_logits  # noqa: E402
from test_families import assert_matches, distinct_routings, run_package  # noqa: E402
from test_gguf_families import llama_cpp  # noqa: E402, F401  (the converter fixture)

from moechat.models.gguf import (  # noqa: E402
    Metadata,
    gguf_config,
    gguf_state_dict,
    load_gguf,
    open_gguf,
)
from moechat.models.gguf_mla import _router  # noqa: E402
from moechat.models.loading import load_checkpoint  # noqa: E402
from moechat.runtime.errors import MoechatError  # noqa: E402
from moechat.runtime.model import load_model  # noqa: E402

from model_factory import export_tiny_package  # noqa: E402

KINDS = {
    # DeepSeek-V2-Lite's layout: q_proj, softmax top-k scaled, YaRN with mscale =
    # mscale_all_dim (llama.cpp runs any V2 groups V3's way, so one group here)
    "deepseek_v2": dict(topk_method="greedy", n_group=1, topk_group=1, rope_parameters=YARN),
    # V3: q LoRA, noaux_tc over 4 groups keeping 2, sigmoid scores and a correction bias;
    # scoring_func / topk_method as deepseek-ai's config.json carries them (the
    # converter writes expert_gating_func from scoring_func)
    "deepseek_v3": dict(scoring_func="sigmoid", topk_method="noaux_tc"),
}
# V2 with group_limited_greedy over 4 groups, YaRN and q LoRA (llama.cpp reads q_proj
# only for 26- and 27-layer files): checked against llama.cpp's own runtime
V2_GROUPS = dict(topk_method="group_limited_greedy", rope_parameters=YARN, q_lora_rank=24)


@pytest.fixture(scope="module")
def converted(llama_cpp, tmp_path_factory):  # noqa: F811 (the fixture imported above)
    """Per name: the transformers model, its folder and its GGUF files (F32; F16 for KINDS)."""
    root = tmp_path_factory.mktemp("gguf-mla")
    out: dict[str, tuple[object, Path, dict[str, Path]]] = {}
    jobs = []
    variants = [(kind, kind, extra, ("f32", "f16")) for kind, extra in KINDS.items()]
    for name, kind, extra, types in [*variants, ("v2_groups", "deepseek_v2", V2_GROUPS, ("f32",))]:
        model = make_mla_folder(kind, root / name, seed=1, **extra)
        name_tokenizer_class(root / name)
        files = {t: root / f"{name}-{t}.gguf" for t in types}
        jobs += [(root / name, path, t) for t, path in files.items()]
        out[name] = (model, root / name, files)
    convert_with_llamacpp(llama_cpp, jobs)
    return out


@pytest.mark.network
@pytest.mark.parametrize(  # V2's file is the folder exactly (next test), whose package is
    # checked against transformers in test_deepseek_mla: its own export is the slow one
    "kind",
    [pytest.param("deepseek_v2", marks=pytest.mark.slow), "deepseek_v3"],
)
def test_mla_gguf_package_matches_transformers(converted, kind, tmp_path, capsys):
    hf_model, _, files = converted[kind]
    reader = open_gguf(files["f32"])
    assert reader.fields["general.architecture"].contents() == "deepseek2"
    names = {t.name for t in reader.tensors}
    assert {"blk.1.attn_k_b.weight", "blk.1.attn_v_b.weight"} <= names  # split kv_b_proj
    assert ("blk.1.exp_probs_b.bias" in names) == (kind == "deepseek_v3")
    pkg = export_tiny_package(files["f32"], tmp_path / "pkg")
    arch = json.loads((pkg / "moechat.json").read_text())["architecture"]
    assert arch["model_type"] == kind
    assert (arch["num_key_value_heads"], arch["head_dim"], arch["value_head_dim"]) == (1, 32, 8)
    decoder = load_model(pkg, max_context=128).decoder
    ids, got, prompt = run_package(decoder)
    relative = assert_matches(got, reference_logits(hf_model, ids), ids, prompt)
    assert distinct_routings(files["f32"], ids) >= 3
    from moechat.app.cli import main

    capsys.readouterr()
    assert main(["info", str(pkg)]) == 0
    info = capsys.readouterr().out
    assert "kv cache      320 bytes per token (fp32; per layer the latent 32 + rope key 8" in info
    with capsys.disabled():
        print(f"\n{kind} GGUF F32 package vs transformers: {relative:.2g} of the logit scale")


def _same_config(gguf_cfg, hf_cfg) -> None:
    """Field by field; YaRN's attention factor is written out for the GGUF (1: mscale =
    mscale_all_dim, which is what the Hugging Face config's 0 derives here)."""
    ours, theirs = dataclasses.asdict(gguf_cfg), dataclasses.asdict(hf_cfg)
    if theirs["yarn_factor"]:
        assert theirs["yarn_mscale"] == theirs["yarn_mscale_all_dim"]
        theirs["yarn_attention_factor"] = 1.0
    for key, value in theirs.items():
        if isinstance(value, float):
            assert math.isclose(ours[key], value, rel_tol=1e-6), key
        else:
            assert ours[key] == value, key


@pytest.mark.network
@pytest.mark.parametrize("kind", list(KINDS))
def test_mla_gguf_is_the_hf_checkpoint(converted, kind):
    """The F32 file gives the folder's configuration and exactly its weights (kv_b_proj
    rebuilt from attn_k_b / attn_v_b); the F16 file the same weights through float16."""
    hf_model, folder, files = converted[kind]
    hf = load_checkpoint(folder)
    exact = load_gguf(files["f32"], tokenizer_dir=files["f32"].with_suffix(".tokenizer"))
    _same_config(exact.config, hf.config)
    want = hf.model.state_dict()
    got = exact.model.state_dict()
    assert got.keys() == want.keys()
    for key in want:
        assert torch.equal(got[key], want[key]), key
    half = load_gguf(files["f16"], tokenizer_dir=files["f16"].with_suffix(".tokenizer"))
    rounded = 0
    for key, weight in half.model.state_dict().items():
        if not torch.equal(weight, want[key]):
            assert torch.equal(weight, want[key].half().float()), key
            rounded += 1
    assert rounded >= 10
    ids = [5, 17, 33, 101, 7, 250, 3, 9, 44, 120, 300, 11, 64, 399]
    with torch.no_grad():
        logits = half.model.step(torch.tensor([ids]), half.model.empty_cache())[0][0].numpy()
    ref = reference_logits(hf_model, ids)
    error = float(np.abs(logits - ref).max() / np.abs(ref).max())
    print(f"{kind} F16 vs transformers: {error:.2e} of the logit scale")
    assert 0 < error < 2e-3


Fields = dict[str, tuple[object, gguf.GGUFValueType, gguf.GGUFValueType | None]]


def rewrite_gguf(src: Path, dst: Path, change) -> Path:
    """``src`` written again to ``dst`` with its metadata {name: (value, type, item type)}
    and tensors {name: array} passed through ``change(fields, tensors)`` first."""
    reader = open_gguf(src)
    fields: Fields = {
        name: (f.contents(), f.types[0], f.types[-1] if len(f.types) > 1 else None)
        for name, f in reader.fields.items()
        if not name.startswith("GGUF.") and name != "general.architecture"
    }
    tensors = {t.name: np.array(t.data) for t in reader.tensors}
    change(fields, tensors)
    w = gguf.GGUFWriter(str(dst), reader.fields["general.architecture"].contents())
    for name, (value, kind, sub) in fields.items():
        w.add_key_value(name, value, kind, sub_type=sub)
    for name, data in tensors.items():
        w.add_tensor(name, np.ascontiguousarray(data))
    return save(w, dst)


def unsplit(fields: Fields, tensors: dict[str, np.ndarray]) -> None:
    """As older converters wrote deepseek2: one attn_kv_b per layer, the heads' sizes in
    key_length / value_length and no *_mla keys (what llama.cpp reads as non-MLA)."""
    for kind in ("key", "value"):
        value, vtype, _ = fields.pop(f"deepseek2.attention.{kind}_length_mla")
        fields[f"deepseek2.attention.{kind}_length"] = (value, vtype, None)
    for name in [n for n in tensors if n.endswith("attn_k_b.weight")]:
        k_b, v_b = tensors.pop(name), tensors.pop(name.replace("attn_k_b", "attn_v_b"))
        kv_b = np.concatenate((k_b.transpose(0, 2, 1), v_b), axis=1)
        tensors[name.replace("attn_k_b", "attn_kv_b")] = kv_b.reshape(-1, kv_b.shape[-1])


@pytest.mark.network
def test_unsplit_kv_b_of_older_converters(converted, tmp_path):
    _, _, files = converted["deepseek_v3"]
    legacy = rewrite_gguf(files["f32"], tmp_path / "legacy.gguf", unsplit)
    assert "blk.1.attn_kv_b.weight" in {t.name for t in open_gguf(legacy).tensors}
    split = open_gguf(files["f32"])
    old = open_gguf(legacy)
    assert gguf_config(old) == gguf_config(split)
    want = gguf_state_dict(split, gguf_config(split))
    got = gguf_state_dict(old, gguf_config(old))
    assert got.keys() == want.keys()
    for key in want:
        assert torch.equal(got[key], want[key]), key


@pytest.mark.network
def test_k_b_without_v_b_is_a_one_line_error(converted, tmp_path):
    _, _, files = converted["deepseek_v2"]
    broken = rewrite_gguf(
        files["f32"], tmp_path / "broken.gguf", lambda _, t: t.pop("blk.1.attn_v_b.weight")
    )
    with pytest.raises(MoechatError, match=r"^GGUF block 1 has attn_k_b but no attn_v_b$"):
        load_checkpoint(broken)


def _ours_and_llama_cpp(path: Path, ids: list[int], tmp_path: Path, eps=None):
    """The logits at every position of moechat's model of the file and of llama.cpp's own
    runtime (llama-cpp-python) on it; ``eps`` overrides ours' q_a / kv_a RMSNorm eps."""
    llama_cpp_lib = pytest.importorskip("llama_cpp")
    ckpt = load_gguf(path, tokenizer_dir=tmp_path / "tokenizer")
    if eps is not None:
        for module in ckpt.model.modules():
            for norm in ("q_a_layernorm", "kv_a_layernorm"):
                if hasattr(module, norm):
                    getattr(module, norm).eps = eps
    with torch.no_grad():
        ours = ckpt.model.step(torch.tensor([ids]), ckpt.model.empty_cache())[0][0].numpy()
    f32 = 0  # GGML_TYPE_F32: an F32 KV cache, as ours
    llm = llama_cpp_lib.Llama(str(path), n_ctx=64, n_batch=64, logits_all=True, n_threads=1,
                              type_k=f32, type_v=f32, verbose=False)  # fmt: skip
    llm.eval(ids)
    theirs = np.array(llm.scores[: len(ids)])
    llm.close()
    return ours, theirs


def default_pre(fields: Fields, _) -> None:  # llama.cpp knows GPT-2's split as "default"
    fields["tokenizer.ggml.pre"] = ("default", *fields["tokenizer.ggml.pre"][1:])


LLAMA_CPP_IDS = [5, 17, 33, 101, 7, 250, 3, 9, 44, 120, 300, 11, 64, 399] * 3


@pytest.mark.network
@pytest.mark.parametrize("name", ["deepseek_v3", "v2_groups"])
def test_as_llama_cpp_runs_it(converted, name, tmp_path):
    """llama.cpp's own runtime (when llama-cpp-python is installed) on the same file gives
    the same logits: its group rule (V3's sum of the best two, also for V2's
    group_limited_greedy, where transformers takes each group's best), YaRN and routing."""
    hf_model, _, files = converted[name]
    ids = LLAMA_CPP_IDS
    path = rewrite_gguf(files["f32"], tmp_path / "llama.cpp.gguf", default_pre)
    ours, theirs = _ours_and_llama_cpp(path, ids, tmp_path)
    error = float(np.abs(ours - theirs).max() / np.abs(theirs).max())
    print(f"{name} vs llama.cpp: {error:.2e} of the logit scale")
    assert error < 1e-5
    if name == "v2_groups":  # the groups llama.cpp keeps are not transformers' V2 groups
        ref = reference_logits(hf_model, ids)
        assert float(np.abs(ours - ref).max() / np.abs(ref).max()) > 1e-3


@pytest.mark.network
def test_mla_norms_take_the_files_eps_as_llama_cpp(converted, tmp_path):
    """llama.cpp runs attn_q_a_norm / attn_kv_a_norm with the file's
    layer_norm_rms_epsilon (transformers fixes 1e-6 there, and Hugging Face folders keep
    that): with the file's eps raised to 1e-2 ours still gives llama.cpp's logits, and
    would not with 1e-6 in those two norms."""
    _, _, files = converted["deepseek_v3"]
    key = "deepseek2.attention.layer_norm_rms_epsilon"

    def big_eps(fields: Fields, tensors) -> None:
        default_pre(fields, tensors)
        fields[key] = (1e-2, *fields[key][1:])

    path = rewrite_gguf(files["f32"], tmp_path / "eps.gguf", big_eps)
    cfg = gguf_config(open_gguf(path))
    assert cfg.mla_norm_eps == pytest.approx(1e-2) and cfg.rms_norm_eps == pytest.approx(1e-2)
    ours, theirs = _ours_and_llama_cpp(path, LLAMA_CPP_IDS, tmp_path)
    error = float(np.abs(ours - theirs).max() / np.abs(theirs).max())
    fixed, _ = _ours_and_llama_cpp(path, LLAMA_CPP_IDS, tmp_path, eps=1e-6)
    fixed_error = float(np.abs(fixed - theirs).max() / np.abs(theirs).max())
    print(f"eps 1e-2 vs llama.cpp: {error:.2e} (with 1e-6 in q_a/kv_a: {fixed_error:.2e})")
    assert error < 1e-5 and fixed_error > 1e-4


@pytest.mark.parametrize(
    "values,scoring",
    [
        ({}, "softmax"),  # DeepSeek-V2 / V2.5 files carry no gating function
        ({"expert_gating_func": gguf.ExpertGatingFuncType.SIGMOID}, "sigmoid"),
        ({"block_count": 47, "vocab_size": 154880}, "sigmoid"),  # llama.cpp: GLM-4.7 Lite
        ({"block_count": 47, "vocab_size": 154881}, "softmax"),
    ],
)
def test_gating_function_as_llama_cpp_reads_it(tmp_path, values, scoring):
    w = gguf.GGUFWriter(str(tmp_path / "meta.gguf"), "deepseek2")
    for key, value in {"block_count": 2, "vocab_size": 400, **values}.items():
        getattr(w, f"add_{key}")(value)
    meta = Metadata(open_gguf(save(w, tmp_path / "meta.gguf")), "deepseek2")
    assert _router(meta, {})["scoring_func"] == scoring
