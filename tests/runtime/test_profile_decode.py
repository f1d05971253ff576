"""benchmarks/profile_decode.py (a maintained tool, not a test of speed): it runs and
prints its per-op table on the tiny package."""

from __future__ import annotations

import runpy
from pathlib import Path

SCRIPT = Path(__file__).resolve().parents[2] / "benchmarks" / "profile_decode.py"


def test_profile_decode_prints_the_op_table(tiny_package, capsys):
    main = runpy.run_path(str(SCRIPT))["main"]
    assert main([str(tiny_package), "--context", "8", "--steps", "2", "--threads", "1"]) == 0
    out = capsys.readouterr().out
    assert "kernel launches per step" in out
    assert "| op type | ms/step | share of kernel time | launches/step |" in out
    assert "| MatMul" in out or "| MatMulNBits" in out
