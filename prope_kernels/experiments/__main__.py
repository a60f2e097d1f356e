"""``prope-experiment table2 ...`` / ``prope-experiment frequencies CHECKPOINT ...``."""

from __future__ import annotations

import sys

COMMANDS = {
    "table2": "train the paper's seven encodings, several seeds; table, JSON, curves",
    "frequencies": "per-layer, per-frequency q/k/v norms of a checkpoint; heatmaps, arrays",
}


def main(argv=None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] not in COMMANDS:
        if argv and argv[0] not in ("-h", "--help"):
            print(f"prope-experiment: error: unknown command {argv[0]!r}", file=sys.stderr)
        print("usage: prope-experiment {table2,frequencies} [options]   (--help on each)\n" +
              "\n".join(f"  {k:12s} {v}" for k, v in COMMANDS.items()),
              file=sys.stderr if argv and argv[0] not in ("-h", "--help") else sys.stdout)
        return 0 if argv and argv[0] in ("-h", "--help") else 2
    if argv[0] == "table2":
        from .table2 import main as run
    else:
        from .frequencies import main as run
    return run(argv[1:])


if __name__ == "__main__":
    sys.exit(main())
