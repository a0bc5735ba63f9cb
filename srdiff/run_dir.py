"""What a command may write over. A training run starts in a missing or empty out dir, continues the run
already there (``resume``), or moves that run aside to a timestamped sibling first (``overwrite``); the
other commands' output files are refused where they exist unless ``--overwrite`` is given. Nothing is
deleted.

A run holds :class:`RunLock` (an ``flock`` on ``<out_dir>/srdiff.lock``) while it writes: a second run on the
same folder is refused, naming the holder's pid. The kernel drops the lock when the process ends, however
it ends, so a killed run leaves nothing stale. A folder without ``checkpoints/last.pt`` whose every entry is
one a run writes (:data:`RUN_ENTRIES`) is a start that failed: it is not a run, and the next start moves
what it wrote aside (:func:`set_aside_failed_start`) instead of refusing the folder."""

import fcntl
import os
import socket
import time
import warnings
from pathlib import Path

CHECKPOINT = Path("checkpoints") / "last.pt"
LOCK = "srdiff.lock"
# What a training run writes in its out dir (besides LOCK).
RUN_ENTRIES = ("config.json", "metrics.jsonl", "checkpoints", "figures", "highlighter.pt", "samples.png", "pipeline",
               "eval.json")
_LOCK_TRIES, _LOCK_WAIT_S = 5, 0.02  # a lock_holder() check holds the lock for microseconds


class OutDirError(ValueError):
    """The out dir (or an output file) holds something the command would overwrite, or another run uses it."""


def is_main_process() -> bool:
    """Rank 0 of a torchrun launch (``RANK``, as :func:`srdiff.trainer.distributed.init` reads it), or a plain
    process: only it moves a run aside, the other ranks only check."""
    return int(os.environ.get("RANK", "0")) == 0


def _aside_path(out: Path) -> Path:
    """``<out>.old-YYYYmmdd-HHMMSS`` beside ``out`` (with ``-1``, ``-2``, ... when that is taken)."""
    stem = f"{out.name}.old-{time.strftime('%Y%m%d-%H%M%S')}"
    candidate, n = out.with_name(stem), 0
    while candidate.exists():
        n += 1
        candidate = out.with_name(f"{stem}-{n}")
    return candidate


def _in_use(out: Path, holder: str) -> OutDirError:
    return OutDirError(f"out dir {str(out)!r} is in use by another srdiff run ({holder or 'pid unknown'}): wait for "
                       "it to end or stop it, or choose another --out-dir")


class RunLock:
    """The advisory lock of a run on ``out_dir`` (``fcntl.flock`` on ``out_dir/srdiff.lock``, which holds the
    holder's pid and host). :meth:`acquire` creates ``out_dir`` and raises :class:`OutDirError` naming the
    holder where another process holds it; the lock is released by :meth:`release`, or by the kernel when
    the process ends (SIGKILL and OOM kills included): no stale lock to remove by hand.

    Example::

        with RunLock("runs/x"):
            ...  # write the run
    """

    def __init__(self, out_dir: str | os.PathLike):
        self.path = Path(out_dir) / LOCK
        self._fd: int | None = None

    def acquire(self) -> "RunLock":
        self.path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o666)
        for attempt in range(_LOCK_TRIES):
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                if attempt == _LOCK_TRIES - 1:
                    holder = os.pread(fd, 256, 0).decode(errors="replace").strip()
                    os.close(fd)
                    raise _in_use(self.path.parent, holder) from None
                time.sleep(_LOCK_WAIT_S)
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"pid {os.getpid()} on {socket.gethostname()}\n".encode(), 0)
        self._fd = fd
        return self

    def release(self) -> None:
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None

    def __enter__(self) -> "RunLock":
        return self.acquire()

    def __exit__(self, *exc) -> None:
        self.release()


def lock_holder(out_dir: str | os.PathLike) -> str | None:
    """Who holds ``out_dir``'s :class:`RunLock` ("pid N on HOST"), or None where nobody does or this process
    does."""
    path = Path(out_dir) / LOCK
    if not path.is_file():
        return None
    fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    try:
        fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
        fcntl.flock(fd, fcntl.LOCK_UN)
        return None
    except BlockingIOError:
        holder = os.pread(fd, 256, 0).decode(errors="replace").strip()
        return None if holder.startswith(f"pid {os.getpid()} on {socket.gethostname()}") else holder
    finally:
        os.close(fd)


def _entries(out: Path) -> list[Path]:
    """What ``out`` holds besides the lock file."""
    return sorted(p for p in out.iterdir() if p.name != LOCK)


