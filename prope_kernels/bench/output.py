"""Outputs of a run in one folder: results.json, results.csv, report.md and PNG plots."""

from __future__ import annotations

import csv
import json
import math
from pathlib import Path

from .bars import bars
from .markdown import markdown

META_CSV = ("run_kind", "gpu", "driver", "torch", "torch_cuda", "cudnn", "triton", "date_utc",
            "git_commit")


def write_all(out_dir: Path, meta: dict, settings: dict, rows: list, plots: bool = True):
    out_dir.mkdir(parents=True, exist_ok=True)
    files = {"png": []}
    if plots:
        try:
            from .plots import write_plots
            files["png"] = write_plots(out_dir, meta, rows)
            meta.pop("plots", None)  # a re-render with matplotlib clears an earlier "skipped"
        except ImportError as e:
            if (e.name or "").split(".")[0] != "matplotlib":
                raise
            meta["plots"] = "skipped: matplotlib is not installed (pip install matplotlib)"
    rows = [{k: (None if isinstance(x, float) and not math.isfinite(x) else x)
             for k, x in r.items()} for r in rows]  # strict JSON: no NaN
    files["json"] = out_dir / "results.json"
    files["json"].write_text(json.dumps(
        {"schema": 1, "meta": meta, "settings": settings,
         "bars": bars(rows, meta.get("run_kind")), "results": rows},
        indent=1, default=_jsonable))
    files["csv"] = out_dir / "results.csv"
    write_csv(files["csv"], meta, rows)
    files["md"] = out_dir / "report.md"
    files["md"].write_text(markdown(meta, settings, rows, files["png"]))
    return files


def _jsonable(x):
    if isinstance(x, float) and not math.isfinite(x):
        return None
    return str(x)


def write_csv(path, meta, rows):
    if not rows:
        path.write_text("")
        return
    fields = list(rows[0].keys()) + [k for k in META_CSV if k not in rows[0]]
    with open(path, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=fields)
        w.writeheader()
        for r in rows:
            w.writerow({**r, **{k: meta.get(k) for k in META_CSV}})
