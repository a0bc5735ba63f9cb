"""Denoisers srdiff defines itself (diffusers has no U-ViT): :class:`UViT`."""

from srdiff.models.uvit import UViT, UViTConfig, UViTOutput

__all__ = ["UViT", "UViTConfig", "UViTOutput"]
