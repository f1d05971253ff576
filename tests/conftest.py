import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))

SHARED = Path(__file__).resolve().parents[1].parent / "shared"


@pytest.fixture(scope="session")
def tiny_checkpoint(tmp_path_factory) -> Path:
    from model_factory import make_hf_folder

    return make_hf_folder(tmp_path_factory.mktemp("ckpt") / "tiny-moe")


@pytest.fixture(scope="session")
def tiny_package(tmp_path_factory, tiny_checkpoint) -> Path:
    """A tiny random MoE exported through the real `moechat export` path."""
    from model_factory import export_tiny_package

    return export_tiny_package(tiny_checkpoint, tmp_path_factory.mktemp("pkg") / "tiny-moe")


@pytest.fixture(scope="session")
def rigged_package(tmp_path_factory) -> Path:
    """A tiny MoE whose routers are set by hand (tests/routing_factory.py), exported."""
    from routing_factory import make_rigged_folder

    from model_factory import export_tiny_package

    root = tmp_path_factory.mktemp("rigged")
    return export_tiny_package(make_rigged_folder(root / "ckpt"), root / "pkg")


@pytest.fixture(scope="session")
def minimind_tokenizer_dir() -> Path:
    d = SHARED / "fixtures" / "minimind-tokenizer"
    if not (d / "tokenizer.json").is_file():
        pytest.skip("../shared/fixtures/minimind-tokenizer is absent")
    return d
