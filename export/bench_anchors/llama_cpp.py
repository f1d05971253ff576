"""Anchors ``llama.cpp`` (llama-cpp-python) on the package's own weights.

The source is converted the way llama.cpp users do it: an HF folder of a family
llama.cpp supports goes through llama.cpp's own ``convert_hf_to_gguf.py`` (found through
``MOECHAT_LLAMA_CPP``: a llama.cpp checkout, or the llama-cpp-python sdist's
``vendor/llama.cpp``) at ``--outtype f32``, then llama.cpp's quantiser
(:func:`quantize_gguf`) makes the type matching the package: fp32 -> F32 (the same
weights), fp16 -> F16, int8 -> Q8_0, int4 -> Q4_0 (the ``llama.cpp`` anchor) and Q4_K_M
(``llama.cpp-Q4_K_M``). A GGUF source is used as it is when its type already matches,
else re-quantised. Both files are cached under the bench cache directory.

Prompt evaluation batches ``max(512, prompt)`` tokens, except where llama.cpp was built
with AMX: its batched Q8_0/Q4_0 paths crash there, so it runs at ``n_batch=1`` (prefill one
token at a time; ``MOECHAT_LLAMA_CPP_N_BATCH`` overrides). A worker that still dies while
loading is restarted once at ``n_batch=1`` (:meth:`LlamaCpp.fallback_spec`), and the
result says so. Every result records llama.cpp's ``llama_print_system_info`` and whether
the build covers this CPU's instruction sets (a native build does). Under
``MOECHAT_SPIN=0`` (moechat's threads block when idle, for busy machines) llama.cpp's
OpenMP threads do too (``OMP_WAIT_POLICY=PASSIVE``, unless set).
"""

from __future__ import annotations

import ctypes
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, Literal

from moechat.export.bench_anchors import common
from moechat.export.bench_anchors.common import Runner, Spec

NAME = "llama.cpp"
INSTALL = "pip install llama-cpp-python==0.3.36"
CONVERTER_ENV = "MOECHAT_LLAMA_CPP"
N_BATCH_ENV = "MOECHAT_LLAMA_CPP_N_BATCH"
CONVERT_TIMEOUT_S = 3600

GgufType = Literal["F32", "F16", "Q8_0", "Q4_0", "Q4_K_M"]
# llama.h's llama_ftype values
FTYPES: dict[str, int] = {"F32": 0, "F16": 1, "Q4_0": 2, "Q8_0": 7, "Q4_K_M": 15}
# moechat's model types whose HF checkpoints llama.cpp's converter takes
ARCHITECTURES = (
    "llama", "mixtral", "qwen2_moe", "qwen3_moe", "olmoe", "granitemoe", "deepseek",
    "deepseek_v2", "deepseek_v3",
)  # fmt: skip
# llama_print_system_info's names -> /proc/cpuinfo flags
CPU_FEATURES = {
    "AVX2": "avx2", "AVX_VNNI": "avx_vnni", "AVX512": "avx512f", "AVX512_VNNI": "avx512_vnni",
    "AVX512_BF16": "avx512_bf16", "AMX_INT8": "amx_int8",
}  # fmt: skip


def quantize_gguf(
    src: Path | str, dst: Path | str, qtype: GgufType, threads: int = 0,
    allow_requantize: bool = False,
) -> Path:  # fmt: skip
    """Quantise a GGUF with llama.cpp's own quantiser (``llama-quantize SRC DST QTYPE``),
    through llama-cpp-python's C API; ``dst`` appears only when it is complete.
    ``allow_requantize``: the source may itself be quantised (llama.cpp warns that this
    loses accuracy)."""
    import llama_cpp

    dst = Path(dst)
    tmp = dst.with_name(dst.name + ".tmp")
    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype = FTYPES[qtype]
    params.nthread = threads
    params.allow_requantize = allow_requantize
    rc = llama_cpp.llama_model_quantize(str(src).encode(), str(tmp).encode(), ctypes.byref(params))
    if rc != 0 or not tmp.is_file():
        tmp.unlink(missing_ok=True)
        raise RuntimeError(f"llama.cpp could not quantise {src} to {qtype} (status {rc})")
    os.replace(tmp, dst)
    return dst


