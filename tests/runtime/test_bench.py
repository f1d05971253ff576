"""`moechat bench`: fields and sane values on the tiny package (no timing assertions)."""

from __future__ import annotations

import json

import numpy as np
import pytest

from moechat.app.cli import main
from moechat.export.bench_anchors import common, compare, llama_cpp, pytorch
from moechat.runtime import bench
from moechat.runtime.bench import BenchOptions, memory_usage, prompt_ids, run_bench
from moechat.runtime.bench_result import ChatSkipped, format_report
from moechat.runtime.errors import MoechatError
from moechat.runtime.package import load_package
from moechat.runtime.tokenizer import TextTokenizer

SMALL = ["--prompt-tokens", "24", "--new-tokens", "6", "--repeat", "2", "--turns", "3"]


def _bench_json(capsys, *argv: str) -> dict:
    assert main(["bench", *argv, "--json"]) == 0
    return json.loads(capsys.readouterr().out)


def test_bench_json_fields(tiny_package, capsys):
    r = _bench_json(capsys, str(tiny_package), *SMALL, "--device", "cpu", "--threads", "1")
    assert r["provider"] == "CPUExecutionProvider"
    assert r["threads"] == 1
    assert r["prompt_tokens"] == 24 and r["new_tokens"] == 6 and r["repeat"] == 2
    for key in ("prefill_tokens_per_s", "ttft_ms", "decode_tokens_per_s"):
        assert isinstance(r[key], float) and r[key] > 0, key
    assert len(r["runs"]) == 2 and all(run["new_tokens"] == 6 for run in r["runs"])
    assert r["max_context"] == load_package(tiny_package).max_context
    assert r["load_s"] >= 0
    mem = r["memory"]
    assert mem["peak_rss_bytes"] > 10 * 2**20
    if mem["rss_bytes"] is not None:  # Linux, Windows
        assert mem["peak_rss_bytes"] >= mem["rss_bytes"] > 0
    assert mem["package_bytes"] > 0 and mem["kv_cache_bytes"] > 0
    assert mem["budget_bytes"] == mem["package_bytes"] + mem["kv_cache_bytes"] + 150 * 2**20
    assert isinstance(mem["ok"], bool)
    chat = r["chat"]
    assert chat["turns"] == 3 and len(chat["ttft_ms_per_turn"]) == 3
    assert chat["ttft_ms_first"] > 0 and chat["ttft_ms_last"] > 0 and chat["ratio"] > 0
    assert chat["target"] == 1.5 and isinstance(chat["ok"], bool)
    assert chat["context_at_last_turn"] > chat["prefill_tokens_per_turn"][0]
    m = r["machine"]
    assert m["cpus"] >= 1 and m["onnxruntime"] and m["cpu"]
    assert "compare" not in r and "prompt_ids" not in r


def test_bench_table(tiny_package, capsys):
    assert main(["bench", str(tiny_package), *SMALL, "--turns", "0"]) == 0
    out = capsys.readouterr().out
    for text in ("prefill", "time to first token", "decode", "peak RSS", "CPUExecutionProvider"):
        assert text in out
    assert "skipped: --turns 0" in out


def test_bench_context_shrinks_chat_messages(tiny_package):
    result = run_bench(
        tiny_package,
        BenchOptions(prompt_tokens=8, new_tokens=4, repeat=1, max_context=200, turns=4),
    )
    chat = result.chat
    assert not isinstance(chat, ChatSkipped)
    assert chat.reply_tokens < 32  # halved to fit a 200-token context
    assert chat.context_at_last_turn < 200
    assert "prefill" in format_report(result)


def test_bench_rejects_bad_options(tiny_package, capsys):
    assert main(["bench", str(tiny_package), "--new-tokens", "1"]) == 1
    assert "--new-tokens" in capsys.readouterr().err
    assert main(["bench", str(tiny_package), "--prompt-tokens", "500", "--new-tokens", "100"]) == 1
    assert "exceed the context" in capsys.readouterr().err
    with pytest.raises(MoechatError):
        BenchOptions(turns=1).validate()


def test_prompt_ids_have_the_exact_length(tiny_package):
    tok = TextTokenizer.from_file(load_package(tiny_package).tokenizer_path)
    for n in (1, 7, 256, 700):
        assert len(prompt_ids(tok, n)) == n


def test_memory_usage_is_positive(monkeypatch):
    mem = memory_usage()
    assert mem["peak_rss_bytes"] > 0
    # without /proc (macOS, BSD): getrusage's ru_maxrss
    monkeypatch.setattr(bench, "_proc_status_kib", lambda key: None)
    monkeypatch.setattr("sys.platform", "freebsd14")  # ru_maxrss in KiB, as on Linux
    mem = memory_usage()
    assert mem["source"] == "ru_maxrss" and mem["peak_rss_bytes"] > 2**20


