"""The repository's side of the benchmark; the suite itself is ``prope_kernels.bench``,
installed with the package (``pip install ".[bench]"`` gives the ``prope-bench`` command).

From the repository root, ``python -m bench`` runs ``prope-bench`` (and ``python -m
bench.breakdown`` / ``bench.hf_throughput`` the commands of the same names in
``prope_kernels.bench``). What lives here is the repository's alone: the committed runs
(results/), the generator of the READMEs' performance tables (publish.py, publish.json), the
summary of ``.ci/gpu_check.sh quick`` (gpu_summary.py) and the pytest-benchmark tests
(conftest.py, test_bench_kernels.py). See README.md here.
"""