def converter_dir() -> Path | None:
    """The folder of llama.cpp's ``convert_hf_to_gguf.py`` named by the environment."""
    value = os.environ.get(CONVERTER_ENV)
    if not value:
        return None
    path = Path(value)
    folder = path.parent if path.name == "convert_hf_to_gguf.py" else path
    return folder if (folder / "convert_hf_to_gguf.py").is_file() else None


def convert_hf(folder: Path, dst: Path, converter: Path, outtype: str = "f32") -> Path:
    """llama.cpp's converter on an HF folder, in a subprocess (it imports torch)."""
    tmp = dst.with_name(dst.name + ".tmp")
    cmd = [sys.executable, "-m", "moechat.export.bench_anchors.llama_convert",
           str(converter), str(folder), str(tmp), outtype]  # fmt: skip
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=CONVERT_TIMEOUT_S)
    if proc.returncode != 0 or not tmp.is_file():
        tmp.unlink(missing_ok=True)
        lines = [ln for ln in proc.stderr.splitlines() if ln.strip()] or ["no output"]
        raise RuntimeError(f"llama.cpp's converter failed on {folder}: {lines[-1][:300]}")
    os.replace(tmp, dst)
    return dst


def package_gguf_type(manifest: dict[str, Any]) -> GgufType:
    """The llama.cpp type matching the package's weights."""
    graph = manifest.get("graph", {})
    quant = graph.get("quantization")
    if not quant:
        return "F16" if graph.get("dtype") == "float16" else "F32"
    bits = (quant.get("weight_bits") or {}).values()
    return "Q4_0" if 4 in bits else "Q8_0"


def build_info() -> dict[str, Any]:
    """Which llama.cpp build runs: its system info, and this CPU's instruction sets that
    it was not built with (none: a native build, or one as good here)."""
    import llama_cpp

    system = llama_cpp.llama_print_system_info().decode(errors="replace").strip()
    try:
        with open("/proc/cpuinfo", encoding="ascii", errors="replace") as fh:
            flags = next((ln.split(":", 1)[1].split() for ln in fh if ln.startswith("flags")), [])
    except OSError:
        flags = []
    missing = [k for k, flag in CPU_FEATURES.items() if flag in flags and f"{k} = 1" not in system]
    return {
        "system_info": system,
        "cpu_features_not_built": missing,
        "native": bool(flags) and not missing,
        "amx": "AMX_INT8 = 1" in system,
    }


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


