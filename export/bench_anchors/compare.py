"""The parent side of ``moechat bench --compare``: plan, run the workers interleaved
with moechat's own runs, and report speed ratios."""

from __future__ import annotations

import hashlib
import json
import queue
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
from collections.abc import Callable
from pathlib import Path
from typing import IO, Any

from moechat.export.bench_anchors.common import RunResult, Spec, summarise
from moechat.export.bench_anchors.engines import ANCHORS, ENGINES
from moechat.export.bench_anchors.worker import WORKER
from moechat.runtime.bench_result import BenchResult, format_mb, format_number

WORKER_TIMEOUT_S = 3600


def default_cache_dir() -> Path:
    try:
        from platformdirs import user_cache_dir

        return Path(user_cache_dir("moechat")) / "bench"
    except ImportError:
        return Path.home() / ".cache" / "moechat" / "bench"


def _source_key(manifest: dict[str, Any]) -> str:
    """A short key for cached conversions: the recorded source checksums."""
    prov = manifest.get("provenance", {})
    digest = json.dumps(prov.get("source_sha256") or prov.get("source"), sort_keys=True)
    return hashlib.sha256(digest.encode()).hexdigest()[:12]


def _source_name(manifest: dict[str, Any]) -> str:
    src = manifest.get("provenance", {}).get("source") or "source"
    return "".join(c if c.isalnum() or c in "-_." else "_" for c in Path(src).stem)[:60]


def plan(manifest: dict[str, Any]) -> dict[str, str | None]:
    """For each anchor: None when it can run, else why it is skipped."""
    src = manifest.get("provenance", {}).get("source")
    source = Path(src) if src and Path(src).exists() else None
    return {name: engine.skip_reason(manifest, source) for name, engine in ENGINES.items()}


def _call_worker(action: str, anchor: str, spec: Spec, timeout: float) -> dict[str, Any]:
    """Run one worker action to completion (used for ``prepare``)."""
    cmd = [sys.executable, "-m", WORKER, action, anchor]
    try:
        proc = subprocess.run(
            cmd, input=json.dumps(spec), capture_output=True, text=True, timeout=timeout
        )
    except subprocess.TimeoutExpired:
        return {"status": "failed", "reason": f"{action} timed out after {timeout:.0f} s"}
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("{")]
    if proc.returncode == 0 and lines:
        return json.loads(lines[-1])
    return {
        "status": "failed",
        "reason": f"{action} failed: {_last_line(proc.stderr, proc.returncode)}",
    }


def _last_line(text: str | None, returncode: int | None) -> str:
    """The worker's last stderr line, and the signal that killed it (a native crash)."""
    lines = [ln.strip() for ln in (text or "").splitlines() if ln.strip()]
    died = ""
    if returncode is not None and returncode < 0:
        try:
            died = f"killed by {signal.Signals(-returncode).name}"
        except ValueError:
            died = f"killed by signal {-returncode}"
    last = lines[-1][:300] if lines else ""
    return "; ".join(x for x in (died, last) if x) or f"exit status {returncode}"


