"""``prope-train``: train a model (:mod:`prope_kernels.train`), or with ``--benchmark N`` time the
attention choices on its model and batch (:mod:`prope_kernels.train_bench`). This module sits
above both, so the trainer never imports its benchmark (which imports the trainer).

    prope-train --preset gemma-small                         # = python -m prope_kernels.train_main
    prope-train --preset gemma-2b --benchmark 4              # auto, unfused, cuda, triton, hf
"""

from __future__ import annotations

import sys

from . import train


def main(argv=None) -> int:
    cfg = train.parse_args(argv)
    if not cfg.benchmark:
        return train.main(argv)
    from .train_bench import benchmark

    try:
        args = sys.argv[1:] if argv is None else list(argv)
        benchmark(cfg, log=lambda line: print(line, flush=True),
                  command=" ".join(["prope-train"] + args))
    except train.UsageError as e:
        print(f"prope-train: error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
