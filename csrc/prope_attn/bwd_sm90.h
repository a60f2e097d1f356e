// Backward for sm_90 (Hopper). Two designs (BwdParams::sm90_split picks one):
//
// FUSED (default): 5 GEMMs per (q block, key block), FlashAttention-3's recipe.
//   bwd_preprocess_sm90_kernel, per (q block of 64 rows, q head, sequence) "tile" (bwd_tile()):
//     delta = rowsum(dO * O) - dlse and lse * log2(e) into tiled arrays (0 / +inf past the
//     sequence), the tile's fp32 dQ accumulator zeroed (no memset of the whole buffer);
//   attn_bwd_fused_sm90_kernel, one CTA per (kv head, sequence, key block), key blocks slowest
//     in the grid (longest first under a causal mask): dK, dV stationary in registers while it
//     streams the q blocks of every q head of its GQA group;
//     warpgroup 0 (producer, 24 registers): one thread loads K, V once (TMA), then per step
//       Q, dO (TMA) and the step's 64 lse / delta values (bulk copies) into a 2-stage ring;
//     warpgroups 1, 2 (consumers, 240 registers), per step:
//       S = Q K^T and dP = dO V^T issued back to back; P = exp2(S*scale*log2e - lse2) while dP
//       still runs; dS = P (dP - delta); the mask only on edge and diagonal blocks;
//       P, dS -> smem (16 bits); dQ = dS K issued first, then dV += P^T dO, dK += dS^T Q; once
//       dQ is done (wgmma wait<2>) its fp32 values go out as float4 atomics straight from the
//       registers, in MMA-fragment order (a warp instruction = 512 contiguous bytes) into the
//       tile's accumulator, while dV and dK still run on the tensor cores;
//     epilogue: dK scaled and, with p-RoPE, rotated back in shared memory, then dK, dV stored;
//   bwd_postprocess_sm90_kernel, per tile: the accumulator un-permuted through shared memory,
//     times the softmax scale, rotated back, converted: dq.
// SPLIT (deterministic mode): no atomics, 7 GEMMs per tile pair.
//   attn_bwd_sm90_kernel (dK, dV): the loop above without the dQ GEMM; lse, delta from the
//     (q_heads, total) arrays api.cu's delta pass writes; S, dP as one batch, dV, dK as one;
//   attn_bwd_dq_sm90_kernel (dQ), q-stationary like the forward: one CTA per (q block of 128
//     rows, q head, sequence) recomputes S and dP per key block and sums dQ += dS K (RS wgmma,
//     dS re-viewed as the A operand) in registers; each fp32 dQ row is stored once, so the sum
//     order is fixed; api.cu's rotation passes scale, rotate back and convert dQ and dK.
// Inputs q and k are the short-lived ROTATED buffers (api.cu); dK is computed w.r.t. the
// rotated k. Rows of a tile past the end of the sequence (the next sequence's, or whatever lies
// past cu_seqlens[-1]) are zeroed in shared memory before any GEMM multiplies them.
#pragma once

#include <cute/arch/copy_sm90_tma.hpp>

#include "fwd_sm90.h"

namespace prope {

// kSplitBwd: the tiles of the split backward's dK/dV kernel; else the fused kernel's.
// head_dim 128 split: 64 keys per CTA with d split over the warpgroups (as at 256), since at 128
// keys the kernel without the dQ GEMM spilled (ptxas, nvcc 13.0) at the 240-register limit.
template <int kHeadDim_, bool kBF16, bool kSplitBwd = false>
struct BwdSm90Traits {
  using Element = std::conditional_t<kBF16, cutlass::bfloat16_t, cutlass::half_t>;
  static constexpr int kHeadDim = kHeadDim_;
  static constexpr int kBlockM = 64;                           // q rows per step
  static_assert(kBlockM == kBwdTileM, "a step is one tile of the fused backward's buffers");
  // keys per CTA (stationary)
  static constexpr int kBlockN = (kHeadDim == 256 || (kSplitBwd && kHeadDim == 128)) ? 64 : 128;
  static constexpr int kStages = 2;
  static constexpr int kConsumerWGs = 2;
  static constexpr int kNThreads = 128 * (1 + kConsumerWGs);
  static constexpr int kConsumerThreads = 128 * kConsumerWGs;
  static constexpr int kProducerRegs = 24, kConsumerRegs = 240;
  static_assert(kHeadDim % 64 == 0 && kHeadDim <= 256);

  using _1 = cute::_1;
  using _2 = cute::_2;
  // S, dP (kBlockM x kBlockN): the key columns split over the 2 warpgroups.
  using MmaSdP = decltype(cute::make_tiled_mma(
      cute::GMMA::ss_op_selector<Element, Element, float,
                                 cute::Shape<cute::Int<kBlockM>, cute::Int<kBlockN / 2>, cute::Int<kHeadDim>>>(),
      cute::Layout<cute::Shape<_1, _2, _1>>{}));
  // dK, dV (kBlockN x d), contraction over the q rows: A = P^T / dS^T and B = dO^T / Q^T, both
  // read MN-major from smem. d <= 128: key rows split over the warpgroups; d = 256: d split.
  static constexpr bool kSplitD = kBlockN == 64;
  using AtomKV = std::conditional_t<kSplitD, cute::Layout<cute::Shape<_1, _2, _1>>, cute::Layout<cute::Shape<_2, _1, _1>>>;
  using MmadKV = decltype(cute::make_tiled_mma(
      cute::GMMA::ss_op_selector<Element, Element, float,
                                 cute::Shape<cute::Int<64>, cute::Int<kSplitD ? kHeadDim / 2 : kHeadDim>, cute::Int<kBlockM>>,
                                 cute::GMMA::Major::MN, cute::GMMA::Major::MN>(),
      AtomKV{}));
  // dQ (kBlockM x d), contraction over the keys: A = dS (K-major), B = K^T (MN-major), issued
  // in kDqSlices column slices of d (d = 256: 2, so that dQ holds 32 fp32 registers per thread
  // next to dK and dV, and each slice's atomics overlap the dV or dK GEMM); each slice's d split
  // over the 2 warpgroups. A slice accumulator's thread/register order is the fused backward's
  // dQ accumulator layout (bwd_postprocess_sm90_kernel reads it back through the same MMA).
  static constexpr int kDqSlices = kHeadDim == 256 ? 2 : 1;
  static constexpr int kDqCols = kHeadDim / kDqSlices;  // d columns per slice
  using MmadQ = decltype(cute::make_tiled_mma(
      cute::GMMA::ss_op_selector<Element, Element, float,
                                 cute::Shape<cute::Int<kBlockM>, cute::Int<kDqCols / 2>, cute::Int<kBlockN>>,
                                 cute::GMMA::Major::K, cute::GMMA::Major::MN>(),
      cute::Layout<cute::Shape<_1, _2, _1>>{}));
  static constexpr int kDqPerThread = kBlockM * kDqCols / kConsumerThreads;  // fp32 values a slice

  using SmemAtom = cute::GMMA::Layout_K_SW128_Atom<Element>;
  using SmemLayoutQ = decltype(cute::tile_to_shape(
      SmemAtom{}, cute::Shape<cute::Int<kBlockM>, cute::Int<kHeadDim>, cute::Int<kStages>>{}));
  using SmemLayoutQStage = decltype(cute::tile_to_shape(SmemAtom{}, cute::Shape<cute::Int<kBlockM>, cute::Int<kHeadDim>>{}));
  // Q^T / dO^T (d, kBlockM, stages): the same bytes, MN-major B of dK / dV.
  using SmemLayoutQt = decltype(cute::composition(
      SmemLayoutQ{}, cute::make_ordered_layout(
                         cute::Shape<cute::Int<kHeadDim>, cute::Int<kBlockM>, cute::Int<kStages>>{},
                         cute::Step<cute::_2, cute::_1, cute::_3>{})));
  using SmemLayoutK = decltype(cute::tile_to_shape(SmemAtom{}, cute::Shape<cute::Int<kBlockN>, cute::Int<kHeadDim>>{}));
  // K^T of one dQ slice (kDqCols, kBlockN): MN-major B of dQ. The K tile is laid out atom
  // column after atom column (64 d columns each), so slice s is the same layout at element
  // offset s * kBlockN * kDqCols of the K tile (test_layouts checks it).
  using SmemLayoutKSlice = decltype(cute::tile_to_shape(SmemAtom{}, cute::Shape<cute::Int<kBlockN>, cute::Int<kDqCols>>{}));
  using SmemLayoutKtSlice = decltype(cute::composition(
      SmemLayoutKSlice{}, cute::make_ordered_layout(cute::Shape<cute::Int<kDqCols>, cute::Int<kBlockN>>{},
                                                    cute::Step<cute::_2, cute::_1>{})));
  using SmemLayoutP = decltype(cute::tile_to_shape(SmemAtom{}, cute::Shape<cute::Int<kBlockM>, cute::Int<kBlockN>>{}));
  // P^T / dS^T (kBlockN, kBlockM): MN-major A of dV / dK.
  using SmemLayoutPt = decltype(cute::composition(
      SmemLayoutP{}, cute::make_ordered_layout(cute::Shape<cute::Int<kBlockN>, cute::Int<kBlockM>>{},
                                               cute::Step<cute::_2, cute::_1>{})));

