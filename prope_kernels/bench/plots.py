"""PNG plots of a run: TFLOP/s vs seqlen, time vs p, TFLOP/s per preset (matplotlib, Agg)."""

from __future__ import annotations

from pathlib import Path

from .bars import ordered
from .cases import MODE_LABELS, banner
from .providers import PROVIDERS


def _style(prov):  # ours bold; no-RoPE dashed; peers with compiled RoPE solid, eager dotted
    p = PROVIDERS.get(prov)
    return {} if p is None else {"ours": dict(lw=2.6, marker="o"),
                                 "no-rope": dict(lw=1.4, ls="--", marker="s")}.get(
        p.kind, dict(lw=1.4, ls="-" if p.rope == "compiled" else ":", marker="."))


def _label(prov):
    return PROVIDERS[prov].label if prov in PROVIDERS else prov


LEGEND_FONT = 8  # points
GAP_IN = 0.12  # inches between the panels and the legend, and around the title


def _plot(out_dir: Path, meta, name, what, panels, draw, panel_size=(6.5, 4.8)):
    """A row of panels, ``draw(ax, item)`` filling each; titled with machine and versions, one
    legend below all panels (never over the data; as many columns as fit), a watermark on smoke
    runs; log y axes on a CPU smoke run (its timings are orders of magnitude apart). Saved as
    ``name``; returns its path."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    cpu = meta.get("run_kind") == "cpu-smoke"
    w, h = panel_size
    width = w * len(panels)
    fig, axes = plt.subplots(1, len(panels), figsize=(width, h), squeeze=False)
    for ax, item in zip(axes[0], panels):
        draw(ax, item)
        ax.grid(alpha=0.3)
        if cpu:
            ax.set_yscale("log")
            ax.set_ylabel(f"{ax.get_ylabel()}, log scale")
    gpu = meta.get("gpu") or "CPU"
    title = fig.suptitle(f"{what}: {gpu}, torch {meta['torch']}, triton {meta.get('triton')}, "
                         f"{meta['date_utc'][:10]}", fontsize=10)
    renderer = fig.canvas.get_renderer()
    title_in = title.get_window_extent(renderer).height / fig.dpi + GAP_IN
    # one legend entry per provider over all panels, in the order drawn; the most columns
    # whose legend fits the figure's width
    entries = {}
    for ax in axes[0]:
        for handle, label in zip(*ax.get_legend_handles_labels()):
            entries.setdefault(label, handle)
    legend_in = 0.0
    if entries:
        leg = None
        for ncol in range(len(entries), 0, -1):
            if leg is not None:
                leg.remove()
            leg = fig.legend(list(entries.values()), list(entries), loc="lower center",
                             ncol=ncol, fontsize=LEGEND_FONT, frameon=False,
                             bbox_to_anchor=(0.5, 0.0))
            if leg.get_window_extent(renderer).width <= 0.97 * fig.bbox.width:
                break
        legend_in = leg.get_window_extent(renderer).height / fig.dpi + GAP_IN
    total_h = h + legend_in + title_in
    fig.set_size_inches(width, total_h)
    if banner(meta):  # on each panel's data, never over the axis labels
        for ax in axes[0]:
            ax.text(0.5, 0.5, "CPU SMOKE RUN\nnot GPU figures" if cpu else "GPU SMOKE RUN",
                    ha="center", va="center", fontsize=24, color="red", alpha=0.25,
                    rotation=20, transform=ax.transAxes, zorder=5)
    fig.tight_layout(pad=0.6, rect=(0, legend_in / total_h, 1, 1 - title_in / total_h))
    path = out_dir / name
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def _colors(provs) -> dict:
    """provider -> colour, one for the whole figure: tab10, tab20 for more providers."""
    import matplotlib
    names = matplotlib.colormaps["tab10" if len(provs) <= 10 else "tab20"].colors
    return {p: names[i % len(names)] for i, p in enumerate(provs)}


def _lines(rs, x_key, y_key):
    """draw(ax, mode): one line per provider of rs, y against x."""
    provs = ordered(r["provider"] for r in rs)
    colors = _colors(provs)

    def draw(ax, mode):
        for p in provs:
            pts = sorted((r[x_key], r[y_key]) for r in rs
                         if r["provider"] == p and r["mode"] == mode)
            if pts:
                ax.plot(*zip(*pts), label=_label(p), color=colors[p], **_style(p))
        ax.set_title(MODE_LABELS[mode])
    return draw


def write_plots(out_dir: Path, meta, rows):
    pngs = []
    ok = [r for r in rows if r["status"] == "ok"]

    rs = [r for r in ok if r["group"] == "seqlen"]
    if rs:
        lines = _lines(rs, "seqlen", "tflops")
        xs = sorted({r["seqlen"] for r in rs})

        def draw(ax, mode):
            lines(ax, mode)
            ax.set_xscale("log", base=2)
            ax.set_xticks(xs)
            ax.set_xticklabels([f"{x // 1024}k" if x >= 1024 and x % 1024 == 0 else str(x)
                                for x in xs])
            ax.minorticks_off()
            ax.set_xlabel("seqlen")
            ax.set_ylabel("TFLOP/s")
        pngs.append(_plot(out_dir, meta, "tflops_vs_seqlen.png", "TFLOP/s vs seqlen",
                          ordered(r["mode"] for r in rs), draw))

    rs = [r for r in ok if r["group"] == "p"]
    if rs:
        lines = _lines(rs, "p", "ms_median")

        def draw(ax, mode):
            lines(ax, mode)
            ax.set_xlabel("p (fraction of rotated pairs)")
            ax.set_ylabel("ms (median)")
            if meta.get("run_kind") != "cpu-smoke":  # (log scale there: see _plot)
                ax.set_ylim(bottom=0)
        pngs.append(_plot(out_dir, meta, "time_vs_p.png", "time vs p",
                          ordered(r["mode"] for r in rs), draw, (6, 4.5)))

    rs = [r for r in ok if r["group"] == "preset" and r["mode"] == "fwd_bwd"]
    if not rs:
        rs = [r for r in ok if r["group"] == "preset"]
    if rs:
        mode = rs[0]["mode"]
        rs = [r for r in rs if r["mode"] == mode]
        cases = ordered(r["case"] for r in rs)
        provs = ordered(r["provider"] for r in rs)
        colors = _colors(provs)

        def draw(ax, mode):
            w = 0.8 / max(1, len(provs))
            for i, p in enumerate(provs):
                pts = [(j + i * w, r["tflops"]) for j, c in enumerate(cases)
                       for r in rs if r["case"] == c and r["provider"] == p]
                st = PROVIDERS.get(p)
                ours = st is not None and st.kind == "ours"
                ax.bar([x for x, _ in pts], [y for _, y in pts], w, label=_label(p),
                       color=colors[p], edgecolor="black" if ours else None,
                       hatch="//" if st is not None and st.kind == "no-rope" else None)
            ax.set_xticks([j + 0.4 - w / 2 for j in range(len(cases))])
            ax.set_xticklabels(cases, fontsize=8)
            ax.set_ylabel(f"TFLOP/s ({MODE_LABELS[mode]})")
        pngs.append(_plot(out_dir, meta, "presets_tflops.png",
                          f"presets, {MODE_LABELS[mode]}", [mode], draw,
                          (max(7, 1.6 * len(cases) + 3), 5)))
    return pngs
