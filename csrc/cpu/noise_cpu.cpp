// Noise amplification and the ε-loss, CPU backend: the Triton kernels' formulas and ε stream
// (normal_stream.h), one pass over the data per op, at::parallel_for over fixed blocks.
//
//   amplified_add_noise:  read x0 (and an explicit ε), write x_t (and the target).
//   amplified_noise_loss: read pred and x0, regenerate ε, return the loss and, when pred requires
//                         grad, keep its gradient with respect to pred for grad_out = 1 (float32),
//                         so the backward (a C++ autograd kernel) is one multiply: a CPU draws ε far slower than it streams memory, so the
//                         gradient is made while ε is at hand instead of regenerating ε again.
//
// Work is split into blocks of kBlockElems elements of one (b, c) plane, independent of the thread
// count; the loss sums each block in double and the blocks in a fixed order, so it is bit-reproducible
// for any number of threads. Inside a block, tiles of normal_stream::kTileElems elements are converted
// to float32 buffers, computed, and converted back.
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>
#include <torch/autograd.h>
#include <torch/library.h>

#include <algorithm>
#include <array>
#include <cmath>
#include <cstdlib>
#include <optional>
#include <string>
#include <vector>

#include "normal_stream.h"

// On x86-64 the per-tile work is also compiled for AVX2 and picked at load time (GCC's function
// multiversioning); elsewhere it is compiled for the baseline ISA. No FMA target: contracting
// multiply-adds would change the stream's rounding against the Triton interpreter's.
#if defined(__x86_64__) && defined(__GNUC__) && !defined(__clang__)
#define SRDIFF_TILE_CLONES __attribute__((target_clones("avx2", "default")))
#else
#define SRDIFF_TILE_CLONES
#endif

namespace srdiff {
namespace {

using normal_stream::kTileElems;
using normal_stream::kTileRows;

constexpr int64_t kBlockElems = 16 * kTileElems;  // one unit of parallel work (4096 elements)
constexpr int64_t kMinParallelBlocks = 8;         // fewer blocks than this run on the calling thread

enum class Amplification { kPlain, kAdd, kScale };
enum class Prediction { kEpsilon, kVPrediction, kSample };
enum class Reduction { kMean, kSum, kNone };

Amplification parse_amplification(const std::string& name, const char* arg) {
  if (name == "plain") return Amplification::kPlain;
  if (name == "add") return Amplification::kAdd;
  if (name == "scale") return Amplification::kScale;
  TORCH_CHECK_VALUE(false, arg, " must be one of ('plain', 'add', 'scale'), got '", name, "'");
}

Prediction parse_prediction(const std::string& name) {
  if (name == "epsilon") return Prediction::kEpsilon;
  if (name == "v_prediction") return Prediction::kVPrediction;
  if (name == "sample") return Prediction::kSample;
  TORCH_CHECK_VALUE(false, "prediction_type must be one of ('epsilon', 'v_prediction', 'sample'), got '", name, "'");
}

Reduction parse_reduction(const std::string& name) {
  if (name == "mean") return Reduction::kMean;
  if (name == "sum") return Reduction::kSum;
  if (name == "none") return Reduction::kNone;
  TORCH_CHECK_VALUE(false, "reduction must be one of ('mean', 'sum', 'none'), got '", name, "'");
}

// A float tensor of one of the three element types, read and written a tile at a time as float32.
struct FloatOperand {
  void* data = nullptr;
  at::ScalarType dtype = at::kFloat;

  FloatOperand() = default;
  explicit FloatOperand(const at::Tensor& t) : data(const_cast<void*>(t.const_data_ptr())), dtype(t.scalar_type()) {}

