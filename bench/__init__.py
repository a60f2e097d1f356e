"""The repository's side of the benchmark (the suite is ``prope_kernels.bench``): ``python -m
bench``, the committed runs, publish.py, gpu_summary.py and pytest-benchmark."""
