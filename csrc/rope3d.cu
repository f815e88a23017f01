// 3D RoPE over (frame, row, col): rotates q and k in one launch, angles formed in registers.
//
// Thread = one 16-byte vector (N/2 interleaved pairs) of one token, for a group of HEADS heads of q
// and k: the N/2 sin/cos pairs are computed once from pos x inv_freq and reused for every head, so
// HBM traffic is one 16-byte read and one write per vector. sign = -1 gives the inverse rotation
// (the backward pass). The host checks 16-byte alignment of pointers and strides before launching.
#include "common.cuh"
#include "launchers.h"

namespace omniace {

constexpr int kRopeHeads = 4;

template <typename T>
__global__ void rope3d_kernel(const T* __restrict__ q, const T* __restrict__ k, T* __restrict__ qo,
                              T* __restrict__ ko, const int32_t* __restrict__ pos,
                              const float* __restrict__ inv_freq, int64_t L, int H, int HK, int D, int P0,
                              int P1, int P, int64_t s_ql, int64_t s_qh, int64_t s_kl, int64_t s_kh,
                              int64_t s_pl, float sign) {
  constexpr int N = Vec16<T>::N;
  const int vecs = D / N;
  const int head_groups = (H + HK + kRopeHeads - 1) / kRopeHeads;
  const int64_t idx = blockIdx.x * int64_t(blockDim.x) + threadIdx.x;
  if (idx >= L * vecs * head_groups) return;
  const int c = idx % vecs;  // vector within the head row (fastest: coalesced across threads)
  const int g = (idx / vecs) % head_groups;
  const int64_t l = idx / (int64_t(vecs) * head_groups);

  float cs[N / 2], sn[N / 2];
  const int32_t* p = pos + l * s_pl;
#pragma unroll
  for (int i = 0; i < N / 2; ++i) {
    const int j = c * (N / 2) + i;
    if (j < P) {
      const int axis = (j >= P0) + (j >= P0 + P1);
      sincosf(float(p[axis]) * inv_freq[j], &sn[i], &cs[i]);
      sn[i] *= sign;
    } else {  // dims past sum(axes_dims): identity
      cs[i] = 1.f;
      sn[i] = 0.f;
    }
  }
  for (int h = g * kRopeHeads; h < min((g + 1) * kRopeHeads, H + HK); ++h) {
    const bool is_q = h < H;
    const T* src = is_q ? q + l * s_ql + h * s_qh : k + l * s_kl + (h - H) * s_kh;
    T* dst = is_q ? qo + (l * H + h) * D : ko + (l * HK + (h - H)) * D;
    Vec16<T> x = load16(src + c * N), y;
#pragma unroll
    for (int i = 0; i < N / 2; ++i) {
      const float x0 = to_float(x.v[2 * i]), x1 = to_float(x.v[2 * i + 1]);
      y.v[2 * i] = from_float<T>(x0 * cs[i] - x1 * sn[i]);
      y.v[2 * i + 1] = from_float<T>(x0 * sn[i] + x1 * cs[i]);
    }
    store16(dst + c * N, y);
  }
}

void launch_rope3d(DType dtype, const void* q, const void* k, void* qo, void* ko, const int32_t* pos,
                   const float* inv_freq, int64_t L, int H, int HK, int D, int P0, int P1, int P, int64_t s_ql,
                   int64_t s_qh, int64_t s_kl, int64_t s_kh, int64_t s_pl, float sign, void* stream) {
  const int N = dtype == DType::kFloat32 ? 4 : 8;
  const int64_t threads = L * (D / N) * ((H + HK + kRopeHeads - 1) / kRopeHeads);
  if (threads == 0) return;
  const int block = 256;
  const dim3 grid((threads + block - 1) / block);
  auto s = static_cast<cudaStream_t>(stream);
  DISPATCH_DTYPE(dtype, [&](auto tag) {
    using T = decltype(tag);
    rope3d_kernel<T><<<grid, block, 0, s>>>(static_cast<const T*>(q), static_cast<const T*>(k), static_cast<T*>(qo),
                                            static_cast<T*>(ko), pos, inv_freq, L, H, HK, D, P0, P1, P, s_ql, s_qh,
                                            s_kl, s_kh, s_pl, sign);
  });
}

}  // namespace omniace
