"""`moechat eval`: teacher-forced perplexity through the KV cache, and its errors."""

import json
import math

import pytest
import torch

from moechat.app.cli import main
from moechat.runtime.evaluate import teacher_forced_chunks, windows
from moechat.runtime.tokenizer import TextTokenizer

TEXT = (
    "The ferry left the harbour at six. 渡轮六点离开港口。\n"
    "Seeds do not care how busy you are; tomatoes want sun and steady water.\n"
)


def _reference_perplexity(checkpoint, ids, window):
    """Independent: full-sequence PyTorch forward per window (no cache), no runtime code."""
    from moechat.models.loading import load_checkpoint

    model = load_checkpoint(checkpoint).model
    nll, count, start = 0.0, 0, 0
    while True:
        end = min(start + window, len(ids))
        chunk = torch.tensor([ids[start:end]])
        logits, _ = model.step(chunk, model.empty_cache())
        logp = torch.log_softmax(logits[0].double(), dim=-1)
        targets = chunk[0, 1:]
        nll -= float(logp[:-1].gather(1, targets[:, None]).sum())
        count += len(targets)
        if end == len(ids):
            return math.exp(nll / count), count
        start = end - 1


def _run(capsys, *argv):
    rc = main(list(argv))
    out = capsys.readouterr()
    return rc, out.out, out.err


@pytest.mark.parametrize("extra,window", [([], None), (["--chunk", "5"], None),
                                          (["--max-context", "16", "--chunk", "6"], 16)])  # fmt: skip
def test_eval_matches_an_independent_perplexity(
    tmp_path, capsys, tiny_checkpoint, tiny_package, extra, window
):
    text_file = tmp_path / "t.txt"
    text_file.write_text(TEXT, encoding="utf-8")
    ids = TextTokenizer.from_file(tiny_package / "tokenizer.json").encode_text(TEXT)
    assert len(ids) > 40
    rc, out, err = _run(capsys, "eval", str(tiny_package), str(text_file), *extra)
    assert rc == 0, err
    result = json.loads(out)
    assert set(result) == {"perplexity", "tokens", "tokens_per_s"}
    expected, count = _reference_perplexity(tiny_checkpoint, ids, window or len(ids))
    assert result["tokens"] == count == len(ids) - 1
    assert result["perplexity"] == pytest.approx(expected, rel=1e-3)
    assert result["tokens_per_s"] > 0
    assert "tokens" in err and "100%" in err  # the progress bar


def test_windows_cover_every_token_once():
    for n, w, c in [(2, 2, 1), (50, 16, 6), (33, 8, 8), (100, 200, 7), (17, 16, 16)]:
        spans = windows(n, w)
        assert spans[0][0] == 0 and spans[-1][1] == n
        targets = []
        for _, a, _, scored in teacher_forced_chunks(n, w, c):
            targets += list(range(a + 1, a + 1 + scored))
        assert targets == list(range(1, n))


def test_eval_errors_are_one_line(tmp_path, capsys, tiny_package):
    empty = tmp_path / "empty.txt"
    empty.write_text("  \n", encoding="utf-8")
    binary = tmp_path / "binary.txt"
    binary.write_bytes(b"hello \xff\xfe world")
    cases = [
        ([str(tmp_path / "missing.txt")], "text file not found"),
        ([str(empty)], "is empty"),
        ([str(binary)], "is not UTF-8 text (byte 0xff at offset 6)"),
        ([str(empty), "--chunk", "0"], "--chunk must be at least 1"),
    ]
    for args, message in cases:
        rc, out, err = _run(capsys, "eval", str(tiny_package), *args)
        assert rc == 1 and out == ""
        assert err.startswith("moechat: error: ") and message in err, err
        assert err.count("\n") == 1, err
    one_token = tmp_path / "one.txt"
    one_token.write_text("a", encoding="utf-8")
    rc, _, err = _run(capsys, "eval", str(tiny_package), str(one_token))
    assert rc == 1 and "nothing to score" in err and err.count("\n") == 1
    rc, _, err = _run(capsys, "eval", str(tmp_path / "nopkg"), str(one_token))
    assert rc == 1 and "model not found" in err


def test_export_rejects_fp32_only_and_int8_only_combinations(tmp_path, capsys, tiny_checkpoint):
    out = str(tmp_path / "out")
    heldout = tmp_path / "h.txt"
    heldout.write_text("some text", encoding="utf-8")
    cases = [
        (["--int8", "--moe-impl", "contrib"], "--moe-impl contrib is the fp32 MoE op"),
        (["--moe-impl", "qmoe"], "needs --int8"),
        (["--heldout", str(heldout)], "--heldout only applies to --int8"),
        (["--int8-matmuls", "dynamic"], "--int8-matmuls only applies to --int8"),
        (["--int8-block", "32"], "--int8-block only applies to --int8"),
        (["--int8", "--int8-matmuls", "dynamic", "--int8-block", "32"], "not with --int8-matmuls"),
        (["--int8-residual-pass"], "--int8-residual-pass only applies to --int8"),
        (
            ["--int8", "--int8-matmuls", "dynamic", "--int8-residual-pass"],
            "not with --int8-matmuls",
        ),
        (["--int8", "--heldout", str(tmp_path / "nope.txt")], "text file not found"),
    ]
    for extra, message in cases:
        rc, stdout, err = _run(capsys, "export", str(tiny_checkpoint), out, *extra)
        assert rc == 1 and stdout == ""
        assert err.startswith("moechat: error: ") and message in err, err
        assert err.count("\n") == 1, err
    assert not (tmp_path / "out").exists()


def test_int8_dense_package_evaluates_close_to_fp32(tmp_path, capsys):
    from model_factory import TINY_DENSE, make_hf_folder

    ckpt = make_hf_folder(tmp_path / "dense", TINY_DENSE, seed=2)
    rc, out, err = _run(capsys, "export", str(ckpt), str(tmp_path / "pkg"), "--int8")
    assert rc == 0, err
    assert "int8 package" in out and "expert-routing" not in out  # dense: no routers
    manifest = json.loads((tmp_path / "pkg" / "moechat.json").read_text())
    assert manifest["fidelity"]["routing_agreement"] is None
    assert manifest["graph"]["quantization"]["router_nodes"] == []
    assert "block 64" in manifest["graph"]["quantization"]["matmuls"]  # the dense default
    text_file = tmp_path / "t.txt"
    text_file.write_text(TEXT, encoding="utf-8")
    rc, out, err = _run(capsys, "eval", str(tmp_path / "pkg"), str(text_file), "--chunk", "9")
    assert rc == 0, err
    ids = TextTokenizer.from_file(tmp_path / "pkg" / "tokenizer.json").encode_text(TEXT)
    expected, count = _reference_perplexity(ckpt, ids, len(ids))
    result = json.loads(out)
    assert result["tokens"] == count
    assert math.log(result["perplexity"]) == pytest.approx(math.log(expected), rel=0.02)
    rc, out, _ = _run(capsys, "info", str(tmp_path / "pkg"))
    assert rc == 0 and "(int8;" in out