def test_compare_reports_pytorch_and_skips_the_rest(tiny_package, capsys):
    r = _bench_json(capsys, str(tiny_package), *SMALL, "--turns", "0", "--compare")
    assert set(r["compare"]) == {"moechat", *compare.ANCHORS}
    ours = r["compare"]["moechat"]
    assert ours["interleaved"] and len(ours["runs"]) == 2 and ours["decode_tokens_per_s"] > 0
    pt = r["compare"]["pytorch"]
    assert pt["status"] == "ok", pt
    assert pt["decode_tokens_per_s"] > 0 and pt["ttft_ms"] > 0 and pt["prefill_tokens_per_s"] > 0
    assert pt["peak_rss_bytes"] > 0 and pt["version"] and len(pt["runs"]) == 2
    assert pt["moechat_decode_speedup"] > 0 and pt["moechat_decode_speedup_paired"] > 0
    # same fp32 weights, same prompt: greedy tokens agree (a tiny random model's logits
    # are well separated)
    assert pt["greedy_tokens_agreeing"] == 6
    for name in ("onnxruntime-genai", "llama.cpp"):
        assert r["compare"][name]["status"] == "skipped", r["compare"][name]
        assert r["compare"][name]["reason"]


def test_compare_table_lists_skips(tiny_package, capsys, monkeypatch):
    monkeypatch.setattr(common, "installed", lambda module: module == "torch")
    result = run_bench(tiny_package, BenchOptions(prompt_tokens=8, new_tokens=3, repeat=1, turns=0))
    result.compare = compare.run_compare(
        result, load_package(tiny_package).manifest, anchors=("onnxruntime-genai", "llama.cpp")
    )
    text = compare.format_compare(result)
    assert "onnxruntime-genai: skipped: not installed" in text
    assert "llama.cpp: skipped: llama-cpp-python is not installed" in text
    assert result.to_json()["compare"]["llama.cpp"]["status"] == "skipped"


def _manifest(tiny_package, **changes) -> dict:
    manifest = json.loads(json.dumps(load_package(tiny_package).manifest))
    for key, value in changes.items():
        section, name = key.split("__")
        manifest[section][name] = value
    return manifest


def test_plan_reasons(tiny_package, monkeypatch, tmp_path):
    monkeypatch.setattr(common, "installed", lambda module: True)
    moe = compare.plan(_manifest(tiny_package))
    assert moe["pytorch"] is None
    assert "MiniMind" in moe["onnxruntime-genai"] and "MiniMind" in moe["llama.cpp"]

    demo = _manifest(tiny_package)
    demo["demo"] = {"source": {"model": "SmolLM2"}}
    assert "exist only in the package" in compare.plan(demo)["pytorch"]

    gone = compare.plan(_manifest(tiny_package, provenance__source=str(tmp_path / "gone")))
    assert "not available" in gone["pytorch"]

    hf_llama = _manifest(
        tiny_package, architecture__model_type="llama", architecture__use_moe=False
    )
    monkeypatch.delenv(llama_cpp.CONVERTER_ENV, raising=False)
    reasons = compare.plan(hf_llama)
    assert reasons["onnxruntime-genai"] is None
    assert llama_cpp.CONVERTER_ENV in reasons["llama.cpp"]  # HF source: needs the converter
    assert "4-bit packages" in reasons["llama.cpp-Q4_K_M"]  # an fp32 package
    pth = _manifest(tiny_package, provenance__source=str(tmp_path / "model.pth"))
    (tmp_path / "model.pth").write_bytes(b"")
    pth["architecture"].update(model_type="llama", use_moe=False)
    assert "not a GGUF" in compare.plan(pth)["llama.cpp"]

    monkeypatch.setattr(common, "installed", lambda module: False)
    none = compare.plan(hf_llama)
    assert "torch is not installed" in none["pytorch"]
    assert "not installed" in none["onnxruntime-genai"]
    assert "not installed" in none["llama.cpp"]


def test_q8_0_gguf_conversion(tmp_path):
    gguf = pytest.importorskip("gguf")
    from gguf import GGMLQuantizationType as Q

    rng = np.random.default_rng(0)
    weight = rng.standard_normal((8, 64)).astype(np.float32)
    norm = rng.standard_normal(64).astype(np.float32)
    src = tmp_path / "tiny.gguf"
    w = gguf.GGUFWriter(str(src), "llama")
    w.add_block_count(1)
    w.add_file_type(int(gguf.LlamaFileType.ALL_F32))
    w.add_token_list(["a", "b"])
    w.add_tensor("blk.0.attn_q.weight", weight)
    w.add_tensor("blk.0.attn_norm.weight", norm)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()

    dst = llama_cpp.make_q8_0_gguf(src, tmp_path / "tiny.Q8_0.gguf")
    r = gguf.GGUFReader(str(dst))
    assert r.fields["general.architecture"].contents() == "llama"
    assert r.fields["llama.block_count"].contents() == 1
    assert r.fields["tokenizer.ggml.tokens"].contents() == ["a", "b"]
    assert r.fields["general.file_type"].contents() == int(gguf.LlamaFileType.MOSTLY_Q8_0)
    tensors = {t.name: t for t in r.tensors}
    q = tensors["blk.0.attn_q.weight"]
    assert q.tensor_type == Q.Q8_0
    back = gguf.quants.dequantize(q.data, Q.Q8_0)
    np.testing.assert_allclose(back, weight, atol=np.abs(weight).max() / 100)
    n = tensors["blk.0.attn_norm.weight"]
    assert n.tensor_type == Q.F32
    np.testing.assert_array_equal(np.asarray(n.data), norm)


