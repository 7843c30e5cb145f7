"""Bar charts of the speed-ups (PNG, matplotlib)."""

from __future__ import annotations

import math
import os

from .methods import OFFICIAL, REFERENCE
from .report import MODES, Row

PLOTS = (("vs_reference", REFERENCE, "speedup_vs_reference.png"),
         ("vs_official", OFFICIAL, "speedup_vs_official.png"))


def write_plots(out_dir, rows: list[Row], title: str) -> list[str]:
    """One PNG per baseline that was run (:data:`PLOTS`, :func:`speedup_figure`).
    Returns the files written."""
    import matplotlib.pyplot as plt

    written = []
    for attr, base, fname in PLOTS:
        fig = speedup_figure(rows, attr, base, title)
        if fig is None:
            continue  # that baseline was not run
        path = os.path.join(out_dir, fname)
        fig.savefig(path, dpi=90)
        plt.close(fig)
        written.append(path)
    return written


def speedup_figure(rows: list[Row], attr: str, base: str, title: str):
    """Speed-up per shape over ``base`` (the ``attr`` ratio of each row), forward and
    forward+backward, one bar per method (log scale); None if ``base`` was not run.
    The legend sits above the axes, clear of the bars; a method skipped at a shape
    gets its reason written where its bar would be."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import FormatStrFormatter, LogLocator, NullFormatter

    shapes = list(dict.fromkeys(r.shape for r in rows))
    find = {(r.shape, r.mode, r.method.name): r for r in rows}
    names = [n for n in dict.fromkeys(r.method.name for r in rows) if n != base]
    if not names or not any(r.method.name == base for r in rows):
        return None
    fig, axes = plt.subplots(1, 2, figsize=(max(8, 1.6 * len(shapes) * 2), 4.8), squeeze=False)
    width = 0.8 / len(names)
    for ax, mode in zip(axes[0], MODES):
        for j, name in enumerate(names):
            xs = [i + (j - (len(names) - 1) / 2) * width for i in range(len(shapes))]
            vals = []
            for x, s in zip(xs, shapes):
                r = find.get((s, mode, name))
                ratio = getattr(r, attr) if r is not None else None
                vals.append(ratio.median if ratio is not None else math.nan)
                if r is not None and r.skip:
                    ax.text(x, 1.0, r.skip, rotation=90, fontsize=6, ha="center", va="bottom", color="0.35")
            bars = ax.bar(xs, vals, width, label=name)
            ax.bar_label(bars, labels=["" if v != v else f"{v:.2g}" for v in vals], fontsize=6)
        for i, s in enumerate(shapes):  # the baseline itself skipped: no bars at all there
            b = find.get((s, mode, base))
            if b is not None and b.skip:
                ax.text(i, 1.0, f"{base} {b.skip}", rotation=90, fontsize=6, ha="center", va="bottom",
                        color="0.35")
        ax.axhline(1.0, color="k", lw=0.8)
        ax.set_yscale("log")
        ax.yaxis.set_major_locator(LogLocator(base=10, subs=(1.0, 2.0, 5.0)))
        ax.yaxis.set_major_formatter(FormatStrFormatter("%g"))
        ax.yaxis.set_minor_formatter(NullFormatter())
        ax.set_xticks(range(len(shapes)), [s.short for s in shapes], fontsize=7)
        ax.set_ylabel(f"speed-up over {base} (×)")
        ax.set_title(mode, fontsize=10)
        ax.grid(axis="y", which="both", alpha=0.3)
    handles, labels = axes[0][0].get_legend_handles_labels()
    fig.legend(handles, labels, loc="upper center", bbox_to_anchor=(0.5, 0.95), ncol=min(len(names), 6),
               fontsize=7, frameon=False)
    fig.suptitle(title, fontsize=9, y=0.99)
    fig.tight_layout(rect=(0, 0, 1, 0.9))
    return fig
