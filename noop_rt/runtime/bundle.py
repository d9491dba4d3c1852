"""Reading an exported bundle `export/NAME/` (format 2): the manifest, its files, and the checks that keep a
truncated, swapped or edited file from being run. No torch.

Opening checks the manifest, every listed file's presence and size, and re-hashes (sha256) only a file whose size or
modification time changed since it was last verified; what was verified is remembered beside the bundle
(`.verified.json`), or in the user cache when the bundle is read-only (an installed package). `export`, `build`
and `noop-rt verify` hash everything.
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from noop_rt.runtime.errors import BundleError
from noop_rt.runtime.graph_specs import CLASSIFIER, TEXT_ENCODER, GraphSpec
from noop_rt.runtime.onnx_metadata import read_metadata_props

FORMAT = "noop-rt.bundle"
VERSION = 2
MANIFEST = "manifest.json"
VERIFIED = ".verified.json"
REQUIRED = ("name", "classes", "prompts", "t_star", "loss", "tau", "resolution", "latent_shape", "max_tokens",
            "text_dim", "num_train_timesteps", "max_batch", "precision", "graphs", "files", "preprocessing",
            "classifier_graph", "backbone")


LABEL_KEYS = ("noop_rt.classes", "noop_rt.prompts")  # the classifier graph's metadata: what it was exported for


def sha256_file(path: Path, chunk: int = 1 << 22) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        while block := fh.read(chunk):
            digest.update(block)
    return digest.hexdigest()


def write_json_atomic(path: Path, data: Any) -> None:
    """Write JSON to a temp file beside `path`, then rename it over `path`."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        tmp.write_text(json.dumps(data, indent=2) + "\n")
        tmp.replace(path)
    finally:
        tmp.unlink(missing_ok=True)


def user_cache_dir() -> Path:
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "noop-rt"


@dataclass
class Bundle:
    root: Path
    manifest: dict[str, Any]
    _specs: dict[str, GraphSpec | None] = field(default_factory=dict, repr=False, compare=False)  # parsed once

    # ------------------------------------------------------------------------------------------ fields
    @property
    def name(self) -> str:
        return str(self.manifest["name"])

    @property
    def classes(self) -> list[str]:
        return list(self.manifest["classes"])

    @property
    def graphs(self) -> dict[str, GraphSpec]:
        return {name: GraphSpec.from_json(name, spec) for name, spec in self.manifest["graphs"].items()}

    def has(self, graph: str) -> bool:
        return graph in self.manifest["graphs"]

    def graph_spec(self, graph: str) -> GraphSpec | None:
        """One graph's description from the manifest (None where the manifest gives only its file), parsed once."""
        if graph not in self._specs:
            entry = self.manifest["graphs"].get(graph)
            self._specs[graph] = (GraphSpec.from_json(graph, entry) if isinstance(entry, dict) and "inputs" in entry
                                  else None)
        return self._specs[graph]

    def path(self, graph: str) -> Path:
        return self.root / self.manifest["graphs"][graph]["file"]

    @property
    def classifier_path(self) -> Path:
        return self.root / self.manifest["classifier_graph"]["file"]

    def tokenize(self, prompts: list[str]) -> np.ndarray:
        """Token ids (N, L) of prompts with the bundle's tokenizer (read once). An SDXL/SD3 bundle lists several
        (manifest `tokenizers`: folder and length of each): their ids are concatenated, as its text encoder graph
        takes them."""
        if getattr(self, "_tokenizer", None) is None:
            from noop_rt.runtime.tokenizer import PromptTokenizer

            parts = self.manifest.get("tokenizers") or [{"folder": "tokenizer",
                                                         "max_tokens": int(self.manifest["max_tokens"])}]
            self._tokenizer = [PromptTokenizer(self.root / str(p["folder"]), int(p["max_tokens"])) for p in parts]
        return np.concatenate([tok(prompts) for tok in self._tokenizer], axis=1)

    def class_embeddings(self) -> np.ndarray:
        """The cached class embeddings (C, L, D) float32, checked; a bad file is a BundleError naming it."""
        path = self.root / "class_embeddings.npy"
        try:
            emb = np.load(path, allow_pickle=False)
        except (OSError, ValueError, EOFError) as exc:
            raise BundleError(f"{path} is not a plain numpy array file ({str(exc).splitlines()[0]}); re-export "
                              "the bundle") from None
        want = (len(self.classes), int(self.manifest["max_tokens"]), int(self.manifest["text_dim"]))
        if emb.dtype != np.float32 or emb.shape != want:
            raise BundleError(f"{path} holds a {emb.dtype} array of shape {emb.shape}; the manifest needs float32 "
                              f"{want}")
        if not np.isfinite(emb).all():
            raise BundleError(f"{path} holds NaN or infinite values")
        return emb

    # ------------------------------------------------------------------------------------------ opening
    @classmethod
    def open(cls, root: str | Path, verify: str = "changed") -> Bundle:
        """Read and check a bundle. verify="changed": hash only files changed since last verified; "all": hash
        every file (noop-rt verify, export, build); "none": presence and sizes only (export's own staging)."""
        root = Path(root).expanduser()
        manifest = read_manifest(root)
        bundle = cls(root, manifest)
        bundle.check_files(verify)
        bundle.check_labels()
        return bundle

    def check_labels(self) -> None:
        """The class names and prompts of manifest.json against those the classifier graph was exported with (its
        metadata; the graph's bytes are hashed, the manifest that holds the hashes is not). Bundles exported before
        the graphs carried them are not checked."""
        entry = self.manifest["graphs"].get(CLASSIFIER)
        if not isinstance(entry, dict) or "file" not in entry:
            return
        props = read_metadata_props(self.root / entry["file"]) or {}
        for key, field_name in zip(LABEL_KEYS, ("classes", "prompts"), strict=True):
            if key not in props:
                continue
            try:
                exported = json.loads(props[key])
            except json.JSONDecodeError:
                raise BundleError(f"{self.root / entry['file']} carries unreadable {field_name}") from None
            if exported != list(self.manifest.get(field_name) or []):
                diff = next((f"{a!r} where it was exported with {b!r}" for a, b in
                             zip(self.manifest.get(field_name) or [], exported, strict=False) if a != b),
                            f"{len(self.manifest.get(field_name) or [])} entries where it was exported with "
                            f"{len(exported)}")
                what = "class" if field_name == "classes" else "prompt"
                raise BundleError(f"{self.root}/{MANIFEST} names {what} {diff} (edited manifest?); restore it or "
                                  "re-export the bundle")

    def check_files(self, verify: str = "changed") -> list[str]:
        """Presence, size and (per `verify`) sha256 of every file the manifest lists; returns the files hashed."""
        files: dict[str, Any] = self.manifest["files"]
        needed = [spec.get("file") for spec in self.manifest["graphs"].values()]
        needed += [(self.manifest.get("weights") or {}).get("file"), "class_embeddings.npy"]
        if self.has(TEXT_ENCODER):  # a bundle exported with --no-text-encoder ships no tokenizer either
            needed.append("tokenizer/tokenizer.json")
        unchecked = [f for f in needed if f is not None and f not in files]
        if unchecked:
            raise BundleError(f"{self.root}/{MANIFEST} does not list {unchecked[0]} among its checked files "
                              "(edited manifest?); re-export the bundle")
        cache = _VerifiedCache(self.root, self.manifest) if verify == "changed" else None
        hashed = []
        for name, record in files.items():
            file = self.root / name
            if not isinstance(record, dict) or "sha256" not in record or "size" not in record:
                raise BundleError(f"{self.root}/{MANIFEST}: bad entry for {name}")
            try:
                stat = file.stat()
            except OSError:
                raise BundleError(f"{self.root} is incomplete: {name} is missing") from None
            if stat.st_size != int(record["size"]):
                raise BundleError(f"{file} has {stat.st_size} bytes where {MANIFEST} records {record['size']} "
                                  "(truncated or replaced)")
            if verify == "none" or (cache is not None and cache.fresh(name, stat)):
                continue
            if sha256_file(file) != record["sha256"]:
                raise BundleError(f"{file} does not match the sha256 in {MANIFEST} (modified or corrupt)")
            hashed.append(name)
            if cache is not None:
                cache.record(name, stat)
        if cache is not None:
            cache.save()
        return hashed


