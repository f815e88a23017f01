// editnet_inject forward: h_out = h + gate[s] * ctrl; y = LayerNorm(h_out) * (1 + scale[s]) + shift[s].
//
// One block per row. Each thread keeps up to kVecs 16-byte vectors of the row in registers between
// the residual, the two reductions (mean, then the centred variance) and the modulation, so h and
// ctrl are read once and h_out and y written once. The row's segment is a binary search of
// cu_seqlens (S + 1 ints, cached). The backward pass runs the Triton kernel on the saved statistics.
#include "common.cuh"
#include "launchers.h"

namespace omniace {

constexpr int kVecs = 4;

template <typename T>
__global__ void editnet_inject_kernel(const T* __restrict__ h, const T* __restrict__ ctrl, const T* __restrict__ shift,
                                      const T* __restrict__ scale, const T* __restrict__ gate,
                                      const int32_t* __restrict__ cu, T* __restrict__ h_out, T* __restrict__ y,
                                      float* __restrict__ mean_out, float* __restrict__ rstd_out, int C, int S,
                                      int64_t s_h, int64_t s_c, float eps) {
  constexpr int N = Vec16<T>::N;
  __shared__ float scratch[32];
  const int64_t row = blockIdx.x;
  const int64_t mod = int64_t(segment_of(cu, S, row)) * C;
  const int vecs = C / N;
  float x[kVecs][N];
#pragma unroll
  for (int i = 0; i < kVecs; ++i) {
    const int c = (threadIdx.x + i * blockDim.x) * N;
    if (c < vecs * N) {
      const Vec16<T> a = load16(h + row * s_h + c), b = load16(ctrl + row * s_c + c), g = load16(gate + mod + c);
      Vec16<T> o;
#pragma unroll
      for (int j = 0; j < N; ++j) {
        o.v[j] = from_float<T>(to_float(a.v[j]) + to_float(g.v[j]) * to_float(b.v[j]));
        x[i][j] = to_float(o.v[j]);  // normalise the rounded residual, as the reference does
      }
      store16(h_out + row * C + c, o);
    }
  }
  float sum = 0.f;
#pragma unroll
  for (int i = 0; i < kVecs; ++i)
    if ((threadIdx.x + i * blockDim.x) * N < vecs * N)
#pragma unroll
      for (int j = 0; j < N; ++j) sum += x[i][j];
  const float mean = block_sum(sum, scratch) / C;
  float sq = 0.f;
#pragma unroll
  for (int i = 0; i < kVecs; ++i)
    if ((threadIdx.x + i * blockDim.x) * N < vecs * N)
#pragma unroll
      for (int j = 0; j < N; ++j) sq += (x[i][j] - mean) * (x[i][j] - mean);
  const float rstd = rsqrtf(block_sum(sq, scratch) / C + eps);
#pragma unroll
  for (int i = 0; i < kVecs; ++i) {
    const int c = (threadIdx.x + i * blockDim.x) * N;
    if (c < vecs * N) {
      const Vec16<T> sc = load16(scale + mod + c), sh = load16(shift + mod + c);
      Vec16<T> o;
#pragma unroll
      for (int j = 0; j < N; ++j)
        o.v[j] = from_float<T>((x[i][j] - mean) * rstd * (1.f + to_float(sc.v[j])) + to_float(sh.v[j]));
      store16(y + row * C + c, o);
    }
  }
  if (threadIdx.x == 0) {
    mean_out[row] = mean;
    rstd_out[row] = rstd;
  }
}

void launch_editnet_inject(DType dtype, const void* h, const void* ctrl, const void* shift, const void* scale,
                           const void* gate, const int32_t* cu, void* h_out, void* y, float* mean, float* rstd,
                           int64_t L, int C, int S, int64_t s_h, int64_t s_c, float eps, void* stream) {
  if (L == 0) return;
  const int N = dtype == DType::kFloat32 ? 4 : 8;
  const int vecs = C / N;
  // enough threads that each holds at most kVecs vectors; whole warps, at least one
  const int threads = ((vecs + kVecs - 1) / kVecs + 31) / 32 * 32;
  auto s = static_cast<cudaStream_t>(stream);
  DISPATCH_DTYPE(dtype, [&](auto tag) {
    using T = decltype(tag);
    editnet_inject_kernel<T><<<L, threads, 0, s>>>(
        static_cast<const T*>(h), static_cast<const T*>(ctrl), static_cast<const T*>(shift),
        static_cast<const T*>(scale), static_cast<const T*>(gate), cu, static_cast<T*>(h_out), static_cast<T*>(y),
        mean, rstd, C, S, s_h, s_c, eps);
  });
}

}  // namespace omniace
