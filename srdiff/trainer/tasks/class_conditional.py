"""Class-conditional generation with classifier-free guidance (Ho & Salimans 2022).

Training drops each label to the null class (index ``num_classes``) with probability
``config.condition_dropout``, so one model learns both the conditional and the unconditional
prediction; sampling mixes them as ``ε_u + s (ε_c - ε_u)`` with ``s = config.guidance_scale``.
The mFAM is refreshed from guided samples of uniformly drawn classes.
"""

import os
from pathlib import Path

import torch

from srdiff.trainer.backbones.base import Condition, DenoiserSpec
from srdiff.diffusion.seeding import drop_conditions, per_image_choice
from srdiff.trainer.task import Batch, DenoisingTask, register_task


@register_task
class ClassConditional(DenoisingTask):
    """Class labels from the dataset (:mod:`srdiff.labels`: the digits and mnist have them, an image folder
    has them in class subfolders or a labels file, a tensor file in a labels file)."""

    name = "class"
    condition = "class"
    #: class index -> name, where the labels name their classes (class folders, named labels)
    class_names: list[str] | None = None

    def setup(self, data) -> None:
        super().setup(data)
        if data.train_labels is None:
            raise ValueError(f"task 'class' needs labelled data; data {self.config.data!r} has no labels: use "
                             "'digits' or 'mnist', an image folder with one subfolder per class (root/<class>/"
                             "<image>), or labels=FILE, a .csv / .jsonl file with a label per image (see srdiff.labels)")
        self.class_names = data.class_names
        num_classes = int(max(data.train_labels.max(), data.holdout_labels.max())) + 1
        if self.config.num_classes and self.config.num_classes < num_classes:
            raise ValueError(f"num_classes {self.config.num_classes} is smaller than the data's {num_classes} "
                             "classes")
        self.spec = DenoiserSpec(**{**self.spec.to_dict(), "num_classes": self.config.num_classes or num_classes})

    @property
    def num_classes(self) -> int:
        return self.spec.num_classes

    def state_dict(self) -> dict:
        return {**super().state_dict(), "class_names": self.class_names}

    def load_state_dict(self, state: dict) -> None:
        super().load_state_dict(state)
        self.class_names = state.get("class_names")

    def batch(self, indices: torch.Tensor, *, step: int, micro: int) -> Batch:
        labels = drop_conditions(self.data.train_labels[indices], self.num_classes, self.config.condition_dropout,
                                 seed=self.config.seed, step=step, micro=micro)
        return Batch(x0=self.data.train_data[indices].to(self.device),
                     cond=Condition(class_labels=labels.to(self.device)))

    def check_labels(self, labels) -> torch.Tensor:
        """``labels`` (one per image: a sequence or an (n,) tensor of ints) as (n,) int64 in [0, num_classes);
        anything else raises (``TypeError``: not integers; ``ValueError``: shape, range)."""
        labels = torch.as_tensor(labels)
        if labels.is_floating_point() or labels.is_complex() or labels.dtype == torch.bool:
            raise TypeError(f"class labels must be integers, got dtype {labels.dtype}")
        if labels.dim() != 1:
            raise ValueError(f"class labels must hold one label per image, shape (n,), got shape "
                             f"{tuple(labels.shape)}")
        labels = labels.long()
        bad = labels[(labels < 0) | (labels >= self.num_classes)]
        if len(bad):
            raise ValueError(f"class labels must be in [0, {self.num_classes}), got {bad[0].item()}")
        return labels

    def sample_conditions(self, indices: torch.Tensor, seed: int) -> Condition:
        return self.labels_condition(per_image_choice(self.num_classes, indices, seed))

    def labels_condition(self, labels) -> Condition:
        """The condition that samples ``labels`` (one per image)."""
        return Condition(class_labels=self.check_labels(labels).to(self.device))

    def null_condition(self, n: int) -> Condition:
        return Condition(class_labels=torch.full((n,), self.num_classes, dtype=torch.long, device=self.device))

    def export(self, model, out_dir: str | os.PathLike) -> Path:
        """Folders (:meth:`export_folders`) with ``num_classes``, ``null_class``, ``class_names`` (or null) and
        ``guidance_scale`` in ``srdiff_task.json``: diffusers has no pipeline for class-conditional pixel
        models, so load the model with ``<ModelClass>.from_pretrained(out_dir, subfolder=...)`` and sample
        with ``class_labels=`` (the null class is ``num_classes``)."""
        return self.export_folders(model, out_dir, num_classes=self.num_classes, null_class=self.num_classes,
                                   class_names=self.class_names, guidance_scale=self.config.guidance_scale)
