// Shared helpers for the omniace CUDA kernels: 16-byte vector I/O, float conversion, dtype dispatch,
// block reductions. Header-only; every .cu includes it.
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>
#include <cstdint>

namespace omniace {

template <typename T> __device__ __forceinline__ float to_float(T x);
template <> __device__ __forceinline__ float to_float<float>(float x) { return x; }
template <> __device__ __forceinline__ float to_float<__half>(__half x) { return __half2float(x); }
template <> __device__ __forceinline__ float to_float<__nv_bfloat16>(__nv_bfloat16 x) { return __bfloat162float(x); }

template <typename T> __device__ __forceinline__ T from_float(float x);
template <> __device__ __forceinline__ float from_float<float>(float x) { return x; }
template <> __device__ __forceinline__ __half from_float<__half>(float x) { return __float2half_rn(x); }
template <> __device__ __forceinline__ __nv_bfloat16 from_float<__nv_bfloat16>(float x) { return __float2bfloat16_rn(x); }

// N elements of T moved as one 16-byte transaction.
template <typename T> struct Vec16 {
  static constexpr int N = 16 / sizeof(T);
  union {
    uint4 raw;
    T v[N];
  };
};

template <typename T> __device__ __forceinline__ Vec16<T> load16(const T* p) {
  Vec16<T> out;
  out.raw = *reinterpret_cast<const uint4*>(p);
  return out;
}

template <typename T> __device__ __forceinline__ void store16(T* p, const Vec16<T>& x) {
  *reinterpret_cast<uint4*>(p) = x.raw;
}

__device__ __forceinline__ float warp_sum(float x) {
#pragma unroll
  for (int off = 16; off > 0; off >>= 1) x += __shfl_xor_sync(0xffffffffu, x, off);
  return x;
}

__device__ __forceinline__ float warp_max(float x) {
#pragma unroll
  for (int off = 16; off > 0; off >>= 1) x = fmaxf(x, __shfl_xor_sync(0xffffffffu, x, off));
  return x;
}

// Sum over the whole block; `scratch` holds one float per warp. All threads get the result.
__device__ __forceinline__ float block_sum(float x, float* scratch) {
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, warps = (blockDim.x + 31) >> 5;
  x = warp_sum(x);
  __syncthreads();  // scratch may still be read by a previous call
  if (lane == 0) scratch[warp] = x;
  __syncthreads();
  x = lane < warps ? scratch[lane] : 0.f;
  return warp_sum(x);
}

// Segment of `row` given cu_seqlens[0..S]: the number of segment ends cu[1..S] that are <= row.
__device__ __forceinline__ int segment_of(const int32_t* cu, int S, int64_t row) {
  int lo = 0, hi = S;  // answer in [0, S): first i with cu[i + 1] > row
  while (lo < hi) {
    const int mid = (lo + hi) >> 1;
    if (cu[mid + 1] <= row) lo = mid + 1; else hi = mid;
  }
  return lo;
}

// Run `fn(T{})` with T the element type of `dtype` (float, __half or __nv_bfloat16).
#define DISPATCH_DTYPE(dtype, ...)                                  \
  do {                                                              \
    auto dispatch_fn_ = __VA_ARGS__;                                \
    switch (dtype) {                                                \
      case DType::kFloat32: dispatch_fn_(float{}); break;           \
      case DType::kFloat16: dispatch_fn_(__half{}); break;          \
      case DType::kBFloat16: dispatch_fn_(__nv_bfloat16{}); break;  \
    }                                                               \
  } while (0)

}  // namespace omniace
