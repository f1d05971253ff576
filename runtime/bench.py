"""``moechat bench``: prefill/decode speed, time to first token and memory of a package.

Torch-free. One process measures one package through the same code path as
``moechat run`` (:func:`moechat.runtime.generator.generate`, greedy, with end-of-text
ignored so every run makes exactly ``new_tokens`` tokens), repeats it and reports
medians, then a multi-turn :class:`~moechat.runtime.chat.ChatSession` with equal-length
user messages (time to first token of the last turn vs the first), and resident memory
against ``package size + KV buffers + 150 MB``. ``--compare`` (see
:mod:`moechat.export.bench_anchors`) adds other engines on the same weights; ``--ab``
(:mod:`moechat.runtime.bench_ab`) compares an environment setting in fresh processes.
What it measured: :class:`~moechat.runtime.bench_result.BenchResult` (its JSON, its table).

Definitions (the same for the anchors in ``bench_anchors``):
- time to first token: from handing the prompt ids to the engine until the first new
  token id is known (prefill + sampling one token);
- prefill tokens/s: prompt tokens / prefill time (moechat: the forward pass only);
- decode tokens/s: (new tokens - 1) / (time from the first to the last new token).
"""

from __future__ import annotations

import dataclasses
import os
import platform
import statistics
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from moechat.runtime.bench_result import (
    BenchResult,
    ChatReport,
    ChatSkipped,
    GraphSummary,
    MachineInfo,
    MemoryReport,
    ProcessMemory,
    Run,
)
from moechat.runtime.errors import MoechatError
from moechat.runtime.manifest import kv_bytes_per_token
from moechat.runtime.package import package_bytes

if TYPE_CHECKING:
    from moechat.runtime.events import DoneEvent
    from moechat.runtime.model import LoadedModel
    from moechat.runtime.sampling import SamplingParams
    from moechat.runtime.tokenizer import TextTokenizer

MEMORY_ALLOWANCE_BYTES = 150 * 1024 * 1024  # interpreter, onnxruntime, tokenizer, arenas
CHAT_TTFT_RATIO_TARGET = 1.5

# Filler text for prompts and chat messages (encoded, repeated, cut to length).
BENCH_TEXT = (
    "The lighthouse keeper climbed the spiral stairs every evening at dusk, carrying a "
    "lantern, a notebook and a thermos of strong tea. From the gallery he could see the "
    "fishing boats returning to the harbour, the gulls settling on the breakwater and the "
    "slow movement of clouds over the hills to the west. He wrote down the wind speed, the "
    "direction of the swell and the names of the ships that passed, as his father had done "
    "before him. In winter the storms came in from the north and the whole tower hummed like "
    "a struck bell; in summer the nights were short and quiet, and tourists left postcards "
    "tucked into the gate. Explain, step by step, how a lighthouse lens focuses light, why "
    "the beam rotates, and what a keeper would check before sunset. "
)


@dataclass
class BenchOptions:
    device: str = "auto"
    threads: int | None = None
    prompt_tokens: int = 256
    new_tokens: int = 128
    repeat: int = 3
    max_context: int | None = None
    turns: int = 10  # chat turns for the TTFT ratio; 0 skips the chat measurement
    message_tokens: int = 64  # tokens per user message in the chat measurement
    reply_tokens: int = 32  # tokens generated per chat turn

    def validate(self) -> BenchOptions:
        for name in ("prompt_tokens", "new_tokens", "repeat"):
            if getattr(self, name) < 1:
                raise MoechatError(f"--{name.replace('_', '-')} must be at least 1")
        if self.new_tokens < 2:
            raise MoechatError("--new-tokens must be at least 2 (decode speed needs two tokens)")
        if self.threads is not None and self.threads < 1:
            raise MoechatError("--threads must be at least 1")
        if self.turns < 0 or self.turns == 1:
            raise MoechatError("--turns must be 0 (skip) or at least 2")
        return self


# -- measurements that need no model ------------------------------------------------


def _proc_status_kib(key: str) -> int | None:
    try:
        with open("/proc/self/status", encoding="ascii") as fh:
            for line in fh:
                if line.startswith(key + ":"):
                    return int(line.split()[1])
    except (OSError, ValueError, IndexError):
        pass
    return None


