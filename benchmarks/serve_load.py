"""A bounded load check of ``moechat serve`` (issue 20). Not a test.

    python benchmarks/serve_load.py PACKAGE [--clients 8] [--requests 5] [--max-tokens 32]
                                            [--max-queue 8] [--threads N] [--json]

Starts ``moechat serve PACKAGE`` on a free localhost port in a subprocess, then:

1. load, ``--rounds`` times: ``--clients`` threads each send ``--requests`` chat
   completions one after the other (different prompts, so the shared KV cache is of
   little help); every request must end in 200 or 429 within ``--timeout`` seconds (a
   timeout is a hang);
2. the server's resident memory (Linux ``/proc/PID/status``: VmRSS, and VmHWM, the peak)
   after the model loaded, after a warm-up request and after each load round;
3. prefix reuse: ``--conversations`` two-turn chats, streamed: the time to the first
   content chunk of the first turn (a ~300-token prompt) and of the second (the first
   exchange sent back plus a short question), with ``cached_tokens`` of each;
4. SIGTERM: the server must exit within 30 s.

Prints one line per phase (or ``--json``); exits 1 when a request hung, failed with
another status, or the server did not stop.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

TOPICS = ["rivers", "bread", "comets", "chess", "glaciers", "violins", "bees", "lighthouses"]
LONG_CONTEXT = (
    "Here are my notes from a long walk along the coast. The tide was low, the sand was "
    "firm and the light kept changing as clouds moved in from the west. I passed two old "
    "lighthouses, a closed cafe, a harbour full of small boats and a field of sheep that "
    "watched me without much interest. Near the end the wind picked up and it began to "
    "rain, so I sheltered under a bus stop and wrote these notes. "
)


def post(url: str, body: dict[str, Any], timeout: float) -> tuple[int, dict[str, Any]]:
    req = urllib.request.Request(url, json.dumps(body).encode(), method="POST")
    try:
        with urllib.request.urlopen(req, timeout=timeout) as r:
            return r.status, json.loads(r.read())
    except urllib.error.HTTPError as err:
        return err.code, json.loads(err.read() or b"{}")


def stream_chat(url: str, body: dict[str, Any], timeout: float) -> tuple[float, str, dict]:
    """(seconds to the first content chunk, the text, the usage) of a streamed chat."""
    body = {**body, "stream": True, "stream_options": {"include_usage": True}}
    req = urllib.request.Request(url, json.dumps(body).encode(), method="POST")
    start, first, text, usage = time.perf_counter(), None, [], {}
    with urllib.request.urlopen(req, timeout=timeout) as r:
        for raw in r:
            line = raw.decode().strip()
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            chunk = json.loads(line[6:])
            if chunk.get("usage"):
                usage = chunk["usage"]
            for choice in chunk.get("choices", []):
                piece = choice["delta"].get("content")
                if piece:
                    first = first or time.perf_counter()
                    text.append(piece)
    return ((first or time.perf_counter()) - start), "".join(text), usage


def memory_mb(pid: int) -> dict[str, float]:
    """VmRSS and VmHWM (peak) of a process, in MiB (Linux; empty elsewhere)."""
    try:
        status = Path(f"/proc/{pid}/status").read_text()
    except OSError:
        return {}
    out = {}
    for line in status.splitlines():
        key, _, value = line.partition(":")
        if key in ("VmRSS", "VmHWM"):
            out[key] = int(value.split()[0]) / 1024
    return out


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("package")
    parser.add_argument("--clients", type=int, default=8)
    parser.add_argument("--requests", type=int, default=5, help="per client")
    parser.add_argument("--max-tokens", type=int, default=32)
    parser.add_argument("--max-queue", type=int, default=8)
    parser.add_argument("--rounds", type=int, default=2,
                        help="load rounds; RSS after each (flat after the first: no leak)")  # fmt: skip
    parser.add_argument("--conversations", type=int, default=3)
    parser.add_argument("--paragraphs", type=int, default=3,
                        help="a first turn's prompt: this many copies of a ~90-token paragraph")  # fmt: skip
    parser.add_argument("--threads", type=int)
    parser.add_argument("--timeout", type=float, default=600, help="a request's limit (s)")
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args(argv)

    port = free_port()
    base = f"http://127.0.0.1:{port}"
    cmd = [sys.executable, "-m", "moechat", "serve", args.package, "--port", str(port),
           "--device", "cpu", "--max-queue", str(args.max_queue)]  # fmt: skip
    if args.threads:
        cmd += ["--threads", str(args.threads)]
    log = tempfile.TemporaryFile("w+")  # the server's log (a pipe could fill and block it)
    server = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=log, text=True)
    report: dict[str, Any] = {"command": " ".join(cmd[1:])}
    ok = True
    try:
        start = time.perf_counter()
        while True:
            try:
                with urllib.request.urlopen(base + "/health", timeout=5) as r:
                    if r.status == 200:
                        break
            except (urllib.error.HTTPError, OSError):
                pass
            if server.poll() is not None:
                log.seek(0)
                print(log.read(), file=sys.stderr)
                return 1
            time.sleep(0.1)
        report["ready_s"] = round(time.perf_counter() - start, 2)
        report["rss_loaded_mb"] = memory_mb(server.pid).get("VmRSS")
        url = base + "/v1/chat/completions"
        warm = {"messages": [{"role": "user", "content": "Hello!"}], "max_tokens": 8}
        post(url, warm, args.timeout)
        report["rss_warm_mb"] = memory_mb(server.pid).get("VmRSS")

        # 1. load
        results: list[tuple[int, float]] = []  # (status or -1 for a hang/error, seconds)
        lock = threading.Lock()

        def client(i: int) -> None:
            for j in range(args.requests):
                topic = TOPICS[(i + j) % len(TOPICS)]
                body = {
                    "messages": [{"role": "user", "content": f"Client {i}, question {j}: "
                                  f"tell me three facts about {topic}."}],
                    "max_tokens": args.max_tokens, "temperature": 0.7, "seed": i * 100 + j,
                }  # fmt: skip
                t0 = time.perf_counter()
                try:
                    status, _ = post(url, body, args.timeout)
                except OSError:  # a timeout: the request hung
                    status = -1
                with lock:
                    results.append((status, time.perf_counter() - t0))

        walls, rss_rounds = [], []
        for _ in range(args.rounds):
            t0 = time.perf_counter()
            threads = [threading.Thread(target=client, args=(i,)) for i in range(args.clients)]
            for t in threads:
                t.start()
            for t in threads:
                t.join()
            walls.append(round(time.perf_counter() - t0, 1))
            rss_rounds.append(memory_mb(server.pid).get("VmRSS"))
        statuses = [s for s, _ in results]
        done = [d for s, d in results if s == 200]
        report["load"] = {
            "requests": len(results),
            "ok": statuses.count(200),
            "rate_limited_429": statuses.count(429),
            "hung_or_failed": len(results) - statuses.count(200) - statuses.count(429),
            "rounds": args.rounds,
            "wall_s_per_round": walls,
            "rss_mb_after_each_round": rss_rounds,
            "latency_s_median": round(statistics.median(done), 2) if done else None,
            "latency_s_max": round(max(done), 2) if done else None,
        }
        ok &= report["load"]["hung_or_failed"] == 0
        mem = memory_mb(server.pid)
        report["rss_after_load_mb"], report["rss_peak_mb"] = mem.get("VmRSS"), mem.get("VmHWM")

        # 3. prefix reuse: TTFT of a conversation's second turn against its first
        firsts, seconds, cached = [], [], []
        for k in range(args.conversations):
            messages = [
                {"role": "system", "content": "You are a concise assistant."},
                {
                    "role": "user",
                    "content": f"({k}) {LONG_CONTEXT * args.paragraphs}Summarise my walk.",
                },
            ]
            body = {"messages": messages, "max_tokens": 16, "temperature": 0}
            ttft1, reply, usage1 = stream_chat(url, body, args.timeout)
            messages += [
                {"role": "assistant", "content": reply},
                {"role": "user", "content": "And in five words?"},
            ]
            ttft2, _, usage2 = stream_chat(url, {**body, "messages": messages}, args.timeout)
            firsts.append(ttft1 * 1000)
            seconds.append(ttft2 * 1000)
            cached.append(
                (
                    usage1.get("prompt_tokens"),
                    usage2.get("prompt_tokens"),
                    usage2.get("prompt_tokens_details", {}).get("cached_tokens"),
                )
            )
        report["prefix_reuse"] = {
            "first_turn_ttft_ms_median": round(statistics.median(firsts)),
            "second_turn_ttft_ms_median": round(statistics.median(seconds)),
            "first_turn_ttft_ms": [round(x) for x in firsts],
            "second_turn_ttft_ms": [round(x) for x in seconds],
            "tokens_first_prompt_second_prompt_second_cached": cached,
        }
    finally:
        # 4. a clean stop
        server.send_signal(signal.SIGTERM)
        try:
            server.wait(30)
            report["sigterm_exit"] = server.returncode
        except subprocess.TimeoutExpired:
            server.kill()
            report["sigterm_exit"] = "did not stop in 30 s"
            ok = False
    if args.json:
        print(json.dumps(report, indent=2))
    else:
        for key, value in report.items():
            print(f"{key}: {value}")
    return 0 if ok else 1


if __name__ == "__main__":
    os.environ.setdefault("PYTHONUNBUFFERED", "1")
    raise SystemExit(main())