  using PipelineQdO = cutlass::PipelineTmaAsync<kStages>;

  struct SharedStorage {
    cute::array_aligned<Element, cute::cosize_v<SmemLayoutQ>, 1024> q;
    cute::array_aligned<Element, cute::cosize_v<SmemLayoutQ>, 1024> dout;
    cute::array_aligned<Element, cute::cosize_v<SmemLayoutK>, 1024> k;
    cute::array_aligned<Element, cute::cosize_v<SmemLayoutK>, 1024> v;
    cute::array_aligned<Element, cute::cosize_v<SmemLayoutP>, 1024> p;
    cute::array_aligned<Element, cute::cosize_v<SmemLayoutP>, 1024> ds;
    // the fused kernel's per-step lse * log2(e) and delta, staged with Q and dO (bulk copies)
    cute::array_aligned<float, kBlockM * kStages, 128> lse2;
    cute::array_aligned<float, kBlockM * kStages, 128> delta;
    cutlass::arch::ClusterTransactionBarrier barrier_kv;
    typename PipelineQdO::SharedStorage pipe;
  };
  static constexpr int kSmemBytes = int(sizeof(SharedStorage));
  static constexpr uint32_t kKVBytes = 2u * kBlockN * kHeadDim * sizeof(Element);
  static constexpr uint32_t kQdOBytes = 2u * kBlockM * kHeadDim * sizeof(Element);
  static constexpr uint32_t kRowBytes = kBlockM * sizeof(float);  // one bulk copy of lse2 / delta

  // epilogue: dK, dV staged in smem (over K, V), 16-byte stores, 8 threads per 64 columns
  using GmemThr = cute::Layout<cute::Shape<cute::Int<kConsumerThreads / 8>, cute::_8>, cute::Stride<cute::_8, cute::_1>>;
  using GmemTiledCopyO = decltype(cute::make_tiled_copy(
      cute::Copy_Atom<cute::UniversalCopy<cute::uint128_t>, Element>{}, GmemThr{},
      cute::Layout<cute::Shape<cute::_1, cute::_8>>{}));

