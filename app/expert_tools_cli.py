"""`moechat experts extract | prune`: package rewrites (export/experts/), which need the
export extra (onnx); registered into the `experts` group by app/experts_cli.py."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from moechat.runtime.errors import MoechatError


def _export_tools(module: str):
    """Import an export/experts module, or say which extra is missing."""
    import importlib

    try:
        return importlib.import_module(f"moechat.export.experts.{module}")
    except ImportError as err:
        if getattr(sys, "frozen", False):
            raise MoechatError(
                "this single-file binary has no export tools: pip install 'moechat[export]' "
                "and run `moechat experts extract/prune` there"
            ) from None
        raise MoechatError(
            f"rewriting a package needs the export extra (pip install 'moechat[export]'): "
            f"{err.name} is missing"
        ) from None


def _progress(message: str) -> None:
    print(message, file=sys.stderr)


def cmd_extract(args: argparse.Namespace) -> int:
    if args.expert is None and not args.merge:
        raise MoechatError("say which expert: --expert E, or --merge for the mean of all")
    if args.expert is not None and args.merge:
        raise MoechatError("--expert and --merge exclude each other")
    if args.expert is not None and args.expert < 0:
        raise MoechatError(f"--expert must be 0 or more (got {args.expert})")
    extract = _export_tools("extract")
    extract.run_extract(
        str(Path(args.model)), args.out, None if args.merge else args.expert,
        textfile=args.text, force=args.force, progress=_progress,
    )  # fmt: skip
    return 0


def cmd_prune(args: argparse.Namespace) -> int:
    prune = _export_tools("prune")
    prune.run_prune(
        str(Path(args.model)), args.out, args.keep, calibration=args.calibration,
        textfile=args.text, force=args.force, progress=_progress,
    )  # fmt: skip
    return 0


def add_expert_tools(experts: argparse._SubParsersAction) -> None:
    p = experts.add_parser(
        "extract",
        help="a dense package made of one routed expert (or their mean), with perplexity",
    )
    p.add_argument("model", help="MoE model package (fp32 or int8)")
    p.add_argument("out", help="new package folder")
    p.add_argument("--expert", type=int, help="routed expert index (0-based) in every layer")
    p.add_argument("--merge", action="store_true", help="the mean of all routed experts")
    p.add_argument("--text", metavar="TEXTFILE",
                   help="perplexity text (default: the built-in held-out text)")  # fmt: skip
    p.add_argument("--force", action="store_true", help="replace OUT (a moechat package)")
    p.set_defaults(func=cmd_extract)

    p = experts.add_parser(
        "prune", help="keep the N most used routed experts per layer (REAP-style scores)"
    )
    p.add_argument("model", help="MoE model package (fp32 or int8)")
    p.add_argument("out", help="new package folder")
    p.add_argument("--keep", type=int, required=True, help="routed experts kept per layer")
    p.add_argument(
        "--calibration",
        metavar="TEXTFILE",
        help="text that scores the experts (default: built-in calibration text)",
    )
    p.add_argument(
        "--text", metavar="TEXTFILE", help="perplexity text (default: the built-in held-out text)"
    )
    p.add_argument("--force", action="store_true", help="replace OUT (a moechat package)")
    p.set_defaults(func=cmd_prune)
