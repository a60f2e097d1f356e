"""Benchmark suite of prope_kernels: ``python -m bench --help`` (see bench/README.md).

Modules: cases (shapes, presets, sweeps), providers (our op and the peers), user_rope (p-RoPE as
users write it), check (spot check against the reference), timing, runner, report, env, cli.
"""
