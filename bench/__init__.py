"""The repository's side of the benchmark (the suite is ``prope_kernels.bench``): ``python -m
bench`` (= ``prope-bench``), the committed runs (results/), publish.py (the READMEs' tables),
gpu_summary.py (``.ci/gpu_check.sh quick``) and pytest-benchmark (test_bench_kernels.py)."""