def _windows_memory() -> ProcessMemory:
    if sys.platform != "win32":  # (tells the type checker where ctypes.windll exists)
        raise OSError("Windows only")
    import ctypes
    from ctypes import wintypes

    class Counters(ctypes.Structure):
        _fields_ = [
            ("cb", wintypes.DWORD),
            ("PageFaultCount", wintypes.DWORD),
            ("PeakWorkingSetSize", ctypes.c_size_t),
            ("WorkingSetSize", ctypes.c_size_t),
            ("QuotaPeakPagedPoolUsage", ctypes.c_size_t),
            ("QuotaPagedPoolUsage", ctypes.c_size_t),
            ("QuotaPeakNonPagedPoolUsage", ctypes.c_size_t),
            ("QuotaNonPagedPoolUsage", ctypes.c_size_t),
            ("PagefileUsage", ctypes.c_size_t),
            ("PeakPagefileUsage", ctypes.c_size_t),
        ]

    counters = Counters()
    counters.cb = ctypes.sizeof(Counters)
    process = ctypes.windll.kernel32.GetCurrentProcess()
    ctypes.windll.psapi.GetProcessMemoryInfo(process, ctypes.byref(counters), counters.cb)
    return {
        "peak_rss_bytes": int(counters.PeakWorkingSetSize),
        "rss_bytes": int(counters.WorkingSetSize),
        "source": "PeakWorkingSetSize",
    }


def memory_usage() -> ProcessMemory:
    """Peak and current resident memory of this process in bytes.

    Linux: ``VmHWM``/``VmRSS`` from /proc/self/status; macOS/BSD: ``ru_maxrss`` from
    ``resource.getrusage`` (bytes on macOS, KiB elsewhere; no current value); Windows:
    the peak working set.
    """
    hwm = _proc_status_kib("VmHWM")
    if hwm is not None:
        rss = _proc_status_kib("VmRSS")
        return {"peak_rss_bytes": hwm * 1024, "rss_bytes": (rss or 0) * 1024, "source": "VmHWM"}
    if sys.platform == "win32":
        return _windows_memory()
    import resource

    maxrss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    maxrss_bytes = maxrss if sys.platform == "darwin" else maxrss * 1024
    return {"peak_rss_bytes": maxrss_bytes, "rss_bytes": None, "source": "ru_maxrss"}


def machine_info() -> MachineInfo:
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo", encoding="utf-8", errors="replace") as fh:
            for line in fh:
                if line.startswith("model name"):
                    cpu = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    try:
        load = [round(x, 2) for x in os.getloadavg()]
    except (AttributeError, OSError):
        load = None
    import onnxruntime

    return {
        "cpu": cpu,
        "cpus": os.cpu_count(),
        "load_avg": load,
        "platform": platform.platform(),
        "python": platform.python_version(),
        "onnxruntime": onnxruntime.__version__,
    }


def kv_cache_bytes(model: LoadedModel) -> int:
    """Bytes of the KV buffers at the loaded context (static: allocated up front)."""
    return kv_token_bytes(model) * model.max_context


def kv_token_bytes(model: LoadedModel) -> int:
    """KV cache bytes per token (MLA: the latent and the rope key, runtime/manifest.py)."""
    itemsize = 2 if model.package.graph.get("kv_dtype", "float32") == "float16" else 4
    return kv_bytes_per_token(model.package.architecture, itemsize)


def prompt_ids(tokenizer: TextTokenizer, n: int, offset: int = 0) -> list[int]:
    """``n`` ids of ordinary text (the filler text repeated), starting ``offset`` ids in."""
    base = tokenizer.encode_text(BENCH_TEXT)
    if not base:
        raise MoechatError("the tokenizer encodes the benchmark text to nothing")
    reps = (offset + n) // len(base) + 1
    return (base * reps)[offset : offset + n]


