"""Files srdiff writes and reads back: one atomic ``torch.save`` for checkpoints, highlighters and caches that
survives a kill at any moment, file modes that follow the umask as ``open()`` gives them, and one
``torch.load`` that says in a line what a file it cannot read is."""

import os
import tempfile
from pathlib import Path

import torch


def umask() -> int:
    """The process's umask, read from ``/proc/self/status`` where Linux has it (nothing changes), else set
    and restored at once."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("Umask:"):
                return int(line.split()[1], 8)
    except OSError:
        pass
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def new_file_mode() -> int:
    """The mode ``open(path, "w")`` gives a new file: 0o666 less the umask."""
    return 0o666 & ~umask()


def follow_umask(folder: str | os.PathLike) -> Path:
    """Give the ``*.safetensors`` files under ``folder`` :func:`new_file_mode` (safetensors, which every
    ``save_pretrained`` writes weights with, creates them 0600 whatever the umask); returns ``folder``."""
    folder = Path(folder)
    mode = new_file_mode()
    for path in folder.rglob("*.safetensors"):
        os.chmod(path, mode)
    return folder


def save_atomic(obj, path: str | os.PathLike) -> Path:
    """``torch.save`` to a temp file beside ``path``, fsync, ``os.replace``, fsync the folder: a reader
    sees the old file or the new one, never a partial write, even after a power cut. The file gets the
    mode ``open()`` would give it (:func:`new_file_mode`; the temp file starts private, 0600)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            os.fchmod(f.fileno(), new_file_mode())
            torch.save(obj, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise
    dir_fd = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(dir_fd)
    finally:
        os.close(dir_fd)
    return path


def load_file(path: str | os.PathLike, expected: str, map_location="cpu"):
    """``torch.load(path, weights_only=True)``: nothing but tensors, numbers, strings and containers of them
    is unpickled. A missing file, or one torch cannot read (truncated, empty, text, a zip or numpy file,
    pickled objects), raises ``ValueError`` naming the path, what it should be (``expected``, e.g. "a
    trainer checkpoint") and torch's reason in one line, never torch's traceback."""
    name = repr(os.fspath(path))
    if not Path(path).is_file():
        raise ValueError(f"{name} does not exist or is not a file (expected {expected})")
    try:
        return torch.load(path, map_location=map_location, weights_only=True)
    except OSError:
        raise
    except Exception as exc:  # torch.load reports an unreadable file as KeyError, EOFError, RuntimeError, ...
        first = str(exc).splitlines()[0] if str(exc) else "-"
        why = ("it holds objects other than tensors, which are not unpickled" if "Weights only load failed" in str(exc)
               else f"torch.load failed with {type(exc).__name__}: {first}")
        raise ValueError(f"{name} is not {expected}: {why}") from None