  // The n elements at offset as float32: the tensor's own memory when it is float32 (no copy),
  // else converted into buffer.
  const float* read(int64_t offset, int n, float* buffer) const {
    switch (dtype) {
      case at::kFloat: return static_cast<const float*>(data) + offset;
      case at::kHalf: convert(static_cast<const c10::Half*>(data) + offset, n, buffer); break;
      default: convert(static_cast<const c10::BFloat16*>(data) + offset, n, buffer); break;
    }
    return buffer;
  }
  // Where to compute n float32 results for offset: the tensor's memory when it is float32, else
  // buffer, which commit() then converts into the tensor.
  float* output(int64_t offset, float* buffer) const {
    return dtype == at::kFloat ? static_cast<float*>(data) + offset : buffer;
  }
  void commit(int64_t offset, int n, const float* buffer) const {
    switch (dtype) {
      case at::kFloat: break;
      case at::kHalf: convert(buffer, n, static_cast<c10::Half*>(data) + offset); break;
      default: convert(buffer, n, static_cast<c10::BFloat16*>(data) + offset); break;
    }
  }

 private:
  template <typename From, typename To>
  static void convert(const From* src, int n, To* dst) {
    for (int i = 0; i < n; ++i) dst[i] = static_cast<To>(static_cast<float>(src[i]));
  }
};

bool is_supported_float(at::ScalarType t) { return t == at::kFloat || t == at::kHalf || t == at::kBFloat16; }

// What both ops share: the (B, C, H, W) geometry, the per-sample coefficients, the map and the
// source of ε, validated once.
struct NoiseProblem {
  int64_t B = 0, C = 0, HW = 0;
  std::vector<float> sqrt_ab, sqrt_1m_ab;  // per sample, computed in alphas_cumprod's dtype
  at::Tensor lam_map;                      // λ·M, float32 (1 | B, H, W) contiguous, or undefined
  int64_t lam_map_stride_b = 0;
  at::Tensor noise;                        // contiguous explicit ε, or undefined (then the stream)
  uint32_t key0 = 0, key1 = 0;

