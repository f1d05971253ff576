"""`moechat experts prune` (issue 19): a pruned package runs, its routers only choose kept
experts, it is smaller by the dropped experts' bytes, and keeping all experts changes
nothing."""

from __future__ import annotations

import json

import experts_factory
import numpy as np
import pytest
from experts_factory import FAMILIES, IDS, check_pruned, prune

family_packages = experts_factory.family_packages  # session fixture (tests/experts_factory.py)
int8_package = experts_factory.int8_package  # session fixture (tests/experts_factory.py)


@pytest.mark.parametrize("family", FAMILIES)
def test_prune_family(family, family_packages, tmp_path):
    check_pruned(family_packages.get(family)[1], tmp_path)


def test_prune_int8_qmoe(int8_package, tmp_path):
    check_pruned(int8_package, tmp_path)


@pytest.mark.parametrize("which", ["mixtral", "int8"])
def test_prune_to_all_experts_is_exact(which, family_packages, int8_package, tmp_path):
    package = family_packages.get(which)[1] if which != "int8" else int8_package
    from moechat.runtime.model import load_model

    num = json.loads((package / "moechat.json").read_text())["architecture"]["n_routed_experts"]
    prune(package, tmp_path / "all", num)
    a = load_model(package, "cpu").decoder.forward(IDS, logits_for="all")
    b = load_model(tmp_path / "all", "cpu").decoder.forward(IDS, logits_for="all")
    np.testing.assert_array_equal(a, b)


def test_prune_errors(tiny_package, tmp_path, capsys):
    from moechat.app.cli import main

    for keep, message in ((1, "between the experts per token (2)"), (5, "routed experts (4)")):
        rc = main(["experts", "prune", str(tiny_package), str(tmp_path / "p"), "--keep", str(keep)])
        assert rc == 1 and message in capsys.readouterr().err
    assert not (tmp_path / "p").exists()
