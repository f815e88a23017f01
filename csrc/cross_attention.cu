// Per-CU cross-attention forward, specialised for short key segments (a unit's text, <= 128 tokens)
// against long query segments (thousands of image tokens).
//
// Block = kBlockQ queries of one (segment, head). The segment's whole K and V are staged in shared
// memory once and reused by every query of the block, so K/V are read from HBM once per block instead
// of once per query tile and key tile. A warp takes one query at a time: each lane scores the keys
// lane, lane + 32, ... (K rows padded to an odd number of 4-byte words, so lanes reading different rows
// hit different banks), the softmax statistics are two warp reductions, and for the output each lane
// owns head dims lane, lane + 32, ... and sweeps the keys. The logsumexp is written for the backward
// pass, which runs the Triton kernels.
//
// Not chosen by backend="auto" (kernels/ops.py, ATTENTION_PRIORITY): the scores and the output are scalar
// FMAs on CUDA cores, where Triton's kernel uses tensor cores. It runs when backend="cuda" is named, for
// the A/B measurement (omniace bench --providers triton,cuda) that would justify ranking it again, or an
// mma.sync rewrite.
#include "common.cuh"
#include "launchers.h"

#include <math_constants.h>

namespace omniace {

constexpr int kBlockQ = 64;
constexpr int kWarps = 8;

// Row stride (elements) of K in shared memory: an odd number of 4-byte words.
__host__ __device__ inline int k_row_stride(int D, int elem) {
  int words = (D * elem + 3) / 4;
  if (words % 2 == 0) ++words;
  return words * 4 / elem;
}

__host__ __device__ inline int v_row_stride(int D, int elem) { return ((D * elem + 3) / 4) * 4 / elem; }

inline size_t cross_smem_bytes(int max_k, int D, int elem) {
  return size_t(max_k) * (k_row_stride(D, elem) + v_row_stride(D, elem)) * elem +
         sizeof(float) * kWarps * (D + kCrossMaxKeys);
}

template <typename T>
__global__ void __launch_bounds__(kWarps * 32)
cross_attention_fwd_kernel(const T* __restrict__ q, const T* __restrict__ k, const T* __restrict__ v,
                           const int32_t* __restrict__ cu_q, const int32_t* __restrict__ cu_k, T* __restrict__ out,
                           float* __restrict__ lse, int H, int D, int max_k, int64_t s_qm, int64_t s_qh,
                           int64_t s_km, int64_t s_kh, int64_t s_vm, int64_t s_vh, float scale_log2) {
  extern __shared__ __align__(16) unsigned char smem[];
  const int seg = blockIdx.y, head = blockIdx.z;
  const int q0 = cu_q[seg], len_q = cu_q[seg + 1] - q0;
  const int k0 = cu_k[seg], len_k = cu_k[seg + 1] - k0;
  const int m_first = blockIdx.x * kBlockQ;
  if (m_first >= len_q) return;
  const int ks = k_row_stride(D, sizeof(T)), vs = v_row_stride(D, sizeof(T));
  T* Ks = reinterpret_cast<T*>(smem);
  T* Vs = Ks + size_t(max_k) * ks;
  float* qs = reinterpret_cast<float*>(Vs + size_t(max_k) * vs);
  float* ps = qs + kWarps * D;

  for (int i = threadIdx.x; i < len_k * D; i += blockDim.x) {  // coalesced along the head dim
    const int j = i / D, d = i % D;
    Ks[j * ks + d] = k[int64_t(k0 + j) * s_km + head * s_kh + d];
    Vs[j * vs + d] = v[int64_t(k0 + j) * s_vm + head * s_vh + d];
  }
  __syncthreads();

  const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
  float* qw = qs + warp * D;
  float* pw = ps + warp * kCrossMaxKeys;
  for (int r = warp; r < kBlockQ; r += kWarps) {
    const int m = m_first + r;
    if (m >= len_q) break;
    const int64_t row = q0 + m;
    for (int d = lane; d < D; d += 32) qw[d] = to_float(q[row * s_qm + head * s_qh + d]) * scale_log2;
    __syncwarp();
    float mx = -CUDART_INF_F;
    for (int j = lane; j < len_k; j += 32) {
      const T* kr = Ks + j * ks;
      float s = 0.f;
      for (int d = 0; d < D; ++d) s = fmaf(qw[d], to_float(kr[d]), s);
      pw[j] = s;
      mx = fmaxf(mx, s);
    }
    mx = warp_max(mx);
    float l = 0.f;
    for (int j = lane; j < len_k; j += 32) {
      const float p = exp2f(pw[j] - mx);
      pw[j] = p;
      l += p;
    }
    l = warp_sum(l);
    __syncwarp();  // every lane's probabilities visible before the sweep over keys
    const float inv = l > 0.f ? 1.f / l : 0.f;
    T* orow = out + (row * H + head) * D;
    for (int d = lane; d < D; d += 32) {
      float acc = 0.f;
      for (int j = 0; j < len_k; ++j) acc = fmaf(pw[j], to_float(Vs[j * vs + d]), acc);
      orow[d] = from_float<T>(acc * inv);
    }
    if (lane == 0) lse[row * H + head] = l > 0.f ? (mx + log2f(l)) * 0.69314718055994531f : -CUDART_INF_F;
    __syncwarp();  // qw / pw are rewritten by the next query
  }
}

void launch_cross_attention_fwd(DType dtype, const void* q, const void* k, const void* v, const int32_t* cu_q,
                                const int32_t* cu_k, void* out, float* lse, int S, int H, int D, int max_q,
                                int max_k, int64_t s_qm, int64_t s_qh, int64_t s_km, int64_t s_kh, int64_t s_vm,
                                int64_t s_vh, float scale, void* stream) {
  if (S == 0 || max_q == 0) return;
  const dim3 grid((max_q + kBlockQ - 1) / kBlockQ, S, H);
  auto s = static_cast<cudaStream_t>(stream);
  DISPATCH_DTYPE(dtype, [&](auto tag) {
    using T = decltype(tag);
    const size_t smem = cross_smem_bytes(max_k, D, sizeof(T));
    if (smem > 48 * 1024)
      cudaFuncSetAttribute(cross_attention_fwd_kernel<T>, cudaFuncAttributeMaxDynamicSharedMemorySize, int(smem));
    cross_attention_fwd_kernel<T><<<grid, kWarps * 32, smem, s>>>(
        static_cast<const T*>(q), static_cast<const T*>(k), static_cast<const T*>(v), cu_q, cu_k, static_cast<T*>(out),
        lse, H, D, max_k, s_qm, s_qh, s_km, s_kh, s_vm, s_vh, scale * 1.4426950408889634f);
  });
}

}  // namespace omniace
