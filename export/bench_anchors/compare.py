"""``moechat bench --compare``: other engines on the same weights and the same prompt ids.

Anchors, each in its own Python worker process (their imports stay out of the moechat
process, a crash in a native library cannot take ``moechat bench`` down, and each
engine's peak RSS is its own):

- ``pytorch``: the reference model (``moechat.models``, eager fp32) loaded from the
  package's provenance ``source`` with ``load_checkpoint``. Needs torch.
- ``onnxruntime-genai``: its model builder's ``-p int8 -e cpu`` output, built from a
  Hugging Face folder (a GGUF source is first written out as one: dequantised weights,
  config.json, tokenizer files). Llama layout only. Needs onnxruntime-genai, and
  transformers for the builder.
- ``llama.cpp`` (llama-cpp-python): a Q8_0 GGUF of the source GGUF (re-quantised with
  the ``gguf`` package, metadata copied). Needs a GGUF source of the Llama layout.

A ``prepare`` worker converts (cached under ``--cache-dir``, keyed by the source
checksums); a ``serve`` worker per engine then loads it once, and the runs are
interleaved round by round with moechat's own (rotating the order), so a shared,
busy machine loads every engine alike. An anchor that is not installed or not
applicable is reported as skipped with the reason; one that fails, as failed with its
last error line.

Every engine gets the same prompt ids, ``new_tokens`` greedy tokens (end-of-text
ignored) and thread count; timings follow :mod:`moechat.runtime.bench`'s definitions
(an anchor's prefill rate is prompt tokens / time to first token).
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import os
import queue
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

ANCHORS = ("pytorch", "onnxruntime-genai", "llama.cpp")
INSTALL = {
    "pytorch": "pip install 'moechat[export]'",
    "onnxruntime-genai": "pip install onnxruntime-genai==0.18.0 transformers",
    "llama.cpp": "pip install llama-cpp-python==0.3.36",
}
WORKER_TIMEOUT_S = 3600


def default_cache_dir() -> Path:
    try:
        from platformdirs import user_cache_dir

        return Path(user_cache_dir("moechat")) / "bench"
    except ImportError:
        return Path.home() / ".cache" / "moechat" / "bench"


def _installed(module: str) -> bool:
    try:
        return importlib.util.find_spec(module) is not None
    except (ImportError, ValueError):
        return False


def _source_kind(source: Path) -> str:
    if source.is_dir():
        return "hf"
    if source.suffix == ".gguf":
        return "gguf"
    return "state_dict"


def _source_key(manifest: dict) -> str:
    """A short key for cached conversions: the recorded source checksums."""
    prov = manifest.get("provenance", {})
    digest = json.dumps(prov.get("source_sha256") or prov.get("source"), sort_keys=True)
    return hashlib.sha256(digest.encode()).hexdigest()[:12]


def _source_name(manifest: dict) -> str:
    src = manifest.get("provenance", {}).get("source") or "source"
    return "".join(c if c.isalnum() or c in "-_." else "_" for c in Path(src).stem)[:60]


def plan(manifest: dict) -> dict[str, str | None]:
    """For each anchor: None when it can run, else why it is skipped."""
    arch = manifest["architecture"]
    src = manifest.get("provenance", {}).get("source")
    source = Path(src) if src else None
    missing = (
        "the package records no source"
        if source is None
        else f"its source {source} is not available here"
        if not source.exists()
        else None
    )
    kind = _source_kind(source) if source is not None and source.exists() else None
    reasons: dict[str, str | None] = {}

    if not _installed("torch"):
        reasons["pytorch"] = f"torch is not installed ({INSTALL['pytorch']})"
    elif manifest.get("demo") is not None:
        reasons["pytorch"] = (
            "not applicable: the demo's MoE weights were converted from its dense source at "
            "build time and exist only in the package (bench the dense source instead: "
            "moechat export SOURCE.gguf OUT --int8; moechat bench OUT --compare)"
        )
    else:
        reasons["pytorch"] = missing

    if not _installed("onnxruntime_genai"):
        reasons["onnxruntime-genai"] = f"not installed ({INSTALL['onnxruntime-genai']})"
    elif arch.get("model_type") != "llama" or arch.get("use_moe"):
        reasons["onnxruntime-genai"] = (
            "not applicable: its model builder has no MiniMind / MiniMind-MoE architecture"
        )
    elif missing:
        reasons["onnxruntime-genai"] = missing
    elif not (_installed("transformers") and _installed("torch")):
        reasons["onnxruntime-genai"] = (
            "its model builder needs transformers and torch (pip install transformers)"
        )
    elif kind == "state_dict":
        reasons["onnxruntime-genai"] = "not applicable: the builder needs an HF folder or GGUF"
    else:
        reasons["onnxruntime-genai"] = None

    if not _installed("llama_cpp"):
        reasons["llama.cpp"] = f"llama-cpp-python is not installed ({INSTALL['llama.cpp']})"
    elif arch.get("model_type") != "llama" or arch.get("use_moe"):
        reasons["llama.cpp"] = (
            "not applicable: llama.cpp has no MiniMind / MiniMind-MoE architecture"
        )
    elif missing:
        reasons["llama.cpp"] = missing
    elif kind != "gguf":
        reasons["llama.cpp"] = (
            "not applicable: the source is not a GGUF (convert it with llama.cpp's "
            "convert_hf_to_gguf.py --outtype q8_0 and benchmark that file by hand)"
        )
    elif not _installed("gguf"):
        reasons["llama.cpp"] = "making the Q8_0 GGUF needs the gguf package"
    else:
        reasons["llama.cpp"] = None
    return reasons


# -- parent side ----------------------------------------------------------------------


def _call_worker(action: str, anchor: str, spec: dict, timeout: float) -> dict:
    """Run one worker action to completion (used for ``prepare``)."""
    cmd = [sys.executable, "-m", "moechat.export.bench_anchors", action, anchor]
    try:
        proc = subprocess.run(
            cmd, input=json.dumps(spec), capture_output=True, text=True, timeout=timeout
        )
    except subprocess.TimeoutExpired:
        return {"status": "failed", "reason": f"{action} timed out after {timeout:.0f} s"}
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("{")]
    if proc.returncode == 0 and lines:
        return json.loads(lines[-1])
    return {
        "status": "failed",
        "reason": f"{action} failed: {_last_line(proc.stderr, proc.returncode)}",
    }


def _last_line(text: str | None, returncode: int | None) -> str:
    lines = [ln.strip() for ln in (text or "").splitlines() if ln.strip()]
    return (lines[-1] if lines else f"exit status {returncode}")[:300]


class _Engine:
    """A long-lived ``serve`` worker: loads the engine once, then one run per request."""

    def __init__(self, anchor: str, spec: dict) -> None:
        self.anchor = anchor
        self.err = tempfile.TemporaryFile(mode="w+")
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "moechat.export.bench_anchors", "serve", anchor],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=self.err, text=True,
            bufsize=1,
        )  # fmt: skip
        self.lines: queue.Queue[str | None] = queue.Queue()
        threading.Thread(target=self._read, daemon=True).start()
        self._send(json.dumps(spec))

    def _read(self) -> None:
        for line in self.proc.stdout:
            if line.startswith("{"):
                self.lines.put(line)
        self.lines.put(None)

    def _send(self, line: str) -> None:
        try:
            self.proc.stdin.write(line + "\n")
            self.proc.stdin.flush()
        except (BrokenPipeError, OSError):
            pass  # the worker died: reply() reports it with its last stderr line

    def reply(self, timeout: float) -> dict:
        try:
            line = self.lines.get(timeout=timeout)
        except queue.Empty:
            self.close()
            raise RuntimeError(f"no answer in {timeout:.0f} s") from None
        if line is None:
            self.proc.wait()
            self.err.seek(0)
            raise RuntimeError(_last_line(self.err.read(), self.proc.returncode))
        return json.loads(line)

    def request(self, command: str, timeout: float) -> dict:
        self._send(command)
        return self.reply(timeout)

    def close(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()
        self.err.close()


def run_compare(
    result: dict,
    manifest: dict,
    cache_dir: Path | None = None,
    ours_run=None,
    anchors: tuple[str, ...] = ANCHORS,
    progress=None,
) -> dict[str, dict]:
    """Measure every anchor on ``result``'s prompt, interleaved round by round with
    moechat itself (``ours_run()``: one moechat run, a dict like the anchors' runs), so
    that every engine sees the same machine load; add speed ratios vs moechat."""
    cache_dir = Path(cache_dir) if cache_dir else default_cache_dir()
    reasons = plan(manifest)
    spec = {
        "manifest": manifest,
        "package": result["path"],
        "prompt_ids": result["prompt_ids"],
        "new_tokens": result["new_tokens"],
        "threads": result["threads"],
        "cache_dir": str(cache_dir / f"{_source_name(manifest)}-{_source_key(manifest)}"),
    }
    out: dict[str, dict] = {}
    engines: dict[str, _Engine] = {}
    info: dict[str, dict] = {}
    for anchor in anchors:
        if reasons.get(anchor):
            out[anchor] = {"status": "skipped", "reason": reasons[anchor]}
            continue
        if progress:
            progress(f"preparing {anchor}")
        prep = _call_worker("prepare", anchor, spec, WORKER_TIMEOUT_S)
        if prep.get("status") == "failed":
            out[anchor] = prep
            continue
        if progress:
            progress(f"loading {anchor}")
        engine = _Engine(anchor, {**spec, **prep})
        try:
            info[anchor] = engine.reply(WORKER_TIMEOUT_S)  # loaded and warmed up
            engines[anchor] = engine
        except RuntimeError as err:
            out[anchor] = {"status": "failed", "reason": f"loading failed: {err}"}
            engine.close()
    runs: dict[str, list[dict]] = {name: [] for name in ["moechat", *engines]}
    for rnd in range(result["repeat"]):
        if progress and engines:
            progress(f"round {rnd + 1}/{result['repeat']}: moechat, {', '.join(engines)}")
        order = ["moechat", *engines]
        order = order[rnd % len(order) :] + order[: rnd % len(order)]  # rotate positions
        for name in order:
            if name == "moechat":
                if ours_run is not None:
                    runs[name].append(ours_run())
                continue
            if name not in engines:
                continue
            try:
                runs[name].append(engines[name].request("run", WORKER_TIMEOUT_S))
            except RuntimeError as err:
                out[name] = {"status": "failed", "reason": f"run failed: {err}"}
                engines.pop(name).close()
    if runs["moechat"]:
        ours = _summarise(runs["moechat"], len(result["prompt_ids"]))
        ours["prefill_tokens_per_s"] = round(
            float(statistics.median(r["prefill_tokens_per_s"] for r in runs["moechat"])), 2
        )
        ours["peak_rss_bytes"] = result["memory"]["peak_rss_bytes"]
    else:
        ours = {k: result[k] for k in ("ttft_ms", "prefill_tokens_per_s", "decode_tokens_per_s")}
        ours.update(
            token_ids=result["token_ids"], peak_rss_bytes=result["memory"]["peak_rss_bytes"]
        )
    for name, engine in engines.items():
        try:
            final = engine.request("quit", 120)
        except RuntimeError:
            final = {}
        engine.close()
        res = {**info[name], **_summarise(runs[name], len(result["prompt_ids"])), **final}
        out[name] = {**res, **_ratios(ours, res, runs["moechat"], runs[name])}
    return {"moechat": {**ours, "status": "ok", "interleaved": bool(runs["moechat"])}, **out}


def _ratios(ours: dict, theirs: dict, ours_runs=(), their_runs=()) -> dict:
    """moechat's speed divided by the anchor's (> 1: moechat is faster): the ratio of
    the medians, and the median of the per-round ratios (``_paired``: each round runs
    the engines back to back, so this one follows a machine whose load changes)."""

    def ratio(key: str, invert: bool = False) -> float | None:
        a, b = ours.get(key), theirs.get(key)
        if not a or not b:
            return None
        return round(b / a if invert else a / b, 3)

    match = 0
    for x, y in zip(ours.get("token_ids", []), theirs.get("token_ids", []), strict=False):
        if x != y:
            break
        match += 1
    pairs = [
        a["decode_tokens_per_s"] / b["decode_tokens_per_s"]
        for a, b in zip(ours_runs, their_runs, strict=False)
        if a.get("decode_tokens_per_s") and b.get("decode_tokens_per_s")
    ]
    return {
        "moechat_decode_speedup_paired": round(float(statistics.median(pairs)), 3)
        if pairs
        else None,
        "moechat_decode_speedup": ratio("decode_tokens_per_s"),
        "moechat_prefill_speedup": ratio("prefill_tokens_per_s"),
        "moechat_ttft_speedup": ratio("ttft_ms", invert=True),
        "greedy_tokens_agreeing": match,
    }


def format_compare(result: dict) -> str:
    from moechat.runtime.bench import _mb, _num

    rows = [
        f"compare: same prompt ids ({result['prompt_tokens']} tokens), {result['new_tokens']} "
        f"greedy tokens, {result['threads']} threads, engines interleaved over "
        f"{result['repeat']} rounds (medians); speed-up = moechat / engine",
        "",
        "| engine | weights | prefill tok/s | TTFT ms | decode tok/s | peak RSS | "
        "moechat decode speed-up (per round) | greedy tokens agreeing |",
        "|---|---|---|---|---|---|---|---|",
    ]
    notes = []
    ours = result["compare"].get("moechat") or result
    rows.append(
        f"| moechat {result['provider']} | {result['graph']['weights']} package | "
        f"{_num(ours['prefill_tokens_per_s'])} | {_num(ours['ttft_ms'])} | "
        f"{_num(ours['decode_tokens_per_s'])} | {_mb(result['memory']['peak_rss_bytes'])} | "
        f"1.00x | - |"
    )
    for name, r in result["compare"].items():
        if name == "moechat":
            continue
        if r.get("status") != "ok":
            notes.append(f"{name}: {r.get('status')}: {r.get('reason')}")
            continue
        speed, paired = r.get("moechat_decode_speedup"), r.get("moechat_decode_speedup_paired")
        rows.append(
            f"| {name} {r.get('version', '')} | {r.get('weights', '')} | "
            f"{_num(r.get('prefill_tokens_per_s'))} | {_num(r.get('ttft_ms'))} | "
            f"{_num(r.get('decode_tokens_per_s'))} | {_mb(r.get('peak_rss_bytes'))} | "
            f"{'-' if speed is None else f'{speed:.2f}x'}"
            f"{'' if paired is None else f' ({paired:.2f}x)'} | "
            f"{r.get('greedy_tokens_agreeing', '-')}/{result['new_tokens']} |"
        )
    return "\n".join(rows + ([""] + notes if notes else []))


# -- worker side (a separate process per anchor and action) ----------------------------


def _log(message: str) -> None:
    print(f"[bench-compare] {message}", file=sys.stderr, flush=True)


def _peak_rss() -> int:
    from moechat.runtime.bench import memory_usage

    return memory_usage()["peak_rss_bytes"]


def _summarise(runs: list[dict], prompt_tokens: int) -> dict:
    """Medians over runs; the last run's token ids (greedy: all runs agree)."""

    def med(key: str) -> float:
        return round(float(statistics.median(r[key] for r in runs)), 3)

    ttft = med("ttft_ms")
    return {
        "status": "ok",
        "ttft_ms": ttft,
        "prefill_tokens_per_s": round(prompt_tokens / (ttft / 1000), 2) if ttft else None,
        "decode_tokens_per_s": med("decode_tokens_per_s"),
        "runs": [{k: round(v, 3) for k, v in r.items() if k != "token_ids"} for r in runs],
        "token_ids": runs[-1].get("token_ids", []),
    }


def _timed_stream(tokens_iter, start: float, new_tokens: int) -> dict:
    """Consume ``new_tokens`` ids from an iterator started at ``start``; time them."""
    ids: list[int] = []
    first = start
    for tok in tokens_iter:
        if not ids:
            first = time.perf_counter()
        ids.append(int(tok))
        if len(ids) >= new_tokens:
            break
    end = time.perf_counter()
    decode = (len(ids) - 1) / (end - first) if len(ids) > 1 and end > first else 0.0
    return {"ttft_ms": (first - start) * 1000, "decode_tokens_per_s": decode, "token_ids": ids}


# pytorch ---------------------------------------------------------------------------


def _load_reference(manifest: dict, max_positions: int):
    from moechat.models.loading import load_checkpoint

    source = Path(manifest["provenance"]["source"])
    overrides = manifest["architecture"] if _source_kind(source) == "state_dict" else None
    ckpt = load_checkpoint(source, overrides=overrides, max_positions=max_positions)
    want, got = manifest["architecture"], ckpt.config.to_dict()
    keys = ("model_type", "vocab_size", "hidden_size", "num_hidden_layers", "use_moe")
    keys += ("intermediate_size", "n_routed_experts") if want.get("use_moe") else ()
    differ = [k for k in keys if k in want and want[k] != got.get(k)]
    if differ:
        raise RuntimeError(
            f"{source} is not the packaged model ({differ[0]}: {got.get(differ[0])} in the "
            f"source, {want[differ[0]]} in the package)"
        )
    return ckpt


def _load_pytorch(spec: dict):
    import torch

    torch.set_num_threads(spec["threads"])
    ids = spec["prompt_ids"]
    ckpt = _load_reference(spec["manifest"], max(4096, len(ids) + spec["new_tokens"] + 8))
    model = ckpt.model.eval()

    def tokens():
        past = model.empty_cache()
        x = torch.tensor([ids], dtype=torch.long)
        while True:
            logits, past = model.step(x, past)
            tok = int(torch.argmax(logits[0, -1]))
            yield tok
            x = torch.tensor([[tok]], dtype=torch.long)

    def run(n: int) -> dict:
        with torch.inference_mode():
            return _timed_stream(tokens(), time.perf_counter(), n)

    kind = _source_kind(Path(spec["manifest"]["provenance"]["source"]))
    return run, {"version": torch.__version__, "weights": f"fp32 eager from the {kind} source"}


# llama.cpp ---------------------------------------------------------------------------


def make_q8_0_gguf(src: Path, dst: Path) -> Path:
    """Re-quantise a GGUF to Q8_0 (llama.cpp's ``llama-quantize ... Q8_0`` rules: 2-D
    weights whose rows are whole 32-blocks become Q8_0, the rest stays F32)."""
    import gguf
    import numpy as np
    from gguf import GGMLQuantizationType as Q
    from gguf import GGUFValueType as V

    reader = gguf.GGUFReader(str(src))
    arch = reader.fields["general.architecture"].contents()
    tmp = dst.with_name(dst.name + ".tmp")
    writer = gguf.GGUFWriter(str(tmp), arch)
    for f in reader.fields.values():
        if f.name.startswith("GGUF.") or f.name == "general.architecture":
            continue
        vtype = V(f.types[0])
        value = f.contents()
        if f.name == "general.file_type":
            value = int(gguf.LlamaFileType.MOSTLY_Q8_0)
        sub = V(f.types[-1]) if vtype == V.ARRAY and len(f.types) > 1 else None
        writer.add_key_value(f.name, value, vtype, sub_type=sub)
    for t in reader.tensors:
        qtype = Q(t.tensor_type)
        if qtype == Q.Q8_0:
            writer.add_tensor(t.name, np.asarray(t.data), raw_dtype=qtype)
            continue
        data = np.asarray(gguf.quants.dequantize(t.data, qtype), dtype=np.float32)
        if data.ndim == 2 and data.shape[-1] % 32 == 0 and not t.name.endswith("norm.weight"):
            writer.add_tensor(t.name, gguf.quants.quantize(data, Q.Q8_0), raw_dtype=Q.Q8_0)
        else:
            writer.add_tensor(t.name, data)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    os.replace(tmp, dst)
    return dst


def _prepare_llama_cpp(spec: dict) -> dict:
    import gguf

    src = Path(spec["manifest"]["provenance"]["source"])
    reader = gguf.GGUFReader(str(src))
    file_type = reader.fields.get("general.file_type")
    if file_type is not None and int(file_type.contents()) == int(gguf.LlamaFileType.MOSTLY_Q8_0):
        return {"gguf": str(src), "weights": "Q8_0 GGUF (the source)"}
    dst = Path(spec["cache_dir"]) / f"{src.stem}.Q8_0.gguf"
    if not dst.is_file():
        dst.parent.mkdir(parents=True, exist_ok=True)
        _log(f"writing {dst}")
        make_q8_0_gguf(src, dst)
    return {"gguf": str(dst), "weights": f"Q8_0 GGUF re-quantised from {src.name}"}


def _load_llama_cpp(spec: dict):
    import llama_cpp

    ids = spec["prompt_ids"]
    llm = llama_cpp.Llama(
        model_path=spec["gguf"], n_ctx=len(ids) + spec["new_tokens"] + 16,
        n_batch=max(512, len(ids)), n_ubatch=max(512, len(ids)), n_threads=spec["threads"],
        n_threads_batch=spec["threads"], verbose=False,
    )  # fmt: skip

    def run(n: int) -> dict:
        llm.reset()  # no prefix reuse between runs
        start = time.perf_counter()
        stream = llm.generate(
            ids, top_k=1, top_p=1.0, min_p=0.0, temp=0.0, repeat_penalty=1.0, reset=True
        )
        return _timed_stream(stream, start, n)

    return run, {"version": llama_cpp.__version__, "weights": spec["weights"]}


# onnxruntime-genai --------------------------------------------------------------------


def _hf_llama_config(cfg) -> dict:
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


def _write_hf_folder(spec: dict, folder: Path) -> Path:
    """A GGUF (or any loadable) source as a Llama HF folder the genai builder can read."""
    import shutil

    from safetensors.torch import save_file

    ckpt = _load_reference(spec["manifest"], 4096)
    tmp = folder.with_name(folder.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    state = {k: v.contiguous() for k, v in ckpt.model.state_dict().items()}
    if ckpt.config.tie_word_embeddings:
        state.pop("lm_head.weight", None)
    save_file(state, str(tmp / "model.safetensors"))
    (tmp / "config.json").write_text(json.dumps(_hf_llama_config(ckpt.config), indent=2))
    tok_dir = ckpt.tokenizer_dir or Path(spec["package"])
    for name in ("tokenizer.json", "tokenizer_config.json"):
        if (Path(tok_dir) / name).is_file():
            shutil.copy(Path(tok_dir) / name, tmp / name)
    shutil.rmtree(folder, ignore_errors=True)
    os.replace(tmp, folder)
    return folder


def _prepare_genai(spec: dict) -> dict:
    import shutil

    source = Path(spec["manifest"]["provenance"]["source"])
    cache = Path(spec["cache_dir"])
    out = cache / "genai-int8-cpu"
    if (out / "genai_config.json").is_file():
        return {"genai_dir": str(out)}
    cache.mkdir(parents=True, exist_ok=True)
    hf = source if _source_kind(source) == "hf" else cache / "hf"
    if not (hf / "config.json").is_file():
        _log(f"writing {hf}")
        _write_hf_folder(spec, hf)
    tmp = cache / "genai-int8-cpu.tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    cmd = [
        sys.executable, "-m", "onnxruntime_genai.models.builder", "-i", str(hf), "-o", str(tmp),
        "-p", "int8", "-e", "cpu", "-c", str(cache / "builder-cache"),
    ]  # fmt: skip
    _log(" ".join(cmd))
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode != 0 or not (tmp / "genai_config.json").is_file():
        lines = [ln for ln in (proc.stderr + proc.stdout).splitlines() if ln.strip()]
        raise RuntimeError(f"model builder failed: {lines[-1] if lines else proc.returncode}")
    os.replace(tmp, out)
    shutil.rmtree(cache / "builder-cache", ignore_errors=True)
    return {"genai_dir": str(out)}


def _load_genai(spec: dict):
    import onnxruntime_genai as og

    ids = spec["prompt_ids"]
    config = og.Config(spec["genai_dir"])
    threads = {"intra_op_num_threads": spec["threads"], "inter_op_num_threads": 1}
    config.overlay(json.dumps({"model": {"decoder": {"session_options": threads}}}))
    model = og.Model(config)

    def run(n: int) -> dict:
        params = og.GeneratorParams(model)
        total = len(ids) + n
        params.set_search_options(do_sample=False, max_length=total, min_length=total)
        generator = og.Generator(model, params)
        start = time.perf_counter()
        generator.append_tokens(ids)

        def tokens():
            while not generator.is_done():
                generator.generate_next_token()
                yield int(generator.get_next_tokens()[0])

        return _timed_stream(tokens(), start, n)

    return run, {"version": og.__version__, "weights": "model builder -p int8 -e cpu"}


_PREPARE = {
    "pytorch": lambda spec: {},
    "llama.cpp": _prepare_llama_cpp,
    "onnxruntime-genai": _prepare_genai,
}
_LOAD = {"pytorch": _load_pytorch, "llama.cpp": _load_llama_cpp, "onnxruntime-genai": _load_genai}


def _serve(anchor: str) -> int:
    """Line protocol on stdin/stdout: a JSON spec, then ``run`` (one timed generation)
    or ``quit`` (peak RSS); every answer is one JSON line."""
    spec = json.loads(sys.stdin.readline())
    run, info = _LOAD[anchor](spec)
    run(2)  # warm-up: first-run allocations, thread start
    print(json.dumps({"status": "ready", **info}), flush=True)
    for line in sys.stdin:
        command = line.strip()
        if command == "run":
            print(json.dumps(run(spec["new_tokens"])), flush=True)
        elif command == "quit":
            break
    print(json.dumps({"peak_rss_bytes": _peak_rss()}), flush=True)
    return 0


def worker_main(argv: list[str]) -> int:
    if len(argv) == 2 and argv[0] == "prepare" and argv[1] in _PREPARE:
        spec = json.loads(sys.stdin.read())
        print(json.dumps(_PREPARE[argv[1]](spec)))  # errors: traceback on stderr, exit 1
        return 0
    if len(argv) == 2 and argv[0] == "serve" and argv[1] in _LOAD:
        return _serve(argv[1])
    print("usage: python -m moechat.export.bench_anchors prepare|serve ANCHOR", file=sys.stderr)
    return 2


if __name__ == "__main__":
    raise SystemExit(worker_main(sys.argv[1:]))