  static auto gmem(const void* ptr, int total, int heads, int64_t row, int64_t head) {
    using namespace cute;
    return make_tensor(make_gmem_ptr(static_cast<const Element*>(ptr)),
                       make_shape(total, int(kHeadDim), heads), make_stride(row, _1{}, head));
  }
  static auto make_tma_q(const void* ptr, int total, int heads, int64_t row, int64_t head) {
    using namespace cute;
    return make_tma_copy(SM90_TMA_LOAD{}, gmem(ptr, total, heads, row, head), SmemLayoutQStage{},
                         Shape<Int<kBlockM>, Int<kHeadDim>>{}, _1{});
  }
  static auto make_tma_k(const void* ptr, int total, int heads, int64_t row, int64_t head) {
    using namespace cute;
    return make_tma_copy(SM90_TMA_LOAD{}, gmem(ptr, total, heads, row, head), SmemLayoutK{},
                         Shape<Int<kBlockN>, Int<kHeadDim>>{}, _1{});
  }
  using TmaQ = decltype(make_tma_q(nullptr, 0, 0, 0, 0));
  using TmaK = decltype(make_tma_k(nullptr, 0, 0, 0, 0));
};

// c1 (+)= a1 * b1 and c2 (+)= a2 * b2 (both SS; kZeroInit: = instead of +=) as one
// warpgroup-wide wgmma batch, waited for here: the second GEMM is issued before the first one's
// result is waited for (one pipeline drain instead of two).
template <bool kZeroInit, class Mma, class TA1, class TB1, class TC1, class TA2, class TB2, class TC2>
__device__ __forceinline__ void wg_gemm2_ss(Mma& mma, const TA1& a1, const TB1& b1, TC1& c1,
                                            const TA2& a2, const TB2& b2, TC2& c2) {
  using namespace cute;
  warpgroup_fence_operand(c1);
  warpgroup_fence_operand(c2);
  warpgroup_arrive();
  if constexpr (kZeroInit) mma.accumulate_ = GMMA::ScaleOut::Zero;
  CUTE_UNROLL
  for (int k = 0; k < size<2>(a1); ++k) {
    gemm(mma, a1(_, _, k), b1(_, _, k), c1);
    mma.accumulate_ = GMMA::ScaleOut::One;
  }
  if constexpr (kZeroInit) mma.accumulate_ = GMMA::ScaleOut::Zero;
  CUTE_UNROLL
  for (int k = 0; k < size<2>(a2); ++k) {
    gemm(mma, a2(_, _, k), b2(_, _, k), c2);
    mma.accumulate_ = GMMA::ScaleOut::One;
  }
  warpgroup_commit_batch();
  warpgroup_wait<0>();
  warpgroup_fence_operand(c1);
  warpgroup_fence_operand(c2);
}

template <class Tr>
struct BwdSm90Args {
  typename Tr::TmaQ tma_q, tma_do;
  typename Tr::TmaK tma_k, tma_v;
  BwdParams p;
};

// The dK/dV-stationary loop of both designs. kFused: also dQ (atomics), lse/delta from the
// tiled arrays, dK rotated back in the epilogue (kRotate), softcap (kSoftcap). Split: kRotate
// and kSoftcap are false. The sliding window (BwdParams::window_*) is runtime in both: only the
// q blocks that see a key of this block are loaded, and only tiles it cuts are masked.
template <class Tr, bool kCausal, bool kFused, bool kRotate, bool kSoftcap = false>
__device__ __forceinline__ void bwd_sm90_dkdv(const BwdSm90Args<Tr>& args, const int n_block,
                                              const int hk, const int b) {
  using namespace cute;
  using Element = typename Tr::Element;
  using Pipeline = typename Tr::PipelineQdO;
  constexpr int kBM = Tr::kBlockM, kBN = Tr::kBlockN, kD = Tr::kHeadDim;
  static_assert(kFused || (!kRotate && !kSoftcap), "the split backward: no rotation, no softcap");
  const BwdParams& p = args.p;

  const int seq_start = p.cu_seqlens[b];
  const int seqlen = p.cu_seqlens[b + 1] - seq_start;
  if (n_block * kBN >= seqlen) return;  // uniform over the CTA, before any barrier
  const int group = p.q_heads / p.kv_heads;
  const int n_rows = seqlen - n_block * kBN;
  // q blocks [m_block_min, m_block_max) that see a key of this block (causal: none below its
  // first key; window: none past its last key + wl)
  const WindowBounds win = window_bounds(p.window_left, p.window_right, kCausal, seqlen);
  int m_block_min, m_block_max;
  query_block_range(n_block * kBN, kBN, kBM, seqlen, win, m_block_min, m_block_max);
  const int m_steps = m_block_max - m_block_min;
  const int steps = group * m_steps;  // (q head of the group, q block), q block fastest

  extern __shared__ __align__(1024) char smem_raw[];
  auto& ss = *reinterpret_cast<typename Tr::SharedStorage*>(smem_raw);
  Tensor sQ = make_tensor(make_smem_ptr(ss.q.data()), typename Tr::SmemLayoutQ{});
  Tensor sdO = make_tensor(make_smem_ptr(ss.dout.data()), typename Tr::SmemLayoutQ{});
  Tensor sQt = make_tensor(make_smem_ptr(ss.q.data()), typename Tr::SmemLayoutQt{});
  Tensor sdOt = make_tensor(make_smem_ptr(ss.dout.data()), typename Tr::SmemLayoutQt{});
  Tensor sK = make_tensor(make_smem_ptr(ss.k.data()), typename Tr::SmemLayoutK{});
  Tensor sV = make_tensor(make_smem_ptr(ss.v.data()), typename Tr::SmemLayoutK{});
  Tensor sP = make_tensor(make_smem_ptr(ss.p.data()), typename Tr::SmemLayoutP{});
  Tensor sdS = make_tensor(make_smem_ptr(ss.ds.data()), typename Tr::SmemLayoutP{});
  Tensor sPt = make_tensor(make_smem_ptr(ss.p.data()), typename Tr::SmemLayoutPt{});
  Tensor sdSt = make_tensor(make_smem_ptr(ss.ds.data()), typename Tr::SmemLayoutPt{});

  const int warp_group = threadIdx.x / 128;
  typename Pipeline::Params pp;
  pp.transaction_bytes = Tr::kQdOBytes + (kFused ? 2 * Tr::kRowBytes : 0u);
  pp.role = warp_group == 0 ? Pipeline::ThreadCategory::Producer : Pipeline::ThreadCategory::Consumer;
  pp.is_leader = threadIdx.x == 0;
  pp.num_consumers = Tr::kConsumerThreads;
  if (threadIdx.x == 0) ss.barrier_kv.init(1);
  Pipeline pipe(ss.pipe, pp, Shape<_1, _1, _1>{});
  __syncthreads();  // barriers initialised (and fenced) before anyone uses them

  if (warp_group == 0) {
    // ---------------- producer ----------------
    cutlass::arch::warpgroup_reg_dealloc<Tr::kProducerRegs>();
    if (threadIdx.x == 0) {
      Tensor mK = args.tma_k.get_tma_tensor(make_shape(int(p.total), kD, p.kv_heads));
      Tensor mV = args.tma_v.get_tma_tensor(make_shape(int(p.total), kD, p.kv_heads));
      Tensor mQ = args.tma_q.get_tma_tensor(make_shape(int(p.total), kD, p.q_heads));
      Tensor mdO = args.tma_do.get_tma_tensor(make_shape(int(p.total), kD, p.q_heads));
      Tensor gK = local_tile(domain_offset(make_coord(seq_start, _0{}), mK(_, _, hk)),
                             Shape<Int<kBN>, Int<kD>>{}, make_coord(n_block, _0{}));
      Tensor gV = local_tile(domain_offset(make_coord(seq_start, _0{}), mV(_, _, hk)),
                             Shape<Int<kBN>, Int<kD>>{}, make_coord(n_block, _0{}));
      auto [tKg, tKs] = tma_partition(args.tma_k, _0{}, Layout<_1>{}, group_modes<0, 2>(sK), group_modes<0, 2>(gK));
      auto [tVg, tVs] = tma_partition(args.tma_v, _0{}, Layout<_1>{}, group_modes<0, 2>(sV), group_modes<0, 2>(gV));
      ss.barrier_kv.arrive_and_expect_tx(Tr::kKVBytes);
      copy(args.tma_k.with(reinterpret_cast<uint64_t&>(ss.barrier_kv), 0), tKg, tKs);
      copy(args.tma_v.with(reinterpret_cast<uint64_t&>(ss.barrier_kv), 0), tVg, tVs);

      auto wr = cutlass::make_producer_start_state<Pipeline>();
      for (int step = 0; step < steps; ++step) {
        const int h = hk * group + step / m_steps;
        const int m_block = m_block_min + step % m_steps;
        Tensor gQ = local_tile(domain_offset(make_coord(seq_start, _0{}), mQ(_, _, h)),
                               Shape<Int<kBM>, Int<kD>>{}, make_coord(m_block, _0{}));
        Tensor gdO = local_tile(domain_offset(make_coord(seq_start, _0{}), mdO(_, _, h)),
                                Shape<Int<kBM>, Int<kD>>{}, make_coord(m_block, _0{}));
        auto [tQg, tQs] = tma_partition(args.tma_q, _0{}, Layout<_1>{}, group_modes<0, 2>(sQ), group_modes<0, 2>(gQ));
        auto [tdOg, tdOs] = tma_partition(args.tma_do, _0{}, Layout<_1>{}, group_modes<0, 2>(sdO), group_modes<0, 2>(gdO));
        pipe.producer_acquire(wr);
        copy(args.tma_q.with(*pipe.producer_get_barrier(wr), 0), tQg, tQs(_, wr.index()));
        copy(args.tma_do.with(*pipe.producer_get_barrier(wr), 0), tdOg, tdOs(_, wr.index()));
        if constexpr (kFused) {  // the step's 64 lse2 / delta values: 256 contiguous bytes each
          const int64_t t = (bwd_tile(seq_start, b, m_block) * p.q_heads + h) * kBM;
          uint64_t* bar = reinterpret_cast<uint64_t*>(pipe.producer_get_barrier(wr));
          SM90_BULK_COPY_G2S::copy(p.lse2_tiled + t, bar, ss.lse2.data() + wr.index() * kBM, Tr::kRowBytes);
          SM90_BULK_COPY_G2S::copy(p.delta_tiled + t, bar, ss.delta.data() + wr.index() * kBM, Tr::kRowBytes);
        }
        ++wr;
      }
    }
  } else {
    // ---------------- consumers ----------------
    cutlass::arch::warpgroup_reg_alloc<Tr::kConsumerRegs>();
    const int ctid = threadIdx.x - 128;
    const int wg = warp_group - 1, wg_tid = ctid % 128;
    typename Tr::MmaSdP mma_sdp;
    typename Tr::MmadKV mma_dkv;
    typename Tr::MmadQ mma_dq;
    auto thr_sdp = mma_sdp.get_thread_slice(ctid);
    auto thr_dkv = mma_dkv.get_thread_slice(ctid);
    auto thr_dq = mma_dq.get_thread_slice(ctid);

    Tensor tSrQ = thr_sdp.partition_fragment_A(sQ);     // (MMA, MMA_M, MMA_K, stages)
    Tensor tSrK = thr_sdp.partition_fragment_B(sK);     // (MMA, MMA_N, MMA_K)
    Tensor tdPrdO = thr_sdp.partition_fragment_A(sdO);
    Tensor tdPrV = thr_sdp.partition_fragment_B(sV);
    Tensor tdVrPt = thr_dkv.partition_fragment_A(sPt);  // (MMA, MMA_N(keys), MMA_K(q rows))
    Tensor tdVrdOt = thr_dkv.partition_fragment_B(sdOt);  // (MMA, MMA_D, MMA_K, stages)
    Tensor tdKrdSt = thr_dkv.partition_fragment_A(sdSt);
    Tensor tdKrQt = thr_dkv.partition_fragment_B(sQt);
    Tensor tdQrdS = thr_dq.partition_fragment_A(sdS);   // (MMA, MMA_M, MMA_K(keys))
    constexpr int kSl = Tr::kDqSlices, kSlElems = kBN * Tr::kDqCols;
    Tensor tdQrKt0 = thr_dq.partition_fragment_B(   // K^T of dQ slice 0 / 1: (MMA, MMA_D, MMA_K)
        make_tensor(make_smem_ptr(ss.k.data()), typename Tr::SmemLayoutKtSlice{}));
    Tensor tdQrKt1 = thr_dq.partition_fragment_B(
        make_tensor(make_smem_ptr(ss.k.data() + (kSl - 1) * kSlElems), typename Tr::SmemLayoutKtSlice{}));

    Tensor acc_dk = partition_fragment_C(mma_dkv, Shape<Int<kBN>, Int<kD>>{});
    Tensor acc_dv = partition_fragment_C(mma_dkv, Shape<Int<kBN>, Int<kD>>{});
    clear(acc_dk);
    clear(acc_dv);
    // (row, col) of each S / dP accumulator element
    Tensor tScS = thr_sdp.partition_C(make_identity_tensor(Shape<Int<kBM>, Int<kBN>>{}));
    Tensor tScS_rc = make_tensor(tScS.data(), acc_rowcol_sm90(tScS.layout()));
    Tensor tPsP = thr_sdp.partition_C(sP);
    Tensor tdSsdS = thr_sdp.partition_C(sdS);

    constexpr float kLog2e = 1.4426950408889634f;
    const float sl2 = p.scale * kLog2e;
    ss.barrier_kv.wait(0);
    if (kFused && n_rows < kBN) {  // key rows past the sequence: dQ = dS K multiplies them
      zero_rows_from<kBN, kD>(ss.k.data(), n_rows, wg_tid);
      zero_rows_from<kBN, kD>(ss.v.data(), n_rows, wg_tid);
      zero_rows_done(wg);
    }
    cutlass::PipelineState<Tr::kStages> rd;
    for (int step = 0; step < steps; ++step) {
      const int h = hk * group + step / m_steps;
      const int m_block = m_block_min + step % m_steps;
      const int m_rows = seqlen - m_block * kBM;  // valid q rows of this block (may exceed kBM)
      const int st = rd.index();
      pipe.consumer_wait(rd);
      if (m_rows < kBM) {  // the sequence's last q block: dV += P^T dO and dK += dS^T Q multiply
        zero_rows_from<kBM, kD>(ss.q.data() + st * kBM * kD, m_rows, wg_tid);  // its rows past
        zero_rows_from<kBM, kD>(ss.dout.data() + st * kBM * kD, m_rows, wg_tid);  // the sequence
        zero_rows_done(wg);
      }

      Tensor acc_s = partition_fragment_C(mma_sdp, Shape<Int<kBM>, Int<kBN>>{});
      Tensor acc_dp = partition_fragment_C(mma_sdp, Shape<Int<kBM>, Int<kBN>>{});
      if constexpr (kFused) {
        wg_gemm_issue<true>(mma_sdp, tSrQ(_, _, _, st), tSrK, acc_s);      // S = Q K^T
        wg_gemm_issue<true>(mma_sdp, tdPrdO(_, _, _, st), tdPrV, acc_dp);  // dP = dO V^T
        // P = exp2(S * scale * log2e - lse2) while dP runs, stored to smem at once (registers:
        // fp32 P stays for dS, its 16-bit copy does not); lse2 and delta of this thread's rows
        // come from the step's stage. Rows past the sequence have lse2 = +inf (P = 0); keys
        // past it and keys outside the window (causal: the upper triangle) are masked here.
        // Softcap: t = tanh(S * scale / softcap), P = exp2(t * softcap * log2(e) - lse2) goes to
        // 16 bits for smem, and acc_s keeps P (1 - t^2) (tanh's exact derivative; the scale is
        // applied to dQ and dK later, as without softcap), so that dS = that (dP - delta) is the
        // same loop as without.
        Tensor s_rc = make_tensor(acc_s.data(), acc_rowcol_sm90(acc_s.layout()));
        Tensor dp_rc = make_tensor(acc_dp.data(), acc_rowcol_sm90(acc_dp.layout()));
        warpgroup_wait<1>();
        warpgroup_fence_operand(acc_s);
        const bool need_mask = tile_needs_mask(m_block * kBM, kBM, n_block * kBN, kBN, seqlen, win);
        if constexpr (!kSoftcap) {
          if (need_mask) mask_scores(s_rc, tScS_rc, m_block * kBM, n_block * kBN, seqlen, win);
          CUTE_UNROLL
          for (int i = 0; i < size<0>(s_rc); ++i) {
            const float lse2 = ss.lse2[st * kBM + get<0>(tScS_rc(i, 0))];
            CUTE_UNROLL
            for (int j = 0; j < size<1>(s_rc); ++j) s_rc(i, j) = fast_exp2(fmaf(s_rc(i, j), sl2, -lse2));
          }
          Tensor rP = convert_frag<Element>(acc_s);
          cutlass::arch::NamedBarrier::sync(Tr::kConsumerThreads, 0);  // previous step's reads of sP/sdS done
          copy(rP, tPsP);
        } else {
          // one pass per element (capped score, mask, P, P (1 - t^2)): no tensor-wide
          // intermediate, so the register need stays that of the loop without softcap
          const float cap_in = p.scale / p.softcap, cap_out = p.softcap * kLog2e;  // z * sl2
          Tensor rP = make_tensor<Element>(acc_s.layout());
          Tensor p_rc = make_tensor(rP.data(), acc_rowcol_sm90(rP.layout()));
          CUTE_UNROLL
          for (int i = 0; i < size<0>(s_rc); ++i) {
            const float lse2 = ss.lse2[st * kBM + get<0>(tScS_rc(i, 0))];
            CUTE_UNROLL
            for (int j = 0; j < size<1>(s_rc); ++j) {
              const float t = tanh_exact_enough(s_rc(i, j) * cap_in);
              float pv = fast_exp2(fmaf(t, cap_out, -lse2));  // score * log2(e) = t * cap * log2(e)
              if (need_mask) {
                const int row = m_block * kBM + get<0>(tScS_rc(i, j));
                const int col = n_block * kBN + get<1>(tScS_rc(i, j));
                if (col >= seqlen || col > row + win.wr || col < row - win.wl) pv = 0.f;
              }
              p_rc(i, j) = static_cast<Element>(pv);
              s_rc(i, j) = pv * fmaf(-t, t, 1.f);  // |t| <= 1: the factor is in [0, 1]
            }
          }
          cutlass::arch::NamedBarrier::sync(Tr::kConsumerThreads, 0);  // previous step's reads of sP/sdS done
          copy(rP, tPsP);
        }
        warpgroup_wait<0>();
        warpgroup_fence_operand(acc_dp);
        CUTE_UNROLL
        for (int i = 0; i < size<0>(s_rc); ++i) {  // dS = P (dP - delta) in place of dP
          const float dlt = ss.delta[st * kBM + get<0>(tScS_rc(i, 0))];
          CUTE_UNROLL
          for (int j = 0; j < size<1>(s_rc); ++j) dp_rc(i, j) = s_rc(i, j) * (dp_rc(i, j) - dlt);
        }
        Tensor rdS = convert_frag<Element>(acc_dp);
        copy(rdS, tdSsdS);
      } else {  // split: S and dP as one batch; lse, delta from the (q_heads, total) arrays
        wg_gemm2_ss<true>(mma_sdp, tSrQ(_, _, _, st), tSrK, acc_s, tdPrdO(_, _, _, st), tdPrV, acc_dp);
        // P = exp(S * scale - lse), dS = P * (dP - delta); rows past the sequence, keys past it
        // and the causal upper triangle get P = dS = 0.
        const float* lse = p.lse + int64_t(h) * p.total + seq_start;
        const float* delta = p.delta + int64_t(h) * p.total + seq_start;
        Tensor rP = make_tensor<Element>(acc_s.layout());
        Tensor rdS = make_tensor<Element>(acc_s.layout());
        CUTE_UNROLL
        for (int i = 0; i < size(acc_s); ++i) {
          const int row = m_block * kBM + get<0>(tScS(i));
          const int col = n_block * kBN + get<1>(tScS(i));
          float pv = 0.f, ds = 0.f;
          if (row < seqlen && col < seqlen && col <= row + win.wr && col >= row - win.wl) {
            pv = fast_exp2(fmaf(acc_s(i), sl2, -__ldg(lse + row) * kLog2e));
            ds = pv * (acc_dp(i) - __ldg(delta + row));
          }
          rP(i) = Element(pv);
          rdS(i) = Element(ds);
        }
        cutlass::arch::NamedBarrier::sync(Tr::kConsumerThreads, 0);  // previous step's reads of sP/sdS done
        copy(rP, tPsP);
        copy(rdS, tdSsdS);
      }
      cutlass::arch::fence_view_async_shared();  // generic-proxy stores -> wgmma reads
      cutlass::arch::NamedBarrier::sync(Tr::kConsumerThreads, 0);

      if constexpr (kFused) {
        // dQ = dS K issued before dV += P^T dO and dK += dS^T Q; once a dQ slice is done its
        // values go out as float4 atomics while dV or dK still runs on the tensor cores. The
        // tile's accumulator in fragment order: value 4j..4j+3 of consumer thread t of slice s
        // at float4 index s * (kBM * kDqCols / 4) + j * 256 + t (rows past the sequence add
        // zeros that nothing reads).
        float4* dqa = reinterpret_cast<float4*>(p.dq_accum) +
                      (bwd_tile(seq_start, b, m_block) * p.q_heads + h) * (kBM * kD / 4);
        Tensor acc_dq = partition_fragment_C(mma_dq, Shape<Int<kBM>, Int<Tr::kDqCols>>{});
        static_assert(decltype(size(acc_dq))::value == Tr::kDqPerThread && Tr::kDqPerThread % 4 == 0);
        auto dq_atomics = [&](int slice) {
          CUTE_UNROLL
          for (int j = 0; j < Tr::kDqPerThread / 4; ++j)
            atomicAdd(dqa + slice * (kBM * Tr::kDqCols / 4) + j * Tr::kConsumerThreads + ctid,
                      make_float4(acc_dq(4 * j), acc_dq(4 * j + 1), acc_dq(4 * j + 2), acc_dq(4 * j + 3)));
        };
        if constexpr (kSl == 1) {
          wg_gemm_issue<true>(mma_dq, tdQrdS, tdQrKt0, acc_dq);                   // dQ
          wg_gemm_issue<false>(mma_dkv, tdVrPt, tdVrdOt(_, _, _, st), acc_dv);    // dV
          wg_gemm_issue<false>(mma_dkv, tdKrdSt, tdKrQt(_, _, _, st), acc_dk);    // dK
          warpgroup_wait<2>();
          warpgroup_fence_operand(acc_dq);
          dq_atomics(0);
        } else {
          wg_gemm_issue<true>(mma_dq, tdQrdS, tdQrKt0, acc_dq);                   // dQ, slice 0
          wg_gemm_issue<false>(mma_dkv, tdVrPt, tdVrdOt(_, _, _, st), acc_dv);    // dV
          warpgroup_wait<1>();
          warpgroup_fence_operand(acc_dq);
          dq_atomics(0);
          wg_gemm_issue<true>(mma_dq, tdQrdS, tdQrKt1, acc_dq);                   // dQ, slice 1
          wg_gemm_issue<false>(mma_dkv, tdKrdSt, tdKrQt(_, _, _, st), acc_dk);    // dK
          warpgroup_wait<1>();
          warpgroup_fence_operand(acc_dq);
          dq_atomics(1);
        }
        warpgroup_wait<0>();
        warpgroup_fence_operand(acc_dv);
        warpgroup_fence_operand(acc_dk);
      } else {  // dV += P^T dO, dK += dS^T Q as one batch
        wg_gemm2_ss<false>(mma_dkv, tdVrPt, tdVrdOt(_, _, _, st), acc_dv, tdKrdSt, tdKrQt(_, _, _, st), acc_dk);
      }
      pipe.consumer_release(rd);
      ++rd;
    }

    // epilogue: dK (scaled; fused with p-RoPE: rotated back), dV -> smem (over K, V) -> gmem
    // rows < n_rows
    CUTE_UNROLL
    for (int i = 0; i < size(acc_dk); ++i) acc_dk(i) *= p.scale;
    Tensor rdK = convert_frag<Element>(acc_dk);
    Tensor rdV = convert_frag<Element>(acc_dv);
    cutlass::arch::NamedBarrier::sync(Tr::kConsumerThreads, 0);  // all wgmma reads of sK, sV done
    Tensor sdK = make_tensor(make_smem_ptr(ss.k.data()), typename Tr::SmemLayoutK{});
    Tensor sdV = make_tensor(make_smem_ptr(ss.v.data()), typename Tr::SmemLayoutK{});
    Tensor tdKsdK = thr_dkv.partition_C(sdK);
    Tensor tdVsdV = thr_dkv.partition_C(sdV);
    copy(rdK, tdKsdK);
    copy(rdV, tdVsdV);
    cutlass::arch::NamedBarrier::sync(Tr::kConsumerThreads, 0);
    if constexpr (kRotate) {  // dK w.r.t. the rotated k -> w.r.t. k (rotated pairs only)
      const int64_t k_row0 = int64_t(seq_start) + int64_t(n_block) * kBN;
      if (p.k_cs != nullptr) {  // pairs in a run: 16-byte chunks, cos/sin from the K pass's table
        const int w = cs_table_w(p.rot.run_a0, p.rot.num_rot);
        rotate_tile_chunks<kBN, std::is_same_v<Element, cutlass::bfloat16_t>, true>(
            ss.k.data(), p.k_cs + k_row0 * 2 * w, n_rows, w, cs_table_lo(p.rot.run_a0),
            p.rot.run_b_off, ctid, Tr::kConsumerThreads, [] {});
      } else {
        rotate_tile_smem<true, true>(sdK, p.positions, k_row0, n_rows, p.rot.pair_a, p.rot.pair_b,
                                     p.rot.pair_freq, p.rot.num_rot, ctid, Tr::kConsumerThreads);
      }
      cutlass::arch::NamedBarrier::sync(Tr::kConsumerThreads, 0);
    }
    Element* dkp = static_cast<Element*>(p.dk) + int64_t(seq_start) * p.dk_row + int64_t(hk) * p.dk_head;
    Element* dvp = static_cast<Element*>(p.dv) + int64_t(seq_start) * p.dv_row + int64_t(hk) * p.dv_head;
    Tensor gdK = local_tile(make_tensor(make_gmem_ptr(dkp), make_shape(seqlen, Int<kD>{}), make_stride(p.dk_row, _1{})),
                            Shape<Int<kBN>, Int<kD>>{}, make_coord(n_block, 0));
    Tensor gdV = local_tile(make_tensor(make_gmem_ptr(dvp), make_shape(seqlen, Int<kD>{}), make_stride(p.dv_row, _1{})),
                            Shape<Int<kBN>, Int<kD>>{}, make_coord(n_block, 0));
    typename Tr::GmemTiledCopyO ocopy;
    auto othr = ocopy.get_thread_slice(ctid);
    Tensor tc = othr.partition_S(make_identity_tensor(Shape<Int<kBN>, Int<kD>>{}));
    Tensor tdKs = othr.partition_S(sdK);
    Tensor tdKg = othr.partition_D(gdK);
    Tensor tdVs = othr.partition_S(sdV);
    Tensor tdVg = othr.partition_D(gdV);
    store_rows(ocopy, tdKs, tdKg, tc, n_rows);
    store_rows(ocopy, tdVs, tdVg, tc, n_rows);
  }
}

// The split backward's dK/dV kernel: grid (key blocks, kv heads, sequences).
template <class Tr, bool kCausal>
__global__ void __launch_bounds__(Tr::kNThreads, 1)
attn_bwd_sm90_kernel(CUTE_GRID_CONSTANT const BwdSm90Args<Tr> args) {
#if defined(__CUDA_ARCH_FEAT_SM90_ALL)
  bwd_sm90_dkdv<Tr, kCausal, false, false>(args, blockIdx.x, blockIdx.y, blockIdx.z);
#endif
}

// The fused backward's kernel: grid (kv heads, sequences, key blocks), the key block slowest so
// that under a causal mask every CTA of the first (longest) key blocks starts before any other.
template <class Tr, bool kCausal, bool kRotate, bool kSoftcap = false>
__global__ void __launch_bounds__(Tr::kNThreads, 1)
attn_bwd_fused_sm90_kernel(CUTE_GRID_CONSTANT const BwdSm90Args<Tr> args) {
#if defined(__CUDA_ARCH_FEAT_SM90_ALL)
  bwd_sm90_dkdv<Tr, kCausal, true, kRotate, kSoftcap>(args, blockIdx.z, blockIdx.x, blockIdx.y);
#endif
}

// ---------------------------------------------------------------------------------------------
// dQ kernel (split backward): q-stationary, like the forward.
template <int kHeadDim_, bool kBF16>
struct BwdDqSm90Traits {
  using Element = std::conditional_t<kBF16, cutlass::bfloat16_t, cutlass::half_t>;
  static constexpr int kHeadDim = kHeadDim_;
  static constexpr int kBlockM = 128;  // 2 consumer warpgroups x 64 q rows
  // keys per step: fp32 registers per consumer thread are dQ d/2 + S kBN/2 + dP kBN/2
  // (d=256: 128 + 16 + 16 at kBN=32; d=128: 64 + 32 + 32; d=64: 32 + 64 + 64), and smem
  // Q + dO (128 x d each) + 2 stages of K and V must stay under 227 KiB (d=256: 192 KiB).
  static constexpr int kBlockN = kHeadDim == 256 ? 32 : kHeadDim == 128 ? 64 : 128;
  static constexpr int kStages = 2;
  static constexpr int kConsumerWGs = 2;
  static constexpr int kNThreads = 128 * (1 + kConsumerWGs);
  static constexpr int kConsumerThreads = 128 * kConsumerWGs;
  static constexpr int kProducerRegs = 24, kConsumerRegs = 240;
  static_assert(kHeadDim % 64 == 0 && kHeadDim <= 256);

