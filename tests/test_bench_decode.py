"""prope_kernels.bench_decode: the smoke shape runs on the CPU, writes its rows, and the providers
compute the same decode step (so the benchmark compares like with like)."""

import json
import math

import torch

from prope_kernels import bench_decode as B


def test_smoke_runs_and_writes_json(tmp_path):
    path = tmp_path / "decode.json"
    rows = B.main(["--smoke", "--json", str(path)])
    names = {r["provider"] for r in rows}
    assert {"prope p=1.0", "prope p=0.75", "prope p=1.0 checked", "sdpa+rope"} <= names
    assert all(math.isfinite(r["ms_median"]) and r["ms_median"] > 0 for r in rows)
    assert json.loads(path.read_text())["rows"] == rows
    assert len(B.bars(rows)) == 1


def test_providers_agree():
    outs = {}
    for name in ("prope p=1.0", "sdpa+rope"):
        case = B.make_case(3, 37, (6, 2, 32), "cpu", torch.float64, seed=1)   # fresh caches
        outs[name] = B.providers(case)[name]()
    want = outs["sdpa+rope"].transpose(1, 2)                       # (b, 1, hq, d)
    torch.testing.assert_close(outs["prope p=1.0"], want)
    p075 = B.providers(B.make_case(3, 37, (6, 2, 32), "cpu", torch.float64, seed=1))[
        "prope p=0.75"]()
    assert not torch.allclose(p075, want)                          # p matters: a real check
