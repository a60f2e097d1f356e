// Host-only check (runs without a GPU) of the two hand-written register-layout conversions the
// forward kernel relies on, for every (dtype, head_dim) configuration:
//  * acc_rowcol: every accumulator row of S / O is held by exactly the 4 lanes of one quad (so
//    the quad shuffles reduce a full row), and each (row, col) is owned exactly once;
//  * acc_to_a: the S accumulator re-viewed as the A operand of P @ V gives, element by element,
//    the same (row, key) coordinates as the MMA's own A partition of a (kBlockM, kBlockN) tile;
//  * the SM90 forward's counterparts (acc_rowcol_sm90, acc_to_a_sm90 against the RS wgmma's A
//    partition, the V^T view of the V stages, the O store), over its 256 consumer threads;
//  * the SM90 backward: each tiled MMA's accumulator covers its tile exactly once over the 256
//    consumer threads (S/dP, dK/dV in both splits, dQ), the transposed smem views address the
//    element of the original at (j, i), the dK/dV store;
//  * the fused backward's dQ: the K^T slices' offsets, the fragment-order accumulator (what the
//    atomics write and the postprocess reads back) covering the (64, d) tile once, bwd_tile();
//  * the SM90 backward's dQ kernel: the same views as the forward's (S and dQ accumulators, dS
//    re-viewed as the A operand of dS K, the K^T view of the K stages) and its float2 dQ stores;
//  * the SM90 block ranges and edge-tile predicate under a sliding window (check_window_ranges.h);
//  * copy_rows/store_rows: each (CPY, m, :) slice of the gmem<->smem tiled copies is one tile row
//    (the row predicate is taken from its first element), forward and backward.
#include <cstdio>
#include <random>
#include <set>
#include <vector>

#include "prope_attn/bwd_kernel.h"
#include "prope_attn/fwd_kernel.h"
#include "prope_attn/bwd_sm90.h"
#include "prope_attn/fwd_sm90.h"
#include "check_window_ranges.h"

using namespace cute;

template <class Tr>
int check_config(const char* name) {
  constexpr int kBM = Tr::kBlockM, kBN = Tr::kBlockN, kD = Tr::kHeadDim;
  typename Tr::TiledMma mma;
  int errors = 0;
  auto check_rowcol = [&](auto shape_mn, const char* what) {
    constexpr int M = decltype(size<0>(shape_mn))::value, N = decltype(size<1>(shape_mn))::value;
    std::vector<int> owner(M * N, -1);
    std::vector<std::set<int>> row_threads(M);
    for (int tid = 0; tid < Tr::kNThreads; ++tid) {
      auto thr = mma.get_thread_slice(tid);
      Tensor c = thr.partition_C(make_identity_tensor(shape_mn));
      Tensor rc = make_tensor(c.data(), prope::acc_rowcol(c.layout()));
      for (int i = 0; i < size<0>(rc); ++i) {
        const int row = get<0>(rc(i, 0));
        for (int j = 0; j < size<1>(rc); ++j) {
          const int r = get<0>(rc(i, j)), col = get<1>(rc(i, j));
          if (r != row) { if (errors++ < 5) std::printf("%s %s: tid %d row-view %d mixes rows\n", name, what, tid, i); }
          if (owner[r * N + col] != -1) { if (errors++ < 5) std::printf("%s %s: (%d,%d) owned twice\n", name, what, r, col); }
          owner[r * N + col] = tid;
          row_threads[r].insert(tid);
        }
      }
    }
    for (int r = 0; r < M; ++r) {
      const auto& s = row_threads[r];
      bool quad = s.size() == 4;
      if (quad) { const int q0 = *s.begin() / 4; for (int t : s) quad &= (t / 4 == q0); }
      if (!quad && errors++ < 5) std::printf("%s %s: row %d is not held by exactly one quad\n", name, what, r);
    }
    for (int x : owner) if (x < 0 && errors++ < 5) std::printf("%s %s: element not owned\n", name, what);
  };
  check_rowcol(Shape<Int<kBM>, Int<kBN>>{}, "S");
  check_rowcol(Shape<Int<kBM>, Int<kD>>{}, "O");

  for (int tid = 0; tid < Tr::kNThreads; ++tid) {
    auto thr = mma.get_thread_slice(tid);
    Tensor c = thr.partition_C(make_identity_tensor(Shape<Int<kBM>, Int<kBN>>{}));
    Tensor as_a = make_tensor(c.data(), prope::acc_to_a(c.layout()));
    Tensor a = thr.partition_A(make_identity_tensor(Shape<Int<kBM>, Int<kBN>>{}));
    if (size(as_a) != size(a) || size<2>(as_a) != size<2>(a)) {
      if (errors++ < 5) std::printf("%s: acc_to_a shape mismatch\n", name);
      continue;
    }
    for (int i = 0; i < size(a); ++i) {
      if (get<0>(as_a(i)) != get<0>(a(i)) || get<1>(as_a(i)) != get<1>(a(i))) {
        if (errors++ < 5)
          std::printf("%s: tid %d elem %d: P at (%d,%d) but A expects (%d,%d)\n", name, tid, i,
                      int(get<0>(as_a(i))), int(get<1>(as_a(i))), int(get<0>(a(i))), int(get<1>(a(i))));
      }
    }
  }
  std::printf("%-12s %s\n", name, errors ? "FAILED" : "ok");
  return errors;
}

