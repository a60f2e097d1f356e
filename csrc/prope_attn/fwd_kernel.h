// Forward: FlashAttention-2 style, one CTA per (q block of kBlockM rows, q head, sequence).
// The Q tile is rotated in shared memory right after it lands (it stays there for the whole
// key loop, so each q element is rotated once; pairs in a run in 16-byte chunks from the K pass's
// cos/sin table, as the SM90 forward); K arrives pre-rotated from a short-lived buffer
// (run_rope), so no K element is rotated more than once either.
#pragma once

#include "params.h"
#include "utils.h"

namespace prope {

template <int kHeadDim_, bool kBF16>
struct FwdTraits {
  using Element = std::conditional_t<kBF16, cutlass::bfloat16_t, cutlass::half_t>;
  static constexpr int kHeadDim = kHeadDim_;
  // d=256: 64x64 tiles keep the 128-float O accumulator per thread and 96 KB of smem.
  static constexpr int kBlockM = kHeadDim == 256 ? 64 : 128;
  static constexpr int kBlockN = 64;
  static constexpr int kNWarps = 4;
  static constexpr int kNThreads = kNWarps * 32;
  static_assert(kHeadDim % 64 == 0);

  using MmaAtom = std::conditional_t<kBF16, cute::MMA_Atom<cute::SM80_16x8x16_F32BF16BF16F32_TN>,
                                     cute::MMA_Atom<cute::SM80_16x8x16_F32F16F16F32_TN>>;
  // Warps stacked along M; each warp owns 16 rows and all columns (row reductions stay in a quad).
  using TiledMma = cute::TiledMMA<MmaAtom, cute::Layout<cute::Shape<cute::Int<kNWarps>, cute::_1, cute::_1>>,
                                  cute::Tile<cute::Int<16 * kNWarps>, cute::_16, cute::_16>>;

  // (8 x 64) atom, 128-byte rows, XOR swizzle of 16-byte chunks: conflict-free ldmatrix.
  using SmemAtom = decltype(cute::composition(
      cute::Swizzle<3, 3, 3>{},
      cute::Layout<cute::Shape<cute::_8, cute::_64>, cute::Stride<cute::_64, cute::_1>>{}));
  using SmemLayoutQ = decltype(cute::tile_to_shape(SmemAtom{}, cute::Shape<cute::Int<kBlockM>, cute::Int<kHeadDim>>{}));
  using SmemLayoutKV = decltype(cute::tile_to_shape(SmemAtom{}, cute::Shape<cute::Int<kBlockN>, cute::Int<kHeadDim>>{}));
  // V^T (d, kBlockN) view of V for the B operand of P @ V.
  using SmemLayoutVt = decltype(cute::composition(
      SmemLayoutKV{}, cute::make_layout(cute::Shape<cute::Int<kHeadDim>, cute::Int<kBlockN>>{}, cute::GenRowMajor{})));

  using SmemCopyAtom = cute::Copy_Atom<cute::SM75_U32x4_LDSM_N, Element>;
  using SmemCopyAtomT = cute::Copy_Atom<cute::SM75_U16x8_LDSM_T, Element>;

  // gmem <-> smem: 16-byte vectors, 8 threads per 64-wide row chunk.
  using GmemThr = cute::Layout<cute::Shape<cute::Int<kNThreads / 8>, cute::_8>, cute::Stride<cute::_8, cute::_1>>;
  using GmemTiledCopy = decltype(cute::make_tiled_copy(
      cute::Copy_Atom<cute::SM80_CP_ASYNC_CACHEGLOBAL<cute::uint128_t>, Element>{}, GmemThr{},
      cute::Layout<cute::Shape<cute::_1, cute::_8>>{}));
  using GmemTiledCopyO = decltype(cute::make_tiled_copy(
      cute::Copy_Atom<cute::UniversalCopy<cute::uint128_t>, Element>{}, GmemThr{},
      cute::Layout<cute::Shape<cute::_1, cute::_8>>{}));