  using AtomLayout = cute::Layout<cute::Shape<cute::Int<kConsumerWGs>, cute::_1, cute::_1>>;
  // S, dP (kBlockM x kBlockN): one warpgroup per 64 q rows.
  using MmaSdP = decltype(cute::make_tiled_mma(
      cute::GMMA::ss_op_selector<Element, Element, float,
                                 cute::Shape<cute::Int<kBlockM>, cute::Int<kBlockN>, cute::Int<kHeadDim>>>(),
      AtomLayout{}));
  // dQ (kBlockM x d) += dS K: A = dS from registers (K-major), B = K^T read MN-major from smem.
  using MmadQ = decltype(cute::make_tiled_mma(
      cute::GMMA::rs_op_selector<Element, Element, float,
                                 cute::Shape<cute::Int<kBlockM>, cute::Int<kHeadDim>, cute::Int<kBlockN>>,
                                 cute::GMMA::Major::K, cute::GMMA::Major::MN>(),
      AtomLayout{}));

  using SmemAtom = cute::GMMA::Layout_K_SW128_Atom<Element>;
  using SmemLayoutQ = decltype(cute::tile_to_shape(SmemAtom{}, cute::Shape<cute::Int<kBlockM>, cute::Int<kHeadDim>>{}));
  using SmemLayoutK = decltype(cute::tile_to_shape(
      SmemAtom{}, cute::Shape<cute::Int<kBlockN>, cute::Int<kHeadDim>, cute::Int<kStages>>{}));
  using SmemLayoutKStage = decltype(cute::tile_to_shape(SmemAtom{}, cute::Shape<cute::Int<kBlockN>, cute::Int<kHeadDim>>{}));
  // K^T (d, kBlockN, stages): the same bytes as K, the MN-major B operand of dS K.
  using SmemLayoutKt = decltype(cute::composition(
      SmemLayoutK{}, cute::make_ordered_layout(
                         cute::Shape<cute::Int<kHeadDim>, cute::Int<kBlockN>, cute::Int<kStages>>{},
                         cute::Step<cute::_2, cute::_1, cute::_3>{})));

