// Torch glue for the omniace CUDA kernels: validates inputs (TORCH_CHECK, before any launch), allocates
// outputs and registers the ops as torch.ops.omniace_cuda.*. The Python wrapper (kernels/cuda_ext.py)
// passes the current CUDA stream as an integer, which keeps this file free of CUDA headers.
#include <ATen/ATen.h>
#include <torch/library.h>

#include <tuple>

#include "launchers.h"

namespace omniace {
namespace {

DType dtype_of(const at::Tensor& t, const char* op) {
  switch (t.scalar_type()) {
    case at::kFloat: return DType::kFloat32;
    case at::kHalf: return DType::kFloat16;
    case at::kBFloat16: return DType::kBFloat16;
    default: TORCH_CHECK(false, op, ": fp32/fp16/bf16 expected, got ", t.scalar_type());
  }
}

void* as_stream(int64_t stream) { return reinterpret_cast<void*>(static_cast<intptr_t>(stream)); }

void check_vec16(const at::Tensor& t, std::initializer_list<int64_t> strides, const char* op, const char* name) {
  const int64_t n = 16 / t.element_size();
  TORCH_CHECK(reinterpret_cast<uintptr_t>(t.data_ptr()) % 16 == 0, op, ": ", name, " must be 16-byte aligned");
  for (int64_t s : strides)
    TORCH_CHECK(s % n == 0, op, ": ", name, " strides must be multiples of ", n, " elements, got ", t.strides());
}

void check_cu(const at::Tensor& cu, const at::Tensor& like, const char* op) {
  TORCH_CHECK(cu.device() == like.device() && cu.scalar_type() == at::kInt && cu.dim() == 1 && cu.numel() >= 1 &&
                  cu.is_contiguous(),
              op, ": cu_seqlens must be a contiguous int32 [S+1] tensor on ", like.device());
}

std::tuple<at::Tensor, at::Tensor> rope3d(const at::Tensor& q, const at::Tensor& k, const at::Tensor& pos,
                                          const at::Tensor& inv_freq, int64_t p0, int64_t p1, double sign,
                                          int64_t stream) {
  const char* op = "omniace_cuda::rope3d";
  TORCH_CHECK(q.is_cuda() && k.device() == q.device() && pos.device() == q.device() && inv_freq.device() == q.device(),
              op, ": all tensors must be on one CUDA device");
  TORCH_CHECK(q.dim() == 3 && k.dim() == 3 && k.size(0) == q.size(0) && k.size(2) == q.size(2), op,
              ": q [L, H, D] and k [L, Hk, D] expected, got ", q.sizes(), " and ", k.sizes());
  TORCH_CHECK(k.scalar_type() == q.scalar_type(), op, ": q and k dtypes differ");
  TORCH_CHECK(pos.scalar_type() == at::kInt && pos.dim() == 2 && pos.size(0) == q.size(0) && pos.size(1) == 3 &&
                  pos.stride(1) == 1,
              op, ": pos must be int32 [L, 3] with contiguous rows, got ", pos.sizes());
  TORCH_CHECK(inv_freq.scalar_type() == at::kFloat && inv_freq.is_contiguous(), op, ": inv_freq must be fp32");
  const int64_t L = q.size(0), H = q.size(1), HK = k.size(1), D = q.size(2), P = inv_freq.numel();
  TORCH_CHECK(2 * P <= D && p0 + p1 <= P, op, ": ", P, " rotated pairs do not fit head dim ", D);
  TORCH_CHECK(q.stride(2) == 1 && k.stride(2) == 1 && D % (16 / q.element_size()) == 0, op,
              ": the head dim must be contiguous and a multiple of ", 16 / q.element_size());
  check_vec16(q, {q.stride(0), q.stride(1)}, op, "q");
  check_vec16(k, {k.stride(0), k.stride(1)}, op, "k");
  auto qo = at::empty({L, H, D}, q.options());
  auto ko = at::empty({L, HK, D}, k.options());
  launch_rope3d(dtype_of(q, op), q.data_ptr(), k.data_ptr(), qo.data_ptr(), ko.data_ptr(), pos.data_ptr<int32_t>(),
                inv_freq.data_ptr<float>(), L, H, HK, D, p0, p1, P, q.stride(0), q.stride(1), k.stride(0),
                k.stride(1), pos.stride(0), static_cast<float>(sign), as_stream(stream));
  return {qo, ko};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> editnet_inject(
    const at::Tensor& h, const at::Tensor& ctrl, const at::Tensor& shift, const at::Tensor& scale,
    const at::Tensor& gate, const at::Tensor& cu, double eps, int64_t stream) {
  const char* op = "omniace_cuda::editnet_inject";
  TORCH_CHECK(h.is_cuda() && h.dim() == 2 && ctrl.sizes() == h.sizes(), op, ": h and ctrl must be CUDA [L, C], got ",
              h.sizes(), " and ", ctrl.sizes());
  check_cu(cu, h, op);
  const int64_t L = h.size(0), C = h.size(1), S = cu.numel() - 1;
  for (const at::Tensor* t : {&shift, &scale, &gate}) {
    TORCH_CHECK(t->device() == h.device() && t->scalar_type() == h.scalar_type() && t->dim() == 2 &&
                    t->size(0) == S && t->size(1) == C && t->is_contiguous(),
                op, ": shift/scale/gate must be contiguous [", S, ", ", C, "] in h's dtype, got ", t->sizes());
    check_vec16(*t, {}, op, "shift/scale/gate");
  }
  TORCH_CHECK(ctrl.scalar_type() == h.scalar_type(), op, ": h and ctrl dtypes differ");
  const int64_t n = 16 / h.element_size();
  TORCH_CHECK(h.stride(1) == 1 && ctrl.stride(1) == 1 && C % n == 0 && C <= 4 * 1024 * n, op,
              ": rows must be contiguous with C a multiple of ", n, " and at most ", 4 * 1024 * n, ", got C=", C);
  check_vec16(h, {h.stride(0)}, op, "h");
  check_vec16(ctrl, {ctrl.stride(0)}, op, "ctrl");
  auto h_out = at::empty({L, C}, h.options());
  auto y = at::empty({L, C}, h.options());
  auto mean = at::empty({L}, h.options().dtype(at::kFloat));
  auto rstd = at::empty({L}, h.options().dtype(at::kFloat));
  launch_editnet_inject(dtype_of(h, op), h.data_ptr(), ctrl.data_ptr(), shift.data_ptr(), scale.data_ptr(),
                        gate.data_ptr(), cu.data_ptr<int32_t>(), h_out.data_ptr(), y.data_ptr(),
                        mean.data_ptr<float>(), rstd.data_ptr<float>(), L, C, S, h.stride(0), ctrl.stride(0),
                        static_cast<float>(eps), as_stream(stream));
  return {h_out, y, mean, rstd};
}

std::tuple<at::Tensor, at::Tensor> cross_attention_fwd(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                                                       const at::Tensor& cu_q, const at::Tensor& cu_k, int64_t max_q,
                                                       int64_t max_k, double scale, int64_t stream) {
  const char* op = "omniace_cuda::cross_attention_fwd";
  TORCH_CHECK(q.is_cuda() && q.dim() == 3 && k.dim() == 3 && k.sizes() == v.sizes() && k.size(1) == q.size(1) &&
                  k.size(2) == q.size(2),
              op, ": q [Lq, H, D] and k, v [Lk, H, D] on CUDA expected, got ", q.sizes(), ", ", k.sizes(), ", ",
              v.sizes());
  TORCH_CHECK(k.scalar_type() == q.scalar_type() && v.scalar_type() == q.scalar_type(), op, ": dtypes differ");
  TORCH_CHECK(q.stride(2) == 1 && k.stride(2) == 1 && v.stride(2) == 1, op, ": the head dim must be contiguous");
  check_cu(cu_q, q, op);
  check_cu(cu_k, q, op);
  TORCH_CHECK(cu_q.numel() == cu_k.numel(), op, ": cu_seqlens_q and cu_seqlens_k differ in segment count");
  const int64_t Lq = q.size(0), H = q.size(1), D = q.size(2);
  TORCH_CHECK(max_k <= kCrossMaxKeys && D <= kCrossMaxHeadDim, op, ": key segments up to ", kCrossMaxKeys,
              " and head dims up to ", kCrossMaxHeadDim, " only, got max_k=", max_k, ", D=", D);
  auto out = at::empty({Lq, H, D}, q.options());
  auto lse = at::empty({Lq, H}, q.options().dtype(at::kFloat));
  launch_cross_attention_fwd(dtype_of(q, op), q.data_ptr(), k.data_ptr(), v.data_ptr(), cu_q.data_ptr<int32_t>(),
                             cu_k.data_ptr<int32_t>(), out.data_ptr(), lse.data_ptr<float>(), cu_q.numel() - 1, H, D,
                             max_q, max_k, q.stride(0), q.stride(1), k.stride(0), k.stride(1), v.stride(0), v.stride(1),
                             static_cast<float>(scale), as_stream(stream));
  return {out, lse};
}

}  // namespace

TORCH_LIBRARY(omniace_cuda, m) {
  m.def("rope3d(Tensor q, Tensor k, Tensor pos, Tensor inv_freq, int p0, int p1, float sign, int stream)"
        " -> (Tensor, Tensor)");
  m.def("editnet_inject(Tensor h, Tensor ctrl, Tensor shift, Tensor scale, Tensor gate, Tensor cu_seqlens,"
        " float eps, int stream) -> (Tensor, Tensor, Tensor, Tensor)");
  m.def("cross_attention_fwd(Tensor q, Tensor k, Tensor v, Tensor cu_seqlens_q, Tensor cu_seqlens_k,"
        " int max_seqlen_q, int max_seqlen_k, float scale, int stream) -> (Tensor, Tensor)");
}

TORCH_LIBRARY_IMPL(omniace_cuda, CUDA, m) {
  m.impl("rope3d", &rope3d);
  m.impl("editnet_inject", &editnet_inject);
  m.impl("cross_attention_fwd", &cross_attention_fwd);
}

}  // namespace omniace