def test_reference_must_match_the_package(tiny_package):
    pytest.importorskip("torch")
    manifest = _manifest(tiny_package)
    assert pytorch.load_reference(manifest, 512).config.use_moe
    manifest["architecture"]["num_hidden_layers"] += 1
    with pytest.raises(RuntimeError, match="is not the packaged model"):
        pytorch.load_reference(manifest, 512)


def test_json_keeps_its_field_order(tiny_package):
    result = run_bench(tiny_package, BenchOptions(prompt_tokens=8, new_tokens=3, repeat=1, turns=0))
    out = result.to_json()
    assert list(out) == [
        "model", "path", "architecture", "moe", "graph", "provider", "device", "threads",
        "spinning", "max_context", "prompt_tokens", "new_tokens", "repeat", "sampling",
        "load_s", "prefill_tokens_per_s", "ttft_ms", "decode_tokens_per_s", "runs", "memory",
        "chat", "machine",
    ]  # fmt: skip
    assert out["chat"] == {"skipped": "--turns 0"}
    assert list(out["memory"]) == [
        "peak_rss_bytes", "rss_bytes", "source", "package_bytes", "kv_cache_bytes",
        "kv_bytes_per_token", "huge_page_bytes", "allowance_bytes", "budget_bytes", "ok",
        "load_peak_rss_bytes", "load_rss_bytes",
    ]  # fmt: skip
    memory = out["memory"]
    assert 0 < memory["load_rss_bytes"] <= memory["load_peak_rss_bytes"] <= memory["peak_rss_bytes"]
    assert json.loads(json.dumps(out)) == out


def test_package_bytes_leaves_out_unfinished_writes(tmp_path):
    from moechat.runtime.package import package_bytes

    (tmp_path / "model.onnx").write_bytes(b"x" * 10)
    (tmp_path / "model.onnx.data.tmp").write_bytes(b"x" * 100)
    (tmp_path / "sub").mkdir()
    assert package_bytes(tmp_path) == 10


# -- moechat bench --ab -----------------------------------------------------------------


def _fake_runs(speeds: dict[str, float]):
    from moechat.runtime.bench_ab import AbRun

    calls: list[str] = []

    def run(command, env):
        name = "variant" if env.get("MOECHAT_TEST_AB") == "1" else "baseline"
        calls.append(name)
        return AbRun(speeds[name], 100.0, 0)

    return run, calls


def test_ab_alternates_the_order_and_summarises(monkeypatch):
    from moechat.runtime.bench_ab import format_ab, run_ab

    monkeypatch.delenv("MOECHAT_TEST_AB", raising=False)
    run, calls = _fake_runs({"baseline": 100.0, "variant": 90.0})
    result = run_ab("pkg", {"MOECHAT_TEST_AB": "1"}, 3, [], run=run)
    assert calls == ["baseline", "variant", "variant", "baseline", "baseline", "variant"]
    assert [p.first for p in result.pairs] == ["baseline", "variant", "baseline"]
    assert result.variant_faster == 0 and result.median_decode_ratio == pytest.approx(0.9)
    assert result.to_json()["median_decode_ratio"] == 0.9
    assert "faster in 0 of 3 pairs, median decode ratio 0.900x" in format_ab(result)


def test_ab_rejects_bad_settings():
    from moechat.runtime.bench_ab import parse_settings, run_ab

    assert parse_settings(["MOECHAT_HUGEPAGES=0", "A_B=x=y"]) == {
        "MOECHAT_HUGEPAGES": "0",
        "A_B": "x=y",
    }
    for bad in ("MOECHAT_HUGEPAGES", "=1", "NOT-A-NAME=1"):
        with pytest.raises(MoechatError, match="NAME=VALUE"):
            parse_settings([bad])
    with pytest.raises(MoechatError, match="--pairs"):
        run_ab("pkg", {}, 0, [])


def test_ab_command_runs_fresh_processes(tiny_package, capsys):
    argv = ["bench", str(tiny_package), "--prompt-tokens", "8", "--new-tokens", "3"]
    argv += ["--repeat", "1", "--threads", "1", "--ab", "MOECHAT_HUGEPAGES=0", "--pairs", "1"]
    assert main([*argv, "--json"]) == 0
    r = json.loads(capsys.readouterr().out)
    assert r["settings"] == {"MOECHAT_HUGEPAGES": "0"} and len(r["pairs"]) == 1
    pair = r["pairs"][0]
    assert pair["variant"]["huge_page_bytes"] == 0
    assert pair["baseline"]["decode_tokens_per_s"] > 0 and pair["decode_ratio"] > 0


def test_session_config_entries():
    from moechat.runtime.providers import session_config_entries

    assert session_config_entries("") == []
    assert session_config_entries("a.b=1; c=2;") == [("a.b", "1"), ("c", "2")]
    with pytest.raises(MoechatError, match="MOECHAT_SESSION_CONFIG"):
        session_config_entries("novalue")