class _Engine:
    """A long-lived ``serve`` worker: loads the engine once, then one run per request."""

    def __init__(self, anchor: str, spec: Spec) -> None:
        self.anchor = anchor
        self.err: IO[str] = tempfile.TemporaryFile(mode="w+")
        self.proc = subprocess.Popen(
            [sys.executable, "-m", WORKER, "serve", anchor],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=self.err, text=True,
            bufsize=1,
        )  # fmt: skip
        self.lines: queue.Queue[str | None] = queue.Queue()
        threading.Thread(target=self._read, daemon=True).start()
        self._send(json.dumps(spec))

    def _read(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            if line.startswith("{"):
                self.lines.put(line)
        self.lines.put(None)

    def _send(self, line: str) -> None:
        assert self.proc.stdin is not None
        try:
            self.proc.stdin.write(line + "\n")
            self.proc.stdin.flush()
        except (BrokenPipeError, OSError):
            pass  # the worker died: reply() reports it with its last stderr line

    def reply(self, timeout: float) -> dict[str, Any]:
        try:
            line = self.lines.get(timeout=timeout)
        except queue.Empty:
            self.close()
            raise RuntimeError(f"no answer in {timeout:.0f} s") from None
        if line is None:
            self.proc.wait()
            self.err.seek(0)
            raise RuntimeError(_last_line(self.err.read(), self.proc.returncode))
        return json.loads(line)

    def request(self, command: str, timeout: float) -> dict[str, Any]:
        self._send(command)
        return self.reply(timeout)

    def close(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()
        self.err.close()


def _start(anchor: str, spec: Spec) -> tuple[_Engine, dict[str, Any]] | str:
    """A loaded, warmed-up engine and its info, or why loading failed. A worker that
    dies loading is started once more with the anchor's ``fallback_spec`` if it has one
    (llama.cpp: ``n_batch=1``, where its batched kernels crash)."""
    engine = _Engine(anchor, spec)
    try:
        return engine, engine.reply(WORKER_TIMEOUT_S)
    except RuntimeError as err:
        engine.close()
        fallback = getattr(ENGINES[anchor], "fallback_spec", None)
        retry = fallback(spec, str(err)) if fallback else None
        if retry is None:
            return str(err)
        again = _start(anchor, retry)
        return f"{again} (and before, {err})" if isinstance(again, str) else again


def run_compare(
    result: BenchResult,
    manifest: dict[str, Any],
    cache_dir: Path | None = None,
    ours_run: Callable[[], RunResult] | None = None,
    anchors: tuple[str, ...] = ANCHORS,
    progress: Callable[[str], None] | None = None,
) -> dict[str, dict[str, Any]]:
    """Measure every anchor on ``result``'s prompt, interleaved round by round with
    moechat itself (``ours_run()``: one moechat run, a dict like the anchors' runs), so
    that every engine sees the same machine load; add speed ratios vs moechat."""
    cache_dir = Path(cache_dir) if cache_dir else default_cache_dir()
    reasons = plan(manifest)
    spec = {
        "manifest": manifest,
        "package": result.path,
        "prompt_ids": result.prompt_ids,
        "new_tokens": result.new_tokens,
        "threads": result.threads,
        "cache_dir": str(cache_dir / f"{_source_name(manifest)}-{_source_key(manifest)}"),
    }
    out: dict[str, dict[str, Any]] = {}
    engines: dict[str, _Engine] = {}
    info: dict[str, dict[str, Any]] = {}
    for anchor in anchors:
        if reasons.get(anchor):
            out[anchor] = {"status": "skipped", "reason": reasons[anchor]}
            continue
        if progress:
            progress(f"preparing {anchor}")
        prep = _call_worker("prepare", anchor, spec, WORKER_TIMEOUT_S)
        if prep.get("status") == "failed":
            out[anchor] = prep
            continue
        if progress:
            progress(f"loading {anchor}")
        loaded = _start(anchor, {**spec, **prep})
        if isinstance(loaded, str):
            out[anchor] = {"status": "failed", "reason": f"loading failed: {loaded}"}
        else:
            engines[anchor], info[anchor] = loaded
    runs: dict[str, list[RunResult]] = {name: [] for name in ["moechat", *engines]}
    for rnd in range(result.repeat):
        if progress and engines:
            progress(f"round {rnd + 1}/{result.repeat}: moechat, {', '.join(engines)}")
        order = ["moechat", *engines]
        order = order[rnd % len(order) :] + order[: rnd % len(order)]  # rotate positions
        for name in order:
            if name == "moechat":
                if ours_run is not None:
                    runs[name].append(ours_run())
                continue
            if name not in engines:
                continue
            try:
                runs[name].append(engines[name].request("run", WORKER_TIMEOUT_S))
            except RuntimeError as err:
                out[name] = {"status": "failed", "reason": f"run failed: {err}"}
                engines.pop(name).close()
    prompt_tokens = len(result.prompt_ids)
    if runs["moechat"]:
        ours = summarise(runs["moechat"], prompt_tokens)
        ours["prefill_tokens_per_s"] = round(
            float(statistics.median(r["prefill_tokens_per_s"] for r in runs["moechat"])), 2
        )
    else:
        ours = {
            "ttft_ms": result.ttft_ms,
            "prefill_tokens_per_s": result.prefill_tokens_per_s,
            "decode_tokens_per_s": result.decode_tokens_per_s,
            "token_ids": result.token_ids,
        }
    ours["peak_rss_bytes"] = result.memory.peak_rss_bytes
    for name, engine in engines.items():
        try:
            final = engine.request("quit", 120)
        except RuntimeError:
            final = {}
        engine.close()
        res = {**info[name], **summarise(runs[name], prompt_tokens), **final}
        out[name] = {**res, **_ratios(ours, res, runs["moechat"], runs[name])}
    return {"moechat": {**ours, "status": "ok", "interleaved": bool(runs["moechat"])}, **out}


def _ratios(
    ours: dict[str, Any],
    theirs: dict[str, Any],
    ours_runs: list[RunResult] | tuple[()] = (),
    their_runs: list[RunResult] | tuple[()] = (),
) -> dict[str, Any]:
    """moechat's speed divided by the anchor's (> 1: moechat is faster): the ratio of
    the medians, and the median of the per-round ratios (``_paired``: each round runs
    the engines back to back, so this one follows a machine whose load changes)."""

    def ratio(key: str, invert: bool = False) -> float | None:
        a, b = ours.get(key), theirs.get(key)
        if not a or not b:
            return None
        return round(b / a if invert else a / b, 3)

    match = 0
    for x, y in zip(ours.get("token_ids", []), theirs.get("token_ids", []), strict=False):
        if x != y:
            break
        match += 1
    pairs = [
        a["decode_tokens_per_s"] / b["decode_tokens_per_s"]
        for a, b in zip(ours_runs, their_runs, strict=False)
        if a.get("decode_tokens_per_s") and b.get("decode_tokens_per_s")
    ]
    return {
        "moechat_decode_speedup_paired": round(float(statistics.median(pairs)), 3)
        if pairs
        else None,
        "moechat_decode_speedup": ratio("decode_tokens_per_s"),
        "moechat_prefill_speedup": ratio("prefill_tokens_per_s"),
        "moechat_ttft_speedup": ratio("ttft_ms", invert=True),
        "greedy_tokens_agreeing": match,
    }


def format_compare(result: BenchResult) -> str:
    """The comparison table under ``moechat bench --compare``'s report."""
    compare = result.compare or {}
    rows = [
        f"compare: same prompt ids ({result.prompt_tokens} tokens), {result.new_tokens} "
        f"greedy tokens, {result.threads} threads, engines interleaved over "
        f"{result.repeat} rounds (medians); speed-up = moechat / engine",
        "",
        "| engine | weights | prefill tok/s | TTFT ms | decode tok/s | peak RSS | "
        "moechat decode speed-up (per round) | greedy tokens agreeing |",
        "|---|---|---|---|---|---|---|---|",
    ]
    notes = []
    ours = compare.get("moechat") or {
        "prefill_tokens_per_s": result.prefill_tokens_per_s,
        "ttft_ms": result.ttft_ms,
        "decode_tokens_per_s": result.decode_tokens_per_s,
    }
    rows.append(
        f"| moechat {result.provider} | {result.graph.weights} package | "
        f"{format_number(ours['prefill_tokens_per_s'])} | {format_number(ours['ttft_ms'])} | "
        f"{format_number(ours['decode_tokens_per_s'])} | "
        f"{format_mb(result.memory.peak_rss_bytes)} | 1.00x | - |"
    )
    for name, r in compare.items():
        if name == "moechat":
            continue
        if r.get("status") != "ok":
            notes.append(f"{name}: {r.get('status')}: {r.get('reason')}")
            continue
        if r.get("build"):  # llama.cpp: which build, how it was run
            missing = r["build"].get("cpu_features_not_built") or []
            native = "native" if r["build"].get("native") else f"not built for {', '.join(missing)}"
            extra = f"; {r['fallback']}" if r.get("fallback") else ""
            notes.append(f"{name}: {native} build, n_batch {r.get('n_batch')}{extra}")
        speed, paired = r.get("moechat_decode_speedup"), r.get("moechat_decode_speedup_paired")
        rows.append(
            f"| {name} {r.get('version', '')} | {r.get('weights', '')} | "
            f"{format_number(r.get('prefill_tokens_per_s'))} | {format_number(r.get('ttft_ms'))} | "
            f"{format_number(r.get('decode_tokens_per_s'))} | {format_mb(r.get('peak_rss_bytes'))} | "
            f"{'-' if speed is None else f'{speed:.2f}x'}"
            f"{'' if paired is None else f' ({paired:.2f}x)'} | "
            f"{r.get('greedy_tokens_agreeing', '-')}/{result.new_tokens} |"
        )
    return "\n".join(rows + ([""] + notes if notes else []))
