// Forward for sm_90 (Hopper): warpgroup MMA (wgmma) with Q and K from shared memory and P from
// registers, TMA loads completing on mbarriers, producer/consumer warp specialization, register
// reallocation (setmaxnreg). One CTA per (q block of 128 rows, q head, sequence):
//   warpgroup 0 (producer, 24 registers): one thread issues the TMA loads of Q, then K[n] and
//     V[n] into a 2-stage ring (PipelineTmaAsync: full/empty mbarriers per stage);
//   warpgroups 1, 2 (consumers, 240 registers): 64 q rows each; S = Q K^T (SS wgmma),
//     online softmax in registers, O += P V (RS wgmma, P re-viewed as the A operand).
// p-RoPE: K arrives pre-rotated (the short-lived buffer of api.cu's forward); the consumers rotate
// the Q tile in shared memory once it lands (rotated pairs only, identity dims untouched), then
// fence.proxy.async so that wgmma (the async proxy) sees the stores. Pairs in a run (the "half"
// layout) are rotated in 16-byte chunks with cos/sin from a table the K pass writes, its loads
// issued before the Q wait (rotate_tile_chunks); others one element pair at a time, angle included.
// Varlen: the TMA tensors span all packed tokens; a tile's coordinates are offset by the sequence
// start. Rows past the sequence are loaded (from the next sequence, or zero-filled past the end
// of the tensor), masked to -inf as keys and never stored as queries.
// Two mainloops (template kOverlap; FwdParams::sm90_fwd picks one at launch, csrc/README.md):
//   basic:   per key block S = Q K^T, wait, softmax, O += P V, wait (no overlap inside a
//            warpgroup; the two consumers overlap only as the hardware interleaves them);
//   overlap: FA3-style software pipelining inside each consumer: S(n) = Q K(n)^T and
//            O += P(n-1) V(n-1) are issued back to back, wgmma wait<1> lets the softmax of S(n)
//            run while P(n-1) V(n-1) is still on the tensor cores; at head_dim <= 128 the two
//            consumers also take turns issuing their GEMMs (named barriers, "pingpong"), so one
//            warpgroup's softmax overlaps the other's GEMMs.
// Launch order (FwdParams::sm90_fwd bit 1, "lpt"): grid (heads, seqs, q blocks) with the q block
// slowest, so every CTA of the longest causal rows is issued before any shorter one.
// Not done (documented in csrc/README.md): a persistent tile scheduler, GQA packing of q heads
// into one tile, TMA stores.
#pragma once

#include <cute/tensor.hpp>
#include <cute/atom/copy_traits_sm90_tma.hpp>
#include <cute/atom/mma_traits_sm90_gmma.hpp>
#include <cutlass/arch/barrier.h>
#include <cutlass/arch/reg_reconfig.h>
#include <cutlass/pipeline/sm90_pipeline.hpp>

#include "params.h"
#include "utils.h"

