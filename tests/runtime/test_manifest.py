"""moechat.json read through one typed, validated schema (runtime/manifest.py)."""

from __future__ import annotations

import json
import shutil

import pytest

from moechat.runtime.errors import MoechatError
from moechat.runtime.manifest import load_manifest
from moechat.runtime.package import MANIFEST, load_package


def _copy_with(tiny_package, tmp_path, change):
    pkg = tmp_path / "pkg"
    shutil.copytree(tiny_package, pkg)
    data = json.loads((pkg / MANIFEST).read_text())
    change(data)
    (pkg / MANIFEST).write_text(json.dumps(data))
    return pkg


def test_an_exported_package_reads_typed(tiny_package):
    spec = load_manifest(tiny_package / MANIFEST)
    assert spec.format_version == 1 and spec.max_context > 0
    assert spec.architecture.model_type in ("minimind", "llama")
    assert spec.architecture.num_hidden_layers == spec.architecture.fields["num_hidden_layers"]
    assert spec.graph.file == "model.onnx" and spec.graph.attention in ("gqa", "ops")
    assert spec.tokenizer.file == "tokenizer.json" and spec.tokenizer.eos_token_ids
    assert spec.chat_template.format == "chatml"
    assert set(spec.files) >= {"model.onnx", "tokenizer.json"}


def test_unknown_and_missing_optional_fields_are_tolerated(tiny_package, tmp_path):
    def change(m):
        m["a_future_section"] = {"x": 1}
        m["chat_template"]["a_future_field"] = "kept"
        m["tokenizer"]["pad_token_id"] = None
        for key in ("name", "defaults", "provenance", "parity", "fidelity"):
            m.pop(key, None)

    package = load_package(_copy_with(tiny_package, tmp_path, change))
    assert package.name == "pkg"
    assert package.manifest["a_future_section"] == {"x": 1}
    assert package.manifest["chat_template"]["a_future_field"] == "kept"
    assert package.spec.tokenizer.pad_token_id is None and package.spec.defaults == {}


@pytest.mark.parametrize(
    ("change", "message"),
    [
        (lambda m: m.pop("graph"), "no 'graph'"),
        (lambda m: m.pop("max_context"), "no 'max_context'"),
        (lambda m: m.update(max_context="512"), "'max_context' must be an integer"),
        (lambda m: m.update(max_context=True), "'max_context' must be an integer"),
        (lambda m: m["graph"].pop("file"), "no 'graph.file'"),
        (lambda m: m["graph"].update(kv_dtype="int4"), "graph.kv_dtype"),
        (lambda m: m["graph"].update(variants={"dml": 3}), "'variants' must map names to strings"),
        (lambda m: m["architecture"].update(head_dim=16.5), "'architecture.head_dim' must be"),
        (lambda m: m["tokenizer"].update(eos_token_ids=["2"]), "must be a list of integers"),
        (lambda m: m.update(tokenizer=[]), "tokenizer must be an object"),
        (lambda m: m["chat_template"].update(default_system=7), "default_system' must be a string"),
        (lambda m: m["architecture"].update(model_type="gpt2"), "unsupported architecture"),
        (lambda m: m.update(format_version=99), "newer moechat"),
    ],
)
def test_wrong_fields_are_one_line_errors(tiny_package, tmp_path, change, message):
    pkg = _copy_with(tiny_package, tmp_path, change)
    with pytest.raises(MoechatError, match=message) as err:
        load_package(pkg)
    assert "\n" not in str(err.value)


def test_unreadable_manifest(tmp_path):
    with pytest.raises(MoechatError, match="cannot read"):
        load_manifest(tmp_path / MANIFEST)
    (tmp_path / MANIFEST).write_text("[1, 2]")
    with pytest.raises(MoechatError, match="not a JSON object"):
        load_manifest(tmp_path / MANIFEST)
    (tmp_path / MANIFEST).write_text("{")
    with pytest.raises(MoechatError, match="corrupt"):
        load_manifest(tmp_path / MANIFEST)
