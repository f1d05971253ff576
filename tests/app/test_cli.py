"""The one-shot CLI: output formats, stdin, and one-line errors for bad input."""

import itertools
import json
import shutil
import subprocess
import sys

import pytest

from moechat.app.cli import _apply_model_flag, build_parser, cmd_run, main, parse_args


def _err(capsys):
    err = capsys.readouterr().err.strip()
    assert "Traceback" not in err
    errors = [line for line in err.splitlines() if not line.startswith("[")]  # not progress
    assert len(errors) == 1 and errors[0].startswith("moechat: error: "), err
    return errors[0]


def test_run_json(tiny_package, capsys):
    assert main(["run", str(tiny_package), "hello", "--greedy", "-n", "6", "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert set(out) >= {
        "text",
        "token_ids",
        "prompt_tokens",
        "ttft_ms",
        "decode_tokens_per_s",
        "provider",
    }
    assert len(out["token_ids"]) == 6 and out["provider"] == "CPUExecutionProvider"


def test_run_reads_stdin_and_raw(tiny_package):
    cmd = [
        sys.executable,
        "-m",
        "moechat",
        "run",
        str(tiny_package),
        "-",
        "--raw",
        "--greedy",
        "-n",
        "4",
        "--json",
    ]
    res = subprocess.run(cmd, input="<|im_start|>user", capture_output=True, text=True, check=True)
    out = json.loads(res.stdout)
    # Raw mode tokenizes the text as data: the special token text is not a control token.
    assert out["prompt_tokens"] > 1


def test_info(tiny_package, capsys):
    assert main(["info", str(tiny_package), "--verify"]) == 0
    out = capsys.readouterr().out
    assert "MoE: 4 routed experts" in out and "1 shared" in out and "checksums     ok" in out


def test_missing_package(tmp_path, capsys):
    assert main(["run", str(tmp_path / "nope"), "hi"]) == 1
    assert "model not found" in _err(capsys)


def test_corrupt_manifest(tiny_package, tmp_path, capsys):
    pkg = tmp_path / "pkg"
    shutil.copytree(tiny_package, pkg)
    (pkg / "moechat.json").write_text("{not json")
    assert main(["run", str(pkg), "hi"]) == 1
    assert "corrupt" in _err(capsys)


def test_corrupt_graph(tiny_package, tmp_path, capsys):
    pkg = tmp_path / "pkg"
    shutil.copytree(tiny_package, pkg)
    (pkg / "model.onnx").write_bytes(b"garbage")
    assert main(["run", str(pkg), "hi"]) == 1
    assert "cannot load model.onnx" in _err(capsys)
    assert main(["info", str(pkg), "--verify"]) == 1
    assert "checksum" in _err(capsys)


def test_unsupported_architecture(tiny_package, tmp_path, capsys):
    pkg = tmp_path / "pkg"
    shutil.copytree(tiny_package, pkg)
    manifest = json.loads((pkg / "moechat.json").read_text())
    manifest["architecture"]["model_type"] = "mamba"
    (pkg / "moechat.json").write_text(json.dumps(manifest))
    assert main(["run", str(pkg), "hi"]) == 1
    assert "unsupported architecture" in _err(capsys)


def test_tokenizer_that_does_not_fit(tiny_package, tmp_path, capsys, minimind_tokenizer_dir):
    pkg = tmp_path / "pkg"
    shutil.copytree(tiny_package, pkg)
    shutil.copy(minimind_tokenizer_dir / "tokenizer.json", pkg / "tokenizer.json")
    assert main(["run", str(pkg), "hi"]) == 1
    assert "does not fit" in _err(capsys)


def test_prompt_longer_than_context(tiny_package, capsys):
    assert main(["run", str(tiny_package), "word " * 600, "--max-context", "64"]) == 1
    assert "context" in _err(capsys)


@pytest.mark.parametrize(
    "argv,message",
    [
        (["--temperature", "9"], "temperature"),
        (["--top-p", "0"], "top_p"),
        (["--device", "tpu"], "unknown device"),
        (["--device", "dml"], "not available"),
    ],
)
def test_bad_options(tiny_package, capsys, argv, message):
    assert main(["run", str(tiny_package), "hi", *argv]) == 1
    assert message in _err(capsys)


def test_export_errors(tmp_path, tiny_checkpoint, capsys):
    assert main(["export", str(tmp_path / "missing"), str(tmp_path / "out")]) == 1
    assert "not found" in _err(capsys)
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "keep.txt").write_text("user data")
    assert main(["export", str(tiny_checkpoint), str(tmp_path / "out")]) == 1
    assert "--force" in _err(capsys)
    assert (tmp_path / "out" / "keep.txt").read_text() == "user data"
    src = tmp_path / "notok"
    shutil.copytree(tiny_checkpoint, src)
    (src / "tokenizer.json").unlink()
    assert main(["export", str(src), str(tmp_path / "out2")]) == 1
    assert "tokenizer" in _err(capsys)
    assert not (tmp_path / "out2").exists()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".out2")]


