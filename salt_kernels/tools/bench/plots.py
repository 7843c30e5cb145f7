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
    # side by side for a few shapes, one above the other for many (a readable width)
    stacked = len(shapes) > 5
    fig, axes = plt.subplots(2 if stacked else 1, 1 if stacked else 2, squeeze=False,
                             figsize=(max(8, 1.2 * len(shapes)), 8.5) if stacked else (max(8, 3.2 * len(shapes)), 4.8))
    axes = list(axes.flat)
    width = 0.8 / len(names)
    for ax, mode in zip(axes, MODES):
        for j, name in enumerate(names):
            xs = [i + (j - (len(names) - 1) / 2) * width for i in range(len(shapes))]
            vals = []
            for x, s in zip(xs, shapes):
                r = find.get((s, mode, name))
                ratio = getattr(r, attr) if r is not None else None
                vals.append(ratio.median if ratio is not None else math.nan)
                if r is not None and r.skip:
                    _note(ax, x, r.skip)
            bars = ax.bar(xs, vals, width, label=name)
            ax.bar_label(bars, labels=["" if v != v else f"{v:.2g}" for v in vals], fontsize=6)
        for i, s in enumerate(shapes):  # the baseline itself skipped: no bars at all there
            b = find.get((s, mode, base))
            if b is not None and b.skip:
                _note(ax, i, f"{base} {b.skip}")
        ax.set_xlim(-0.5, len(shapes) - 0.5)  # keep room for shapes that have notes only
        ax.axhline(1.0, color="k", lw=0.8)
        ax.set_yscale("log")
        lo, hi = ax.get_ylim()  # label more ticks when the bars span less than a decade
        subs = (1.0, 1.5, 2.0, 3.0, 5.0, 7.0) if hi / lo < 10 else (1.0, 2.0, 5.0)
        ax.yaxis.set_major_locator(LogLocator(base=10, subs=subs))
        ax.yaxis.set_major_formatter(FormatStrFormatter("%g"))
        ax.yaxis.set_minor_formatter(NullFormatter())
        ax.set_xticks(range(len(shapes)), [s.short for s in shapes], fontsize=7)
        ax.set_ylabel(f"speed-up over {base} (×)")
        ax.set_title(mode, fontsize=10)
        ax.grid(axis="y", which="both", alpha=0.3)
    handles, labels = axes[0].get_legend_handles_labels()
    top = 1 - 0.45 / fig.get_figheight()  # room for the title and the legend, in inches
    fig.legend(handles, labels, loc="upper center", bbox_to_anchor=(0.5, top), ncol=min(len(names), 6),
               fontsize=7, frameon=False)
    fig.suptitle(title, fontsize=9, y=0.995)
    fig.tight_layout(rect=(0, 0, 1, top - 0.25 / fig.get_figheight()))
    return fig


def _note(ax, x, text):
    """Vertical grey text at data position ``x``, from near the bottom of the axes up."""
    ax.text(x, 0.03, text, rotation=90, fontsize=6, ha="center", va="bottom", color="0.35",
            transform=ax.get_xaxis_transform())
