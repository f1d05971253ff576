"""MoE GGUF files written by llama.cpp's own converter, through `moechat export`.

Tiny checkpoints of each family are written by transformers (family_factory), converted
to GGUF by llama.cpp's convert_hf_to_gguf.py (from the llama-cpp-python sdist on PyPI,
downloaded once), exported with the real CLI and run on onnxruntime: prefill, greedy
decode and a chunked append against transformers' logits for the same ids (F32: <= 1e-4
of the logit scale, same greedy tokens). F16, BF16 and Q8_0 files must load to exactly the
F32 weights passed through the type's rounding. K-quants (which gguf-py cannot write)
are random valid blocks written with GGUFWriter, checked against gguf's dequantize.
"""

from __future__ import annotations

import json
import os
import shutil
import tarfile
import tempfile
from dataclasses import replace
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest

pytest.importorskip("gguf")
pytest.importorskip("transformers")

import gguf  # noqa: E402
import torch  # noqa: E402
from gguf_factory import (  # noqa: E402
    GGUF_OVERRIDES,
    convert_with_llamacpp,
    make_gguf_family_folder,
    write_k_quant_moe_gguf,
)
from llamacpp_sdist import CACHE, LLAMA_CPP_PYTHON, download_sdist  # noqa: E402
from test_families import assert_matches, distinct_routings, run_package  # noqa: E402

from moechat.export.parity import cpu_decoder  # noqa: E402
from moechat.models import gguf as moechat_gguf  # noqa: E402
from moechat.models.gguf import gguf_config, gguf_state_dict, load_gguf, open_gguf  # noqa: E402
from moechat.models.loading import build_model, load_checkpoint  # noqa: E402
from moechat.runtime.errors import MoechatError  # noqa: E402

from model_factory import export_tiny_package  # noqa: E402

FAMILIES = [*GGUF_OVERRIDES, "deepseek"]
ARCH = {"mixtral": "llama", "qwen2_moe": "qwen2moe", "qwen3_moe": "qwen3moe", "olmoe": "olmoe",
        "granitemoe": "granitemoe", "deepseek": "deepseek"}  # fmt: skip


def _unpack_converter(sdist: Path, dest: Path) -> None:
    """convert_hf_to_gguf.py, conversion/ and gguf-py/ from the sdist's vendor/llama.cpp."""
    keep = ("convert_hf_to_gguf.py", "conversion/", "gguf-py/")
    with tarfile.open(sdist) as tar:
        members = []
        for m in tar.getmembers():
            _, _, rel = m.name.partition("/vendor/llama.cpp/")
            if rel.startswith(keep) and (m.isfile() or m.isdir()):
                m.name = rel
                members.append(m)
        safe = {"filter": "data"} if hasattr(tarfile, "data_filter") else {}  # 3.10.12+
        tar.extractall(dest, members=members, **safe)


@pytest.fixture(scope="session")
def llama_cpp() -> Path:
    """llama.cpp's converter, from the llama-cpp-python sdist on PyPI (downloaded once
    into ~/.cache/moechat-tests); MOECHAT_LLAMA_CPP may name an unpacked llama.cpp."""
    if os.environ.get("MOECHAT_LLAMA_CPP"):
        return Path(os.environ["MOECHAT_LLAMA_CPP"])
    target = CACHE / LLAMA_CPP_PYTHON.replace("==", "-")
    if (target / "convert_hf_to_gguf.py").is_file():
        return target
    CACHE.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=CACHE) as tmp:
        sdist = download_sdist(Path(tmp), "llama.cpp's converter")
        unpacked = Path(tmp) / "llama.cpp"
        _unpack_converter(sdist, unpacked)
        shutil.rmtree(target, ignore_errors=True)
        unpacked.rename(target)
    return target


