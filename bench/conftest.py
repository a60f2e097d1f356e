"""pytest setup for the kernel benchmarks in bench/ (not collected by `pytest tests/`).

    pytest bench/ --benchmark-only --benchmark-save=NAME      # on a GPU
    pytest-benchmark compare                                  # compare saved runs

Without a GPU the GPU benchmarks skip and only a tiny CPU smoke variant runs (the Triton kernels
under the interpreter: TRITON_INTERPRET must be set before triton is first imported, so here).
"""

import os

import torch

if torch.cuda.is_available():
    os.environ.pop("PROPE_POISON", None)  # NaN-filling outputs would be timed too
else:
    os.environ.setdefault("TRITON_INTERPRET", "1")


def pytest_addoption(parser):
    g = parser.getgroup("prope bench")
    g.addoption("--bench-presets", default="gemma-2b,llama-gqa,mha-d64",
                help="presets to time (comma-separated; see prope-bench --list)")
    from prope_kernels.bench.providers import PYTEST_BENCH_PROVIDERS
    g.addoption("--bench-providers", default=",".join(PYTEST_BENCH_PROVIDERS),
                help="providers to time (names or shell patterns)")
    g.addoption("--bench-modes", default="fwd,fwd_bwd", help="fwd, bwd, fwd_bwd")


def pytest_generate_tests(metafunc):
    from prope_kernels.bench.providers import select
    opt = metafunc.config.getoption
    if "gpu_preset" in metafunc.fixturenames:
        metafunc.parametrize("gpu_preset", [x for x in opt("--bench-presets").split(",") if x])
    if "gpu_provider" in metafunc.fixturenames:
        metafunc.parametrize("gpu_provider", select(opt("--bench-providers")))
    if "mode" in metafunc.fixturenames:
        metafunc.parametrize("mode", [m.replace("+", "_") for m in
                                      opt("--bench-modes").split(",") if m])
