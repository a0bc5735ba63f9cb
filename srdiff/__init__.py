"""srdiff: fused kernels and a trainer for self-refining diffusion (arXiv 2512.08774).

A flaw highlighter's Grad-CAM maps (FAMs) steer diffusion training twice: noise amplification in
the forward process and K/V modulation in attention. ``import srdiff`` is cheap and never touches
the GPU: it loads the C++ extension (warning once if it is missing or stale) and resolves every other
public name on first use.
"""

import importlib

from srdiff import _extension
from srdiff._extension import HAS_EXT as has_extension

__version__ = "0.2.0"

# public name -> module that defines it (imported on first access)
_PUBLIC = {
    "gradcam_reduce": "srdiff.gradcam",
    "fam_attention": "srdiff.attention",
    "FAMAttention": "srdiff.attention",
    "fam_linear_attention": "srdiff.linear_attention",
    "fam_to_tokens": "srdiff.fam_embedding",
    "FAMProjection": "srdiff.fam_embedding",
    "FAMAttnProcessor": "srdiff.processors",
    "FAMJointAttnProcessor": "srdiff.processors",
    "FAMFluxAttnProcessor": "srdiff.processors",
    "set_fam_attn_processor": "srdiff.processors",
    "remove_fam_attn_processor": "srdiff.processors",
    "fam_context": "srdiff.processors",
    "active_mfam": "srdiff.processors",
    "fam_layers": "srdiff.processors",
    "fam_parameters": "srdiff.processors",
    "UViT": "srdiff.models",
    "UViTConfig": "srdiff.models",
    "amplified_add_noise": "srdiff.noise",
    "amplified_noise_loss": "srdiff.noise",
    "FlawHighlighter": "srdiff.highlighter",
    "Refiner": "srdiff.refiner",
    "HighlighterRecipe": "srdiff.refiner",
    "SelfRefiningTrainer": "srdiff.trainer",
    "TrainConfig": "srdiff.trainer",
    "load_trained": "srdiff.trainer.trained",
    "repair_flaws": "srdiff.repair",
    "FlawRepairPipeline": "srdiff.repair_pipeline",
}

__all__ = sorted(_PUBLIC) + ["has_extension", "__version__"]


def __getattr__(name: str):
    if name in _PUBLIC:
        value = getattr(importlib.import_module(_PUBLIC[name]), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'srdiff' has no attribute {name!r}")


def __dir__():
    return __all__
