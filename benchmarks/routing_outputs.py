"""What the router-logit graph outputs cost on decode, side by side in one process.

    python benchmarks/routing_outputs.py PACKAGE [--context 128] [--steps 32] [--rounds 7]

Three sessions of the same package graph and weights, CPU, static IO-bound cache:
  none       the graph without router outputs (as packages were before; for a package
             that has them, they are removed from a copy of the graph, in memory)
  declared   router outputs declared, not fetched (Decoder.forward: every reply while
             the chat's routing view is off)
  fetched    router outputs fetched every step (Decoder.forward_routed, plus choosing
             the experts in numpy: what the routing view and `experts stats` do)
Each round prefills ``--context`` tokens and times ``--steps`` decode steps on every
variant in turn (order rotated per round); the median step time per variant is printed,
with the load average, and the median process CPU time per step (with --threads 1
all of onnxruntime's work runs on this thread, so it is the step's work, less
sensitive than wall time to other load on the machine). Needs the export extra (onnx) to edit graphs. Not a test.
"""

from __future__ import annotations

import argparse
import os
import statistics
import time

import numpy as np


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("package")
    parser.add_argument("--context", type=int, default=128)
    parser.add_argument("--steps", type=int, default=32)
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--threads", type=int, default=os.cpu_count())
    args = parser.parse_args(argv)

    import onnx

    from moechat.export.routing_outputs import routed_graph
    from moechat.runtime.decoder import Decoder
    from moechat.runtime.package import load_package
    from moechat.runtime.providers import create_session
    from moechat.runtime.routing import OUTPUT_PREFIX, package_routing

    package = load_package(args.package)
    arch = package.architecture
    path = package.graph_path(None)
    proto = onnx.load(str(path), load_external_data=False)
    kept = [o for o in proto.graph.output if not o.name.startswith(OUTPUT_PREFIX)]
    del proto.graph.output[:]
    proto.graph.output.extend(kept)
    plain = proto.SerializeToString()
    section = package.spec.raw.get("routing")
    declared = path.read_bytes() if section else None
    if section is None:  # a package from before routing outputs: add them in memory
        graph = routed_graph(path, arch)
        declared, section = graph.graph, graph.section
    routing = package_routing(arch, section, str(package.path))
    assert routing is not None

    spec = package.spec.architecture

    def decoder(graph: bytes, outputs: list[str]) -> Decoder:
        session = create_session(path, "CPUExecutionProvider", args.threads, graph)
        return Decoder(
            session, num_layers=spec.num_hidden_layers, kv_heads=spec.num_key_value_heads,
            head_dim=spec.head_dim, max_context=args.context + args.steps + 8,
            static_cache=True, value_head_dim=spec.value_dim,
            present_new_only=package.spec.graph.kv_present == "new", routing_outputs=outputs,
        )  # fmt: skip

    variants = {
        "none": decoder(plain, []),
        "declared": decoder(declared, routing.outputs),
        "fetched": decoder(declared, routing.outputs),
    }
    rng = np.random.default_rng(0)
    prompt = rng.integers(3, arch["vocab_size"], size=args.context).tolist()
    steps = rng.integers(3, arch["vocab_size"], size=args.steps).tolist()
    times: dict[str, list[float]] = {name: [] for name in variants}
    cpu: dict[str, list[float]] = {name: [] for name in variants}
    names = list(variants)
    for r in range(args.rounds + 1):
        for name in names[r % 3 :] + names[: r % 3]:
            d = variants[name]
            d.reset()
            d.forward(prompt)
            start, start_cpu = time.perf_counter(), time.process_time()
            for token in steps:
                if name == "fetched":
                    _, logits = d.forward_routed([token])
                    for i, x in enumerate(logits):
                        routing.route_layer(i, x)
                else:
                    d.forward([token])
            if r:  # the first round warms up
                times[name].append((time.perf_counter() - start) / args.steps * 1000)
                cpu[name].append((time.process_time() - start_cpu) / args.steps * 1000)
    load = os.getloadavg()
    print(f"{package.name}: {len(routing.layers)} MoE layers, context {args.context}, "
          f"{args.steps} steps x {args.rounds} rounds, {args.threads} threads, "
          f"load average {load[0]:.2f} {load[1]:.2f} {load[2]:.2f}")  # fmt: skip
    base = statistics.median(times["none"])
    base_cpu = statistics.median(cpu["none"])
    for name, values in times.items():
        median, median_cpu = statistics.median(values), statistics.median(cpu[name])
        print(f"  {name:9} wall {median:7.2f} ms/step ({median / base - 1:+.1%} vs none; "
              f"min {min(values):.2f})  process CPU {median_cpu:7.2f} ms/step "
              f"({median_cpu / base_cpu - 1:+.1%})")  # fmt: skip
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
