"""The worker process of one anchor: ``prepare`` converts, ``serve`` loads and runs.

    python -m moechat.export.bench_anchors.worker prepare|serve ANCHOR

Line protocol of ``serve`` on stdin/stdout: a JSON spec, then ``run`` (one timed
generation) or ``quit`` (peak RSS); every answer is one JSON line.
"""

from __future__ import annotations

import json
import sys

from moechat.export.bench_anchors.engines import ENGINES
from moechat.runtime.bench import memory_usage

WORKER = "moechat.export.bench_anchors.worker"


def serve(anchor: str) -> int:
    spec = json.loads(sys.stdin.readline())
    run, info = ENGINES[anchor].load(spec)
    run(2)  # warm-up: first-run allocations, thread start
    print(json.dumps({"status": "ready", **info}), flush=True)
    for line in sys.stdin:
        command = line.strip()
        if command == "run":
            print(json.dumps(run(spec["new_tokens"])), flush=True)
        elif command == "quit":
            break
    print(json.dumps({"peak_rss_bytes": memory_usage()["peak_rss_bytes"]}), flush=True)
    return 0


def main(argv: list[str]) -> int:
    if len(argv) == 2 and argv[0] == "prepare" and argv[1] in ENGINES:
        spec = json.loads(sys.stdin.read())
        print(json.dumps(ENGINES[argv[1]].prepare(spec)))  # errors: traceback, exit 1
        return 0
    if len(argv) == 2 and argv[0] == "serve" and argv[1] in ENGINES:
        return serve(argv[1])
    print(f"usage: python -m {WORKER} prepare|serve ANCHOR", file=sys.stderr)
    return 2


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
