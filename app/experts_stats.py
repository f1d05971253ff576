"""`moechat experts stats MODEL TEXTFILE`: which experts a text is routed to.

The text is teacher-forced through the package (runtime/routing.py ``collect_routing``:
chunks and windows as ``moechat eval``); per MoE layer runtime/routing_stats.py counts the
choices. Output: a heat map (layers x experts, shade = share of the layer's selections
against an even share), ``--json`` one object, ``--trace FILE`` one row per token, layer
and rank (.csv or .jsonl).
"""

from __future__ import annotations

import argparse
import csv
import json
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING

from moechat.runtime.errors import MoechatError
from moechat.runtime.routing import Routing
from moechat.runtime.routing_stats import LayerStats, stats_dict, text_stats

if TYPE_CHECKING:
    from moechat.runtime.model import LoadedModel

TRACE_FIELDS = ("position", "token_id", "token", "layer", "rank", "expert", "weight")
# share of a layer's selections against an even share (1/E): none, <1/2, <1, <2, >=2
SHADES = " ░▒▓█"
SHADE_LEGEND = "' ' never  ░ <0.5x  ▒ <1x  ▓ <2x  █ >=2x an even share"


def shade(share: float, even: float) -> str:
    if share <= 0:
        return SHADES[0]
    ratio = share / even
    return SHADES[1 + sum(ratio >= t for t in (0.5, 1.0, 2.0))]


WIDE_CELLS_UP_TO = 16  # experts; more get one character each (64 fit an 80-column line)