namespace prope {

// wgmma accumulator ((2 cols, 2 rows, N/8), MMA_M, MMA_N) -> (rows=(2, MMA_M), cols=(2, N/8, MMA_N)).
// (Host too: csrc/tests/test_layouts.cu checks that each row is held by one quad of lanes.)
template <class Layout>
CUTE_HOST_DEVICE auto acc_rowcol_sm90(Layout l) {
  using namespace cute;
  static_assert(decltype(rank(l))::value == 3 && decltype(rank(get<0>(l)))::value == 3);
  return make_layout(make_layout(get<0, 1>(l), get<1>(l)),
                     make_layout(get<0, 0>(l), get<0, 2>(l), get<2>(l)));
}

// wgmma accumulator of S ((2, 2, N/8), MMA_M, 1) -> registers of the A operand of P V
// ((2, 2, 2), MMA_M, N/16): two neighbouring n8 column groups form one k16 slice.
// (Host check: test_layouts.cu compares it element by element with the MMA's own A partition.)
template <class Layout>
CUTE_HOST_DEVICE auto acc_to_a_sm90(Layout l) {
  using namespace cute;
  static_assert(decltype(rank(l))::value == 3 && decltype(size<2>(l))::value == 1);
  auto v = logical_divide(get<0, 2>(l), Tile<_2>{});  // ((2, N/16))
  return make_layout(make_layout(get<0, 0>(l), get<0, 1>(l), get<0, 0>(v)), get<1>(l), get<0, 1>(v));
}

// Scores of keys past the sequence (col >= seqlen) and outside the window (col > row + wr: the
// causal upper triangle when wr = 0; col < row - wl) set to -inf: s_rc (rows, keys) in the row-col
// view of an accumulator, c_rc the same view of its (row, col) coordinates, row0 / col0 the
// tile's first row and key in the sequence. Called only on the tiles tile_needs_mask() names
// (the forward and the fused backward); w.wr is the constant 0 in the causal kernels.
template <class TensorS, class TensorC>
__device__ __forceinline__ void mask_scores(TensorS& s_rc, const TensorC& c_rc, int row0, int col0,
                                            int seqlen, WindowBounds w) {
  using namespace cute;
  CUTE_UNROLL
  for (int i = 0; i < size<0>(s_rc); ++i) {
    CUTE_UNROLL
    for (int j = 0; j < size<1>(s_rc); ++j) {
      const int row = row0 + get<0>(c_rc(i, j));
      const int col = col0 + get<1>(c_rc(i, j));
      if (col >= seqlen || col > row + w.wr || col < row - w.wl) s_rc(i, j) = -INFINITY;
    }
  }
}

// Logit softcapping in place: s -> tanh(s * cap_in) * cap_out with cap_in = scale / softcap and
// cap_out = softcap / scale, so that the result times the softmax scale is softcap *
// tanh(scale * s / softcap) and the softmax and lse code stay as they are. tanh as
// sign(x) (1 - e) / (1 + e), e = 2^(-2 |x| log2(e)) in (0, 1]: absolute error ~1e-7 and no
// overflow (tanh.approx.f32 is 2^-11 relative: 0.02 of a score at softcap 50).
__device__ __forceinline__ float tanh_exact_enough(float x) {
  const float e = fast_exp2(fabsf(x) * -2.8853900817779268f);  // -2 log2(e)
  return copysignf(__fdividef(1.f - e, 1.f + e), x);
}
template <class TensorS>
__device__ __forceinline__ void softcap_scores(TensorS& s, float cap_in, float cap_out) {
  using namespace cute;
  CUTE_UNROLL
  for (int i = 0; i < size(s); ++i) s(i) = tanh_exact_enough(s(i) * cap_in) * cap_out;
}

// A tile that runs past the end of its sequence holds the next sequence's rows in shared memory
// (or whatever lies past cu_seqlens[-1]); a masked P or dS of 0 times an Inf or NaN there is
// still NaN inside the MMA. So its rows [first, kRows) are set to zero before a GEMM multiplies
// them: each consumer warpgroup zeroes them itself (both may write the same zeros), then
// zero_rows_done() fences the stores for its own wgmmas and syncs its 128 threads (named barrier
// 3 + wg; ids 0-2 are the kernels' consumer-wide and pingpong barriers); or both consumers share
// the work behind the 256-thread barrier (kThreads = 256). Only edge tiles pay for this.
// tile: one (kRows, kCols) 16-bit tile (one stage) in the layout of tile_to_shape(
// Layout_K_SW128_Atom, (kRows, kCols)): the 64 columns of atom column a of row r are the 128
// bytes at element (a * kRows + r) * 64 (the swizzle only permutes 16-byte chunks inside them),
// so whole rows are zeroed with 16-byte stores and few registers (test_layouts checks the
// formula on every tile this is used on).
template <int kRows, int kCols, int kThreads = 128>
__device__ __forceinline__ void zero_rows_from(const void* tile, int first, int tid) {
  static_assert(kCols % 64 == 0 && kThreads % (kCols / 8) == 0);
  constexpr int kChunks = kCols / 8, kRowStep = kThreads / kChunks;  // 16-byte chunks a row
  // thread tid: chunk c = tid % kChunks of rows first + tid / kChunks + k * kRowStep (one
  // address register, stepping by kRowStep rows of 128 bytes)
  const int c = tid % kChunks;
  int r = first + tid / kChunks;
  uint32_t at = cute::cast_smem_ptr_to_uint(tile) + uint32_t(((c / 8) * kRows + r) * 128 + (c % 8) * 16);
#pragma unroll 1
  for (; r < kRows; r += kRowStep, at += kRowStep * 128)
    asm volatile("st.shared.v4.u32 [%0], {%1, %1, %1, %1};\n" ::"r"(at), "r"(0u) : "memory");
}
__device__ __forceinline__ void zero_rows_done(int wg) {
  cutlass::arch::fence_view_async_shared();  // generic-proxy stores -> this warpgroup's wgmma reads
  cutlass::arch::NamedBarrier::sync(128, 3 + wg);
}

template <int kHeadDim_, bool kBF16>
struct FwdSm90Traits {
  using Element = std::conditional_t<kBF16, cutlass::bfloat16_t, cutlass::half_t>;
  static constexpr int kHeadDim = kHeadDim_;
  static constexpr int kBlockM = 128;                          // 2 consumer warpgroups x 64 rows
  static constexpr int kBlockN = kHeadDim == 256 ? 64 : 128;   // d=256: O takes 128 regs/thread
  static constexpr int kStages = 2;
  static constexpr int kConsumerWGs = 2;
  static constexpr int kNThreads = 128 * (1 + kConsumerWGs);
  static constexpr int kConsumerThreads = 128 * kConsumerWGs;
  static constexpr int kProducerRegs = 24, kConsumerRegs = 240;  // 128*24 + 256*240 = 64 Ki
  static_assert(kHeadDim % 64 == 0 && kHeadDim <= 256);

