"""The benchmark suite of prope_kernels: the fused op against the attention users would otherwise
run. ``prope-bench --help`` (also ``python -m prope_kernels.bench``, and ``python -m bench`` from
the repository root); modules and commands: bench/README.md.
"""
