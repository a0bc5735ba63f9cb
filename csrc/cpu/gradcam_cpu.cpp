// Grad-CAM reduction, CPU backend: at::parallel_for over images, one pass over A and G per image.
// The finiteness checks ride on that pass: a channel whose gradient sum is not finite, or a pixel whose
// weighted sum over channels is not finite (tested before the ReLU), marks its image, and the op raises
// after the loop (the diagnosis, an extra scan, runs only then).
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <ATen/ops/empty.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <cstring>
#include <limits>
#include <vector>

#include "gradcam.h"

namespace srdiff {
namespace {

constexpr int kLanes = 16;  // independent accumulators: lets the compiler vectorise the reductions

template <typename scalar_t>
float channel_mean(const scalar_t* g, int64_t n) {
  float lanes[kLanes] = {};
  int64_t p = 0;
  for (; p + kLanes <= n; p += kLanes)
    for (int k = 0; k < kLanes; ++k) lanes[k] += static_cast<float>(g[p + k]);
  float sum = 0.f;
  for (int k = 0; k < kLanes; ++k) sum += lanes[k];
  for (; p < n; ++p) sum += static_cast<float>(g[p]);
  return sum / static_cast<float>(n);
}

// cam = ReLU(sum_c alpha_c * A_c) with alpha_c = mean(G_c): channel by channel, so each channel's
// G and A are read once, back to back, while the (h*w) accumulator stays in cache. Returns the
// NonFinite bits of the image: a channel mean that is not finite (G holds NaN/inf, or its sum
// overflows float32), a weighted sum that is not finite (A holds NaN/inf, or the sum overflows).
template <typename scalar_t>
int combine_image(const scalar_t* A, const scalar_t* G, int64_t C, int64_t hw, float* cam) {
  std::fill(cam, cam + hw, 0.f);
  bool means_finite = true;
  for (int64_t c = 0; c < C; ++c) {
    const float alpha = channel_mean(G + c * hw, hw);
    means_finite = means_finite && std::isfinite(alpha);
    const scalar_t* a = A + c * hw;
    for (int64_t p = 0; p < hw; ++p) cam[p] += alpha * static_cast<float>(a[p]);
  }
  // Tested before the ReLU, which maps NaN and -inf to 0: |v| <= max is false for both and for +inf.
  bool sums_finite = true;
  for (int64_t p = 0; p < hw; ++p) {
    const float v = cam[p];
    sums_finite &= std::abs(v) <= std::numeric_limits<float>::max();
    cam[p] = v > 0.f ? v : 0.f;
  }
  return (means_finite ? 0 : kGradientMean) | (sums_finite ? 0 : kWeightedSum);
}

// Running min and max of a float stream in 4 independent 4-float vectors (GCC/Clang vector types:
// minps/maxps on SSE, no -mavx needed), folded at the end. A plain lane array does not vectorise
// (GCC 12 keeps it in memory, scalar min/max), which made a 224 x 224 resize 4x slower.
// v < l ? v : l keeps l when v is NaN, as std::min does.
typedef float Quad __attribute__((vector_size(16)));
constexpr int kQuads = 4;

struct MinMax {
  Quad lo[kQuads], hi[kQuads];
  MinMax() {
    const float inf = std::numeric_limits<float>::infinity();
    for (int k = 0; k < kQuads; ++k) {
      lo[k] = Quad{inf, inf, inf, inf};
      hi[k] = -lo[k];
    }
  }
  void add(const float* x, int64_t n) {
    Quad l[kQuads], h[kQuads];
    std::copy(lo, lo + kQuads, l);
    std::copy(hi, hi + kQuads, h);
    int64_t i = 0;
    for (; i + 4 * kQuads <= n; i += 4 * kQuads)
      for (int k = 0; k < kQuads; ++k) {
        Quad v;
        std::memcpy(&v, x + i + 4 * k, sizeof v);
        l[k] = v < l[k] ? v : l[k];
        h[k] = v > h[k] ? v : h[k];
      }
    for (; i < n; ++i) {
      l[0][0] = std::min(l[0][0], x[i]);
      h[0][0] = std::max(h[0][0], x[i]);
    }
    std::copy(l, l + kQuads, lo);
    std::copy(h, h + kQuads, hi);
  }
  float min() const {
    float m = lo[0][0];
    for (int k = 0; k < kQuads; ++k)
      for (int j = 0; j < 4; ++j) m = std::min(m, lo[k][j]);
    return m;
  }
  float max() const {
    float m = hi[0][0];
    for (int k = 0; k < kQuads; ++k)
      for (int j = 0; j < 4; ++j) m = std::max(m, hi[k][j]);
    return m;
  }
};

void scale_to_unit(float* x, int64_t n, const MinMax& mm) {
  const float lo = mm.min(), range = kNormalizeEps + (mm.max() - lo);
  for (int64_t i = 0; i < n; ++i) x[i] = (x[i] - lo) / range;
}

void minmax_normalize(float* x, int64_t n) {
  MinMax mm;
  mm.add(x, n);
  scale_to_unit(x, n, mm);
}

// Source index pair and weight of the upper one, half-pixel centres (F.interpolate bilinear,
// align_corners=False, no antialias; OpenCV INTER_LINEAR).
struct Tap {
  int64_t i0, i1;
  float w1;
};

std::vector<Tap> bilinear_taps(int64_t in, int64_t out) {
  std::vector<Tap> taps(out);
  const float scale = static_cast<float>(in) / static_cast<float>(out);
  for (int64_t o = 0; o < out; ++o) {
    const float src = std::max((o + 0.5f) * scale - 0.5f, 0.f);
    const int64_t i0 = std::min(static_cast<int64_t>(src), in - 1);
    taps[o] = {i0, std::min(i0 + 1, in - 1), src - static_cast<float>(i0)};
  }
  return taps;
}

// Separable: every source row is interpolated along x into rows (h, W), then output rows blend two
// of those (a contiguous, vectorisable loop). Same operation order as ATen's upsample_bilinear2d.
// Tracks the output's min and max on the way, for the second normalisation.
void resize_image(const float* src, int64_t h, int64_t w, float* dst, const std::vector<Tap>& ty,
                  const std::vector<Tap>& tx, float* rows, MinMax& mm) {
  const int64_t W = static_cast<int64_t>(tx.size());
  for (int64_t r = 0; r < h; ++r) {
    const float* s = src + r * w;
    float* row = rows + r * W;
    for (int64_t x = 0; x < W; ++x) row[x] = (1.f - tx[x].w1) * s[tx[x].i0] + tx[x].w1 * s[tx[x].i1];
  }
  for (size_t y = 0; y < ty.size(); ++y) {
    const float* r0 = rows + ty[y].i0 * W;
    const float* r1 = rows + ty[y].i1 * W;
    const float wy1 = ty[y].w1, wy0 = 1.f - wy1;
    float* out = dst + static_cast<int64_t>(y) * W;
    for (int64_t x = 0; x < W; ++x) out[x] = wy0 * r0[x] + wy1 * r1[x];
    mm.add(out, W);
  }
}

at::Tensor gradcam_reduce_cpu(const at::Tensor& activations, const at::Tensor& gradients,
                              at::OptionalIntArrayRef size, bool normalize, bool check_finite) {
  check_gradcam_args(activations, gradients, size);
  const at::Tensor A = activations.contiguous();
  const at::Tensor G = gradients.contiguous();
  const int64_t B = A.size(0), C = A.size(1), h = A.size(2), w = A.size(3), hw = h * w;
  const int64_t H = size.has_value() ? (*size)[0] : h;
  const int64_t W = size.has_value() ? (*size)[1] : w;
  at::Tensor out = at::empty({B, H, W}, A.options().dtype(at::kFloat));
  float* out_ptr = out.data_ptr<float>();

  std::vector<int> flags(B);  // per image: its NonFinite bits
  std::vector<Tap> ty, tx;
  if (size.has_value()) {
    ty = bilinear_taps(h, H);
    tx = bilinear_taps(w, W);
  }

  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, A.scalar_type(), "gradcam_reduce_cpu", [&] {
    const scalar_t* a_ptr = A.const_data_ptr<scalar_t>();
    const scalar_t* g_ptr = G.const_data_ptr<scalar_t>();
    at::parallel_for(0, B, 1, [&](int64_t begin, int64_t end) {
      std::vector<float> cam(hw), rows(size.has_value() ? h * W : 0);
      for (int64_t b = begin; b < end; ++b) {
        float* dst = out_ptr + b * H * W;
        // Without a resize the map is built in place in the output.
        float* map = size.has_value() ? cam.data() : dst;
        flags[b] = combine_image(a_ptr + b * C * hw, g_ptr + b * C * hw, C, hw, map);
        if (normalize) minmax_normalize(map, hw);
        if (size.has_value()) {
          MinMax mm;
          resize_image(map, h, w, dst, ty, tx, rows.data(), mm);
          // pytorch-grad-cam rescales the resized map once more; so do we.
          if (normalize) scale_to_unit(dst, H * W, mm);
        }
      }
    });
  });
  if (check_finite) {
    int any = 0;
    for (const int f : flags) any |= f;
    if (any) raise_nonfinite(activations, gradients, any);
  }
  return out;
}

}  // namespace

TORCH_LIBRARY_IMPL(srdiff, CPU, m) { m.impl("gradcam_reduce", &gradcam_reduce_cpu); }

}  // namespace srdiff
