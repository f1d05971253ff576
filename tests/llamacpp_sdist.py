"""llama-cpp-python's sdist from PyPI: llama.cpp's converter and vocabularies for tests."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

LLAMA_CPP_PYTHON = "llama-cpp-python==0.3.36"
CACHE = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "moechat-tests"


def download_sdist(folder: Path, what: str) -> Path:
    """``pip download`` the sdist into ``folder``; skip the test (saying ``what`` needed it)
    when PyPI cannot be reached."""
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--no-binary", ":all:",
           "--disable-pip-version-check", LLAMA_CPP_PYTHON, "-d", str(folder)]  # fmt: skip
    try:
        result = subprocess.run(cmd, capture_output=True, text=True, timeout=900)
    except subprocess.TimeoutExpired:
        pytest.skip(f"{what}: pip download {LLAMA_CPP_PYTHON} timed out")
    sdists = list(Path(folder).glob("*.tar.gz"))
    if result.returncode != 0 or not sdists:
        last = (result.stderr.strip().splitlines() or ["no output"])[-1]
        pytest.skip(f"{what}: PyPI unreachable? pip download failed: {last}")
    return sdists[0]
