// Backward: FlashAttention-2 style, one CTA per (key block of kBlockN rows, kv head, sequence).
// Inputs q and k are the short-lived ROTATED buffers; the caller applies the inverse rotation to
// dq (while converting dq_accum) and to dk afterwards. GQA/MQA: the CTA loops over the q heads
// of its group, so dK/dV are reduced over the group in registers (no expanded k/v, no atomics
// on dK/dV); dQ is accumulated with float atomics into dq_accum.
#pragma once

#include "params.h"
#include "utils.h"

namespace prope {

template <int kHeadDim_, bool kBF16>
struct BwdTraits {
  using Element = std::conditional_t<kBF16, cutlass::bfloat16_t, cutlass::half_t>;
  static constexpr int kHeadDim = kHeadDim_;
  static constexpr int kBlockM = 64, kBlockN = 64, kNWarps = 8, kNThreads = kNWarps * 32;
  static_assert(kHeadDim % 64 == 0);

  using MmaAtom = std::conditional_t<kBF16, cute::MMA_Atom<cute::SM80_16x8x16_F32BF16BF16F32_TN>,
                                     cute::MMA_Atom<cute::SM80_16x8x16_F32F16F16F32_TN>>;
  // S, dP (kBlockM x kBlockN): 2 warps along M, 4 along N.
  using MmaSdP = cute::TiledMMA<MmaAtom, cute::Layout<cute::Shape<cute::_2, cute::_4, cute::_1>>,
                                cute::Tile<cute::_32, cute::_64, cute::_16>>;
  // dK, dV (kBlockN x d): 4 warps along the keys, 2 along d.
  using MmadKV = cute::TiledMMA<MmaAtom, cute::Layout<cute::Shape<cute::_4, cute::_2, cute::_1>>,
                                cute::Tile<cute::_64, cute::_32, cute::_16>>;
  // dQ (kBlockM x d): 2 warps along M, 4 along d.
  using MmadQ = cute::TiledMMA<MmaAtom, cute::Layout<cute::Shape<cute::_2, cute::_4, cute::_1>>,
                               cute::Tile<cute::_32, cute::_64, cute::_16>>;

  using SmemAtom = decltype(cute::composition(
      cute::Swizzle<3, 3, 3>{},
      cute::Layout<cute::Shape<cute::_8, cute::_64>, cute::Stride<cute::_64, cute::_1>>{}));
  using SmemLayoutQ = decltype(cute::tile_to_shape(SmemAtom{}, cute::Shape<cute::Int<kBlockM>, cute::Int<kHeadDim>>{}));
  using SmemLayoutKV = decltype(cute::tile_to_shape(SmemAtom{}, cute::Shape<cute::Int<kBlockN>, cute::Int<kHeadDim>>{}));
  using SmemLayoutPdS = decltype(cute::tile_to_shape(SmemAtom{}, cute::Shape<cute::Int<kBlockM>, cute::Int<kBlockN>>{}));
  // Transposed views (the contraction runs over the tile rows): read with ldmatrix.trans.
  using SmemLayoutQt = decltype(cute::composition(
      SmemLayoutQ{}, cute::make_layout(cute::Shape<cute::Int<kHeadDim>, cute::Int<kBlockM>>{}, cute::GenRowMajor{})));
  using SmemLayoutKt = decltype(cute::composition(
      SmemLayoutKV{}, cute::make_layout(cute::Shape<cute::Int<kHeadDim>, cute::Int<kBlockN>>{}, cute::GenRowMajor{})));
  using SmemLayoutPdSt = decltype(cute::composition(
      SmemLayoutPdS{}, cute::make_layout(cute::Shape<cute::Int<kBlockN>, cute::Int<kBlockM>>{}, cute::GenRowMajor{})));

  using SmemCopyAtom = cute::Copy_Atom<cute::SM75_U32x4_LDSM_N, Element>;
  using SmemCopyAtomT = cute::Copy_Atom<cute::SM75_U16x8_LDSM_T, Element>;