@pytest.fixture(scope="module")
def converted(llama_cpp, tmp_path_factory) -> dict[str, tuple[object, dict[str, Path]]]:
    """Per family: the transformers model (DeepSeek: its state dict) and its GGUF files
    per llama.cpp output type."""
    root = tmp_path_factory.mktemp("gguf-families")
    out: dict[str, tuple[object, dict[str, Path]]] = {}
    jobs = []
    for family in FAMILIES:
        model = make_gguf_family_folder(family, root / family, seed=1)
        files = {t: root / f"{family}-{t}.gguf" for t in ("f32", "f16", "bf16", "q8_0")}
        jobs += [(root / family, path, t) for t, path in files.items()]
        out[family] = (model, files)
    convert_with_llamacpp(llama_cpp, jobs)
    return out


def reference_logits(model, family: str, ids: list[int]) -> np.ndarray:
    """transformers' logits (DeepSeek-MoE v1: the reference built from its modules)."""
    if family == "deepseek":
        from test_families import deepseek_reference

        model = deepseek_reference(model)
    with torch.no_grad():
        return model(torch.tensor([ids])).logits[0].float().numpy()


def eager_logits(path: Path, ids: list[int]) -> np.ndarray:
    ckpt = load_gguf(path, tokenizer_dir=path.with_suffix(".tokenizer"))
    with torch.no_grad():
        return ckpt.model.step(torch.tensor([ids]), ckpt.model.empty_cache())[0][0].numpy()


IDS = [5, 17, 33, 101, 7, 250, 3, 9, 44, 120, 300, 11, 64, 399]


def relative(got: np.ndarray, ref: np.ndarray) -> float:
    return float(np.abs(got - ref).max() / np.abs(ref).max())


@pytest.mark.network
@pytest.mark.parametrize("family", FAMILIES)
def test_gguf_package_matches_transformers(converted, family, tmp_path):
    model, files = converted[family]
    reader = open_gguf(files["f32"])
    assert reader.fields["general.architecture"].contents() == ARCH[family]
    pkg = export_tiny_package(files["f32"], tmp_path / "pkg")
    manifest = json.loads((pkg / "moechat.json").read_text())
    assert manifest["architecture"]["model_type"] == family
    # the GGUF's chat template travels into the package
    template = reader.fields["tokenizer.chat_template"].contents()
    assert manifest["chat_template"]["jinja"] == template
    cfg = load_checkpoint(files["f32"]).config
    ids, got, prompt = run_package(cpu_decoder(pkg / "model.onnx", cfg, 128))
    error = assert_matches(got, reference_logits(model, family, ids), ids, prompt)
    print(f"{family} F32 package vs transformers: {error:.2e} of the logit scale")
    assert distinct_routings(files["f32"], ids) >= 3


def _rounding(weight: np.ndarray, outtype: str) -> str:
    """Which type's rounding turned the F32 ``weight`` into ``got``: the converter stores
    Q8_0 where rows are whole blocks of 32 and falls back to F16 elsewhere."""
    q8 = gguf.GGMLQuantizationType.Q8_0
    if outtype == "q8_0" and weight.shape[-1] % 32 == 0:
        return "Q8_0", gguf.quants.dequantize(gguf.quants.quantize(weight, q8), q8)
    if outtype == "bf16":  # round to nearest even, as gguf-py and torch both do
        return "BF16", torch.from_numpy(weight).to(torch.bfloat16).float().numpy()
    return "F16", weight.astype(np.float16).astype(np.float32)


