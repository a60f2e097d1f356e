// Standalone GPU test of the kernels (no Python, no torch): random varlen inputs, forward and
// backward through the torch-free API the binding calls (prope_attn/api.h: the same launch
// sequences), checked against a float64 CPU reference of p-RoPE + softmax attention below.
//   build: cmake -B build -S . && cmake --build build -j
//   run:   ./build/test_prope_attn          (the kernels the API picks: SM90 on sm_90 when built)
//          ./build/test_prope_attn --sm80   (SM80 kernels)
//          ./build/test_prope_attn --sm90   (SM90 kernels; needs an sm_90a build and an sm_90 GPU)
//          ./build/test_prope_attn --rot=pairs   (Q / dK rotated one pair at a time, no table)
//          ./build/test_prope_attn --sm90 --fwd=overlap+lpt   (an SM90 forward variant:
//                                   basic, overlap, basic+lpt, overlap+lpt; csrc/README.md)
//          ./build/test_prope_attn --sm90-split    (SM90, the split (deterministic) backward;
//                                   --sm90 runs the fused one)
// Head dims tested: those compiled in (PROPE_HAS_HD64/128/256, set by CMakeLists.txt).
#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include <algorithm>
#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <random>
#include <string>
#include <vector>

#include "prope_attn/api.h"

