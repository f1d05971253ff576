"""A model package on disk: model.onnx (+ .data), tokenizer.json and moechat.json."""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from moechat.runtime.errors import MoechatError

MANIFEST = "moechat.json"
FORMAT_VERSION = 1
SUPPORTED_ARCHITECTURES = ("minimind", "llama")


def sha256_file(path: Path, chunk: int = 1 << 20) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        while block := fh.read(chunk):
            digest.update(block)
    return digest.hexdigest()


def package_bytes(folder: Path) -> int:
    """Bytes on disk of the package files in ``folder`` (graph, weights, tokenizer,
    manifest; not the ``.tmp`` files of an unfinished write)."""
    return sum(
        f.stat().st_size for f in Path(folder).iterdir() if f.is_file() and f.suffix != ".tmp"
    )


@dataclass
class ModelPackage:
    path: Path
    manifest: dict[str, Any] = field(repr=False)

    @property
    def name(self) -> str:
        return self.manifest.get("name") or self.path.name

    @property
    def architecture(self) -> dict[str, Any]:
        return self.manifest["architecture"]

    @property
    def graph(self) -> dict[str, Any]:
        return self.manifest["graph"]

    @property
    def max_context(self) -> int:
        return int(self.manifest["max_context"])

    def graph_path(self, variant: str | None = None) -> Path:
        variants = self.graph.get("variants", {})
        name = variants.get(variant, self.graph["file"]) if variant else self.graph["file"]
        return self.path / name

    @property
    def tokenizer_path(self) -> Path:
        return self.path / self.manifest["tokenizer"]["file"]

    def verify_checksums(self) -> None:
        """Compare every file against the sha256 recorded at export (slow for big files)."""
        for name, expected in self.manifest.get("files", {}).items():
            f = self.path / name
            if not f.is_file():
                raise MoechatError(f"package {self.path} is missing {name}")
            if sha256_file(f) != expected:
                raise MoechatError(f"package {self.path}: {name} is corrupt (checksum mismatch)")


def load_package(path: str | Path) -> ModelPackage:
    """Read and sanity-check a package directory; raise MoechatError on anything wrong."""
    path = Path(path)
    if not path.exists():
        raise MoechatError(f"model not found: {path}")
    if not path.is_dir():
        raise MoechatError(
            f"{path} is not a model package directory (export one with `moechat export`)"
        )
    manifest_file = path / MANIFEST
    if not manifest_file.is_file():
        raise MoechatError(f"{path} is not a moechat package: {MANIFEST} is missing")
    try:
        manifest = json.loads(manifest_file.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise MoechatError(f"{manifest_file} is corrupt: {err}") from None
    if not isinstance(manifest, dict):
        raise MoechatError(f"{manifest_file} is corrupt: not a JSON object")
    for key in ("format_version", "architecture", "graph", "tokenizer", "max_context"):
        if key not in manifest:
            raise MoechatError(f"{manifest_file} is corrupt: no {key!r}")
    if manifest["format_version"] > FORMAT_VERSION:
        raise MoechatError(
            f"{path} was written by a newer moechat (package format {manifest['format_version']})"
        )
    arch = manifest["architecture"].get("model_type")
    if arch not in SUPPORTED_ARCHITECTURES:
        raise MoechatError(f"unsupported architecture {arch!r} in {path}")
    package = ModelPackage(path, manifest)
    for f in (package.graph_path(), package.tokenizer_path):
        if not f.is_file():
            raise MoechatError(f"package {path} is incomplete: {f.name} is missing")
    data = package.graph_path().with_name(package.graph_path().name + ".data")
    expected = manifest.get("files", {}).get(data.name)
    if expected is not None and not data.is_file():
        raise MoechatError(f"package {path} is incomplete: {data.name} is missing")
    return package
