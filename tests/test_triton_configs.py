"""Every tuned Triton config, run once on a GPU against the float64 reference.

The autotuner may pick any row of the config tables in
``prope_kernels/backends/triton/configs.py``; the other GPU tests run with PROPE_AUTOTUNE=0
(first row only, see conftest.py), so this file is what checks the rest. Each case forces one
(kernel, config) and runs forward and backward at an odd GQA shape with rotation; a wrong mask, a
bad pipelining choice or a miscompile shows up as an error above the tolerance rule (or NaN,
outputs being poisoned).
"""

import pytest
import torch

from harness import run_dense


def _cases():
    from prope_kernels.backends.triton.configs import TABLES
    for kernel, table in TABLES.items():
        for d in (64, 128, 256, 512):
            for row in table[d]:
                for q_mode in ((1, 0) if kernel == "fwd" else (None,)):
                    yield kernel, d, row + ((q_mode,) if q_mode is not None else ())


@pytest.mark.gpu
@pytest.mark.parametrize("kernel,d,row", list(_cases()),
                         ids=lambda x: "x".join(map(str, x)) if isinstance(x, tuple) else str(x))
def test_every_tuned_config(monkeypatch, kernel, d, row):
    from prope_kernels.backends.triton.tuning import force_config
    # the portable kernels' tables: on an sm_90 GPU the dispatch would pick the Hopper kernels
    # (tests/test_hopper.py runs every config of theirs)
    monkeypatch.setenv("PROPE_TRITON_KERNELS", "portable")
    s = 1000 if d <= 256 else 333
    with force_config(kernel, row):
        run_dense("cuda", torch.bfloat16, 2, s, 8, 2, d, p=0.75, causal=True)


def test_config_selection_rules(monkeypatch):
    # The pruning the GPU autotuner applies (it is bypassed under the interpreter, which has a
    # single config): all rows of the bucket by default, the first with PROPE_AUTOTUNE=0, exactly
    # the forced one under force_config, and a clear error for a row not in the table.
    from prope_kernels.backends.triton import configs as C, tuning
    fwd = [C.fwd_cfg(*row, q) for row in C.rows(C.FWD) for q in (1, 0)]
    dq = [C.cfg(*row) for row in C.rows(C.DQ)]

    def rows(cfgs):
        return [(c.kwargs["BLOCK_M"], c.kwargs["BLOCK_N"], c.num_warps, c.num_stages)
                + ((c.kwargs["Q_ON_LOAD"],) if "Q_ON_LOAD" in c.kwargs else ()) for c in cfgs]

    prune_fwd, prune_dq = C.prune("fwd"), C.prune("dq")
    monkeypatch.setenv("PROPE_AUTOTUNE", "1")
    assert sorted(rows(prune_dq(dq, {"HEAD_DIM": 200}))) == sorted(C.DQ[256])
    # no rotation: the pre-rotated Q mode is pointless and dropped
    got = rows(prune_fwd(fwd, {"HEAD_DIM": 128, "N_ROT": 0}))
    assert sorted(got) == sorted(r + (1,) for r in C.FWD[128])
    assert len(rows(prune_fwd(fwd, {"HEAD_DIM": 128, "N_ROT": 5}))) == 2 * len(C.FWD[128])
    monkeypatch.setenv("PROPE_AUTOTUNE", "0")
    assert rows(prune_dq(dq, {"HEAD_DIM": 64})) == [C.DQ[64][0]]
    assert rows(prune_fwd(fwd, {"HEAD_DIM": 256, "N_ROT": 3})) == [C.FWD[256][0] + (0,)]
    row = C.FWD[256][2] + (1,)
    with tuning.force_config("fwd", row):
        assert rows(prune_fwd(fwd, {"HEAD_DIM": 256, "N_ROT": 3})) == [row]
    with tuning.force_config("dq", (999, 1, 1, 1)):
        with pytest.raises(ValueError, match="not a config of head_dim 64"):
            prune_dq(dq, {"HEAD_DIM": 64})
    assert not C.FORCED
