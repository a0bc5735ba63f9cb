// Grad-CAM reduction, CPU backend: at::parallel_for over images, one pass over A and G per image.
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <ATen/ops/empty.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
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
// G and A are read once, back to back, while the (h*w) accumulator stays in cache.
template <typename scalar_t>
void combine_image(const scalar_t* A, const scalar_t* G, int64_t C, int64_t hw, float* cam) {
  std::fill(cam, cam + hw, 0.f);
  for (int64_t c = 0; c < C; ++c) {
    const float alpha = channel_mean(G + c * hw, hw);
    const scalar_t* a = A + c * hw;
    for (int64_t p = 0; p < hw; ++p) cam[p] += alpha * static_cast<float>(a[p]);
  }
  for (int64_t p = 0; p < hw; ++p) cam[p] = cam[p] > 0.f ? cam[p] : 0.f;
}

// Running min and max in kLanes independent lanes (vectorisable), folded at the end.
struct MinMax {
  float lo[kLanes], hi[kLanes];
  MinMax() {
    std::fill(lo, lo + kLanes, std::numeric_limits<float>::infinity());
    std::fill(hi, hi + kLanes, -std::numeric_limits<float>::infinity());
  }
  void add(const float* x, int64_t n) {
    int64_t i = 0;
    for (; i + kLanes <= n; i += kLanes)
      for (int k = 0; k < kLanes; ++k) {
        lo[k] = x[i + k] < lo[k] ? x[i + k] : lo[k];
        hi[k] = x[i + k] > hi[k] ? x[i + k] : hi[k];
      }
    for (; i < n; ++i) {
      lo[0] = std::min(lo[0], x[i]);
      hi[0] = std::max(hi[0], x[i]);
    }
  }
  float min() const { return *std::min_element(lo, lo + kLanes); }
  float max() const { return *std::max_element(hi, hi + kLanes); }
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
                              at::OptionalIntArrayRef size, bool normalize) {
  check_gradcam_args(activations, gradients, size);
  const at::Tensor A = activations.contiguous();
  const at::Tensor G = gradients.contiguous();
  const int64_t B = A.size(0), C = A.size(1), h = A.size(2), w = A.size(3), hw = h * w;
  const int64_t H = size.has_value() ? (*size)[0] : h;
  const int64_t W = size.has_value() ? (*size)[1] : w;
  at::Tensor out = at::empty({B, H, W}, A.options().dtype(at::kFloat));
  float* out_ptr = out.data_ptr<float>();

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
        combine_image(a_ptr + b * C * hw, g_ptr + b * C * hw, C, hw, map);
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
  return out;
}

}  // namespace

TORCH_LIBRARY_IMPL(srdiff, CPU, m) { m.impl("gradcam_reduce", &gradcam_reduce_cpu); }

}  // namespace srdiff
