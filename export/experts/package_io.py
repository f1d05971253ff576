"""Read a package's graph, write a rewritten copy as a new package, measure perplexity.

Shared by ``moechat experts extract`` and ``prune``: the source package is only read;
the new one is assembled in a temporary folder beside OUT and renamed into place once
its graph has loaded and been scored, so a failure never leaves a half-written package.
"""

from __future__ import annotations

import copy
import math
import shutil
import tempfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import onnx

from moechat.export.onnx_graph import save_model
from moechat.export.package import _replace_dir, write_manifest
from moechat.runtime.errors import MoechatError
from moechat.runtime.evaluate import evaluate_perplexity, read_text_file
from moechat.runtime.model import load_model
from moechat.runtime.package import ModelPackage, load_package, package_bytes

HELDOUT = Path(__file__).resolve().parents[1] / "data" / "heldout.txt"
# prune scores experts on other text than the perplexity is measured on
CALIBRATION = Path(__file__).resolve().parents[1] / "data" / "calibration.txt"
EVAL_CONTEXT = 512  # tokens per perplexity window: enough context, fast on a laptop


@dataclass
class Perplexity:
    value: float
    tokens: int

    def to_dict(self) -> dict[str, Any]:
        return {"perplexity": round(self.value, 4) if math.isfinite(self.value) else None,
                "tokens": self.tokens}  # fmt: skip


def open_moe_package(path: str | Path) -> tuple[ModelPackage, onnx.ModelProto]:
    """The package and its main graph with weights; MoechatError if it is not a MoE."""
    package = load_package(Path(path))
    if not package.spec.architecture.use_moe:
        raise MoechatError(f"{package.path} is a dense model: it has no routed experts")
    graph_path = package.graph_path()
    try:
        model = onnx.load(str(graph_path), load_external_data=True)
    except Exception as err:  # protobuf / file errors
        raise MoechatError(f"cannot read {graph_path}: {err}") from None
    return package, model


def check_outdir(source: Path, out: Path, force: bool) -> None:
    if out.resolve() == source.resolve():
        raise MoechatError("OUT must differ from MODEL: the source package is never changed")
    if out.exists() and not force:
        raise MoechatError(f"{out} exists (use --force to replace it)")
    if out.exists() and not (out / "moechat.json").is_file():
        raise MoechatError(f"{out} exists and is not a moechat package: not replacing it")


def perplexity(folder: Path, text: str, max_context: int = EVAL_CONTEXT) -> Perplexity:
    """Teacher-forced perplexity of a package on ``text`` (runtime/evaluate.py)."""
    model = load_model(folder, "cpu", min(max_context, load_package(folder).max_context))
    ids = model.tokenizer.encode_text(text)
    result = evaluate_perplexity(model.decoder, ids)
    return Perplexity(result.perplexity, result.tokens)


def eval_text(textfile: str | None, default: Path = HELDOUT) -> tuple[str, str]:
    """(text, its name for moechat.json): the user's file or a built-in text."""
    path = Path(textfile) if textfile else default
    return read_text_file(path), (str(path) if textfile else f"export/data/{default.name}")


def write_package(
    package: ModelPackage,
    model: onnx.ModelProto,
    out: Path,
    edit_manifest: Callable[[dict[str, Any]], None],
    text: str,
    progress: Callable[[str], None] = lambda _: None,
) -> tuple[Perplexity, Perplexity, dict[str, int]]:
    """Save ``model`` as a package at ``out`` (manifest: the source's, changed by
    ``edit_manifest``); returns perplexity of source and new package and their sizes."""
    out.parent.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=out.parent))
    try:
        manifest = copy.deepcopy(package.manifest)
        graph = manifest["graph"]
        save_model(model, work / graph["file"])
        tokenizer = package.spec.tokenizer.file
        shutil.copy2(package.path / tokenizer, work / tokenizer)
        # The rewritten graph is the only one: per-provider variants and the PyTorch
        # parity check describe the source graph, not this one.
        dropped = sorted(graph.pop("variants", None) or {})
        graph.pop("variant_attention", None)
        for key in ("parity", "parity_fp32", "fidelity"):
            manifest.pop(key, None)
        edit_manifest(manifest)
        if dropped:
            manifest.setdefault("experts", {})["variants_dropped"] = dropped
        write_manifest(work, manifest)
        progress("measuring perplexity of the source package")
        before = perplexity(package.path, text)
        progress("measuring perplexity of the new package")
        after = perplexity(work, text)
        sizes = {"before": package_bytes(package.path), "after": package_bytes(work)}
        manifest = load_package(work).manifest
        manifest["experts"]["perplexity"] = {
            "source": before.to_dict(), "new": after.to_dict(),
            "context": EVAL_CONTEXT,
        }  # fmt: skip
        manifest["experts"]["bytes"] = sizes
        write_manifest(work, manifest)
        _replace_dir(work, out)
    except BaseException:
        shutil.rmtree(work, ignore_errors=True)
        raise
    return before, after, sizes
