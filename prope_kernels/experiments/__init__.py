"""Experiments that reproduce the p-RoPE paper (Barbero et al., ICLR 2025) with the package's
trainer: ``table2`` (the encodings compared, Table 2 in miniature) and ``frequencies`` (how a
trained model uses each RoPE frequency, Figures 3, 5, 6). One command: ``prope-experiment``."""


def main(argv=None) -> int:
    """The ``prope-experiment`` console script (see ``__main__``)."""
    from .__main__ import main as run
    return run(argv)
