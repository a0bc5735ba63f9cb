"""What a command may write over. A training run starts in a missing or empty out dir, continues the run
already there (``resume``), or moves that run aside to a timestamped sibling first (``overwrite``); the
other commands' output files are refused where they exist unless ``--overwrite`` is given. Nothing is
deleted."""

import os
import time
import warnings
from pathlib import Path

CHECKPOINT = Path("checkpoints") / "last.pt"


class OutDirError(ValueError):
    """The out dir (or an output file) holds something the command would overwrite."""


def _is_main_process() -> bool:
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


def prepare_out_dir(out_dir: str | os.PathLike, *, resume: bool, overwrite: bool) -> Path:
    """Check ``out_dir`` for a new run (or a resumed one) and return it as a ``Path``; nothing is created.

    - missing or empty: returned as is;
    - non-empty and ``resume``: returned as is if it holds ``checkpoints/last.pt`` to continue from,
      else :class:`OutDirError` (a fresh start would replace its ``metrics.jsonl`` and ``config.json``);
    - non-empty and ``overwrite``: the directory is renamed to ``<out_dir>.old-<timestamp>`` beside it
      (with a warning naming the new place; only on rank 0 under torchrun) and ``out_dir`` is returned,
      now missing;
    - non-empty otherwise: :class:`OutDirError` naming ``--resume`` and ``--overwrite``.

    ``resume`` and ``overwrite`` together, or an ``out_dir`` that is a file, raise :class:`OutDirError`.
    """
    out = Path(out_dir)
    if resume and overwrite:
        raise OutDirError("--resume continues the run in the out dir and --overwrite moves it aside: pass one of them")
    if out.exists() and not out.is_dir():
        raise OutDirError(f"out dir {str(out)!r} exists and is not a directory")
    if not out.is_dir() or not any(out.iterdir()):
        return out
    if resume:
        if not (out / CHECKPOINT).is_file():
            raise OutDirError(
                f"nothing to resume in {str(out)!r}: it is not empty but has no {CHECKPOINT.as_posix()}; "
                "pass --overwrite to move it aside and start afresh, or choose another --out-dir"
            )
        return out
    if overwrite:
        if _is_main_process():
            aside = _aside_path(out)
            out.rename(aside)
            warnings.warn(f"moved the previous contents of {str(out)!r} to {str(aside)!r}", UserWarning, stacklevel=2)
        return out
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
