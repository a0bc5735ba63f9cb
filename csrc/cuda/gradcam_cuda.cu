// Grad-CAM reduction, CUDA backend. Three launches, no host syncs, each input read once:
//   1. alpha[b, c] = mean_hw G[b, c]              one warp per (b, c)
//   2. cam[b, p]   = ReLU(sum_c alpha[b,c] A[b,c,p]) 32-pixel tiles x 8 channel groups per block
//   3. per image: min-max normalise, bilinear resize, normalise again   one block per image
#include <ATen/Dispatch.h>
#include <ATen/ops/empty.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include <cfloat>

#include "gradcam.h"

namespace srdiff {
namespace {

constexpr int kWarp = 32;
constexpr int kChannelGroups = 8;     // warps per block in the combine kernel
constexpr int kReduceThreads = 1024;  // threads per block in the per-image kernel

template <typename scalar_t>
__global__ void gradcam_alpha_kernel(const scalar_t* __restrict__ G, float* __restrict__ alpha,
                                     int64_t BC, int64_t hw) {
  const int lane = threadIdx.x % kWarp;
  const int64_t warps_per_grid = static_cast<int64_t>(gridDim.x) * (blockDim.x / kWarp);
  for (int64_t bc = static_cast<int64_t>(blockIdx.x) * (blockDim.x / kWarp) + threadIdx.x / kWarp; bc < BC;
       bc += warps_per_grid) {
    const scalar_t* g = G + bc * hw;
    float sum = 0.f;
    for (int64_t p = lane; p < hw; p += kWarp) sum += static_cast<float>(g[p]);
    for (int off = kWarp / 2; off > 0; off /= 2) sum += __shfl_down_sync(0xffffffff, sum, off);
    if (lane == 0) alpha[bc] = sum / static_cast<float>(hw);
  }
}

// Block (32, kChannelGroups): lanes walk 32 neighbouring pixels (coalesced), warps split channels.
template <typename scalar_t>
__global__ void gradcam_combine_kernel(const scalar_t* __restrict__ A, const float* __restrict__ alpha,
                                       float* __restrict__ cam, int64_t C, int64_t hw, int64_t tiles) {
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
    if (threadIdx.y == 0 && p < hw) {
      float sum = 0.f;
      for (int g = 0; g < kChannelGroups; ++g) sum += partial[g][threadIdx.x];
      cam[b * hw + p] = fmaxf(sum, 0.f);
    }
    __syncthreads();
  }
}

// Block-wide min and max; every thread gets the result.
__device__ void block_minmax(float& lo, float& hi) {
  __shared__ float s_lo[kReduceThreads / kWarp], s_hi[kReduceThreads / kWarp];
  for (int off = kWarp / 2; off > 0; off /= 2) {
    lo = fminf(lo, __shfl_down_sync(0xffffffff, lo, off));
    hi = fmaxf(hi, __shfl_down_sync(0xffffffff, hi, off));
  }
  const int warp = threadIdx.x / kWarp, lane = threadIdx.x % kWarp, warps = blockDim.x / kWarp;
  if (lane == 0) {
    s_lo[warp] = lo;
    s_hi[warp] = hi;
  }
  __syncthreads();
  lo = s_lo[0];
  hi = s_hi[0];
  for (int i = 1; i < warps; ++i) {
    lo = fminf(lo, s_lo[i]);
    hi = fmaxf(hi, s_hi[i]);
  }
  __syncthreads();  // the shared slots may be reused by the next call
}

__device__ void minmax_of(const float* x, int64_t n, float& lo, float& hi) {
  lo = FLT_MAX;
  hi = -FLT_MAX;
  for (int64_t i = threadIdx.x; i < n; i += blockDim.x) {
    lo = fminf(lo, x[i]);
    hi = fmaxf(hi, x[i]);
  }
  block_minmax(lo, hi);
}

// Half-pixel source coordinate, as F.interpolate(bilinear, align_corners=False) and OpenCV.
__device__ __forceinline__ void bilinear_tap(int64_t o, int64_t in, float scale, int64_t& i0, int64_t& i1,
                                             float& w1) {
  const float src = fmaxf((o + 0.5f) * scale - 0.5f, 0.f);
  i0 = min(static_cast<int64_t>(src), in - 1);
  i1 = min(i0 + 1, in - 1);
  w1 = src - static_cast<float>(i0);
}

// One block per image. Reads cam (B, h, w), writes out (B, H, W). With no resize, cam is out
// (each thread rewrites only what it read, after the block-wide reduction), so no __restrict__.
__global__ void gradcam_finish_kernel(const float* cam, float* out, int64_t h,
                                      int64_t w, int64_t H, int64_t W, bool resize, bool normalize) {
  const int64_t b = blockIdx.x;
  const float* src = cam + b * h * w;
  float* dst = out + b * H * W;
  float lo = 0.f, hi = 0.f;
  if (normalize) minmax_of(src, h * w, lo, hi);
  const float range = kNormalizeEps + (hi - lo);
  if (!resize) {
    if (normalize)
      for (int64_t i = threadIdx.x; i < h * w; i += blockDim.x) dst[i] = (src[i] - lo) / range;
    return;
  }
  const float sy = static_cast<float>(h) / H, sx = static_cast<float>(w) / W;
  for (int64_t i = threadIdx.x; i < H * W; i += blockDim.x) {
    int64_t y0, y1, x0, x1;
    float wy1, wx1;
    bilinear_tap(i / W, h, sy, y0, y1, wy1);
    bilinear_tap(i % W, w, sx, x0, x1, wx1);
    const float wy0 = 1.f - wy1, wx0 = 1.f - wx1;
    float v00 = src[y0 * w + x0], v01 = src[y0 * w + x1], v10 = src[y1 * w + x0], v11 = src[y1 * w + x1];
    if (normalize) {
      v00 = (v00 - lo) / range;
      v01 = (v01 - lo) / range;
      v10 = (v10 - lo) / range;
      v11 = (v11 - lo) / range;
    }
    dst[i] = wy0 * (wx0 * v00 + wx1 * v01) + wy1 * (wx0 * v10 + wx1 * v11);
  }
  if (!normalize) return;
  __syncthreads();  // every thread's writes to dst are visible before the second reduction
  minmax_of(dst, H * W, lo, hi);
  const float range2 = kNormalizeEps + (hi - lo);
  for (int64_t i = threadIdx.x; i < H * W; i += blockDim.x) dst[i] = (dst[i] - lo) / range2;
}

at::Tensor gradcam_reduce_cuda(const at::Tensor& activations, const at::Tensor& gradients,
                               at::OptionalIntArrayRef size, bool normalize) {
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
  cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  int sms = 0;
  C10_CUDA_CHECK(cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, activations.device().index()));

  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, A.scalar_type(), "gradcam_reduce_cuda", [&] {
    const int64_t warps_per_block = 256 / kWarp;
    const int64_t alpha_blocks = std::min<int64_t>((B * C + warps_per_block - 1) / warps_per_block, sms * 32);
    gradcam_alpha_kernel<scalar_t><<<alpha_blocks, 256, 0, stream>>>(G.const_data_ptr<scalar_t>(),
                                                                     alpha.data_ptr<float>(), B * C, hw);
    C10_CUDA_KERNEL_LAUNCH_CHECK();

    const int64_t tiles = (hw + kWarp - 1) / kWarp;
    const dim3 combine_grid(static_cast<unsigned>(std::min<int64_t>(tiles, 65535)), static_cast<unsigned>(B));
    gradcam_combine_kernel<scalar_t><<<combine_grid, dim3(kWarp, kChannelGroups), 0, stream>>>(
        A.const_data_ptr<scalar_t>(), alpha.const_data_ptr<float>(), cam.data_ptr<float>(), C, hw, tiles);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });

  if (resize || normalize) {
    gradcam_finish_kernel<<<B, kReduceThreads, 0, stream>>>(cam.const_data_ptr<float>(), out.data_ptr<float>(),
                                                            h, w, H, W, resize, normalize);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  }
  return out;
}

}  // namespace

TORCH_LIBRARY_IMPL(srdiff, CUDA, m) { m.impl("gradcam_reduce", &gradcam_reduce_cuda); }

}  // namespace srdiff
