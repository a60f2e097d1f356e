// The launch sequences of csrc/prope_attn/api.h: workspace carving, the one dtype x head_dim
// (x kernel family) dispatch, rotate -> attention -> rotate back. Host code only; the kernels are
// instantiated in attn_<dtype>_hd<d>.cu (SM80) and attn_sm90_<dtype>_hd<d>.cu (SM90).
#include <type_traits>

#include "prope_attn/api.h"

// Head dims compiled in: all three unless the CMake build picked a subset (PROPE_HEAD_DIMS).
#if !defined(PROPE_HAS_HD64) && !defined(PROPE_HAS_HD128) && !defined(PROPE_HAS_HD256)
#define PROPE_HAS_HD64
#define PROPE_HAS_HD128
#define PROPE_HAS_HD256
#endif

namespace prope {

namespace {

constexpr size_t kAlign = 256;
size_t align_up(size_t x) { return (x + kAlign - 1) / kAlign * kAlign; }
size_t esize(DType t) { return t == DType::f32 ? 4 : 2; }

// f(bf16 tag, head_dim tag) for the compiled (dtype, head_dim); cudaErrorInvalidValue otherwise.
template <typename F>
cudaError_t dispatch(DType dt, int d, F&& f) {
  using T = std::true_type;
  using Fl = std::false_type;
  if (dt != DType::f16 && dt != DType::bf16) return cudaErrorInvalidValue;
  const bool bf16 = dt == DType::bf16;
#ifdef PROPE_HAS_HD64
  if (d == 64) return bf16 ? f(T{}, std::integral_constant<int, 64>{}) : f(Fl{}, std::integral_constant<int, 64>{});
#endif
#ifdef PROPE_HAS_HD128
  if (d == 128) return bf16 ? f(T{}, std::integral_constant<int, 128>{}) : f(Fl{}, std::integral_constant<int, 128>{});
#endif
#ifdef PROPE_HAS_HD256
  if (d == 256) return bf16 ? f(T{}, std::integral_constant<int, 256>{}) : f(Fl{}, std::integral_constant<int, 256>{});
#endif
  return cudaErrorInvalidValue;
}

struct Carve {
  char* base;
  size_t off = 0;
  void* take(size_t bytes) {
    void* p = base ? base + off : nullptr;
    off += align_up(bytes);
    return p;
  }
};

// The forward's and backward's buffers, in this order (the *_workspace_bytes functions and the
// launchers carve the same way).
// Forward: the rotated K, and the cos/sin table the kernels rotate Q with when the pairs form a
// run (RopeParams::cs_out; the backward's K pass writes it too, for the SM90 fused kernel's dK).
bool run_table(const AttnProblem& pb) { return pb.rot.num_rot > 0 && pb.rot.run_a0 >= 0; }
size_t table_bytes(const AttnProblem& pb) {
  return size_t(pb.total) * 2 * cs_table_w(pb.rot.run_a0, pb.rot.num_rot) * sizeof(float);
}
struct FwdWs { void* k_rot; float* q_cs; size_t bytes; };
FwdWs fwd_ws(const AttnProblem& pb, void* base) {
  Carve c{static_cast<char*>(base)};
  FwdWs w{};
  w.k_rot = pb.rot.num_rot > 0 ? c.take(size_t(pb.total) * pb.kv_heads * pb.head_dim * esize(pb.dtype)) : nullptr;
  w.q_cs = run_table(pb) ? static_cast<float*>(c.take(table_bytes(pb))) : nullptr;
  w.bytes = c.off;
  return w;
}
// Backward: the SM90 fused path keeps delta, lse * log2(e) and the fp32 dQ accumulator per tile
// of 64 q rows (bwd_tile(): at most total / 64 + num_seqs tiles per head); the others keep delta
// (q_heads, total) and dQ (total, q_heads, d).
bool fused_bwd(const AttnProblem& pb) { return resolve_family(pb) == Family::Sm90 && !pb.sm90_split; }
struct BwdWs { float* delta; float* lse2; float* dq_accum; void* q_rot; void* k_rot; float* k_cs; size_t bytes; };
BwdWs bwd_ws(const AttnProblem& pb, void* base) {
  Carve c{static_cast<char*>(base)};
  BwdWs w{};
  const size_t nq = size_t(pb.total) * pb.q_heads * pb.head_dim;
  const size_t nk = size_t(pb.total) * pb.kv_heads * pb.head_dim;
  if (fused_bwd(pb)) {
    const size_t tile_rows = size_t(bwd_tiles(pb.total, pb.num_seqs)) * kBwdTileM * pb.q_heads;
    w.delta = static_cast<float*>(c.take(tile_rows * sizeof(float)));
    w.lse2 = static_cast<float*>(c.take(tile_rows * sizeof(float)));
    w.dq_accum = static_cast<float*>(c.take(tile_rows * pb.head_dim * sizeof(float)));
  } else {
    w.delta = static_cast<float*>(c.take(size_t(pb.q_heads) * pb.total * sizeof(float)));
    w.dq_accum = static_cast<float*>(c.take(nq * sizeof(float)));
  }
  const bool rot = pb.rot.num_rot > 0;
  w.q_rot = rot ? c.take(nq * esize(pb.dtype)) : nullptr;
  w.k_rot = rot ? c.take(nk * esize(pb.dtype)) : nullptr;
  // the fused kernel's dK rotation back: the K pass's cos/sin table (as the forward's)
  w.k_cs = run_table(pb) && fused_bwd(pb) ? static_cast<float*>(c.take(table_bytes(pb))) : nullptr;
  w.bytes = c.off;
  return w;
}

}  // namespace

bool head_dim_supported(int d) { return d == 64 || d == 128 || d == 256; }

bool sm90_built() {
#ifdef PROPE_HAS_SM90
  return true;
#else
  return false;
#endif
}

// Auto: the SM90 kernels on an sm_90 device when this build has them (validated on an H100,
// 2026-11-26), else the SM80 kernels (compiled for every target). Sm90 asked for where it cannot
// run is refused by the caller (binding.cpp), never silently replaced.
Family resolve_family(const AttnProblem& pb) {
  if (pb.family == Family::Sm80) return Family::Sm80;
  if (pb.sm == 90 && sm90_built()) return Family::Sm90;
  return Family::Sm80;
}

int attn_fwd_smem_bytes(const AttnProblem& pb) {
  int bytes = -1;
  const Family fam = resolve_family(pb);
  dispatch(pb.dtype, pb.head_dim, [&](auto B, auto D) {
#ifdef PROPE_HAS_SM90
    if (fam == Family::Sm90) { bytes = attn_fwd_sm90_smem_bytes<decltype(B)::value, decltype(D)::value>(); return cudaSuccess; }
#endif
    (void)fam;
    bytes = attn_fwd_smem_bytes<decltype(B)::value, decltype(D)::value>();
    return cudaSuccess;
  });
  return bytes;
}

int attn_bwd_smem_bytes(const AttnProblem& pb) {
  int bytes = -1;
  const Family fam = resolve_family(pb);
  dispatch(pb.dtype, pb.head_dim, [&](auto B, auto D) {
#ifdef PROPE_HAS_SM90
    if (fam == Family::Sm90) { bytes = attn_bwd_sm90_smem_bytes<decltype(B)::value, decltype(D)::value>(); return cudaSuccess; }
#endif
    (void)fam;
    bytes = attn_bwd_smem_bytes<decltype(B)::value, decltype(D)::value>();
    return cudaSuccess;
  });
  return bytes;
}

bool attn_bwd_deterministic(const AttnProblem& pb) {
  return resolve_family(pb) == Family::Sm90 && pb.sm90_split;
}

size_t attn_fwd_workspace_bytes(const AttnProblem& pb) { return fwd_ws(pb, nullptr).bytes; }
size_t attn_bwd_workspace_bytes(const AttnProblem& pb) { return bwd_ws(pb, nullptr).bytes; }

cudaError_t rotate(const void* x, DType x_dtype, int64_t x_row, int64_t x_head, void* y,
                   DType y_dtype, int64_t y_row, int64_t y_head, int64_t total, int heads,
                   int head_dim, const int64_t* positions, const RotTables& rot, bool conjugate,
                   float mul, cudaStream_t st, float* cs_out) {
  if (cs_out != nullptr && (rot.run_a0 < 0 || conjugate)) return cudaErrorInvalidValue;
  RopeParams p;
  p.x = x;
  p.y = y;
  p.x_dtype = x_dtype;
  p.y_dtype = y_dtype;
  p.total = total;
  p.heads = heads;
  p.head_dim = head_dim;
  p.x_row = x_row;
  p.x_head = x_head;
  p.y_row = y_row;
  p.y_head = y_head;
  p.positions = positions;
  p.rot = rot;
  p.conjugate = conjugate;
  p.mul = mul;
  p.cs_out = cs_out;
  return run_rope(p, st);
}

#define PROPE_TRY(x)                      \
  do {                                    \
    cudaError_t e_ = (x);                 \
    if (e_ != cudaSuccess) return e_;     \
  } while (0)

// The fields FwdParams and BwdParams share with the problem: sequences, heads, scale, mask.
template <class Params>
void set_problem(Params& p, const AttnProblem& pb) {
  p.cu_seqlens = pb.cu_seqlens;
  p.total = pb.total;
  p.num_seqs = pb.num_seqs;
  p.max_seqlen = pb.max_seqlen;
  p.q_heads = pb.q_heads;
  p.kv_heads = pb.kv_heads;
  p.scale = pb.scale;
  p.causal = pb.causal;
  p.window_left = pb.window_left;
  p.window_right = pb.window_right;
  p.softcap = pb.softcap;
}

bool uses_window_or_softcap(const AttnProblem& pb) {
  return pb.window_left >= 0 || (pb.window_right >= 0 && !pb.causal) || pb.softcap > 0.f;
}

bool window_supported(const AttnProblem& pb, bool backward) {
  if (!uses_window_or_softcap(pb)) return true;
  if (resolve_family(pb) != Family::Sm90) return false;
  return !(backward && pb.sm90_split && pb.softcap > 0.f);
}

cudaError_t attn_fwd(const AttnFwdArgs& a, cudaStream_t st) {
  const AttnProblem& pb = a.pb;
  if (!head_dim_supported(pb.head_dim) || !window_supported(pb, false)) return cudaErrorInvalidValue;
  if (pb.total == 0 || pb.max_seqlen == 0 || pb.num_seqs == 0) return cudaSuccess;
  const FwdWs ws = fwd_ws(pb, a.workspace);
  const int d = pb.head_dim;
  // K rotated once into the workspace (contiguous (total, kv_heads, d)); Q is rotated inside the
  // kernel as its tile lands in shared memory (SM90, pairs in a run: from the cos/sin table this
  // same pass writes).
  Mat k = a.k;
  if (pb.rot.num_rot > 0) {
    PROPE_TRY(rotate(a.k.ptr, pb.dtype, a.k.row, a.k.head, ws.k_rot, pb.dtype,
                     int64_t(pb.kv_heads) * d, d, pb.total, pb.kv_heads, d, pb.positions, pb.rot,
                     false, 1.f, st, ws.q_cs));
    k = Mat{ws.k_rot, int64_t(pb.kv_heads) * d, d};
  }
  FwdParams p;
  p.q = a.q.ptr; p.q_row = a.q.row; p.q_head = a.q.head;
  p.k = k.ptr; p.k_row = k.row; p.k_head = k.head;
  p.v = a.v.ptr; p.v_row = a.v.row; p.v_head = a.v.head;
  p.o = a.o.ptr; p.o_row = a.o.row; p.o_head = a.o.head;
  p.lse = a.lse;
  set_problem(p, pb);
  p.positions = pb.positions;
  p.rot = pb.rot;
  p.sm90_fwd = pb.sm90_fwd;
  p.q_cs = ws.q_cs;
  const Family fam = resolve_family(pb);
  return dispatch(pb.dtype, d, [&](auto B, auto D) {
#ifdef PROPE_HAS_SM90
    if (fam == Family::Sm90) return run_attn_fwd_sm90<decltype(B)::value, decltype(D)::value>(p, st);
#endif
    (void)fam;
    return run_attn_fwd<decltype(B)::value, decltype(D)::value>(p, st);
  });
}

cudaError_t attn_bwd(const AttnBwdArgs& a, cudaStream_t st) {
  const AttnProblem& pb = a.pb;
  if (!head_dim_supported(pb.head_dim) || !window_supported(pb, true)) return cudaErrorInvalidValue;
  if (pb.total == 0 || pb.max_seqlen == 0 || pb.num_seqs == 0) return cudaSuccess;
  const BwdWs ws = bwd_ws(pb, a.workspace);
  const int d = pb.head_dim;
  const int64_t q_row = int64_t(pb.q_heads) * d, k_row = int64_t(pb.kv_heads) * d;
  const bool fused = fused_bwd(pb);

  if (!fused) {  // delta = rowsum(dO * O) - dlse (the fused path's preprocess does its own)
    DeltaParams dp;
    dp.out = a.out.ptr; dp.o_row = a.out.row; dp.o_head = a.out.head;
    dp.dout = a.dout.ptr; dp.do_row = a.dout.row; dp.do_head = a.dout.head;
    dp.dlse = a.dlse;
    dp.delta = ws.delta;
    dp.dtype = pb.dtype;
    dp.total = pb.total;
    dp.heads = pb.q_heads;
    dp.head_dim = d;
    PROPE_TRY(run_bwd_delta(dp, st));
  }

  // short-lived rotated q and k (nothing rotated was kept from the forward)
  Mat q = a.q, k = a.k;
  if (pb.rot.num_rot > 0) {
    PROPE_TRY(rotate(a.q.ptr, pb.dtype, a.q.row, a.q.head, ws.q_rot, pb.dtype, q_row, d, pb.total,
                     pb.q_heads, d, pb.positions, pb.rot, false, 1.f, st));
    PROPE_TRY(rotate(a.k.ptr, pb.dtype, a.k.row, a.k.head, ws.k_rot, pb.dtype, k_row, d, pb.total,
                     pb.kv_heads, d, pb.positions, pb.rot, false, 1.f, st, ws.k_cs));
    q = Mat{ws.q_rot, q_row, d};
    k = Mat{ws.k_rot, k_row, d};
  }
  // the atomic (SM80) and stored-once (SM90 split) accumulators start at zero; the fused path's
  // preprocess zeroes each tile it will add to
  if (!fused)
    PROPE_TRY(cudaMemsetAsync(ws.dq_accum, 0, size_t(pb.total) * pb.q_heads * d * sizeof(float), st));

  BwdParams p;
  p.q = q.ptr; p.q_row = q.row; p.q_head = q.head;
  p.k = k.ptr; p.k_row = k.row; p.k_head = k.head;
  p.v = a.v.ptr; p.v_row = a.v.row; p.v_head = a.v.head;
  p.dout = a.dout.ptr; p.do_row = a.dout.row; p.do_head = a.dout.head;
  p.lse = a.lse;
  p.delta = ws.delta;
  p.dq_accum = ws.dq_accum;
  p.dk = a.dk.ptr; p.dk_row = a.dk.row; p.dk_head = a.dk.head;
  p.dv = a.dv.ptr; p.dv_row = a.dv.row; p.dv_head = a.dv.head;
  set_problem(p, pb);
  p.sm90_split = pb.sm90_split;
  if (fused) {  // the fused path's pre- and postprocess: delta, dQ out, dK rotated back in-kernel
    p.out = a.out.ptr; p.o_row = a.out.row; p.o_head = a.out.head;
    p.dlse = a.dlse;
    p.lse2_tiled = ws.lse2;
    p.delta_tiled = ws.delta;
    p.dq = a.dq.ptr; p.dq_row = a.dq.row; p.dq_head = a.dq.head;
    p.positions = pb.positions;
    p.rot = pb.rot;
    p.k_cs = ws.k_cs;
  }
  const Family fam = resolve_family(pb);
  PROPE_TRY(dispatch(pb.dtype, d, [&](auto B, auto D) {
#ifdef PROPE_HAS_SM90
    if (fam == Family::Sm90) return run_attn_bwd_sm90<decltype(B)::value, decltype(D)::value>(p, st);
#endif
    (void)fam;
    return run_attn_bwd<decltype(B)::value, decltype(D)::value>(p, st);
  }));
  if (!fused) {
    // dq = inverse-rotate(scale * dq_accum) in the output dtype (with no rotation: the
    // conversion alone); dk inverse-rotated in place
    PROPE_TRY(rotate(ws.dq_accum, DType::f32, q_row, d, a.dq.ptr, pb.dtype, a.dq.row, a.dq.head,
                     pb.total, pb.q_heads, d, pb.positions, pb.rot, true, pb.scale, st));
    if (pb.rot.num_rot > 0)
      PROPE_TRY(rotate(a.dk.ptr, pb.dtype, a.dk.row, a.dk.head, a.dk.ptr, pb.dtype, a.dk.row,
                       a.dk.head, pb.total, pb.kv_heads, d, pb.positions, pb.rot, true, 1.f, st));
  }
  // the gradients of rows outside every sequence (padding before cu_seqlens[0] or after
  // cu_seqlens[-1]) are zero; no kernel above writes them
  ZeroRowsParams z;
  z.x[0] = a.dq.ptr; z.row[0] = a.dq.row; z.head[0] = a.dq.head; z.heads[0] = pb.q_heads;
  z.x[1] = a.dk.ptr; z.row[1] = a.dk.row; z.head[1] = a.dk.head; z.heads[1] = pb.kv_heads;
  z.x[2] = a.dv.ptr; z.row[2] = a.dv.row; z.head[2] = a.dv.head; z.heads[2] = pb.kv_heads;
  z.head_dim = d;
  z.total = pb.total;
  z.cu_seqlens = pb.cu_seqlens;
  z.num_seqs = pb.num_seqs;
  return run_zero_outside_rows(z, st);
}

}  // namespace prope
