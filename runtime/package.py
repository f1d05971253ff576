"""A model package on disk: model.onnx (+ .data), tokenizer.json and moechat.json."""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from moechat.runtime.errors import MoechatError
from moechat.runtime.manifest import FORMAT_VERSION as FORMAT_VERSION  # export writes it
from moechat.runtime.manifest import Manifest, load_manifest

MANIFEST = "moechat.json"


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
    spec: Manifest  # the validated moechat.json

    @property
    def manifest(self) -> dict[str, Any]:
        """moechat.json as read (all fields, including ones this version does not know)."""
        return self.spec.raw

    @property
    def name(self) -> str:
        return self.spec.name or self.path.name

    @property
    def architecture(self) -> dict[str, Any]:
        return self.spec.architecture.fields

    @property
    def graph(self) -> dict[str, Any]:
        return self.manifest["graph"]

    @property
    def max_context(self) -> int:
        return self.spec.max_context

    def graph_path(self, variant: str | None = None) -> Path:
        graph = self.spec.graph
        return self.path / (graph.variants.get(variant, graph.file) if variant else graph.file)

    @property
    def tokenizer_path(self) -> Path:
        return self.path / self.spec.tokenizer.file

    def verify_checksums(self) -> None:
        """Compare every file against the sha256 recorded at export (slow for big files).

        Every file in the folder but moechat.json must have a checksum: a package without
        the ``files`` section, or with a file it does not cover, does not verify."""
        if not self.spec.files:
            raise MoechatError(
                f"package {self.path} cannot be verified: {MANIFEST} records no checksums "
                "(its 'files' section is missing or empty)"
            )
        uncovered = sorted(
            f.name
            for f in self.path.iterdir()
            if f.name != MANIFEST and f.name not in self.spec.files and not f.is_dir()
        )
        if uncovered:
            raise MoechatError(
                f"package {self.path}: {uncovered[0]} is not covered by a checksum in {MANIFEST}"
            )
        for name, expected in self.spec.files.items():
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
    package = ModelPackage(path, load_manifest(manifest_file))
    for f in (package.graph_path(), package.tokenizer_path):
        if not f.is_file():
            raise MoechatError(f"package {path} is incomplete: {f.name} is missing")
    data = package.graph_path().with_name(package.graph_path().name + ".data")
    if data.name in package.spec.files and not data.is_file():
        raise MoechatError(f"package {path} is incomplete: {data.name} is missing")
    return package
