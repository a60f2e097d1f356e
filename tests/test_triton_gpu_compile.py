"""Compile every Triton kernel for real GPU targets (sm_80, sm_90) without a GPU.

The CPU interpreter runs the kernels' math but skips the GPU compiler, which is stricter (it once
rejected a plain Python global that the interpreter accepted). Compiling ahead of time for A100 and
H100 catches such errors on a machine with no GPU, and reports shared memory, registers and stack.

    python tests/test_triton_gpu_compile.py           # the quick set: smem / regs / stack
    python tests/test_triton_gpu_compile.py --all     # every tuned config (ARCH=80 or 90)
    python tests/test_triton_gpu_compile.py --all --dims 512   # one head_dim bucket
    python tests/test_triton_gpu_compile.py --hopper  # every config of the Hopper kernels, sm_90:
                                                      # wgmma / TMA counts, regs, spills
"""

import inspect
import os
import re
import subprocess
import sys

import pytest

triton = pytest.importorskip("triton")

from triton.backends.compiler import GPUTarget  # noqa: E402
from triton.compiler import ASTSource  # noqa: E402




def _types(dt):
    p = "*" + dt
    ints = ["total", "n_heads", "n_kv_heads", "seq_bucket", "N_ROT", "stride_dks", "wl", "wr"] + [
        f"stride_{a}{b}" for a in ("q", "k", "v", "o", "do", "dk", "dv", "dq", "x", "y")
        for b in "th"]
    t = {n: "i32" for n in ints}
    t.update(Q=p, K=p, V=p, O=p, DO=p, DK=p, DV=p, DQ=p, X=p, Y=p, DLSE="*fp32", LSE="*fp32",
             DELTA="*fp32", POS="*i64", CU="*i32", CU_K="*i32", C_PART="*i32", C_SIGN="*fp32", C_FREQ="*fp64",
             PAIR_A="*i32", PAIR_B="*i32", PAIR_F="*fp64", IDS="*i32", sm_scale="fp32",
             cap_in="fp32", cap_out="fp32")
    return t


def _compile(fn, consts, dt, arch, warps, stages):
    from triton.runtime.jit import JITFunction
    jit = fn if isinstance(fn, JITFunction) else fn.fn
    types = _types(dt)
    consts = dict(consts)
    x_dtype = consts.pop("_X_DTYPE", None)  # rope: input X of another dtype than the output Y
    if x_dtype:
        types["X"] = "*" + x_dtype
    types.update(consts.pop("_TYPES", {}))  # e.g. fp32 accumulators of the Hopper backward
    for prm in jit.params:   # constexprs with a default (e.g. the forward's PIPELINE) as called
        if prm.is_constexpr and prm.name not in consts and prm.default is not inspect.Parameter.empty:
            consts[prm.name] = prm.default
    sig = {n: ("constexpr" if n in consts else types[n]) for n in jit.arg_names}
    # Specialize as the JIT does at training shapes: pointers 16-byte aligned and strides/sizes
    # multiples of 16 ("tt.divisibility"), which is what enables vectorized loads. Without these
    # hints the compile is pessimistic (scalar loads, much higher register use).
    aligned = {(i,): [["tt.divisibility", 16]] for i, n in enumerate(jit.arg_names)
               if n not in consts and (types[n].startswith("*") or n.startswith("stride_")
                                       or n in ("total", "seq_bucket"))}
    src = ASTSource(fn=jit, signature=sig, attrs=aligned,
                    constexprs={(jit.arg_names.index(k),): v for k, v in consts.items()})
    return triton.compile(src, target=GPUTarget("cuda", arch, 32),
                          options=dict(num_warps=warps, num_stages=stages))


def _attn_consts(d, bm, bn, **kw):
    c = dict(GROUP=2, HEAD_DIM=d, BLOCK_D=triton.next_power_of_2(d), CAUSAL=True, ROTATE=True,
             WINDOW=False, SOFTCAP=False, EVEN_D=d == triton.next_power_of_2(d), EMULATE=False,
             BLOCK_M=bm, BLOCK_N=bn)
    c.update(kw)
    return c


