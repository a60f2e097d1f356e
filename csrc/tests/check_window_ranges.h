// Host check (no GPU, no CuTe) of the SM90 kernels' block ranges under a sliding window
// (params.h: window_bounds, key_block_range, query_block_range, tile_needs_mask) against brute
// force over random shapes: causal or not, windows from 0 to past the sequence, unbounded sides,
// short and odd sequence lengths, every tile size the kernels use. Included by test_layouts.cu.
//   * key_block_range of a q block holds every key a row of the sequence in it sees, and no
//     block without one (blocks outside the window are skipped by the loop bounds);
//   * query_block_range of a key block likewise for the q rows that see its keys;
//   * tile_needs_mask is true exactly when some (row, key) of the tile is outside the window or
//     the key is past the sequence (rows past the sequence count as rows: the kernels never
//     store them), so only edge tiles pay for the mask.
#pragma once

#include <cstdio>
#include <random>

#include "prope_attn/params.h"

inline int check_window_ranges(int trials = 4000, unsigned seed = 1234) {
  std::mt19937 rng(seed);
  auto uni = [&](int lo, int hi) { return std::uniform_int_distribution<int>(lo, hi)(rng); };
  const int tiles[][2] = {{128, 128}, {128, 64}, {64, 128}, {64, 64}, {128, 32}};  // (rows, keys)
  int errors = 0, masked = 0, tiles_seen = 0;
  auto fail = [&](const char* what, int seqlen, bool causal, int left, int right, int bm, int bn, int blk) {
    if (errors++ < 8)
      std::printf("window ranges: %s (seqlen %d causal %d window (%d, %d) tile %dx%d block %d)\n", what,
                  seqlen, int(causal), left, right, bm, bn, blk);
  };
  for (int t = 0; t < trials; ++t) {
    const int seqlen = uni(0, 3) == 0 ? uni(1, 70) : uni(1, 700);
    const bool causal = uni(0, 1);
    // sides: unbounded, small, past the sequence, or near INT32_MAX (the binding accepts it)
    auto side = [&] { const int r = uni(0, 9);
      return r < 2 ? -1 : r == 2 ? 2147483647 - uni(0, 3) : (r < 6 ? uni(0, 40) : uni(0, 800)); };
    const int left_arg = side(), right_arg = side();
    // a side >= seqlen sees as far as an unbounded one from every row of the sequence (and rows
    // past it are zeroed operands, never stored): the definition below treats both alike
    const int left = left_arg >= seqlen ? -1 : left_arg;
    const int right = right_arg >= seqlen ? -1 : right_arg;
    const int bm = tiles[t % 5][0], bn = tiles[t % 5][1];
    const prope::WindowBounds w = prope::window_bounds(left_arg, right_arg, causal, seqlen);
    // the package's definition: row i sees key j iff i - left <= j <= i + right, right capped at
    // 0 when causal, -1 unbounded; plus j inside the sequence
    auto sees = [&](int i, int j) {
      if (j < 0 || j >= seqlen) return false;
      if (left >= 0 && j < int64_t(i) - left) return false;
      const int r = causal ? 0 : right;
      if (r >= 0 && j > int64_t(i) + r) return false;
      return true;
    };
    const int m_blocks = (seqlen + bm - 1) / bm, n_blocks = (seqlen + bn - 1) / bn;
    for (int m = 0; m < m_blocks; ++m) {  // q block m: its key blocks
      int lo, hi;
      prope::key_block_range(m * bm, bm, bn, seqlen, w, lo, hi);
      if (!(0 <= lo && lo < hi && hi <= n_blocks)) { fail("empty or out-of-range key blocks", seqlen, causal, left, right, bm, bn, m); continue; }
      for (int n = 0; n < n_blocks; ++n) {
        bool any = false;
        for (int i = m * bm; i < (m + 1) * bm && i < seqlen; ++i)
          for (int j = n * bn; j < (n + 1) * bn; ++j) any |= sees(i, j);
        if (any != (lo <= n && n < hi)) fail(any ? "visible key block outside the range" : "key block in the range sees nothing", seqlen, causal, left, right, bm, bn, n);
        if (n < lo || n >= hi) continue;
        bool cut = false;  // some (row, key) of the tile not seen (rows past the sequence too)
        for (int i = m * bm; i < (m + 1) * bm; ++i)
          for (int j = n * bn; j < (n + 1) * bn; ++j) cut |= !sees(i, j);
        ++tiles_seen;
        masked += cut;
        if (cut != prope::tile_needs_mask(m * bm, bm, n * bn, bn, seqlen, w)) fail(cut ? "cut tile not masked" : "whole tile masked", seqlen, causal, left, right, bm, bn, n);
      }
    }
    for (int n = 0; n < n_blocks; ++n) {  // key block n: the q blocks that see it
      int lo, hi;
      prope::query_block_range(n * bn, bn, bm, seqlen, w, lo, hi);
      if (!(0 <= lo && lo < hi && hi <= m_blocks)) { fail("empty or out-of-range q blocks", seqlen, causal, left, right, bm, bn, n); continue; }
      for (int m = 0; m < m_blocks; ++m) {
        bool any = false;
        for (int i = m * bm; i < (m + 1) * bm && i < seqlen; ++i)
          for (int j = n * bn; j < (n + 1) * bn; ++j) any |= sees(i, j);
        if (any != (lo <= m && m < hi)) fail(any ? "q block that sees the keys outside the range" : "q block in the range sees nothing", seqlen, causal, left, right, bm, bn, m);
      }
    }
  }
  std::printf("window ranges: %d random shapes, %d visited tiles (%d masked), %d errors\n", trials,
              tiles_seen, masked, errors);
  return errors;
}