// every slice (_, m, _) of the gmem tiled copy's partition lies in a single row
template <class Copy, int kThreads, class Shape>
int check_rows(const char* name, Shape shape) {
  Copy cp;
  int errors = 0;
  std::vector<int> seen(size(shape), 0);
  for (int tid = 0; tid < kThreads; ++tid) {
    Tensor c = cp.get_thread_slice(tid).partition_S(make_identity_tensor(shape));
    for (int m = 0; m < size<1>(c); ++m) {
      const int row = get<0>(c(0, m, 0));
      Tensor sl = c(_, m, _);
      for (int i = 0; i < size(sl); ++i) {
        if (get<0>(sl(i)) != row && errors++ < 5) std::printf("%s: tid %d slice %d spans rows\n", name, tid, m);
        seen[get<0>(sl(i)) + size<0>(shape) * get<1>(sl(i))]++;
      }
    }
  }
  for (int x : seen) if (x != 1 && errors++ < 5) std::printf("%s: element copied %d times\n", name, x);
  std::printf("%-12s %s\n", name, errors ? "FAILED" : "ok");
  return errors;
}

// a transposed smem view must address exactly the element of the original at (j, i)
template <class L, class Lt>
int check_transpose(const char* name) {
  L l;
  Lt lt;
  int errors = 0;
  for (int i = 0; i < size<0>(l); ++i)
    for (int j = 0; j < size<1>(l); ++j)
      if (l(i, j) != lt(j, i) && errors++ < 5) std::printf("%s: (%d,%d) differs\n", name, i, j);
  std::printf("%-12s %s\n", name, errors ? "FAILED" : "ok");
  return errors;
}

template <int kD>
int check_copies() {
  using F = prope::FwdTraits<kD, false>;
  using B = prope::BwdTraits<kD, true>;
  int e = 0;
  e += check_rows<typename F::GmemTiledCopy, F::kNThreads>("fwd copy Q", Shape<Int<F::kBlockM>, Int<kD>>{});
  e += check_rows<typename F::GmemTiledCopy, F::kNThreads>("fwd copy KV", Shape<Int<F::kBlockN>, Int<kD>>{});
  e += check_rows<typename F::GmemTiledCopyO, F::kNThreads>("fwd store O", Shape<Int<F::kBlockM>, Int<kD>>{});
  e += check_rows<typename B::GmemTiledCopy, B::kNThreads>("bwd copy Q", Shape<Int<B::kBlockM>, Int<kD>>{});
  e += check_rows<typename B::GmemTiledCopy, B::kNThreads>("bwd copy KV", Shape<Int<B::kBlockN>, Int<kD>>{});
  e += check_rows<typename B::GmemTiledCopyO, B::kNThreads>("bwd store dK", Shape<Int<B::kBlockN>, Int<kD>>{});
  e += check_transpose<typename F::SmemLayoutKV, typename F::SmemLayoutVt>("fwd Vt");
  e += check_transpose<typename B::SmemLayoutQ, typename B::SmemLayoutQt>("bwd Qt");
  e += check_transpose<typename B::SmemLayoutKV, typename B::SmemLayoutKt>("bwd Kt");
  e += check_transpose<typename B::SmemLayoutPdS, typename B::SmemLayoutPdSt>("bwd PdSt");
  return e;
}

