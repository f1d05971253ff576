"""Anchor ``llama.cpp`` (llama-cpp-python): a Q8_0 GGUF of the source GGUF
(re-quantised with the ``gguf`` package, metadata copied). Needs a GGUF source of the
Llama layout."""

from __future__ import annotations

import os
import time
from pathlib import Path
from typing import Any

from moechat.export.bench_anchors import common
from moechat.export.bench_anchors.common import Runner, Spec

NAME = "llama.cpp"
INSTALL = "pip install llama-cpp-python==0.3.36"


def skip_reason(manifest: dict[str, Any], source: Path | None) -> str | None:
    problem = common.llama_engine_problem(
        manifest, "llama_cpp", f"llama-cpp-python is not installed ({INSTALL})", "llama.cpp"
    )
    if problem:
        return problem
    if source is None or common.source_kind(source) != "gguf":
        return (
            "not applicable: the source is not a GGUF (convert it with llama.cpp's "
            "convert_hf_to_gguf.py --outtype q8_0 and benchmark that file by hand)"
        )
    if not common.installed("gguf"):
        return "making the Q8_0 GGUF needs the gguf package"
    return None


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


def prepare(spec: Spec) -> dict[str, Any]:
    import gguf

    src = Path(spec["manifest"]["provenance"]["source"])
    reader = gguf.GGUFReader(str(src))
    file_type = reader.fields.get("general.file_type")
    if file_type is not None and int(file_type.contents()) == int(gguf.LlamaFileType.MOSTLY_Q8_0):
        return {"gguf": str(src), "weights": "Q8_0 GGUF (the source)"}
    dst = Path(spec["cache_dir"]) / f"{src.stem}.Q8_0.gguf"
    if not dst.is_file():
        dst.parent.mkdir(parents=True, exist_ok=True)
        common.log(f"writing {dst}")
        make_q8_0_gguf(src, dst)
    return {"gguf": str(dst), "weights": f"Q8_0 GGUF re-quantised from {src.name}"}


def load(spec: Spec) -> tuple[Runner, dict[str, Any]]:
    import llama_cpp

    ids = spec["prompt_ids"]
    llm = llama_cpp.Llama(
        model_path=spec["gguf"], n_ctx=len(ids) + spec["new_tokens"] + 16,
        n_batch=max(512, len(ids)), n_ubatch=max(512, len(ids)), n_threads=spec["threads"],
        n_threads_batch=spec["threads"], verbose=False,
    )  # fmt: skip

    def run(n: int) -> dict[str, Any]:
        llm.reset()  # no prefix reuse between runs
        start = time.perf_counter()
        stream = llm.generate(
            ids, top_k=1, top_p=1.0, min_p=0.0, temp=0.0, repeat_penalty=1.0, reset=True
        )
        return common.timed_stream(stream, start, n)

    return run, {"version": llama_cpp.__version__, "weights": spec["weights"]}