  int64_t blocks_per_plane() const { return (HW + kBlockElems - 1) / kBlockElems; }
  int64_t num_blocks() const { return B * C * blocks_per_plane(); }
};

NoiseProblem make_problem(const char* op, const at::Tensor& x0, const at::Tensor& timesteps,
                          const at::Tensor& alphas_cumprod, const std::optional<at::Tensor>& noise,
                          const std::optional<at::Tensor>& fam, double lam, int64_t seed) {
  TORCH_CHECK_VALUE(x0.dim() == 4 && x0.numel() > 0, op, ": x0 must be a non-empty (B, C, H, W) tensor, got shape ",
                    x0.sizes());
  TORCH_CHECK_TYPE(is_supported_float(x0.scalar_type()), op, ": x0 must be float32, float16 or bfloat16, got ",
                   x0.scalar_type());
  TORCH_CHECK_VALUE(x0.device().is_cpu(), op, ": x0 must be on the CPU, got ", x0.device());
  const int64_t B = x0.size(0);
  TORCH_CHECK_VALUE(timesteps.dim() == 1 && timesteps.size(0) == B, op, ": timesteps must have shape (B,) = (", B,
                    ",), got ", timesteps.sizes());
  TORCH_CHECK_TYPE(at::isIntegralType(timesteps.scalar_type(), /*includeBool=*/false), op,
                   ": timesteps must be an integer tensor, got ", timesteps.scalar_type());
  TORCH_CHECK_VALUE(alphas_cumprod.dim() == 1 && alphas_cumprod.numel() > 0, op,
                    ": alphas_cumprod must be a non-empty (T,) tensor, got shape ", alphas_cumprod.sizes());
  TORCH_CHECK_TYPE(alphas_cumprod.scalar_type() == at::kFloat || alphas_cumprod.scalar_type() == at::kDouble, op,
                   ": alphas_cumprod must be float32 or float64, got ", alphas_cumprod.scalar_type());
  TORCH_CHECK_VALUE(std::isfinite(lam) && lam >= 0, op, ": lam must be finite and >= 0, got ", lam);
  TORCH_CHECK_VALUE(seed >= 0, op, ": seed must be in [0, 2**63), got ", seed);

  NoiseProblem p;
  p.B = B;
  p.C = x0.size(1);
  p.HW = x0.size(2) * x0.size(3);
  p.key0 = static_cast<uint32_t>(static_cast<uint64_t>(seed));
  p.key1 = static_cast<uint32_t>(static_cast<uint64_t>(seed) >> 32);

  // Timesteps are clamped to [0, T) for memory safety only: the Python API range-checks them.
  const at::Tensor t = timesteps.to(at::kLong).contiguous();
  const int64_t* t_ptr = t.const_data_ptr<int64_t>();
  const int64_t T = alphas_cumprod.numel();
  const at::Tensor ac = alphas_cumprod.contiguous();
  p.sqrt_ab.resize(B);
  p.sqrt_1m_ab.resize(B);
  for (int64_t b = 0; b < B; ++b) {
    const int64_t i = std::min(std::max<int64_t>(t_ptr[b], 0), T - 1);
    if (ac.scalar_type() == at::kDouble) {
      const double abar = ac.const_data_ptr<double>()[i];
      p.sqrt_ab[b] = static_cast<float>(std::sqrt(abar));
      p.sqrt_1m_ab[b] = static_cast<float>(std::sqrt(1.0 - abar));
    } else {
      const float abar = ac.const_data_ptr<float>()[i];
      p.sqrt_ab[b] = std::sqrt(abar);
      p.sqrt_1m_ab[b] = std::sqrt(1.0f - abar);
    }
  }

  if (noise.has_value()) {
    TORCH_CHECK_VALUE(noise->sizes() == x0.sizes(), op, ": noise must have the shape of x0 ", x0.sizes(), ", got ",
                      noise->sizes());
    TORCH_CHECK_TYPE(noise->is_floating_point(), op, ": noise must be floating point, got ", noise->scalar_type());
    p.noise = is_supported_float(noise->scalar_type()) ? noise->contiguous() : noise->to(at::kFloat).contiguous();
  }
  if (fam.has_value()) {
    const int64_t H = x0.size(2), W = x0.size(3);
    at::Tensor m = *fam;
    TORCH_CHECK_TYPE(m.is_floating_point(), op, ": fam must be floating point, got ", m.scalar_type());
    if (m.dim() == 2) m = m.unsqueeze(0);
    if (m.dim() == 4 && m.size(1) == 1) m = m.squeeze(1);
    TORCH_CHECK_VALUE(m.dim() == 3 && (m.size(0) == 1 || m.size(0) == B) && m.size(1) == H && m.size(2) == W, op,
                      ": fam must broadcast to (B, 1, H, W) = (", B, ", 1, ", H, ", ", W, ") as (H, W), (B, H, W) ",
                      "or (B, 1, H, W), got shape ", fam->sizes());
    // λ·M once per call (float32 λ times float32 M, as the Triton kernels round it), not once per
    // channel and tile.
    p.lam_map = at::empty(m.sizes(), x0.options().dtype(at::kFloat));
    const at::Tensor m32 = m.to(at::kFloat).contiguous();
    const float lam32 = static_cast<float>(lam), *src = m32.const_data_ptr<float>();
    float* dst = p.lam_map.data_ptr<float>();
    for (int64_t i = 0; i < m32.numel(); ++i) dst[i] = lam32 * src[i];
    p.lam_map_stride_b = m.size(0) == 1 ? 0 : p.HW;
  }
  return p;
}

// One tile of a block: in-plane element range [hw0, hw0 + n) of plane `plane`.
struct Tile {
  int64_t plane, b, hw0, offset;  // offset: of the first element in the (B, C, H, W) tensor
  int n;
};

template <typename Body>
void for_each_tile(const NoiseProblem& p, int64_t block, Body&& body) {
  const int64_t plane = block / p.blocks_per_plane();
  const int64_t start = (block % p.blocks_per_plane()) * kBlockElems;
  const int64_t stop = std::min(start + kBlockElems, p.HW);
  for (int64_t hw0 = start; hw0 < stop; hw0 += kTileElems) {
    body(Tile{plane, plane / p.C, hw0, plane * p.HW + hw0, static_cast<int>(std::min<int64_t>(kTileElems, stop - hw0))});
  }
}

template <typename Body>
void parallel_blocks(const NoiseProblem& p, Body&& body) {
  at::parallel_for(0, p.num_blocks(), kMinParallelBlocks, [&](int64_t begin, int64_t end) {
    for (int64_t block = begin; block < end; ++block) body(block);
  });
}

// λ·M at a tile's pixels, or nullptr without a map.
const float* lam_map_tile(const NoiseProblem& p, const Tile& tile) {
  if (!p.lam_map.defined()) return nullptr;
  return p.lam_map.const_data_ptr<float>() + tile.b * p.lam_map_stride_b + tile.hw0;
}

// out = ε, ε + λM or ε(1 + λM) (plain whenever there is no map).
SRDIFF_TILE_CLONES
void amplify_tile(const float* eps, const float* lam_map, Amplification how, int n, float* out) {
  if (lam_map == nullptr || how == Amplification::kPlain) {
    std::copy_n(eps, n, out);
  } else if (how == Amplification::kAdd) {
    for (int i = 0; i < n; ++i) out[i] = eps[i] + lam_map[i];
  } else {
    for (int i = 0; i < n; ++i) out[i] = eps[i] * (1.0f + lam_map[i]);
  }
}

// The regression target from ε_t and x0, in place of eps_t.
SRDIFF_TILE_CLONES
void target_tile(float* eps_t, const float* x0, Prediction prediction, float sqrt_ab, float sqrt_1m_ab, int n) {
  if (prediction == Prediction::kVPrediction) {
    for (int i = 0; i < n; ++i) eps_t[i] = sqrt_ab * eps_t[i] - sqrt_1m_ab * x0[i];
  } else if (prediction == Prediction::kSample) {
    std::copy_n(x0, n, eps_t);
  }
}

// The stream for a tile of rows: eight rows per AVX2 step where the CPU has AVX2, else the portable
// code (the same words and normals, bit for bit; SRDIFF_PORTABLE_NOISE=1 forces it, for tests).
void stream_tile(uint64_t first_row, uint32_t key0, uint32_t key1, float* eps) {
#ifdef SRDIFF_NORMAL_STREAM_AVX2
  static const bool avx2 = __builtin_cpu_supports("avx2") && std::getenv("SRDIFF_PORTABLE_NOISE") == nullptr;
  if (avx2) {
    normal_stream::normal_tile_avx2(first_row, key0, key1, eps);
    return;
  }
#endif
  normal_stream::normal_tile_portable(first_row, key0, key1, eps);
}

// ε for a tile: the stream at (seed, element index) drawn into buffer, or the explicit noise.
const float* epsilon_tile(const NoiseProblem& p, const Tile& tile, float* buffer) {
  if (p.noise.defined()) return FloatOperand(p.noise).read(tile.offset, tile.n, buffer);
  const uint64_t rows_per_plane = static_cast<uint64_t>((p.HW + 3) / 4);
  stream_tile(static_cast<uint64_t>(tile.plane) * rows_per_plane + static_cast<uint64_t>(tile.hw0 / 4), p.key0,
              p.key1, buffer);
  return buffer;
}

// x_t = √ᾱ·x0 + √(1 − ᾱ)·ε_x, in place of eps_x.
SRDIFF_TILE_CLONES
void noised_tile(const float* x0, float sqrt_ab, float sqrt_1m_ab, int n, float* eps_x) {
  for (int i = 0; i < n; ++i) eps_x[i] = sqrt_ab * x0[i] + sqrt_1m_ab * eps_x[i];
}

// diff = pred − target in place of target; returns Σ diff² (8 float lanes, then double).
SRDIFF_TILE_CLONES
double residual_tile(const float* pred, int n, float* target) {
  constexpr int kLanes = 8;
  float lanes[kLanes] = {};
  int i = 0;
  for (; i + kLanes <= n; i += kLanes)
    for (int k = 0; k < kLanes; ++k) {
      const float diff = pred[i + k] - target[i + k];
      target[i + k] = diff;
      lanes[k] += diff * diff;
    }
  double sum = 0.0;
  for (; i < n; ++i) {
    const float diff = pred[i] - target[i];
    target[i] = diff;
    sum += static_cast<double>(diff) * diff;
  }
  for (int k = 0; k < kLanes; ++k) sum += lanes[k];
  return sum;
}

SRDIFF_TILE_CLONES
void square_tile(const float* x, int n, float* out) {
  for (int i = 0; i < n; ++i) out[i] = x[i] * x[i];
}

SRDIFF_TILE_CLONES
void scale_tile(const float* x, float scale, int n, float* out) {
  for (int i = 0; i < n; ++i) out[i] = scale * x[i];
}

std::vector<at::Tensor> amplified_add_noise_cpu(const at::Tensor& x0_in, const at::Tensor& timesteps,
                                                const at::Tensor& alphas_cumprod,
                                                const std::optional<at::Tensor>& noise,
                                                const std::optional<at::Tensor>& fam, double lam, int64_t seed,
                                                std::string x_noise, std::string target_noise,
                                                std::string prediction_type, bool write_target) {
  const char* op = "amplified_add_noise";
  const NoiseProblem p = make_problem(op, x0_in, timesteps, alphas_cumprod, noise, fam, lam, seed);
  const Amplification how_x = parse_amplification(x_noise, "x_noise");
  const Amplification how_t = parse_amplification(target_noise, "target_noise");
  const Prediction prediction = parse_prediction(prediction_type);
  const at::Tensor x0 = x0_in.contiguous();
  at::Tensor x_t = at::empty(x0.sizes(), x0.options());
  at::Tensor target = write_target ? at::empty(x0.sizes(), x0.options()) : at::Tensor();
  const FloatOperand x0_op(x0), xt_op(x_t), target_op = write_target ? FloatOperand(target) : FloatOperand();

  parallel_blocks(p, [&](int64_t block) {
    alignas(64) float x0_buf[kTileElems], eps_buf[kTileElems], xt_buf[kTileElems], target_buf[kTileElems];
    for_each_tile(p, block, [&](const Tile& tile) {
      const float* xs = x0_op.read(tile.offset, tile.n, x0_buf);
      const float* eps = epsilon_tile(p, tile, eps_buf);
      const float* m = lam_map_tile(p, tile);
      const float sab = p.sqrt_ab[tile.b], s1m = p.sqrt_1m_ab[tile.b];
      float* x_t_out = xt_op.output(tile.offset, xt_buf);
      amplify_tile(eps, m, how_x, tile.n, x_t_out);
      noised_tile(xs, sab, s1m, tile.n, x_t_out);
      xt_op.commit(tile.offset, tile.n, x_t_out);
      if (write_target) {
        float* target_out = target_op.output(tile.offset, target_buf);
        amplify_tile(eps, m, how_t, tile.n, target_out);
        target_tile(target_out, xs, prediction, sab, s1m, tile.n);
        target_op.commit(tile.offset, tile.n, target_out);
      }
    });
  });
  if (!write_target) return {x_t};
  return {x_t, target};
}

std::vector<at::Tensor> amplified_noise_loss_cpu(const at::Tensor& pred_in, const at::Tensor& x0_in,
                                                 const at::Tensor& timesteps, const at::Tensor& alphas_cumprod,
                                                 const std::optional<at::Tensor>& noise,
                                                 const std::optional<at::Tensor>& fam, double lam, int64_t seed,
                                                 std::string target_noise, std::string prediction_type,
                                                 std::string reduction_name, bool with_grad) {
  const char* op = "amplified_noise_loss";
  const NoiseProblem p = make_problem(op, x0_in, timesteps, alphas_cumprod, noise, fam, lam, seed);
  TORCH_CHECK_VALUE(pred_in.sizes() == x0_in.sizes(), op, ": pred must have the shape of x0 ", x0_in.sizes(),
                    ", got ", pred_in.sizes());
  TORCH_CHECK_TYPE(is_supported_float(pred_in.scalar_type()), op, ": pred must be float32, float16 or bfloat16, got ",
                   pred_in.scalar_type());
  const Amplification how_t = parse_amplification(target_noise, "target_noise");
  const Prediction prediction = parse_prediction(prediction_type);
  const Reduction reduction = parse_reduction(reduction_name);
  const at::Tensor x0 = x0_in.contiguous(), pred = pred_in.contiguous();
  const auto f32 = x0.options().dtype(at::kFloat);
  const int64_t N = x0.numel();
  const bool elementwise = reduction == Reduction::kNone;
  at::Tensor squares = elementwise ? at::empty(x0.sizes(), f32) : at::Tensor();
  at::Tensor grad = with_grad ? at::empty(x0.sizes(), f32) : at::Tensor();
  float* squares_ptr = elementwise ? squares.data_ptr<float>() : nullptr;
  float* grad_ptr = with_grad ? grad.data_ptr<float>() : nullptr;
  // d loss / d pred for grad_out = 1: 2 (pred - target), / N for the mean.
  const float coef = reduction == Reduction::kMean ? static_cast<float>(2.0 / static_cast<double>(N)) : 2.0f;
  std::vector<double> block_sums(p.num_blocks(), 0.0);
  const FloatOperand x0_op(x0), pred_op(pred);

  parallel_blocks(p, [&](int64_t block) {
    alignas(64) float x0_buf[kTileElems], pred_buf[kTileElems], eps_buf[kTileElems], target[kTileElems];
    double sum = 0.0;
    for_each_tile(p, block, [&](const Tile& tile) {
      const float* xs = x0_op.read(tile.offset, tile.n, x0_buf);
      const float* ps = pred_op.read(tile.offset, tile.n, pred_buf);
      if (prediction == Prediction::kSample) {
        std::copy_n(xs, tile.n, target);  // the target holds no noise: nothing to draw
      } else {
        const float* eps = epsilon_tile(p, tile, eps_buf);
        amplify_tile(eps, lam_map_tile(p, tile), how_t, tile.n, target);
        target_tile(target, xs, prediction, p.sqrt_ab[tile.b], p.sqrt_1m_ab[tile.b], tile.n);
      }
      sum += residual_tile(ps, tile.n, target);  // target now holds pred − target
      if (elementwise) square_tile(target, tile.n, squares_ptr + tile.offset);
      if (with_grad) scale_tile(target, coef, tile.n, grad_ptr + tile.offset);
    });
    block_sums[block] = sum;
  });

  at::Tensor loss;
  if (elementwise) {
    loss = squares;
  } else {
    double total = 0.0;
    for (double s : block_sums) total += s;  // fixed order: bit-reproducible for any thread count
    if (reduction == Reduction::kMean) total /= static_cast<double>(N);
    loss = at::empty({}, f32);
    loss.data_ptr<float>()[0] = static_cast<float>(total);
  }
  if (!with_grad) return {loss};
  return {loss, grad};
}

// The loss's forward through the dispatcher (so torch.compile's fake tensors reach its fake kernel).
std::vector<at::Tensor> loss_forward(const at::Tensor& pred, const at::Tensor& x0, const at::Tensor& timesteps,
                                     const at::Tensor& alphas_cumprod, const std::optional<at::Tensor>& noise,
                                     const std::optional<at::Tensor>& fam, double lam, int64_t seed,
                                     const std::string& target_noise, const std::string& prediction_type,
                                     const std::string& reduction, bool with_grad) {
  static const auto op = c10::Dispatcher::singleton()
                             .findSchemaOrThrow("srdiff::_amplified_noise_loss_forward", "")
                             .typed<std::vector<at::Tensor>(const at::Tensor&, const at::Tensor&, const at::Tensor&,
                                                            const at::Tensor&, const std::optional<at::Tensor>&,
                                                            const std::optional<at::Tensor>&, double, int64_t,
                                                            std::string, std::string, std::string, bool)>();
  return op.call(pred, x0, timesteps, alphas_cumprod, noise, fam, lam, seed, target_noise, prediction_type, reduction,
                 with_grad);
}

// Without autograd (inference mode, or nothing requires grad below the autograd key): the loss only.
at::Tensor amplified_noise_loss_no_grad(const at::Tensor& pred, const at::Tensor& x0, const at::Tensor& timesteps,
                                        const at::Tensor& alphas_cumprod, const std::optional<at::Tensor>& noise,
                                        const std::optional<at::Tensor>& fam, double lam, int64_t seed,
                                        std::string target_noise, std::string prediction_type, std::string reduction) {
  return loss_forward(pred, x0, timesteps, alphas_cumprod, noise, fam, lam, seed, target_noise, prediction_type,
                      reduction, false)[0];
}

// d loss / d pred = (the forward's gradient at grad_out = 1) · grad_out, in pred's dtype; x0, the
// map and the noise are data (the Python API refuses them if they require grad).
class NoiseLossFunction : public torch::autograd::Function<NoiseLossFunction> {
 public:
  static at::Tensor forward(torch::autograd::AutogradContext* ctx, const at::Tensor& pred, const at::Tensor& x0,
                            const at::Tensor& timesteps, const at::Tensor& alphas_cumprod,
                            const std::optional<at::Tensor>& noise, const std::optional<at::Tensor>& fam, double lam,
                            int64_t seed, const std::string& target_noise, const std::string& prediction_type,
                            const std::string& reduction, bool with_grad) {
    at::AutoDispatchBelowADInplaceOrView below_autograd;
    std::vector<at::Tensor> out = loss_forward(pred, x0, timesteps, alphas_cumprod, noise, fam, lam, seed,
                                               target_noise, prediction_type, reduction, with_grad);
    if (with_grad) ctx->save_for_backward({out[1]});
    ctx->saved_data["pred_dtype"] = static_cast<int64_t>(pred.scalar_type());
    return out[0];
  }

