"""Class names and prompts: `--classes` lists, prompt templates and files, image-folder trees (one sub-folder per
class)."""

from __future__ import annotations

import io
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from noop_rt.runtime.errors import BadInputError
from noop_rt.runtime.images import IMAGE_SUFFIXES

DEFAULT_TEMPLATE = "a photo of a {}"


def class_name_from_folder(folder: str) -> str:
    """Folder name -> class name: underscores become spaces ("great_pyrenees" -> "great pyrenees")."""
    return folder.replace("_", " ").strip()


def make_prompts(classes: list[str], template: str = DEFAULT_TEMPLATE) -> list[str]:
    """One prompt per class from a template holding one `{}`."""
    if template.count("{}") != 1:
        raise BadInputError(f"prompt template must contain exactly one '{{}}' for the class name: {template!r}")
    return [template.format(name) for name in classes]


def describe_unknown(names: list[str], known: list[str], limit: int = 5) -> str:
    """'purple triangel (did you mean purple triangle?), ...' for class names not in `known`."""
    import difflib

    parts = []
    for name in names[:limit]:
        close = difflib.get_close_matches(name, known, n=1)
        parts.append(f"{name} (did you mean {close[0]}?)" if close else name)
    return ", ".join(parts) + (" ..." if len(names) > limit else "")


def parse_class_list(text: str) -> list[str]:
    """`--classes a,b,c` -> ["a", "b", "c"]; an empty or duplicated list is an error."""
    classes = [c.strip() for c in text.split(",") if c.strip()]
    if not classes:
        raise BadInputError("the class list is empty: pass --classes a,b,c or --data DIR")
    duplicates = sorted({c for c in classes if classes.count(c) > 1})
    if duplicates:
        raise BadInputError(f"duplicate class names: {', '.join(duplicates)}")
    return classes


@dataclass(frozen=True)
class ImageFolder:
    """An image-folder tree: one sub-folder per class (sorted), image files inside (recursively)."""

    root: Path
    classes: list[str]  # class names (underscores -> spaces), index = label
    folders: list[str]  # the sub-folder names, same order
    samples: list[tuple[Path, int]]  # (image path, label)

    @classmethod
    def scan(cls, root: str | Path) -> ImageFolder:
        root = Path(root).expanduser()
        if not root.is_dir():
            raise BadInputError(f"data folder not found: {root}")
        folders = sorted(d.name for d in root.iterdir() if d.is_dir() and not d.name.startswith("."))
        if not folders:
            raise BadInputError(f"{root} has no class sub-folders (expected DIR/<class>/<image files>)")
        samples: list[tuple[Path, int]] = []
        for label, folder in enumerate(folders):
            files = sorted(p for p in (root / folder).rglob("*")
                           if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES)
            samples += [(p, label) for p in files]
        if not samples:
            raise BadInputError(f"{root} holds no images ({', '.join(IMAGE_SUFFIXES)}) under its class folders")
        return cls(root, [class_name_from_folder(f) for f in folders], folders, samples)

    def __len__(self) -> int:
        return len(self.samples)

    def per_class(self, shots: int | None, seed: int) -> tuple[list[tuple[Path, int]], list[tuple[Path, int]]]:
        """(first `shots` per class, the rest), drawn per class with a seeded permutation; shots=None takes all."""
        rng = np.random.default_rng(seed)
        picked: list[tuple[Path, int]] = []
        rest: list[tuple[Path, int]] = []
        for label in range(len(self.classes)):
            members = [s for s in self.samples if s[1] == label]
            order = rng.permutation(len(members))
            cut = len(members) if shots is None else shots
            picked += [members[i] for i in order[:cut]]
            rest += [members[i] for i in order[cut:]]
        return picked, rest


def read_prompts_file(path: str | Path) -> dict[str, str]:
    """Per-class prompts from a CSV, {class: prompt} in file order. Li et al.'s files (header `prompt,classname,
    classidx`) and any CSV with `class`/`classname` and `prompt` columns work, as does a headerless `class,prompt`."""
    import csv

    p = Path(path).expanduser()
    if not p.is_file():
        raise BadInputError(f"prompts file not found: {p}")
    try:
        reader = csv.reader(io.StringIO(p.read_text(encoding="utf-8-sig")))
        numbered = [(reader.line_num, r) for r in reader]
    except (OSError, UnicodeDecodeError, csv.Error) as exc:
        raise BadInputError(f"cannot read prompts file {p}: {exc}") from None
    rows = [(n, r) for n, r in numbered if any(cell.strip() for cell in r)]
    if not rows:
        raise BadInputError(f"prompts file {p} is empty")
    header = [c.strip().lower() for c in rows[0][1]]
    class_col = next((header.index(n) for n in ("classname", "class", "class_name", "label") if n in header), None)
    if "prompt" in header and class_col is not None:
        prompt_col, body = header.index("prompt"), rows[1:]
    elif "prompt" in header or class_col is not None:
        raise BadInputError(f"prompts file {p} needs both a 'prompt' and a 'classname' (or 'class') column")
    else:
        class_col, prompt_col, body = 0, 1, rows
    index_col = header.index("classidx") if body is not rows and "classidx" in header else None
    entries: list[tuple[str, str, str | None]] = []
    for n, row in body:
        if len(row) <= max(class_col, prompt_col) or not row[class_col].strip() or not row[prompt_col].strip():
            raise BadInputError(f"prompts file {p}, line {n}: expected a class and a prompt")
        index = row[index_col].strip() if index_col is not None and len(row) > index_col else None
        entries.append((row[class_col].strip(), row[prompt_col].strip(), index or None))
    out = PromptTable()
    if index_col is not None:  # Li et al.'s files: classidx is the class's identity, a name may repeat
        counts = Counter(name for name, _, _ in entries)
        repeated = sorted(name for name, c in counts.items() if c > 1)
        seen: set[str] = set()
        if all(index is not None and index.isdigit() for _, _, index in entries):
            entries.sort(key=lambda e: int(e[2] or 0))  # class i is their classidx i
        for name, prompt, index in entries:
            if index is None:
                raise BadInputError(f"prompts file {p}: a row of class {name!r} has no classidx")
            if index in seen:
                raise BadInputError(f"prompts file {p} gives classidx {index} twice")
            seen.add(index)
            out[f"{name} [{index}]" if name in repeated else name] = prompt
        if repeated:
            out.notes.append(f"{p.name}: class name(s) {', '.join(repeated)} occur more than once; told apart by "
                             "their classidx, e.g. " + next(k for k in out if k.startswith(repeated[0] + " [")))
        return out
    for name, prompt, _ in entries:
        if name in out and out[name] != prompt:
            raise BadInputError(f"prompts file {p} gives class {name!r} two prompts; noop-rt takes one per class")
        out[name] = prompt
    return out


class PromptTable(dict[str, str]):
    """{class: prompt} in file order, with the remarks reading it called for (`notes`)."""

    def __init__(self, *args: object) -> None:
        super().__init__(*args)  # type: ignore[arg-type]
        self.notes: list[str] = []
