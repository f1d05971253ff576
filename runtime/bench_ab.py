"""``moechat bench PACKAGE --ab NAME=VALUE [--pairs N]``: one environment setting
against the current environment, measured in fresh processes.

A setting that changes how a session is created (``MOECHAT_HUGEPAGES=0``,
``MOECHAT_SPIN=0``, ``MOECHAT_SESSION_CONFIG=session.dynamic_block_base=4``) is best
compared in fresh processes: in one process, the first session loaded decoded 3-11%
slower than an identical later one (docs/decisions/0004-fresh-process-ab.md). Each pair
runs ``moechat bench --json --turns 0`` twice, once as is and once with the settings,
alternating which goes first; the report gives each pair's decode ratio (variant /
baseline), how many pairs the variant won and the median ratio.
"""

from __future__ import annotations

import json
import os
import re
import statistics
import subprocess
import sys
from collections.abc import Callable, Mapping
from dataclasses import asdict, dataclass
from typing import Any

from moechat.runtime.errors import MoechatError

_ENV_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")


@dataclass
class AbRun:
    """One fresh ``moechat bench`` process (its medians)."""

    decode_tokens_per_s: float
    prefill_tokens_per_s: float
    huge_page_bytes: int


@dataclass
class AbPair:
    first: str  # "baseline" or "variant": which process ran first
    baseline: AbRun
    variant: AbRun

    @property
    def decode_ratio(self) -> float:
        return self.variant.decode_tokens_per_s / max(self.baseline.decode_tokens_per_s, 1e-9)


@dataclass
class AbResult:
    settings: dict[str, str]
    pairs: list[AbPair]

    @property
    def variant_faster(self) -> int:
        return sum(p.decode_ratio > 1 for p in self.pairs)

    @property
    def median_decode_ratio(self) -> float:
        return float(statistics.median(p.decode_ratio for p in self.pairs))

    def to_json(self) -> dict[str, Any]:
        return {
            "settings": self.settings,
            "pairs": [{**asdict(p), "decode_ratio": round(p.decode_ratio, 4)} for p in self.pairs],
            "variant_faster": self.variant_faster,
            "median_decode_ratio": round(self.median_decode_ratio, 4),
        }


def parse_settings(entries: list[str]) -> dict[str, str]:
    """``["NAME=VALUE", ...]`` -> a dict; MoechatError on anything else."""
    settings = {}
    for entry in entries:
        name, sep, value = entry.partition("=")
        if not sep or not _ENV_NAME.fullmatch(name):
            raise MoechatError(f"--ab wants NAME=VALUE (an environment variable), got {entry!r}")
        settings[name] = value
    return settings


def bench_command(package: str, bench_args: list[str]) -> list[str]:
    """The command line of one child ``moechat bench`` (the binary runs itself)."""
    moechat = (
        [sys.executable] if getattr(sys, "frozen", False) else [sys.executable, "-m", "moechat"]
    )
    return [*moechat, "bench", package, *bench_args, "--turns", "0", "--json"]


def run_child(command: list[str], env: Mapping[str, str]) -> AbRun:
    proc = subprocess.run(command, env=dict(env), capture_output=True, text=True)
    if proc.returncode != 0:
        lines = [ln for ln in proc.stderr.splitlines() if ln.strip()]
        raise MoechatError(f"a bench process failed: {lines[-1] if lines else proc.returncode}")
    result = json.loads(proc.stdout)
    return AbRun(
        decode_tokens_per_s=result["decode_tokens_per_s"],
        prefill_tokens_per_s=result["prefill_tokens_per_s"],
        huge_page_bytes=result["memory"]["huge_page_bytes"],
    )


def run_ab(
    package: str,
    settings: dict[str, str],
    pairs: int,
    bench_args: list[str],
    run: Callable[[list[str], Mapping[str, str]], AbRun] = run_child,
    progress: Callable[[str], None] = lambda message: None,
) -> AbResult:
    """``pairs`` pairs of fresh processes, baseline and variant, alternating the order."""
    if pairs < 1:
        raise MoechatError("--pairs must be at least 1")
    command = bench_command(package, bench_args)
    envs = {"baseline": dict(os.environ), "variant": {**os.environ, **settings}}
    out = []
    for i in range(pairs):
        order = ("baseline", "variant") if i % 2 == 0 else ("variant", "baseline")
        runs = {name: run(command, envs[name]) for name in order}
        out.append(AbPair(order[0], runs["baseline"], runs["variant"]))
        progress(
            f"pair {i + 1}/{pairs}: baseline {runs['baseline'].decode_tokens_per_s:.1f}, "
            f"variant {runs['variant'].decode_tokens_per_s:.1f} tok/s"
        )
    return AbResult(settings, out)


def format_ab(result: AbResult) -> str:
    variant = " ".join(f"{k}={v}" for k, v in result.settings.items())
    lines = [
        f"moechat bench --ab {variant}: {len(result.pairs)} pairs of fresh processes "
        "(order alternating); decode tok/s, each the median of the process's runs",
        "",
        f"| pair | first | baseline | {variant} | ratio |",
        "|---|---|---|---|---|",
    ]
    for i, p in enumerate(result.pairs, 1):
        lines.append(
            f"| {i} | {p.first} | {p.baseline.decode_tokens_per_s:.1f} | "
            f"{p.variant.decode_tokens_per_s:.1f} | {p.decode_ratio:.3f}x |"
        )
    lines += [
        "",
        f"{variant} faster in {result.variant_faster} of {len(result.pairs)} pairs, "
        f"median decode ratio {result.median_decode_ratio:.3f}x",
    ]
    return "\n".join(lines)