  using PipelineKV = cutlass::PipelineTmaAsync<kStages>;

  struct SharedStorage {
    cute::array_aligned<Element, cute::cosize_v<SmemLayoutQ>, 1024> q;
    cute::array_aligned<Element, cute::cosize_v<SmemLayoutQ>, 1024> dout;
    cute::array_aligned<Element, cute::cosize_v<SmemLayoutK>, 1024> k;
    cute::array_aligned<Element, cute::cosize_v<SmemLayoutK>, 1024> v;
    cutlass::arch::ClusterTransactionBarrier barrier_q;
    typename PipelineKV::SharedStorage pipe_k;
    typename PipelineKV::SharedStorage pipe_v;
  };
  static constexpr int kSmemBytes = int(sizeof(SharedStorage));
  static constexpr uint32_t kQdOBytes = 2u * kBlockM * kHeadDim * sizeof(Element);
  static constexpr uint32_t kKVBytes = kBlockN * kHeadDim * sizeof(Element);

  static auto gmem(const void* ptr, int total, int heads, int64_t row, int64_t head) {
    using namespace cute;
    return make_tensor(make_gmem_ptr(static_cast<const Element*>(ptr)),
                       make_shape(total, int(kHeadDim), heads), make_stride(row, _1{}, head));
  }
  static auto make_tma_q(const void* ptr, int total, int heads, int64_t row, int64_t head) {
    using namespace cute;
    return make_tma_copy(SM90_TMA_LOAD{}, gmem(ptr, total, heads, row, head), SmemLayoutQ{},
                         Shape<Int<kBlockM>, Int<kHeadDim>>{}, _1{});
  }
  static auto make_tma_k(const void* ptr, int total, int heads, int64_t row, int64_t head) {
    using namespace cute;
    return make_tma_copy(SM90_TMA_LOAD{}, gmem(ptr, total, heads, row, head), SmemLayoutKStage{},
                         Shape<Int<kBlockN>, Int<kHeadDim>>{}, _1{});
  }
  using TmaQ = decltype(make_tma_q(nullptr, 0, 0, 0, 0));
  using TmaK = decltype(make_tma_k(nullptr, 0, 0, 0, 0));
};

template <class Tr>
struct BwdDqSm90Args {
  typename Tr::TmaQ tma_q, tma_do;
  typename Tr::TmaK tma_k, tma_v;
  BwdParams p;
};

template <class Tr, bool kCausal>
__global__ void __launch_bounds__(Tr::kNThreads, 1)
attn_bwd_dq_sm90_kernel(CUTE_GRID_CONSTANT const BwdDqSm90Args<Tr> args) {
#if defined(__CUDA_ARCH_FEAT_SM90_ALL)
  using namespace cute;
  using Element = typename Tr::Element;
  using Pipeline = typename Tr::PipelineKV;
  constexpr int kBM = Tr::kBlockM, kBN = Tr::kBlockN, kD = Tr::kHeadDim;
  const BwdParams& p = args.p;

  // last q blocks first: under a causal mask they have the most keys (better tail balance)
  const int m_block = gridDim.x - 1 - blockIdx.x, h = blockIdx.y, b = blockIdx.z;
  const int seq_start = p.cu_seqlens[b];
  const int seqlen = p.cu_seqlens[b + 1] - seq_start;
  if (m_block * kBM >= seqlen) return;  // uniform over the CTA, before any barrier
  const int hk = h / (p.q_heads / p.kv_heads);
  const int m_rows = seqlen - m_block * kBM;
  // key blocks [n_block_min, n_block_max) of the window (causal: wr = 0), as the forward
  const WindowBounds win = window_bounds(p.window_left, p.window_right, kCausal, seqlen);
  int n_block_min, n_block_max;
  key_block_range(m_block * kBM, kBM, kBN, seqlen, win, n_block_min, n_block_max);

  extern __shared__ __align__(1024) char smem_raw[];
  auto& ss = *reinterpret_cast<typename Tr::SharedStorage*>(smem_raw);
  Tensor sQ = make_tensor(make_smem_ptr(ss.q.data()), typename Tr::SmemLayoutQ{});
  Tensor sdO = make_tensor(make_smem_ptr(ss.dout.data()), typename Tr::SmemLayoutQ{});
  Tensor sK = make_tensor(make_smem_ptr(ss.k.data()), typename Tr::SmemLayoutK{});
  Tensor sV = make_tensor(make_smem_ptr(ss.v.data()), typename Tr::SmemLayoutK{});
  Tensor sKt = make_tensor(make_smem_ptr(ss.k.data()), typename Tr::SmemLayoutKt{});

  const int warp_group = threadIdx.x / 128;
  typename Pipeline::Params pp;
  pp.transaction_bytes = Tr::kKVBytes;
  pp.role = warp_group == 0 ? Pipeline::ThreadCategory::Producer : Pipeline::ThreadCategory::Consumer;
  pp.is_leader = threadIdx.x == 0;
  pp.num_consumers = Tr::kConsumerThreads;
  if (threadIdx.x == 0) ss.barrier_q.init(1);
  Pipeline pipe_k(ss.pipe_k, pp, Shape<_1, _1, _1>{});
  Pipeline pipe_v(ss.pipe_v, pp, Shape<_1, _1, _1>{});
  __syncthreads();  // barriers initialised (and fenced) before anyone uses them

  if (warp_group == 0) {
    // ---------------- producer ----------------
    cutlass::arch::warpgroup_reg_dealloc<Tr::kProducerRegs>();
    if (threadIdx.x == 0) {
      Tensor mQ = args.tma_q.get_tma_tensor(make_shape(int(p.total), kD, p.q_heads));
      Tensor mdO = args.tma_do.get_tma_tensor(make_shape(int(p.total), kD, p.q_heads));
      Tensor mK = args.tma_k.get_tma_tensor(make_shape(int(p.total), kD, p.kv_heads));
      Tensor mV = args.tma_v.get_tma_tensor(make_shape(int(p.total), kD, p.kv_heads));
      Tensor gQ = local_tile(domain_offset(make_coord(seq_start, _0{}), mQ(_, _, h)),
                             Shape<Int<kBM>, Int<kD>>{}, make_coord(m_block, _0{}));  // (kBM, kD)
      Tensor gdO = local_tile(domain_offset(make_coord(seq_start, _0{}), mdO(_, _, h)),
                              Shape<Int<kBM>, Int<kD>>{}, make_coord(m_block, _0{}));
      Tensor gK = local_tile(domain_offset(make_coord(seq_start, _0{}), mK(_, _, hk)),
                             Shape<Int<kBN>, Int<kD>>{}, make_coord(_, _0{}));        // (kBN, kD, n)
      Tensor gV = local_tile(domain_offset(make_coord(seq_start, _0{}), mV(_, _, hk)),
                             Shape<Int<kBN>, Int<kD>>{}, make_coord(_, _0{}));
      auto [tQg, tQs] = tma_partition(args.tma_q, _0{}, Layout<_1>{}, group_modes<0, 2>(sQ), group_modes<0, 2>(gQ));
      auto [tdOg, tdOs] = tma_partition(args.tma_do, _0{}, Layout<_1>{}, group_modes<0, 2>(sdO), group_modes<0, 2>(gdO));
      auto [tKg, tKs] = tma_partition(args.tma_k, _0{}, Layout<_1>{}, group_modes<0, 2>(sK), group_modes<0, 2>(gK));
      auto [tVg, tVs] = tma_partition(args.tma_v, _0{}, Layout<_1>{}, group_modes<0, 2>(sV), group_modes<0, 2>(gV));

      ss.barrier_q.arrive_and_expect_tx(Tr::kQdOBytes);
      copy(args.tma_q.with(reinterpret_cast<uint64_t&>(ss.barrier_q), 0), tQg, tQs);
      copy(args.tma_do.with(reinterpret_cast<uint64_t&>(ss.barrier_q), 0), tdOg, tdOs);
      auto wr = cutlass::make_producer_start_state<Pipeline>();
      for (int n = n_block_min; n < n_block_max; ++n) {
        pipe_k.producer_acquire(wr);
        copy(args.tma_k.with(*pipe_k.producer_get_barrier(wr), 0), tKg(_, n), tKs(_, wr.index()));
        pipe_v.producer_acquire(wr);
        copy(args.tma_v.with(*pipe_v.producer_get_barrier(wr), 0), tVg(_, n), tVs(_, wr.index()));
        ++wr;
      }
    }
  } else {
    // ---------------- consumers ----------------
    cutlass::arch::warpgroup_reg_alloc<Tr::kConsumerRegs>();
    const int ctid = threadIdx.x - 128;
    typename Tr::MmaSdP mma_sdp;
    typename Tr::MmadQ mma_dq;
    auto thr_sdp = mma_sdp.get_thread_slice(ctid);
    auto thr_dq = mma_dq.get_thread_slice(ctid);
    Tensor tSrQ = thr_sdp.partition_fragment_A(sQ);     // (MMA, MMA_M, MMA_K) descriptors
    Tensor tSrK = thr_sdp.partition_fragment_B(sK);     // (MMA, MMA_N, MMA_K, stages)
    Tensor tdPrdO = thr_sdp.partition_fragment_A(sdO);
    Tensor tdPrV = thr_sdp.partition_fragment_B(sV);
    Tensor tdQrKt = thr_dq.partition_fragment_B(sKt);   // (MMA, MMA_D, MMA_KN, stages)
    Tensor acc_dq = partition_fragment_C(mma_dq, Shape<Int<kBM>, Int<kD>>{});
    clear(acc_dq);
    Tensor tScS = thr_sdp.partition_C(make_identity_tensor(Shape<Int<kBM>, Int<kBN>>{}));
    Tensor tScS_rc = make_tensor(tScS.data(), acc_rowcol_sm90(tScS.layout()));
    constexpr int kRows = decltype(size<0>(tScS_rc))::value;

    // this thread's rows: lse (log2 domain) and delta, once per CTA; rows past the sequence get
    // lse = +inf (P = 0) and delta = 0, so nothing of them reaches dQ
    constexpr float kLog2e = 1.4426950408889634f;
    const float sl2 = p.scale * kLog2e;
    float lse2[kRows], dlt[kRows];
    CUTE_UNROLL
    for (int i = 0; i < kRows; ++i) {
      const int row = get<0>(tScS_rc(i, 0));
      const int64_t at = int64_t(h) * p.total + seq_start + int64_t(m_block) * kBM + row;
      lse2[i] = row < m_rows ? __ldg(p.lse + at) * kLog2e : INFINITY;
      dlt[i] = row < m_rows ? __ldg(p.delta + at) : 0.f;
    }

    ss.barrier_q.wait(0);
    cutlass::PipelineState<Tr::kStages> rd;
    for (int n_block = n_block_min; n_block < n_block_max; ++n_block) {
      const int st = rd.index();
      Tensor acc_s = partition_fragment_C(mma_sdp, Shape<Int<kBM>, Int<kBN>>{});
      Tensor acc_dp = partition_fragment_C(mma_sdp, Shape<Int<kBM>, Int<kBN>>{});
      pipe_k.consumer_wait(rd);
      pipe_v.consumer_wait(rd);
      if ((n_block + 1) * kBN > seqlen) {  // key rows past the sequence: dQ += dS K multiplies them
        zero_rows_from<kBN, kD>(ss.k.data() + st * kBN * kD, seqlen - n_block * kBN, ctid % 128);
        zero_rows_from<kBN, kD>(ss.v.data() + st * kBN * kD, seqlen - n_block * kBN, ctid % 128);
        zero_rows_done(threadIdx.x / 128 - 1);
      }
      wg_gemm2_ss<true>(mma_sdp, tSrQ, tSrK(_, _, _, st), acc_s, tdPrdO, tdPrV(_, _, _, st), acc_dp);  // S, dP
      pipe_v.consumer_release(rd);

      // dS = P (dP - delta) in place of dP; keys past the sequence and the causal upper
      // triangle get P = 0 (their K/V rows may hold another sequence's data)
      Tensor s_rc = make_tensor(acc_s.data(), acc_rowcol_sm90(acc_s.layout()));
      Tensor dp_rc = make_tensor(acc_dp.data(), acc_rowcol_sm90(acc_dp.layout()));
      const bool need_mask = tile_needs_mask(m_block * kBM, kBM, n_block * kBN, kBN, seqlen, win);
      CUTE_UNROLL
      for (int i = 0; i < size<0>(s_rc); ++i) {
        CUTE_UNROLL
        for (int j = 0; j < size<1>(s_rc); ++j) {
          float pv = fast_exp2(fmaf(s_rc(i, j), sl2, -lse2[i]));
          if (need_mask) {
            const int row = m_block * kBM + get<0>(tScS_rc(i, j));
            const int col = n_block * kBN + get<1>(tScS_rc(i, j));
            if (col >= seqlen || col > row + win.wr || col < row - win.wl) pv = 0.f;
          }
          dp_rc(i, j) = pv * (dp_rc(i, j) - dlt[i]);
        }
      }
      Tensor rdS = convert_frag<Element>(acc_dp);
      Tensor tdQrdS = make_tensor(rdS.data(), acc_to_a_sm90(rdS.layout()));  // (MMA, MMA_M, kBN/16)
      wg_gemm<false, true>(mma_dq, tdQrdS, tdQrKt(_, _, _, st), acc_dq);       // dQ += dS K
      pipe_k.consumer_release(rd);
      ++rd;
    }

    // rows < m_rows of fp32 dQ (unscaled) -> dq_accum (total, q_heads, d), two columns per store
    Tensor tdQc = thr_dq.partition_C(make_identity_tensor(Shape<Int<kBM>, Int<kD>>{}));
    Tensor tdQc_rc = make_tensor(tdQc.data(), acc_rowcol_sm90(tdQc.layout()));
    Tensor dq_rc = make_tensor(acc_dq.data(), acc_rowcol_sm90(acc_dq.layout()));
    const int64_t dq_row = int64_t(p.q_heads) * kD;
    float* dq = p.dq_accum + (int64_t(seq_start) + int64_t(m_block) * kBM) * dq_row + int64_t(h) * kD;
    CUTE_UNROLL
    for (int i = 0; i < size<0>(dq_rc); ++i) {
      const int row = get<0>(tdQc_rc(i, 0));
      if (row < m_rows) {
        CUTE_UNROLL
        for (int j = 0; j < size<1>(dq_rc); j += 2) {
          *reinterpret_cast<float2*>(dq + int64_t(row) * dq_row + get<1>(tdQc_rc(i, j))) =
              make_float2(dq_rc(i, j), dq_rc(i, j + 1));
        }
      }
    }
  }
#endif
}


// ---------------------------------------------------------------------------------------------
// The fused backward's pre- and postprocess: one CTA of 256 threads per (q block of 64 rows,
// q head, sequence), i.e. per tile of bwd_tile(); grid (q blocks, q heads, sequences).

// delta = rowsum(dO * O) - dlse and lse * log2(e) of the tile's rows into the tiled arrays
// (rows past the sequence: delta 0, lse2 +inf, so that P = dS = 0 there), and the tile's fp32
// dQ accumulator zeroed. dO and O rows: 16-byte loads (the binding hands over 16-byte aligned
// rows), d / 8 lanes per row.
template <class Element, int kD>
__global__ void __launch_bounds__(256) bwd_preprocess_sm90_kernel(const BwdParams p) {
  const int m_block = blockIdx.x, h = blockIdx.y, b = blockIdx.z;
  const int seq_start = p.cu_seqlens[b];
  const int seqlen = p.cu_seqlens[b + 1] - seq_start;
  if (m_block * kBwdTileM >= seqlen) return;
  const int64_t tile = bwd_tile(seq_start, b, m_block) * p.q_heads + h;
  constexpr int kLanes = kD / 8, kRowsPerPass = 256 / kLanes;
  static_assert(kLanes <= 32 && 32 % kLanes == 0);
  const int lane = threadIdx.x % kLanes;
  for (int r = threadIdx.x / kLanes; r < kBwdTileM; r += kRowsPerPass) {
    const int row = m_block * kBwdTileM + r;
    float acc = 0.f;
    if (row < seqlen) {  // uniform over the lanes of a row
      const int64_t t = int64_t(seq_start) + row;
      const uint4 ov = *reinterpret_cast<const uint4*>(static_cast<const Element*>(p.out) + t * p.o_row +
                                                       int64_t(h) * p.o_head + lane * 8);
      const uint4 dv = *reinterpret_cast<const uint4*>(static_cast<const Element*>(p.dout) + t * p.do_row +
                                                       int64_t(h) * p.do_head + lane * 8);
      const Element* o8 = reinterpret_cast<const Element*>(&ov);
      const Element* d8 = reinterpret_cast<const Element*>(&dv);
      CUTE_UNROLL
      for (int i = 0; i < 8; ++i) acc += float(o8[i]) * float(d8[i]);
    }
    CUTE_UNROLL
    for (int off = kLanes / 2; off > 0; off >>= 1) acc += __shfl_xor_sync(0xffffffff, acc, off);
    if (lane == 0) {
      float lse2 = INFINITY, delta = 0.f;
      if (row < seqlen) {
        const int64_t at = int64_t(h) * p.total + seq_start + row;
        lse2 = p.lse[at] * 1.4426950408889634f;
        delta = acc - (p.dlse ? p.dlse[at] : 0.f);
      }
      p.lse2_tiled[tile * kBwdTileM + r] = lse2;
      p.delta_tiled[tile * kBwdTileM + r] = delta;
    }
  }
  float4* dqa = reinterpret_cast<float4*>(p.dq_accum) + tile * (kBwdTileM * kD / 4);
  for (int i = threadIdx.x; i < kBwdTileM * kD / 4; i += 256) dqa[i] = make_float4(0.f, 0.f, 0.f, 0.f);
}

// The tile's fp32 accumulator (MMA-fragment order, as the fused kernel's atomics left it) ->
// shared memory by (row, col) -> dq[row] = scale * inverse rotation, in the output dtype, for the
// rows of the sequence. Tr::MmadQ's thread partition is the map, the one the atomics used.
template <class Tr>
__global__ void __launch_bounds__(256) bwd_postprocess_sm90_kernel(const BwdParams p) {
  using namespace cute;
  using Element = typename Tr::Element;
  constexpr int kBM = Tr::kBlockM, kD = Tr::kHeadDim;
  constexpr int kLd = kD + 8;  // row stride: a half-warp's float2 stores hit 32 distinct banks
  static_assert(Tr::kConsumerThreads == 256);
  const int m_block = blockIdx.x, h = blockIdx.y, b = blockIdx.z;
  const int seq_start = p.cu_seqlens[b];
  const int seqlen = p.cu_seqlens[b + 1] - seq_start;
  if (m_block * kBM >= seqlen) return;
  const int rows = min(kBM, seqlen - m_block * kBM);
  extern __shared__ __align__(16) float sdq[];  // (kBM, kLd)

  typename Tr::MmadQ mma_dq;
  Tensor c = mma_dq.get_thread_slice(threadIdx.x).partition_C(
      make_identity_tensor(Shape<Int<kBM>, Int<Tr::kDqCols>>{}));
  const float4* dqa = reinterpret_cast<const float4*>(p.dq_accum) +
                      (bwd_tile(seq_start, b, m_block) * p.q_heads + h) * (kBM * kD / 4);
  CUTE_UNROLL
  for (int s = 0; s < Tr::kDqSlices; ++s) {
    CUTE_UNROLL
    for (int j = 0; j < Tr::kDqPerThread / 4; ++j) {
      const float4 v = dqa[s * (kBM * Tr::kDqCols / 4) + j * 256 + threadIdx.x];
      // values 4j, 4j+1 and 4j+2, 4j+3 are column pairs (c, c+1) of one row (test_layouts)
      float* at0 = sdq + get<0>(c(4 * j)) * kLd + s * Tr::kDqCols + get<1>(c(4 * j));
      float* at2 = sdq + get<0>(c(4 * j + 2)) * kLd + s * Tr::kDqCols + get<1>(c(4 * j + 2));
      *reinterpret_cast<float2*>(at0) = make_float2(v.x, v.y);
      *reinterpret_cast<float2*>(at2) = make_float2(v.z, v.w);
    }
  }
  __syncthreads();

  Element* dq = static_cast<Element*>(p.dq) + (int64_t(seq_start) + int64_t(m_block) * kBM) * p.dq_row +
                int64_t(h) * p.dq_head;
  const int nr = p.rot.num_rot, ni = p.rot.num_id;
  for (int it = threadIdx.x; it < rows * nr; it += 256) {  // rotated pairs: (row, pair)
    const int r = it / nr, i = it - r * nr;
    const int a = __ldg(p.rot.pair_a + i), bb = __ldg(p.rot.pair_b + i);
    float cs, sn;
    rot_cos_sin_pi(__ldg(p.positions + seq_start + int64_t(m_block) * kBM + r), __ldg(p.rot.pair_freq + i), cs, sn);
    const float xa = sdq[r * kLd + a] * p.scale, xb = sdq[r * kLd + bb] * p.scale;
    dq[int64_t(r) * p.dq_row + a] = Element(xa * cs + xb * sn);  // the inverse rotation
    dq[int64_t(r) * p.dq_row + bb] = Element(xb * cs - xa * sn);
  }
  for (int it = threadIdx.x; it < rows * ni; it += 256) {  // identity dims: scaled copy
    const int r = it / ni, j = __ldg(p.rot.identity + (it - r * ni));
    dq[int64_t(r) * p.dq_row + j] = Element(sdq[r * kLd + j] * p.scale);
  }
}

// Dynamic shared memory of the larger of the backward's kernels (the binding checks it against
// the device's limit).
template <bool kBF16, int kD>
int attn_bwd_sm90_smem_bytes() {
  constexpr int a = BwdSm90Traits<kD, kBF16>::kSmemBytes, b = BwdDqSm90Traits<kD, kBF16>::kSmemBytes;
  constexpr int c = BwdSm90Traits<kD, kBF16, true>::kSmemBytes;
  return a > b ? (a > c ? a : c) : (b > c ? b : c);
}

template <class Kernel, class Args>
cudaError_t launch_sm90(Kernel kernel, dim3 grid, int threads, int smem, const Args& args, cudaStream_t st) {
  cudaError_t e = cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, smem);
  if (e != cudaSuccess) return e;
  kernel<<<grid, threads, smem, st>>>(args);
  return cudaGetLastError();
}

