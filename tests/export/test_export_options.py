"""ExportOptions (export/options.py): Literal values checked, one-line errors."""

from __future__ import annotations

import pytest

pytest.importorskip("torch")

from moechat.app.cli import build_parser  # noqa: E402
from moechat.export.cli import options_from_args  # noqa: E402
from moechat.export.options import ExportOptions  # noqa: E402
from moechat.runtime.errors import MoechatError  # noqa: E402


def test_defaults_follow_int8():
    assert ExportOptions().moe_impl == "contrib"
    assert ExportOptions(int8=True).moe_impl == "qmoe"
    assert ExportOptions(int8=True).fp32_moe_impl == "contrib"
    assert ExportOptions(moe_impl="ops").fp32_moe_impl == "ops"


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"moe_impl": "fast"}, "--moe-impl must be one of contrib, ops, qmoe"),
        ({"attention": "flash"}, "--attention must be one of gqa, ops"),
        ({"int8": True, "int8_matmuls": "int4"}, "--int8-matmuls must be one of nbits, dynamic"),
        ({"variants": ("cuda",)}, "--variant must be one of dml"),
        ({"int8": True, "int8_block": 48}, "--int8-block must be one of 16, 32, 64, 128"),
        ({"int8": True, "fp16": True}, "alternatives"),
        ({"moe_impl": "qmoe"}, "needs --int8"),
    ],
)
def test_bad_options_are_one_line_errors(kwargs, message):
    with pytest.raises(MoechatError, match=message) as err:
        ExportOptions(**kwargs)
    assert "\n" not in str(err.value)


def test_the_command_line_maps_onto_every_option(tmp_path):
    args = build_parser().parse_args(
        ["export", "src", "out", "--int8", "--int8-block", "64", "--int8-residual-pass",
         "--heldout", "h.txt", "--moe-impl", "ops", "--attention", "ops", "--variant", "dml",
         "--name", "n", "--force", "--max-context", "256"]
    )  # fmt: skip
    options = options_from_args(args)
    assert options == ExportOptions(
        moe_impl="ops", attention="ops", max_context=256, name="n", force=True, int8=True,
        int8_block=64, int8_residual_pass=True, heldout=options.heldout, variants=("dml",),
    )  # fmt: skip
    assert str(options.heldout) == "h.txt"
