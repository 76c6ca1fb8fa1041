"""Figures of an evaluation: transferability score vs true performance (paper Figures 2 and 3).

Matplotlib with the Agg backend (files only, no display). Each function writes one PNG
atomically and returns the data it plotted (points and fitted lines) so that callers and tests
can check what is in the picture without reading pixels.
"""

from __future__ import annotations

import contextlib
import os
import tempfile
from pathlib import Path
from typing import Any, Mapping, Sequence

import numpy as np

from cte_jax.files import as_if_created

# (model name, estimator score, true performance)
Point = tuple[str, float, float]

_MARKERS = ("o", "s", "^", "D", "v", "P", "X", "*", "<", ">")


def _pyplot():
    import matplotlib

    matplotlib.use("Agg", force=True)
    import matplotlib.pyplot as plt

    return plt


X_RESOLUTION = 1e-6  # relative spread of x below which no line is drawn (float32 has ~6e-8)


def least_squares_line(x: Sequence[float], y: Sequence[float]) -> tuple[float, float] | None:
    """``(slope, intercept)`` minimising ``sum (y - slope x - intercept)^2``; None with fewer
    than two points or constant x (no unique line). x that differs only by rounding (0.1 + 0.2
    against 0.3, a score stored once in float32 and once in float64) counts as constant: the
    line through it would be a meaningless near-vertical stroke."""
    x = np.asarray(x, np.float64)
    y = np.asarray(y, np.float64)
    if x.size < 2 or np.ptp(x) <= X_RESOLUTION * np.max(np.abs(x)):
        return None
    xm, ym = x.mean(), y.mean()
    sxx = np.sum((x - xm) ** 2)
    if not sxx > 0:  # NaN in x
        return None
    slope = float(np.sum((x - xm) * (y - ym)) / sxx)
    return slope, float(ym - slope * xm)


def _clean(points: Sequence[Point]) -> list[Point]:
    """Points with both coordinates finite (a model without score is not drawn)."""
    out = []
    for name, s, q in points:
        if s is None or q is None:
            continue
        if np.isfinite(s) and np.isfinite(q):
            out.append((str(name), float(s), float(q)))
    return out


def _save(fig, path: str | os.PathLike) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".png", dir=path.parent)
    os.close(fd)
    try:
        as_if_created(tmp)
        fig.savefig(tmp, dpi=150, bbox_inches="tight")
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise
    return path


# Where a point's name may go, in points from the point (nearest first): right, left, above,
# below, then the diagonals, then 2.2 and 4 times as far, then columns left and right of the point
# at heights up to 70 points (where a dense cluster has to stack its names). place_labels takes
# the first free one.
_LABEL_DIRECTIONS = ((5, -3), (-5, -3), (0, 6), (0, -12), (5, 5), (-5, 5), (5, -11), (-5, -11))
LABEL_OFFSETS = tuple((dx * f, dy * f) for f in (1, 2.2, 4) for dx, dy in _LABEL_DIRECTIONS) + tuple(
    (dx, dy) for dy in sorted(range(-70, 71, 10), key=abs) for dx in (12, -12, 35, -35))
# A name placed beyond the first ring gets a thin leader line to its point.
_NEAR_OFFSETS = frozenset(LABEL_OFFSETS[:len(_LABEL_DIRECTIONS)])
LEADER_GID = "label-leader"


def _annotate(ax, pts: Sequence[Point], color) -> list:
    """Name every point (placed for now to its right; :func:`place_labels` moves them apart)."""
    return [ax.annotate(name, (s, q), xytext=LABEL_OFFSETS[0], textcoords="offset points", fontsize=7, color=color,
                        ha="left") for name, s, q in sorted(pts, key=lambda p: (p[1], p[2]))]