// The fused backward (default): preprocess, the 5-GEMM kernel, postprocess. On return dq holds the
// final gradient (scaled, rotated back, converted), dk (rotated back) and dv theirs.
template <bool kBF16, int kD>
cudaError_t run_attn_bwd_fused_sm90(const BwdParams& p, cudaStream_t st) {
  using Tr = BwdSm90Traits<kD, kBF16>;
  const int total = int(p.total);
  const dim3 tiles((p.max_seqlen + Tr::kBlockM - 1) / Tr::kBlockM, p.q_heads, p.num_seqs);
  bwd_preprocess_sm90_kernel<typename Tr::Element, kD><<<tiles, 256, 0, st>>>(p);
  cudaError_t e = cudaGetLastError();
  if (e != cudaSuccess) return e;
  BwdSm90Args<Tr> args{Tr::make_tma_q(p.q, total, p.q_heads, p.q_row, p.q_head),
                       Tr::make_tma_q(p.dout, total, p.q_heads, p.do_row, p.do_head),
                       Tr::make_tma_k(p.k, total, p.kv_heads, p.k_row, p.k_head),
                       Tr::make_tma_k(p.v, total, p.kv_heads, p.v_row, p.v_head), p};
  const dim3 grid(p.kv_heads, p.num_seqs, (p.max_seqlen + Tr::kBlockN - 1) / Tr::kBlockN);
  constexpr int smem = Tr::kSmemBytes, T = Tr::kNThreads;
  const bool rot = p.rot.num_rot > 0;
  auto pick = [&](auto sc) -> cudaError_t {
    constexpr bool kSc = decltype(sc)::value;
    if (p.causal)
      return rot ? launch_sm90(attn_bwd_fused_sm90_kernel<Tr, true, true, kSc>, grid, T, smem, args, st)
                 : launch_sm90(attn_bwd_fused_sm90_kernel<Tr, true, false, kSc>, grid, T, smem, args, st);
    return rot ? launch_sm90(attn_bwd_fused_sm90_kernel<Tr, false, true, kSc>, grid, T, smem, args, st)
               : launch_sm90(attn_bwd_fused_sm90_kernel<Tr, false, false, kSc>, grid, T, smem, args, st);
  };
  e = p.softcap > 0.f ? pick(std::true_type{}) : pick(std::false_type{});
  if (e != cudaSuccess) return e;
  constexpr int post_smem = Tr::kBlockM * (kD + 8) * int(sizeof(float));
  return launch_sm90(bwd_postprocess_sm90_kernel<Tr>, tiles, 256, post_smem, p, st);
}