  using TileQK = cute::Shape<cute::Int<kBlockM>, cute::Int<kBlockN>, cute::Int<kHeadDim>>;
  using TilePV = cute::Shape<cute::Int<kBlockM>, cute::Int<kHeadDim>, cute::Int<kBlockN>>;
  using AtomLayout = cute::Layout<cute::Shape<cute::Int<kConsumerWGs>, cute::_1, cute::_1>>;
  using MmaQK = decltype(cute::make_tiled_mma(
      cute::GMMA::ss_op_selector<Element, Element, float, TileQK>(), AtomLayout{}));
  using MmaPV = decltype(cute::make_tiled_mma(
      cute::GMMA::rs_op_selector<Element, Element, float, TilePV, cute::GMMA::Major::K,
                                 cute::GMMA::Major::MN>(), AtomLayout{}));

  // 128-byte swizzled K-major tiles (64 elements per swizzle row), as wgmma and TMA want them.
  using SmemAtom = cute::GMMA::Layout_K_SW128_Atom<Element>;
  using SmemLayoutQ = decltype(cute::tile_to_shape(SmemAtom{}, cute::Shape<cute::Int<kBlockM>, cute::Int<kHeadDim>>{}));
  using SmemLayoutK = decltype(cute::tile_to_shape(
      SmemAtom{}, cute::Shape<cute::Int<kBlockN>, cute::Int<kHeadDim>, cute::Int<kStages>>{}));
  using SmemLayoutKStage = decltype(cute::tile_to_shape(SmemAtom{}, cute::Shape<cute::Int<kBlockN>, cute::Int<kHeadDim>>{}));
  // V^T (d, kBlockN, stages): the same bytes as V, read MN-major as the B operand of P V.
  using SmemLayoutVt = decltype(cute::composition(
      SmemLayoutK{}, cute::make_ordered_layout(
                         cute::Shape<cute::Int<kHeadDim>, cute::Int<kBlockN>, cute::Int<kStages>>{},
                         cute::Step<cute::_2, cute::_1, cute::_3>{})));

  using PipelineKV = cutlass::PipelineTmaAsync<kStages>;

  struct SharedStorage {
    cute::array_aligned<Element, cute::cosize_v<SmemLayoutQ>, 1024> q;
    cute::array_aligned<Element, cute::cosize_v<SmemLayoutK>, 1024> k;
    cute::array_aligned<Element, cute::cosize_v<SmemLayoutK>, 1024> v;
    cutlass::arch::ClusterTransactionBarrier barrier_q;
    typename PipelineKV::SharedStorage pipe_k;
    typename PipelineKV::SharedStorage pipe_v;
  };
  static constexpr int kSmemBytes = int(sizeof(SharedStorage));
  static constexpr uint32_t kQBytes = kBlockM * kHeadDim * sizeof(Element);
  static constexpr uint32_t kKVBytes = kBlockN * kHeadDim * sizeof(Element);

  // epilogue: O staged in smem (over Q), written with 16-byte stores, 8 threads per 64 columns
  using GmemThr = cute::Layout<cute::Shape<cute::Int<kConsumerThreads / 8>, cute::_8>, cute::Stride<cute::_8, cute::_1>>;
  using GmemTiledCopyO = decltype(cute::make_tiled_copy(
      cute::Copy_Atom<cute::UniversalCopy<cute::uint128_t>, Element>{}, GmemThr{},
      cute::Layout<cute::Shape<cute::_1, cute::_8>>{}));

