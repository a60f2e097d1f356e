"""The benchmark suite of prope_kernels: the fused op against the attention users would otherwise
run. ``prope-bench --help`` (``pip install "prope_kernels[bench]"``; also ``python -m
prope_kernels.bench``, and ``python -m bench`` from the repository root); see bench/README.md.

Modules: cases (shapes, presets, sweeps), providers (the provider table), check (spot check
against the reference), runner (build, check, time), bars (the speed bars), report / plots (the
report writer), env (machine, versions, what code ran), cli; breakdown (GPU time per kernel of
one call) and hf_throughput (a patched Hugging Face model's training throughput) are commands of
their own (``python -m prope_kernels.bench.breakdown``, ...).
"""
