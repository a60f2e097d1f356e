"""Decode benchmark: one new token per sequence over a long KV cache, GQA.

    python -m prope_kernels.bench_decode                 # the preset on a GPU
    python -m prope_kernels.bench_decode --smoke         # a tiny shape (CPU: the reference)
    python -m prope_kernels.bench_decode --json out.json

Each provider does the whole step: rotate q and the new k, write the new k/v into the cache at
``cache_seqlens``, attend over ``cache_seqlens + 1`` keys. Providers:

* ``prope``: :func:`prope_kernels.kvcache.prope_attention_with_kvcache` (Triton split-KV on a GPU),
  with ``check_cache_seqlens=False`` (no host copy, as flash-attn) and, as ``checked``, without;
* ``sdpa+rope``: cos/sin rotation in PyTorch, a slice write, ``scaled_dot_product_attention``
  with ``enable_gqa`` over the cache (same length for every sequence, so one call);
* ``flash_attn``: ``flash_attn_with_kvcache(..., rotary_cos, rotary_sin)`` when importable
  (skipped, not faked, when not).

All rotate the full head (p=1: the peers' RoPE) and the ``prope`` row is repeated at p=0.75.
Reported: median ms (20th/80th percentiles) and the K/V read bandwidth ``2*b*L*hkv*d*bytes / t``.
"""

from __future__ import annotations

import argparse
import json
import math

import torch

from .bench.runner import bench_cpu, bench_gpu
from .kvcache import prope_attention_with_kvcache

# (batch, cache_len): batch 32-64, cache 4k-32k; Llama-3-8B heads (32 q, 8 kv, d 128), bf16
PRESET = [(32, 4096), (64, 4096), (32, 16384), (64, 8192), (32, 32768)]
HEADS = (32, 8, 128)
SMOKE = [(2, 61)]
SMOKE_HEADS = (4, 2, 32)


def _rope_cos_sin(positions, d, theta, dtype):
    inv = theta ** (-torch.arange(0, d, 2, device=positions.device, dtype=torch.float64) / d)
    ang = positions.to(torch.float64)[..., None] * inv               # (..., d/2)
    return ang.cos().to(dtype), ang.sin().to(dtype)


def _rotate_half(x, cos, sin):
    # x (b, s, h, d), cos/sin (b, s, d/2): half layout (Llama's rotate_half)
    h = x.shape[-1] // 2
    c, s = cos[:, :, None], sin[:, :, None]
    x1, x2 = x[..., :h], x[..., h:]
    return torch.cat([x1 * c - x2 * s, x2 * c + x1 * s], dim=-1)


def make_case(b, cache_len, heads, device, dtype, seed=0):
    hq, hkv, d = heads
    g = torch.Generator(device=device).manual_seed(seed)

    def r(*shape):
        return torch.randn(*shape, generator=g, device=device, dtype=dtype)
    S = cache_len + 1                                                # room for the new token
    return dict(q=r(b, 1, hq, d), k=r(b, 1, hkv, d), v=r(b, 1, hkv, d), k_cache=r(b, S, hkv, d),
                v_cache=r(b, S, hkv, d), cache_len=cache_len,
                cache_seqlens=torch.full((b,), cache_len, dtype=torch.int32, device=device))