// every element of an (M, N) tile owned by exactly one (thread, value) of the tiled MMA
template <class Mma, class ShapeMN>
int check_cover(const char* name, int threads, ShapeMN shape) {
  Mma mma;
  constexpr int M = decltype(size<0>(shape))::value, N = decltype(size<1>(shape))::value;
  std::vector<int> seen(M * N, 0);
  for (int tid = 0; tid < threads; ++tid) {
    Tensor c = mma.get_thread_slice(tid).partition_C(make_identity_tensor(shape));
    for (int i = 0; i < size(c); ++i) seen[get<0>(c(i)) * N + get<1>(c(i))]++;
  }
  int errors = 0;
  for (int x : seen) if (x != 1 && errors++ < 5) std::printf("%s: element owned %d times\n", name, x);
  std::printf("%-12s %s\n", name, errors ? "FAILED" : "ok");
  return errors;
}

// Lt(j, i, ...) == L(i, j, ...) over a rank-2 or rank-3 (stages) smem layout
template <class L, class Lt>
int check_transpose_staged(const char* name) {
  L l;
  Lt lt;
  int errors = 0;
  int S = 1;
  if constexpr (decltype(rank(l))::value == 3) S = size<2>(l);
  for (int st = 0; st < S; ++st)
    for (int i = 0; i < size<0>(l); ++i)
      for (int j = 0; j < size<1>(l); ++j) {
        bool same;
        if constexpr (decltype(rank(l))::value == 3) same = l(i, j, st) == lt(j, i, st);
        else same = l(i, j) == lt(j, i);
        if (!same && errors++ < 5) std::printf("%s: (%d,%d,%d) differs\n", name, i, j, st);
      }
  std::printf("%-12s %s\n", name, errors ? "FAILED" : "ok");
  return errors;
}

template <class Tr>
int check_sm90_bwd() {
  constexpr int kBM = Tr::kBlockM, kBN = Tr::kBlockN, kD = Tr::kHeadDim, T = Tr::kConsumerThreads;
  int e = 0;
  e += check_cover<typename Tr::MmaSdP>("bwd90 S", T, Shape<Int<kBM>, Int<kBN>>{});
  e += check_cover<typename Tr::MmadKV>("bwd90 dKV", T, Shape<Int<kBN>, Int<kD>>{});
  e += check_transpose_staged<typename Tr::SmemLayoutQ, typename Tr::SmemLayoutQt>("bwd90 Qt");
  e += check_transpose_staged<typename Tr::SmemLayoutP, typename Tr::SmemLayoutPt>("bwd90 Pt");
  e += check_rows<typename Tr::GmemTiledCopyO, T>("bwd90 dK", Shape<Int<kBN>, Int<kD>>{});
  return e;
}

