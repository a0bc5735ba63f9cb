"""Class labels of a data source, one per image in the order :mod:`srdiff.data` reads the images.

Where they come from (``TrainConfig.labels``):

- ``"auto"`` (the default): the built-in sets' own (``digits``, ``mnist``); an image folder's class
  subfolders where it has the ImageFolder layout (every image below a subfolder of the root, at least two
  of them: ``root/<class>/.../<image>``); none otherwise.
- ``"folders"``: the class subfolders, required (an image in the root is refused).
- ``"none"``: no labels.
- a ``.csv`` file (with a header) or a ``.jsonl`` file (one object per line) with a ``label`` per image:
  named by ``file_name`` (relative to the folder, as in a ``metadata.jsonl``) for an image folder, by
  ``index`` (0-based) for a tensor file. Every image needs exactly one label, and every line an image.

Labels (or class folder names) that are all whole numbers >= 0 are those classes; any others are class
names, numbered in sorted order (torchvision's ``ImageFolder`` convention), and kept as the class names.
"""

import csv
import json
import os
from pathlib import Path

import torch

from srdiff import data as srdata
from srdiff import datasets

LABEL_SOURCES = ("auto", "folders", "none")
LABEL_FILE_SUFFIXES = (".csv", ".jsonl")


def check_labels_source(labels: str) -> None:
    """Raise ``ValueError`` unless ``labels`` is one of :data:`LABEL_SOURCES` or a ``.csv`` / ``.jsonl`` path."""
    if labels not in LABEL_SOURCES and Path(labels).suffix.lower() not in LABEL_FILE_SUFFIXES:
        raise ValueError(f"labels must be one of {LABEL_SOURCES} or a .csv / .jsonl file, got {labels!r}")


def load_labelled(source: str | os.PathLike, size: int, channels: int, labels: str = "auto"
                  ) -> tuple[torch.Tensor, torch.Tensor | None, list[str] | None]:
    """The images of ``source`` as :func:`srdiff.data.load_images` reads them, their class labels ((N,)
    int64, or None) and the class names where the source has them (index -> name, else None)."""
    check_labels_source(labels)
    path = Path(source)
    if str(source) == "digits" or str(source) in datasets.NAMED:
        if labels not in ("auto", "none"):
            raise ValueError(f"labels={labels!r} is for image folders and tensor files; data {str(source)!r} has its "
                             "own labels (or none): use 'auto' or 'none'")
        images = srdata.load_images(source, size, channels)
        return images, srdata.load_labels(source, size) if labels == "auto" else None, None
    if path.is_dir():
        images, paths = srdata.read_image_folder(path, size, channels)
        keys = [p.relative_to(path).as_posix() for p in paths]
        if labels in ("auto", "folders"):
            found = _folder_classes(path, keys, required=labels == "folders")
            return images, *(found if found else (None, None))
        return images, *(_from_file(labels, "file_name", keys, root=path) if labels != "none" else (None, None))
    if labels == "folders":
        raise ValueError(f"labels='folders' needs an image folder in the ImageFolder layout; {str(source)!r} is a file")
    images = srdata.load_images(source, size, channels)
    if labels in ("auto", "none"):
        return images, None, None
    return images, *_from_file(labels, "index", [str(i) for i in range(len(images))])


def _numbered(labels: list) -> tuple[torch.Tensor, list[str] | None]:
    """Whole numbers >= 0 as they are; anything else as names numbered in sorted order (and the names)."""
    if all(isinstance(v, int) and not isinstance(v, bool) and v >= 0 or isinstance(v, str) and v.isdigit()
           for v in labels):
        return torch.tensor([int(v) for v in labels], dtype=torch.long), None
    names = sorted({str(v) for v in labels})
    index = {name: i for i, name in enumerate(names)}
    return torch.tensor([index[str(v)] for v in labels], dtype=torch.long), names


def _folder_classes(root: Path, keys: list[str], required: bool) -> tuple[torch.Tensor, list[str] | None] | None:
    """The class subfolder of every image (``keys``: paths relative to ``root``) as labels and names, or None
    where the folder is not in the ImageFolder layout (``required``: ``ValueError`` instead)."""
    in_root = [k for k in keys if "/" not in k]
    classes = [k.split("/", 1)[0] for k in keys]
    if not in_root and (len(set(classes)) >= 2 or required):
        return _numbered(classes)
    if required:
        raise ValueError(f"labels='folders' needs the ImageFolder layout (root/<class>/<image>), but "
                         f"{len(in_root)} image(s) of {str(root)!r} sit in its root, e.g. {in_root[0]!r}")
    return None


def _records(path: Path) -> list[tuple[str, dict]]:
    """(where, record) for every row of a .csv file with a header or every line of a .jsonl file."""
    if not path.is_file():
        raise ValueError(f"labels file {str(path)!r} does not exist")
    if path.suffix.lower() == ".csv":
        with path.open(newline="") as f:
            return [(f"{path}, line {i}", row) for i, row in enumerate(csv.DictReader(f), start=2)]
    out = []
    for i, line in enumerate(path.read_text().splitlines(), start=1):
        if line.strip():
            try:
                record = json.loads(line)
            except json.JSONDecodeError as exc:
                raise ValueError(f"{path}, line {i} is not JSON: {exc}") from None
            out.append((f"{path}, line {i}", record))
    return out


def _from_file(labels: str, key: str, keys: list[str], root: Path | None = None
               ) -> tuple[torch.Tensor, list[str] | None]:
    """The label of every image ``keys`` names (``key``: ``file_name`` relative to the folder ``root``, or
    ``index``) from the labels file ``labels``. Lines naming a file of ``root`` that could not be read (skipped
    with a warning) are passed over."""
    path, found, known = Path(labels), {}, set(keys)
    for where, record in _records(path):
        if not isinstance(record, dict) or record.get(key) in (None, "") or record.get("label") in (None, ""):
            raise ValueError(f"{where} must give {key!r} and 'label', got {record!r}")
        name = Path(str(record[key])).as_posix() if key == "file_name" else str(record[key]).strip()
        if name not in known and root is not None and (root / name).is_file() and \
                Path(name).suffix.lower() in srdata.IMAGE_SUFFIXES:
            continue  # an unreadable image, skipped with a warning when the folder was read
        if name not in known:
            raise ValueError(f"{where} names {key} {record[key]!r}, which is not an image of the data "
                             f"({len(keys)} images{', indices 0..' + str(len(keys) - 1) if key == 'index' else ''})")
        if name in found:
            raise ValueError(f"{where} names {key} {record[key]!r} a second time")
        found[name] = record["label"]
    missing = [k for k in keys if k not in found]
    if missing:
        raise ValueError(f"labels file {str(path)!r} gives no label for {len(missing)} of {len(keys)} images, e.g. "
                         f"{key} {missing[0]!r}")
    return _numbered([found[k] for k in keys])
