// srdiff._C: the operator schemas, defined once. Backends register in csrc/cpu and csrc/cuda.
// No pybind: importing the module only loads this library, which registers the operators.
#include <Python.h>
#include <torch/library.h>

#include <string>

extern "C" {
PyObject* PyInit__C(void) {
  static struct PyModuleDef module_def = {PyModuleDef_HEAD_INIT, "_C", nullptr, -1, nullptr};
  return PyModule_Create(&module_def);
}
}

namespace srdiff {

// What this binary was built from, so srdiff can warn when the sources or torch moved on.
std::string build_info() {
  return std::string("sources=") + SRDIFF_SOURCES_DIGEST + ";torch=" + SRDIFF_TORCH_VERSION +
         ";cuda=" + (SRDIFF_WITH_CUDA ? "1" : "0");
}

TORCH_LIBRARY(srdiff, m) {
  // activations, gradients: (B, C, h, w) -> (B, h, w) or (B, H, W) with size=(H, W); float32 out.
  // check_finite: raise ValueError if gradients or activations hold NaN/inf (tested on the kernels' own
  // passes: the gradient channel means, the weighted sums before the ReLU).
  m.def(
      "gradcam_reduce(Tensor activations, Tensor gradients, int[]? size=None, bool normalize=True, "
      "bool check_finite=True) -> Tensor");
  // Noise amplification and the ε-loss (CPU kernels; CUDA tensors take the Triton kernels). The
  // amplifications are "plain" | "add" | "scale"; noise and seed as in srdiff.amplified_add_noise.
  // Returns [x_t] or [x_t, target] (write_target), in x0's dtype.
  m.def(
      "amplified_add_noise(Tensor x0, Tensor timesteps, Tensor alphas_cumprod, Tensor? noise, Tensor? fam, "
      "float lam, int seed, str x_noise, str target_noise, str prediction_type, bool write_target) -> Tensor[]");
  // The loss, float32, differentiable with respect to pred (a C++ autograd kernel).
  m.def(
      "amplified_noise_loss(Tensor pred, Tensor x0, Tensor timesteps, Tensor alphas_cumprod, Tensor? noise, "
      "Tensor? fam, float lam, int seed, str target_noise, str prediction_type, str reduction) -> Tensor");
  // Its forward: [loss] or [loss, d loss / d pred at grad_out = 1] (with_grad), float32.
  m.def(
      "_amplified_noise_loss_forward(Tensor pred, Tensor x0, Tensor timesteps, Tensor alphas_cumprod, "
      "Tensor? noise, Tensor? fam, float lam, int seed, str target_noise, str prediction_type, str reduction, "
      "bool with_grad) -> Tensor[]");
  m.def("_build_info() -> str", &build_info);
}

}  // namespace srdiff
