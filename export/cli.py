"""``moechat export``: checkpoint -> package, with progress on stderr."""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

from moechat.export.package import ExportOptions, export_package
from moechat.models.loading import load_checkpoint


def progress_printer():
    start = time.perf_counter()

    def report(message: str) -> None:
        print(f"[{time.perf_counter() - start:6.1f}s] {message}", file=sys.stderr, flush=True)

    return report


def run_export(args: argparse.Namespace) -> int:
    report = progress_printer()
    max_positions = max(args.max_context or 4096, 4096)
    report(f"loading {args.source}")
    ckpt = load_checkpoint(Path(args.source), preset_name=args.preset, max_positions=max_positions)
    options = ExportOptions(
        moe_impl=args.moe_impl, attention=args.attention, max_context=args.max_context,
        name=args.name, force=args.force,
    )  # fmt: skip
    tokenizer = Path(args.tokenizer) if args.tokenizer else None
    manifest = export_package(ckpt, Path(args.outdir), options, tokenizer, progress=report)
    parity = manifest["parity"]
    report(
        f"wrote {args.outdir}: parity max |Δlogit| {parity['max_abs_diff']:.3g} "
        f"({parity['relative']:.2g} of logit scale {parity['logit_scale']:.3g})"
    )
    return 0