def test_run_with_only_a_prompt_uses_the_default_model(tiny_package, capsys, monkeypatch):
    monkeypatch.setenv("MOECHAT_MODEL_DIR", str(tiny_package))
    args = ["--temperature", "0", "--max-new-tokens", "3", "--json"]
    assert main(["run", "hello there", *args]) == 0
    assert json.loads(capsys.readouterr().out)["prompt_tokens"] > 2
    # something that looks like a path stays a model path, and fails loudly when missing
    assert main(["run", "no/such/package", *args]) != 0
    assert "no/such/package" in _err(capsys)


RUN_PIECES = {
    "model": ["PKG"],
    "prompt": ["Tell me a story"],
    "n": ["-n", "8"],
    "greedy": ["--greedy"],
}


@pytest.mark.parametrize(
    "order",
    [o for o in itertools.permutations(RUN_PIECES) if o.index("model") < o.index("prompt")],
)
def test_run_options_and_positionals_in_any_order(order):
    argv = ["run"] + [word for key in order for word in RUN_PIECES[key]]
    args = parse_args(build_parser(), argv)
    assert (args.command, args.model, args.prompt) == ("run", "PKG", "Tell me a story")
    assert args.max_new_tokens == 8 and args.greedy and args.func is cmd_run


@pytest.mark.parametrize(
    "argv",
    [
        ["--model", "PKG", "run", "-n", "8", "Tell me a story"],
        ["run", "--model", "PKG", "Tell me a story", "-n", "8"],
        ["run", "-n", "8", "--model=PKG", "Tell me a story"],
    ],
)
def test_run_model_flag_in_any_order(argv):
    parser = build_parser()
    args = parse_args(parser, argv)
    _apply_model_flag(parser, args)
    assert (args.model, args.prompt, args.max_new_tokens) == ("PKG", "Tell me a story", 8)


@pytest.mark.parametrize(
    "argv,command,model",
    [
        (["demo", "build", "--yes"], "demo", None),
        (["demo", "build", "-y", "--force"], "demo", None),
        (["--yes"], "chat", None),
        (["-y", "PKG"], "chat", "PKG"),
        (["chat", "--yes", "PKG"], "chat", "PKG"),
        (["chat", "PKG", "--device", "cpu", "--yes"], "chat", "PKG"),
        (["info", "--json", "PKG"], "info", "PKG"),
        (["bench", "--new-tokens", "4", "PKG", "--yes"], "bench", "PKG"),
    ],
)
def test_other_commands_accept_any_order(argv, command, model):
    args = parse_args(build_parser(), argv)
    assert args.command == command and getattr(args, "model", None) == model
    if "--yes" in argv or "-y" in argv:
        assert args.yes


def test_run_with_options_between_the_positionals_really_runs(tiny_package, capsys):
    argv = ["run", str(tiny_package), "-n", "5", "--json", "hello", "--greedy"]
    assert main(argv) == 0
    out = json.loads(capsys.readouterr().out)
    assert len(out["token_ids"]) == 5


def test_help_lists_yes_and_a_missing_command_is_one_error(capsys):
    with pytest.raises(SystemExit) as exit_:
        main(["--help"])
    assert exit_.value.code == 0
    assert "--yes" in capsys.readouterr().out
    with pytest.raises(SystemExit) as exit_:
        main(["demo"])
    assert exit_.value.code == 2
    assert "Traceback" not in capsys.readouterr().err


