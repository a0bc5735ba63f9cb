"""Denoiser backbones, one module each (importing this package registers them in :data:`BACKBONES`):
:mod:`.unet` (``unet``, ``unet-cond``), :mod:`.dit`, :mod:`.sd3`, :mod:`.uvit`; the protocol, the spec, the
condition and the registry are in :mod:`.base`."""

from srdiff.trainer.backbones import dit, sd3, unet, uvit
from srdiff.trainer.backbones.base import BACKBONES, Backbone, Condition, DenoiserSpec, get_backbone, register_backbone

__all__ = ["BACKBONES", "Backbone", "Condition", "DenoiserSpec", "dit", "get_backbone", "register_backbone", "sd3",
           "unet", "uvit"]