def _cases(full, dims=None):
    from prope_kernels.backends.triton import attention as A
    from prope_kernels.backends.triton import configs as C
    from prope_kernels.backends.triton import rope as R
    dims = dims or ((64, 128, 256, 512) if full else (128,))
    for d in dims:
        fwd = C.FWD[d] if full else C.FWD[d][:1]
        dkdv = C.DKDV[d] if full else C.DKDV[d][:1]
        dq = C.DQ[d] if full else C.DQ[d][:1]
        for bm, bn, w, s in fwd:
            for q_on_load in (1, 0):
                yield (f"fwd d{d} {bm}x{bn} w{w} s{s} q_on_load={q_on_load}", A._attn_fwd_kernel,
                       _attn_consts(d, bm, bn, Q_ON_LOAD=q_on_load), w, s)
        for bm, bn, w, s in dkdv:
            yield (f"dkdv d{d} {bm}x{bn} w{w} s{s}", A._attn_bwd_dkdv_kernel,
                   _attn_consts(d, bm, bn, SPLIT=2, ATOMIC=1), w, s)
        for bm, bn, w, s in dq:
            yield (f"dq d{d} {bm}x{bn} w{w} s{s}", A._attn_bwd_dq_kernel,
                   _attn_consts(d, bm, bn), w, s)
        # the sliding window and softcap paths (constexpr), on each kernel's first row
        feats = dict(WINDOW=True, SOFTCAP=True)
        for name, fn, rows, extra in (("fwd", A._attn_fwd_kernel, C.FWD, dict(Q_ON_LOAD=0)),
                                      ("dkdv", A._attn_bwd_dkdv_kernel, C.DKDV,
                                       dict(SPLIT=2, ATOMIC=1)),
                                      ("dq", A._attn_bwd_dq_kernel, C.DQ, {})):
            bm, bn, w, s = rows[d][0]
            yield (f"{name} window+softcap d{d} {bm}x{bn} w{w} s{s}", fn,
                   _attn_consts(d, bm, bn, **feats, **extra), w, s)
            # seqlen_q != seqlen_k (SHIFT: keys over CU_K, always with the WINDOW masks)
            yield (f"{name} qk-lengths d{d} {bm}x{bn} w{w} s{s}", fn,
                   _attn_consts(d, bm, bn, WINDOW=True, SHIFT=True, **extra), w, s)
    yield ("bwd_preprocess d128", A._bwd_preprocess_kernel,
           dict(HEAD_DIM=128, BLOCK_D=128, BLOCK_T=32, HAS_DLSE=True), 4, 1)
    yield ("rope d256 p0.75", R._rope_kernel,
           dict(R=96, R_PAD=128, N_ID=64, ID_PAD=64, CONJUGATE=False, COPY_IDENTITY=True,
                EMULATE=False, BLOCK_T=16), 4, 1)
    # the backward's fp32 dK' sums rotated back into the low-precision dk (GQA/MQA split)
    yield ("rope fp32->lowp d256 p0.75 conjugate", R._rope_kernel,
           dict(R=96, R_PAD=128, N_ID=64, ID_PAD=64, CONJUGATE=True, COPY_IDENTITY=True,
                EMULATE=False, BLOCK_T=16, _X_DTYPE="fp32"), 4, 1)


SMEM_LIMIT = {80: 163 * 1024, 90: 227 * 1024}


def check(archs=(80, 90), dts=("bf16", "fp16")):
    for arch in archs:
        for dt in dts:
            for name, fn, consts, warps, stages in _cases(full=False):
                k = _compile(fn, consts, dt, arch, warps, stages)
                assert k.asm.get("cubin"), f"{name}: no cubin for sm_{arch}"
                assert k.metadata.shared <= SMEM_LIMIT[arch], \
                    f"{name}: {k.metadata.shared} B shared memory on sm_{arch}"
                print(f"ok sm_{arch} {dt} {name}", flush=True)
    check_spills()
    from prope_kernels.backends.triton import attention as A
    check_scale_fold(A._attn_fwd_kernel, _attn_consts(128, 128, 64, Q_ON_LOAD=0), "fwd d128 "
                     "128x64 w8 s3", 8, 3)


