"""Captions for the text-to-image task: an image folder's ``metadata.jsonl`` (the layout diffusers'
``train_text_to_image.py`` reads through ``datasets``' imagefolder: one JSON object per line with
``file_name``, relative to the folder, and ``text``), or generated captions for the labelled built-in
sets ("a handwritten digit seven")."""

import json
from pathlib import Path

from srdiff import data as srdata

DIGIT_WORDS = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine")
METADATA = "metadata.jsonl"


def digit_caption(label: int) -> str:
    """``"a handwritten digit <word>"`` for a digit label 0..9."""
    if not 0 <= int(label) < len(DIGIT_WORDS):
        raise ValueError(f"digit label must be in [0, 10), got {label}")
    return f"a handwritten digit {DIGIT_WORDS[int(label)]}"


def read_metadata(folder: str | Path) -> dict[Path, str]:
    """``{image path: caption}`` from ``folder/metadata.jsonl``; a bad line, a missing key or a
    ``file_name`` that is no file raises ``ValueError`` naming the file and the line."""
    root = Path(folder)
    meta = root / METADATA
    if not meta.is_file():
        raise ValueError(f"data folder {str(folder)!r} has no {METADATA} (one JSON object per line with "
                         "'file_name' and 'text') for task 'text'")
    captions = {}
    for number, line in enumerate(meta.read_text().splitlines(), start=1):
        if not line.strip():
            continue
        where = f"{meta}, line {number}"
        try:
            record = json.loads(line)
        except json.JSONDecodeError as exc:
            raise ValueError(f"{where} is not JSON: {exc}") from None
        if not isinstance(record, dict) or not {"file_name", "text"} <= set(record):
            raise ValueError(f"{where} must be an object with 'file_name' and 'text', got {line.strip()!r}")
        if not isinstance(record["text"], str):
            raise ValueError(f"{where}: 'text' must be a string, got {record['text']!r}")
        path = (root / record["file_name"]).resolve()
        if not path.is_file():
            raise ValueError(f"{where} names image {record['file_name']!r}, which does not exist in {str(folder)!r}")
        if path in captions:
            raise ValueError(f"{where} names image {record['file_name']!r} a second time")
        captions[path] = record["text"]
    return captions


def folder_captions(folder: str | Path) -> list[str]:
    """One caption per image of ``folder``, in the order :func:`srdiff.data.read_image_folder` reads them;
    an image without a caption raises ``ValueError`` naming it."""
    captions = read_metadata(folder)
    out = []
    for path in srdata.image_files(folder):
        if path.resolve() not in captions:
            raise ValueError(f"image {str(path)!r} has no line in {Path(folder) / METADATA}")
        out.append(captions[path.resolve()])
    return out


def train_captions(config, data) -> list[str]:
    """The caption of every training image of ``data`` (a :class:`srdiff.trainer.dataset.Dataset` of
    ``config.data``): a folder's ``metadata.jsonl`` (split as the images were), or generated ones for the
    digits and MNIST."""
    import torch

    if Path(config.data).is_dir():
        every = folder_captions(config.data)
        n = len(data.train_images) + len(data.holdout_images)
        if len(every) != n:
            raise ValueError(f"data folder {config.data!r} lists {len(every)} images but {n} could be read: "
                             "remove the unreadable ones (warned about above) and their metadata lines")
        train_idx, _ = srdata.split(torch.arange(n), config.holdout, seed=config.seed)
        return [every[i] for i in train_idx.tolist()]
    if config.data in ("digits", "mnist") and data.train_labels is not None:
        return [digit_caption(label) for label in data.train_labels.tolist()]
    raise ValueError(f"task 'text' needs captions: data must be 'digits', 'mnist' or an image folder with a "
                     f"{METADATA}, got {config.data!r}")