// The fused backward's dQ: its slices' MMA covers a (kBM, kDqCols) slice once; K^T of slice s is
// the slice layout at offset s * kBN * kDqCols of the K tile (the kernel's B descriptors); the
// accumulator order the atomics write and the postprocess reads back (values 4j, 4j+1 and
// 4j+2, 4j+3 of a thread: column pairs (c, c+1), c even, of one row) covers the whole
// (kBM, d) tile of fp32 exactly once.
template <class Tr>
int check_sm90_fused_dq(const char* name) {
  constexpr int kBM = Tr::kBlockM, kBN = Tr::kBlockN, kD = Tr::kHeadDim, T = Tr::kConsumerThreads;
  constexpr int kCols = Tr::kDqCols, kSl = Tr::kDqSlices;
  int e = check_cover<typename Tr::MmadQ>("bwd90 dQ", T, Shape<Int<kBM>, Int<kCols>>{});
  typename Tr::SmemLayoutK lk;
  typename Tr::SmemLayoutKtSlice lkt;
  for (int sl = 0; sl < kSl; ++sl)
    for (int n = 0; n < kBN; ++n)
      for (int c = 0; c < kCols; ++c)
        if (lk(n, sl * kCols + c) != sl * kBN * kCols + lkt(c, n) && e++ < 5)
          std::printf("%s: K^T slice %d (%d,%d) is not at the slice offset\n", name, sl, c, n);
  typename Tr::MmadQ mma;
  std::vector<int> seen(kBM * kD, 0), slot(size_t(kBM) * kD, -1);
  for (int sl = 0; sl < kSl; ++sl)
    for (int tid = 0; tid < T; ++tid) {
      Tensor c = mma.get_thread_slice(tid).partition_C(make_identity_tensor(Shape<Int<kBM>, Int<kCols>>{}));
      if (int(size(c)) != Tr::kDqPerThread && e++ < 5) std::printf("%s: %d values a thread\n", name, int(size(c)));
      for (int j = 0; j < Tr::kDqPerThread / 4; ++j)
        for (int v = 0; v < 4; ++v) {
          const int row = get<0>(c(4 * j + v)), col = sl * kCols + get<1>(c(4 * j + v));
          seen[row * kD + col]++;
          slot[row * kD + col] = (sl * (kBM * kCols / 4) + j * T + tid) * 4 + v;  // float index
          if (v % 2 == 1) {
            const int r0 = get<0>(c(4 * j + v - 1)), c0 = sl * kCols + get<1>(c(4 * j + v - 1));
            if ((r0 != row || c0 + 1 != col || c0 % 2 != 0) && e++ < 5)
              std::printf("%s: thread %d values %d,%d are not a column pair\n", name, tid, 4 * j + v - 1, 4 * j + v);
          }
        }
    }
  std::vector<int> used(kBM * kD, 0);
  for (int i = 0; i < kBM * kD; ++i) {
    if (seen[i] != 1 && e++ < 5) std::printf("%s: dQ element %d written %d times\n", name, i, seen[i]);
    if (slot[i] >= 0 && slot[i] < kBM * kD) used[slot[i]]++;
    else if (e++ < 5) std::printf("%s: dQ element %d at float %d, outside the tile\n", name, i, slot[i]);
  }
  for (int i = 0; i < kBM * kD; ++i)
    if (used[i] != 1 && e++ < 5) std::printf("%s: accumulator float %d used %d times\n", name, i, used[i]);
  std::printf("%-12s %s\n", name, e ? "FAILED" : "ok");
  return e;
}

// zero_rows_from's address formula. The tiles are tile_to_shape of the 128-byte K-major swizzle
// atom: an unswizzled layout (checked here) under the hardware's 128-byte swizzle of the byte
// address, which XORs the 16-byte chunk bits [4:6] with the bits [7:9] above them and so keeps
// every 128-byte span in place. If element (r, c, s) is at unswizzled offset
// s * rows * cols + ((c / 64) * rows + r) * 64 + c % 64, the 128 bytes of row r in atom column
// c / 64 are one span, and zeroing those spans zeroes exactly rows r.
template <class L>
int check_row_spans(const char* name) {
  static_assert(std::is_same_v<decltype(L{}.layout_a()), cute::Swizzle<3, 4, 3>>,
                "the 128-byte swizzle (16-byte chunks within 128-byte spans)");
  auto l = L{}.layout_b();  // the layout under the swizzle
  constexpr int R = decltype(size<0>(l))::value, C = decltype(size<1>(l))::value;
  int S = 1;
  if constexpr (decltype(rank(l))::value == 3) S = size<2>(l);
  int e = 0;
  for (int st = 0; st < S; ++st)
    for (int r = 0; r < R; ++r)
      for (int c = 0; c < C; ++c) {
        int off;
        if constexpr (decltype(rank(l))::value == 3) off = l(r, c, st);
        else off = l(r, c);
        if (off != st * R * C + ((c / 64) * R + r) * 64 + c % 64 && e++ < 5)
          std::printf("%s: (%d,%d,%d) at unswizzled offset %d\n", name, r, c, st, off);
      }
  std::printf("%-12s %s\n", name, e ? "FAILED" : "ok");
  return e;
}

