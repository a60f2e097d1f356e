// Parameter blocks and launcher declarations shared by the kernels, the torch binding and the
// C++ test. No CUDA/CuTe/torch headers here beyond cuda_runtime, so host code can include it.
//
// Layout (same as the Triton backend): tokens of all sequences packed along dim 0.
//   q        (total, q_heads,  d)   row stride q_row, head stride q_head, unit stride in d
//   k, v     (total, kv_heads, d)   q_heads % kv_heads == 0, q head h reads kv head h / group
//   cu_seqlens (num_seqs + 1) int32; sequence b is rows cu_seqlens[b] .. cu_seqlens[b+1]-1
//   positions (total) int64; lse, delta (q_heads, total) float32, natural log
// The rotation is described by the tables of rotary.py: num_rot pairs (pair_a[i], pair_b[i])
// with frequency pair_freq[i] (float64); dims in no pair are the identity and are never touched.
#pragma once

#include <cstdint>
#include <cuda_runtime.h>

#if defined(__CUDACC__)
#define PROPE_HOST_DEVICE __host__ __device__
#else
#define PROPE_HOST_DEVICE
#endif

namespace prope {

struct RotTables {
  const int32_t* pair_a = nullptr;     // (num_rot,)
  const int32_t* pair_b = nullptr;     // (num_rot,)
  const double* pair_freq = nullptr;   // (num_rot,)
  const int32_t* identity = nullptr;   // (num_id,) dims copied as they are
  int num_rot = 0;
  int num_id = 0;
  // One run of pairs (PRoPESpec.chunk_run(); -1: none, or not known): pair i is the dims
  // (run_a0 + i, run_a0 + i + run_b_off) with run_b_off % 8 == 0, as the "half" layout gives.
  // The forwards (Q; SM80 and SM90) and the SM90 fused backward (dK back) then rotate in 16-byte
  // chunks with cos/sin read from a table the K pass writes (cs_table_*), instead of one angle
  // per element. The binding checks the geometry.
  int run_a0 = -1;
  int run_b_off = 0;
};

// The cos/sin table of a run: per token, cos of columns [lo, lo + w) then their sin (float32,
// 2 * w per token), lo = run_a0 rounded down to 8 and w a multiple of 8, so that every 16-byte
// chunk of 8 rotated dims has its 8 cos and 8 sin in two 32-byte spans. Columns of no pair
// (the chunks' edges) hold cos 1, sin 0. Host code too: csrc/tests/test_layouts.cu.
PROPE_HOST_DEVICE inline int cs_table_lo(int run_a0) { return run_a0 & ~7; }
PROPE_HOST_DEVICE inline int cs_table_w(int run_a0, int num_rot) {
  return ((run_a0 + num_rot + 7) & ~7) - (run_a0 & ~7);
}

struct FwdParams {
  const void* q = nullptr;   // query (NOT rotated: the kernel rotates the Q tile on load)
  const void* k = nullptr;   // key, ALREADY rotated (short-lived buffer made by run_rope)
  const void* v = nullptr;
  void* o = nullptr;         // (total, q_heads, d)
  float* lse = nullptr;      // (q_heads, total)
  int64_t q_row, q_head, k_row, k_head, v_row, v_head, o_row, o_head;
  const int32_t* cu_seqlens = nullptr;
  const int64_t* positions = nullptr;
  int64_t total = 0;
  int num_seqs = 0, max_seqlen = 0, q_heads = 0, kv_heads = 0;
  float scale = 1.f;         // softmax scale
  RotTables rot;             // used when num_rot > 0
  bool causal = true;
  // SM90 only (the SM80 kernels refuse them): sliding window, row i sees key j iff
  // i - window_left <= j <= i + window_right (-1: unbounded side; causal: right is 0), and
  // logit softcapping, score = softcap * tanh(scale * q.k / softcap) (0: off).
  int window_left = -1, window_right = -1;
  float softcap = 0.f;
  // SM90 forward variant (fwd_sm90.h, csrc/README.md): bit 0 the overlap mainloop (else basic),
  // bit 1 the longest-first grid order ("lpt"); 0 = the kernel as first validated. SM80: unused.
  int sm90_fwd = 0;
  // rot.run_a0 >= 0: the K pass's cos/sin table (total, 2 * cs_table_w) float32, Q rotated from
  // it in 16-byte chunks (rotate_tile_chunks); null: one angle per element (rotate_tile_smem).
  const float* q_cs = nullptr;
};

// Backward on pre-rotated q/k (the caller rotates them into short-lived buffers and applies the
// inverse rotation to dq and dk afterwards, except where a field below says the kernels do it).
struct BwdParams {
  const void* q = nullptr;   // rotated q
  const void* k = nullptr;   // rotated k
  const void* v = nullptr;
  const void* dout = nullptr;
  const float* lse = nullptr;    // (q_heads, total)
  const float* delta = nullptr;  // (q_heads, total): rowsum(dO * O) - dlse (SM80, SM90 split)
  float* dq_accum = nullptr;     // (total, q_heads, d) float32, zero-initialised, contiguous
                                 // (SM90 fused: the tiled layout of bwd_tiles(), see below)
  void* dk = nullptr;            // (total, kv_heads, d) w.r.t. the rotated k, scale included
  void* dv = nullptr;            // (total, kv_heads, d)
  int64_t q_row, q_head, k_row, k_head, v_row, v_head, do_row, do_head;
  int64_t dk_row, dk_head, dv_row, dv_head;
  const int32_t* cu_seqlens = nullptr;
  int64_t total = 0;
  int num_seqs = 0, max_seqlen = 0, q_heads = 0, kv_heads = 0;
  float scale = 1.f;
  bool causal = true;
  int window_left = -1, window_right = -1;  // as FwdParams (SM90 only)
  float softcap = 0.f;                      // as FwdParams (SM90 fused backward only)
  // SM90 only: true = the split backward (a dK/dV kernel and a q-stationary dQ kernel, no
  // atomics, deterministic; 7 GEMMs per tile pair), false = the fused backward (one kernel, 5
  // GEMMs, dQ by float4 atomics into the tiled accumulator; run_attn_bwd_sm90 then also runs
  // the pre- and postprocess, so the fields below are its inputs and outputs).
  bool sm90_split = false;
  // SM90 fused only:
  const void* out = nullptr;     // forward output, for delta = rowsum(dO * O) - dlse
  int64_t o_row = 0, o_head = 0;
  const float* dlse = nullptr;   // (q_heads, total) or null
  float* lse2_tiled = nullptr;   // bwd_tiles() x q_heads x kBwdTileM: lse * log2(e), +inf past the sequence
  float* delta_tiled = nullptr;  // the same layout: delta, 0 past the sequence
  void* dq = nullptr;            // (total, q_heads, d) output dtype: scale * inverse-rotated dQ
  int64_t dq_row = 0, dq_head = 0;
  const int64_t* positions = nullptr;  // (total,)
  RotTables rot;                 // num_rot > 0: dK and dQ are rotated back in the kernels
  // rot.run_a0 >= 0: the K pass's cos/sin table (as FwdParams::q_cs), dK rotated back from it
  // in 16-byte chunks (rotate_tile_chunks); null: one pair at a time with its angle
  const float* k_cs = nullptr;
};

// The SM90 fused backward's per-(q block, q head) buffers: q block m of sequence b (64 rows) is
// tile cu_seqlens[b] / 64 + b + m. Tiles of different sequences never overlap (sequence b's
// first tile is past sequence b-1's last), and there are at most total / 64 + num_seqs of them.
constexpr int kBwdTileM = 64;
inline int64_t bwd_tiles(int64_t total, int num_seqs) { return total / kBwdTileM + num_seqs; }
PROPE_HOST_DEVICE inline int64_t bwd_tile(int32_t seq_start, int b, int m_block) {
  return int64_t(seq_start / kBwdTileM) + b + m_block;
}

// Block ranges of the SM90 kernels under a sliding window (causal is the window (-1, 0)); wl, wr
// are a sequence's bounds as window_bounds() gives them (never negative). Host code too:
// csrc/tests/test_layouts.cu checks them against brute force.
struct WindowBounds { int wl, wr; };
// An unbounded side, or one >= seqlen (which sees as far), becomes seqlen + 256: past every key
// of the sequence from every row of any tile (tiles <= 256 rows), so it adds no block and no mask,
// and nothing overflows (a side near INT32_MAX would wrap m0 + bm - 1 + wr).
PROPE_HOST_DEVICE inline WindowBounds window_bounds(int left, int right, bool causal, int seqlen) {
  const int big = seqlen + 256;
  return {left < 0 || left >= seqlen ? big : left,
          causal ? 0 : (right < 0 || right >= seqlen ? big : right)};
}
// Key blocks [lo, hi) of bn keys that query rows [m0, m0 + bm) can see (rows past seqlen may be
// included; keys never past it). Blocks outside are never loaded.
PROPE_HOST_DEVICE inline void key_block_range(int m0, int bm, int bn, int seqlen, WindowBounds w,
                                              int& lo, int& hi) {
  const int first = m0 - w.wl;
  lo = first > 0 ? first / bn : 0;
  const int last = m0 + bm - 1 + w.wr;  // last key any row sees (before the sequence's end)
  const int n_blocks = (seqlen + bn - 1) / bn;
  hi = last / bn + 1 < n_blocks ? last / bn + 1 : n_blocks;
}
// Query blocks [lo, hi) of bm rows that see some key of [n0, n0 + bn).
PROPE_HOST_DEVICE inline void query_block_range(int n0, int bn, int bm, int seqlen, WindowBounds w,
                                                int& lo, int& hi) {
  const int first = n0 - w.wr;
  lo = first > 0 ? first / bm : 0;
  const int last = n0 + bn - 1 + w.wl;
  const int m_blocks = (seqlen + bm - 1) / bm;
  hi = last / bm + 1 < m_blocks ? last / bm + 1 : m_blocks;
}
// Whether tile (rows [m0, m0 + bm), keys [n0, n0 + bn)) needs the score mask: a key past the
// sequence, or a (row, key) pair outside the window. Tiles where it is false are seen whole.
PROPE_HOST_DEVICE inline bool tile_needs_mask(int m0, int bm, int n0, int bn, int seqlen, WindowBounds w) {
  return n0 + bn > seqlen || n0 + bn - 1 > m0 + w.wr || n0 < m0 + bm - 1 - w.wl;
}

enum class DType : int { f32 = 0, f16 = 1, bf16 = 2 };

// y[t, h, :] = rotate(x[t, h, :] * mul, positions[t]) (inverse rotation when conjugate).
// x may alias y (same dtype and strides): then identity dims are not touched at all.
struct RopeParams {
  const void* x = nullptr;
  void* y = nullptr;
  DType x_dtype = DType::f16, y_dtype = DType::f16;
  int64_t total = 0;
  int heads = 0, head_dim = 0;
  int64_t x_row, x_head, y_row, y_head;
  const int64_t* positions = nullptr;
  RotTables rot;
  bool conjugate = false;
  float mul = 1.f;
  float* cs_out = nullptr;  // non-null (rot.run_a0 >= 0, not conjugate): the cos/sin table too,
                            // (total, 2 * cs_table_w) float32, as Fwd/BwdParams read it
};

// delta[h, t] = sum_d dout[t, h, d] * out[t, h, d] - (dlse ? dlse[h, t] : 0)
struct DeltaParams {
  const void* out = nullptr;
  const void* dout = nullptr;
  const float* dlse = nullptr;   // (q_heads, total) or null
  float* delta = nullptr;        // (q_heads, total)
  DType dtype = DType::f16;
  int64_t total = 0;
  int heads = 0, head_dim = 0;
  int64_t o_row, o_head, do_row, do_head;
};

// Rows outside every sequence (t < cu_seqlens[0] or t >= cu_seqlens[num_seqs]) of up to three
// 16-bit (total, heads[i], d) tensors set to zero: the gradients of padding rows.
struct ZeroRowsParams {
  void* x[3] = {nullptr, nullptr, nullptr};  // null: unused
  int64_t row[3] = {0, 0, 0}, head[3] = {0, 0, 0};
  int heads[3] = {0, 0, 0};
  int head_dim = 0;
  int64_t total = 0;
  const int32_t* cu_seqlens = nullptr;
  int num_seqs = 0;
};

// Defined in csrc/kernels/attn_<dtype>_hd<d>.cu (one file per instantiation).
template <bool kBF16, int kHeadDim> cudaError_t run_attn_fwd(const FwdParams& p, cudaStream_t s);
template <bool kBF16, int kHeadDim> cudaError_t run_attn_bwd(const BwdParams& p, cudaStream_t s);
// Dynamic shared memory (bytes) one block of run_attn_fwd / run_attn_bwd takes (the binding
// checks it against the device's limit).
template <bool kBF16, int kHeadDim> int attn_fwd_smem_bytes();
template <bool kBF16, int kHeadDim> int attn_bwd_smem_bytes();
// SM90 forward (wgmma + TMA, warp-specialized), csrc/kernels/attn_sm90_<dtype>_hd<d>.cu; built
// only with an sm_90a target (PROPE_HAS_SM90), runs only on sm_90 devices.
template <bool kBF16, int kHeadDim> cudaError_t run_attn_fwd_sm90(const FwdParams& p, cudaStream_t s);
template <bool kBF16, int kHeadDim> int attn_fwd_sm90_smem_bytes();
// SM90 backward (same files, same conditions); same contract as run_attn_bwd.
template <bool kBF16, int kHeadDim> cudaError_t run_attn_bwd_sm90(const BwdParams& p, cudaStream_t s);
template <bool kBF16, int kHeadDim> int attn_bwd_sm90_smem_bytes();
// Defined in csrc/kernels/rope.cu.
cudaError_t run_rope(const RopeParams& p, cudaStream_t s);
cudaError_t run_bwd_delta(const DeltaParams& p, cudaStream_t s);
cudaError_t run_zero_outside_rows(const ZeroRowsParams& p, cudaStream_t s);

}  // namespace prope
