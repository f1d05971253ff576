"""Per-step decode time through ``Decoder.forward`` (plus a greedy argmax, as generation
does) against a bare ``run_with_iobinding`` on the same session with only the attention
mask rebound: the cost of the runtime's Python step (docs/benchmarks.md). Not a test.

    python benchmarks/step_overhead.py PACKAGE [--rounds 8] [--steps 96]
"""

from __future__ import annotations

import argparse
import statistics
import time

import numpy as np

from moechat.runtime.bench import prompt_ids
from moechat.runtime.model import load_model


def through_decoder(model, prompt: list[int], steps: int) -> float:
    """Seconds per step of ``Decoder.forward([token])`` + argmax after a prompt."""
    decoder = model.decoder
    decoder.reset()
    decoder.forward(prompt)
    token = 5
    start = time.perf_counter()
    for _ in range(steps):
        token = int(np.argmax(decoder.forward([token])[-1]))
    return (time.perf_counter() - start) / steps


def bare_graph(model, prompt: list[int], steps: int) -> float:
    """Seconds per step of the graph alone: inputs bound once, the mask rebound per step."""
    decoder = model.decoder
    decoder.reset()
    decoder.forward(prompt)
    binding = decoder._binding
    _, logits = decoder._last_logits
    binding.bind_cpu_input("input_ids", np.array([[5]], np.int64))
    binding.bind_cpu_input("logits_positions", np.array([0], np.int64))
    binding.bind_ortvalue_output("logits", logits)
    mask = np.ones((1, len(prompt) + steps), np.int64)
    start = time.perf_counter()
    for i in range(steps):
        binding.bind_cpu_input("attention_mask", mask[:, : len(prompt) + 1 + i])
        decoder.session.run_with_iobinding(binding)
    return (time.perf_counter() - start) / steps


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("package")
    parser.add_argument("--rounds", type=int, default=8)
    parser.add_argument("--steps", type=int, default=96)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    model = load_model(args.package, "cpu", None, args.threads)
    prompt = prompt_ids(model.tokenizer, 256)
    through_decoder(model, prompt, 16)  # warm-up
    bare_graph(model, prompt, 16)
    full, bare = [], []
    for _ in range(args.rounds):  # alternating, so both see the same machine load
        full.append(through_decoder(model, prompt, args.steps))
        bare.append(bare_graph(model, prompt, args.steps))
    f, b = statistics.median(full), statistics.median(bare)
    print(
        f"Decoder.forward + argmax {f * 1e3:.3f} ms/step, bare graph {b * 1e3:.3f} ms/step: "
        f"{(f / b - 1) * 100:.1f}% overhead ({(f - b) * 1e6:.0f} us)"
    )


if __name__ == "__main__":
    main()