// sw128_chunk_bytes (rotate_tile_chunks' smem address): element (r, c) of a 1024-byte aligned tile is
// at byte 2 * offset under the 128-byte swizzle of the byte address (bits [4:6] ^= bits [7:9];
// CuTe applies the atom's Swizzle<3,4,3> to the smem pointer's bytes). Every element of the chunk
// at (r, col) must be its lane's 2 bytes at sw128_chunk_bytes(r, col) + 2 * lane. Then the
// cos/sin table's columns (cs_table_lo/_w) cover every rotated pair of every run PRoPESpec
// gives, with whole chunks.
template <class L>
int check_q_chunks(const char* name) {
  static_assert(std::is_same_v<decltype(L{}.layout_a()), cute::Swizzle<3, 4, 3>>);
  auto l = L{}.layout_b();
  constexpr int R = decltype(size<0>(l))::value, C = decltype(size<1>(l))::value;
  int e = 0;
  for (int r = 0; r < R; ++r)
    for (int c = 0; c < C; ++c) {
      const uint32_t b = uint32_t(2 * l(r, c));
      const uint32_t sw = b ^ (((b >> 7) & 7u) << 4);
      const uint32_t want = prope::sw128_chunk_bytes<R>(r, c & ~7) + 2 * (c & 7);
      if (sw != want && e++ < 5) std::printf("%s: (%d,%d) at byte %u, chunk formula %u\n", name, r, c, sw, want);
    }
  for (int a0 = 0; a0 < 256; ++a0)
    for (int nr = 1; a0 + nr <= 256; ++nr) {
      const int lo = prope::cs_table_lo(a0), w = prope::cs_table_w(a0, nr);
      if ((lo % 8 || w % 8 || lo > a0 || lo + w < a0 + nr || w - nr >= 16 || lo + 8 <= a0) && e++ < 5)
        std::printf("%s: run (%d, %d) table columns [%d, %d)\n", name, a0, nr, lo, lo + w);
    }
  // ChunkItems: the threads (256: the SM90 consumers; 128: the SM80 forward) visit every (row,
  // chunk) of any row count once
  for (int nt : {128, 256})
  for (int nchunk = 1; nchunk <= 32; ++nchunk)
    for (int rows : {1, 7, 64, 127, R}) {
      std::vector<int> seen(rows * nchunk, 0);
      for (int tid = 0; tid < nt; ++tid)
        for (prope::ChunkItems it(tid, nt, nchunk); it.r < rows; it.next()) {
          if (it.c < 0 || it.c >= nchunk || (it.r * nchunk + it.c) % nt != tid) { e++; break; }
          seen[it.r * nchunk + it.c]++;
        }
      for (int i = 0; i < rows * nchunk; ++i)
        if (seen[i] != 1 && e++ < 5) std::printf("%s: %d chunks, %d rows: item %d taken %d times\n", name, nchunk, rows, i, seen[i]);
    }
  std::printf("%-12s %s\n", name, e ? "FAILED" : "ok");
  return e;
}

// The SM80 forward's Q tile: its swizzle (Swizzle<3,3,3> on element offsets, the same 16-byte
// chunk permutation) is part of the layout, so element (r, c) is at byte 2 * layout(r, c).
template <class L>
int check_q_chunks_sm80(const char* name) {
  constexpr int R = decltype(size<0>(L{}))::value, C = decltype(size<1>(L{}))::value;
  int e = 0;
  for (int r = 0; r < R; ++r)
    for (int c = 0; c < C; ++c) {
      const uint32_t b = uint32_t(2 * L{}(r, c));
      const uint32_t want = prope::sw128_chunk_bytes<R>(r, c & ~7) + 2 * (c & 7);
      if (b != want && e++ < 5) std::printf("%s: (%d,%d) at byte %u, chunk formula %u\n", name, r, c, b, want);
    }
  std::printf("%-12s %s\n", name, e ? "FAILED" : "ok");
  return e;
}