@pytest.mark.network
@pytest.mark.parametrize("outtype", ["f16", "bf16", "q8_0"])
@pytest.mark.parametrize("family", FAMILIES)
def test_gguf_quantised_weights_are_the_rounded_f32_weights(converted, family, outtype):
    """Each weight from an F16/BF16/Q8_0 file is exactly the F32 file's weight through that
    type's rounding (or the F32 weight where the converter kept F32): stacked experts,
    permuted q/k rows and fused tensors are split the same way whatever the type."""
    model, files = converted[family]
    exact = gguf_state_dict(open_gguf(files["f32"]), gguf_config(open_gguf(files["f32"])))
    reader = open_gguf(files[outtype])
    state = gguf_state_dict(reader, gguf_config(reader))
    assert state.keys() == exact.keys()
    rounded = {}
    for key, weight in state.items():
        want = exact[key].numpy()
        if not np.array_equal(weight.numpy(), want):
            kind, want = _rounding(want, outtype)
            np.testing.assert_array_equal(weight.numpy(), want, err_msg=key)
            rounded[key] = kind
    main = outtype.upper()
    assert rounded["model.layers.2.mlp.experts.1.down_proj.weight"] == main
    assert rounded["model.layers.1.self_attn.q_proj.weight"] == main
    error = relative(eager_logits(files[outtype], IDS), reference_logits(model, family, IDS))
    print(f"{family} {outtype.upper()} vs transformers: {error:.2e} of the logit scale")
    assert 0 < error < {"f16": 2e-3, "bf16": 1e-2, "q8_0": 3e-2}[outtype]


@pytest.mark.network
@pytest.mark.parametrize("family", ["mixtral", "granitemoe", "deepseek", "qwen2_moe"])
def test_q_k_permutation_is_per_architecture(converted, family, monkeypatch):
    """The architectures llama.cpp runs with interleaved RoPE have permuted q/k rows, the
    NeoX-RoPE ones do not: loading with the other assumption breaks parity."""
    model, files = converted[family]
    ref = reference_logits(model, family, IDS)
    assert relative(eager_logits(files["f32"], IDS), ref) < 1e-5
    arch = ARCH[family]
    flipped = replace(moechat_gguf.ARCHITECTURES[arch], permuted_qk=family == "qwen2_moe")
    monkeypatch.setitem(moechat_gguf.ARCHITECTURES, arch, flipped)
    assert relative(eager_logits(files["f32"], IDS), ref) > 1e-3  # right: < 1e-5


@pytest.mark.network
@pytest.mark.parametrize("family", ["mixtral", "qwen2_moe"])
def test_fused_qkv(converted, llama_cpp, family, tmp_path):
    """convert_hf_to_gguf.py --fuse-qkv (one attn_qkv, permuted q/k rows inside for
    Mixtral, biases too for Qwen2-MoE): the same weights as the unfused file."""
    _, files = converted[family]
    fused = tmp_path / "fused.gguf"
    convert_with_llamacpp(llama_cpp, [(files["f32"].parent / family, fused, "f32", "--fuse-qkv")])
    names = {t.name for t in open_gguf(fused).tensors}
    assert "blk.0.attn_qkv.weight" in names and "blk.0.attn_q.weight" not in names
    exact = gguf_state_dict(open_gguf(files["f32"]), gguf_config(open_gguf(files["f32"])))
    state = gguf_state_dict(open_gguf(fused), gguf_config(open_gguf(fused)))
    assert state.keys() == exact.keys()
    for key in state:
        torch.testing.assert_close(state[key], exact[key], rtol=0, atol=0)


# -- K-quants: random valid blocks, checked against gguf's own dequantize ----------------

Q4_K_M = {"attn_q": "Q4_K", "attn_k": "Q4_K", "attn_v": "Q6_K", "attn_output": "Q4_K",
          "ffn_gate_exps": "Q4_K", "ffn_up_exps": "Q4_K", "ffn_down_exps": "Q6_K"}  # fmt: skip
Q5_K_M = {name: "Q6_K" if kind == "Q6_K" else "Q5_K" for name, kind in Q4_K_M.items()}


