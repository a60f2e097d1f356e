"""`python -m bench` from the repository root: the same command as `prope-bench`."""
from prope_kernels.bench.cli import main

raise SystemExit(main())