// bwd_tile: the tiles of different sequences never overlap and stay below bwd_tiles(), for
// random packings (empty sequences, lengths around multiples of 64, a start past 0).
int check_bwd_tiles() {
  std::mt19937 rng(7);
  int e = 0;
  for (int trial = 0; trial < 2000; ++trial) {
    const int n = 1 + int(rng() % 9);
    std::vector<int> cu(n + 1);
    cu[0] = int(rng() % 3) * 37;
    for (int b = 0; b < n; ++b) {
      const int pick = int(rng() % 5);
      const int len = pick == 0 ? 0 : pick == 1 ? 64 * int(1 + rng() % 4) + int(rng() % 3) - 1 : int(rng() % 300);
      cu[b + 1] = cu[b] + (len < 0 ? 0 : len);
    }
    const int64_t total = cu[n] + int(rng() % 100);
    const int64_t limit = prope::bwd_tiles(total, n);
    int64_t prev_last = -1;
    for (int b = 0; b < n; ++b) {
      const int len = cu[b + 1] - cu[b];
      if (len == 0) continue;
      const int64_t first = prope::bwd_tile(cu[b], b, 0), last = prope::bwd_tile(cu[b], b, (len + 63) / 64 - 1);
      if ((first <= prev_last || last >= limit) && e++ < 5)
        std::printf("bwd_tile: trial %d sequence %d tiles [%lld, %lld] (previous last %lld, limit %lld)\n",
                    trial, b, (long long)first, (long long)last, (long long)prev_last, (long long)limit);
      prev_last = last;
    }
  }
  std::printf("%-12s %s\n", "bwd tiles", e ? "FAILED" : "ok");
  return e;
}

// SM90 forward, and the SM90 backward's dQ kernel (same structure: S = Q K^T SS, then an RS
// wgmma whose A is S's accumulator re-viewed, B the transposed view of the staged K or V): the
// wgmma accumulator views over the consumer warpgroups' threads.
template <class Tr, class MmaS, class MmaO, class LK, class LKt>
int check_sm90_views(const char* name) {
  constexpr int kBM = Tr::kBlockM, kBN = Tr::kBlockN, kD = Tr::kHeadDim;
  constexpr int kThreads = Tr::kConsumerThreads;
  MmaS mma_qk;
  MmaO mma_pv;
  int errors = 0;
  auto check_rowcol = [&](auto& mma, auto shape_mn, const char* what) {
    constexpr int M = decltype(size<0>(shape_mn))::value, N = decltype(size<1>(shape_mn))::value;
    std::vector<int> owner(M * N, -1);
    std::vector<std::set<int>> row_threads(M);
    for (int tid = 0; tid < kThreads; ++tid) {
      Tensor c = mma.get_thread_slice(tid).partition_C(make_identity_tensor(shape_mn));
      Tensor rc = make_tensor(c.data(), prope::acc_rowcol_sm90(c.layout()));
      for (int i = 0; i < size<0>(rc); ++i) {
        const int row = get<0>(rc(i, 0));
        for (int j = 0; j < size<1>(rc); ++j) {
          const int r = get<0>(rc(i, j)), col = get<1>(rc(i, j));
          if (r != row && errors++ < 5) std::printf("%s %s: tid %d row-view %d mixes rows\n", name, what, tid, i);
          if (owner[r * N + col] != -1 && errors++ < 5) std::printf("%s %s: (%d,%d) owned twice\n", name, what, r, col);
          owner[r * N + col] = tid;
          row_threads[r].insert(tid);
        }
      }
      // the lse writer: the lane holding column 0 of a row
      if (get<1>(rc(0, 0)) == 0 && (tid % 4) != 0 && errors++ < 5)
        std::printf("%s %s: tid %d holds column 0\n", name, what, tid);
    }
    for (int r = 0; r < M; ++r) {
      const auto& st = row_threads[r];
      bool quad = st.size() == 4;
      if (quad) { const int q0 = *st.begin() / 4; for (int t : st) quad &= (t / 4 == q0); }
      if (!quad && errors++ < 5) std::printf("%s %s: row %d is not held by exactly one quad\n", name, what, r);
    }
    for (int x : owner) if (x < 0 && errors++ < 5) std::printf("%s %s: element not owned\n", name, what);
  };
  check_rowcol(mma_qk, Shape<Int<kBM>, Int<kBN>>{}, "S");
  check_rowcol(mma_pv, Shape<Int<kBM>, Int<kD>>{}, "O");

  for (int tid = 0; tid < kThreads; ++tid) {
    Tensor c = mma_qk.get_thread_slice(tid).partition_C(make_identity_tensor(Shape<Int<kBM>, Int<kBN>>{}));
    Tensor as_a = make_tensor(c.data(), prope::acc_to_a_sm90(c.layout()));
    Tensor a = mma_pv.get_thread_slice(tid).partition_A(make_identity_tensor(Shape<Int<kBM>, Int<kBN>>{}));
    if (size(as_a) != size(a) || size<2>(as_a) != size<2>(a)) {
      if (errors++ < 5) std::printf("%s: acc_to_a_sm90 shape mismatch\n", name);
      continue;
    }
    for (int k = 0; k < size<2>(a); ++k)
      for (int i = 0; i < size(a(_, _, k)); ++i) {
        auto x = as_a(_, _, k)(i), y = a(_, _, k)(i);
        if ((get<0>(x) != get<0>(y) || get<1>(x) != get<1>(y)) && errors++ < 5)
          std::printf("%s: tid %d k %d elem %d: P at (%d,%d) but A expects (%d,%d)\n", name, tid, k, i,
                      int(get<0>(x)), int(get<1>(x)), int(get<0>(y)), int(get<1>(y)));
      }
  }
  // V^T (K^T) view: element (d, key, stage) is V's (key, d, stage)
  {
    LK lv;
    LKt lt;
    for (int st = 0; st < Tr::kStages; ++st)
      for (int i = 0; i < kBN; ++i)
        for (int j = 0; j < kD; ++j)
          if (lv(i, j, st) != lt(j, i, st) && errors++ < 5)
            std::printf("%s: Vt (%d,%d,%d) differs\n", name, j, i, st);
  }
  // the dQ kernel's fp32 store: row-view columns j, j+1 (j even) are the columns c, c+1 of one
  // row with c even (8-byte aligned float2)
  for (int tid = 0; tid < kThreads; ++tid) {
    Tensor c = mma_pv.get_thread_slice(tid).partition_C(make_identity_tensor(Shape<Int<kBM>, Int<kD>>{}));
    Tensor rc = make_tensor(c.data(), prope::acc_rowcol_sm90(c.layout()));
    for (int i = 0; i < size<0>(rc); ++i)
      for (int j = 0; j + 1 < size<1>(rc); j += 2)
        if ((get<0>(rc(i, j)) != get<0>(rc(i, j + 1)) || get<1>(rc(i, j + 1)) != get<1>(rc(i, j)) + 1 ||
             get<1>(rc(i, j)) % 2 != 0) && errors++ < 5)
          std::printf("%s: tid %d (%d,%d) is not a column pair\n", name, tid, i, j);
  }
  std::printf("%-12s %s\n", name, errors ? "FAILED" : "ok");
  return errors;
}

