"""Anchor ``onnxruntime-genai``: its model builder's ``-p int8 -e cpu`` output (``-p int4``
for a 4-bit package: block 32, ``accuracy_level`` 4, as moechat's), built
from a Hugging Face folder (a GGUF source is first written out as one: dequantised
weights, config.json, tokenizer files). Llama layout only. Needs onnxruntime-genai, and
transformers and torch for the builder."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from moechat.export.bench_anchors import common
from moechat.export.bench_anchors.common import Runner, Spec
from moechat.export.bench_anchors.pytorch import load_reference

NAME = "onnxruntime-genai"
INSTALL = "pip install onnxruntime-genai==0.18.0 transformers"


def skip_reason(manifest: dict[str, Any], source: Path | None) -> str | None:
    problem = common.llama_engine_problem(
        manifest, "onnxruntime_genai", f"not installed ({INSTALL})", "its model builder"
    )
    if problem:
        return problem
    if not (common.installed("transformers") and common.installed("torch")):
        return "its model builder needs transformers and torch (pip install transformers)"
    if source is None or common.source_kind(source) == "state_dict":
        return "not applicable: the builder needs an HF folder or GGUF"
    return None


def hf_llama_config(cfg: Any) -> dict[str, Any]:
    return {
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "vocab_size": cfg.vocab_size,
        "hidden_size": cfg.hidden_size,
        "intermediate_size": cfg.intermediate_size,
        "num_hidden_layers": cfg.num_hidden_layers,
        "num_attention_heads": cfg.num_attention_heads,
        "num_key_value_heads": cfg.num_key_value_heads,
        "head_dim": cfg.head_dim,
        "hidden_act": "silu",
        "rms_norm_eps": cfg.rms_norm_eps,
        "rope_theta": cfg.rope_theta,
        "max_position_embeddings": cfg.max_position_embeddings,
        "tie_word_embeddings": cfg.tie_word_embeddings,
        "attention_bias": False,
        "mlp_bias": False,
        "bos_token_id": cfg.bos_token_id,
        "eos_token_id": cfg.eos_token_id,
        "torch_dtype": "float32",
    }


def write_hf_folder(spec: Spec, folder: Path) -> Path:
    """A GGUF (or any loadable) source as a Llama HF folder the genai builder can read."""
    from safetensors.torch import save_file

    ckpt = load_reference(spec["manifest"], 4096)
    tmp = folder.with_name(folder.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    state = {k: v.contiguous() for k, v in ckpt.model.state_dict().items()}
    if ckpt.config.tie_word_embeddings:
        state.pop("lm_head.weight", None)
    save_file(state, str(tmp / "model.safetensors"))
    (tmp / "config.json").write_text(json.dumps(hf_llama_config(ckpt.config), indent=2))
    tok_dir = ckpt.tokenizer_dir or Path(spec["package"])
    for name in ("tokenizer.json", "tokenizer_config.json"):
        if (Path(tok_dir) / name).is_file():
            shutil.copy(Path(tok_dir) / name, tmp / name)
    shutil.rmtree(folder, ignore_errors=True)
    os.replace(tmp, folder)
    return folder


def precision(manifest: dict[str, Any]) -> str:
    """The builder's ``-p``: int4 for a package whose matmuls are 4-bit, else int8."""
    quantization = manifest.get("graph", {}).get("quantization") or {}
    return "int4" if quantization.get("weights") == "int4" else "int8"


def builder_command(hf: Path, out: Path, cache: Path, precision: str) -> list[str]:
    cmd = [
        sys.executable, "-m", "onnxruntime_genai.models.builder", "-i", str(hf), "-o", str(out),
        "-p", precision, "-e", "cpu", "-c", str(cache),
    ]  # fmt: skip
    if precision == "int4":  # moechat's 4-bit MatMulNBits: block 32, int8 compute
        cmd += ["--extra_options", "int4_block_size=32", "int4_accuracy_level=4"]
    return cmd


def prepare(spec: Spec) -> dict[str, Any]:
    source = Path(spec["manifest"]["provenance"]["source"])
    cache = Path(spec["cache_dir"])
    bits = precision(spec["manifest"])
    out = cache / f"genai-{bits}-cpu"
    if (out / "genai_config.json").is_file():
        return {"genai_dir": str(out), "genai_precision": bits}
    cache.mkdir(parents=True, exist_ok=True)
    hf = source if common.source_kind(source) == "hf" else cache / "hf"
    if not (hf / "config.json").is_file():
        common.log(f"writing {hf}")
        write_hf_folder(spec, hf)
    tmp = cache / f"genai-{bits}-cpu.tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    cmd = builder_command(hf, tmp, cache / "builder-cache", bits)
    common.log(" ".join(cmd))
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode != 0 or not (tmp / "genai_config.json").is_file():
        lines = [ln for ln in (proc.stderr + proc.stdout).splitlines() if ln.strip()]
        raise RuntimeError(f"model builder failed: {lines[-1] if lines else proc.returncode}")
    os.replace(tmp, out)
    shutil.rmtree(cache / "builder-cache", ignore_errors=True)
    return {"genai_dir": str(out), "genai_precision": bits}


def load(spec: Spec) -> tuple[Runner, dict[str, Any]]:
    import onnxruntime_genai as og

    ids = spec["prompt_ids"]
    config = og.Config(spec["genai_dir"])
    threads = {"intra_op_num_threads": spec["threads"], "inter_op_num_threads": 1}
    config.overlay(json.dumps({"model": {"decoder": {"session_options": threads}}}))
    model = og.Model(config)

    def run(n: int) -> dict[str, Any]:
        params = og.GeneratorParams(model)
        total = len(ids) + n
        params.set_search_options(do_sample=False, max_length=total, min_length=total)
        generator = og.Generator(model, params)
        start = time.perf_counter()
        generator.append_tokens(ids)

        def tokens() -> Iterator[int]:
            while not generator.is_done():
                generator.generate_next_token()
                yield int(generator.get_next_tokens()[0])

        return common.timed_stream(tokens(), start, n)

    bits = spec.get("genai_precision", "int8")
    return run, {"version": og.__version__, "weights": f"model builder -p {bits} -e cpu"}
