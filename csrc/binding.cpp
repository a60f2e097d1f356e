// Torch binding of the CUDA kernels: ops torch.ops.prope_cuda.{rope, attn_fwd, attn_bwd}.
// Thin: validation with clear messages, allocation (outputs and one workspace), then one call
// into the torch-free API (prope_attn/api.h), which owns the launch sequences and dispatch.
// The Python module prope_kernels._C only exists to load this library (registration is static).
#include <Python.h>

#include <cmath>
#include <cstdint>

#include <ATen/ATen.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include "prope_attn/api.h"

namespace {

using prope::DType;

constexpr const char* kFix = " (use backend='triton' or 'reference' otherwise)";

DType dtype_of(const at::Tensor& t) {
  switch (t.scalar_type()) {
    case at::kHalf: return DType::f16;
    case at::kBFloat16: return DType::bf16;
    case at::kFloat: return DType::f32;
    default: TORCH_CHECK(false, "prope_cuda: unsupported dtype ", t.scalar_type());
  }
}

void check_cuda(const char* op, cudaError_t e) {
  TORCH_CHECK(e == cudaSuccess, op, ": CUDA error: ", cudaGetErrorString(e));
}

void check_device(const char* op, const char* name, const at::Tensor& t, const at::Device& dev) {
  TORCH_CHECK(t.is_cuda(), op, ": ", name, " must be a CUDA tensor, got one on ", t.device(), kFix);
  TORCH_CHECK(t.device() == dev, op, ": ", name, " is on ", t.device(), " but q is on ", dev,
              "; all tensors must be on one device");
}

void check_capability(const char* op, const at::Device& dev) {
  // (ATen/cuda/CUDAContext.h would pull in cuBLAS/cuSPARSE headers the toolkit may not have)
  int major = 0, minor = 0;
  check_cuda(op, cudaDeviceGetAttribute(&major, cudaDevAttrComputeCapabilityMajor, dev.index()));
  check_cuda(op, cudaDeviceGetAttribute(&minor, cudaDevAttrComputeCapabilityMinor, dev.index()));
  TORCH_CHECK(major >= 8, op, ": needs compute capability >= 8.0 (Ampere or newer), device ",
              dev.index(), " is ", major, ".", minor, kFix);
}

// (total, heads, d) with unit stride in d, 16-byte aligned base and row/head strides
// (cp.async moves 16 bytes); anything else is copied to a contiguous tensor first.
at::Tensor packed(const char* op, const char* name, const at::Tensor& t, int64_t total, int64_t d) {
  TORCH_CHECK(t.dim() == 3, op, ": ", name, " must be 3-D (total_tokens, heads, head_dim), got ",
              t.sizes());
  TORCH_CHECK(t.size(0) == total && t.size(2) == d, op, ": ", name, " has shape ", t.sizes(),
              ", expected (", total, ", heads, ", d, ")");
  const int64_t vec = 16 / t.element_size();
  const bool ok = t.stride(2) == 1 && t.stride(0) % vec == 0 && t.stride(1) % vec == 0 &&
                  reinterpret_cast<uintptr_t>(t.data_ptr()) % 16 == 0;
  if (ok) return t;
  // A fresh allocation, not t.contiguous(): that returns t itself when t is contiguous but its
  // base is not 16-byte aligned (a view at an odd offset), which cp.async would fault on.
  return at::empty(t.sizes(), t.options().memory_format(at::MemoryFormat::Contiguous)).copy_(t);
}

// The kernels' dynamic shared memory against the device's opt-in limit per block: sm_80 and
// sm_90 have room for every instantiation; sm_86/sm_89/sm_120 (99 KiB) not for the head_dim 256
// backward. A clear error here instead of "invalid argument" from the launch.
void check_smem(const char* op, int dev, int need, int64_t d) {
  int optin = 0;
  check_cuda(op, cudaDeviceGetAttribute(&optin, cudaDevAttrMaxSharedMemoryPerBlockOptin, dev));
  TORCH_CHECK(need <= optin, op, ": head_dim ", d, " needs ", need, " bytes of shared memory per "
              "block, device ", dev, " allows ", optin, kFix);
}

struct Tables {
  prope::RotTables rot;
  at::Tensor a, b, f, id;  // keep the (possibly converted) tensors alive
};

Tables tables(const char* op, const at::Tensor& pair_a, const at::Tensor& pair_b,
              const at::Tensor& pair_freq, const at::Tensor& identity, int64_t d,
              const at::Device& dev) {
  Tables t;
  const char* names[4] = {"pair_a", "pair_b", "pair_freq", "identity"};
  const at::Tensor* in[4] = {&pair_a, &pair_b, &pair_freq, &identity};
  for (int i = 0; i < 4; ++i) {
    check_device(op, names[i], *in[i], dev);
    TORCH_CHECK(in[i]->dim() == 1, op, ": ", names[i], " must be 1-D, got ", in[i]->sizes());
  }
  t.a = pair_a.to(at::kInt).contiguous();
  t.b = pair_b.to(at::kInt).contiguous();
  t.f = pair_freq.to(at::kDouble).contiguous();
  t.id = identity.to(at::kInt).contiguous();
  const int64_t r = t.a.numel();
  TORCH_CHECK(t.b.numel() == r && t.f.numel() == r, op, ": pair_a, pair_b, pair_freq must have one "
              "entry per rotated pair, got ", r, ", ", t.b.numel(), ", ", t.f.numel());
  TORCH_CHECK(2 * r + t.id.numel() == d, op, ": 2 * rotated pairs (", r, ") + identity dims (",
              t.id.numel(), ") must equal head_dim ", d);
  t.rot.pair_a = t.a.data_ptr<int32_t>();
  t.rot.pair_b = t.b.data_ptr<int32_t>();
  t.rot.pair_freq = t.f.data_ptr<double>();
  t.rot.identity = t.id.data_ptr<int32_t>();
  t.rot.num_rot = static_cast<int>(r);
  t.rot.num_id = static_cast<int>(t.id.numel());
  return t;
}

at::Tensor check_positions(const char* op, const at::Tensor& pos, int64_t total, const at::Device& dev) {
  check_device(op, "positions", pos, dev);
  TORCH_CHECK(pos.dim() == 1 && pos.size(0) == total, op, ": positions must have shape (", total,
              ",), got ", pos.sizes());
  TORCH_CHECK(!at::isFloatingType(pos.scalar_type()) && pos.scalar_type() != at::kBool, op,
              ": positions must be an integer tensor, got ", pos.scalar_type());
  return pos.to(at::kLong).contiguous();
}

struct Qkv {
  at::Tensor q, k, v, cu, pos;
  int64_t total, hq, hkv, d, num_seqs;
};

Qkv check_qkv(const char* op, const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
              const at::Tensor& cu_seqlens, const at::Tensor& positions, int64_t max_seqlen) {
  TORCH_CHECK(q.dim() == 3, op, ": q must be 3-D (total_tokens, q_heads, head_dim), got ", q.sizes());
  const at::Device dev = q.device();
  check_device(op, "q", q, dev);
  check_device(op, "k", k, dev);
  check_device(op, "v", v, dev);
  check_capability(op, dev);
  TORCH_CHECK(q.scalar_type() == at::kHalf || q.scalar_type() == at::kBFloat16, op,
              ": q, k, v must be float16 or bfloat16, got ", q.scalar_type(), kFix);
  TORCH_CHECK(k.scalar_type() == q.scalar_type() && v.scalar_type() == q.scalar_type(), op,
              ": q, k, v must share a dtype, got ", q.scalar_type(), ", ", k.scalar_type(), ", ",
              v.scalar_type());
  Qkv r;
  r.total = q.size(0);
  r.hq = q.size(1);
  r.d = q.size(2);
  TORCH_CHECK(prope::head_dim_supported(static_cast<int>(r.d)), op, ": head_dim must be 64, 128 or 256, got ",
              r.d, kFix);
  TORCH_CHECK(k.dim() == 3 && v.dim() == 3 && k.sizes() == v.sizes(), op,
              ": k and v must be 3-D with equal shapes, got ", k.sizes(), " and ", v.sizes());
  r.hkv = k.size(1);
  TORCH_CHECK(r.hkv > 0 && r.hq % r.hkv == 0, op, ": q_heads (", r.hq,
              ") must be a multiple of kv_heads (", r.hkv, ")");
  TORCH_CHECK(r.hq <= 65535 && r.hkv <= 65535, op, ": at most 65535 heads, got ", r.hq);
  r.q = packed(op, "q", q, r.total, r.d);
  r.k = packed(op, "k", k, r.total, r.d);
  r.v = packed(op, "v", v, r.total, r.d);
  check_device(op, "cu_seqlens", cu_seqlens, dev);
  TORCH_CHECK(cu_seqlens.dim() == 1 && cu_seqlens.numel() >= 2, op,
              ": cu_seqlens must be 1-D with num_seqs + 1 >= 2 entries, got ", cu_seqlens.sizes());
  TORCH_CHECK(cu_seqlens.scalar_type() == at::kInt || cu_seqlens.scalar_type() == at::kLong, op,
              ": cu_seqlens must be int32, got ", cu_seqlens.scalar_type());
  r.cu = cu_seqlens.to(at::kInt).contiguous();
  r.num_seqs = cu_seqlens.numel() - 1;
  TORCH_CHECK(r.num_seqs <= 65535, op, ": at most 65535 sequences per call, got ", r.num_seqs);
  TORCH_CHECK(max_seqlen >= 0 && max_seqlen <= INT32_MAX, op, ": bad max_seqlen ", max_seqlen);
  r.pos = check_positions(op, positions, r.total, dev);
  return r;
}

at::Tensor rope(const at::Tensor& x, const at::Tensor& positions, const at::Tensor& pair_a,
                const at::Tensor& pair_b, const at::Tensor& pair_freq, const at::Tensor& identity,
                bool conjugate) {
  const char* op = "prope_cuda::rope";
  TORCH_CHECK(x.is_cuda(), op, ": x must be a CUDA tensor, got one on ", x.device(), kFix);
  TORCH_CHECK(x.dim() == 3, op, ": x must be 3-D (total_tokens, heads, head_dim), got ", x.sizes());
  const at::Device dev = x.device();
  c10::cuda::CUDAGuard guard(dev);
  TORCH_CHECK(x.scalar_type() == at::kHalf || x.scalar_type() == at::kBFloat16 ||
              x.scalar_type() == at::kFloat, op, ": x must be float16, bfloat16 or float32, got ",
              x.scalar_type());
  const at::Tensor xc = x.stride(2) == 1 ? x : x.contiguous();
  const int64_t total = xc.size(0), d = xc.size(2);
  const at::Tensor pos = check_positions(op, positions, total, dev);
  Tables t = tables(op, pair_a, pair_b, pair_freq, identity, d, dev);
  at::Tensor y = at::empty(xc.sizes(), xc.options());
  check_cuda(op, prope::rotate(xc.data_ptr(), dtype_of(xc), xc.stride(0), xc.stride(1),
                               y.data_ptr(), dtype_of(y), y.stride(0), y.stride(1), total,
                               static_cast<int>(xc.size(1)), static_cast<int>(d),
                               pos.data_ptr<int64_t>(), t.rot, conjugate, 1.f,
                               c10::cuda::getCurrentCUDAStream().stream()));
  return y;
}

prope::Mat mat(const at::Tensor& t) { return {t.data_ptr(), t.stride(0), t.stride(1)}; }
prope::MutMat mut(const at::Tensor& t) { return {t.data_ptr(), t.stride(0), t.stride(1)}; }

// The problem description shared by forward and backward. family: 0 auto (SM90 on sm_90 when
// built, else SM80), 1 SM80, 2 SM90 (the Python side passes 2 for PROPE_CUDA_SM90=1, 1 for =0);
// asking for SM90 where it cannot run raises.
prope::AttnProblem problem(const char* op, const Qkv& a, const Tables& t, int64_t max_seqlen,
                           bool causal, double scale, int64_t family, int64_t window_left,
                           int64_t window_right, double softcap) {
  TORCH_CHECK(family >= 0 && family <= 2, op, ": family must be 0 (auto), 1 (sm80) or 2 (sm90), got ",
              family);
  prope::AttnProblem pb;
  pb.dtype = dtype_of(a.q);
  pb.head_dim = static_cast<int>(a.d);
  pb.total = a.total;
  pb.num_seqs = static_cast<int>(a.num_seqs);
  pb.max_seqlen = static_cast<int>(max_seqlen);
  pb.q_heads = static_cast<int>(a.hq);
  pb.kv_heads = static_cast<int>(a.hkv);
  pb.cu_seqlens = a.cu.data_ptr<int32_t>();
  pb.positions = a.pos.data_ptr<int64_t>();
  pb.rot = t.rot;
  pb.causal = causal;
  pb.scale = static_cast<float>(scale);
  TORCH_CHECK_VALUE(window_left >= -1 && window_right >= -1 && window_left <= INT32_MAX &&
                    window_right <= INT32_MAX, op, ": window_left and window_right must be -1 "
                    "(unbounded) or a key count >= 0, got (", window_left, ", ", window_right, ")");
  TORCH_CHECK_VALUE(softcap >= 0.0 && std::isfinite(softcap), op,
                    ": softcap must be 0 (off) or a positive float, got ", softcap);
  pb.window_left = static_cast<int>(window_left);
  pb.window_right = static_cast<int>(window_right);
  pb.softcap = static_cast<float>(softcap);
  int major = 0, minor = 0;
  const int dev = a.q.device().index();
  check_cuda(op, cudaDeviceGetAttribute(&major, cudaDevAttrComputeCapabilityMajor, dev));
  check_cuda(op, cudaDeviceGetAttribute(&minor, cudaDevAttrComputeCapabilityMinor, dev));
  pb.sm = major * 10 + minor;
  pb.family = static_cast<prope::Family>(family);
  if (pb.family == prope::Family::Sm90) {
    TORCH_CHECK(prope::sm90_built(), op, ": the SM90 kernels were requested (PROPE_CUDA_SM90=1) "
                "but this build has no sm_90a target (build with PROPE_CUDA_ARCHS containing 9.0a)");
    TORCH_CHECK(pb.sm == 90, op, ": the SM90 kernels were requested (PROPE_CUDA_SM90=1) but device ",
                dev, " is sm_", pb.sm, " (they run on sm_90 only)");
  }
  return pb;
}

// window / softcap: the SM90 kernels only (and no softcap in the SM90 split backward)
void check_window(const char* op, const prope::AttnProblem& pb, bool backward) {
  if (prope::window_supported(pb, backward)) return;
  TORCH_CHECK_VALUE(prope::resolve_family(pb) == prope::Family::Sm90, op,
                    ": window / softcap need the SM90 kernels (an sm_90 device and a build with "
                    "the 9.0a target); the SM80 kernels implement neither; use backend='triton'");
  TORCH_CHECK_VALUE(false, op, ": softcap is not implemented by the SM90 split (deterministic) "
                    "backward; use the fused one (deterministic=False) or backend='triton'");
}

// run_a0 / run_b_off: the pairs' run (RotTables; PRoPESpec.chunk_run() computes it from the same
// spec as the tables), -1 / 0 when there is none. Checked to lie inside the head with its a and
// b chunks apart; that the tables hold this run is the caller's promise (reading them here would
// copy from the device on every call).
void set_run(const char* op, Tables& t, int64_t run_a0, int64_t run_b_off, int64_t d) {
  if (run_a0 == -1) return;
  const int64_t r = t.rot.num_rot;
  TORCH_CHECK_VALUE(run_a0 >= 0 && run_a0 + r <= d && r > 0, op, ": run_a0 must be -1 (no run) "
                    "or a dim with the ", r, " rotated pairs after it inside head_dim ", d,
                    ", got ", run_a0);
  TORCH_CHECK_VALUE(run_b_off > 0 && run_b_off < d, op, ": run_b_off must be in (0, head_dim ",
                    d, "), got ", run_b_off);
  const int64_t lo = prope::cs_table_lo(int(run_a0)), w = prope::cs_table_w(int(run_a0), int(r));
  TORCH_CHECK_VALUE(run_b_off % 8 == 0 && run_b_off >= w && lo + run_b_off + w <= d, op,
                    ": run_b_off must be a multiple of 8 with the chunks of dims [", lo, ", ", lo + w,
                    ") and [", lo, " + run_b_off, ", lo + w, " + run_b_off) inside head_dim ", d,
                    " and apart, got ", run_b_off, " (run_a0 ", run_a0, ")");
  t.rot.run_a0 = static_cast<int>(run_a0);
  t.rot.run_b_off = static_cast<int>(run_b_off);
}

at::Tensor workspace(size_t bytes, const at::Tensor& like) {
  return at::empty({static_cast<int64_t>(bytes)}, like.options().dtype(at::kByte));
}

std::tuple<at::Tensor, at::Tensor> attn_fwd(const at::Tensor& q, const at::Tensor& k,
                                            const at::Tensor& v, const at::Tensor& cu_seqlens,
                                            const at::Tensor& positions, int64_t max_seqlen,
                                            const at::Tensor& pair_a, const at::Tensor& pair_b,
                                            const at::Tensor& pair_freq, const at::Tensor& identity,
                                            bool causal, double scale, int64_t family,
                                            int64_t sm90_fwd, int64_t window_left,
                                            int64_t window_right, double softcap,
                                            int64_t run_a0, int64_t run_b_off) {
  const char* op = "prope_cuda::attn_fwd";
  // sm90_fwd: the SM90 forward's variant, FwdParams::sm90_fwd (bit 0 overlap, bit 1 lpt order)
  TORCH_CHECK(sm90_fwd >= 0 && sm90_fwd <= 3, op, ": sm90_fwd must be 0..3 (bit 0 overlap, bit 1 "
              "longest-first order), got ", sm90_fwd);
  TORCH_CHECK(q.is_cuda(), op, ": q must be a CUDA tensor, got one on ", q.device(), kFix);
  c10::cuda::CUDAGuard guard(q.device());
  Qkv a = check_qkv(op, q, k, v, cu_seqlens, positions, max_seqlen);
  Tables t = tables(op, pair_a, pair_b, pair_freq, identity, a.d, q.device());
  set_run(op, t, run_a0, run_b_off, a.d);
  prope::AttnProblem pb = problem(op, a, t, max_seqlen, causal, scale, family, window_left,
                                  window_right, softcap);
  pb.sm90_fwd = static_cast<int>(sm90_fwd);
  check_window(op, pb, false);

  at::Tensor out = at::empty(a.q.sizes(), a.q.options());
  at::Tensor lse = at::empty({a.hq, a.total}, a.q.options().dtype(at::kFloat));
  if (a.total == 0 || max_seqlen == 0) return {out, lse};
  check_smem(op, q.device().index(), prope::attn_fwd_smem_bytes(pb), a.d);
  // the short-lived rotated K (freed when this function returns)
  at::Tensor ws = workspace(prope::attn_fwd_workspace_bytes(pb), a.q);
  prope::AttnFwdArgs args;
  args.pb = pb;
  args.q = mat(a.q);
  args.k = mat(a.k);
  args.v = mat(a.v);
  args.o = mut(out);
  args.lse = lse.data_ptr<float>();
  args.workspace = ws.data_ptr();
  check_cuda(op, prope::attn_fwd(args, c10::cuda::getCurrentCUDAStream().stream()));
  return {out, lse};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> attn_bwd(
    const at::Tensor& dout, const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
    const at::Tensor& out, const at::Tensor& lse, const std::optional<at::Tensor>& dlse,
    const at::Tensor& cu_seqlens, const at::Tensor& positions, int64_t max_seqlen,
    const at::Tensor& pair_a, const at::Tensor& pair_b, const at::Tensor& pair_freq,
    const at::Tensor& identity, bool causal, double scale, int64_t family, int64_t sm90_bwd,
    int64_t window_left, int64_t window_right, double softcap, int64_t run_a0, int64_t run_b_off) {
  const char* op = "prope_cuda::attn_bwd";
  TORCH_CHECK(q.is_cuda(), op, ": q must be a CUDA tensor, got one on ", q.device(), kFix);
  TORCH_CHECK(sm90_bwd == 0 || sm90_bwd == 1, op, ": sm90_bwd must be 0 (fused) or 1 (split), got ",
              sm90_bwd);
  c10::cuda::CUDAGuard guard(q.device());
  const at::Device dev = q.device();
  Qkv a = check_qkv(op, q, k, v, cu_seqlens, positions, max_seqlen);
  Tables t = tables(op, pair_a, pair_b, pair_freq, identity, a.d, dev);
  set_run(op, t, run_a0, run_b_off, a.d);
  prope::AttnProblem pb = problem(op, a, t, max_seqlen, causal, scale, family, window_left,
                                  window_right, softcap);
  pb.sm90_split = sm90_bwd == 1;
  check_window(op, pb, true);
  // The SM80 backward and the SM90 fused backward sum dQ with float atomics (order varies run to
  // run): under torch.use_deterministic_algorithms(True) they raise (warn with warn_only), as
  // torch's own atomic kernels do. The SM90 split backward sums every gradient element in one
  // thread in a fixed order: deterministic (the Python side asks for it in that mode).
  if (!prope::attn_bwd_deterministic(pb))
    at::globalContext().alertNotDeterministic(
        "prope_cuda::attn_bwd (backend='cuda' with the SM80 kernels or the SM90 fused backward; "
        "the SM90 split backward and backend='triton' are deterministic in this mode)");
  check_device(op, "dout", dout, dev);
  check_device(op, "out", out, dev);
  check_device(op, "lse", lse, dev);
  TORCH_CHECK(dout.scalar_type() == a.q.scalar_type() && out.scalar_type() == a.q.scalar_type(),
              op, ": dout and out must have q's dtype ", a.q.scalar_type());
  TORCH_CHECK(dout.sizes() == a.q.sizes() && out.sizes() == a.q.sizes(), op,
              ": dout and out must have q's shape ", a.q.sizes(), ", got ", dout.sizes(), " and ",
              out.sizes());
  const at::Tensor d_o = packed(op, "dout", dout, a.total, a.d);
  const at::Tensor o = packed(op, "out", out, a.total, a.d);
  TORCH_CHECK(lse.dim() == 2 && lse.size(0) == a.hq && lse.size(1) == a.total, op,
              ": lse must have shape (q_heads, total) = (", a.hq, ", ", a.total, "), got ", lse.sizes());
  const at::Tensor lse_c = lse.to(at::kFloat).contiguous();
  at::Tensor dlse_c;
  if (dlse.has_value() && dlse->defined()) {
    check_device(op, "dlse", *dlse, dev);
    TORCH_CHECK(dlse->sizes() == lse.sizes(), op, ": dlse must have lse's shape ", lse.sizes(),
                ", got ", dlse->sizes());
    dlse_c = dlse->to(at::kFloat).contiguous();
  }

  at::Tensor dq = at::empty(a.q.sizes(), a.q.options());
  at::Tensor dk = at::empty(a.k.sizes(), a.k.options());
  at::Tensor dv = at::empty(a.v.sizes(), a.v.options());
  if (a.total == 0 || max_seqlen == 0) return {dq.zero_(), dk.zero_(), dv.zero_()};
  check_smem(op, dev.index(), prope::attn_bwd_smem_bytes(pb), a.d);
  // delta, the fp32 dQ accumulator and the short-lived rotated q and k, freed on return
  at::Tensor ws = workspace(prope::attn_bwd_workspace_bytes(pb), a.q);
  prope::AttnBwdArgs args;
  args.pb = pb;
  args.dout = mat(d_o);
  args.q = mat(a.q);
  args.k = mat(a.k);
  args.v = mat(a.v);
  args.out = mat(o);
  args.lse = lse_c.data_ptr<float>();
  args.dlse = dlse_c.defined() ? dlse_c.data_ptr<float>() : nullptr;
  args.dq = mut(dq);
  args.dk = mut(dk);
  args.dv = mut(dv);
  args.workspace = ws.data_ptr();
  check_cuda(op, prope::attn_bwd(args, c10::cuda::getCurrentCUDAStream().stream()));
  return {dq, dk, dv};
}

// The kernel family attn_fwd / attn_bwd launch on a device of compute capability sm (major * 10 +
// minor) for a requested family (0 auto, 1 SM80, 2 SM90): 1 (SM80) or 2 (SM90), from the
// resolve_family the launches use. The Python side reads it back after each launch (what ran).
int64_t resolve_family_op(int64_t sm, int64_t family) {
  TORCH_CHECK(family >= 0 && family <= 2, "prope_cuda::resolve_family: family must be 0 (auto), "
              "1 (sm80) or 2 (sm90), got ", family);
  prope::AttnProblem pb;
  pb.sm = static_cast<int>(sm);
  pb.family = static_cast<prope::Family>(family);
  return static_cast<int64_t>(prope::resolve_family(pb));
}

}  // namespace

TORCH_LIBRARY(prope_cuda, m) {
  m.def("resolve_family(int sm, int family) -> int", &resolve_family_op);
  m.def("rope(Tensor x, Tensor positions, Tensor pair_a, Tensor pair_b, Tensor pair_freq, "
        "Tensor identity, bool conjugate) -> Tensor");
  m.def("attn_fwd(Tensor q, Tensor k, Tensor v, Tensor cu_seqlens, Tensor positions, "
        "int max_seqlen, Tensor pair_a, Tensor pair_b, Tensor pair_freq, Tensor identity, "
        "bool causal, float scale, int family=0, int sm90_fwd=0, int window_left=-1, "
        "int window_right=-1, float softcap=0.0, int run_a0=-1, int run_b_off=0) "
        "-> (Tensor, Tensor)");
  m.def("attn_bwd(Tensor dout, Tensor q, Tensor k, Tensor v, Tensor out, Tensor lse, "
        "Tensor? dlse, Tensor cu_seqlens, Tensor positions, int max_seqlen, Tensor pair_a, "
        "Tensor pair_b, Tensor pair_freq, Tensor identity, bool causal, float scale, int family=0, "
        "int sm90_bwd=0, int window_left=-1, int window_right=-1, float softcap=0.0, "
        "int run_a0=-1, int run_b_off=0) -> (Tensor, Tensor, Tensor)");
}

TORCH_LIBRARY_IMPL(prope_cuda, CUDA, m) {
  m.impl("rope", &rope);
  m.impl("attn_fwd", &attn_fwd);
  m.impl("attn_bwd", &attn_bwd);
}

// Importing prope_kernels._C loads this shared library, which runs the registrations above.
extern "C" PyObject* PyInit__C(void) {
  static PyModuleDef def = {PyModuleDef_HEAD_INIT, "_C", "prope_cuda kernels (torch.ops.prope_cuda)",
                            -1, nullptr};
  return PyModule_Create(&def);
}
