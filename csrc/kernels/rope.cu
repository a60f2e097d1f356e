// Launchers of the rotation and delta kernels (all dtype combinations used by the binding).
#include "prope_attn/rope_kernels.h"

namespace prope {

namespace {
template <typename Tin, typename Tout>
cudaError_t launch_rope(const RopeParams& p, cudaStream_t st) {
  const int blocks = static_cast<int>(p.total < (1 << 20) ? p.total : (1 << 20));
  const size_t smem = 2 * sizeof(float) * (p.rot.num_rot > 0 ? p.rot.num_rot : 1);
  rope_kernel<Tin, Tout><<<blocks, 128, smem, st>>>(p);
  return cudaGetLastError();
}
template <typename Tin>
cudaError_t rope_out(const RopeParams& p, cudaStream_t st) {
  switch (p.y_dtype) {
    case DType::f32: return launch_rope<Tin, float>(p, st);
    case DType::f16: return launch_rope<Tin, __half>(p, st);
    case DType::bf16: return launch_rope<Tin, __nv_bfloat16>(p, st);
  }
  return cudaErrorInvalidValue;
}
}  // namespace

cudaError_t run_rope(const RopeParams& p, cudaStream_t st) {
  if (p.total == 0 || p.heads == 0) return cudaSuccess;
  if (p.x == p.y && (p.x_dtype != p.y_dtype || p.x_row != p.y_row || p.x_head != p.y_head))
    return cudaErrorInvalidValue;  // in place needs the same dtype and strides
  switch (p.x_dtype) {
    case DType::f32: return rope_out<float>(p, st);
    case DType::f16: return rope_out<__half>(p, st);
    case DType::bf16: return rope_out<__nv_bfloat16>(p, st);
  }
  return cudaErrorInvalidValue;
}

cudaError_t run_bwd_delta(const DeltaParams& p, cudaStream_t st) {
  if (p.total == 0 || p.heads == 0) return cudaSuccess;
  const int64_t rows = p.total * p.heads;
  const int64_t want = (rows + 7) / 8;
  const int blocks = static_cast<int>(want < (1 << 20) ? want : (1 << 20));
  switch (p.dtype) {
    case DType::f16: bwd_delta_kernel<__half><<<blocks, 256, 0, st>>>(p); break;
    case DType::bf16: bwd_delta_kernel<__nv_bfloat16><<<blocks, 256, 0, st>>>(p); break;
    case DType::f32: bwd_delta_kernel<float><<<blocks, 256, 0, st>>>(p); break;
  }
  return cudaGetLastError();
}

cudaError_t run_zero_outside_rows(const ZeroRowsParams& p, cudaStream_t st) {
  if (p.total == 0 || p.num_seqs == 0) return cudaSuccess;
  zero_outside_rows_kernel<<<64, 256, 0, st>>>(p);
  return cudaGetLastError();
}

}  // namespace prope