def providers(case, theta=10000.0, backend="auto"):
    """name -> zero-argument callable of one decode step."""
    q, k, v, kc, vc = (case[n] for n in ("q", "k", "v", "k_cache", "v_cache"))
    cs, L = case["cache_seqlens"], case["cache_len"]
    out = {}
    # unchecked cache_seqlens (no host copy), as flash-attn; "checked": the default call
    for p in (1.0, 0.75):
        out[f"prope p={p}"] = lambda p=p: prope_attention_with_kvcache(
            q, kc, vc, k, v, cache_seqlens=cs, p=p, theta=theta, backend=backend,
            check_cache_seqlens=False)
    out["prope p=1.0 checked"] = lambda: prope_attention_with_kvcache(
        q, kc, vc, k, v, cache_seqlens=cs, p=1.0, theta=theta, backend=backend)
    pos = torch.full((q.shape[0], 1), L, device=q.device)
    kc_t, vc_t = kc.transpose(1, 2), vc.transpose(1, 2)              # (b, hkv, S, d) views

    def sdpa_rope():
        cos, sin = _rope_cos_sin(pos, q.shape[-1], theta, q.dtype)
        qr, kr = _rotate_half(q, cos, sin), _rotate_half(k, cos, sin)
        kc[:, L:L + 1] = kr
        vc[:, L:L + 1] = v
        return torch.nn.functional.scaled_dot_product_attention(
            qr.transpose(1, 2), kc_t[:, :, :L + 1], vc_t[:, :, :L + 1], enable_gqa=True)
    out["sdpa+rope"] = sdpa_rope
    try:
        from flash_attn import flash_attn_with_kvcache
    except ImportError:
        flash_attn_with_kvcache = None
    if flash_attn_with_kvcache is not None and q.is_cuda:
        # flash-attn indexes cos/sin by cache position: tables (S, d/2)
        cos, sin = _rope_cos_sin(torch.arange(kc.shape[1], device=q.device)[None], q.shape[-1],
                                 theta, q.dtype)
        cos, sin = cos[0], sin[0]
        out["flash_attn"] = lambda: flash_attn_with_kvcache(
            q, kc, vc, k, v, rotary_cos=cos, rotary_sin=sin, cache_seqlens=cs, causal=True,
            rotary_interleaved=False)
    return out


def run(shapes, heads, dtype=torch.bfloat16, device=None, backend="auto"):
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    rows = []
    for b, L in shapes:
        case = make_case(b, L, heads, device, dtype)
        hq, hkv, d = heads
        nbytes = 2 * b * (L + 1) * hkv * d * torch.finfo(dtype).bits // 8
        for name, fn in providers(case, backend=backend).items():
            with torch.no_grad():
                t = bench_gpu(fn) if device == "cuda" else bench_cpu(fn)
            rows.append(dict(provider=name, batch=b, cache_len=L, q_heads=hq, kv_heads=hkv,
                             head_dim=d, dtype=str(dtype).replace("torch.", ""), **t,
                             gb_per_s=nbytes / (t["ms_median"] * 1e-3) / 1e9))
    return rows


def bars(rows):
    """Per shape: prope p=1.0 over the best peer (<= 1: at or below the best peer)."""
    out = {}
    for r in rows:
        key = (r["batch"], r["cache_len"])
        out.setdefault(key, {})[r["provider"]] = r["ms_median"]
    res = []
    for (b, L), t in out.items():
        peers = [v for n, v in t.items() if not n.startswith("prope")]
        best = min(peers) if peers else math.nan
        res.append(dict(batch=b, cache_len=L, ratio=t["prope p=1.0"] / best))
    return res


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--smoke", action="store_true", help="a tiny shape (runs on the CPU)")
    ap.add_argument("--json", help="write the rows here")
    args = ap.parse_args(argv)
    on_gpu = torch.cuda.is_available()
    if args.smoke:
        rows = run(SMOKE, SMOKE_HEADS, torch.bfloat16 if on_gpu else torch.float32)
    else:
        if not on_gpu:
            raise SystemExit("the decode preset needs a CUDA GPU (use --smoke on a CPU)")
        rows = run(PRESET, HEADS)
    dev = torch.cuda.get_device_name() if on_gpu else "cpu (smoke: no speed meaning)"
    print(f"# decode, {dev}, torch {torch.__version__}")
    print("| provider | batch | cache | ms (p20-p80) | K/V GB/s |\n|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['provider']} | {r['batch']} | {r['cache_len']} | {r['ms_median']:.3f} "
              f"({r['ms_p20']:.3f}-{r['ms_p80']:.3f}) | {r['gb_per_s']:.0f} |")
    for b in bars(rows):
        print(f"bar b={b['batch']} L={b['cache_len']}: prope p=1.0 / best peer = "
              f"{b['ratio']:.2f}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(dict(device=dev, torch=torch.__version__, rows=rows), f, indent=1)
    return rows


if __name__ == "__main__":
    main()
