// Device helpers shared by the attention and rope kernels: rotation angles, CuTe layout
// conversions for MMA accumulators, smem->register GEMM loops, guarded tile copies.
#pragma once

#include <cmath>
#include <cstdint>
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <cute/tensor.hpp>
#include <cutlass/numeric_types.h>
#include <cutlass/numeric_conversion.h>

#include "rotation.h"

namespace prope {


// MMA accumulator ((2 cols, 2 rows), MMA_M, MMA_N) -> (rows=(2, MMA_M), cols=(2, MMA_N)).
template <class Layout>
CUTE_HOST_DEVICE auto acc_rowcol(Layout l) {  // host too: csrc/tests/test_layouts.cu
  using namespace cute;
  static_assert(decltype(rank(l))::value == 3);
  return make_layout(make_layout(get<0, 1>(l), get<1>(l)), make_layout(get<0, 0>(l), get<2>(l)));
}

// Accumulator of an m16n8k16 MMA ((2,2), MMA_M, MMA_N) -> A-operand registers
// ((2,2,2), MMA_M, MMA_N/2): two neighbouring n8 tiles form one k16 slice.
template <class Layout>
CUTE_HOST_DEVICE auto acc_to_a(Layout l) {
  using namespace cute;
  auto d = logical_divide(l, Shape<Underscore, Underscore, _2>{});
  return make_layout(make_layout(get<0>(d), get<2, 0>(d)), get<1>(d), get<2, 1>(d));
}

template <typename To, class TensorF>
__device__ __forceinline__ auto convert_frag(const TensorF& t) {
  using namespace cute;
  auto r = make_tensor<To>(t.layout());  // owning register fragment, same (compact) layout
  CUTE_UNROLL
  for (int i = 0; i < size(t); ++i) r(i) = static_cast<To>(t(i));
  return r;
}

// acc += A(smem) * B(smem): both operands pulled through ldmatrix one k16 slice ahead.
template <class Acc, class RA, class RB, class SA, class SB, class Mma, class CpA, class CpB>
__device__ __forceinline__ void gemm_ss(Acc& acc, RA& rA, RB& rB, const SA& sA, const SB& sB,
                                        const Mma& mma, const CpA& cpA, const CpB& cpB) {
  using namespace cute;
  auto rA_v = make_tensor(rA.data(), CpA::retile(rA.layout()));
  auto rB_v = make_tensor(rB.data(), CpB::retile(rB.layout()));
  copy(cpA, sA(_, _, _0{}), rA_v(_, _, _0{}));
  copy(cpB, sB(_, _, _0{}), rB_v(_, _, _0{}));
  CUTE_UNROLL
  for (int i = 0; i < size<2>(rA); ++i) {
    if (i < size<2>(rA) - 1) {
      copy(cpA, sA(_, _, i + 1), rA_v(_, _, i + 1));
      copy(cpB, sB(_, _, i + 1), rB_v(_, _, i + 1));
    }
    gemm(mma, rA(_, _, i), rB(_, _, i), acc);
  }
}

// acc += A(registers) * B(smem).
template <class Acc, class RA, class RB, class SB, class Mma, class CpB>
__device__ __forceinline__ void gemm_rs(Acc& acc, const RA& rA, RB& rB, const SB& sB,
                                        const Mma& mma, const CpB& cpB) {
  using namespace cute;
  auto rB_v = make_tensor(rB.data(), CpB::retile(rB.layout()));
  copy(cpB, sB(_, _, _0{}), rB_v(_, _, _0{}));
  CUTE_UNROLL
  for (int i = 0; i < size<2>(rA); ++i) {
    if (i < size<2>(rA) - 1) copy(cpB, sB(_, _, i + 1), rB_v(_, _, i + 1));
    gemm(mma, rA(_, _, i), rB(_, _, i), acc);
  }
}

// gmem -> smem tile copy (cp.async) of a (rows, d) tile; rows >= max_rows are zero-filled with
// plain smem stores (the tile's other rows may then be read as zeros by the MMA).
// S, D: (CPY, CPY_M, CPY_K) partitions; C: the same partition of an identity tensor.
template <class Cp, class S, class D, class C>
__device__ __forceinline__ void copy_rows(const Cp& cp, const S& src, D& dst, const C& coord,
                                          int max_rows) {
  using namespace cute;
  CUTE_UNROLL
  for (int m = 0; m < size<1>(src); ++m) {
    if (get<0>(coord(0, m, 0)) < max_rows) {
      copy(cp, src(_, m, _), dst(_, m, _));
    } else {
      clear(dst(_, m, _));
    }
  }
}

// smem -> gmem (plain 128-bit stores) of rows < max_rows.
template <class Cp, class S, class D, class C>
__device__ __forceinline__ void store_rows(const Cp& cp, const S& src, D& dst, const C& coord,
                                           int max_rows) {
  using namespace cute;
  CUTE_UNROLL
  for (int m = 0; m < size<1>(src); ++m) {
    if (get<0>(coord(0, m, 0)) < max_rows) copy(cp, src(_, m, _), dst(_, m, _));
  }
}

// Row-wise quad reductions: the 4 lanes of a quad hold one MMA row.
__device__ __forceinline__ float quad_max(float x) {
  x = fmaxf(x, __shfl_xor_sync(0xffffffff, x, 1));
  return fmaxf(x, __shfl_xor_sync(0xffffffff, x, 2));
}
__device__ __forceinline__ float quad_sum(float x) {
  x += __shfl_xor_sync(0xffffffff, x, 1);
  return x + __shfl_xor_sync(0xffffffff, x, 2);
}

// One key block of the forward's online softmax, for the kRows rows this thread holds.
// s_rc (rows, keys) fp32 scores -> exp2 probabilities in place; row_max/row_sum updated; o_rc
// (rows, d) accumulator rescaled. A row lives in one quad: its max is reduced over the 4 lanes,
// its sum stays per thread. sl2 = softmax scale * log2(e). Used by the SM80 and SM90 forwards.
template <int kRows, class TensorS, class TensorO>
__device__ __forceinline__ void online_softmax_block(TensorS& s_rc, TensorO& o_rc, float* row_max,
                                                     float* row_sum, float sl2) {
  using namespace cute;
  CUTE_UNROLL
  for (int i = 0; i < kRows; ++i) {
    float mx = row_max[i];
    CUTE_UNROLL
    for (int j = 0; j < size<1>(s_rc); ++j) mx = fmaxf(mx, s_rc(i, j));
    mx = quad_max(mx);
    const float m_scaled = mx == -INFINITY ? 0.f : mx * sl2;
    const float corr = fast_exp2(row_max[i] * sl2 - m_scaled);
    row_max[i] = mx;
    float sum = 0.f;
    CUTE_UNROLL
    for (int j = 0; j < size<1>(s_rc); ++j) {
      const float e = fast_exp2(fmaf(s_rc(i, j), sl2, -m_scaled));
      s_rc(i, j) = e;
      sum += e;
    }
    row_sum[i] = row_sum[i] * corr + sum;
    CUTE_UNROLL
    for (int j = 0; j < size<1>(o_rc); ++j) o_rc(i, j) *= corr;
  }
}

// Rotate a (rows, d) smem tile in place by the rotation at positions[row0 + r] (rows < nrows).
// Only the rotated pairs are touched; each (row, pair) is one work item of the CTA's threads.
// kPi: angles through rot_cos_sin_pi (no local memory; the SM90 kernels), else rot_cos_sin.
// kConj: the inverse rotation (the backward's dK, w.r.t. the rotated k -> w.r.t. k).
template <bool kPi = false, bool kConj = false, class STensor>
__device__ __forceinline__ void rotate_tile_smem(STensor& s, const int64_t* positions,
                                                 int64_t row0, int nrows, const int32_t* pair_a,
                                                 const int32_t* pair_b, const double* pair_freq,
                                                 int num_rot, int tid, int nthreads) {
  using namespace cute;
  constexpr int kRows = decltype(size<0>(s))::value;
  const int items = kRows * num_rot;
  for (int it = tid; it < items; it += nthreads) {
    const int r = it / num_rot, i = it - r * num_rot;
    if (r >= nrows) continue;
    const int a = __ldg(pair_a + i), b = __ldg(pair_b + i);
    float c, sn;
    if constexpr (kPi) {
      rot_cos_sin_pi(__ldg(positions + row0 + r), __ldg(pair_freq + i), c, sn);
    } else {
      rot_cos_sin(__ldg(positions + row0 + r), __ldg(pair_freq + i), c, sn);
    }
    if constexpr (kConj) sn = -sn;
    const float xa = to_f(s(r, a)), xb = to_f(s(r, b));
    using E = typename STensor::value_type;
    s(r, a) = E(xa * c - xb * sn);
    s(r, b) = E(xb * c + xa * sn);
  }
}

// Byte offset of the 16-byte chunk holding columns [col, col + 8) (col % 8 == 0) of row r in a
// (kRows, d) 16-bit tile laid out as tile_to_shape(Layout_K_SW128_Atom, (kRows, d)): row r of
// atom column col / 64 is the 128-byte span at ((col / 64) * kRows + r) * 128, inside which the
// 128-byte swizzle moves chunk j to j ^ (r % 8) (rotate_tile_chunks): the tile's base must be
// 1024-byte aligned, as the SM90 kernels' smem tiles are (the SM80 tile's swizzle is in its
// layout, relative to the base). (Host check: test_layouts.cu, against CuTe's layouts of the
// tiles this is used on.)
template <int kRows>
CUTE_HOST_DEVICE uint32_t sw128_chunk_bytes(int r, int col) {
  static_assert(kRows % 8 == 0);
  return uint32_t(((col >> 6) * kRows + r) * 128 + ((((col >> 3) & 7) ^ (r & 7)) << 4));
}

// The work items of rotate_tile_chunks: thread tid takes items tid, tid + nthreads, ... of
// (row, chunk) = divmod(item, nchunk), advanced without a division per item. (Host check:
// test_layouts.cu, every item once.)
struct ChunkItems {
  int r, c, dr, dc, nchunk;
  CUTE_HOST_DEVICE ChunkItems(int tid, int nthreads, int n)
      : r(tid / n), c(tid % n), dr(nthreads / n), dc(nthreads % n), nchunk(n) {}
  CUTE_HOST_DEVICE void next() {
    r += dr;
    c += dc;
    if (c >= nchunk) { c -= nchunk; ++r; }
  }
};

// 8 packed 16-bit values (one 16-byte chunk) <-> 8 floats.
template <bool kBF16>
__device__ __forceinline__ void unpack8(const uint32_t (&u)[4], float (&f)[8]) {
  CUTE_UNROLL
  for (int j = 0; j < 4; ++j) {
    if constexpr (kBF16) {
      f[2 * j] = __uint_as_float(u[j] << 16);
      f[2 * j + 1] = __uint_as_float(u[j] & 0xffff0000u);
    } else {
      const float2 x = __half22float2(*reinterpret_cast<const __half2*>(&u[j]));
      f[2 * j] = x.x;
      f[2 * j + 1] = x.y;
    }
  }
}
template <bool kBF16>
__device__ __forceinline__ void pack8(const float (&f)[8], uint32_t (&u)[4]) {
  CUTE_UNROLL
  for (int j = 0; j < 4; ++j) {
    if constexpr (kBF16) {
      const __nv_bfloat162 x = __floats2bfloat162_rn(f[2 * j], f[2 * j + 1]);
      u[j] = *reinterpret_cast<const uint32_t*>(&x);
    } else {
      const __half2 x = __floats2half2_rn(f[2 * j], f[2 * j + 1]);
      u[j] = *reinterpret_cast<const uint32_t*>(&x);
    }
  }
}

// Rotate a (kRows, d) tile in shared memory (the forwards' Q; kConj: the inverse rotation, the
// SM90 fused backward's dK), pairs in a run (RotTables::run_a0). Work item (row r <
// min(nrows, kRows), chunk c; ChunkItems) rotates dims [lo + 8c, +8) against the 8 dims b_off
// further: two 16-byte smem loads, 16 FMA pairs, two 16-byte stores, cos/sin from the K pass's
// table (row r at cs + r * 2w: w cos then w sin; lo, w: cs_table_lo/_w). A thread's first two
// items' table entries are loaded before wait_tile() (the forward: the Q tile's barrier), each
// later one two items ahead: no angle math and little table latency before the GEMMs.
template <int kRows, bool kBF16, bool kConj = false, class WaitTile>
__device__ __forceinline__ void rotate_tile_chunks(void* tile, const float* cs, int nrows, int w,
                                                   int lo, int b_off, int tid, int nthreads,
                                                   WaitTile&& wait_tile) {
  const int nchunk = w >> 3, rows = nrows < kRows ? nrows : kRows;
  const uint32_t base = cute::cast_smem_ptr_to_uint(tile);
  // cos[0:4], cos[4:8], sin[0:4], sin[4:8] of an item: a thread's items alternate between t0 and
  // t1 (named arrays, so that they stay in registers), each loaded two items ahead
  float4 t0[4], t1[4];
  auto fetch = [&](float4 (&t)[4], const ChunkItems& at) {
    if (at.r >= rows) return;
    const float4* row = reinterpret_cast<const float4*>(cs + int64_t(at.r) * 2 * w + 8 * at.c);
    t[0] = __ldg(row);
    t[1] = __ldg(row + 1);
    t[2] = __ldg(row + (w >> 2));
    t[3] = __ldg(row + (w >> 2) + 1);
  };
  ChunkItems it(tid, nthreads, nchunk), ahead = it;
  fetch(t0, ahead);
  ahead.next();
  fetch(t1, ahead);
  ahead.next();
  wait_tile();
  // one item from t (then t takes the item two ahead); false once this thread has none left
  auto rotate_one = [&](float4 (&t)[4]) -> bool {
    if (it.r >= rows) return false;
    const float co[8] = {t[0].x, t[0].y, t[0].z, t[0].w, t[1].x, t[1].y, t[1].z, t[1].w};
    float si[8] = {t[2].x, t[2].y, t[2].z, t[2].w, t[3].x, t[3].y, t[3].z, t[3].w};
    if constexpr (kConj) {
      CUTE_UNROLL
      for (int j = 0; j < 8; ++j) si[j] = -si[j];
    }
    fetch(t, ahead);
    ahead.next();
    const int r = it.r, col = lo + 8 * it.c;
    it.next();
    const uint32_t pa = base + sw128_chunk_bytes<kRows>(r, col);
    const uint32_t pb = base + sw128_chunk_bytes<kRows>(r, col + b_off);
    uint32_t ua[4], ub[4];
    asm volatile("ld.shared.v4.u32 {%0, %1, %2, %3}, [%4];\n"
                 : "=r"(ua[0]), "=r"(ua[1]), "=r"(ua[2]), "=r"(ua[3]) : "r"(pa));
    asm volatile("ld.shared.v4.u32 {%0, %1, %2, %3}, [%4];\n"
                 : "=r"(ub[0]), "=r"(ub[1]), "=r"(ub[2]), "=r"(ub[3]) : "r"(pb));
    float xa[8], xb[8], ya[8], yb[8];
    unpack8<kBF16>(ua, xa);
    unpack8<kBF16>(ub, xb);
    CUTE_UNROLL
    for (int j = 0; j < 8; ++j) {
      ya[j] = xa[j] * co[j] - xb[j] * si[j];
      yb[j] = xb[j] * co[j] + xa[j] * si[j];
    }
    pack8<kBF16>(ya, ua);
    pack8<kBF16>(yb, ub);
    asm volatile("st.shared.v4.u32 [%0], {%1, %2, %3, %4};\n"
                 ::"r"(pa), "r"(ua[0]), "r"(ua[1]), "r"(ua[2]), "r"(ua[3]) : "memory");
    asm volatile("st.shared.v4.u32 [%0], {%1, %2, %3, %4};\n"
                 ::"r"(pb), "r"(ub[0]), "r"(ub[1]), "r"(ub[2]), "r"(ub[3]) : "memory");
    return true;
  };
#pragma unroll 1
  while (rotate_one(t0) && rotate_one(t1)) {
  }
}

}  // namespace prope
