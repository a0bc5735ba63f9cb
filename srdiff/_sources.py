"""Which files make up the extension srdiff._C, and their digest.

Used by setup.py (compiled into the binary) and by srdiff at import (to spot a stale build), so the
two always hash the same list. Imports nothing beyond the standard library.
"""

import glob
import hashlib
import os


def extension_sources(root: str) -> tuple[list[str], list[str], list[str]]:
    """(C++ sources, CUDA sources, headers) under ``root/csrc``, relative to ``root``, sorted."""

    def find(*patterns: str) -> list[str]:
        found = (glob.glob(os.path.join(root, "csrc", p), recursive=True) for p in patterns)
        return sorted(os.path.relpath(f, root) for group in found for f in group)

    return find("*.cpp", "cpu/*.cpp"), find("cuda/*.cu"), find("**/*.h")


def sources_digest(root: str) -> str:
    """A short hash of every extension source (CUDA included, whether or not it is built)."""
    h = hashlib.sha256()
    for group in extension_sources(root):
        for path in group:
            h.update(path.encode())
            with open(os.path.join(root, path), "rb") as f:
                h.update(f.read())
    return h.hexdigest()[:16]
