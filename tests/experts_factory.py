"""Packages shared by the expert-tool tests (extract, prune, runtime top-k): each is
exported once per session, on first use. Each family is written with 4 experts, 3 per
token, so that both fewer experts per token and pruning below 4 have room."""

from __future__ import annotations

from pathlib import Path

import pytest
from family_factory import make_family_folder

from model_factory import export_tiny_package

FAMILIES = ["mixtral", "qwen2_moe"]
IDS = [5, 17, 99, 3, 250, 42, 7, 311, 64, 128, 9, 200]  # token ids the logits are compared on
HELDOUT = Path(__file__).resolve().parents[1] / "export" / "data" / "heldout.txt"


def short_text(folder: Path) -> str:
    """A short text file (the start of the held-out text): keeps perplexity runs fast."""
    path = folder / "short.txt"
    path.write_text(HELDOUT.read_text(encoding="utf-8")[:1200], encoding="utf-8")
    return str(path)


LOWERING = {"mixtral": "contrib", "qwen2_moe": "ops"}  # one of each MoE lowering
TOP_K = 3


def transformers_model(folder: Path):
    """A fresh copy of the checkpoint's transformers model (tests rig and edit it)."""
    import transformers

    model = transformers.AutoModelForCausalLM.from_pretrained(folder, dtype="float32")
    return model.eval()


class FamilyPackages:
    def __init__(self, root: Path) -> None:
        self.root = root
        self._made: dict[str, tuple[Path, Path]] = {}

    def get(self, family: str) -> tuple[Path, Path]:
        """(checkpoint folder, fp32 package) of ``family``."""
        if family not in self._made:
            root = self.root / family
            make_family_folder(family, root / "ckpt", num_experts_per_tok=TOP_K)
            pkg = export_tiny_package(root / "ckpt", root / "pkg", "--moe-impl", LOWERING[family])
            self._made[family] = (root / "ckpt", pkg)
        return self._made[family]


@pytest.fixture(scope="session")
def family_packages(tmp_path_factory) -> FamilyPackages:
    return FamilyPackages(tmp_path_factory.mktemp("families"))


@pytest.fixture(scope="session")
def int8_package(tmp_path_factory, tiny_checkpoint) -> Path:
    """The tiny MiniMind MoE as int8 QMoE (4 experts, 2 per token)."""
    return export_tiny_package(tiny_checkpoint, tmp_path_factory.mktemp("int8") / "pkg", "--int8")
