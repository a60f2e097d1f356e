// The rotation alone (also the inverse rotation of dq/dk in the backward) and the backward's
// row term delta. Memory-bound helpers; no CuTe.
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <type_traits>

#include "params.h"
#include "rotation.h"

namespace prope {

template <typename T> __device__ __forceinline__ T from_f(float x);
template <> __device__ __forceinline__ float from_f<float>(float x) { return x; }
template <> __device__ __forceinline__ __half from_f<__half>(float x) { return __float2half_rn(x); }
template <> __device__ __forceinline__ __nv_bfloat16 from_f<__nv_bfloat16>(float x) { return __float2bfloat16_rn(x); }
__device__ __forceinline__ float to_f(__half x) { return __half2float(x); }
__device__ __forceinline__ float to_f(__nv_bfloat16 x) { return __bfloat162float(x); }

// One CTA per token (grid-stride): cos/sin of its num_rot angles go to smem once and serve every
// head (and, with p.cs_out, the table the SM90 forward rotates Q with). Work item = (head, pair):
// reads both dims then writes both, so in-place (x == y) is safe.
// Identity dims: copied when out of place (a multiply only when mul != 1 is requested, i.e. the
// float dq_accum -> dq conversion); not touched at all in place.
template <typename Tin, typename Tout>
__global__ void rope_kernel(const RopeParams p) {
  extern __shared__ float cs[];  // cos[num_rot], sin[num_rot] (sin negated for the inverse)
  const int nr = p.rot.num_rot, ni = p.rot.num_id;
  const bool in_place = static_cast<const void*>(p.x) == static_cast<const void*>(p.y);
  const bool scaled = p.mul != 1.f;
  for (int64_t t = blockIdx.x; t < p.total; t += gridDim.x) {
    const int64_t pos = p.positions[t];
    for (int i = threadIdx.x; i < nr; i += blockDim.x) {
      float c, s;
      rot_cos_sin(pos, p.rot.pair_freq[i], c, s);
      cs[i] = c;
      cs[nr + i] = p.conjugate ? -s : s;
    }
    __syncthreads();
    if (p.cs_out != nullptr) {  // the SM90 forward's Q table: pair i is column first + i
      const int w = cs_table_w(p.rot.run_a0, nr), first = p.rot.run_a0 - cs_table_lo(p.rot.run_a0);
      float* row = p.cs_out + t * 2 * w;
      for (int col = threadIdx.x; col < w; col += blockDim.x) {
        const int i = col - first;
        const bool in = i >= 0 && i < nr;
        row[col] = in ? cs[i] : 1.f;
        row[w + col] = in ? cs[nr + i] : 0.f;
      }
    }
    const Tin* x = static_cast<const Tin*>(p.x) + t * p.x_row;
    Tout* y = static_cast<Tout*>(p.y) + t * p.y_row;
    for (int it = threadIdx.x; it < p.heads * nr; it += blockDim.x) {
      const int h = it / nr, i = it - h * nr;
      const int a = p.rot.pair_a[i], b = p.rot.pair_b[i];
      const float xa = to_f(x[h * p.x_head + a]) * p.mul, xb = to_f(x[h * p.x_head + b]) * p.mul;
      const float c = cs[i], s = cs[nr + i];
      y[h * p.y_head + a] = from_f<Tout>(xa * c - xb * s);
      y[h * p.y_head + b] = from_f<Tout>(xb * c + xa * s);
    }
    if (!in_place) {
      for (int it = threadIdx.x; it < p.heads * ni; it += blockDim.x) {
        const int h = it / ni, j = p.rot.identity[it - h * ni];
        if constexpr (std::is_same_v<Tin, Tout>) {
          if (!scaled) { y[h * p.y_head + j] = x[h * p.x_head + j]; continue; }
        }
        y[h * p.y_head + j] = from_f<Tout>(to_f(x[h * p.x_head + j]) * p.mul);
      }
    }
    __syncthreads();  // cs is rewritten for the next token
  }
}

// delta[h, t] = sum_d dout * out - dlse: one warp per (token, head) row.
template <typename T>
__global__ void bwd_delta_kernel(const DeltaParams p) {
  const int lane = threadIdx.x & 31;
  const int64_t rows = p.total * p.heads;
  const int64_t warps = int64_t(gridDim.x) * (blockDim.x / 32);
  for (int64_t r = int64_t(blockIdx.x) * (blockDim.x / 32) + threadIdx.x / 32; r < rows; r += warps) {
    const int64_t t = r / p.heads;
    const int h = static_cast<int>(r - t * p.heads);
    const T* o = static_cast<const T*>(p.out) + t * p.o_row + h * p.o_head;
    const T* d = static_cast<const T*>(p.dout) + t * p.do_row + h * p.do_head;
    float acc = 0.f;
    for (int j = lane; j < p.head_dim; j += 32) acc += to_f(o[j]) * to_f(d[j]);
    for (int off = 16; off > 0; off >>= 1) acc += __shfl_xor_sync(0xffffffff, acc, off);
    if (lane == 0) {
      const int64_t idx = int64_t(h) * p.total + t;
      p.delta[idx] = acc - (p.dlse ? p.dlse[idx] : 0.f);
    }
  }
}

// Rows of no sequence: the c0 = cu_seqlens[0] rows before the first one and the rows from
// c1 = cu_seqlens[num_seqs] on. Usually none: then every thread returns after two loads.
__global__ void zero_outside_rows_kernel(const ZeroRowsParams p) {
  const int64_t c0 = p.cu_seqlens[0], c1 = p.cu_seqlens[p.num_seqs];
  const int64_t rows = c0 + (p.total - c1);
  const int64_t stride = int64_t(gridDim.x) * blockDim.x;
  for (int k = 0; k < 3; ++k) {
    if (p.x[k] == nullptr) continue;
    const int64_t per_row = int64_t(p.heads[k]) * p.head_dim;
    for (int64_t i = int64_t(blockIdx.x) * blockDim.x + threadIdx.x; i < rows * per_row; i += stride) {
      const int64_t r = i / per_row, rest = i - r * per_row;
      const int64_t t = r < c0 ? r : c1 + (r - c0);
      const int64_t h = rest / p.head_dim, j = rest - h * p.head_dim;
      static_cast<uint16_t*>(p.x[k])[t * p.row[k] + h * p.head[k] + j] = 0;
    }
  }
}

}  // namespace prope