def place_labels(fig, labels) -> None:
    """Move point labels so that they overlap neither each other, nor any point, nor the axes edge.

    Greedy, in display space, once the layout is final: each label (in the order given) takes the
    first offset of ``LABEL_OFFSETS`` whose text box is inside its axes and clear of every point,
    of its axes' legend and of the labels already placed; where none is, the one overlapping
    least. A label that ends up beyond the nearest ring is joined to its point by a thin line (gid
    ``LEADER_GID``), so that in a cluster each name can still be traced to its point.
    """
    if not labels:
        return
    fig.canvas.draw()
    renderer = fig.canvas.get_renderer()
    points = [ann.axes.transData.transform(ann.xy) for ann in labels]
    pad = 3.0  # display pixels kept around a marker

    def overlap(a, b) -> float:
        w = min(a[2], b[2]) - max(a[0], b[0])
        h = min(a[3], b[3]) - max(a[1], b[1])
        return w * h if w > 0 and h > 0 else 0.0

    legends = {}
    for ax in dict.fromkeys(ann.axes for ann in labels):
        leg = ax.get_legend()
        if leg is not None:
            e = leg.get_window_extent(renderer)
            legends[ax] = (e.x0, e.y0, e.x1, e.y1)
            # Pin a "best" legend where it is now: it is placed anew at every draw (the PNG is
            # drawn at another dpi, and after the leader lines below), and could land on labels.
            leg.set_loc(tuple(ax.transAxes.inverted().transform((e.x0, e.y0))))
    placed: list[tuple[float, float, float, float]] = []
    for ann in labels:
        frame = ann.axes.get_window_extent(renderer)
        legend = legends.get(ann.axes)
        best = None
        for dx, dy in LABEL_OFFSETS:
            ann.set_position((dx, dy))
            ann.set_horizontalalignment("left" if dx > 0 else "right" if dx < 0 else "center")
            e = ann.get_window_extent(renderer)
            box = (e.x0, e.y0, e.x1, e.y1)
            outside = (e.width * e.height) - overlap(box, (frame.x0, frame.y0, frame.x1, frame.y1))
            cost = outside + sum(overlap(box, o) for o in placed) + sum(
                overlap(box, (x - pad, y - pad, x + pad, y + pad)) for x, y in points)
            if legend is not None:
                cost += overlap(box, legend)
            if best is None or cost < best[0]:
                best = (cost, (dx, dy), ann.get_horizontalalignment(), box)
            if cost == 0:
                break
        ann.set_position(best[1])
        ann.set_horizontalalignment(best[2])
        placed.append(best[3])
        if best[1] not in _NEAR_OFFSETS:
            _leader(ann, best[3], renderer)


def _leader(ann, box, renderer) -> None:
    """A thin line from just outside ``ann``'s marker to the nearest point of its text box."""
    from matplotlib.lines import Line2D

    ax = ann.axes
    px, py = ax.transData.transform(ann.xy)
    tx, ty = min(max(px, box[0]), box[2]), min(max(py, box[1]), box[3])
    length = float(np.hypot(tx - px, ty - py))
    start = 5.0 * renderer.points_to_pixels(1.0)  # clear of the marker (radius ~2.6 pt)
    if length <= start:
        return
    sx, sy = px + (tx - px) * start / length, py + (ty - py) * start / length
    (x0, y0), (x1, y1) = ax.transData.inverted().transform([(sx, sy), (tx, ty)])
    # add_artist, not add_line: the line must not widen the data limits the labels were placed in.
    ax.add_artist(Line2D([x0, x1], [y0, y1], lw=0.5, color=ann.get_color(), alpha=0.8, zorder=2,
                         gid=LEADER_GID))


def _fit_line(ax, pts: Sequence[Point], color, style="-") -> dict | None:
    fit = least_squares_line([p[1] for p in pts], [p[2] for p in pts])
    if fit is None:
        return None
    xs = np.array([min(p[1] for p in pts), max(p[1] for p in pts)])
    ax.plot(xs, fit[0] * xs + fit[1], style, color=color, linewidth=1.2, alpha=0.8)
    return {"slope": fit[0], "intercept": fit[1]}


def _series_label(target: str, n: int, notes: Mapping[str, str] | None) -> str:
    note = (notes or {}).get(target)
    return f"{target} (n={n}{', ' + note if note else ''})"


