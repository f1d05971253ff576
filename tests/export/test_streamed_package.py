"""moechat export --stream: layer-by-layer parity that names a broken layer; packages."""

import json

import numpy as np
import onnx
import pytest

from moechat.app.cli import main
from moechat.export.layer_parity import check_layers
from moechat.export.package import PARITY_TOLERANCE
from moechat.export.parity import parity_prompts
from moechat.export.streamed import trace_streamed, write_streamed
from moechat.models.streaming import open_streamed
from moechat.runtime.errors import MoechatError

from model_factory import TINY_MOE, make_hf_folder


def _corrupt(graph, name):
    """Flip the sign of initializer ``name`` in the graph's external data, in place."""
    proto = onnx.load(str(graph), load_external_data=False)
    tensor = next(t for t in proto.graph.initializer if t.name == name)
    info = {e.key: int(e.value) for e in tensor.external_data if e.key != "location"}
    data = np.memmap(graph.with_name(graph.name + ".data"), np.float32, "r+")
    part = slice(info["offset"] // 4, (info["offset"] + info["length"]) // 4)
    data[part] = -data[part]
    data.flush()


def test_layer_parity_names_the_corrupted_layer(tmp_path):
    src = make_hf_folder(tmp_path / "src", TINY_MOE.with_changes(num_hidden_layers=3))
    ckpt = open_streamed(src)
    graph = tmp_path / "model.onnx"
    write_streamed(trace_streamed(ckpt), graph, 3)
    prompts = parity_prompts(ckpt.config.vocab_size)
    report = check_layers(ckpt, graph, prompts, PARITY_TOLERANCE)
    assert report.report.relative < PARITY_TOLERANCE and report.report.greedy_match
    # layer 1's packed routed experts (fc1): the first probe after them is layer 2's cache
    _corrupt(graph, "model.layers.1.mlp.lifted_tensor_2")
    with pytest.raises(MoechatError, match=r"present\.2\.key.*layer 1's feed-forward"):
        check_layers(ckpt, graph, prompts, PARITY_TOLERANCE)


@pytest.mark.slow
@pytest.mark.parametrize(
    "flag,weights", [("--int4", "int4"), ("--int4-experts", "int4 experts, int8")]
)
def test_streamed_4bit_packages_from_the_command_line(tmp_path, capsys, flag, weights):
    # 4-bit experts are what make a large MoE fit: its export must not need the model
    src = make_hf_folder(tmp_path / "src", TINY_MOE)
    out = tmp_path / "pkg"
    assert main(["export", str(src), str(out), flag, "--stream"]) == 0
    manifest = json.loads((out / "moechat.json").read_text())
    quant = manifest["graph"]["quantization"]
    assert quant["method"] == "int4" and quant["weights"] == weights
    assert "QMoE 4-bit" in quant["routed_experts"]
    assert ("round to nearest" in quant["matmuls"]) == (flag == "--int4")
    assert manifest["fidelity"]["reference"] == "pytorch-fp32, layer by layer"
    assert f"{weights} package" in capsys.readouterr().out
    assert main(["run", str(out), "--raw", "hello", "--max-new-tokens", "4"]) == 0


def test_streamed_int8_package_from_the_command_line(tmp_path, capsys):
    src = make_hf_folder(tmp_path / "src", TINY_MOE)
    out = tmp_path / "pkg"
    assert main(["export", str(src), str(out), "--int8", "--stream"]) == 0
    manifest = json.loads((out / "moechat.json").read_text())
    assert manifest["fidelity"]["reference"] == "pytorch-fp32, layer by layer"
    assert manifest["fidelity"]["tokens"] > 100
    assert manifest["graph"]["quantization"]["smoothing"] is None
    assert manifest["parity"]["relative"] < 0.25
    assert "fidelity vs fp32" in capsys.readouterr().out
    assert main(["run", str(out), "--raw", "hello", "--max-new-tokens", "4"]) == 0


def test_stream_refuses_options_it_cannot_honour(tmp_path, capsys):
    src = make_hf_folder(tmp_path / "src", TINY_MOE)
    assert main(["export", str(src), str(tmp_path / "pkg"), "--stream", "--fp16"]) != 0
    assert "--fp16 is not available when the checkpoint is exported streamed" in (
        capsys.readouterr().err
    )
    assert not (tmp_path / "pkg").exists()


def test_graph_run_by_layer_equals_the_whole_graph(tmp_path):
    from moechat.export.graph_pieces import pieces
    from moechat.export.layer_parity import graph_probes
    from moechat.runtime.providers import create_session

    src = make_hf_folder(tmp_path / "src", TINY_MOE.with_changes(num_hidden_layers=3))
    ckpt = open_streamed(src)
    graph = tmp_path / "model.onnx"
    write_streamed(trace_streamed(ckpt), graph, 3)
    parts = pieces(onnx.load(str(graph), load_external_data=False).graph, 3)
    assert parts is not None and len(parts) == 5  # embedding, 3 layers, logits
    names = [o.name for o in create_session(graph, "CPUExecutionProvider").get_outputs()]
    prompts = parity_prompts(ckpt.config.vocab_size)[:2]
    whole = create_session(graph, "CPUExecutionProvider")
    for prompt, got in zip(prompts, graph_probes(graph, ckpt, prompts, names), strict=True):
        cfg, n = ckpt.config, len(prompt)
        feed = {
            "input_ids": np.array([prompt], np.int64),
            "attention_mask": np.ones((1, n), np.int64),
            "logits_positions": np.arange(n, dtype=np.int64),
        }
        for i in range(3):
            for kind, d in (("key", cfg.head_dim), ("value", cfg.value_head_dim)):
                feed[f"past_key_values.{i}.{kind}"] = np.zeros(
                    (1, cfg.num_key_value_heads, 0, d), np.float32
                )
        want = dict(zip(names, whole.run(names, feed), strict=True))
        assert set(got.values) | {"logits"} == set(names)
        for name in got.values:
            np.testing.assert_allclose(got.values[name], want[name], rtol=1e-5, atol=1e-5)
        some = np.array([n - 1, 0], np.int64)  # any positions, in any order
        np.testing.assert_allclose(got.logits(some), want["logits"][0, some], rtol=1e-5, atol=1e-5)


def test_layerwise_fidelity_is_the_same_whatever_the_logit_block(tmp_path, monkeypatch):
    """The logits are fetched a block of positions at a time on both sides (a vocabulary
    per position is large): the metrics must not depend on the block, and the fp32 graph
    against its own PyTorch reference must agree."""
    import moechat.export.layer_parity as layer_parity

    src = make_hf_folder(tmp_path / "src", TINY_MOE.with_changes(num_hidden_layers=2))
    ckpt = open_streamed(src)
    graph = tmp_path / "model.onnx"
    write_streamed(trace_streamed(ckpt), graph, 2)
    rng = np.random.default_rng(0)
    ids = rng.integers(0, ckpt.config.vocab_size, 40).tolist()
    whole = layer_parity.measure_fidelity_layerwise(ckpt, graph, ids, "random", 25)
    monkeypatch.setattr(layer_parity, "LOGIT_ROWS", 7)  # blocks straddle the windows' ends
    blocked = layer_parity.measure_fidelity_layerwise(ckpt, graph, ids, "random", 25)
    assert whole.tokens == blocked.tokens == 24 + 14
    assert whole.top1_agreement == blocked.top1_agreement == 1.0
    assert blocked.mean_kl == pytest.approx(whole.mean_kl, abs=1e-9) and whole.mean_kl < 1e-6
    assert blocked.perplexity_fp32 == pytest.approx(whole.perplexity_fp32, rel=1e-6)
    assert blocked.perplexity_ratio == pytest.approx(1.0, abs=1e-4)


def test_streamed_deepseek_v3_package_records_the_correction_bias(tmp_path):
    # noaux_tc's correction bias goes into moechat.json: read from the shards when the
    # model is never built, the same values as the whole-model export's
    from family_factory import make_mla_folder

    src = tmp_path / "src"
    make_mla_folder("deepseek_v3", src, seed=2)
    manifests = []
    for mode in ("--stream", "--no-stream"):
        out = tmp_path / mode.strip("-")
        assert main(["export", str(src), str(out), mode]) == 0
        manifests.append(json.loads((out / "moechat.json").read_text()))
    streamed, whole = (m["routing"] for m in manifests)
    assert streamed["correction_bias"] and streamed == whole


def test_ctrl_c_in_a_streamed_export_leaves_nothing_half_written(tmp_path, monkeypatch):
    """Interrupted after the weights are written (the long part): exit 130, the package
    being replaced (--force) untouched, no temporary folder left beside it."""
    import moechat.export.streamed as streamed

    src = make_hf_folder(tmp_path / "src", TINY_MOE)
    out = tmp_path / "pkg"
    out.mkdir()
    (out / "moechat.json").write_text("the user's package")
    written = []
    write = streamed.write_streamed

    def write_then_interrupt(*args, **kwargs):
        write(*args, **kwargs)
        written.append(True)
        raise KeyboardInterrupt

    monkeypatch.setattr(streamed, "write_streamed", write_then_interrupt)
    assert main(["export", str(src), str(out), "--stream", "--int8", "--force"]) == 130
    assert written
    assert (out / "moechat.json").read_text() == "the user's package"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["pkg", "src"]
