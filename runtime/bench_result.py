"""What ``moechat bench`` measured (:class:`BenchResult`), its JSON and its table.

The JSON (``moechat bench --json``, :meth:`BenchResult.to_json`) keeps the field order
and names of these dataclasses; scripts and docs/benchmarks.md read it.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any, TypedDict


class ProcessMemory(TypedDict):
    peak_rss_bytes: int
    rss_bytes: int | None  # None where the platform reports only the peak
    source: str  # VmHWM, PeakWorkingSetSize or ru_maxrss


class MachineInfo(TypedDict):
    cpu: str
    cpus: int | None
    load_avg: list[float] | None
    platform: str
    python: str
    onnxruntime: str


@dataclass
class Run:
    """One generation: prompt, then ``new_tokens`` greedy tokens."""

    prefill_tokens_per_s: float
    ttft_ms: float
    decode_tokens_per_s: float
    new_tokens: int


@dataclass
class GraphSummary:
    weights: str  # int8, float32, float16
    moe_impl: str | None  # None for dense models
    attention: str | None
    static_cache: bool


@dataclass
class MemoryReport:
    peak_rss_bytes: int
    rss_bytes: int | None
    source: str
    package_bytes: int
    kv_cache_bytes: int
    kv_bytes_per_token: int
    huge_page_bytes: int
    allowance_bytes: int
    budget_bytes: int  # package + KV buffers + allowance
    ok: bool  # peak RSS within the budget
    load_peak_rss_bytes: int = 0  # peak while the package loaded (prepacking, copies)
    load_rss_bytes: int | None = None  # resident right after loading


@dataclass
class ChatReport:
    """Time to first token of the last chat turn vs the first (prefix reuse)."""

    turns: int
    message_tokens: list[int]  # [shortest, longest] user message
    reply_tokens: int
    ttft_ms_per_turn: list[float]
    prefill_tokens_per_turn: list[int]
    ttft_ms_first: float
    ttft_ms_last: float
    context_at_last_turn: int
    ratio: float
    target: float
    ok: bool


@dataclass
class ChatSkipped:
    skipped: str
    turns: int | None = None

    def to_json(self) -> dict[str, Any]:
        return {k: v for k, v in asdict(self).items() if v is not None}


@dataclass
class BenchResult:
    model: str
    path: str
    architecture: str | None
    moe: bool
    graph: GraphSummary
    provider: str
    device: str
    threads: int
    spinning: bool
    max_context: int
    prompt_tokens: int
    new_tokens: int
    repeat: int
    sampling: str
    load_s: float
    prefill_tokens_per_s: float
    ttft_ms: float
    decode_tokens_per_s: float
    runs: list[Run]
    memory: MemoryReport
    chat: ChatReport | ChatSkipped
    machine: MachineInfo
    # not in the JSON: the ids every engine gets and what moechat generated
    prompt_ids: list[int] = field(default_factory=list, repr=False)
    token_ids: list[int] = field(default_factory=list, repr=False)
    compare: dict[str, dict[str, Any]] | None = None  # --compare: per engine

    def to_json(self) -> dict[str, Any]:
        """The JSON output: everything but the bulky id lists (and no empty compare)."""
        out = asdict(self)
        del out["prompt_ids"], out["token_ids"]
        if isinstance(self.chat, ChatSkipped):
            out["chat"] = self.chat.to_json()
        if self.compare is None:
            del out["compare"]
        return out


def format_mb(n: float | None) -> str:
    return "-" if n is None else f"{n / 1e6:.1f} MB"


def format_number(value: float | None, digits: int = 1) -> str:
    return "-" if value is None else f"{value:.{digits}f}"


def format_report(result: BenchResult) -> str:
    """The human-readable table of a bench result (comparisons: ``format_compare``)."""
    m, g, mem, chat = result.machine, result.graph, result.memory, result.chat
    graph = f"{g.weights}, attention {g.attention}" + (f", MoE {g.moe_impl}" if g.moe_impl else "")
    load = " ".join(str(x) for x in m["load_avg"] or []) or "?"
    lines = [
        f"moechat bench: {result.model} ({graph}) on {result.provider}, "
        f"{result.threads} threads{'' if result.spinning else ' (MOECHAT_SPIN=0)'}, "
        f"context {result.max_context}",
        f"machine: {m['cpu']}, {m['cpus']} CPUs, load {load}; onnxruntime {m['onnxruntime']}",
        f"prompt {result.prompt_tokens} tokens, {result.new_tokens} new tokens, "
        f"{result.sampling}, median of {result.repeat} (load {result.load_s:.2f} s)",
        "",
        "| metric | value |",
        "|---|---|",
        f"| prefill | {format_number(result.prefill_tokens_per_s)} tok/s |",
        f"| time to first token | {format_number(result.ttft_ms)} ms |",
        f"| decode | {format_number(result.decode_tokens_per_s)} tok/s |",
        f"| peak RSS | {format_mb(mem.peak_rss_bytes)} (target <= {format_mb(mem.budget_bytes)} = "
        f"package {format_mb(mem.package_bytes)} + KV {format_mb(mem.kv_cache_bytes)} + "
        f"{mem.allowance_bytes // 2**20} MiB): {'ok' if mem.ok else 'OVER'} |",
        f"| resident after load | {format_mb(mem.load_rss_bytes)} (peak while loading "
        f"{format_mb(mem.load_peak_rss_bytes)}) = {mem.load_peak_rss_bytes / max(mem.package_bytes, 1):.2f} "
        "x the package |",
        f"| KV cache per token | {mem.kv_bytes_per_token:,} bytes |",
        f"| weights on huge pages | {format_mb(mem.huge_page_bytes)} |",
    ]
    if isinstance(chat, ChatSkipped):
        lines.append(f"| chat TTFT ratio | skipped: {chat.skipped} |")
    else:
        lo, hi = chat.message_tokens
        size = f"{lo}" if lo == hi else f"{lo}-{hi}"
        lines.append(
            f"| chat TTFT turn {chat.turns} / turn 1 | {format_number(chat.ttft_ms_last)} / "
            f"{format_number(chat.ttft_ms_first)} ms = {chat.ratio:.2f} (target <= "
            f"{chat.target}): {'ok' if chat.ok else 'OVER'}; {size}-token messages, "
            f"{chat.reply_tokens}-token replies, {chat.context_at_last_turn} tokens "
            "cached at the last turn |"
        )
    return "\n".join(lines)
