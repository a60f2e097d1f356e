"""Small helpers over result rows shared by the report writers."""

from __future__ import annotations

from collections import OrderedDict


def index(rows):
    """(case, provider, mode) -> row."""
    return {(r["case"], r["provider"], r["mode"]): r for r in rows}


def ordered(seq):
    """Unique items in first-seen order."""
    return list(OrderedDict.fromkeys(seq))