  using GmemThr = cute::Layout<cute::Shape<cute::Int<kNThreads / 8>, cute::_8>, cute::Stride<cute::_8, cute::_1>>;
  using GmemTiledCopy = decltype(cute::make_tiled_copy(
      cute::Copy_Atom<cute::SM80_CP_ASYNC_CACHEGLOBAL<cute::uint128_t>, Element>{}, GmemThr{},
      cute::Layout<cute::Shape<cute::_1, cute::_8>>{}));
  using GmemTiledCopyO = decltype(cute::make_tiled_copy(
      cute::Copy_Atom<cute::UniversalCopy<cute::uint128_t>, Element>{}, GmemThr{},
      cute::Layout<cute::Shape<cute::_1, cute::_8>>{}));

  // sQ, sdO (kBlockM x d), sK, sV (kBlockN x d), sP, sdS (kBlockM x kBlockN), lse, delta (kBlockM)
  static constexpr int kSmemElems = 2 * kBlockM * kHeadDim + 2 * kBlockN * kHeadDim + 2 * kBlockM * kBlockN;
  static constexpr int kSmemBytes = kSmemElems * int(sizeof(Element)) + 2 * kBlockM * int(sizeof(float));
};

template <class Tr, bool kCausal>
__global__ void __launch_bounds__(Tr::kNThreads) attn_bwd_kernel(const BwdParams p) {
  using namespace cute;
  using Element = typename Tr::Element;
  constexpr int kBM = Tr::kBlockM, kBN = Tr::kBlockN, kD = Tr::kHeadDim;

  const int n_block = blockIdx.x, hk = blockIdx.y, b = blockIdx.z;
  const int tid = threadIdx.x;
  const int64_t seq_start = p.cu_seqlens[b];
  const int seqlen = p.cu_seqlens[b + 1] - static_cast<int>(seq_start);
  if (n_block * kBN >= seqlen) return;
  const int group = p.q_heads / p.kv_heads;
  const int n_rows = seqlen - n_block * kBN;
  // causal: q rows below this key block's first key never see it
  const int m_block_min = kCausal ? (n_block * kBN) / kBM : 0;
  const int m_block_max = (seqlen + kBM - 1) / kBM;

  extern __shared__ __align__(128) char smem_raw[];
  Element* sbase = reinterpret_cast<Element*>(smem_raw);
  Tensor sQ = make_tensor(make_smem_ptr(sbase), typename Tr::SmemLayoutQ{});
  Tensor sdO = make_tensor(sQ.data() + size(sQ), typename Tr::SmemLayoutQ{});
  Tensor sK = make_tensor(sdO.data() + size(sdO), typename Tr::SmemLayoutKV{});
  Tensor sV = make_tensor(sK.data() + size(sK), typename Tr::SmemLayoutKV{});
  Tensor sP = make_tensor(sV.data() + size(sV), typename Tr::SmemLayoutPdS{});
  Tensor sdS = make_tensor(sP.data() + size(sP), typename Tr::SmemLayoutPdS{});
  float* sLse = reinterpret_cast<float*>(sbase + Tr::kSmemElems);  // lse * log2(e)
  float* sDelta = sLse + kBM;
  Tensor sQt = make_tensor(sQ.data(), typename Tr::SmemLayoutQt{});
  Tensor sdOt = make_tensor(sdO.data(), typename Tr::SmemLayoutQt{});
  Tensor sKt = make_tensor(sK.data(), typename Tr::SmemLayoutKt{});
  Tensor sPt = make_tensor(sP.data(), typename Tr::SmemLayoutPdSt{});
  Tensor sdSt = make_tensor(sdS.data(), typename Tr::SmemLayoutPdSt{});

  const Element* kp = static_cast<const Element*>(p.k) + seq_start * p.k_row + hk * p.k_head;
  const Element* vp = static_cast<const Element*>(p.v) + seq_start * p.v_row + hk * p.v_head;
  Tensor gK = local_tile(make_tensor(make_gmem_ptr(kp), make_shape(seqlen, Int<kD>{}), make_stride(p.k_row, _1{})),
                         Shape<Int<kBN>, Int<kD>>{}, make_coord(n_block, 0));
  Tensor gV = local_tile(make_tensor(make_gmem_ptr(vp), make_shape(seqlen, Int<kD>{}), make_stride(p.v_row, _1{})),
                         Shape<Int<kBN>, Int<kD>>{}, make_coord(n_block, 0));

  typename Tr::GmemTiledCopy gcopy;
  auto gthr = gcopy.get_thread_slice(tid);
  Tensor tKsK = gthr.partition_D(sK);
  Tensor tVsV = gthr.partition_D(sV);
  Tensor tQsQ = gthr.partition_D(sQ);
  Tensor tdOsdO = gthr.partition_D(sdO);
  Tensor tQc = gthr.partition_S(make_identity_tensor(Shape<Int<kBM>, Int<kD>>{}));
  Tensor tKVc = gthr.partition_S(make_identity_tensor(Shape<Int<kBN>, Int<kD>>{}));

  copy_rows(gcopy, gthr.partition_S(gK), tKsK, tKVc, n_rows);
  copy_rows(gcopy, gthr.partition_S(gV), tVsV, tKVc, n_rows);
  cp_async_fence();

  // S = Q K^T and dP = dO V^T
  typename Tr::MmaSdP mma_sdp;
  auto thr_sdp = mma_sdp.get_thread_slice(tid);
  Tensor tSrQ = thr_sdp.partition_fragment_A(sQ);
  Tensor tSrK = thr_sdp.partition_fragment_B(sK);
  Tensor tdPrdO = thr_sdp.partition_fragment_A(sdO);
  Tensor tdPrV = thr_sdp.partition_fragment_B(sV);
  auto cpA_sdp = make_tiled_copy_A(typename Tr::SmemCopyAtom{}, mma_sdp);
  auto cpB_sdp = make_tiled_copy_B(typename Tr::SmemCopyAtom{}, mma_sdp);
  Tensor tSsQ = cpA_sdp.get_thread_slice(tid).partition_S(sQ);
  Tensor tdPsdO = cpA_sdp.get_thread_slice(tid).partition_S(sdO);
  Tensor tSsK = cpB_sdp.get_thread_slice(tid).partition_S(sK);
  Tensor tdPsV = cpB_sdp.get_thread_slice(tid).partition_S(sV);
  Tensor tScS = thr_sdp.partition_C(make_identity_tensor(Shape<Int<kBM>, Int<kBN>>{}));
  Tensor tPsP = thr_sdp.partition_C(sP);
  Tensor tPsdS = thr_sdp.partition_C(sdS);

  // dV += P^T dO, dK += dS^T Q  (kBN x d)
  typename Tr::MmadKV mma_dkv;
  auto thr_dkv = mma_dkv.get_thread_slice(tid);
  Tensor tdVrPt = thr_dkv.partition_fragment_A(sPt);
  Tensor tdVrdOt = thr_dkv.partition_fragment_B(sdOt);
  Tensor tdKrdSt = thr_dkv.partition_fragment_A(sdSt);
  Tensor tdKrQt = thr_dkv.partition_fragment_B(sQt);
  auto cpA_dkv = make_tiled_copy_A(typename Tr::SmemCopyAtomT{}, mma_dkv);
  auto cpB_dkv = make_tiled_copy_B(typename Tr::SmemCopyAtomT{}, mma_dkv);
  Tensor tdVsPt = cpA_dkv.get_thread_slice(tid).partition_S(sPt);
  Tensor tdKsdSt = cpA_dkv.get_thread_slice(tid).partition_S(sdSt);
  Tensor tdVsdOt = cpB_dkv.get_thread_slice(tid).partition_S(sdOt);
  Tensor tdKsQt = cpB_dkv.get_thread_slice(tid).partition_S(sQt);
  Tensor acc_dk = partition_fragment_C(mma_dkv, Shape<Int<kBN>, Int<kD>>{});
  Tensor acc_dv = partition_fragment_C(mma_dkv, Shape<Int<kBN>, Int<kD>>{});
  clear(acc_dk);
  clear(acc_dv);

  // dQ = dS K  (kBM x d)
  typename Tr::MmadQ mma_dq;
  auto thr_dq = mma_dq.get_thread_slice(tid);
  Tensor tdQrdS = thr_dq.partition_fragment_A(sdS);
  Tensor tdQrKt = thr_dq.partition_fragment_B(sKt);
  auto cpA_dq = make_tiled_copy_A(typename Tr::SmemCopyAtom{}, mma_dq);
  auto cpB_dq = make_tiled_copy_B(typename Tr::SmemCopyAtomT{}, mma_dq);
  Tensor tdQsdS = cpA_dq.get_thread_slice(tid).partition_S(sdS);
  Tensor tdQsKt = cpB_dq.get_thread_slice(tid).partition_S(sKt);
  Tensor tdQc = thr_dq.partition_C(make_identity_tensor(Shape<Int<kBM>, Int<kD>>{}));

  const float sl2 = p.scale * 1.4426950408889634f;
  const int64_t dq_row = int64_t(p.q_heads) * kD;  // dq_accum is contiguous (total, q_heads, d)

  for (int g = 0; g < group; ++g) {
    const int h = hk * group + g;
    const Element* qp = static_cast<const Element*>(p.q) + seq_start * p.q_row + h * p.q_head;
    const Element* dop = static_cast<const Element*>(p.dout) + seq_start * p.do_row + h * p.do_head;
    Tensor mQ = make_tensor(make_gmem_ptr(qp), make_shape(seqlen, Int<kD>{}), make_stride(p.q_row, _1{}));
    Tensor mdO = make_tensor(make_gmem_ptr(dop), make_shape(seqlen, Int<kD>{}), make_stride(p.do_row, _1{}));
    const float* lse_h = p.lse + int64_t(h) * p.total + seq_start;
    const float* delta_h = p.delta + int64_t(h) * p.total + seq_start;
    float* dq_h = p.dq_accum + seq_start * dq_row + int64_t(h) * kD;

    for (int m_block = m_block_min; m_block < m_block_max; ++m_block) {
      const int m_rows = seqlen - m_block * kBM;
      Tensor gQ = local_tile(mQ, Shape<Int<kBM>, Int<kD>>{}, make_coord(m_block, 0));
      Tensor gdO = local_tile(mdO, Shape<Int<kBM>, Int<kD>>{}, make_coord(m_block, 0));
      copy_rows(gcopy, gthr.partition_S(gQ), tQsQ, tQc, m_rows);
      copy_rows(gcopy, gthr.partition_S(gdO), tdOsdO, tQc, m_rows);
      cp_async_fence();
      for (int i = tid; i < kBM; i += Tr::kNThreads) {
        const bool ok = i < m_rows;  // padded rows: P = exp(-inf) = 0, dS = 0
        sLse[i] = ok ? lse_h[int64_t(m_block) * kBM + i] * 1.4426950408889634f : INFINITY;
        sDelta[i] = ok ? delta_h[int64_t(m_block) * kBM + i] : 0.f;
      }
      cp_async_wait<0>();
      __syncthreads();

      Tensor acc_s = partition_fragment_C(mma_sdp, Shape<Int<kBM>, Int<kBN>>{});
      Tensor acc_dp = partition_fragment_C(mma_sdp, Shape<Int<kBM>, Int<kBN>>{});
      clear(acc_s);
      clear(acc_dp);
      gemm_ss(acc_s, tSrQ, tSrK, tSsQ, tSsK, mma_sdp, cpA_sdp, cpB_sdp);
      gemm_ss(acc_dp, tdPrdO, tdPrV, tdPsdO, tdPsV, mma_sdp, cpA_sdp, cpB_sdp);

      // P = exp(scale * S - lse) (0 where masked); dS = P * (dP - delta)
      CUTE_UNROLL
      for (int i = 0; i < size(acc_s); ++i) {
        const int row = get<0>(tScS(i)), col = get<1>(tScS(i));
        const int col_g = n_block * kBN + col;
        const bool masked = col_g >= seqlen || (kCausal && col_g > m_block * kBM + row);
        const float pv = masked ? 0.f : fast_exp2(fmaf(acc_s(i), sl2, -sLse[row]));
        acc_s(i) = pv;
        acc_dp(i) = pv * (acc_dp(i) - sDelta[row]);
      }
      Tensor rP = convert_frag<Element>(acc_s);
      Tensor rdS = convert_frag<Element>(acc_dp);
      copy(rP, tPsP);
      copy(rdS, tPsdS);
      __syncthreads();

      gemm_ss(acc_dv, tdVrPt, tdVrdOt, tdVsPt, tdVsdOt, mma_dkv, cpA_dkv, cpB_dkv);
      gemm_ss(acc_dk, tdKrdSt, tdKrQt, tdKsdSt, tdKsQt, mma_dkv, cpA_dkv, cpB_dkv);

      Tensor acc_dq = partition_fragment_C(mma_dq, Shape<Int<kBM>, Int<kD>>{});
      clear(acc_dq);
      gemm_ss(acc_dq, tdQrdS, tdQrKt, tdQsdS, tdQsKt, mma_dq, cpA_dq, cpB_dq);
      CUTE_UNROLL
      for (int i = 0; i < size(acc_dq); ++i) {
        const int row = get<0>(tdQc(i)), col = get<1>(tdQc(i));
        if (row < m_rows) atomicAdd(dq_h + (int64_t(m_block) * kBM + row) * dq_row + col, acc_dq(i));
      }
      __syncthreads();  // sQ, sdO, sP, sdS are overwritten next iteration
    }
  }

  // epilogue: dK (scaled), dV -> smem (reusing sK, sV) -> gmem rows < n_rows
  CUTE_UNROLL
  for (int i = 0; i < size(acc_dk); ++i) acc_dk(i) *= p.scale;
  Tensor rdK = convert_frag<Element>(acc_dk);
  Tensor rdV = convert_frag<Element>(acc_dv);
  __syncthreads();
  Tensor sdK = make_tensor(sK.data(), typename Tr::SmemLayoutKV{});
  Tensor sdV = make_tensor(sV.data(), typename Tr::SmemLayoutKV{});
  Tensor tdKsdK = thr_dkv.partition_C(sdK);
  Tensor tdVsdV = thr_dkv.partition_C(sdV);
  copy(rdK, tdKsdK);
  copy(rdV, tdVsdV);
  __syncthreads();
  Element* dkp = static_cast<Element*>(p.dk) + seq_start * p.dk_row + hk * p.dk_head;
  Element* dvp = static_cast<Element*>(p.dv) + seq_start * p.dv_row + hk * p.dv_head;
  Tensor gdK = local_tile(make_tensor(make_gmem_ptr(dkp), make_shape(seqlen, Int<kD>{}), make_stride(p.dk_row, _1{})),
                          Shape<Int<kBN>, Int<kD>>{}, make_coord(n_block, 0));
  Tensor gdV = local_tile(make_tensor(make_gmem_ptr(dvp), make_shape(seqlen, Int<kD>{}), make_stride(p.dv_row, _1{})),
                          Shape<Int<kBN>, Int<kD>>{}, make_coord(n_block, 0));
  typename Tr::GmemTiledCopyO ocopy;
  auto othr = ocopy.get_thread_slice(tid);
  Tensor tdKs = othr.partition_S(sdK);
  Tensor tdKg = othr.partition_D(gdK);
  Tensor tdVs = othr.partition_S(sdV);
  Tensor tdVg = othr.partition_D(gdV);
  store_rows(ocopy, tdKs, tdKg, tKVc, n_rows);
  store_rows(ocopy, tdVs, tdVg, tKVc, n_rows);
}

template <bool kBF16, int kD>
int attn_bwd_smem_bytes() { return BwdTraits<kD, kBF16>::kSmemBytes; }

template <bool kBF16, int kD>
cudaError_t run_attn_bwd(const BwdParams& p, cudaStream_t st) {
  using Tr = BwdTraits<kD, kBF16>;
  if (p.total == 0 || p.max_seqlen == 0 || p.num_seqs == 0) return cudaSuccess;
  dim3 grid((p.max_seqlen + Tr::kBlockN - 1) / Tr::kBlockN, p.kv_heads, p.num_seqs);
  constexpr int smem = Tr::kSmemBytes;
  auto go = [&](auto kernel) -> cudaError_t {
    if (smem > 48 * 1024) {
      cudaError_t e = cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, smem);
      if (e != cudaSuccess) return e;
    }
    kernel<<<grid, Tr::kNThreads, smem, st>>>(p);
    return cudaGetLastError();
  };
  return p.causal ? go(attn_bwd_kernel<Tr, true>) : go(attn_bwd_kernel<Tr, false>);
}

}  // namespace prope