  // (total, d, heads) view of a packed tensor: what the TMA descriptors are built on.
  static auto gmem(const void* ptr, int total, int heads, int64_t row, int64_t head) {
    using namespace cute;
    return make_tensor(make_gmem_ptr(static_cast<const Element*>(ptr)),
                       make_shape(total, int(kHeadDim), heads), make_stride(row, _1{}, head));
  }
  static auto make_tma_q(const FwdParams& p) {
    using namespace cute;
    return make_tma_copy(SM90_TMA_LOAD{}, gmem(p.q, int(p.total), p.q_heads, p.q_row, p.q_head),
                         SmemLayoutQ{}, Shape<Int<kBlockM>, Int<kHeadDim>>{}, _1{});
  }
  static auto make_tma_kv(const void* ptr, const FwdParams& p, int64_t row, int64_t head) {
    using namespace cute;
    return make_tma_copy(SM90_TMA_LOAD{}, gmem(ptr, int(p.total), p.kv_heads, row, head),
                         SmemLayoutKStage{}, Shape<Int<kBlockN>, Int<kHeadDim>>{}, _1{});
  }
  using TmaQ = decltype(make_tma_q(std::declval<FwdParams>()));
  using TmaKV = decltype(make_tma_kv(nullptr, std::declval<FwdParams>(), 0, 0));
};

template <class Tr>
struct FwdSm90Args {
  typename Tr::TmaQ tma_q;
  typename Tr::TmaKV tma_k, tma_v;
  FwdParams p;
};

// acc (+)= A * B over the k mode with one warpgroup-wide wgmma batch, waited for here.
// kRegA: A is a register fragment (RS wgmma), else smem descriptors (SS).
template <bool kZeroInit, bool kRegA, class Mma, class TA, class TB, class TC>
__device__ __forceinline__ void wg_gemm(Mma& mma, const TA& a, const TB& b, TC& c) {
  using namespace cute;
  if constexpr (kRegA) warpgroup_fence_operand(const_cast<TA&>(a));
  warpgroup_fence_operand(c);
  warpgroup_arrive();
  if constexpr (kZeroInit) mma.accumulate_ = GMMA::ScaleOut::Zero;
  CUTE_UNROLL
  for (int k = 0; k < size<2>(a); ++k) {
    gemm(mma, a(_, _, k), b(_, _, k), c);
    mma.accumulate_ = GMMA::ScaleOut::One;
  }
  warpgroup_commit_batch();
  warpgroup_wait<0>();
  warpgroup_fence_operand(c);
  if constexpr (kRegA) warpgroup_fence_operand(const_cast<TA&>(a));
}

// The online softmax of one key block without touching O (the overlap mainloop rescales O
// later, between issuing the next S GEMM and the P V GEMM): s_rc (rows, keys) -> exp2
// probabilities in place, row_max / row_sum updated, corr[i] = factor O's row i must take.
template <int kRows, class TensorS>
__device__ __forceinline__ void softmax_block_corr(TensorS& s_rc, float* row_max, float* row_sum,
                                                   float* corr, float sl2) {
  using namespace cute;
  CUTE_UNROLL
  for (int i = 0; i < kRows; ++i) {
    float mx = row_max[i];
    CUTE_UNROLL
    for (int j = 0; j < size<1>(s_rc); ++j) mx = fmaxf(mx, s_rc(i, j));
    mx = quad_max(mx);
    const float m_scaled = mx == -INFINITY ? 0.f : mx * sl2;
    corr[i] = fast_exp2(row_max[i] * sl2 - m_scaled);
    row_max[i] = mx;
    float sum = 0.f;
    CUTE_UNROLL
    for (int j = 0; j < size<1>(s_rc); ++j) {
      const float e = fast_exp2(fmaf(s_rc(i, j), sl2, -m_scaled));
      s_rc(i, j) = e;
      sum += e;
    }
    row_sum[i] = row_sum[i] * corr[i] + sum;
  }
}

template <int kRows, class TensorO>
__device__ __forceinline__ void rescale_rows(TensorO& o_rc, const float* corr) {
  using namespace cute;
  CUTE_UNROLL
  for (int i = 0; i < kRows; ++i) {
    CUTE_UNROLL
    for (int j = 0; j < size<1>(o_rc); ++j) o_rc(i, j) *= corr[i];
  }
}

// Issue acc (+)= A * B as one warpgroup-wide wgmma batch and commit it; not waited for here.
template <bool kZeroInit, class Mma, class TA, class TB, class TC>
__device__ __forceinline__ void wg_gemm_issue(Mma& mma, const TA& a, const TB& b, TC& c) {
  using namespace cute;
  warpgroup_fence_operand(c);
  warpgroup_arrive();
  if constexpr (kZeroInit) mma.accumulate_ = GMMA::ScaleOut::Zero;
  CUTE_UNROLL
  for (int k = 0; k < size<2>(a); ++k) {
    gemm(mma, a(_, _, k), b(_, _, k), c);
    mma.accumulate_ = GMMA::ScaleOut::One;
  }
  warpgroup_commit_batch();
}

// kSoftcap: logit softcapping (instantiated with the overlap mainloop only); the sliding window
// is runtime (FwdParams::window_*): loop bounds and the edge-tile mask, as causal.
template <class Tr, bool kCausal, bool kRotate, bool kOverlap, bool kSoftcap = false>
__global__ void __launch_bounds__(Tr::kNThreads, 1)
attn_fwd_sm90_kernel(CUTE_GRID_CONSTANT const FwdSm90Args<Tr> args) {
#if defined(__CUDA_ARCH_FEAT_SM90_ALL)
  using namespace cute;
  using Element = typename Tr::Element;
  using Pipeline = typename Tr::PipelineKV;
  constexpr int kBM = Tr::kBlockM, kBN = Tr::kBlockN, kD = Tr::kHeadDim;
  const FwdParams& p = args.p;

  // last q blocks first: under a causal mask they have the most keys (better tail balance).
  // grid (q blocks, heads, seqs): the q block varies fastest, so longest-first holds only within
  // one (head, seq); grid (heads, seqs, q blocks) ("lpt"): longest first over the whole grid.
  const bool lpt = p.sm90_fwd & 2;
  const int m_block = lpt ? gridDim.z - 1 - blockIdx.z : gridDim.x - 1 - blockIdx.x;
  const int h = lpt ? blockIdx.x : blockIdx.y, b = lpt ? blockIdx.y : blockIdx.z;
  const int seq_start = p.cu_seqlens[b];
  const int seqlen = p.cu_seqlens[b + 1] - seq_start;
  if (m_block * kBM >= seqlen) return;  // uniform over the CTA, before any barrier
  const int hk = h / (p.q_heads / p.kv_heads);  // GQA: kv head of this q head
  const int m_rows = seqlen - m_block * kBM;    // valid rows of this q block (may be < kBM)
  // key blocks [n_block_min, n_block_max): the window's (causal: wr = 0); blocks outside are
  // never loaded. Loops count n = 0 .. n_blocks - 1, key block n_block_min + n.
  const WindowBounds win = window_bounds(p.window_left, p.window_right, kCausal, seqlen);
  int n_block_min, n_block_max;
  key_block_range(m_block * kBM, kBM, kBN, seqlen, win, n_block_min, n_block_max);
  const int n_blocks = n_block_max - n_block_min;

  extern __shared__ __align__(1024) char smem_raw[];
  auto& ss = *reinterpret_cast<typename Tr::SharedStorage*>(smem_raw);
  Tensor sQ = make_tensor(make_smem_ptr(ss.q.data()), typename Tr::SmemLayoutQ{});
  Tensor sK = make_tensor(make_smem_ptr(ss.k.data()), typename Tr::SmemLayoutK{});
  Tensor sV = make_tensor(make_smem_ptr(ss.v.data()), typename Tr::SmemLayoutK{});
  Tensor sVt = make_tensor(make_smem_ptr(ss.v.data()), typename Tr::SmemLayoutVt{});

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
      Tensor mK = args.tma_k.get_tma_tensor(make_shape(int(p.total), kD, p.kv_heads));
      Tensor mV = args.tma_v.get_tma_tensor(make_shape(int(p.total), kD, p.kv_heads));
      Tensor gQ = local_tile(domain_offset(make_coord(seq_start, _0{}), mQ(_, _, h)),
                             Shape<Int<kBM>, Int<kD>>{}, make_coord(m_block, _0{}));  // (kBM, kD)
      const int k0 = seq_start + n_block_min * kBN;  // first key loaded: tile n is block n_block_min + n
      Tensor gK = local_tile(domain_offset(make_coord(k0, _0{}), mK(_, _, hk)),
                             Shape<Int<kBN>, Int<kD>>{}, make_coord(_, _0{}));        // (kBN, kD, n)
      Tensor gV = local_tile(domain_offset(make_coord(k0, _0{}), mV(_, _, hk)),
                             Shape<Int<kBN>, Int<kD>>{}, make_coord(_, _0{}));
      auto [tQg, tQs] = tma_partition(args.tma_q, _0{}, Layout<_1>{}, group_modes<0, 2>(sQ), group_modes<0, 2>(gQ));
      auto [tKg, tKs] = tma_partition(args.tma_k, _0{}, Layout<_1>{}, group_modes<0, 2>(sK), group_modes<0, 2>(gK));
      auto [tVg, tVs] = tma_partition(args.tma_v, _0{}, Layout<_1>{}, group_modes<0, 2>(sV), group_modes<0, 2>(gV));

      ss.barrier_q.arrive_and_expect_tx(Tr::kQBytes);
      copy(args.tma_q.with(reinterpret_cast<uint64_t&>(ss.barrier_q), 0), tQg, tQs);
      // Block n is the n-th load of either pipeline, so its write state follows from n alone
      // (the producer's start state has phase 1), which keeps the 24-register producer unspilled.
      constexpr int kS = Tr::kStages;
      auto at = [](int n) {
        return cutlass::PipelineState<kS>(n % kS, uint32_t((n / kS) & 1) ^ 1u, uint32_t(n));
      };
      auto load_k = [&](int n) {
        const auto w = at(n);
        pipe_k.producer_acquire(w);
        copy(args.tma_k.with(*pipe_k.producer_get_barrier(w), 0), tKg(_, n), tKs(_, w.index()));
      };
      auto load_v = [&](int n) {
        const auto w = at(n);
        pipe_v.producer_acquire(w);
        copy(args.tma_v.with(*pipe_v.producer_get_barrier(w), 0), tVg(_, n), tVs(_, w.index()));
      };
      const int n_last = n_blocks - 1;
      if constexpr (!kOverlap) {  // the consumers' order: K(n), V(n)
        auto wr = cutlass::make_producer_start_state<Pipeline>();
        for (int n = 0; n < n_blocks; ++n) {
          pipe_k.producer_acquire(wr);
          copy(args.tma_k.with(*pipe_k.producer_get_barrier(wr), 0), tKg(_, n), tKs(_, wr.index()));
          pipe_v.producer_acquire(wr);
          copy(args.tma_v.with(*pipe_v.producer_get_barrier(wr), 0), tVg(_, n), tVs(_, wr.index()));
          ++wr;
        }
      } else {
        // the consumers' order: K(n) is needed before V(n-1), whose stage is freed later
        load_k(0);
        for (int n = 1; n <= n_last; ++n) { load_k(n); load_v(n - 1); }
        load_v(n_last);
      }
    }
  } else {
    // ---------------- consumers ----------------
    cutlass::arch::warpgroup_reg_alloc<Tr::kConsumerRegs>();
    const int ctid = threadIdx.x - 128;
    typename Tr::MmaQK mma_qk;
    typename Tr::MmaPV mma_pv;
    auto thr_qk = mma_qk.get_thread_slice(ctid);
    auto thr_pv = mma_pv.get_thread_slice(ctid);
    Tensor tSrQ = thr_qk.partition_fragment_A(sQ);    // (MMA, MMA_M, MMA_K) descriptors
    Tensor tSrK = thr_qk.partition_fragment_B(sK);    // (MMA, MMA_N, MMA_K, stages)
    Tensor tOrV = thr_pv.partition_fragment_B(sVt);   // (MMA, MMA_D, MMA_KN, stages)
    Tensor acc_s = partition_fragment_C(mma_qk, Shape<Int<kBM>, Int<kBN>>{});
    Tensor acc_o = partition_fragment_C(mma_pv, Shape<Int<kBM>, Int<kD>>{});
    Tensor s_rc = make_tensor(acc_s.data(), acc_rowcol_sm90(acc_s.layout()));
    Tensor o_rc = make_tensor(acc_o.data(), acc_rowcol_sm90(acc_o.layout()));
    Tensor tScS = thr_qk.partition_C(make_identity_tensor(Shape<Int<kBM>, Int<kBN>>{}));
    Tensor tScS_rc = make_tensor(tScS.data(), acc_rowcol_sm90(tScS.layout()));
    constexpr int kRows = decltype(size<0>(s_rc))::value;
    float row_max[kRows], row_sum[kRows];
    CUTE_UNROLL
    for (int i = 0; i < kRows; ++i) { row_max[i] = -INFINITY; row_sum[i] = 0.f; }

    const int64_t q_row0 = int64_t(seq_start) + int64_t(m_block) * kBM;  // first token of the tile
    auto wait_q = [&] { ss.barrier_q.wait(0); };
    if constexpr (kRotate) {
      if (p.q_cs != nullptr) {  // pairs in a run: 16-byte chunks, cos/sin from the K pass's table
        const int w = cs_table_w(p.rot.run_a0, p.rot.num_rot);
        rotate_tile_chunks<kBM, std::is_same_v<Element, cutlass::bfloat16_t>>(
            ss.q.data(), p.q_cs + q_row0 * 2 * w, m_rows, w, cs_table_lo(p.rot.run_a0),
            p.rot.run_b_off, ctid, Tr::kConsumerThreads, wait_q);
      } else {
        wait_q();
        rotate_tile_smem<true>(sQ, p.positions, q_row0, m_rows, p.rot.pair_a, p.rot.pair_b,
                               p.rot.pair_freq, p.rot.num_rot, ctid, Tr::kConsumerThreads);
      }
      cutlass::arch::fence_view_async_shared();  // generic-proxy stores -> wgmma reads
      cutlass::arch::NamedBarrier::sync(Tr::kConsumerThreads, 0);
    } else {
      wait_q();
    }
    clear(acc_o);

    const float sl2 = p.scale * 1.4426950408889634f;  // scores -> log2 domain
    // softcap (kSoftcap), then keys past the end of the sequence and outside the window (causal:
    // the upper triangle) get -inf; n_block is the absolute key block
    auto mask = [&](int n_block) {
      if constexpr (kSoftcap) softcap_scores(acc_s, p.scale / p.softcap, p.softcap / p.scale);
      if (tile_needs_mask(m_block * kBM, kBM, n_block * kBN, kBN, seqlen, win))
        mask_scores(s_rc, tScS_rc, m_block * kBM, n_block * kBN, seqlen, win);
    };

    if constexpr (!kOverlap) {
      cutlass::PipelineState<Tr::kStages> rd;
      for (int n_block = n_block_min; n_block < n_block_max; ++n_block) {
        pipe_k.consumer_wait(rd);
        wg_gemm<true, false>(mma_qk, tSrQ, tSrK(_, _, _, rd.index()), acc_s);  // S = Q K^T
        pipe_k.consumer_release(rd);
        mask(n_block);
        online_softmax_block<kRows>(s_rc, o_rc, row_max, row_sum, sl2);
        Tensor rP = convert_frag<Element>(acc_s);
        Tensor tOrP = make_tensor(rP.data(), acc_to_a_sm90(rP.layout()));  // (MMA, MMA_M, kBN/16)
        pipe_v.consumer_wait(rd);
        if ((n_block + 1) * kBN > seqlen) {  // V rows past the sequence (see zero_rows_from)
          zero_rows_from<kBN, kD>(ss.v.data() + rd.index() * kBN * kD, seqlen - n_block * kBN, ctid % 128);
          zero_rows_done(warp_group - 1);
        }
        wg_gemm<false, true>(mma_pv, tOrP, tOrV(_, _, _, rd.index()), acc_o);      // O += P V
        pipe_v.consumer_release(rd);
        ++rd;
      }
    } else {
      // Software pipeline, one key block deep: iteration n issues S(n) = Q K(n)^T, rescales O by
      // block n-1's correction, issues O += P(n-1) V(n-1), waits for S(n) only (wait<1>), runs
      // the softmax of S(n) while P(n-1) V(n-1) runs, then waits for it before P(n-1)'s registers
      // are overwritten by P(n). V's read state lags K's by one block.
      // Pingpong (head_dim <= 128, as FA3): warpgroup w issues its GEMMs only while holding the
      // token: sync on named barrier 1 + w (256 threads: its own 128 + the other's arrive), hand
      // it over by arriving on the other's barrier. The first consumer pre-arrives on its own
      // barrier so that it goes first. Both consumers run the same n_blocks iterations, so
      // the hand-overs pair up.
      constexpr bool kPingpong = kD <= 128;
      const int wg = warp_group - 1;  // consumer 0 or 1
      auto token_wait = [&] {
        if constexpr (kPingpong) cutlass::arch::NamedBarrier::sync(Tr::kConsumerThreads, 1 + wg);
      };
      auto token_pass = [&] {
        if constexpr (kPingpong) cutlass::arch::NamedBarrier::arrive(Tr::kConsumerThreads, 2 - wg);
      };
      if constexpr (kPingpong) {
        if (wg == 0) cutlass::arch::NamedBarrier::arrive(Tr::kConsumerThreads, 1);
      }
      float corr[kRows];
      Tensor rP = make_tensor<Element>(acc_s.layout());  // P(n-1), 16-bit, live across S(n)
      Tensor tOrP = make_tensor(rP.data(), acc_to_a_sm90(rP.layout()));
      auto to_p = [&] {
        CUTE_UNROLL
        for (int i = 0; i < size(acc_s); ++i) rP(i) = static_cast<Element>(acc_s(i));
      };
      // read state of block n in either pipeline, from n alone (consumer start phase 0): no
      // second state object live across the loop (d256 runs at the 240-register limit)
      constexpr int kS = Tr::kStages;
      auto at = [](int n) {
        return cutlass::PipelineState<kS>(n % kS, uint32_t((n / kS) & 1), uint32_t(n));
      };

      // iteration n handles key block n_block_min + n (the pipeline states count from 0)
      // block 0: S(0) alone
      {
        const auto rk = at(0);
        pipe_k.consumer_wait(rk);
        token_wait();
        wg_gemm_issue<true>(mma_qk, tSrQ, tSrK(_, _, _, rk.index()), acc_s);
        token_pass();
        warpgroup_wait<0>();
        warpgroup_fence_operand(acc_s);
        pipe_k.consumer_release(rk);
      }
      mask(n_block_min);
      softmax_block_corr<kRows>(s_rc, row_max, row_sum, corr, sl2);  // corr: 0 (O is still 0)
      to_p();

      for (int n = 1; n < n_blocks; ++n) {
        const auto rk = at(n), rv = at(n - 1);
        pipe_k.consumer_wait(rk);
        token_wait();
        wg_gemm_issue<true>(mma_qk, tSrQ, tSrK(_, _, _, rk.index()), acc_s);         // S(n)
        rescale_rows<kRows>(o_rc, corr);
        pipe_v.consumer_wait(rv);
        warpgroup_fence_operand(rP);
        wg_gemm_issue<false>(mma_pv, tOrP, tOrV(_, _, _, rv.index()), acc_o);        // O += P V(n-1)
        token_pass();
        warpgroup_wait<1>();                                                          // S(n) done
        warpgroup_fence_operand(acc_s);
        pipe_k.consumer_release(rk);
        mask(n_block_min + n);
        softmax_block_corr<kRows>(s_rc, row_max, row_sum, corr, sl2);
        warpgroup_wait<0>();                                                          // P V done
        warpgroup_fence_operand(acc_o);
        warpgroup_fence_operand(rP);
        pipe_v.consumer_release(rv);
        to_p();
      }

      // the last block's O += P V, outside the pingpong. The first consumer takes the second's
      // last hand-over, so that every arrive on both barriers is matched before the CTA ends.
      if constexpr (kPingpong) {
        if (wg == 0) cutlass::arch::NamedBarrier::sync(Tr::kConsumerThreads, 1);
      }
      rescale_rows<kRows>(o_rc, corr);
      const auto rv = at(n_blocks - 1);
      pipe_v.consumer_wait(rv);
      // only the last block can run past the sequence: both consumers share the zeroing of its
      // V rows there behind the 256-thread barrier (one barrier per warpgroup, whose id needs
      // the warpgroup index, spilled the causal d 256 kernels: no register to spare here)
      if (const int first = seqlen - (n_block_max - 1) * kBN; first < kBN) {
        zero_rows_from<kBN, kD, Tr::kConsumerThreads>(ss.v.data() + rv.index() * (kBN * kD), first, ctid);
        cutlass::arch::fence_view_async_shared();
        cutlass::arch::NamedBarrier::sync(Tr::kConsumerThreads, 0);
      }
      warpgroup_fence_operand(rP);
      wg_gemm_issue<false>(mma_pv, tOrP, tOrV(_, _, _, rv.index()), acc_o);
      warpgroup_wait<0>();
      warpgroup_fence_operand(acc_o);
      warpgroup_fence_operand(rP);
      pipe_v.consumer_release(rv);
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
    Tensor sO = make_tensor(make_smem_ptr(ss.q.data()), typename Tr::SmemLayoutQ{});
    cutlass::arch::NamedBarrier::sync(Tr::kConsumerThreads, 0);  // all wgmma reads of sQ done
    Tensor tOsO = thr_pv.partition_C(sO);
    copy(rO, tOsO);
    cutlass::arch::NamedBarrier::sync(Tr::kConsumerThreads, 0);
    Element* op = static_cast<Element*>(p.o) + int64_t(seq_start) * p.o_row + int64_t(h) * p.o_head;
    Tensor gO = local_tile(make_tensor(make_gmem_ptr(op), make_shape(seqlen, Int<kD>{}), make_stride(p.o_row, _1{})),
                           Shape<Int<kBM>, Int<kD>>{}, make_coord(m_block, 0));
    typename Tr::GmemTiledCopyO ocopy;
    auto othr = ocopy.get_thread_slice(ctid);
    Tensor tOsO2 = othr.partition_S(sO);
    Tensor tOgO = othr.partition_D(gO);
    Tensor tOcO = othr.partition_S(make_identity_tensor(Shape<Int<kBM>, Int<kD>>{}));
    store_rows(ocopy, tOsO2, tOgO, tOcO, m_rows);
  }
#endif
}

