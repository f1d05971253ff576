"""The streamed export (export/streamed.py) writes the whole-model path's bytes."""

import filecmp

import onnx
import pytest
import torch
from safetensors.torch import load_file, save_file

from moechat.export.int8.lazy_nbits import lazy_nbits
from moechat.export.int8.quantize import QuantizeOptions, quantize_model
from moechat.export.onnx_graph import export_decoder, save_model
from moechat.export.streamed import trace_streamed, write_streamed
from moechat.models.loading import load_checkpoint
from moechat.models.streaming import open_streamed
from moechat.runtime.errors import MoechatError

from model_factory import TINY_MOE, make_hf_folder


def _to_bf16(folder):
    path = folder / "model.safetensors"
    state = {k: v.to(torch.bfloat16) for k, v in load_file(str(path)).items()}
    save_file(state, str(path), metadata={"format": "pt"})
    return folder


def assert_same_graph_files(src, tmp_path, **kwargs):
    whole, streamed = tmp_path / "whole", tmp_path / "streamed"
    whole.mkdir()
    streamed.mkdir()
    export_decoder(load_checkpoint(src).model, whole / "model.onnx", **kwargs)
    ckpt = open_streamed(src)
    proto = trace_streamed(ckpt, **kwargs)
    write_streamed(proto, streamed / "model.onnx", ckpt.config.num_hidden_layers)
    for name in ("model.onnx", "model.onnx.data"):
        assert filecmp.cmp(whole / name, streamed / name, shallow=False), name


def test_bf16_tiny_moe_same_bytes(tmp_path):
    src = _to_bf16(make_hf_folder(tmp_path / "src", TINY_MOE))
    assert_same_graph_files(src, tmp_path)


@pytest.mark.slow
def test_qwen2_moe_same_bytes(tmp_path):
    # sigmoid-gated shared expert, a dense layer (mlp_only_layers), untied lm_head
    from family_factory import make_family_folder

    make_family_folder("qwen2_moe", tmp_path / "src")
    assert_same_graph_files(tmp_path / "src", tmp_path)


@pytest.mark.parametrize("layout", ["gate_up_proj", "gate_up_proj transposed"])
def test_stacked_experts_same_bytes(tmp_path, layout):
    # transformers' packed layout: all experts of a layer in one tensor, each read from
    # its place in the stack (the older layout stores them transposed)
    src = _to_bf16(make_hf_folder(tmp_path / "src", TINY_MOE))
    path = src / "model.safetensors"
    state = load_file(str(path))
    for layer in range(TINY_MOE.num_hidden_layers):
        prefix = f"model.layers.{layer}.mlp.experts"
        gate_up = torch.stack(
            [
                torch.cat(
                    [
                        state.pop(f"{prefix}.{e}.gate_proj.weight"),
                        state.pop(f"{prefix}.{e}.up_proj.weight"),
                    ]
                )
                for e in range(TINY_MOE.n_routed_experts)
            ]
        )
        down = torch.stack(
            [state.pop(f"{prefix}.{e}.down_proj.weight") for e in range(TINY_MOE.n_routed_experts)]
        )
        if layout.endswith("transposed"):
            gate_up, down = gate_up.transpose(1, 2).contiguous(), down.transpose(1, 2).contiguous()
        state[f"{prefix}.gate_up_proj"], state[f"{prefix}.down_proj"] = gate_up, down
    save_file(state, str(path), metadata={"format": "pt"})
    assert_same_graph_files(src, tmp_path)


def test_stacked_experts_of_the_wrong_shape_are_a_clear_error(tmp_path):
    src = make_hf_folder(tmp_path / "src", TINY_MOE)
    path = src / "model.safetensors"
    state = load_file(str(path))
    state["model.layers.0.mlp.experts.down_proj"] = torch.zeros(TINY_MOE.n_routed_experts, 64, 95)
    save_file(state, str(path))
    with pytest.raises(
        MoechatError, match=r"down_proj has shape \(4, 64, 95\), expected \[4, 64, 96\]"
    ):
        open_streamed(src)