def read_manifest(root: Path) -> dict[str, Any]:
    path = root / MANIFEST
    if root.is_file():
        raise BundleError(f"{root} is a file; a bundle is a folder holding {MANIFEST} (written by noop-rt export)")
    if not root.is_dir():
        raise BundleError(f"bundle folder not found: {root}")
    if not path.is_file():
        raise BundleError(f"{root} is not a noop-rt bundle: {MANIFEST} is missing (run noop-rt export)")
    try:
        manifest = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise BundleError(f"{path} is not valid JSON: {exc}") from None
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT:
        raise BundleError(f"{root} is not a noop-rt bundle (format tag {FORMAT!r} missing)")
    if manifest.get("version") != VERSION:
        source = (manifest.get("source_ckpt") or {}).get("path", "NAME.pt")
        raise BundleError(f"{root} is bundle format {manifest.get('version')}; this noop-rt reads format {VERSION}: "
                          f"re-export it with this version (noop-rt export --ckpt {source} --out {root} --force)")
    missing = [key for key in REQUIRED if key not in manifest]
    if missing:
        raise BundleError(f"{path} lacks field(s) {', '.join(missing)}; re-export the bundle")
    if manifest["classifier_graph"].get("file") != manifest["graphs"].get(CLASSIFIER, {}).get("file"):
        raise BundleError(f"{path}: classifier_graph does not name the classifier graph's file")
    return manifest


class _VerifiedCache:
    """(size, mtime) of the files whose sha256 matched this manifest, beside the bundle or in the user cache."""

    def __init__(self, root: Path, manifest: dict[str, Any]) -> None:
        self.key = hashlib.sha256(json.dumps(manifest["files"], sort_keys=True).encode()).hexdigest()
        beside = root / VERIFIED
        self.path = beside if os.access(root, os.W_OK) else (
            user_cache_dir() / "verified" / (hashlib.sha256(str(root.resolve()).encode()).hexdigest()[:24] + ".json"))
        self.entries: dict[str, list[int]] = {}
        self.dirty = False
        try:
            data = json.loads(self.path.read_text())
            if data.get("files_key") == self.key:
                self.entries = {k: list(v) for k, v in data.get("files", {}).items()}
        except (OSError, ValueError, AttributeError, TypeError):
            pass

    @staticmethod
    def _key(stat: os.stat_result) -> list[int]:
        # size, modification and change times, inode: a file restored with its old mtime (cp -p, rsync -a, tar x)
        # still gets a new ctime and usually a new inode, so it is hashed again
        return [stat.st_size, stat.st_mtime_ns, stat.st_ctime_ns, stat.st_ino]

    def fresh(self, name: str, stat: os.stat_result) -> bool:
        return self.entries.get(name) == self._key(stat)

    def record(self, name: str, stat: os.stat_result) -> None:
        self.entries[name] = self._key(stat)
        self.dirty = True

    def save(self) -> None:
        if not self.dirty:
            return
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            write_json_atomic(self.path, {"files_key": self.key, "files": self.entries})
        except OSError:
            pass  # a cache that cannot be written only costs a re-hash next time