# The untuned defaults (first row of each table: what runs with PROPE_AUTOTUNE=0 and the first
# candidate the autotuner tries) must not spill much on sm_90. Earlier tables spilled 0.7-4 KiB a
# thread at head_dim 256; the exact figure moves a little between Triton versions.
STACK_LIMIT = 512
# head_dim 512 (one 64-row fp32 accumulator of 512 columns is 128 registers a thread at 8 warps):
# the first rows spill 0.15-0.6 KiB (fwd 144-168 B, dkdv 160-296 B, dq 544-600 B with Triton
# 3.6-3.9); the guard catches a return to the 0.9-3 KiB of earlier rows.
STACK_LIMIT_D512 = 768


def check_spills():
    from prope_kernels.backends.triton import attention as A
    from prope_kernels.backends.triton.configs import TABLES
    for d in (128, 256, 512):
        rows = {k: TABLES[k][d][0] for k in TABLES}
        for name, fn, consts in (
                ("fwd", A._attn_fwd_kernel, dict(Q_ON_LOAD=0)),
                ("dkdv", A._attn_bwd_dkdv_kernel, dict(SPLIT=2, ATOMIC=1)),
                ("dq", A._attn_bwd_dq_kernel, {})):
            bm, bn, w, st = rows[name]
            k = _compile(fn, _attn_consts(d, bm, bn, **consts), "bf16", 90, w, st)
            regs, stack = _resource_usage(k.asm["cubin"])
            assert stack <= (STACK_LIMIT_D512 if d == 512 else STACK_LIMIT), \
                f"{name} d{d} {rows[name]}: {stack} B of register spills a thread on sm_90"
            print(f"ok spills sm_90 {name} d{d} {rows[name]}: regs {regs}, stack {stack} B",
                  flush=True)


def _sass_loops(cubin: bytes) -> list:
    """The loops of a cubin's SASS, in address order: ((first, last address), {opcode: count})
    per backward branch
    (cuobjdump -sass, shipped in Triton's wheel). Predicates and modifiers past the first dot
    are dropped (FMUL.FTZ counts as FMUL)."""
    import tempfile
    tool = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "cuobjdump")
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(cubin)
        f.flush()
        text = subprocess.run([tool, "-sass", f.name], capture_output=True, text=True).stdout
    ins = [(int(m.group(1), 16), re.sub(r"^@!?U?P\w+\s+", "", m.group(2)).split()[0])
           for m in re.finditer(r"/\*([0-9a-f]{4,})\*/\s+([^;]*);", text)]
    ranges = []
    for m in re.finditer(r"/\*([0-9a-f]{4,})\*/\s+[^;]*?\bBRA\b[^;]*?(0x[0-9a-f]+)", text):
        src, dst = int(m.group(1), 16), int(m.group(2), 16)
        if dst < src:
            ranges.append((dst, src))
    loops = []
    for lo, hi in sorted(ranges):
        c = {}
        for addr, name in ins:
            if lo <= addr <= hi:
                c[name.split(".")[0]] = c.get(name.split(".")[0], 0) + 1
        loops.append(((lo, hi), c))
    return loops


def _first_mma_loop(cubin: bytes) -> dict:
    """Opcode counts of the first innermost loop with tensor-core ops (HGMMA on sm_90): some
    backward branches (mbarrier retries) span the whole kernel; those enclose other loops."""
    mma = [(r, c) for r, c in _sass_loops(cubin) if c.get("HGMMA")]
    inner = [(r, c) for r, c in mma
             if not any(o != r and r[0] <= o[0] and o[1] <= r[1] for o, _ in mma)]
    return inner[0][1]