@pytest.mark.slow
def test_granite_moe_same_bytes(tmp_path):
    # Granite ships its experts stacked (block_sparse_moe.input_linear / output_linear)
    from family_factory import make_family_folder

    make_family_folder("granitemoe", tmp_path / "src")
    assert_same_graph_files(tmp_path / "src", tmp_path)


@pytest.mark.parametrize(
    "bits",
    [
        {},
        {"expert_bits": 4},  # --int4-experts
        {"expert_bits": 4, "dense_bits": 4, "int4_method": "rtn"},  # --int4 without calibration
    ],
    ids=["int8", "int4-experts", "int4"],
)
def test_quantised_same_bytes_as_quantising_the_whole_graph(tmp_path, bits):
    """Streamed int8 / int4 (weights quantised as they are written) = quantize_model on
    the loaded fp32 graph, smoothing off (it needs the fp32 graph) and 4-bit matmuls by
    round to nearest (GPTQ needs it too; export/streamed_package.py)."""
    src = make_hf_folder(tmp_path / "src", TINY_MOE)
    options = QuantizeOptions(smooth=False, block=32, **bits)
    whole, streamed = tmp_path / "whole", tmp_path / "streamed"
    whole.mkdir()
    streamed.mkdir()
    export_decoder(load_checkpoint(src).model, tmp_path / "fp32.onnx")
    model, info = quantize_model(onnx.load(str(tmp_path / "fp32.onnx")), options)
    save_model(model, whole / "model.onnx")
    ckpt = open_streamed(src)
    with lazy_nbits():
        lazy, lazy_info = quantize_model(trace_streamed(ckpt), options)
    write_streamed(lazy, streamed / "model.onnx", ckpt.config.num_hidden_layers)
    assert lazy_info == info
    for name in ("model.onnx", "model.onnx.data"):
        assert filecmp.cmp(whole / name, streamed / name, shallow=False), name


def _add_prediction_layer(folder, layers: int) -> None:
    """A copy of the last layer as layer ``layers``: V3's multi-token-prediction layer is
    in the Hub's checkpoints, never in the chat model."""
    path = folder / "model.safetensors"
    state = load_file(str(path))
    last = f"model.layers.{layers - 1}."
    for key in [k for k in state if k.startswith(last)]:
        state[f"model.layers.{layers}." + key[len(last) :]] = state[key].clone()
    save_file(state, str(path), metadata={"format": "pt"})


@pytest.mark.parametrize("kind", ["deepseek_v2", "deepseek_v3"])
def test_mla_same_bytes_and_layer_parity(tmp_path, kind):
    # rope rows interleaved in the checkpoint (read through their permutation), YaRN
    # tables, kv_b_proj folded per head from its values, a prediction layer left out
    from family_factory import MLA, YARN, make_mla_folder

    from moechat.export.layer_parity import check_layers
    from moechat.export.package import PARITY_TOLERANCE
    from moechat.export.parity import parity_prompts

    src = tmp_path / "src"
    make_mla_folder(kind, src, seed=3, rope_scaling=YARN)
    if kind == "deepseek_v3":
        _add_prediction_layer(src, MLA["num_hidden_layers"])
    ckpt = open_streamed(src)
    assert ckpt.config.rope_interleave and ckpt.row_orders
    assert not any(k.startswith(f"model.layers.{MLA['num_hidden_layers']}.") for k in ckpt.keys)
    assert_same_graph_files(src, tmp_path)
    report = check_layers(
        ckpt,
        tmp_path / "streamed" / "model.onnx",
        parity_prompts(ckpt.config.vocab_size),
        PARITY_TOLERANCE,
    )
    assert report.report.relative < PARITY_TOLERANCE and report.report.greedy_match
