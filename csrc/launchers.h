// Host launchers of the omniace CUDA kernels. Plain pointers, sizes and a cudaStream_t passed as
// void*, so bindings.cpp (torch glue, validation) needs no CUDA headers and every .cu needs no torch
// headers: each side compiles on its own, which is how CI checks the CUDA sources without a GPU.
#pragma once

#include <cstdint>

namespace omniace {

enum class DType : int { kFloat32 = 0, kFloat16 = 1, kBFloat16 = 2 };

// q [L, H, D] (strides s_ql, s_qh, unit last), k [L, HK, D]; outputs contiguous. D % (16 / elem) == 0,
// pointers and strides 16-byte aligned. sign = +1 rotates, -1 rotates back (backward).
void launch_rope3d(DType dtype, const void* q, const void* k, void* qo, void* ko, const int32_t* pos,
                   const float* inv_freq, int64_t L, int H, int HK, int D, int P0, int P1, int P, int64_t s_ql,
                   int64_t s_qh, int64_t s_kl, int64_t s_kh, int64_t s_pl, float sign, void* stream);

// h, ctrl [L, C] rows with strides s_h, s_c; shift/scale/gate [S, C] contiguous; outputs contiguous.
void launch_editnet_inject(DType dtype, const void* h, const void* ctrl, const void* shift, const void* scale,
                           const void* gate, const int32_t* cu, void* h_out, void* y, float* mean, float* rstd,
                           int64_t L, int C, int S, int64_t s_h, int64_t s_c, float eps, void* stream);

// q [Lq, H, D], k/v [Lk, H, D] (unit last stride), every key segment <= kCrossMaxKeys long.
// out [Lq, H, D] contiguous, lse [Lq, H] fp32 (natural log, -inf for an empty key segment).
constexpr int kCrossMaxKeys = 128;
constexpr int kCrossMaxHeadDim = 128;
void launch_cross_attention_fwd(DType dtype, const void* q, const void* k, const void* v, const int32_t* cu_q,
                                const int32_t* cu_k, void* out, float* lse, int S, int H, int D, int max_q,
                                int max_k, int64_t s_qm, int64_t s_qh, int64_t s_km, int64_t s_kh, int64_t s_vm,
                                int64_t s_vh, float scale, void* stream);

}  // namespace omniace
