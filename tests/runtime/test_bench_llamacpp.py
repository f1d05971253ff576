"""`moechat bench --compare`: llama.cpp anchors on a tiny HF MoE (llama.cpp's own converter
and quantiser), and a worker that crashes is a failed anchor, never a failed bench."""

from __future__ import annotations

import json
import os
import sys
import textwrap
from pathlib import Path

import pytest

from moechat.app.cli import main
from moechat.export.bench_anchors import compare, llama_cpp
from moechat.runtime.bench import BenchOptions, run_bench
from moechat.runtime.package import load_package

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from gguf_factory import make_gguf_family_folder  # noqa: E402
from llamacpp_sdist import CACHE, LLAMA_CPP_PYTHON  # noqa: E402

SMALL = ["--prompt-tokens", "24", "--new-tokens", "6", "--repeat", "2", "--turns", "0"]

# A worker module standing in for the real one: ``serve`` dies by SIGSEGV (a native
# crash) unless the spec asks for n_batch=1, when it serves with the real worker.
CRASHING_WORKER = textwrap.dedent(
    """
    import io, json, os, signal, sys
    from moechat.export.bench_anchors import worker

    if sys.argv[1] == "serve":
        line = sys.stdin.readline()
        if json.loads(line).get("n_batch") != 1:
            print("simulated crash in a batched kernel", file=sys.stderr, flush=True)
            os.kill(os.getpid(), signal.SIGSEGV)
        rest = sys.stdin

        class Stdin:  # the spec line again, then the parent's commands
            def readline(self):
                return line

            def __iter__(self):
                return iter(rest)

        sys.stdin = Stdin()
    raise SystemExit(worker.main(sys.argv[1:]))
    """
)


@pytest.fixture
def crashing_worker(tmp_path, monkeypatch) -> None:
    folder = tmp_path / "fake_worker"
    folder.mkdir()
    (folder / "crashing_worker.py").write_text(CRASHING_WORKER)
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join([str(folder), *sys.path]))
    monkeypatch.setattr(compare, "WORKER", "crashing_worker")


def test_a_crashing_worker_is_a_failed_anchor(tiny_package, crashing_worker):
    """pytorch has no fallback: its crash is reported with the signal and stderr line."""
    result = run_bench(tiny_package, BenchOptions(prompt_tokens=8, new_tokens=3, repeat=2, turns=0))
    out = compare.run_compare(result, load_package(tiny_package).manifest, anchors=("pytorch",))
    assert out["moechat"]["status"] == "ok"
    assert out["pytorch"]["status"] == "failed"
    reason = out["pytorch"]["reason"]
    assert "killed by SIGSEGV" in reason and "simulated crash" in reason, reason


@pytest.fixture(scope="module")
def qwen3_int8(tmp_path_factory) -> Path:
    """A tiny Qwen3-MoE HF folder (transformers' classes) exported at int8."""
    pytest.importorskip("llama_cpp")
    converter = CACHE / LLAMA_CPP_PYTHON.replace("==", "-")
    if not (converter / "convert_hf_to_gguf.py").is_file():
        pytest.skip("llama.cpp's converter is not unpacked (tests/models/test_gguf_families.py)")
    root = tmp_path_factory.mktemp("llamacpp-anchor")
    make_gguf_family_folder("qwen3_moe", root / "hf")
    pkg = root / "pkg"
    assert main(["export", str(root / "hf"), str(pkg), "--int8"]) == 0
    return pkg


@pytest.fixture(scope="module")
def cache_dir(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("bench-cache")  # conversions shared by the tests


def test_llama_cpp_anchor_end_to_end(qwen3_int8, cache_dir, monkeypatch, capsys):
    converter = CACHE / LLAMA_CPP_PYTHON.replace("==", "-")
    monkeypatch.setenv(llama_cpp.CONVERTER_ENV, str(converter))
    monkeypatch.delenv(llama_cpp.N_BATCH_ENV, raising=False)
    capsys.readouterr()
    argv = ["bench", str(qwen3_int8), *SMALL, "--compare", "--anchors",
            "llama.cpp,llama.cpp-Q4_K_M", "--cache-dir", str(cache_dir), "--json"]  # fmt: skip
    assert main(argv) == 0
    r = json.loads(capsys.readouterr().out)["compare"]
    lc = r["llama.cpp"]
    assert lc["status"] == "ok", lc
    assert lc["weights"].startswith("Q8_0 GGUF (llama.cpp quantiser) of convert_hf_to_gguf.py")
    assert lc["decode_tokens_per_s"] > 0 and lc["prefill_tokens_per_s"] > 0
    assert len(lc["token_ids"]) == 6 and lc["moechat_decode_speedup"] > 0
    # the same int8-level weights and prompt ids: the first greedy token agrees
    assert lc["greedy_tokens_agreeing"] >= 1
    assert "CPU :" in lc["build"]["system_info"] and isinstance(lc["build"]["native"], bool)
    assert lc["n_batch"] == (1 if lc["build"]["amx"] else 512)  # AMX: the crash workaround
    assert r["llama.cpp-Q4_K_M"]["status"] == "skipped"  # an int8 package
    assert sorted(p.name for p in cache_dir.rglob("*.gguf")) == ["hf.F32.gguf", "hf.Q8_0.gguf"]


def test_llama_cpp_falls_back_to_n_batch_1(qwen3_int8, cache_dir, monkeypatch, crashing_worker):
    """The AMX workaround: a worker that crashes with batched prompts runs again at
    n_batch=1, and the result says why."""
    converter = CACHE / LLAMA_CPP_PYTHON.replace("==", "-")
    monkeypatch.setenv(llama_cpp.CONVERTER_ENV, str(converter))
    monkeypatch.delenv(llama_cpp.N_BATCH_ENV, raising=False)
    result = run_bench(qwen3_int8, BenchOptions(prompt_tokens=8, new_tokens=3, repeat=1, turns=0))
    manifest = load_package(qwen3_int8).manifest
    out = compare.run_compare(result, manifest, cache_dir, anchors=("llama.cpp",))
    lc = out["llama.cpp"]
    assert lc["status"] == "ok", lc
    assert lc["n_batch"] == 1 and "killed by SIGSEGV" in lc["fallback"], lc
    assert len(lc["token_ids"]) == 3
    result.compare = out
    assert "build, n_batch 1; n_batch=1 after a failed load" in compare.format_compare(result)