template <class Tr>
int check_sm90(const char* name) {
  int errors = check_sm90_views<Tr, typename Tr::MmaQK, typename Tr::MmaPV, typename Tr::SmemLayoutK,
                                typename Tr::SmemLayoutVt>(name);
  errors += check_rows<typename Tr::GmemTiledCopyO, Tr::kConsumerThreads>(
      "sm90 store O", Shape<Int<Tr::kBlockM>, Int<Tr::kHeadDim>>{});
  return errors;
}

// SM90 backward's dQ kernel: S/dP and dQ accumulators, dS re-viewed as dQ's A, K^T of the K stages
template <class Tr>
int check_sm90_dq(const char* name) {
  static_assert(Tr::kSmemBytes <= 227 * 1024, "dQ kernel over the sm_90 shared memory limit");
  std::printf("%-12s smem %d bytes (%d keys per step)\n", name, Tr::kSmemBytes, Tr::kBlockN);
  return check_sm90_views<Tr, typename Tr::MmaSdP, typename Tr::MmadQ, typename Tr::SmemLayoutK,
                          typename Tr::SmemLayoutKt>(name);
}

int main() {
  int e = 0;
  e += check_config<prope::FwdTraits<64, false>>("fwd f16 64");
  e += check_config<prope::FwdTraits<128, false>>("fwd f16 128");
  e += check_config<prope::FwdTraits<256, false>>("fwd f16 256");
  e += check_config<prope::FwdTraits<64, true>>("fwd bf16 64");
  e += check_config<prope::FwdTraits<128, true>>("fwd bf16 128");
  e += check_config<prope::FwdTraits<256, true>>("fwd bf16 256");
  e += check_copies<64>() + check_copies<128>() + check_copies<256>();
  e += check_sm90<prope::FwdSm90Traits<64, false>>("sm90 f16 64");
  e += check_sm90<prope::FwdSm90Traits<128, false>>("sm90 f16 128");
  e += check_sm90<prope::FwdSm90Traits<256, false>>("sm90 f16 256");
  e += check_sm90<prope::FwdSm90Traits<64, true>>("sm90 bf16 64");
  e += check_sm90<prope::FwdSm90Traits<128, true>>("sm90 bf16 128");
  e += check_sm90<prope::FwdSm90Traits<256, true>>("sm90 bf16 256");
  e += check_sm90_bwd<prope::BwdSm90Traits<64, false>>() + check_sm90_bwd<prope::BwdSm90Traits<128, true>>();
  e += check_sm90_bwd<prope::BwdSm90Traits<256, false>>();
  // the split backward's dK/dV tiles (head_dim 128: 64 keys, d split over the warpgroups)
  e += check_sm90_bwd<prope::BwdSm90Traits<64, true, true>>() + check_sm90_bwd<prope::BwdSm90Traits<128, true, true>>();
  e += check_sm90_bwd<prope::BwdSm90Traits<256, true, true>>();
  e += check_sm90_fused_dq<prope::BwdSm90Traits<64, false>>("fused dQ 64");
  e += check_sm90_fused_dq<prope::BwdSm90Traits<128, true>>("fused dQ 128");
  e += check_sm90_fused_dq<prope::BwdSm90Traits<256, true>>("fused dQ 256");
  e += check_sm90_fused_dq<prope::BwdSm90Traits<256, false>>("fused dQ f16 256");
  e += check_q_chunks<prope::FwdSm90Traits<64, true>::SmemLayoutQ>("q chunks 64");
  e += check_q_chunks<prope::FwdSm90Traits<128, false>::SmemLayoutQ>("q chunks 128");
  e += check_q_chunks<prope::FwdSm90Traits<256, true>::SmemLayoutQ>("q chunks 256");
  e += check_q_chunks_sm80<prope::FwdTraits<64, true>::SmemLayoutQ>("sm80 q chunks 64");
  e += check_q_chunks_sm80<prope::FwdTraits<128, false>::SmemLayoutQ>("sm80 q chunks 128");
  e += check_q_chunks_sm80<prope::FwdTraits<256, true>::SmemLayoutQ>("sm80 q chunks 256");
  e += check_q_chunks<prope::BwdSm90Traits<64, true>::SmemLayoutK>("dk chunks 64");
  e += check_q_chunks<prope::BwdSm90Traits<128, false>::SmemLayoutK>("dk chunks 128");
  e += check_q_chunks<prope::BwdSm90Traits<256, true>::SmemLayoutK>("dk chunks 256");
  e += check_bwd_tiles();
  e += check_window_ranges();
  e += check_row_spans<prope::FwdSm90Traits<64, true>::SmemLayoutK>("zero fwd V 64");
  e += check_row_spans<prope::FwdSm90Traits<128, true>::SmemLayoutK>("zero fwd V 128");
  e += check_row_spans<prope::FwdSm90Traits<256, true>::SmemLayoutK>("zero fwd V 256");
  e += check_row_spans<prope::BwdSm90Traits<64, true>::SmemLayoutQ>("zero bwd Q 64");
  e += check_row_spans<prope::BwdSm90Traits<256, true>::SmemLayoutQ>("zero bwd Q 256");
  e += check_row_spans<prope::BwdSm90Traits<128, true>::SmemLayoutK>("zero bwd K 128");
  e += check_row_spans<prope::BwdSm90Traits<256, true>::SmemLayoutK>("zero bwd K 256");
  e += check_row_spans<prope::BwdSm90Traits<128, true, true>::SmemLayoutQ>("zero split Q 128");
  e += check_row_spans<prope::BwdDqSm90Traits<64, true>::SmemLayoutK>("zero dQ K 64");
  e += check_row_spans<prope::BwdDqSm90Traits<256, true>::SmemLayoutK>("zero dQ K 256");
  e += check_sm90_dq<prope::BwdDqSm90Traits<64, false>>("sm90 dQ f16 64");
  e += check_sm90_dq<prope::BwdDqSm90Traits<128, true>>("sm90 dQ bf16 128");
  e += check_sm90_dq<prope::BwdDqSm90Traits<256, true>>("sm90 dQ bf16 256");
  e += check_sm90_dq<prope::BwdDqSm90Traits<256, false>>("sm90 dQ f16 256");
  std::printf("%s\n", e ? "FAILED" : "PASSED");
  return e ? 1 : 0;
}