template <bool kBF16, int kD>
int attn_fwd_sm90_smem_bytes() { return FwdSm90Traits<kD, kBF16>::kSmemBytes; }

template <bool kBF16, int kD>
cudaError_t run_attn_fwd_sm90(const FwdParams& p, cudaStream_t st) {
  using Tr = FwdSm90Traits<kD, kBF16>;
  if (p.total == 0 || p.max_seqlen == 0 || p.num_seqs == 0) return cudaSuccess;
  if (p.total > INT32_MAX) return cudaErrorInvalidValue;  // TMA coordinates are 32-bit
  FwdSm90Args<Tr> args{Tr::make_tma_q(p), Tr::make_tma_kv(p.k, p, p.k_row, p.k_head),
                       Tr::make_tma_kv(p.v, p, p.v_row, p.v_head), p};
  const int m_blocks = (p.max_seqlen + Tr::kBlockM - 1) / Tr::kBlockM;
  // sm90_fwd bit 0: the overlap mainloop; bit 1: the longest-first grid (q blocks slowest), where
  // the q block count fits gridDim.z (65535) and the sequence count gridDim.y
  // softcap: the overlap mainloop whatever bit 0 says (the only one instantiated with it)
  const bool softcap = p.softcap > 0.f;
  const bool overlap = (p.sm90_fwd & 1) || softcap;
  const bool lpt = (p.sm90_fwd & 2) && m_blocks <= 65535 && p.num_seqs <= 65535;
  args.p.sm90_fwd = (overlap ? 1 : 0) | (lpt ? 2 : 0);
  const dim3 grid = lpt ? dim3(p.q_heads, p.num_seqs, m_blocks) : dim3(m_blocks, p.q_heads, p.num_seqs);
  constexpr int smem = Tr::kSmemBytes;
  auto go = [&](auto kernel) -> cudaError_t {
    cudaError_t e = cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, smem);
    if (e != cudaSuccess) return e;
    kernel<<<grid, Tr::kNThreads, smem, st>>>(args);
    return cudaGetLastError();
  };
  const bool rot = p.rot.num_rot > 0;
  auto pick = [&](auto ov, auto sc) -> cudaError_t {
    constexpr bool kOv = decltype(ov)::value, kSc = decltype(sc)::value;
    if (p.causal)
      return rot ? go(attn_fwd_sm90_kernel<Tr, true, true, kOv, kSc>) : go(attn_fwd_sm90_kernel<Tr, true, false, kOv, kSc>);
    return rot ? go(attn_fwd_sm90_kernel<Tr, false, true, kOv, kSc>) : go(attn_fwd_sm90_kernel<Tr, false, false, kOv, kSc>);
  };
  if (softcap) return pick(std::true_type{}, std::true_type{});
  return overlap ? pick(std::true_type{}, std::false_type{}) : pick(std::false_type{}, std::false_type{});
}

}  // namespace prope