def heat_map(stats: list[LayerStats], num_experts: int, top_k: int) -> list[str]:
    """Lines of a layers x experts map with each layer's balance and its share of tokens
    routed as in the previous layer. Up to 16 experts a cell is a shade and the expert's
    share of the layer's selections in percent; beyond, one shade character per expert."""
    even = 1.0 / num_experts
    wide = num_experts <= WIDE_CELLS_UP_TO
    if wide:
        header = ["".join(f"{e:>5}" for e in range(num_experts))]
    else:
        tens = "".join(str(e // 10 % 10) if e % 10 == 0 else " " for e in range(num_experts))
        header = [tens, "".join(str(e % 10) for e in range(num_experts))]
    what = "shade and % of the layer's picks" if wide else "shade"
    lines = [f"experts chosen per layer ({what}; {SHADE_LEGEND})"]
    lines += [f"{'':>6} {h}" for h in header[:-1]]
    lines.append(f"{'layer':>6} {header[-1]}  balance  same")
    for s in stats:
        total = max(sum(s.counts), 1)
        if wide:
            row = "".join(f" {shade(c / total, even)}{100 * c / total:3.0f}" for c in s.counts)
        else:
            row = "".join(shade(c / total, even) for c in s.counts)
        same = "-" if s.same_as_previous is None else f"{s.same_as_previous:.0%}"
        lines.append(f"{s.layer:>6} {row}  {s.balance:7.2f}  {same:>4}")
    return lines


def trace_rows(
    tokens: list[int], texts: list[str], layers: list[int], routings: list[Routing]
) -> Iterator[dict]:
    for position, (token, text) in enumerate(zip(tokens, texts, strict=True)):
        for layer, routing in zip(layers, routings, strict=True):
            for rank, (expert, weight) in enumerate(
                zip(routing.experts[position], routing.weights[position], strict=True)
            ):
                yield {
                    "position": position, "token_id": token, "token": text, "layer": layer,
                    "rank": rank, "expert": int(expert), "weight": round(float(weight), 6),
                }  # fmt: skip


def write_trace(path: Path, rows: Iterator[dict]) -> int:
    """Write the rows as CSV or JSONL (by the file's suffix); return how many."""
    kind = path.suffix.lower()
    if kind not in (".csv", ".jsonl"):
        raise MoechatError(f"--trace {path}: the file must end in .csv or .jsonl")
    n = 0
    try:
        with path.open("w", encoding="utf-8", newline="") as f:
            if kind == ".csv":
                writer = csv.DictWriter(f, fieldnames=TRACE_FIELDS)
                writer.writeheader()
                for row in rows:
                    writer.writerow(row)
                    n += 1
            else:
                for row in rows:
                    f.write(json.dumps(row, ensure_ascii=False) + "\n")
                    n += 1
    except OSError as err:
        raise MoechatError(f"cannot write {path}: {err.strerror or err}") from None
    return n


def _with_routing_added(model: LoadedModel, args: argparse.Namespace) -> LoadedModel:
    """A package exported before routing left the graph: where onnx is installed, reload
    it with the router outputs added in memory (export/routing_outputs.py); else keep
    it (require_routing then says to re-export)."""
    from moechat.runtime.model import load_model

    try:
        from moechat.export.routing_outputs import routed_graph
    except ImportError:  # the single binary, or no export extra
        return model
    package = model.package
    if model.provider != "CPUExecutionProvider":  # other providers may run a graph variant
        return model
    graph = routed_graph(package.graph_path(None), package.architecture)
    print(
        f"note: {package.path} predates routing outputs; they were added in memory "
        "(re-export it to keep them)",
        file=sys.stderr,
    )
    del model  # one session at a time
    return load_model(package.path, args.device, args.max_context, args.threads,
                      routed_graph=graph)  # fmt: skip


def cmd_stats(args: argparse.Namespace) -> int:
    from moechat.runtime.evaluate import ProgressBar, read_text_file
    from moechat.runtime.model import load_model
    from moechat.runtime.routing import collect_routing, require_routing

    if args.chunk < 1:
        raise MoechatError(f"--chunk must be at least 1 (got {args.chunk})")
    trace = Path(args.trace) if args.trace else None
    if trace is not None and trace.suffix.lower() not in (".csv", ".jsonl"):
        raise MoechatError(f"--trace {trace}: the file must end in .csv or .jsonl")
    text = read_text_file(args.textfile)
    model = load_model(Path(args.model), args.device, args.max_context, args.threads)
    if model.routing is None and model.package.spec.architecture.use_moe:
        model = _with_routing_added(model, args)
    routing = require_routing(model)
    ids = model.tokenizer.encode_text(text)
    if args.max_tokens is not None:
        ids = ids[: max(args.max_tokens, 0)]
    if not ids:
        raise MoechatError(f"{args.textfile} holds no tokens")
    bar = ProgressBar(len(ids), label="routing")
    routings = collect_routing(model.decoder, routing, ids, chunk=args.chunk, progress=bar.update)
    bar.close(len(ids))
    spec = routing.spec
    stats = text_stats(routing.layers, routings, spec.num_experts)
    for s in stats:  # every token chose k experts in every layer
        assert sum(s.counts) == len(ids) * spec.top_k, (s.layer, sum(s.counts))
    if trace is not None:
        texts = [model.tokenizer.decode([t], skip_special_tokens=False) for t in ids]
        rows = write_trace(trace, trace_rows(ids, texts, routing.layers, routings))
    if args.json:
        out = {
            "model": model.name, "text": str(args.textfile), "tokens": len(ids),
            "experts": spec.num_experts, "top_k": spec.top_k,
            "layers": [stats_dict(s) for s in stats],
        }  # fmt: skip
        if trace is not None:
            out["trace"] = {"file": str(trace), "rows": rows}
        print(json.dumps(out, ensure_ascii=False))
        return 0
    print(
        f"{model.name}: {len(ids):,} tokens of {args.textfile}, top-{spec.top_k} of "
        f"{spec.num_experts} routed experts in {len(stats)} layers"
    )
    print("\n".join(heat_map(stats, spec.num_experts, spec.top_k)))
    if spec.top_k > 1:
        top = sorted(((n, s.layer, a, b) for s in stats for a, b, n in s.top_pairs[:1]),
                     reverse=True)[:5]  # fmt: skip
        pairs = ", ".join(f"layer {layer} {a}+{b} ({n / len(ids):.0%})" for n, layer, a, b in top)
        print(f"most often chosen together (pair, share of tokens): {pairs}")
    dead = [f"{s.layer}:{e}" for s in stats for e, c in enumerate(s.counts) if c == 0]
    if dead:
        print(f"never chosen on this text ({len(dead)}): {' '.join(dead[:32])}"
              + (" ..." if len(dead) > 32 else ""))  # fmt: skip
    if trace is not None:
        print(f"trace: {rows:,} rows in {trace}")
    return 0


def add_stats(experts: argparse._SubParsersAction) -> None:
    p = experts.add_parser(
        "stats", help="which experts a text is routed to, per layer (heat map, --json, --trace)"
    )
    p.add_argument("model", help="model package directory")
    p.add_argument("textfile", help="UTF-8 text file, teacher-forced through the model")
    p.add_argument("--json", action="store_true", help="print one JSON object")
    p.add_argument("--trace", metavar="FILE",
                   help="write one row per token, layer and rank: .csv or .jsonl")  # fmt: skip
    p.add_argument("--max-tokens", type=int, help="route only the text's first N tokens")
    p.add_argument("--chunk", type=int, default=256,
                   help="tokens fed per step through the KV cache (default: 256)")  # fmt: skip
    from moechat.app.cli import _add_model_options  # cli.py is loaded: it calls this

    _add_model_options(p)
    p.set_defaults(func=cmd_stats)