def test_info_is_readable_and_a_removed_source_is_not_shown_as_real(tiny_package, tmp_path, capsys):
    pkg = tmp_path / "pkg"
    shutil.copytree(tiny_package, pkg)
    manifest = json.loads((pkg / "moechat.json").read_text())
    manifest["provenance"]["source"] = str(tmp_path / "tmpbuild-gone")
    manifest["demo"] = {
        "source": {"model": "Org/Tiny-1M (GGUF)", "pypi": "tiny==1", "license": "MIT"},
        "perplexity": {"moe": 21.72, "dense": 19.35, "ratio": 1.1225, "limit_ratio": 1.15},
    }
    (pkg / "moechat.json").write_text(json.dumps(manifest))
    assert main(["info", str(pkg)]) == 0
    out = capsys.readouterr().out
    assert "{" not in out and '"' not in out  # no raw JSON
    assert "parity        PyTorch fp32 vs onnxruntime: max error" in out
    assert "greedy tokens match" in out
    assert "perplexity    21.72 as a MoE vs 19.35 dense" in out and "limit 1.15" in out
    assert "source        Org/Tiny-1M (GGUF) from PyPI (tiny==1, MIT)" in out
    del manifest["demo"]
    (pkg / "moechat.json").write_text(json.dumps(manifest))
    assert main(["info", str(pkg)]) == 0
    assert "tmpbuild-gone: no longer on this machine" in capsys.readouterr().out


def test_chat_passes_threads_and_context_cap_to_the_model(tiny_package, tmp_path, monkeypatch):
    """`moechat chat --threads 1 --max-context 32` loads the model with both (the app's
    loader runs in the app; here its load function is called directly)."""
    import moechat.app.tui as tui
    from moechat.app import launch

    seen = {}

    class FakeApp:
        return_code = 0

        def __init__(self, load, store, **kwargs):
            seen["engine"] = load()

        def run(self):
            return None

        def persist_in_progress(self):
            return None

    monkeypatch.setattr(tui, "ChatApp", FakeApp)
    monkeypatch.setattr(launch, "ChatApp", FakeApp, raising=False)
    code = main(["chat", str(tiny_package), "--threads", "1", "--max-context", "32",
                 "--data-dir", str(tmp_path / "data")])  # fmt: skip
    assert code == 0
    model = seen["engine"].model
    assert model.max_context == 32
    assert model.decoder.session.get_session_options().intra_op_num_threads == 1


def test_info_says_what_the_demo_is():
    from moechat.app.package_info import demo_lines

    arch = {"n_routed_experts": 4, "n_shared_experts": 1, "shared_intermediate_size": 1280,
            "intermediate_size": 64, "num_experts_per_tok": 2}  # fmt: skip
    demo = {
        "source": {"model": "HuggingFaceTB/SmolLM2-135M-Instruct (Q4_1 GGUF)"},
        "conversion": {"active_share": 0.9167},
        "perplexity": {"moe": 21.72, "dense": 19.35, "ratio": 1.12, "by_text": {
            "prose": {"ratio": 1.1}, "dialogue": {"ratio": 1.2}, "broken": "x"}},
        "speed": {"ratio": 0.84, "demo": {"decode_tokens_per_s": 118.8},
                  "dense": {"decode_tokens_per_s": 141.5}},
    }  # fmt: skip
    text = "\n".join(demo_lines(demo, arch))
    assert "converted from the dense HuggingFaceTB/SmolLM2-135M-Instruct" in text
    assert "1 shared expert of 1280 neurons + 4 routed experts of 64, top-2" in text
    assert "a token runs 92% of the FFN neurons" in text
    assert "prose 1.10x, dialogue 1.20x" in text and "broken" not in text
    assert "decode 118.8 tok/s vs 141.5 for the dense parent at int8 (0.84x)" in text
    failed = demo_lines({"speed": {"error": "no memory"}}, {})
    assert failed == ["speed         not measured at build: no memory"]
    # a malformed record still prints, with '?' for what is missing
    assert demo_lines({"perplexity": {"moe": "x", "dense": None}}, {"n_routed_experts": 2})