@pytest.mark.parametrize("types", [Q4_K_M, Q5_K_M], ids=["Q4_K_M", "Q5_K_M"])
def test_k_quant_stacked_experts(tmp_path, types):
    path = write_k_quant_moe_gguf(tmp_path / "k.gguf", types)
    reader = open_gguf(path)
    cfg = gguf_config(reader)
    assert cfg.model_type == "mixtral" and cfg.intermediate_size == 256
    state = gguf_state_dict(reader, cfg)
    tensors = {t.name: t for t in reader.tensors}
    for name, proj in [("gate", "gate_proj"), ("up", "up_proj"), ("down", "down_proj")]:
        tensor = tensors[f"blk.0.ffn_{name}_exps.weight"]
        assert tensor.tensor_type.name == types[f"ffn_{name}_exps"]
        stacked = gguf.quants.dequantize(tensor.data, tensor.tensor_type)
        assert stacked.shape == (4, 256, 256)
        for e in range(4):
            got = state[f"model.layers.0.mlp.experts.{e}.{proj}.weight"].numpy()
            np.testing.assert_array_equal(got, stacked[e])
    # attention: q/k rows unpermuted (a permutation of the rows of gguf's dequantize)
    q_tensor = tensors["blk.0.attn_q.weight"]
    q = gguf.quants.dequantize(q_tensor.data, q_tensor.tensor_type)
    got = state["model.layers.0.self_attn.q_proj.weight"].numpy()
    np.testing.assert_array_equal(got, moechat_gguf.unpermute_rope_rows(q, 4))
    model = build_model(cfg, state, max_positions=64)
    logits, _ = model.step(torch.tensor([[1, 2, 3]]), model.empty_cache())
    assert torch.isfinite(logits).all()


def test_k_quant_rows_read_block_by_block_equal_the_load(tmp_path):
    """The streamed export's reads (models/gguf_streaming.py): any block of rows, or of
    columns, of any weight equals the whole-model load's, K-quant experts and permuted
    q/k included."""
    from moechat.models.gguf_streaming import gguf_parts

    path = write_k_quant_moe_gguf(tmp_path / "k.gguf", Q4_K_M)
    reader = open_gguf(path)
    cfg = gguf_config(reader)
    state = gguf_state_dict(reader, cfg)
    parts, shapes = gguf_parts(reader, cfg)
    assert set(parts) == set(state)
    for key, part in parts.items():
        want = state[key]
        assert shapes[key] == tuple(want.shape)
        rows = [part.read((slice(a, a + 96),)) for a in range(0, len(want), 96)]
        assert torch.equal(torch.cat(rows), want), key
        if want.dim() == 2:
            assert torch.equal(part.read((slice(None), slice(16, 48))), want[:, 16:48]), key


@pytest.mark.network
def test_real_q4_k_m_from_llama_cpp(converted, tmp_path):
    """A Q4_K_M file made by llama.cpp's own quantizer (when llama-cpp-python is
    installed): loads, and stays near transformers."""
    llama_cpp_lib = pytest.importorskip("llama_cpp")
    import ctypes

    model, files = converted["mixtral"]
    out = tmp_path / "q4_k_m.gguf"
    params = llama_cpp_lib.llama_model_quantize_default_params()
    params.ftype = llama_cpp_lib.LLAMA_FTYPE_MOSTLY_Q4_K_M
    rc = llama_cpp_lib.llama_model_quantize(
        str(files["f32"]).encode(), str(out).encode(), ctypes.byref(params)
    )
    assert rc == 0
    error = relative(eager_logits(out, IDS), reference_logits(model, "mixtral", IDS))
    print(f"mixtral Q4_K_M (llama.cpp) vs transformers: {error:.2e} of the logit scale")
    assert error < 0.25


# -- bad files: one-line errors -------------------------------------------------------


