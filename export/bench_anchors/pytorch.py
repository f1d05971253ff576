"""Anchor ``pytorch``: the reference model (``moechat.models``, eager fp32) loaded from
the package's provenance ``source`` with ``load_checkpoint``. Needs torch."""

from __future__ import annotations

import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from moechat.export.bench_anchors import common
from moechat.export.bench_anchors.common import Runner, Spec

NAME = "pytorch"
INSTALL = "pip install 'moechat[export]'"


def skip_reason(manifest: dict[str, Any], source: Path | None) -> str | None:
    if not common.installed("torch"):
        return f"torch is not installed ({INSTALL})"
    if manifest.get("demo") is not None:
        return (
            "not applicable: the demo's MoE weights were converted from its dense source at "
            "build time and exist only in the package (bench the dense source instead: "
            "moechat export SOURCE.gguf OUT --int8; moechat bench OUT --compare)"
        )
    return common.source_missing(manifest)


def load_reference(manifest: dict[str, Any], max_positions: int) -> Any:
    """The package's source checkpoint; RuntimeError when it is not the packaged model."""
    from moechat.models.loading import load_checkpoint

    source = Path(manifest["provenance"]["source"])
    overrides = manifest["architecture"] if common.source_kind(source) == "state_dict" else None
    ckpt = load_checkpoint(source, overrides=overrides, max_positions=max_positions)
    want, got = manifest["architecture"], ckpt.config.to_dict()
    keys: tuple[str, ...] = ("model_type", "vocab_size", "hidden_size", "num_hidden_layers")
    keys += ("use_moe",) + (
        ("intermediate_size", "n_routed_experts") if want.get("use_moe") else ()
    )
    differ = [k for k in keys if k in want and want[k] != got.get(k)]
    if differ:
        raise RuntimeError(
            f"{source} is not the packaged model ({differ[0]}: {got.get(differ[0])} in the "
            f"source, {want[differ[0]]} in the package)"
        )
    return ckpt


def prepare(spec: Spec) -> dict[str, Any]:
    return {}


def load(spec: Spec) -> tuple[Runner, dict[str, Any]]:
    import torch

    torch.set_num_threads(spec["threads"])
    ids = spec["prompt_ids"]
    ckpt = load_reference(spec["manifest"], max(4096, len(ids) + spec["new_tokens"] + 8))
    model = ckpt.model.eval()

    def tokens() -> Iterator[int]:
        past = model.empty_cache()
        x = torch.tensor([ids], dtype=torch.long)
        while True:
            logits, past = model.step(x, past)
            tok = int(torch.argmax(logits[0, -1]))
            yield tok
            x = torch.tensor([[tok]], dtype=torch.long)

    def run(n: int) -> dict[str, Any]:
        with torch.inference_mode():
            return common.timed_stream(tokens(), time.perf_counter(), n)

    kind = common.source_kind(Path(spec["manifest"]["provenance"]["source"]))
    return run, {"version": torch.__version__, "weights": f"fp32 eager from the {kind} source"}
