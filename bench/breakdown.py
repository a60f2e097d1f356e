"""`python -m bench.breakdown` from the repository root: ``prope_kernels.bench.breakdown``."""
from prope_kernels.bench.breakdown import main

if __name__ == "__main__":
    raise SystemExit(main())
