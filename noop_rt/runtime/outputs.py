"""Where results go: checked before any work starts, written so that a reader never sees half a file."""

from __future__ import annotations

import tempfile
from pathlib import Path

from noop_rt.runtime.errors import BadInputError


def check_writable(path: str | Path, what: str, *, folder: bool = False) -> Path:
    """Refuse, in one line and before any model is opened, an output that could not be written at the end: its
    folder cannot be made or written (a probe file is created and removed there), or it names a folder where a file
    goes (or a file where a folder goes, with `folder`). URIs (s3://...) are left to the writer."""
    path = Path(path).expanduser()
    if "://" in str(path):
        return path
    if path.exists() and path.is_dir() != folder:
        raise BadInputError(f"{what} {path} is {'a file' if folder else 'a folder'}; expected "
                            f"{'a folder' if folder else 'a file'}")
    parent = path.parent if not (folder and path.is_dir()) else path
    existing = parent
    while not existing.exists() and existing != existing.parent:
        existing = existing.parent
    if not existing.is_dir():
        raise BadInputError(f"cannot write {what} {path}: {existing} is not a folder")
    try:
        parent.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=parent, prefix=".noop-rt-write-check-"):
            pass
    except OSError as exc:
        raise BadInputError(f"cannot write {what} {path}: {exc.strerror or exc}") from None
    return path