def is_failed_start(out_dir: str | os.PathLike) -> bool:
    """Whether ``out_dir`` holds what a run writes (:data:`RUN_ENTRIES`, at least one) and nothing else, but no
    ``checkpoints/last.pt``: a start that failed (diverged, killed, crashed) before its first checkpoint."""
    out = Path(out_dir)
    entries = _entries(out) if out.is_dir() else []
    return bool(entries) and not (out / CHECKPOINT).is_file() and all(p.name in RUN_ENTRIES for p in entries)


def set_aside_failed_start(out_dir: str | os.PathLike) -> Path | None:
    """Move what a failed start (:func:`is_failed_start`) left in ``out_dir`` to a new ``<out_dir>.old-<timestamp>``
    beside it, with a warning naming both, so a new run starts there; returns that folder, or None where
    ``out_dir`` holds no failed start. The lock file stays. Call it holding ``out_dir``'s :class:`RunLock`."""
    out = Path(out_dir)
    if not is_failed_start(out):
        return None
    entries = _entries(out)
    aside = _aside_path(out)
    aside.mkdir()
    for entry in entries:
        entry.rename(aside / entry.name)
    warnings.warn(f"{str(out)!r} held a start that wrote no checkpoint ({', '.join(p.name for p in entries)}): "
                  f"moved it to {str(aside)!r}, starting afresh", UserWarning, stacklevel=2)
    return aside


def prepare_out_dir(out_dir: str | os.PathLike, *, resume: bool, overwrite: bool) -> Path:
    """Check ``out_dir`` for a new run (or a resumed one) and return it as a ``Path``; nothing is created.

    - used by another process (:func:`lock_holder`): :class:`OutDirError` naming its pid;
    - missing, empty (the lock file aside) or a failed start (:func:`is_failed_start`, set aside when the
      run starts): returned as is, also with ``resume`` (there is nothing to continue);
    - holding a run (``checkpoints/last.pt``) and ``resume``: returned as is;
    - non-empty and ``overwrite``: the directory is renamed to ``<out_dir>.old-<timestamp>`` beside it
      (with a warning naming the new place; only on rank 0 under torchrun) and ``out_dir`` is returned,
      now missing;
    - non-empty otherwise: :class:`OutDirError` naming ``--resume`` and ``--overwrite`` (a fresh start would
      replace its ``metrics.jsonl`` and ``config.json``), or, with ``resume`` and files no run wrote,
      that there is nothing to resume.

    ``resume`` and ``overwrite`` together, or an ``out_dir`` that is a file, raise :class:`OutDirError`.
    """
    out = Path(out_dir)
    if resume and overwrite:
        raise OutDirError("--resume continues the run in the out dir and --overwrite moves it aside: pass one of them")
    if out.exists() and not out.is_dir():
        raise OutDirError(f"out dir {str(out)!r} exists and is not a directory")
    if not out.is_dir():
        return out
    holder = lock_holder(out)
    if holder is not None:
        raise _in_use(out, holder)
    if not _entries(out) or is_failed_start(out):
        return out
    has_run = (out / CHECKPOINT).is_file()
    if resume and has_run:
        return out
    if overwrite:
        if is_main_process():
            aside = _aside_path(out)
            out.rename(aside)
            warnings.warn(f"moved the previous contents of {str(out)!r} to {str(aside)!r}", UserWarning, stacklevel=2)
        return out
    if resume:
        raise OutDirError(
            f"nothing to resume in {str(out)!r}: it has no {CHECKPOINT.as_posix()} and holds files no run wrote; "
            "pass --overwrite to move it aside and start afresh, or choose another --out-dir"
        )
    raise OutDirError(
        f"out dir {str(out)!r} is not empty: pass --resume to continue the run there, --overwrite to move it aside "
        f"(to {out.name}.old-<timestamp>) and start afresh, or choose another --out-dir"
    )


def refuse_existing(paths, *, overwrite: bool, flag: str = "--overwrite") -> None:
    """Raise :class:`OutDirError` naming the ``paths`` that exist, unless ``overwrite`` (the user passed
    ``flag``). Called before the work, so a refusal costs nothing."""
    existing = [str(p) for p in paths if Path(p).exists()]
    if existing and not overwrite:
        more = f" (and {len(existing) - 3} more)" if len(existing) > 3 else ""
        raise OutDirError(f"would overwrite {', '.join(existing[:3])}{more}: pass {flag} to replace them, or choose "
                          "other output paths")
