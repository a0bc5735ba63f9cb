"""Pure-PyTorch references: the oracles the kernels are tested against, the CPU fallbacks, and the
"same-precision PyTorch" baselines of the benchmarks. Each upcasts to float32 unless ``upcast=False``."""

from srdiff.reference.attention import fam_attention_ref, fam_attention_sdpa
from srdiff.reference.gradcam import gradcam_reduce_ref
from srdiff.reference.linear_attention import fam_linear_attention_ref
from srdiff.reference.noise import amplified_add_noise_ref, amplified_noise_loss_ref

__all__ = [
    "amplified_add_noise_ref",
    "amplified_noise_loss_ref",
    "fam_attention_ref",
    "fam_attention_sdpa",
    "fam_linear_attention_ref",
    "gradcam_reduce_ref",
]
