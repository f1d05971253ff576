"""The int8 step of ``moechat export --int8``, run inside the export's temp folder.

The fp32 graph (already checked for parity against PyTorch) is quantised into
``int8/model.onnx``, measured against the fp32 graph on held-out text, and then
replaces it: the package keeps only the int8 graph.
"""

from __future__ import annotations

import shutil
from collections.abc import Callable
from dataclasses import dataclass
from importlib import resources
from pathlib import Path

from moechat.export.int8.fidelity import (
    HELDOUT_MAX_TOKENS,
    WINDOW,
    FidelityReport,
    heldout_text,
    measure_fidelity,
)
from moechat.export.int8.quantize import QuantizeOptions, quantize_decoder
from moechat.runtime.evaluate import read_text_file
from moechat.runtime.package import package_bytes
from moechat.runtime.tokenizer import TextTokenizer

GRAPH = "model.onnx"
SIZE_RATIO_MAX = 0.30
CALIBRATION_MAX_TOKENS = 1024


def calibration_text() -> str:
    """Text for activation smoothing, distinct from the held-out text (package data)."""
    return (resources.files("moechat.export") / "data" / "calibration.txt").read_text("utf-8")


@dataclass
class Int8Result:
    quantization: dict
    fidelity: FidelityReport
    fp32_bytes: int
    int8_bytes: int

    @property
    def size_ratio(self) -> float:
        return self.int8_bytes / max(self.fp32_bytes, 1)


def graph_bytes(folder: Path, graph: str = GRAPH) -> int:
    files = [folder / graph, folder / f"{graph}.data"]
    return sum(f.stat().st_size for f in files if f.is_file())


def quantize_package_graph(
    work: Path,
    arch: dict,
    tokenizer: TextTokenizer,
    options: QuantizeOptions,
    heldout: Path | None = None,
    max_context: int = WINDOW,
    progress: Callable[[str], None] = lambda msg: None,
) -> Int8Result:
    """Quantise ``work/model.onnx`` in place (fp32 -> int8); return what to record."""
    fp32_bytes = package_bytes(work)
    qdir = work / "int8"
    qdir.mkdir()
    bits = f"{options.expert_bits}-bit experts, {options.dense_bits}-bit matmuls"
    gptq = options.dense_bits == 4 and options.int4_method == "gptq"
    progress(
        f"quantising ({bits}{', GPTQ' if gptq else ''}; routed experts: {options.moe}, "
        f"matmuls: {options.dense}, block {options.block})"
    )
    calibration = tokenizer.encode_text(calibration_text())[:CALIBRATION_MAX_TOKENS]
    info = quantize_decoder(work / GRAPH, qdir / GRAPH, options, calibration)
    level = "int8" if info.get("weights") == "int8" else "int4"
    info = {"method": level, **info}

    if heldout is not None:
        text, name = read_text_file(heldout), Path(heldout).name
    else:
        text, name = heldout_text(), "moechat heldout.txt"
    ids = tokenizer.encode_text(text)[:HELDOUT_MAX_TOKENS]
    progress(f"measuring {level} fidelity against fp32 on {len(ids)} held-out tokens")
    report = measure_fidelity(
        work / GRAPH, qdir / GRAPH, arch, ids, name, window=min(WINDOW, max_context)
    )

    for suffix in ("", ".data"):
        (work / f"{GRAPH}{suffix}").unlink(missing_ok=True)
        if (qdir / f"{GRAPH}{suffix}").exists():
            (qdir / f"{GRAPH}{suffix}").replace(work / f"{GRAPH}{suffix}")
    shutil.rmtree(qdir)
    int8_bytes = package_bytes(work)
    info.update(
        fp32_package_bytes=fp32_bytes,
        int8_package_bytes=int8_bytes,
        size_ratio=round(int8_bytes / max(fp32_bytes, 1), 4),
    )
    return Int8Result(info, report, fp32_bytes, int8_bytes)