// The split backward (deterministic mode): the dK/dV kernel, then the dQ kernel. dq_accum then
// holds the unscaled fp32 dQ w.r.t. the rotated q in (total, q_heads, d), for api.cu's passes.
template <bool kBF16, int kD>
cudaError_t run_attn_bwd_split_sm90(const BwdParams& p, cudaStream_t st) {
  using TrS = BwdSm90Traits<kD, kBF16, true>;
  using TrQ = BwdDqSm90Traits<kD, kBF16>;
  const int total = int(p.total);
  constexpr int T = TrS::kNThreads;
  BwdSm90Args<TrS> sargs{TrS::make_tma_q(p.q, total, p.q_heads, p.q_row, p.q_head),
                         TrS::make_tma_q(p.dout, total, p.q_heads, p.do_row, p.do_head),
                         TrS::make_tma_k(p.k, total, p.kv_heads, p.k_row, p.k_head),
                         TrS::make_tma_k(p.v, total, p.kv_heads, p.v_row, p.v_head), p};
  const dim3 sgrid((p.max_seqlen + TrS::kBlockN - 1) / TrS::kBlockN, p.kv_heads, p.num_seqs);
  constexpr int ssmem = TrS::kSmemBytes;
  cudaError_t e = p.causal ? launch_sm90(attn_bwd_sm90_kernel<TrS, true>, sgrid, T, ssmem, sargs, st)
                           : launch_sm90(attn_bwd_sm90_kernel<TrS, false>, sgrid, T, ssmem, sargs, st);
  if (e != cudaSuccess) return e;
  BwdDqSm90Args<TrQ> qargs{TrQ::make_tma_q(p.q, total, p.q_heads, p.q_row, p.q_head),
                           TrQ::make_tma_q(p.dout, total, p.q_heads, p.do_row, p.do_head),
                           TrQ::make_tma_k(p.k, total, p.kv_heads, p.k_row, p.k_head),
                           TrQ::make_tma_k(p.v, total, p.kv_heads, p.v_row, p.v_head), p};
  const dim3 qgrid((p.max_seqlen + TrQ::kBlockM - 1) / TrQ::kBlockM, p.q_heads, p.num_seqs);
  constexpr int qsmem = TrQ::kSmemBytes, QT = TrQ::kNThreads;
  return p.causal ? launch_sm90(attn_bwd_dq_sm90_kernel<TrQ, true>, qgrid, QT, qsmem, qargs, st)
                  : launch_sm90(attn_bwd_dq_sm90_kernel<TrQ, false>, qgrid, QT, qsmem, qargs, st);
}

template <bool kBF16, int kD>
cudaError_t run_attn_bwd_sm90(const BwdParams& p, cudaStream_t st) {
  if (p.total == 0 || p.max_seqlen == 0 || p.num_seqs == 0) return cudaSuccess;
  if (p.total > INT32_MAX) return cudaErrorInvalidValue;  // TMA coordinates are 32-bit
  if (p.num_seqs > 65535) return cudaErrorInvalidValue;  // gridDim.y / gridDim.z
  // the split backward has no softcap (binding.cpp and cuda.py refuse it with a message)
  if (p.sm90_split && p.softcap > 0.f) return cudaErrorInvalidValue;
  return p.sm90_split ? run_attn_bwd_split_sm90<kBF16, kD>(p, st) : run_attn_bwd_fused_sm90<kBF16, kD>(p, st);
}

}  // namespace prope
