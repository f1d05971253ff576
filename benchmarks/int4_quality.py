"""Quantisation quality of moechat packages against llama.cpp files made from the same weights.

    python benchmarks/int4_quality.py --fp32 PKG_FP32 --gguf SOURCE.gguf \\
        --package int8=PKG_INT8 --package int4=PKG_INT4 [--variant int4-gptq-down8 ...] \\
        [--llama Q8_0 Q4_0 Q4_K_M] [--work DIR] [--tokens 4096] [--threads 2]

``--variant`` quantises the fp32 package's graph itself (into ``--work``, kept for
``moechat bench``) with one of :data:`VARIANTS`, calibrated as ``moechat export`` does.

Every level is compared with the fp32 package's graph on the same token ids: moechat's
held-out text (export/data/heldout.txt) encoded by the fp32 package's tokenizer, in
windows of 512 tokens (each window a fresh cache, one token shared with the next, as
``moechat eval``). llama.cpp gets those ids directly (``Llama.eval``, no BOS added, all
logits kept). Its files are made with ``llama_model_quantize``: SOURCE.gguf -> F32 (every
tensor dequantised; the row "llama.cpp F32" checks that the two engines agree on the
unquantised model) -> Q8_0 / Q4_0 / Q4_K_M (no importance matrix). Reported per level:
top-1 agreement, mean KL(fp32 || level) in nats, perplexity and its ratio to fp32's,
and the size of the weights on disk. Not a test; results go to docs/benchmarks.md.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import shutil
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np

WINDOW = 512
Logits = Callable[[np.ndarray], np.ndarray]  # one window's ids -> [n, vocab] logits


def _variants() -> dict:
    from moechat.export.int8.quantize import QuantizeOptions

    int4 = QuantizeOptions(block=32, expert_bits=4, dense_bits=4, int4_down8=False)
    return {
        "int4-rtn": replace(int4, int4_method="rtn"),
        "int4-gptq": int4,
        "int4-rtn-down8": replace(int4, int4_method="rtn", int4_down8=True),
        "int4-gptq-down8": replace(int4, int4_down8=True),  # what --int4 writes
        # MoE: only the routed experts 4-bit (--int4-experts), by round to nearest or GPTQ
        "int4-experts-rtn": QuantizeOptions(block=32, expert_bits=4, int4_method="rtn"),
        "int4-experts-gptq": QuantizeOptions(block=32, expert_bits=4),
    }


VARIANTS = ("int4-rtn", "int4-gptq", "int4-rtn-down8", "int4-gptq-down8", "int4-experts-rtn",
            "int4-experts-gptq")  # fmt: skip


def quantize_variant(fp32: Path, name: str, work: Path) -> Path:
    """The fp32 package's graph quantised as variant ``name``, as a package in ``work``."""
    from moechat.export.int8.quantize import quantize_decoder
    from moechat.export.int8.step import CALIBRATION_MAX_TOKENS, calibration_text
    from moechat.runtime.tokenizer import TextTokenizer

    out = work / name
    if (out / "model.onnx").is_file():
        return out
    out.mkdir(parents=True, exist_ok=True)
    for f in ("moechat.json", "tokenizer.json"):
        shutil.copy(fp32 / f, out / f)
    tokenizer = TextTokenizer.from_file(fp32 / "tokenizer.json")
    ids = tokenizer.encode_text(calibration_text())[:CALIBRATION_MAX_TOKENS]
    start = time.perf_counter()
    info = quantize_decoder(fp32 / "model.onnx", out / "model.onnx", _variants()[name], ids)
    print(f"{name}: {info['matmuls']} ({time.perf_counter() - start:.0f} s)", flush=True)
    return out


@dataclass
class Row:
    level: str
    engine: str
    top1: float
    mean_kl: float
    perplexity: float
    ppl_ratio: float
    size_mb: float


def moechat_logits(package: Path, threads: int) -> Logits:
    from moechat.export.int8.fidelity import CHUNK, _Runner

    arch = json.loads((package / "moechat.json").read_text())["architecture"]
    os.environ.setdefault("OMP_NUM_THREADS", str(threads))
    runner = _Runner(package / "model.onnx", package, package.name, arch)

    def run(ids: np.ndarray) -> np.ndarray:
        runner.reset()
        parts = [runner.forward(ids[c : c + CHUNK])[0] for c in range(0, len(ids), CHUNK)]
        return np.concatenate(parts)

    return run


def llama_logits(gguf: Path, threads: int) -> Logits:
    from llama_cpp import Llama

    llm = Llama(
        str(gguf), n_ctx=WINDOW, n_batch=128, n_ubatch=128, logits_all=True,
        n_threads=threads, n_threads_batch=threads, verbose=False,
    )  # fmt: skip

    def run(ids: np.ndarray) -> np.ndarray:
        llm.reset()
        llm.eval([int(i) for i in ids])
        return np.array(llm.scores[: len(ids)], dtype=np.float32)

    return run


