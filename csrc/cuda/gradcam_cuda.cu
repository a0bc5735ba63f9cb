// Grad-CAM reduction, CUDA backend. Four launches spread over the whole GPU, no host sync (one only
// when check_finite asks whether the inputs were finite), each input read once:
//   1. alpha[b, c] = mean_hw G[b, c]                   one warp per (b, c); flags a non-finite mean
//   2. cam[b, p]   = ReLU(sum_c alpha[b,c] A[b,c,p])   32-pixel tiles x 8 channel groups per block;
//                                                      flags a non-finite sum (before the ReLU);
//                                                      each tile folds its min/max into image b's
//   3. out[b, q]   = bilinear(normalised cam[b])       256-pixel tiles of every image, min/max again
//   4. out[b, q]   = (out - min) / (eps + max - min)   256-pixel tiles of every image
// The per-image min and max are exact and order-free (atomicMax on order-preserving integer keys),
// so the maps do not depend on scheduling. Without a resize, 3 is skipped and 4 runs in place on
// cam (= out); without normalize, 4 is skipped.
#include <ATen/Dispatch.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/zeros.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include <cfloat>

#include "gradcam.h"

namespace srdiff {
namespace {

constexpr int kWarp = 32;
constexpr int kChannelGroups = 8;  // warps per block in the combine kernel
constexpr int kTile = 256;         // output pixels per block in the resize and normalise kernels
constexpr int64_t kMaxTiles = 65535;

// Per-image statistics, zero-initialised: [2 * b] holds ~key(min), [2 * b + 1] key(max), so one
// atomicMax serves both and 0 is the identity of each. key() orders floats as unsigned integers.
__device__ __forceinline__ unsigned key(float f) {
  const unsigned bits = __float_as_uint(f);
  return (bits & 0x80000000u) ? ~bits : bits | 0x80000000u;
}
__device__ __forceinline__ float unkey(unsigned k) {
  return __uint_as_float((k & 0x80000000u) ? k & 0x7fffffffu : ~k);
}

// Image b's normalisation x -> (x - lo) / range, range = eps + (max - min), as the CPU kernel has it.
struct Range {
  float lo, range;
};

__device__ __forceinline__ Range image_range(const unsigned* stats, int64_t b) {
  const float lo = unkey(~stats[2 * b]), hi = unkey(stats[2 * b + 1]);
  return {lo, kNormalizeEps + (hi - lo)};
}

// Warp then block min/max of (lo, hi); thread 0 folds them into stats[2b], stats[2b + 1].
template <int kThreads>
__device__ void fold_minmax(float lo, float hi, unsigned* stats, int64_t b) {
  __shared__ float s_lo[kThreads / kWarp], s_hi[kThreads / kWarp];
  for (int off = kWarp / 2; off > 0; off /= 2) {
    lo = fminf(lo, __shfl_down_sync(0xffffffff, lo, off));
    hi = fmaxf(hi, __shfl_down_sync(0xffffffff, hi, off));
  }
  const int lane = threadIdx.x % kWarp, warp = threadIdx.x / kWarp;
  if (lane == 0) {
    s_lo[warp] = lo;
    s_hi[warp] = hi;
  }
  __syncthreads();
  if (threadIdx.x == 0) {
    for (int i = 1; i < kThreads / kWarp; ++i) {
      lo = fminf(lo, s_lo[i]);
      hi = fmaxf(hi, s_hi[i]);
    }
    atomicMax(stats + 2 * b, ~key(lo));
    atomicMax(stats + 2 * b + 1, key(hi));
  }
  __syncthreads();  // the shared slots are reused by the next tile
}

// flags[0]: a channel mean was not finite (kGradientMean); flags[1]: a weighted sum (kWeightedSum).
// Every writer writes 1: a benign race.
template <typename scalar_t>
__global__ void gradcam_alpha_kernel(const scalar_t* __restrict__ G, float* __restrict__ alpha,
                                     int* __restrict__ flags, int64_t BC, int64_t hw) {
  const int lane = threadIdx.x % kWarp;
  const int64_t warps_per_grid = static_cast<int64_t>(gridDim.x) * (blockDim.x / kWarp);
  for (int64_t bc = static_cast<int64_t>(blockIdx.x) * (blockDim.x / kWarp) + threadIdx.x / kWarp; bc < BC;
       bc += warps_per_grid) {
    const scalar_t* g = G + bc * hw;
    float sum = 0.f;
    for (int64_t p = lane; p < hw; p += kWarp) sum += static_cast<float>(g[p]);
    for (int off = kWarp / 2; off > 0; off /= 2) sum += __shfl_down_sync(0xffffffff, sum, off);
    if (lane == 0) {
      alpha[bc] = sum / static_cast<float>(hw);
      if (!isfinite(sum)) flags[0] = 1;
    }
  }
}

// Block (32, kChannelGroups): lanes walk 32 neighbouring pixels (coalesced), warps split channels.
template <typename scalar_t>
__global__ void gradcam_combine_kernel(const scalar_t* __restrict__ A, const float* __restrict__ alpha,
                                       float* __restrict__ cam, unsigned* __restrict__ stats,
                                       int* __restrict__ flags, int64_t C, int64_t hw, int64_t tiles, bool track) {
  __shared__ float partial[kChannelGroups][kWarp];
  const int64_t b = blockIdx.y;
  for (int64_t tile = blockIdx.x; tile < tiles; tile += gridDim.x) {
    const int64_t p = tile * kWarp + threadIdx.x;
    float acc = 0.f;
    if (p < hw) {
      const scalar_t* a = A + b * C * hw + p;
      const float* al = alpha + b * C;
      for (int64_t c = threadIdx.y; c < C; c += kChannelGroups) acc += al[c] * static_cast<float>(a[c * hw]);
    }
    partial[threadIdx.y][threadIdx.x] = acc;
    __syncthreads();
    if (threadIdx.y == 0) {
      float v = 0.f;
      for (int g = 0; g < kChannelGroups; ++g) v += partial[g][threadIdx.x];
      if (p < hw && !isfinite(v)) flags[1] = 1;  // before the ReLU, which maps NaN and -inf to 0
      v = fmaxf(v, 0.f);
      if (p < hw) cam[b * hw + p] = v;
      if (track) {  // warp 0 alone: a warp-level min/max of its 32 pixels, one atomic pair per tile
        float lo = p < hw ? v : FLT_MAX, hi = p < hw ? v : -FLT_MAX;
        for (int off = kWarp / 2; off > 0; off /= 2) {
          lo = fminf(lo, __shfl_down_sync(0xffffffff, lo, off));
          hi = fmaxf(hi, __shfl_down_sync(0xffffffff, hi, off));
        }
        if (threadIdx.x == 0) {
          atomicMax(stats + 2 * b, ~key(lo));
          atomicMax(stats + 2 * b + 1, key(hi));
        }
      }
    }
    __syncthreads();
  }
}

// Half-pixel source coordinate, as F.interpolate(bilinear, align_corners=False) and OpenCV.
__device__ __forceinline__ void bilinear_tap(int64_t o, int64_t in, float scale, int64_t& i0, int64_t& i1,
                                             float& w1) {
  const float src = fmaxf((o + 0.5f) * scale - 0.5f, 0.f);
  i0 = min(static_cast<int64_t>(src), in - 1);
  i1 = min(i0 + 1, in - 1);
  w1 = src - static_cast<float>(i0);
}

// Grid (tiles, B), kTile threads: each thread one output pixel of image blockIdx.y. With normalize,
// the source is scaled by cam_stats on the fly and the output's min/max go to out_stats.
__global__ void gradcam_resize_kernel(const float* __restrict__ cam, float* __restrict__ out,
                                      const unsigned* __restrict__ cam_stats, unsigned* __restrict__ out_stats,
                                      int64_t h, int64_t w, int64_t H, int64_t W, int64_t tiles, bool normalize) {
  const int64_t b = blockIdx.y;
  const float* src = cam + b * h * w;
  float* dst = out + b * H * W;
  const Range r = normalize ? image_range(cam_stats, b) : Range{0.f, 1.f};
  const float sy = static_cast<float>(h) / H, sx = static_cast<float>(w) / W;
  for (int64_t tile = blockIdx.x; tile < tiles; tile += gridDim.x) {
    const int64_t i = tile * kTile + threadIdx.x;
    float lo = FLT_MAX, hi = -FLT_MAX;
    if (i < H * W) {
      int64_t y0, y1, x0, x1;
      float wy1, wx1;
      bilinear_tap(i / W, h, sy, y0, y1, wy1);
      bilinear_tap(i % W, w, sx, x0, x1, wx1);
      const float wy0 = 1.f - wy1, wx0 = 1.f - wx1;
      float v00 = src[y0 * w + x0], v01 = src[y0 * w + x1], v10 = src[y1 * w + x0], v11 = src[y1 * w + x1];
      if (normalize) {
        v00 = (v00 - r.lo) / r.range;
        v01 = (v01 - r.lo) / r.range;
        v10 = (v10 - r.lo) / r.range;
        v11 = (v11 - r.lo) / r.range;
      }
      const float v = wy0 * (wx0 * v00 + wx1 * v01) + wy1 * (wx0 * v10 + wx1 * v11);
      dst[i] = v;
      lo = hi = v;
    }
    if (normalize) fold_minmax<kTile>(lo, hi, out_stats, b);
  }
}

// Grid (tiles, B): x = (x - min) / (eps + max - min) with image blockIdx.y's stats, in place.
__global__ void gradcam_normalize_kernel(float* __restrict__ x, const unsigned* __restrict__ stats, int64_t n,
                                         int64_t tiles) {
  const int64_t b = blockIdx.y;
  const Range r = image_range(stats, b);
  for (int64_t tile = blockIdx.x; tile < tiles; tile += gridDim.x) {
    const int64_t i = tile * kTile + threadIdx.x;
    if (i < n) x[b * n + i] = (x[b * n + i] - r.lo) / r.range;
  }
}

at::Tensor gradcam_reduce_cuda(const at::Tensor& activations, const at::Tensor& gradients,
                               at::OptionalIntArrayRef size, bool normalize, bool check_finite) {
  check_gradcam_args(activations, gradients, size);
  const c10::cuda::CUDAGuard guard(activations.device());
  const at::Tensor A = activations.contiguous();
  const at::Tensor G = gradients.contiguous();
  const int64_t B = A.size(0), C = A.size(1), h = A.size(2), w = A.size(3), hw = h * w;
  const bool resize = size.has_value();
  const int64_t H = resize ? (*size)[0] : h;
  const int64_t W = resize ? (*size)[1] : w;
  TORCH_CHECK_VALUE(B <= 65535, "gradcam_reduce: batch size ", B, " exceeds the CUDA grid limit 65535");

  const auto f32 = A.options().dtype(at::kFloat);
  at::Tensor alpha = at::empty({B, C}, f32);
  at::Tensor out = at::empty({B, H, W}, f32);
  at::Tensor cam = resize ? at::empty({B, h, w}, f32) : out;
  // [0, 2): the non-finite flags; then the min/max keys of cam (2B) and of the resized maps (2B).
  at::Tensor scratch = at::zeros({2 + 4 * B}, A.options().dtype(at::kInt));
  int* flags = scratch.data_ptr<int>();
  unsigned* cam_stats = reinterpret_cast<unsigned*>(flags + 2);
  unsigned* out_stats = cam_stats + 2 * B;
  cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  int sms = 0;
  C10_CUDA_CHECK(cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, activations.device().index()));

  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, A.scalar_type(), "gradcam_reduce_cuda", [&] {
    const int64_t warps_per_block = 256 / kWarp;
    const int64_t alpha_blocks = std::min<int64_t>((B * C + warps_per_block - 1) / warps_per_block, sms * 32);
    gradcam_alpha_kernel<scalar_t><<<alpha_blocks, 256, 0, stream>>>(
        G.const_data_ptr<scalar_t>(), alpha.data_ptr<float>(), flags, B * C, hw);
    C10_CUDA_KERNEL_LAUNCH_CHECK();

    const int64_t tiles = (hw + kWarp - 1) / kWarp;
    const dim3 combine_grid(static_cast<unsigned>(std::min(tiles, kMaxTiles)), static_cast<unsigned>(B));
    gradcam_combine_kernel<scalar_t><<<combine_grid, dim3(kWarp, kChannelGroups), 0, stream>>>(
        A.const_data_ptr<scalar_t>(), alpha.const_data_ptr<float>(), cam.data_ptr<float>(), cam_stats, flags, C,
        hw, tiles, normalize);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });

  const int64_t out_tiles = (H * W + kTile - 1) / kTile;
  const dim3 out_grid(static_cast<unsigned>(std::min(out_tiles, kMaxTiles)), static_cast<unsigned>(B));
  if (resize) {
    gradcam_resize_kernel<<<out_grid, kTile, 0, stream>>>(cam.const_data_ptr<float>(), out.data_ptr<float>(),
                                                          cam_stats, out_stats, h, w, H, W, out_tiles, normalize);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  }
  if (normalize) {
    gradcam_normalize_kernel<<<out_grid, kTile, 0, stream>>>(out.data_ptr<float>(), resize ? out_stats : cam_stats,
                                                             H * W, out_tiles);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  }
  if (check_finite) {
    const at::Tensor seen = scratch.narrow(0, 0, 2).cpu();  // the one device sync
    const int any = (seen[0].item<int>() ? kGradientMean : 0) | (seen[1].item<int>() ? kWeightedSum : 0);
    if (any) raise_nonfinite(activations, gradients, any);
  }
  return out;
}

}  // namespace

TORCH_LIBRARY_IMPL(srdiff, CUDA, m) { m.impl("gradcam_reduce", &gradcam_reduce_cuda); }

}  // namespace srdiff
