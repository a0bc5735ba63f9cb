// Shared pieces of the Grad-CAM reduction: argument checks (used by every backend, so a direct
// torch.ops.srdiff.gradcam_reduce call gets the same ValueError/TypeError as the Python wrapper),
// the error for non-finite gradients and the per-image normalisation epsilon.
#pragma once

#include <ATen/core/Tensor.h>
#include <c10/util/OptionalArrayRef.h>

namespace srdiff {

// pytorch-grad-cam's scale_cam_image: (cam - min) / (1e-7 + max - min). A constant map becomes 0.
constexpr float kNormalizeEps = 1e-7f;

inline void check_gradcam_args(const at::Tensor& activations, const at::Tensor& gradients,
                               at::OptionalIntArrayRef size) {
  TORCH_CHECK_VALUE(activations.dim() == 4, "gradcam_reduce: activations must be (B, C, h, w), got shape ",
                    activations.sizes());
  TORCH_CHECK_VALUE(gradients.sizes() == activations.sizes(), "gradcam_reduce: gradients shape ",
                    gradients.sizes(), " must equal activations shape ", activations.sizes());
  TORCH_CHECK_TYPE(at::isFloatingType(activations.scalar_type()),
                   "gradcam_reduce: activations must be floating point, got ", activations.scalar_type());
  TORCH_CHECK_TYPE(gradients.scalar_type() == activations.scalar_type(), "gradcam_reduce: gradients dtype ",
                   gradients.scalar_type(), " must equal activations dtype ", activations.scalar_type());
  TORCH_CHECK_VALUE(gradients.device() == activations.device(), "gradcam_reduce: gradients on ",
                    gradients.device(), " but activations on ", activations.device());
  TORCH_CHECK_VALUE(activations.numel() > 0, "gradcam_reduce: activations must be non-empty, got shape ",
                    activations.sizes());
  if (size.has_value()) {
    TORCH_CHECK_VALUE(size->size() == 2 && (*size)[0] > 0 && (*size)[1] > 0,
                      "gradcam_reduce: size must be two positive ints (H, W), got ", *size);
  }
}

// The backends flag an image whose gradient channel sums are not finite during their own pass over
// the gradients; only then is this called, to say what is wrong: non-finite values (how many, the
// first image holding one) or finite values whose float32 sum overflows.
[[noreturn]] inline void raise_nonfinite_gradients(const at::Tensor& gradients) {
  const at::Tensor nonfinite = gradients.isfinite().logical_not();
  const int64_t count = nonfinite.sum().item<int64_t>();
  if (count > 0) {
    const int64_t image = nonfinite.flatten(1).any(1).to(at::kInt).argmax().item<int64_t>();
    TORCH_CHECK_VALUE(false, "gradcam_reduce: gradients must be finite, found ", count, " non-finite value(s) of ",
                      gradients.numel(), " (the first in image ", image,
                      "): the classifier's score diverged, a map made from it would point anywhere");
  }
  TORCH_CHECK_VALUE(false, "gradcam_reduce: gradients must be finite after averaging, but a float32 sum over (h, w) ",
                    "overflows (largest |gradient| ", gradients.abs().max().item<double>(),
                    "): scale the target score down");
}

}  // namespace srdiff
