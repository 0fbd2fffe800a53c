"""A digest of the sources the images are built from, for the images' labels.

``make images`` labels each image with it (``io.faastube.image.source-digest``) and the
image test compares the label with the working tree's digest: an image built from other
sources is reported as stale instead of being tested as if it were this code.

The paths are the build context that ``.containerignore`` lets through. In a git checkout
the files are git's (tracked, plus untracked ones that are not ignored), so build
outputs and caches don't count; elsewhere every file under those paths but caches.

    python3 hack/source_digest.py [ROOT]

Only the standard library: it runs outside any virtual environment.
"""

from __future__ import annotations

import hashlib
import os
import subprocess
import sys
from pathlib import Path

CONTEXT_PATHS = ("pyproject.toml", "README.md", "sidecar", "operator", "examples", "images")
_SKIP_PARTS = {"__pycache__", ".mypy_cache", ".pytest_cache"}


def _git_files(root: Path) -> list[str] | None:
    try:
        out = subprocess.run(
            ["git", "-C", str(root), "ls-files", "-z", "--cached", "--others", "--exclude-standard",
             "--", *CONTEXT_PATHS],
            check=True, capture_output=True).stdout
    except (OSError, subprocess.CalledProcessError):
        return None
    return sorted({name for name in out.decode().split("\0") if name})


def _walked_files(root: Path) -> list[str]:
    names = []
    for top in CONTEXT_PATHS:
        path = root / top
        if path.is_file():
            names.append(top)
            continue
        for directory, subdirs, files in os.walk(path):
            subdirs[:] = [d for d in subdirs if d not in _SKIP_PARTS and not d.endswith(".egg-info")]
            names.extend(str(Path(directory, f).relative_to(root)) for f in files
                         if not f.endswith(".pyc"))
    return sorted(names)


def _included(name: str) -> bool:
    parts = Path(name).parts
    return not (set(parts) & _SKIP_PARTS or name.endswith(".pyc")
                or any(p.endswith(".egg-info") for p in parts))


def source_digest(root: Path) -> str:
    """sha256 over each file's path and bytes, in path order (12 hex digits)."""
    names = _git_files(root)
    if names is None:
        names = _walked_files(root)
    digest = hashlib.sha256()
    for name in names:
        path = root / name
        if not _included(name) or not path.is_file():   # deleted but still in git's index
            continue
        digest.update(name.encode() + b"\0")
        digest.update(hashlib.sha256(path.read_bytes()).digest())
    return digest.hexdigest()[:12]


if __name__ == "__main__":
    print(source_digest(Path(sys.argv[1] if len(sys.argv) > 1 else Path(__file__).parents[1])))