def check_scale_fold(fn, consts, name, warps, stages):
    """The forward's softmax scale rides in exp2's FMA (x * scale_log2e - m): the unmasked key
    loop multiplies only to rescale the accumulator (BLOCK_M x d / threads FMULs, plus a few),
    not each score again (that was BLOCK_M x BLOCK_N / threads more: 96 instead of 66 at d128,
    128x64, 8 warps)."""
    k = _compile(fn, consts, "bf16", 90, warps, stages)
    threads = 32 * warps
    loop = _first_mma_loop(k.asm["cubin"])     # causal: the unmasked loop comes first
    acc = consts["BLOCK_M"] * consts["HEAD_DIM"] // threads
    scores = consts["BLOCK_M"] * consts["BLOCK_N"] // threads
    print(f"scale fold sm_90 {name}: FMUL {loop.get('FMUL', 0)}, FFMA {loop.get('FFMA', 0)}, "
          f"MUFU {loop.get('MUFU', 0)} a loop iteration (acc {acc}, scores {scores} a thread)",
          flush=True)
    assert loop.get("FMUL", 0) <= acc + 8, f"{name}: the softmax scale is not folded into an FMA"
    assert loop.get("FFMA", 0) >= scores, f"{name}: fewer FFMAs than scores a thread"


def test_kernels_compile_for_gpu():
    # Under TRITON_INTERPRET=1 (the CPU test setting) @triton.jit returns interpreter objects,
    # so the ahead-of-time compile runs in a fresh process without it.
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env["PYTHONPATH"] = os.pathsep.join([root, env.get("PYTHONPATH", "")])
    r = subprocess.run([sys.executable, os.path.abspath(__file__), "--check"], env=env,
                       capture_output=True, text=True, timeout=1800)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    # 2 archs x 2 dtypes x (fwd in both Q modes, dkdv, dq, their window+softcap and qk-lengths
    # variants, preprocess, rope, fp32->lowp rope)
    assert r.stdout.count("ok sm_") == 2 * 2 * 13, r.stdout[-3000:]
    # the untuned defaults at head_dim 128, 256 and 512: fwd, dkdv, dq
    assert r.stdout.count("ok spills sm_90") == 3 * 3, r.stdout[-3000:]
    assert r.stdout.count("scale fold sm_90") == 1, r.stdout[-3000:]


def _resource_usage(cubin: bytes) -> tuple:
    """(registers, stack bytes) a thread, from cuobjdump (shipped in Triton's wheel)."""
    import tempfile
    tool = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "cuobjdump")
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(cubin)
        f.flush()
        out = subprocess.run([tool, "-res-usage", f.name], capture_output=True, text=True).stdout
    m = re.search(r"REG:(\d+) STACK:(\d+)", out)
    assert m, f"cuobjdump -res-usage printed no REG/STACK: {out[-500:]}"
    return int(m.group(1)), int(m.group(2))


# --- the Hopper kernels (prope_kernels/backends/triton/hopper.py): every config of every table --

# Register spill bound a thread for the Hopper kernels' configs (the tables keep only rows under it)
HOPPER_STACK_LIMIT = 256


def _hopper_cases():
    from prope_kernels.backends.triton import hopper as H
    for name, fn, extra in (
            ("hfwd", H._hfwd_kernel, {}),
            ("hbwd", H._hbwd_kernel, dict(SPLIT=2, ATOMIC=True, FUSED_DQ=True,
                                          _TYPES=dict(DQ="*fp32", DK="*fp32", DV="*fp32"))),
            ("hdkdv", H._hbwd_kernel, dict(SPLIT=2, ATOMIC=True, FUSED_DQ=False,
                                           _TYPES=dict(DK="*fp32", DV="*fp32"))),
            ("hdq", H._hdq_kernel, {})):
        for d, rows in H.TABLES[name].items():
            for bm, bn, w, st in rows:
                consts = dict(GROUP=2, HEAD_DIM=d, CAUSAL=True, EMULATE=False, BLOCK_M=bm,
                              BLOCK_N=bn, **extra)
                if fn is H._hbwd_kernel:
                    consts["KV_RELOAD"] = d >= 128   # as the launcher sets it
                yield f"{name} d{d} {bm}x{bn} w{w} s{st}", fn, consts, w, st