def quantize_gguf(src: Path, dst: Path, ftype_name: str, threads: int) -> Path:
    """llama.cpp's quantiser (the bench anchor's), src -> dst as ``ftype_name``; cached."""
    from moechat.export.bench_anchors.llama_cpp import quantize_gguf as llama_quantize

    if dst.is_file():
        return dst
    # the source may itself be quantised (the demo's Q4_1): it is dequantised to F32 first
    return llama_quantize(src, dst, ftype_name, threads, allow_requantize=True)  # type: ignore[arg-type]


def log_softmax(x: np.ndarray) -> np.ndarray:
    x = x.astype(np.float64)
    x = x - x.max(-1, keepdims=True)
    return x - np.log(np.exp(x).sum(-1, keepdims=True))


def spans(n: int) -> Iterator[tuple[int, int]]:
    from moechat.runtime.evaluate import windows

    yield from windows(n, WINDOW)


def reference(ids: np.ndarray, logits: Logits) -> list[np.ndarray]:
    """fp32 log-probabilities per window (positions with a target only), as float32."""
    return [
        log_softmax(logits(ids[a:b]))[: b - a - 1].astype(np.float32) for a, b in spans(len(ids))
    ]


def compare(
    level: str, engine: str, ids: np.ndarray, ref: list[np.ndarray], logits: Logits, size: int
) -> Row:
    agree = scored = 0
    kl = nll = nll_ref = 0.0
    for (a, b), pr in zip(spans(len(ids)), ref, strict=True):
        pq = log_softmax(logits(ids[a:b]))[: b - a - 1]
        target = ids[a + 1 : b]
        rows = np.arange(b - a - 1)
        nll -= float(pq[rows, target].sum())
        nll_ref -= float(pr[rows, target].sum())
        kl += float((np.exp(pr) * (pr - pq)).sum())
        agree += int((pr.argmax(-1) == pq.argmax(-1)).sum())
        scored += b - a - 1
    ppl, ppl_ref = math.exp(nll / scored), math.exp(nll_ref / scored)
    return Row(level, engine, agree / scored, kl / scored, ppl, ppl / ppl_ref, size / 1e6)


def package_weights(pkg: Path) -> int:
    return sum(
        f.stat().st_size for f in (pkg / "model.onnx", pkg / "model.onnx.data") if f.is_file()
    )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--fp32", type=Path, required=True, help="fp32 moechat package")
    parser.add_argument("--gguf", type=Path, help="the GGUF the packages were exported from")
    parser.add_argument("--package", action="append", default=[], help="NAME=PACKAGE")
    parser.add_argument("--variant", action="append", default=[], choices=VARIANTS)
    parser.add_argument("--llama", nargs="*", default=["Q8_0", "Q4_0", "Q4_K_M"])
    parser.add_argument("--work", type=Path, default=Path("int4-quality-work"))
    parser.add_argument("--tokens", type=int, default=4096)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--json", type=Path, help="also write the rows here")
    args = parser.parse_args(argv)

    from moechat.export.int8.fidelity import heldout_text
    from moechat.runtime.tokenizer import TextTokenizer

    tokenizer = TextTokenizer.from_file(args.fp32 / "tokenizer.json")
    ids = np.asarray(tokenizer.encode_text(heldout_text())[: args.tokens], dtype=np.int64)
    print(f"{len(ids)} held-out tokens; load average {os.getloadavg()}", flush=True)
    start = time.perf_counter()
    ref = reference(ids, moechat_logits(args.fp32, args.threads))
    print(f"fp32 reference: {time.perf_counter() - start:.0f} s", flush=True)

    levels: list[tuple[str, str, Callable[[], Logits], int]] = []
    packages = [item.partition("=")[::2] for item in args.package]
    packages += [(v, str(quantize_variant(args.fp32, v, args.work))) for v in args.variant]
    for name, path in packages:
        pkg = Path(path)
        levels.append(
            (name, "moechat", lambda p=pkg: moechat_logits(p, args.threads), package_weights(pkg))
        )
    if args.gguf is not None:
        args.work.mkdir(parents=True, exist_ok=True)
        f32 = quantize_gguf(args.gguf, args.work / "model-F32.gguf", "F32", args.threads)
        for ftype in ["F32", *args.llama]:
            path = quantize_gguf(f32, args.work / f"model-{ftype}.gguf", ftype, args.threads)
            levels.append(
                (
                    ftype,
                    "llama.cpp",
                    lambda p=path: llama_logits(p, args.threads),
                    path.stat().st_size,
                )
            )

    rows = []
    print("| level | engine | top-1 | mean KL | ppl (ratio) | weights MB |")
    print("|---|---|---|---|---|---|")
    for name, engine, make, size in levels:
        row = compare(name, engine, ids, ref, make(), size)
        rows.append(row)
        print(
            f"| {row.level} | {row.engine} | {row.top1:.2%} | {row.mean_kl:.4g} | "
            f"{row.perplexity:.3f} ({row.ppl_ratio:.4f}) | {row.size_mb:.1f} |",
            flush=True,
        )
    print(f"load average {os.getloadavg()}; {time.perf_counter() - start:.0f} s")
    if args.json:
        args.json.write_text(json.dumps([r.__dict__ for r in rows], indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