  static torch::autograd::variable_list backward(torch::autograd::AutogradContext* ctx,
                                                 torch::autograd::variable_list grad_outputs) {
    const auto saved = ctx->get_saved_variables();
    const auto dtype = static_cast<at::ScalarType>(ctx->saved_data["pred_dtype"].toInt());
    at::Tensor grad_pred = saved.empty() ? at::Tensor() : saved[0].mul(grad_outputs[0]).to(dtype);
    return {grad_pred, at::Tensor(), at::Tensor(), at::Tensor(), at::Tensor(), at::Tensor(),
            at::Tensor(), at::Tensor(), at::Tensor(), at::Tensor(), at::Tensor(), at::Tensor()};
  }
};

at::Tensor amplified_noise_loss_autograd(const at::Tensor& pred, const at::Tensor& x0, const at::Tensor& timesteps,
                                         const at::Tensor& alphas_cumprod, const std::optional<at::Tensor>& noise,
                                         const std::optional<at::Tensor>& fam, double lam, int64_t seed,
                                         std::string target_noise, std::string prediction_type,
                                         std::string reduction) {
  // Decided here: inside the Function's forward grad mode is off.
  const bool with_grad = pred.requires_grad() && at::GradMode::is_enabled();
  return NoiseLossFunction::apply(pred, x0, timesteps, alphas_cumprod, noise, fam, lam, seed, target_noise,
                                  prediction_type, reduction, with_grad);
}

}  // namespace

TORCH_LIBRARY_IMPL(srdiff, CPU, m) {
  m.impl("amplified_add_noise", &amplified_add_noise_cpu);
  m.impl("_amplified_noise_loss_forward", &amplified_noise_loss_cpu);
  m.impl("amplified_noise_loss", &amplified_noise_loss_no_grad);
}

// Only CPU tensors reach these ops (CUDA tensors take the Triton kernels).
TORCH_LIBRARY_IMPL(srdiff, AutogradCPU, m) { m.impl("amplified_noise_loss", &amplified_noise_loss_autograd); }

}  // namespace srdiff