PANELS_ABOVE = 3  # more targets than this: one panel per target (one shared panel is illegible)
PANEL_XTICKS = 5  # at most this many x intervals per panel, so tick labels do not touch


def score_vs_performance(points: Mapping[str, Sequence[Point]], path: str | os.PathLike, *,
                         xlabel: str, ylabel: str, title: str | None = None,
                         label_points: bool = True,
                         highlight: Sequence[str] | Mapping[str, Sequence[str]] = (),
                         panels: bool | None = None, notes: Mapping[str, str] | None = None) -> dict[str, Any]:
    """Figure 2: one point per model (score, performance), one colour and least-squares line per
    target, points labelled with model names.

    Args:
      points: ``{target: [(model, score, performance), ...]}``; points with a missing or
        non-finite coordinate are left out.
      path: the PNG to write.
      xlabel, ylabel: axis labels (e.g. "CTE-NHD (dropout 0.1)", "F1 on target").
      title: optional title.
      label_points: write the model name beside each point.
      highlight: model names to ring in red (e.g. models flagged for predicting almost no
        foreground), with a legend entry; or ``{target: names}`` to ring them per target.
      panels: one panel per target (a grid with its own axes each), instead of every target in
        one panel as the paper draws it. None: panels when more than ``PANELS_ABOVE`` targets
        have points, where labelled points of one shared panel overlap.
      notes: ``{target: text}`` added to the target's legend entry or panel title (e.g. its
        Spearman rho).

    Returns:
      ``{"path": str, "layout": "single" | "panels", "series": {target: {"n_points": int,
      "models": [...], "x": [...], "y": [...], "fit": {"slope", "intercept"} | None,
      "highlighted": [...], "panel": int}}}`` (``panel``: index of the target's axes, row-major).
    """
    plt = _pyplot()
    from matplotlib.ticker import MaxNLocator

    drawn = [t for t, pts in points.items() if _clean(pts)]
    if panels is None:
        panels = len(drawn) > PANELS_ABOVE
    targets = list(points) if not panels else drawn
    ncols = min(3, max(len(targets), 1)) if panels else 1
    nrows = -(-max(len(targets), 1) // ncols) if panels else 1
    size = (4.3 * ncols, 3.5 * nrows) if panels else (6.4, 4.8)
    fig, axes = plt.subplots(nrows, ncols, figsize=size, squeeze=False)
    flat = list(axes.ravel())
    colors = plt.get_cmap("tab10")
    series, rings, names = {}, {}, []
    try:
        for t, target in enumerate(points):
            pts = _clean(points[target])
            color = colors(t % 10)
            k = targets.index(target) if target in targets else None
            ax = flat[k] if panels and k is not None else flat[0]
            if pts:
                ax.scatter([p[1] for p in pts], [p[2] for p in pts], color=color, s=28,
                           marker=_MARKERS[t % len(_MARKERS)], label=_series_label(target, len(pts), notes),
                           zorder=3)
                if label_points:
                    names += _annotate(ax, pts, color)
            fit = _fit_line(ax, pts, color) if pts else None
            marked = set(highlight.get(target, ())) if isinstance(highlight, Mapping) else set(highlight)
            ringed = [p for p in pts if p[0] in marked]
            if ringed:
                rings[target] = ax.scatter([p[1] for p in ringed], [p[2] for p in ringed], s=110, facecolors="none",
                                           edgecolors="red", linewidths=1.2, zorder=4,
                                           label="flagged: low or high foreground")
            series[target] = {"n_points": len(pts), "models": [p[0] for p in pts], "x": [p[1] for p in pts],
                              "y": [p[2] for p in pts], "fit": fit, "highlighted": [p[0] for p in ringed],
                              "panel": k if panels else 0}
        for ax in flat[len(targets):] if panels else ():
            ax.set_visible(False)
        if panels:
            for target, ax in zip(targets, flat):
                ax.set_title(_series_label(target, series[target]["n_points"], notes), fontsize=9)
                ax.grid(alpha=0.3)
                ax.tick_params(labelsize=8)
                # A panel is ~4 inches wide: matplotlib's default of up to 9 ticks runs four-digit
                # labels such as 0.9725 into each other.
                ax.xaxis.set_major_locator(MaxNLocator(nbins=PANEL_XTICKS))
                ax.margins(0.12)
                if target in rings:
                    ax.legend(handles=[rings[target]], fontsize=7, loc="best")
            fig.supxlabel(xlabel)
            fig.supylabel(ylabel)
            if title:
                fig.suptitle(title, fontsize=11)
            fig.tight_layout()
        else:
            ax = flat[0]
            ax.set_xlabel(xlabel)
            ax.set_ylabel(ylabel)
            if title:
                ax.set_title(title, fontsize=10)
            ax.grid(alpha=0.3)
            if any(s["n_points"] for s in series.values()):
                handles, labels = ax.get_legend_handles_labels()
                keep = {}
                for h, lab in zip(handles, labels):  # one "flagged" entry however many targets have rings
                    keep.setdefault(lab, h)
                ax.legend(list(keep.values()), list(keep), fontsize=8, loc="best", title="target", title_fontsize=8)
        place_labels(fig, names)
        out = _save(fig, path)
    finally:
        plt.close(fig)
    return {"path": str(out), "layout": "panels" if panels else "single", "series": series}


def strength_sweep(points: Mapping[str, Sequence[Point]], path: str | os.PathLike, *,
                   xlabel: str, ylabel: str, title: str | None = None) -> dict[str, Any]:
    """Figure 3: score vs performance at several perturbation strengths on one target.

    One marker shape and least-squares line per strength (a series), one colour per model
    (as the paper: "each symbol represents a strength ..., each colour a source model").

    Args:
      points: ``{strength label (e.g. "p=0.1"): [(model, score, performance), ...]}``.
      path: the PNG to write.
      xlabel, ylabel, title: as in :func:`score_vs_performance`.

    Returns:
      ``{"path": str, "series": {strength: {"n_points", "models", "x", "y", "fit"}}}``.
    """
    plt = _pyplot()
    from matplotlib.lines import Line2D

    fig, ax = plt.subplots(figsize=(7.2, 4.8))
    models = sorted({p[0] for pts in points.values() for p in _clean(pts)})
    model_colors = plt.get_cmap("tab20" if len(models) > 10 else "tab10")
    color_of = {m: model_colors(i % 20) for i, m in enumerate(models)}
    line_colors = plt.get_cmap("viridis")
    series = {}
    try:
        n = max(len(points) - 1, 1)
        handles = []
        for k, (strength, pts) in enumerate(points.items()):
            pts = _clean(pts)
            marker = _MARKERS[k % len(_MARKERS)]
            ax.scatter([p[1] for p in pts], [p[2] for p in pts], c=[color_of[p[0]] for p in pts], marker=marker,
                       s=34, edgecolors="black", linewidths=0.4, zorder=3)
            line_color = line_colors(0.85 * k / n)
            fit = _fit_line(ax, pts, line_color, style="--") if pts else None
            handles.append(Line2D([], [], marker=marker, color=line_color, markerfacecolor="lightgrey",
                                  markeredgecolor="black", linestyle="--", label=str(strength)))
            series[strength] = {"n_points": len(pts), "models": [p[0] for p in pts], "x": [p[1] for p in pts],
                                "y": [p[2] for p in pts], "fit": fit}
        ax.set_xlabel(xlabel)
        ax.set_ylabel(ylabel)
        if title:
            ax.set_title(title, fontsize=10)
        ax.grid(alpha=0.3)
        first = ax.legend(handles=handles, fontsize=8, loc="upper left", title="strength", title_fontsize=8,
                          bbox_to_anchor=(1.01, 1.0))
        ax.add_artist(first)
        model_handles = [ax.scatter([], [], marker="o", color=color_of[m], label=m) for m in models]
        ax.legend(handles=model_handles, fontsize=7, loc="lower left", title="model", title_fontsize=8,
                  bbox_to_anchor=(1.01, 0.0))
        out = _save(fig, path)
    finally:
        plt.close(fig)
    return {"path": str(out), "series": series}