class LlamaCpp:
    """One llama.cpp anchor: the package's matching type, or a fixed one (``qtype``)."""

    INSTALL = INSTALL

    def __init__(self, name: str, qtype: GgufType | None = None) -> None:
        self.NAME = name
        self.qtype = qtype

    def gguf_type(self, manifest: dict[str, Any]) -> GgufType:
        return self.qtype or package_gguf_type(manifest)

    def skip_reason(self, manifest: dict[str, Any], source: Path | None) -> str | None:
        model_type = manifest["architecture"].get("model_type")
        if not common.installed("llama_cpp"):
            return f"llama-cpp-python is not installed ({INSTALL})"
        if model_type not in ARCHITECTURES:
            what = "MiniMind / MiniMind-MoE" if model_type == "minimind" else repr(model_type)
            return f"not applicable: llama.cpp has no {what} architecture"
        if self.qtype and package_gguf_type(manifest) != "Q4_0":
            return f"not applicable: a {self.qtype} anchor is for 4-bit packages"
        missing = common.source_missing(manifest)
        if missing or source is None:
            return missing or "the package records no source"
        kind = common.source_kind(source)
        if kind == "state_dict":
            return "not applicable: the source is a state dict, not a GGUF or HF folder"
        if kind == "gguf" and not common.installed("gguf"):
            return "reading the GGUF's type needs the gguf package (pip install gguf)"
        if kind == "hf" and converter_dir() is None:
            return (
                f"converting the HF source needs llama.cpp's convert_hf_to_gguf.py: set "
                f"{CONVERTER_ENV} to it (a llama.cpp checkout, or vendor/llama.cpp of the "
                "llama-cpp-python sdist)"
            )
        if kind == "hf" and not common.installed("torch"):
            return "llama.cpp's converter needs torch"
        return None

    def prepare(self, spec: Spec) -> dict[str, Any]:
        manifest = spec["manifest"]
        src = Path(manifest["provenance"]["source"])
        qtype = self.gguf_type(manifest)
        cache = Path(spec["cache_dir"])
        cache.mkdir(parents=True, exist_ok=True)
        requantize = False
        if common.source_kind(src) == "hf":
            converter = converter_dir()
            assert converter is not None  # skip_reason checked it
            base = cache / f"{src.name}.F32.gguf"
            if not base.is_file():
                common.log(f"converting {src} with llama.cpp's convert_hf_to_gguf.py")
                convert_hf(src, base, converter)
            origin = f"convert_hf_to_gguf.py --outtype f32 of {src.name}"
        else:
            base, origin = src, src.name
            if _file_type(src) == FTYPES[qtype]:
                return {"gguf": str(src), "weights": f"{qtype} GGUF (the source)"}
            requantize = True
        if qtype == "F32" and not requantize:
            return {"gguf": str(base), "weights": f"F32 GGUF: {origin}"}
        dst = cache / f"{src.stem if requantize else src.name}.{qtype}.gguf"
        if not dst.is_file():
            common.log(f"quantising to {dst}")
            quantize_gguf(base, dst, qtype, spec.get("threads") or 0, allow_requantize=requantize)
        return {"gguf": str(dst), "weights": f"{qtype} GGUF (llama.cpp quantiser) of {origin}"}

    def fallback_spec(self, spec: Spec, reason: str) -> Spec | None:
        """After a worker died loading: once more at ``n_batch=1`` (the AMX workaround).
        Runs in moechat's process: decided without importing llama_cpp."""
        if int(spec.get("n_batch") or os.environ.get(N_BATCH_ENV) or 0) == 1:
            return None
        return {**spec, "n_batch": 1, "fallback": f"n_batch=1 after a failed load ({reason})"}

    def load(self, spec: Spec) -> tuple[Runner, dict[str, Any]]:
        if os.environ.get("MOECHAT_SPIN") == "0":
            # moechat's threads block when idle: so do llama.cpp's OpenMP threads (read
            # when libgomp starts; spinning ones make it ~30x slower on a busy machine)
            os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
        import llama_cpp

        ids = spec["prompt_ids"]
        n_batch = _n_batch(spec)
        llm = llama_cpp.Llama(
            model_path=spec["gguf"], n_ctx=len(ids) + spec["new_tokens"] + 16,
            n_batch=n_batch, n_ubatch=n_batch, n_threads=spec["threads"],
            n_threads_batch=spec["threads"], verbose=False,
        )  # fmt: skip

        def run(n: int) -> dict[str, Any]:
            llm.reset()  # no prefix reuse between runs
            start = time.perf_counter()
            stream = llm.generate(
                ids, top_k=1, top_p=1.0, min_p=0.0, temp=0.0, repeat_penalty=1.0, reset=True
            )
            return common.timed_stream(stream, start, n)

        info = {"version": llama_cpp.__version__, "weights": spec["weights"],
                "n_batch": n_batch, "build": build_info(),
                "omp_wait_policy": os.environ.get("OMP_WAIT_POLICY", "default")}  # fmt: skip
        if spec.get("fallback"):
            info["fallback"] = spec["fallback"]
        return run, info


def _n_batch(spec: Spec) -> int:
    """Tokens per llama_decode call: the spec's (a fallback), the environment's, 1 on
    an AMX build, else the whole prompt (at least 512, llama.cpp's default)."""
    if spec.get("n_batch"):
        return int(spec["n_batch"])
    if os.environ.get(N_BATCH_ENV):
        return max(1, int(os.environ[N_BATCH_ENV]))
    return 1 if build_info()["amx"] else max(512, len(spec["prompt_ids"]))


def _file_type(path: Path) -> int | None:
    import gguf

    field = gguf.GGUFReader(str(path)).fields.get("general.file_type")
    return None if field is None else int(field.contents())


LLAMA_CPP = LlamaCpp(NAME)
LLAMA_CPP_Q4_K_M = LlamaCpp("llama.cpp-Q4_K_M", "Q4_K_M")
