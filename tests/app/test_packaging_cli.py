"""What the single-file binary relies on: --model, --selfcheck, the model lookup order."""

from __future__ import annotations

import argparse
import json
import shutil
import sys
from pathlib import Path

import pytest

from moechat.app import model_discovery
from moechat.app.cli import _apply_model_flag, _hoist_global_options, build_parser, main


def _parse(argv: list[str]) -> argparse.Namespace:
    parser = build_parser()
    commands = next(a.choices for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    args = parser.parse_args(_hoist_global_options(list(argv), commands))
    _apply_model_flag(parser, args)
    return args


@pytest.mark.parametrize(
    "argv, command, model, prompt",
    [
        ([], "chat", None, None),
        (["PKG"], "chat", "PKG", None),
        (["--model", "PKG"], "chat", "PKG", None),
        (["--model=PKG"], "chat", "PKG", None),
        (["chat", "--model", "PKG"], "chat", "PKG", None),
        (["--model", "PKG", "run", "hi"], "run", "PKG", "hi"),
        (["run", "--model", "PKG", "hi"], "run", "PKG", "hi"),
        (["run", "PKG", "hi"], "run", "PKG", "hi"),
        (["info", "--model", "PKG"], "info", "PKG", None),
        (["--model", "PKG", "bench", "--json"], "bench", "PKG", None),
    ],
)
def test_model_option_forms(argv, command, model, prompt):
    args = _parse(argv)
    assert (args.command, args.model, getattr(args, "prompt", None)) == (command, model, prompt)


def test_model_given_twice_is_an_error(capsys):
    with pytest.raises(SystemExit):
        _parse(["chat", "A", "--model", "B"])
    assert "give the model once" in capsys.readouterr().err


def test_selfcheck_flag_parses():
    args = _parse(["--selfcheck", "--model", "PKG"])
    assert args.selfcheck and args.command == "chat" and args.model == "PKG"
    assert not _parse(["--version"]).selfcheck


def test_selfcheck_echo(capsys, tmp_path, monkeypatch):
    monkeypatch.setenv("MOECHAT_DATA_DIR", str(tmp_path))
    assert main(["--selfcheck"]) == 0
    assert "selfcheck ok" in capsys.readouterr().out


def test_run_with_model_option(tiny_package, capsys):
    argv = ["--greedy", "-n", "6", "--json", "--device", "cpu"]
    assert main(["run", str(tiny_package), "hello", *argv]) == 0
    positional = json.loads(capsys.readouterr().out)
    assert main(["--model", str(tiny_package), "run", "hello", *argv]) == 0
    flagged = json.loads(capsys.readouterr().out)
    assert flagged["token_ids"] == positional["token_ids"]


def test_lookup_order_of_a_frozen_binary(tmp_path, monkeypatch):
    binary = tmp_path / "bin" / "moechat"
    binary.parent.mkdir()
    binary.write_bytes(b"")
    monkeypatch.setattr(sys, "frozen", True, raising=False)
    monkeypatch.setattr(sys, "executable", str(binary))
    monkeypatch.setenv("MOECHAT_MODEL_DIR", str(tmp_path / "env"))
    monkeypatch.setenv("MOECHAT_DATA_DIR", str(tmp_path / "data"))
    places = model_discovery.search_locations()
    assert places == [
        ("$MOECHAT_MODEL_DIR", tmp_path / "env"),
        ("beside the binary", binary.parent.resolve() / "models"),
        ("the user data dir", tmp_path / "data" / "models"),
    ]
    with pytest.raises(model_discovery.MoechatError) as err:
        model_discovery.default_model(assume_yes=True)  # never builds the demo when frozen
    message = str(err.value)
    for _, folder in places:
        assert str(folder) in message
    assert "--model" in message


def test_user_data_dir_holds_any_package(tiny_package, tmp_path, monkeypatch):
    monkeypatch.delenv("MOECHAT_MODEL_DIR", raising=False)
    monkeypatch.setenv("MOECHAT_DATA_DIR", str(tmp_path))
    models = tmp_path / "models"
    shutil.copytree(tiny_package, models / tiny_package.name)
    assert model_discovery.default_model() == models / tiny_package.name
    assert Path(model_discovery.demo_package_dir()).parent == models