#define CK(x)                                                                             \
  do {                                                                                    \
    cudaError_t e_ = (x);                                                                 \
    if (e_ != cudaSuccess) {                                                              \
      std::fprintf(stderr, "%s:%d: %s: %s\n", __FILE__, __LINE__, #x, cudaGetErrorString(e_)); \
      std::exit(2);                                                                       \
    }                                                                                     \
  } while (0)

namespace {

int g_sm = 80;
prope::Family g_family = prope::Family::Auto;
int g_sm90_fwd = 0;  // AttnProblem::sm90_fwd (--fwd=...)
bool g_split = false;  // --sm90-split: the SM90 split backward (deterministic) instead of the fused one
bool g_rot_table = true;  // --rot=pairs: no run given to the kernels (one pair at a time, its angle)

struct Case {
  bool bf16;
  int d, hq, hkv;
  std::vector<int> lens;
  bool causal;
  double p;
  int variant;       // 0 prope, 1 reversed, 2 partial (as rotary.py)
  bool interleaved;  // layout
  int64_t pos_offset;
};

// rotary.py's PRoPESpec.pairs() / identity_dims()
void make_pairs(const Case& c, double theta, std::vector<int>& a, std::vector<int>& b,
                std::vector<double>& f, std::vector<int>& id) {
  const int d = c.d, h = d / 2;
  const int r = static_cast<int>(std::floor(c.p * h + 1e-9));
  a.clear(); b.clear(); f.clear(); id.clear();
  for (int i = 0; i < r; ++i) {
    const int k = c.variant == 1 ? h - r + i : i;
    const double fr = c.variant == 2 ? std::pow(theta, -2.0 * k / (2.0 * r)) : std::pow(theta, -2.0 * k / d);
    const int half = c.variant == 2 ? r : h;
    a.push_back(c.interleaved ? 2 * k : k);
    b.push_back(c.interleaved ? 2 * k + 1 : k + half);
    f.push_back(fr);
  }
  std::vector<bool> rot(d, false);
  for (int i = 0; i < r; ++i) rot[a[i]] = rot[b[i]] = true;
  for (int j = 0; j < d; ++j) if (!rot[j]) id.push_back(j);
}

// rotary.py's PRoPESpec.chunk_run(): pair i = (a0 + i, a0 + i + off), off % 8 == 0, the 8-dim
// chunks of the a dims apart from the b dims' and inside the head; else a0 = -1
void find_run(const std::vector<int>& a, const std::vector<int>& b, int d, int& a0, int& off) {
  a0 = -1;
  off = 0;
  if (a.empty()) return;
  const int r = int(a.size()), o = b[0] - a[0];
  const int lo = prope::cs_table_lo(a[0]), w = prope::cs_table_w(a[0], r);
  if (o % 8 != 0 || o < w || lo + o + w > d) return;
  for (int i = 0; i < r; ++i)
    if (a[i] != a[0] + i || b[i] != a[i] + o) return;
  a0 = a[0];
  off = o;
}

uint16_t to_bits(float x, bool bf16) {
  uint16_t u;
  if (bf16) { __nv_bfloat16 v = __float2bfloat16_rn(x); std::memcpy(&u, &v, 2); }
  else { __half v = __float2half_rn(x); std::memcpy(&u, &v, 2); }
  return u;
}
double from_bits(uint16_t u, bool bf16) {
  if (bf16) { __nv_bfloat16 v; std::memcpy(&v, &u, 2); return __bfloat162float(v); }
  __half v; std::memcpy(&v, &u, 2); return __half2float(v);
}

// x (total, heads, d) rotated in place by +-angle
void rotate_ref(std::vector<double>& x, int heads, int d, const std::vector<int64_t>& pos,
                const std::vector<int>& a, const std::vector<int>& b, const std::vector<double>& f,
                double sign) {
  const int64_t total = static_cast<int64_t>(pos.size());
  for (int64_t t = 0; t < total; ++t)
    for (int h = 0; h < heads; ++h)
      for (size_t i = 0; i < a.size(); ++i) {
        const double ang = static_cast<double>(pos[t]) * f[i];
        const double cs = std::cos(ang), sn = sign * std::sin(ang);
        double* row = &x[(t * heads + h) * d];
        const double xa = row[a[i]], xb = row[b[i]];
        row[a[i]] = xa * cs - xb * sn;
        row[b[i]] = xb * cs + xa * sn;
      }
}

template <typename T> T* dev_copy(const std::vector<T>& h) {
  T* p = nullptr;
  CK(cudaMalloc(&p, std::max<size_t>(1, h.size()) * sizeof(T)));
  if (!h.empty()) CK(cudaMemcpy(p, h.data(), h.size() * sizeof(T), cudaMemcpyHostToDevice));
  return p;
}
template <typename T> std::vector<T> host_copy(const T* p, size_t n) {
  std::vector<T> h(n);
  if (n) CK(cudaMemcpy(h.data(), p, n * sizeof(T), cudaMemcpyDeviceToHost));
  return h;
}

bool check(const char* what, const std::vector<double>& got, const std::vector<double>& ref, bool bf16) {
  double err = 0, mag = 0;
  bool finite = true;
  for (size_t i = 0; i < ref.size(); ++i) {
    if (!std::isfinite(got[i])) finite = false;
    err = std::max(err, std::fabs(got[i] - ref[i]));
    mag = std::max(mag, std::fabs(ref[i]));
  }
  // loose on purpose: catches layout/mask/rotation bugs (O(1) errors), not last-bit accuracy;
  // the Python tests apply the strict 2x-PyTorch rule.
  const double tol = (bf16 ? 4e-2 : 8e-3) * std::max(1.0, mag);
  const bool ok = finite && err <= tol;
  std::printf("    %-4s max err %.3e (max |ref| %.3e, tol %.3e)%s\n", what, err, mag, tol, ok ? "" : "  FAIL");
  return ok;
}

bool run_case(const Case& c, std::mt19937& gen) {
  const double theta = 10000.0;
  const int d = c.d, hq = c.hq, hkv = c.hkv, group = hq / hkv;
  std::vector<int> cu(1, 0);
  for (int L : c.lens) cu.push_back(cu.back() + L);
  const int64_t total = cu.back();
  const int num_seqs = static_cast<int>(c.lens.size());
  const int max_seqlen = *std::max_element(c.lens.begin(), c.lens.end());
  const double scale = 1.0 / std::sqrt(static_cast<double>(d));
  std::vector<int64_t> pos(total);
  for (int s = 0; s < num_seqs; ++s)
    for (int i = cu[s]; i < cu[s + 1]; ++i) pos[i] = c.pos_offset + (i - cu[s]);
  std::vector<int> pa, pb_, id;
  std::vector<double> pf;
  make_pairs(c, theta, pa, pb_, pf, id);
  std::printf("  case: %s d=%d hq=%d hkv=%d causal=%d p=%.2f variant=%d %s offset=%lld seqs=%d total=%lld\n",
              c.bf16 ? "bf16" : "fp16", d, hq, hkv, int(c.causal), c.p, c.variant,
              c.interleaved ? "interleaved" : "half", (long long)c.pos_offset, num_seqs, (long long)total);

  std::normal_distribution<float> nd(0.f, 1.f);
  auto rand_bits = [&](size_t n, std::vector<uint16_t>& bits, std::vector<double>& vals) {
    bits.resize(n); vals.resize(n);
    for (size_t i = 0; i < n; ++i) { bits[i] = to_bits(nd(gen), c.bf16); vals[i] = from_bits(bits[i], c.bf16); }
  };
  std::vector<uint16_t> qb, kb, vb, dob;
  std::vector<double> q, k, v, dout;
  rand_bits(total * hq * d, qb, q);
  rand_bits(total * hkv * d, kb, k);
  rand_bits(total * hkv * d, vb, v);
  rand_bits(total * hq * d, dob, dout);

  // ---- float64 reference ----
  std::vector<double> qr = q, kr = k;
  rotate_ref(qr, hq, d, pos, pa, pb_, pf, 1.0);
  rotate_ref(kr, hkv, d, pos, pa, pb_, pf, 1.0);
  std::vector<double> o_ref(total * hq * d, 0), lse_ref(hq * total, 0);
  std::vector<double> dq_ref(total * hq * d, 0), dk_ref(total * hkv * d, 0), dv_ref(total * hkv * d, 0);
  for (int s = 0; s < num_seqs; ++s) {
    const int L = c.lens[s], t0 = cu[s];
    for (int h = 0; h < hq; ++h) {
      const int g = h / group;
      auto Q = [&](int i, int j) -> double& { return qr[((int64_t)(t0 + i) * hq + h) * d + j]; };
      auto K = [&](int i, int j) -> double& { return kr[((int64_t)(t0 + i) * hkv + g) * d + j]; };
      auto V = [&](int i, int j) -> double& { return v[((int64_t)(t0 + i) * hkv + g) * d + j]; };
      auto dO = [&](int i, int j) -> double& { return dout[((int64_t)(t0 + i) * hq + h) * d + j]; };
      std::vector<double> P(L), dP(L);
      for (int i = 0; i < L; ++i) {
        const int jmax = c.causal ? i + 1 : L;
        double mx = -INFINITY;
        for (int j = 0; j < jmax; ++j) {
          double sij = 0;
          for (int e = 0; e < d; ++e) sij += Q(i, e) * K(j, e);
          P[j] = sij * scale;
          mx = std::max(mx, P[j]);
        }
        double sum = 0;
        for (int j = 0; j < jmax; ++j) { P[j] = std::exp(P[j] - mx); sum += P[j]; }
        for (int j = 0; j < jmax; ++j) P[j] /= sum;
        lse_ref[(int64_t)h * total + t0 + i] = mx + std::log(sum);
        double* o = &o_ref[((int64_t)(t0 + i) * hq + h) * d];
        for (int j = 0; j < jmax; ++j)
          for (int e = 0; e < d; ++e) o[e] += P[j] * V(j, e);
        double D = 0;
        for (int e = 0; e < d; ++e) D += o[e] * dO(i, e);
        for (int j = 0; j < jmax; ++j) {
          double x = 0;
          for (int e = 0; e < d; ++e) x += dO(i, e) * V(j, e);
          dP[j] = P[j] * (x - D) * scale;  // dS * scale
        }
        for (int j = 0; j < jmax; ++j)
          for (int e = 0; e < d; ++e) {
            dq_ref[((int64_t)(t0 + i) * hq + h) * d + e] += dP[j] * K(j, e);
            dk_ref[((int64_t)(t0 + j) * hkv + g) * d + e] += dP[j] * Q(i, e);
            dv_ref[((int64_t)(t0 + j) * hkv + g) * d + e] += P[j] * dO(i, e);
          }
      }
    }
  }
  rotate_ref(dq_ref, hq, d, pos, pa, pb_, pf, -1.0);
  rotate_ref(dk_ref, hkv, d, pos, pa, pb_, pf, -1.0);

  // ---- GPU, through the same API as the torch binding ----
  const auto dt = c.bf16 ? prope::DType::bf16 : prope::DType::f16;
  uint16_t *dq_in = dev_copy(qb), *dk_in = dev_copy(kb), *dv_in = dev_copy(vb), *ddo = dev_copy(dob);
  int32_t* dcu = dev_copy(cu);
  int64_t* dpos = dev_copy(pos);
  prope::AttnProblem pb;
  pb.dtype = dt;
  pb.head_dim = d;
  pb.total = total;
  pb.num_seqs = num_seqs;
  pb.max_seqlen = max_seqlen;
  pb.q_heads = hq;
  pb.kv_heads = hkv;
  pb.cu_seqlens = dcu;
  pb.positions = dpos;
  pb.rot.pair_a = dev_copy(pa);
  pb.rot.pair_b = dev_copy(pb_);
  pb.rot.pair_freq = dev_copy(pf);
  pb.rot.identity = dev_copy(id);
  pb.rot.num_rot = static_cast<int>(pa.size());
  pb.rot.num_id = static_cast<int>(id.size());
  if (g_rot_table) find_run(pa, pb_, d, pb.rot.run_a0, pb.rot.run_b_off);
  pb.causal = c.causal;
  pb.scale = float(scale);
  pb.sm = g_sm;
  pb.family = g_family;
  pb.sm90_fwd = g_sm90_fwd;
  pb.sm90_split = g_split;
  const size_t nq = total * hq * d, nk = total * hkv * d;
  uint16_t *d_out, *d_dq, *d_dk, *d_dv;
  float* d_lse;
  void *ws_f, *ws_b;
  CK(cudaMalloc(&d_out, nq * 2));
  CK(cudaMalloc(&d_dq, nq * 2)); CK(cudaMalloc(&d_dk, nk * 2)); CK(cudaMalloc(&d_dv, nk * 2));
  CK(cudaMalloc(&d_lse, hq * total * 4));
  CK(cudaMalloc(&ws_f, std::max<size_t>(1, prope::attn_fwd_workspace_bytes(pb))));
  CK(cudaMalloc(&ws_b, std::max<size_t>(1, prope::attn_bwd_workspace_bytes(pb))));
  const int64_t qr_ = int64_t(hq) * d, kr_ = int64_t(hkv) * d;

  prope::AttnFwdArgs fa;
  fa.pb = pb;
  fa.q = {dq_in, qr_, d}; fa.k = {dk_in, kr_, d}; fa.v = {dv_in, kr_, d};
  fa.o = {d_out, qr_, d};
  fa.lse = d_lse;
  fa.workspace = ws_f;
  CK(prope::attn_fwd(fa, 0));

  prope::AttnBwdArgs ba;
  ba.pb = pb;
  ba.dout = {ddo, qr_, d}; ba.q = {dq_in, qr_, d}; ba.k = {dk_in, kr_, d}; ba.v = {dv_in, kr_, d};
  ba.out = {d_out, qr_, d};
  ba.lse = d_lse;
  ba.dq = {d_dq, qr_, d}; ba.dk = {d_dk, kr_, d}; ba.dv = {d_dv, kr_, d};
  ba.workspace = ws_b;
  CK(prope::attn_bwd(ba, 0));
  CK(cudaDeviceSynchronize());

  auto fetch = [&](const uint16_t* p, size_t n) {
    std::vector<uint16_t> h = host_copy(p, n);
    std::vector<double> r(n);
    for (size_t i = 0; i < n; ++i) r[i] = from_bits(h[i], c.bf16);
    return r;
  };
  std::vector<float> lse_f = host_copy(d_lse, hq * total);
  std::vector<double> lse_got(lse_f.begin(), lse_f.end());
  bool ok = true;
  ok &= check("out", fetch(d_out, nq), o_ref, c.bf16);
  ok &= check("lse", lse_got, lse_ref, false);
  ok &= check("dq", fetch(d_dq, nq), dq_ref, c.bf16);
  ok &= check("dk", fetch(d_dk, nk), dk_ref, c.bf16);
  ok &= check("dv", fetch(d_dv, nk), dv_ref, c.bf16);

  for (const void* p : {(const void*)dq_in, (const void*)dk_in, (const void*)dv_in, (const void*)ddo,
                        (const void*)dcu, (const void*)dpos, (const void*)pb.rot.pair_a,
                        (const void*)pb.rot.pair_b, (const void*)pb.rot.pair_freq,
                        (const void*)pb.rot.identity, (const void*)d_out, (const void*)d_dq,
                        (const void*)d_dk, (const void*)d_dv, (const void*)d_lse, (const void*)ws_f,
                        (const void*)ws_b})
    CK(cudaFree(const_cast<void*>(p)));
  return ok;
}

}  // namespace

int main(int argc, char** argv) {
  int dev_count = 0;
  if (cudaGetDeviceCount(&dev_count) != cudaSuccess || dev_count == 0) {
    std::printf("no CUDA device: nothing to run\n");
    return 77;  // ctest SKIP_RETURN_CODE
  }
  int major = 0, minor = 0;
  CK(cudaDeviceGetAttribute(&major, cudaDevAttrComputeCapabilityMajor, 0));
  CK(cudaDeviceGetAttribute(&minor, cudaDevAttrComputeCapabilityMinor, 0));
  g_sm = major * 10 + minor;
  // --sm80 / --sm90: force a family (--sm90 fails when this build or device cannot run it)
  if (argc > 1 && std::string(argv[1]) == "--sm80") g_family = prope::Family::Sm80;
  if (argc > 1 && (std::string(argv[1]) == "--sm90" || std::string(argv[1]) == "--sm90-split")) {
    g_family = prope::Family::Sm90;
    g_split = std::string(argv[1]) == "--sm90-split";
    if (prope::resolve_family({.sm = g_sm, .family = g_family}) != prope::Family::Sm90) {
      std::printf("--sm90: not available (built with sm_90a: %d, device sm_%d)\n",
                  int(prope::sm90_built()), g_sm);
      return 1;
    }
  }
  const char* fwd_names[] = {"basic", "overlap", "basic+lpt", "overlap+lpt"};
  for (int i = 1; i < argc; ++i) {
    const std::string a = argv[i];
    if (a == "--rot=pairs") g_rot_table = false;
    if (a.rfind("--fwd=", 0) != 0) continue;
    g_sm90_fwd = -1;
    for (int v = 0; v < 4; ++v)
      if (a.substr(6) == fwd_names[v]) g_sm90_fwd = v;
    if (g_sm90_fwd < 0) {
      std::printf("--fwd= takes basic, overlap, basic+lpt or overlap+lpt, got %s\n", a.c_str() + 6);
      return 1;
    }
  }
  std::printf("SM90 forward variant: %s; rotation in smem: %s\n", fwd_names[g_sm90_fwd],
              g_rot_table ? "chunks from the table where the pairs form a run" : "pairs");
  std::printf("device sm_%d, kernels: %s\n", g_sm,
              prope::resolve_family({.sm = g_sm, .family = g_family}) == prope::Family::Sm90
                  ? "SM90" : "SM80");
  std::mt19937 gen(1234);
  std::vector<int> dims;
#ifdef PROPE_HAS_HD64
  dims.push_back(64);
#endif
#ifdef PROPE_HAS_HD128
  dims.push_back(128);
#endif
#ifdef PROPE_HAS_HD256
  dims.push_back(256);
#endif
  int failed = 0, n = 0;
  for (int d : dims) {
    const std::vector<Case> cases = {
        {false, d, 4, 4, {1, 97, 130}, true, 0.75, 0, false, 0},
        {true, d, 6, 2, {97, 0, 64, 129}, false, 0.25, 1, true, 0},
        {false, d, 3, 1, {200, 5}, true, 1.0, 2, false, 1000000},
        {true, d, 4, 2, {65}, true, 0.0, 0, false, 0},
        {false, d, 2, 1, {128, 63}, false, 0.5, 2, true, 7},
    };
    for (const Case& c : cases) {
      ++n;
      if (!run_case(c, gen)) ++failed;
    }
  }
  std::printf("%s: %d of %d cases failed\n", failed ? "FAILED" : "PASSED", failed, n);
  return failed ? 1 : 0;
}
