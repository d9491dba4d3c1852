"""The exported bundle `export/NAME/`: manifest, file hashes, and opening one safely."""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from noop_rt.errors import BundleError
from noop_rt.graphs import GraphSpec

FORMAT = "noop-rt.bundle"
VERSION = 1
MANIFEST = "manifest.json"


def sha256_file(path: Path, chunk: int = 1 << 22) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        while block := fh.read(chunk):
            digest.update(block)
    return digest.hexdigest()


@dataclass
class Bundle:
    root: Path
    manifest: dict[str, Any]

    @property
    def classes(self) -> list[str]:
        return list(self.manifest["classes"])

    @property
    def graphs(self) -> dict[str, GraphSpec]:
        return {name: GraphSpec.from_json(name, spec) for name, spec in self.manifest["graphs"].items()}

    def path(self, name: str) -> Path:
        return self.root / self.manifest["graphs"][name]["file"]

    def class_embeddings(self) -> np.ndarray:
        return np.load(self.root / "class_embeddings.npy")  # (C, L, D) float32

    def alphas_cumprod(self) -> np.ndarray:
        return np.asarray(self.manifest["alphas_cumprod"], dtype=np.float32)

    @classmethod
    def open(cls, root: str | Path, verify: bool = True) -> Bundle:
        """Read and check a bundle: format + version, every listed file present with its sha256."""
        root = Path(root).expanduser()
        path = root / MANIFEST
        if not root.is_dir():
            raise BundleError(f"bundle folder not found: {root}")
        if not path.is_file():
            raise BundleError(f"{root} is not a noop-rt bundle: {MANIFEST} is missing (run noop-rt export)")
        try:
            manifest = json.loads(path.read_text())
        except (OSError, json.JSONDecodeError) as exc:
            raise BundleError(f"{path} is not valid JSON: {exc}") from None
        if not isinstance(manifest, dict) or manifest.get("format") != FORMAT:
            raise BundleError(f"{root} is not a noop-rt bundle (format tag {FORMAT!r} missing)")
        if manifest.get("version") != VERSION:
            raise BundleError(f"{root} is bundle format version {manifest.get('version')}; this noop-rt reads "
                              f"{VERSION} (re-export it with this version)")
        for name, expected in manifest.get("files", {}).items():
            file = root / name
            if not file.is_file():
                raise BundleError(f"{root} is incomplete: {name} is missing")
            if verify and sha256_file(file) != expected:
                raise BundleError(f"{root}/{name} does not match the sha256 in {MANIFEST} (modified or corrupt)")
        return cls(root, manifest)


def write_json_atomic(path: Path, data: Any) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(json.dumps(data, indent=2) + "\n")
    tmp.replace(path)
