"""Pure-PyTorch references: the oracles the kernels are tested against, the CPU fallbacks, and the
"same-precision PyTorch" baselines of the benchmarks. Each upcasts to float32 unless ``upcast=False``."""

from srdiff.reference.gradcam import gradcam_reduce_ref

__all__ = ["gradcam_reduce_ref"]
