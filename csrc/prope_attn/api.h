// The CUDA backend's launch sequences behind one torch-free C++ API (plain pointers, strides,
// sizes, a stream), shared by the torch binding (csrc/binding.cpp) and the standalone C++ test
// (csrc/tests/test_prope_attn.cu):
//   forward : rotate K into a short-lived buffer, attention (Q rotated in-kernel)
//   backward: delta, rotate Q and K into short-lived buffers, attention backward, then dQ and dK
//             rotated back (dQ's fp32 accumulator converted in the same pass)
// The dtype x head_dim dispatch, and the kernel family (SM80 or SM90) by compute capability,
// happen here and nowhere else. Short-lived buffers live in one caller-provided workspace of
// attn_{fwd,bwd}_workspace_bytes() bytes (the binding allocates it with torch's caching
// allocator, the test with cudaMalloc); it is dead when the launches it feeds have run.
#pragma once

#include <cstddef>
#include <cstdint>
#include <cuda_runtime.h>

#include "params.h"

namespace prope {

// Which attention kernels run. Sm80 (mma.sync + cp.async) runs on every sm_80+ device; Sm90
// (wgmma + TMA, warp-specialized) only on sm_90 devices and only when the library was built with
// sm_90a (sm90_built()). Auto = Sm90 on an sm_90 device when built, else Sm80 (resolve_family).
enum class Family : int { Auto = 0, Sm80 = 1, Sm90 = 2 };

struct AttnProblem {
  DType dtype = DType::bf16;     // f16 or bf16 (q, k, v, out, dout and the grads)
  int head_dim = 0;              // 64, 128, 256
  int64_t total = 0;             // packed tokens
  int num_seqs = 0, max_seqlen = 0, q_heads = 0, kv_heads = 0;
  const int32_t* cu_seqlens = nullptr;  // (num_seqs + 1,) device
  const int64_t* positions = nullptr;   // (total,) device
  RotTables rot;                        // device tables; num_rot == 0: no rotation at all
  bool causal = true;
  float scale = 1.f;
  // SM90 only (attn_fwd / attn_bwd return cudaErrorInvalidValue on the SM80 kernels; the
  // binding says so first, window_supported()): sliding window (-1: unbounded side) and logit
  // softcap (0: off), FwdParams' semantics. The SM90 split backward has no softcap.
  int window_left = -1, window_right = -1;
  float softcap = 0.f;
  int sm = 80;                   // compute capability of the device, major * 10 + minor
  Family family = Family::Auto;
  int sm90_fwd = 0;              // SM90 forward variant, FwdParams::sm90_fwd (forward only)
  // SM90 backward only: false (default) = the fused backward (one 5-GEMM kernel, dQ summed with
  // float4 atomics, plus a pre- and postprocess); true = the split backward (a dK/dV kernel and
  // a dQ kernel, 7 GEMMs, no atomics: deterministic; PROPE_CUDA_SM90_BWD=split or torch's
  // deterministic mode). The SM80 backward always sums dQ with atomics.
  bool sm90_split = false;
};

// (total, heads, d) tensor: unit stride in d; row and head strides in elements.
struct Mat { const void* ptr = nullptr; int64_t row = 0, head = 0; };
struct MutMat { void* ptr = nullptr; int64_t row = 0, head = 0; };

struct AttnFwdArgs {
  AttnProblem pb;
  Mat q, k, v;                   // q (total, q_heads, d), k/v (total, kv_heads, d), NOT rotated
  MutMat o;                      // (total, q_heads, d)
  float* lse = nullptr;          // (q_heads, total) float32, natural log
  void* workspace = nullptr;     // attn_fwd_workspace_bytes(pb) bytes (may be null when 0)
};

struct AttnBwdArgs {
  AttnProblem pb;
  Mat dout, q, k, v, out;        // q, k NOT rotated (nothing rotated is kept from the forward)
  const float* lse = nullptr;    // (q_heads, total)
  const float* dlse = nullptr;   // (q_heads, total) or null
  MutMat dq, dk, dv;             // dq (total, q_heads, d); dk, dv (total, kv_heads, d)
  void* workspace = nullptr;     // attn_bwd_workspace_bytes(pb) bytes
};

bool head_dim_supported(int d);
// Whether the SM90 kernels were compiled into this build (needs an sm_90a target).
bool sm90_built();
// The family a problem runs on (Auto resolved), or Sm80 when Sm90 was asked for but cannot run:
// callers that must not fall back compare with what they asked for.
Family resolve_family(const AttnProblem& pb);
// Dynamic shared memory one block of the forward / backward takes (bytes; the binding checks it
// against the device's opt-in limit); -1 for an unsupported head_dim.
int attn_fwd_smem_bytes(const AttnProblem& pb);
int attn_bwd_smem_bytes(const AttnProblem& pb);
// Whether attn_bwd's result is bitwise reproducible run to run: only the SM90 split backward
// (every dQ, dK, dV element summed by one thread in a fixed order); the others sum dQ by atomics.
// The gradients of rows outside every sequence are zero, whatever the family.
bool attn_bwd_deterministic(const AttnProblem& pb);
// Whether pb's window / softcap (if any) can run on the family it resolves to (SM90 only; no
// softcap in the split backward when backward is true).
bool window_supported(const AttnProblem& pb, bool backward);
// Whether pb asks for a window or a softcap at all ((-1, 0) with causal is plain causal).
bool uses_window_or_softcap(const AttnProblem& pb);

// The workspaces (the caller allocates them 256-byte aligned: TMA and 16-byte loads read them).
// Forward: the rotated K (total * kv_heads * d elements) and, when rot.run_a0 >= 0, the cos/sin
// table (total * 2 * cs_table_w fp32: 768 bytes a token at d 256, p 0.75, more than the rotated
// K of one kv head, 512). Backward: delta, the dQ accumulator, the rotated Q and K, and the table
// for the SM90 fused kernel.
size_t attn_fwd_workspace_bytes(const AttnProblem& pb);
size_t attn_bwd_workspace_bytes(const AttnProblem& pb);
cudaError_t attn_fwd(const AttnFwdArgs& a, cudaStream_t st);
cudaError_t attn_bwd(const AttnBwdArgs& a, cudaStream_t st);

// y = rotate(x * mul) (conjugate: the inverse rotation); x may alias y (same dtype and strides).
// cs_out: also write the cos/sin table of RopeParams::cs_out (rot.run_a0 >= 0, not conjugate).
cudaError_t rotate(const void* x, DType x_dtype, int64_t x_row, int64_t x_head, void* y,
                   DType y_dtype, int64_t y_row, int64_t y_head, int64_t total, int heads,
                   int head_dim, const int64_t* positions, const RotTables& rot, bool conjugate,
                   float mul, cudaStream_t st, float* cs_out = nullptr);

}  // namespace prope
