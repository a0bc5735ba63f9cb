// Shared pieces of the Grad-CAM reduction: argument checks (used by every backend, so a direct
// torch.ops.srdiff.gradcam_reduce call gets the same ValueError/TypeError as the Python wrapper),
// the errors for non-finite inputs and the per-image normalisation epsilon.
#pragma once

#include <ATen/core/Tensor.h>
#include <c10/util/OptionalArrayRef.h>
#include <c10/util/StringUtil.h>

#include <string>

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

// What a backend's own passes flag, per image: a channel mean of the gradients that is not finite, and
// a weighted sum over channels (the map before its ReLU, which would turn NaN and -inf into 0) that is
// not finite. Non-finite activations show up in the second, non-finite gradients in both.
enum NonFinite : int { kGradientMean = 1, kWeightedSum = 2 };

namespace detail {
// "found N non-finite value(s) of M (the first in image b)" when `t` holds NaN/inf, else empty.
inline std::string nonfinite_values(const at::Tensor& t) {
  const at::Tensor nonfinite = t.isfinite().logical_not();
  const int64_t count = nonfinite.sum().item<int64_t>();
  if (count == 0) return "";
  const int64_t image = nonfinite.flatten(1).any(1).to(at::kInt).argmax().item<int64_t>();
  return c10::str("found ", count, " non-finite value(s) of ", t.numel(), " (the first in image ", image, ")");
}
}  // namespace detail

// Called only when a backend flagged something (`flags`: NonFinite bits), to say what is wrong:
// non-finite gradients, non-finite activations, or finite values whose float32 sums overflow. The
// reference path (srdiff.reference.gradcam) raises the same messages.
[[noreturn]] inline void raise_nonfinite(const at::Tensor& activations, const at::Tensor& gradients, int flags) {
  const std::string in_gradients = detail::nonfinite_values(gradients);
  TORCH_CHECK_VALUE(in_gradients.empty(), "gradcam_reduce: gradients must be finite, ", in_gradients,
                    ": the classifier's score diverged, a map made from it would point anywhere");
  const std::string in_activations = detail::nonfinite_values(activations);
  TORCH_CHECK_VALUE(in_activations.empty(), "gradcam_reduce: activations must be finite, ", in_activations,
                    ": the layer's output diverged, a map made from it would point anywhere");
  TORCH_CHECK_VALUE(!(flags & kGradientMean),
                    "gradcam_reduce: gradients must be finite after averaging, but a float32 sum over (h, w) ",
                    "overflows (largest |gradient| ", gradients.abs().max().item<double>(),
                    "): scale the target score down");
  TORCH_CHECK_VALUE(false, "gradcam_reduce: the gradient-weighted sum of activations over channels must be finite, ",
                    "but a float32 sum overflows (largest |activation| ", activations.abs().max().item<double>(),
                    "): scale the target score or the layer's output down");
}

}  // namespace srdiff
