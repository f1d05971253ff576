"""`moechat experts stats`: exact traces on a model whose routers are set by hand, counts
that sum to tokens x k, the heat map, and one-line errors."""

from __future__ import annotations

import csv
import json
import shutil
import sys

import numpy as np
import onnx
from routing_factory import RIGGED, expected_routing

from moechat.app.cli import main
from moechat.runtime.tokenizer import TextTokenizer

TEXT = "The quick brown fox jumps over the lazy dog. 你好，世界！ def add(a, b): return a + b\n" * 3


def _text(tmp_path):
    path = tmp_path / "text.txt"
    path.write_text(TEXT, encoding="utf-8")
    return path


def test_trace_is_exact_on_hand_set_routers(rigged_package, tmp_path, capsys):
    text = _text(tmp_path)
    ids = TextTokenizer.from_file(rigged_package / "tokenizer.json").encode_text(TEXT)
    trace = tmp_path / "trace.csv"
    # small chunks and a small context: several windows, each token routed once
    args = ["experts", "stats", str(rigged_package), str(text), "--trace", str(trace)]
    assert main([*args, "--chunk", "7", "--max-context", "32", "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    k, layers = RIGGED.num_experts_per_tok, RIGGED.num_hidden_layers
    assert out["tokens"] == len(ids) and out["top_k"] == k
    assert out["trace"]["rows"] == len(ids) * layers * k
    with trace.open(encoding="utf-8", newline="") as f:
        rows = list(csv.DictReader(f))
    assert len(rows) == len(ids) * layers * k
    for row in rows:
        position, layer, rank = int(row["position"]), int(row["layer"]), int(row["rank"])
        assert int(row["token_id"]) == ids[position]
        expert, weight = expected_routing(ids[position], layer)[rank]
        assert int(row["expert"]) == expert, row
        assert abs(float(row["weight"]) - weight) < 1e-5, row
    assert rows[0]["token"] == "The"
    for stats in out["layers"]:
        layer = stats["layer"]
        assert sum(stats["counts"]) == len(ids) * k
        want = np.bincount(
            [e for t in ids for e, _ in expected_routing(t, layer)],
            minlength=RIGGED.n_routed_experts,
        )
        assert stats["counts"] == want.tolist()
        if layer:  # the rigged layers never pick the same pair for a token
            assert stats["same_as_previous"] == 0.0
    # JSONL carries the same rows
    jsonl = tmp_path / "trace.jsonl"
    assert main(["experts", "stats", str(rigged_package), str(text), "--trace", str(jsonl)]) == 0
    lines = [json.loads(line) for line in jsonl.read_text(encoding="utf-8").splitlines()]
    assert [(r["position"], r["layer"], r["rank"], r["expert"]) for r in lines] == [
        (int(r["position"]), int(r["layer"]), int(r["rank"]), int(r["expert"])) for r in rows
    ]


def test_heat_map_is_the_default_output(rigged_package, tmp_path, capsys):
    assert main(["experts", "stats", str(rigged_package), str(_text(tmp_path))]) == 0
    out = capsys.readouterr().out
    assert "top-2 of 4 routed experts in 3 layers" in out
    rows = [line for line in out.splitlines() if line[:6].strip().isdigit()]
    assert [int(r[:6]) for r in rows] == [0, 1, 2]
    for row in rows:  # 4 experts: a shade and the share in percent, 5 columns each
        cells = [row[7 + 5 * i : 12 + 5 * i] for i in range(4)]
        assert all(c[1] in " ░▒▓█" and c[2:].strip().isdigit() for c in cells), row
        assert abs(sum(int(c[2:]) for c in cells) - 100) <= 2


def test_heat_map_shades_and_width():
    from moechat.app.experts_stats import heat_map
    from moechat.runtime.routing_stats import LayerStats

    counts = [0, 1, 4, 8, 16] + [8] * 59  # 64 experts
    stats = [LayerStats(5, counts, [None] * 64, 1.0, 0.9, None, [])]
    lines = heat_map(stats, 64, 2)
    assert lines[-1].startswith("     5 ")
    row = lines[-1][7 : 7 + 64]  # an even share is 501 / 64 = 7.8 selections
    assert row[:5] == " ░▒▓█" and set(row[5:]) == {"▓"}
    assert lines[1].split() == [str(d) for d in range(7)]


def test_old_packages_and_errors(rigged_package, tmp_path, capsys, monkeypatch):
    text = _text(tmp_path)
    dense = tmp_path / "dense"  # the same graph said to be dense: no experts to look at
    shutil.copytree(rigged_package, dense)
    manifest = json.loads((dense / "moechat.json").read_text())
    manifest["architecture"]["use_moe"] = False
    del manifest["routing"]
    (dense / "moechat.json").write_text(json.dumps(manifest))
    assert main(["experts", "stats", str(rigged_package), str(text), "--trace", "x.txt"]) != 0
    assert "must end in .csv or .jsonl" in capsys.readouterr().err
    assert main(["experts", "stats", str(dense), str(text)]) != 0
    assert "dense model: it has no experts" in capsys.readouterr().err
    old = tmp_path / "old"
    shutil.copytree(rigged_package, old)
    manifest = json.loads((old / "moechat.json").read_text())
    del manifest["routing"]  # a package exported before routing left the graph
    (old / "moechat.json").write_text(json.dumps(manifest))
    graph = onnx.load(str(old / "model.onnx"), load_external_data=False)
    kept = [o for o in graph.graph.output if not o.name.startswith("router_logits.")]
    del graph.graph.output[:]
    graph.graph.output.extend(kept)
    onnx.save(graph, str(old / "model.onnx"))
    # where onnx is installed the outputs are added in memory, with a note
    assert main(["experts", "stats", str(old), str(text), "--json"]) == 0
    captured = capsys.readouterr()
    assert "predates routing outputs; they were added in memory" in captured.err
    assert (
        json.loads(captured.out)["layers"]
        == json.loads(_stats_json(rigged_package, text, capsys))["layers"]
    )
    # without onnx (the single binary): one line saying to re-export
    monkeypatch.setitem(sys.modules, "moechat.export.routing_outputs", None)
    assert main(["experts", "stats", str(old), str(text)]) != 0
    err = capsys.readouterr().err.strip()
    assert "re-export it with `moechat export`" in err and "\n" not in err


def _stats_json(package, text, capsys) -> str:
    assert main(["experts", "stats", str(package), str(text), "--json"]) == 0
    return capsys.readouterr().out
