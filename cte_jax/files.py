"""Small file-system rules shared by everything that writes results or models."""

from __future__ import annotations

import os
from pathlib import Path


def _umask() -> int:
    mask = os.umask(0)  # the only way to read it: set and restore at once
    os.umask(mask)
    return mask


def as_if_created(path: str | os.PathLike) -> None:
    """Give a temporary file or folder (``tempfile`` makes them private: 0600 / 0700) the
    permissions a plain ``open`` / ``mkdir`` would have given it under the process umask, before
    it is renamed into place: results and model banks are often shared on a lab server."""
    path = Path(path)
    os.chmod(path, (0o777 if path.is_dir() else 0o666) & ~_umask())
