"""The benchmark suite of prope_kernels: the fused op against the attention users would otherwise
run. ``prope-bench --help`` (installed with ``pip install "prope_kernels[bench]"``; also
``python -m prope_kernels.bench``, and ``python -m bench`` from the repository root); see
bench/README.md in the repository.

Modules: cases (shapes, presets, sweeps), providers (our op and the peers), user_rope (p-RoPE as
users write it), check (spot check against the reference), timing, runner, bars (the speed bars),
markdown / plots / output (the report), env (machine, versions, what code ran), cli; breakdown
(GPU time per kernel of one call) and hf_throughput (a patched Hugging Face model's training
throughput) are commands of their own (``python -m prope_kernels.bench.breakdown``, ...).
"""