  static constexpr int kSmemBytes = (kBlockM + 2 * kBlockN) * kHeadDim * int(sizeof(Element));
};

template <class Tr, bool kCausal, bool kRotate>
__global__ void __launch_bounds__(Tr::kNThreads) attn_fwd_kernel(const FwdParams p) {
  using namespace cute;
  using Element = typename Tr::Element;
  constexpr int kBM = Tr::kBlockM, kBN = Tr::kBlockN, kD = Tr::kHeadDim;

  // last q blocks first: under a causal mask they have the most keys (better tail balance)
  const int m_block = gridDim.x - 1 - blockIdx.x, h = blockIdx.y, b = blockIdx.z;
  const int tid = threadIdx.x;
  const int64_t seq_start = p.cu_seqlens[b];
  const int seqlen = p.cu_seqlens[b + 1] - static_cast<int>(seq_start);
  if (m_block * kBM >= seqlen) return;
  const int hk = h / (p.q_heads / p.kv_heads);  // GQA: kv head of this q head
  const int m_rows = seqlen - m_block * kBM;    // valid rows of this q block (may be < kBM)

  int n_block_max = (seqlen + kBN - 1) / kBN;
  if (kCausal) n_block_max = min(n_block_max, ((m_block + 1) * kBM + kBN - 1) / kBN);

  extern __shared__ __align__(128) char smem_raw[];
  Tensor sQ = make_tensor(make_smem_ptr(reinterpret_cast<Element*>(smem_raw)), typename Tr::SmemLayoutQ{});
  Tensor sK = make_tensor(sQ.data() + size(sQ), typename Tr::SmemLayoutKV{});
  Tensor sV = make_tensor(sK.data() + size(sK), typename Tr::SmemLayoutKV{});
  Tensor sVt = make_tensor(sV.data(), typename Tr::SmemLayoutVt{});

  // (seqlen, d) views of this sequence/head; 64-bit offsets.
  const Element* qp = static_cast<const Element*>(p.q) + seq_start * p.q_row + h * p.q_head;
  const Element* kp = static_cast<const Element*>(p.k) + seq_start * p.k_row + hk * p.k_head;
  const Element* vp = static_cast<const Element*>(p.v) + seq_start * p.v_row + hk * p.v_head;
  Element* op = static_cast<Element*>(p.o) + seq_start * p.o_row + h * p.o_head;
  Tensor mQ = make_tensor(make_gmem_ptr(qp), make_shape(seqlen, Int<kD>{}), make_stride(p.q_row, _1{}));
  Tensor mK = make_tensor(make_gmem_ptr(kp), make_shape(seqlen, Int<kD>{}), make_stride(p.k_row, _1{}));
  Tensor mV = make_tensor(make_gmem_ptr(vp), make_shape(seqlen, Int<kD>{}), make_stride(p.v_row, _1{}));
  Tensor mO = make_tensor(make_gmem_ptr(op), make_shape(seqlen, Int<kD>{}), make_stride(p.o_row, _1{}));
  Tensor gQ = local_tile(mQ, Shape<Int<kBM>, Int<kD>>{}, make_coord(m_block, 0));  // (kBM, kD)
  Tensor gO = local_tile(mO, Shape<Int<kBM>, Int<kD>>{}, make_coord(m_block, 0));
  Tensor gK = local_tile(mK, Shape<Int<kBN>, Int<kD>>{}, make_coord(_, 0));        // (kBN, kD, n)
  Tensor gV = local_tile(mV, Shape<Int<kBN>, Int<kD>>{}, make_coord(_, 0));

  typename Tr::GmemTiledCopy gcopy;
  auto gthr = gcopy.get_thread_slice(tid);
  Tensor tQgQ = gthr.partition_S(gQ);
  Tensor tQsQ = gthr.partition_D(sQ);
  Tensor tKgK = gthr.partition_S(gK);  // (CPY, CPY_N, CPY_K, n)
  Tensor tKsK = gthr.partition_D(sK);
  Tensor tVgV = gthr.partition_S(gV);
  Tensor tVsV = gthr.partition_D(sV);
  Tensor tQcQ = gthr.partition_S(make_identity_tensor(Shape<Int<kBM>, Int<kD>>{}));
  Tensor tKVc = gthr.partition_S(make_identity_tensor(Shape<Int<kBN>, Int<kD>>{}));

  typename Tr::TiledMma mma;
  auto thr_mma = mma.get_thread_slice(tid);
  Tensor tSrQ = thr_mma.partition_fragment_A(sQ);    // (MMA, MMA_M, MMA_K)
  Tensor tSrK = thr_mma.partition_fragment_B(sK);    // (MMA, MMA_N, MMA_K)
  Tensor tOrVt = thr_mma.partition_fragment_B(sVt);  // (MMA, MMA_D, MMA_KN)
  Tensor acc_o = partition_fragment_C(mma, Shape<Int<kBM>, Int<kD>>{});

  auto cpQ = make_tiled_copy_A(typename Tr::SmemCopyAtom{}, mma);
  Tensor tSsQ = cpQ.get_thread_slice(tid).partition_S(sQ);
  auto cpK = make_tiled_copy_B(typename Tr::SmemCopyAtom{}, mma);
  Tensor tSsK = cpK.get_thread_slice(tid).partition_S(sK);
  auto cpV = make_tiled_copy_B(typename Tr::SmemCopyAtomT{}, mma);
  Tensor tOsVt = cpV.get_thread_slice(tid).partition_S(sVt);

  // (row, col) of every accumulator element of S, in the (rows, cols) view.
  Tensor tScS = thr_mma.partition_C(make_identity_tensor(Shape<Int<kBM>, Int<kBN>>{}));
  Tensor tScS_rc = make_tensor(tScS.data(), acc_rowcol(tScS.layout()));
  constexpr int kRows = decltype(size<0>(acc_rowcol(acc_o.layout())))::value;
  float row_max[kRows], row_sum[kRows];
  CUTE_UNROLL
  for (int i = 0; i < kRows; ++i) { row_max[i] = -INFINITY; row_sum[i] = 0.f; }
  clear(acc_o);

  copy_rows(gcopy, tQgQ, tQsQ, tQcQ, m_rows);
  copy_rows(gcopy, tKgK(_, _, _, 0), tKsK, tKVc, seqlen);
  cp_async_fence();
  if constexpr (kRotate) {
    auto wait_q = [&] {
      cp_async_wait<0>();
      __syncthreads();
    };
    const int64_t q_row0 = seq_start + int64_t(m_block) * kBM;
    if (p.q_cs != nullptr) {  // pairs in a run: 16-byte chunks, cos/sin from the K pass's table
      const int w = cs_table_w(p.rot.run_a0, p.rot.num_rot);
      rotate_tile_chunks<kBM, std::is_same_v<Element, cutlass::bfloat16_t>>(
          smem_raw, p.q_cs + q_row0 * 2 * w, m_rows, w, cs_table_lo(p.rot.run_a0),
          p.rot.run_b_off, tid, Tr::kNThreads, wait_q);
    } else {
      wait_q();
      rotate_tile_smem(sQ, p.positions, q_row0, m_rows, p.rot.pair_a, p.rot.pair_b,
                       p.rot.pair_freq, p.rot.num_rot, tid, Tr::kNThreads);
    }
    // visibility of the rotated tile: the __syncthreads at the top of the loop
  }

  const float sl2 = p.scale * 1.4426950408889634f;  // scores -> log2 domain
  Tensor acc_s = partition_fragment_C(mma, Shape<Int<kBM>, Int<kBN>>{});
  Tensor s_rc = make_tensor(acc_s.data(), acc_rowcol(acc_s.layout()));
  Tensor o_rc = make_tensor(acc_o.data(), acc_rowcol(acc_o.layout()));

  for (int n_block = 0; n_block < n_block_max; ++n_block) {
    clear(acc_s);
    cp_async_wait<0>();
    __syncthreads();  // K[n] (and Q) landed; everyone is done with V[n-1]
    copy_rows(gcopy, tVgV(_, _, _, n_block), tVsV, tKVc, seqlen - n_block * kBN);
    cp_async_fence();

    gemm_ss(acc_s, tSrQ, tSrK, tSsQ, tSsK, mma, cpQ, cpK);  // S = Q K^T  (kBM, kBN)

    // keys past the end of the sequence, and the causal upper triangle, get -inf
    const bool need_mask = (n_block + 1) * kBN > seqlen ||
                           (kCausal && (n_block + 1) * kBN - 1 > m_block * kBM);
    if (need_mask) {
      CUTE_UNROLL
      for (int i = 0; i < size<0>(s_rc); ++i) {
        CUTE_UNROLL
        for (int j = 0; j < size<1>(s_rc); ++j) {
          const int row = m_block * kBM + get<0>(tScS_rc(i, j));
          const int col = n_block * kBN + get<1>(tScS_rc(i, j));
          if (col >= seqlen || (kCausal && col > row)) s_rc(i, j) = -INFINITY;
        }
      }
    }

    cp_async_wait<0>();
    __syncthreads();  // V[n] landed; everyone is done reading K[n]
    if (n_block + 1 < n_block_max) {
      copy_rows(gcopy, tKgK(_, _, _, n_block + 1), tKsK, tKVc, seqlen - (n_block + 1) * kBN);
      cp_async_fence();
    }

    online_softmax_block<kRows>(s_rc, o_rc, row_max, row_sum, sl2);

    Tensor rP = convert_frag<Element>(acc_s);
    Tensor tOrP = make_tensor(rP.data(), acc_to_a(rP.layout()));  // (MMA, MMA_M, kBN/16)
    gemm_rs(acc_o, tOrP, tOrVt, tOsVt, mma, cpV);                 // O += P V
  }

  // normalise, write lse (one lane per row: the one holding column 0), then O via smem
  CUTE_UNROLL
  for (int i = 0; i < kRows; ++i) {
    const float sum = quad_sum(row_sum[i]);
    const float inv = (sum == 0.f || sum != sum) ? 1.f : 1.f / sum;
    CUTE_UNROLL
    for (int j = 0; j < size<1>(o_rc); ++j) o_rc(i, j) *= inv;
    if (get<1>(tScS_rc(i, 0)) == 0) {
      const int row = get<0>(tScS_rc(i, 0));
      if (row < m_rows) {
        const float lse = sum == 0.f ? INFINITY : row_max[i] * p.scale + logf(sum);
        p.lse[int64_t(h) * p.total + seq_start + int64_t(m_block) * kBM + row] = lse;
      }
    }
  }

  Tensor rO = convert_frag<Element>(acc_o);
  Tensor sO = make_tensor(sQ.data(), typename Tr::SmemLayoutQ{});
  __syncthreads();  // every warp is done reading sQ
  Tensor tOsO = thr_mma.partition_C(sO);
  copy(rO, tOsO);
  __syncthreads();
  typename Tr::GmemTiledCopyO ocopy;
  auto othr = ocopy.get_thread_slice(tid);
  Tensor tOsO2 = othr.partition_S(sO);
  Tensor tOgO = othr.partition_D(gO);
  store_rows(ocopy, tOsO2, tOgO, tQcQ, m_rows);
}

template <bool kBF16, int kD>
int attn_fwd_smem_bytes() { return FwdTraits<kD, kBF16>::kSmemBytes; }

template <bool kBF16, int kD>
cudaError_t run_attn_fwd(const FwdParams& p, cudaStream_t st) {
  using Tr = FwdTraits<kD, kBF16>;
  if (p.total == 0 || p.max_seqlen == 0 || p.num_seqs == 0) return cudaSuccess;
  dim3 grid((p.max_seqlen + Tr::kBlockM - 1) / Tr::kBlockM, p.q_heads, p.num_seqs);
  constexpr int smem = Tr::kSmemBytes;
  auto go = [&](auto kernel) -> cudaError_t {
    if (smem > 48 * 1024) {
      cudaError_t e = cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, smem);
      if (e != cudaSuccess) return e;
    }
    kernel<<<grid, Tr::kNThreads, smem, st>>>(p);
    return cudaGetLastError();
  };
  const bool rot = p.rot.num_rot > 0;
  if (p.causal) return rot ? go(attn_fwd_kernel<Tr, true, true>) : go(attn_fwd_kernel<Tr, true, false>);
  return rot ? go(attn_fwd_kernel<Tr, false, true>) : go(attn_fwd_kernel<Tr, false, false>);
}

}  // namespace prope