def message_text(tokenizer: TextTokenizer, n: int, turn: int) -> str:
    """A user message of at most ``n`` tokens (as close as words allow), different per turn."""
    words = BENCH_TEXT.split()
    start = (turn * 11) % len(words)
    words = (words[start:] + words[:start]) * (n // len(words) + 2)
    text = ""
    for word in words:
        candidate = f"{text} {word}" if text else word
        if len(tokenizer.encode_text(candidate)) > n:
            break
        text = candidate
    return text


def _median(values: list[float]) -> float:
    return float(statistics.median(values)) if values else 0.0


# -- measurements on a loaded model ---------------------------------------------------


def greedy_params(new_tokens: int) -> SamplingParams:
    from moechat.runtime.sampling import SamplingParams

    return SamplingParams().replace(
        temperature=0.0, top_k=0, top_p=1.0, min_p=0.0, repetition_penalty=1.0,
        max_new_tokens=new_tokens, stop=[], seed=0,
    )  # fmt: skip


def _no_eos(model: LoadedModel) -> LoadedModel:
    """The same model with end-of-text ignored, so runs make a fixed number of tokens."""
    return dataclasses.replace(model, eos_token_ids=frozenset())


def _run_once(model: LoadedModel, ids: list[int], new_tokens: int) -> DoneEvent:
    from moechat.runtime.events import DoneEvent
    from moechat.runtime.generator import generate

    model.decoder.reset()
    done = None
    for event in generate(model, ids, greedy_params(new_tokens)):
        if isinstance(event, DoneEvent):
            done = event
    assert done is not None
    return done


@dataclass
class Generation:
    """Medians over the runs of :func:`measure_generation`, the runs, the last ids."""

    prefill_tokens_per_s: float
    ttft_ms: float
    decode_tokens_per_s: float
    runs: list[Run]
    token_ids: list[int]


def measure_generation(
    model: LoadedModel, ids: list[int], new_tokens: int, repeat: int
) -> Generation:
    """Median prefill/TTFT/decode over ``repeat`` runs after one short warm-up run."""
    model = _no_eos(model)
    _run_once(model, ids[: min(16, len(ids))], 2)  # first-run allocations, thread start
    runs: list[Run] = []
    token_ids: list[int] = []
    for _ in range(repeat):
        done = _run_once(model, ids, new_tokens)
        s = done.stats
        runs.append(Run(
            prefill_tokens_per_s=round(s.prefill_tokens_per_s, 2),
            ttft_ms=round(s.ttft_ms, 3),
            decode_tokens_per_s=round(s.decode_tokens_per_s, 2),
            new_tokens=s.new_tokens,
        ))  # fmt: skip
        token_ids = done.token_ids
    model.decoder.reset()
    return Generation(
        prefill_tokens_per_s=round(_median([r.prefill_tokens_per_s for r in runs]), 2),
        ttft_ms=round(_median([r.ttft_ms for r in runs]), 3),
        decode_tokens_per_s=round(_median([r.decode_tokens_per_s for r in runs]), 2),
        runs=runs,
        token_ids=token_ids,
    )


def _chat_fits(model: LoadedModel, turns: int, message_tokens: int, reply_tokens: int) -> bool:
    # The template's own tokens for `turns` exchanges (empty texts), plus the texts.
    msgs = [{"role": r, "content": ""} for _ in range(turns) for r in ("user", "assistant")]
    overhead = len(model.template.render_ids(msgs, add_generation_prompt=False))
    budget = model.max_context - max(64, model.max_context // 8)  # ChatSession's reply room
    return overhead + turns * (message_tokens + reply_tokens) <= budget


def measure_chat(
    model: LoadedModel, turns: int, message_tokens: int, reply_tokens: int, repeat: int
) -> ChatReport | ChatSkipped:
    """Time to first token of turn ``turns`` vs turn 1 in one ChatSession (cache reuse).

    Message and reply sizes are halved until the conversation fits the context without
    dropping turns; the sizes used are reported.
    """
    from moechat.runtime.chat import ChatSession
    from moechat.runtime.events import DoneEvent

    while not _chat_fits(model, turns, message_tokens, reply_tokens):
        if message_tokens <= 4 and reply_tokens <= 4:
            return ChatSkipped(
                f"a context of {model.max_context} tokens cannot hold {turns} turns", turns
            )
        message_tokens, reply_tokens = max(4, message_tokens // 2), max(4, reply_tokens // 2)
    model = _no_eos(model)
    params = greedy_params(reply_tokens)
    tok = model.tokenizer
    messages = [message_text(tok, message_tokens, t) for t in range(turns)]
    lengths = [len(tok.encode_text(m)) for m in messages]
    per_turn: list[list[float]] = [[] for _ in range(turns)]
    fed: list[int] = [0] * turns
    cached_before_last = 0
    for rep in range(repeat + 1):  # the first conversation warms up
        model.decoder.reset()
        session = ChatSession(model)
        ttfts = []
        for t, text in enumerate(messages):
            cached_before_last = session.context_used
            done = None
            for event in session.send(text, params):
                if isinstance(event, DoneEvent):
                    done = event
            assert done is not None
            if done.dropped_turns:
                raise MoechatError("chat benchmark dropped turns (context too small)")
            ttfts.append(done.stats.ttft_ms)
            fed[t] = done.stats.prompt_tokens
        if rep > 0:
            for t, v in enumerate(ttfts):
                per_turn[t].append(v)
    model.decoder.reset()
    first, last = _median(per_turn[0]), _median(per_turn[-1])
    ratio = last / first if first > 0 else 0.0
    return ChatReport(
        turns=turns,
        message_tokens=[min(lengths), max(lengths)],
        reply_tokens=reply_tokens,
        ttft_ms_per_turn=[round(_median(v), 3) for v in per_turn],
        prefill_tokens_per_turn=fed,
        ttft_ms_first=round(first, 3),
        ttft_ms_last=round(last, 3),
        context_at_last_turn=cached_before_last,
        ratio=round(ratio, 3),
        target=CHAT_TTFT_RATIO_TARGET,
        ok=ratio <= CHAT_TTFT_RATIO_TARGET,
    )


OursRun = Callable[[], dict[str, Any]]  # one more moechat run (for --compare's interleaving)
Compare = Callable[[BenchResult, OursRun], dict[str, dict[str, Any]]]


def run_bench(
    path: str | Path, options: BenchOptions, compare: Compare | None = None
) -> BenchResult:
    """Load the package at ``path`` and measure it.

    ``compare(result, ours_run)``, when given, runs after the measurements with
    ``ours_run()`` doing one more moechat run (for interleaving with other engines);
    what it returns is stored as ``result.compare``.
    """
    from moechat.runtime.model import load_model

    options.validate()
    path = Path(path)
    threads = options.threads or os.cpu_count() or 1
    t = time.perf_counter()
    model = load_model(path, options.device, options.max_context, threads)
    load_s = time.perf_counter() - t
    loaded = memory_usage()  # weights in memory before any KV cache grows or run happens
    if options.prompt_tokens + options.new_tokens > model.max_context:
        raise MoechatError(
            f"prompt {options.prompt_tokens} + new {options.new_tokens} tokens exceed the "
            f"context of {model.max_context}"
        )
    ids = prompt_ids(model.tokenizer, options.prompt_tokens)
    gen = measure_generation(model, ids, options.new_tokens, options.repeat)
    chat = (
        measure_chat(
            model, options.turns, options.message_tokens, options.reply_tokens, options.repeat
        )
        if options.turns
        else ChatSkipped("--turns 0")
    )
    mem = memory_usage()
    pkg = package_bytes(path)
    kv = kv_cache_bytes(model)
    budget = pkg + kv + MEMORY_ALLOWANCE_BYTES
    arch, graph = model.package.architecture, model.package.graph
    quant = (graph.get("quantization") or {}).get("method")
    moe = bool(arch.get("use_moe"))
    result = BenchResult(
        model=model.name,
        path=str(path),
        architecture=arch.get("model_type"),
        moe=moe,
        graph=GraphSummary(
            weights=quant or graph.get("dtype", "float32"),
            moe_impl=graph.get("moe_impl") if moe else None,
            attention=graph.get("attention"),
            static_cache=model.decoder.static_cache,
        ),
        provider=model.provider,
        device=options.device,
        threads=threads,
        spinning=os.environ.get("MOECHAT_SPIN") != "0",
        max_context=model.max_context,
        prompt_tokens=len(ids),
        new_tokens=options.new_tokens,
        repeat=options.repeat,
        sampling="greedy, end-of-text ignored",
        load_s=round(load_s, 3),
        prefill_tokens_per_s=gen.prefill_tokens_per_s,
        ttft_ms=gen.ttft_ms,
        decode_tokens_per_s=gen.decode_tokens_per_s,
        runs=gen.runs,
        memory=MemoryReport(
            **mem,
            package_bytes=pkg,
            kv_cache_bytes=kv,
            kv_bytes_per_token=kv_token_bytes(model),
            huge_page_bytes=model.huge_page_bytes,
            allowance_bytes=MEMORY_ALLOWANCE_BYTES,
            budget_bytes=budget,
            ok=mem["peak_rss_bytes"] <= budget,
            load_peak_rss_bytes=loaded["peak_rss_bytes"],
            load_rss_bytes=loaded["rss_bytes"],
        ),
        chat=chat,
        machine=machine_info(),
        prompt_ids=ids,
        token_ids=gen.token_ids,
    )
    if compare is not None:
        fixed = _no_eos(model)

        def ours_run() -> dict[str, Any]:
            s = _run_once(fixed, ids, options.new_tokens)
            return {
                "ttft_ms": s.stats.ttft_ms,
                "prefill_tokens_per_s": s.stats.prefill_tokens_per_s,
                "decode_tokens_per_s": s.stats.decode_tokens_per_s,
                "token_ids": s.token_ids,
            }

        result.compare = compare(result, ours_run)
        model.decoder.reset()
    return result
