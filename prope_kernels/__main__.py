"""``python -m prope_kernels``: the configuration report (``prope-kernels config``)."""

import sys

from .config import main

if __name__ == "__main__":
    sys.exit(main())
