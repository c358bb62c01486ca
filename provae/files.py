"""File helpers shared by the stages and scripts: one hash, and writes that never leave half a file.

Every output is written to a side file in its own folder (``<name>.partial``) and renamed over the
target with ``os.replace`` only once complete: a stage killed mid-write leaves the previous
output intact, never a truncated one. The side file keeps the target's name plus one suffix, so a
library that writes to a path (``torch.save`` names its archive after the file, minus the
suffix) writes the same bytes as it would to the target itself. This module imports nothing of
the package.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import IO


def file_digest(path: str | os.PathLike, algorithm: str = "md5") -> str:
    """Hex digest of a file's bytes, read in blocks (prepared data runs to hundreds of MB).

    md5, the default, is what ``dvc.lock`` records, so a checkpoint can name the data it saw."""
    digest = hashlib.new(algorithm)
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


@contextmanager
def atomic_path(path: str | os.PathLike, suffix: str = ".partial") -> Iterator[Path]:
    """A side file to write ``path``'s new content to; renamed over ``path`` when the block ends
    without an exception, deleted when it raises. The parent folder is created."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    partial = path.with_name(path.name + suffix)
    try:
        yield partial
    except BaseException:
        partial.unlink(missing_ok=True)
        raise
    os.replace(partial, path)


@contextmanager
def atomic_write(path: str | os.PathLike, mode: str = "w", suffix: str = ".partial") -> Iterator[IO]:
    """``open(path, mode)``, atomically (:func:`atomic_path`). Text is UTF-8, with newlines as written."""
    text = {} if "b" in mode else {"encoding": "utf-8", "newline": ""}
    with atomic_path(path, suffix) as partial, open(partial, mode, **text) as handle:
        yield handle


def write_json(path: str | os.PathLike, payload: dict) -> None:
    """Sorted, indented JSON with a final newline, written atomically."""
    with atomic_write(path) as handle:
        handle.write(json.dumps(payload, indent=2, sort_keys=True) + "\n")
