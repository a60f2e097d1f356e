"""`python -m bench.hf_throughput` from the repository root: prope_kernels.bench.hf_throughput."""
from prope_kernels.bench.hf_throughput import main

if __name__ == "__main__":
    raise SystemExit(main())
