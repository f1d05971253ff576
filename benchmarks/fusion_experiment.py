"""Experiment: how much faster a package decodes with fewer, fused kernels.

    python benchmarks/fusion_experiment.py PACKAGE OUTDIR
    moechat bench OUTDIR --compare ...      # then compare with PACKAGE

Writes a copy of an int8 (``MatMulNBits``) package with two graph rewrites that the
exporter could make (see docs/benchmarks.md, "Anchors"):

1. RMSNorm as ``x / Sqrt(mean(x^2) + eps)`` instead of ``x * Reciprocal(Sqrt(...))``:
   onnxruntime's SimplifiedLayerNormFusion only matches the ``Div`` form, so the
   five-op chain (Pow, ReduceMean, Add, Sqrt, Reciprocal + Mul) becomes one
   ``SimplifiedLayerNormalization`` kernel. In the model this is
   ``xf / torch.sqrt(...)`` in ``models.modeling.RMSNorm`` (fp32-exact: the tiny fp32
   package's logits move by 1e-5).
2. ``MatMulNBits`` nodes that read the same input (q/k/v; gate/up) concatenated along N
   into one node followed by a ``Split`` (bit-exact).

SmolLM2-135M: 812 -> ~450 kernel launches per decoded token. Not a test; the output
package's checksums no longer match its manifest (``moechat info --verify`` fails).
"""

from __future__ import annotations

import argparse
import collections
import shutil
import sys
from pathlib import Path

import numpy as np


def rms_norm_as_div(graph) -> int:
    """Mul(x, Reciprocal(Sqrt(v))) -> Div(x, Sqrt(v)); returns how many were rewritten."""
    consumers = collections.defaultdict(list)
    for node in graph.node:
        for name in node.input:
            consumers[name].append(node)
    producer = {out: node for node in graph.node for out in node.output}
    dead = []
    for node in graph.node:
        if node.op_type != "Reciprocal":
            continue
        sqrt = producer.get(node.input[0])
        users = consumers[node.output[0]]
        if sqrt is None or sqrt.op_type != "Sqrt" or len(users) != 1:
            continue
        mul = users[0]
        if mul.op_type != "Mul":
            continue
        other = mul.input[0] if mul.input[1] == node.output[0] else mul.input[1]
        mul.op_type = "Div"
        del mul.input[:]
        mul.input.extend([other, sqrt.output[0]])
        dead.append(node)
    for node in dead:
        graph.node.remove(node)
    return len(dead)


def fuse_shared_input_matmuls(graph) -> int:
    """MatMulNBits nodes with one input and equal K/bits/block -> one node + Split."""
    from onnx import helper, numpy_helper

    inits = {i.name: i for i in graph.initializer}
    groups = collections.defaultdict(list)
    for node in graph.node:
        if node.op_type == "MatMulNBits" and not any(node.input[3:]):
            groups[node.input[0]].append(node)
    fused = 0
    for source, nodes in groups.items():
        if len(nodes) < 2:
            continue
        attrs = [{a.name: helper.get_attribute_value(a) for a in n.attribute} for n in nodes]
        key = {(a["K"], a["bits"], a["block_size"], a.get("accuracy_level", 0)) for a in attrs}
        if len(key) != 1:
            continue
        ns = [a["N"] for a in attrs]
        weights = np.concatenate([numpy_helper.to_array(inits[n.input[1]]) for n in nodes])
        scales = [numpy_helper.to_array(inits[n.input[2]]) for n in nodes]
        flat = scales[0].ndim == 1
        scales = np.concatenate([s.reshape(n, -1) for s, n in zip(scales, ns, strict=True)])
        base = nodes[0].name + "_fused"
        graph.initializer.extend([
            numpy_helper.from_array(weights, base + "_B"),
            numpy_helper.from_array(scales.reshape(-1) if flat else scales, base + "_scales"),
            numpy_helper.from_array(np.array(ns, dtype=np.int64), base + "_split"),
        ])  # fmt: skip
        matmul = helper.make_node(
            "MatMulNBits", [source, base + "_B", base + "_scales"], [base + "_out"],
            name=base, domain="com.microsoft", **{**attrs[0], "N": sum(ns)},
        )  # fmt: skip
        split = helper.make_node(
            "Split", [base + "_out", base + "_split"], [n.output[0] for n in nodes],
            name=base + "_split", axis=-1,
        )  # fmt: skip
        at = min(list(graph.node).index(n) for n in nodes)
        for n in nodes:
            graph.node.remove(n)
        graph.node.insert(at, split)
        graph.node.insert(at, matmul)
        fused += 1
    used = {name for node in graph.node for name in node.input}
    for init in list(graph.initializer):
        if init.name not in used:
            graph.initializer.remove(init)
    return fused


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("package")
    parser.add_argument("outdir")
    args = parser.parse_args(argv)
    import onnx

    src, dst = Path(args.package), Path(args.outdir)
    if dst.exists():
        sys.exit(f"{dst} exists")
    dst.mkdir(parents=True)
    for f in src.iterdir():
        if f.is_file() and not f.name.startswith("model.onnx"):
            shutil.copy(f, dst / f.name)
    model = onnx.load(str(src / "model.onnx"))
    norms = rms_norm_as_div(model.graph)
    groups = fuse_shared_input_matmuls(model.graph)
    onnx.save(
        model, str(dst / "model.onnx"), save_as_external_data=True,
        location="model.onnx.data", size_threshold=1024,
    )  # fmt: skip
    print(f"{dst}: {norms} RMSNorms as Div, {groups} MatMulNBits groups fused")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
