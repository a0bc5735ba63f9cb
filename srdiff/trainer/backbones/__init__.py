"""Denoiser backbones (see :mod:`.base`)."""

from srdiff.trainer.backbones.base import BACKBONES, Backbone, Condition, DenoiserSpec, get_backbone, register_backbone

__all__ = ["BACKBONES", "Backbone", "Condition", "DenoiserSpec", "get_backbone", "register_backbone"]