def check_hopper():
    """Compile every Hopper config for sm_90; each must use wgmma and TMA (cp.async.bulk.tensor)
    and spill at most HOPPER_STACK_LIMIT bytes a thread. And the forward's scale fold."""
    from prope_kernels.backends.triton import hopper as H
    for name, fn, consts, warps, stages in _hopper_cases():
        k = _compile(fn, dict(consts), "bf16", 90, warps, stages)
        ptx = k.asm["ptx"]
        regs, stack = _resource_usage(k.asm["cubin"])
        n_wgmma, n_tma = ptx.count("wgmma.mma_async"), ptx.count("cp.async.bulk.tensor")
        print(f"hopper sm_90 {name}: wgmma {n_wgmma}, tma {n_tma}, regs {regs}, stack {stack} B, "
              f"smem {k.metadata.shared // 1024} KiB", flush=True)
        assert n_wgmma > 0, f"{name}: no wgmma in the sm_90 PTX (fell back to mma.sync)"
        assert n_tma > 0, f"{name}: no cp.async.bulk.tensor (TMA) in the sm_90 PTX"
        assert stack <= HOPPER_STACK_LIMIT, f"{name}: {stack} B of register spills a thread"
        assert k.metadata.shared <= SMEM_LIMIT[90], f"{name}: {k.metadata.shared} B shared memory"
        print(f"ok hopper {name}", flush=True)
    check_scale_fold(H._hfwd_kernel, dict(GROUP=2, HEAD_DIM=128, CAUSAL=True, EMULATE=False,
                                          BLOCK_M=128, BLOCK_N=128), "hfwd d128 128x128 w8 s3",
                     8, 3)


def test_hopper_kernels_compile_for_sm90():
    from prope_kernels.backends.triton import hopper as H
    if not H.triton_supports():
        pytest.skip(f"Triton {triton.__version__} has no device-side tensor descriptors")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env["PYTHONPATH"] = os.pathsep.join([root, env.get("PYTHONPATH", "")])
    r = subprocess.run([sys.executable, os.path.abspath(__file__), "--check-hopper"], env=env,
                       capture_output=True, text=True, timeout=3000)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    n = sum(len(rows) for t in H.TABLES.values() for rows in t.values())
    assert r.stdout.count("ok hopper ") == n, r.stdout[-3000:]
    assert r.stdout.count("scale fold sm_90") == 1, r.stdout[-3000:]


if __name__ == "__main__":
    if "--check" in sys.argv:
        check()
        sys.exit(0)
    if "--check-hopper" in sys.argv:
        check_hopper()
        sys.exit(0)
    if "--hopper" in sys.argv:
        only = [a for a in sys.argv[1:] if not a.startswith("--")]
        for name, fn, consts, warps, stages in _hopper_cases():
            if only and not any(name.startswith(o) for o in only):
                continue
            try:
                k = _compile(fn, dict(consts), "bf16", 90, warps, stages)
            except Exception as e:  # noqa: BLE001 - a table survey prints every row
                print(f"{name}: FAILED {str(e).splitlines()[-1][:200]}", flush=True)
                continue
            regs, stack = _resource_usage(k.asm["cubin"])
            ptx = k.asm["ptx"]
            print(f"{name}: wgmma {ptx.count('wgmma.mma_async')}, tma "
                  f"{ptx.count('cp.async.bulk.tensor')}, regs {regs}, stack {stack} B, smem "
                  f"{k.metadata.shared // 1024} KiB", flush=True)
        sys.exit(0)
    arch = int(os.environ.get("ARCH", "90"))
    dims = None
    if "--dims" in sys.argv:
        dims = tuple(int(x) for x in sys.argv[sys.argv.index("--dims") + 1].split(","))
    for name, fn, consts, warps, stages in _cases(full="--all" in sys.argv, dims=dims):
        k = _compile(fn, consts, "bf16", arch, warps, stages)
        regs, stack = _resource_usage(k.asm["cubin"])
        print(f"sm_{arch} {name}: smem {k.metadata.shared // 1024} KiB, regs {regs}, "
              f"stack {stack} B", flush=True)