def _metadata_only_gguf(path: Path, arch: str, router: bool = True, **values) -> Path:
    w = gguf.GGUFWriter(str(path), arch)
    settings = {"block_count": 1, "embedding_length": 64, "head_count": 4,
                "head_count_kv": 4, "feed_forward_length": 96, **values}  # fmt: skip
    for key, value in settings.items():
        getattr(w, f"add_{key}")(value)
    if values.get("expert_count"):  # block 0 exists, so that the routing is what gets refused
        if router:
            w.add_tensor("blk.0.ffn_gate_inp.weight", np.zeros((values["expert_count"], 64), "f4"))
        else:
            w.add_tensor("blk.0.attn_norm.weight", np.zeros(64, "f4"))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


# what a deepseek2 file needs before its routing and RoPE are read (models/gguf_mla.py)
DEEPSEEK2 = {"expert_count": 4, "expert_used_count": 2, "vocab_size": 32, "kv_lora_rank": 32,
             "rope_dimension_count": 8, "key_length_mla": 24, "value_length_mla": 16}  # fmt: skip


@pytest.mark.parametrize(
    "arch,values,message",
    [
        (
            "deepseek2",
            {**DEEPSEEK2, "expert_gating_func": SimpleNamespace(value=3)},  # softmax of top-k
            r"GGUF expert_gating_func 3 is not supported \(softmax, sigmoid\)",
        ),
        (
            "deepseek2",
            {**DEEPSEEK2, "rope_scaling_type": gguf.RopeScalingType.LINEAR},
            r"GGUF RoPE scaling \(linear\) is not supported for deepseek2",
        ),
        ("phi3", {}, r"unsupported GGUF architecture 'phi3' \(supported: llama, qwen2moe"),
        ("qwen3moe", {"head_count": 0}, r"qwen3moe.attention.head_count must be at least 1"),
        ("olmoe", {"expert_count": 4, "router": False}, r"expert_count is 4 but 0 blocks have"),
        (
            "deepseek",
            {"expert_count": 4, "expert_gating_func": gguf.ExpertGatingFuncType.SIGMOID},
            r"GGUF expert gating other than softmax is not supported",
        ),
        (
            "deepseek",
            {"expert_count": 4, "expert_weights_scale": 2.5},
            r"expert_weights_scale \(scaled routing weights\) is not supported",
        ),
    ],
)
def test_bad_gguf_is_a_one_line_error(tmp_path, arch, values, message):
    path = _metadata_only_gguf(tmp_path / "bad.gguf", arch, **values)
    with pytest.raises(MoechatError, match=message) as err:
        load_checkpoint(path)
    assert "\n" not in str(err.value)


@pytest.mark.network
@pytest.mark.parametrize("family", FAMILIES)
def test_gguf_streamed_export_writes_the_whole_model_bytes(converted, family, tmp_path):
    """A GGUF exported streamed (each block of rows dequantised from the memory-mapped
    file: Q8_0 blocks, stacked experts, llama.cpp's permuted q/k rows) writes the bytes
    of the whole-model path, and its layer-by-layer parity holds."""
    import filecmp

    from moechat.export.layer_parity import check_layers
    from moechat.export.onnx_graph import export_decoder
    from moechat.export.package import PARITY_TOLERANCE
    from moechat.export.parity import parity_prompts
    from moechat.export.streamed import trace_streamed, write_streamed
    from moechat.models.streaming import open_streamed

    _, files = converted[family]
    whole, streamed = tmp_path / "whole", tmp_path / "streamed"
    whole.mkdir()
    streamed.mkdir()
    export_decoder(load_checkpoint(files["q8_0"]).model, whole / "model.onnx")
    ckpt = open_streamed(files["q8_0"])
    write_streamed(trace_streamed(ckpt), streamed / "model.onnx", ckpt.config.num_hidden_layers)
    for name in ("model.onnx", "model.onnx.data"):
        assert filecmp.cmp(whole / name, streamed / name, shallow=False), name
    prompts = parity_prompts(ckpt.config.vocab_size)
    report = check_layers(ckpt, streamed / "model.onnx", prompts, PARITY_TOLERANCE)
    assert report.report.relative < PARITY_TOLERANCE and report.report.greedy_match
