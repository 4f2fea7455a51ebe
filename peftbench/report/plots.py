"""The report's plots (matplotlib, Agg, no pyplot state): Pareto, relative to full fine-tuning, curves,
and the search's sensitivity to the learning rate.

Each point is one method at one budget: its trainable parameters (task head excluded) and
the mean of its primary metric over seeds, with the standard deviation as an error bar.
The Pareto front keeps the points no other point beats with fewer or equal parameters and an
equal or better score. Methods matched to one budget sit within a knob step of each other, a
cluster on a log axis that spans full fine-tuning: each budget with two or more of them gets its
own panel with a linear axis. The relative plot subtracts full fine-tuning's mean (Houlsby et
al., 2019, Fig. 2), so 0 means "as good as training every weight". The learning curves draw one
mean line per method over its seeds with a band from the lowest to the highest seed. Every
axis has labelled ticks, a log axis within one decade too.
"""

from __future__ import annotations

import math
from collections import defaultdict
from pathlib import Path
from typing import Callable

from peftbench.report.format import fmt_short
from peftbench.report.groups import Group, MethodResult, is_apart, is_reference
from peftbench.report.palette import linestyles, markers

PARAMS_AXIS = "trainable parameters (log scale, task head excluded)"
#: weight of the previous value in the training loss's exponential moving average (per logged point)
LOSS_SMOOTHING = 0.8
PANEL_W, PANEL_H = 5.5, 4.2  # inches per panel
MAX_COLS = 3


# -- figure plumbing -------------------------------------------------------------------------
def _figure(panels: int = 1, labels: list[str] = ()):
    """A pyplot-free Agg figure of ``panels`` axes (at most MAX_COLS a row), fixed margins (no layout pass) and a
    legend column on the right as wide as its longest label; returns (figure, flat list of the axes used)."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    cols, rows = min(panels, MAX_COLS), math.ceil(panels / MAX_COLS)
    legend_w = 0.6 + 0.065 * max((len(label) for label in labels), default=0)  # fontsize 8: ~0.065 in a character
    width, height = PANEL_W * cols + legend_w, PANEL_H * rows
    fig = Figure(figsize=(width, height))
    FigureCanvasAgg(fig)
    grid = fig.subplots(rows, cols, squeeze=False)
    axes = [ax for row in grid for ax in row]
    for ax in axes[panels:]:
        ax.set_visible(False)
    fig.subplots_adjust(left=0.8 / width, right=1 - legend_w / width, bottom=0.6 / height, top=1 - 0.45 / height,
                        wspace=0.3, hspace=0.45)
    return fig, axes[:panels]


def _legend(fig, handles_from) -> None:
    """One legend for the figure, right of the plots, each label once (first handle wins)."""
    seen: dict[str, object] = {}
    for ax in handles_from:
        for handle, label in zip(*ax.get_legend_handles_labels()):
            seen.setdefault(label, handle)
    if seen:
        right = fig.subplotpars.right
        fig.legend(list(seen.values()), list(seen), loc="upper left", bbox_to_anchor=(right + 0.005, fig.subplotpars.top),
                   fontsize=8, frameon=False)


def _save(fig, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=100, metadata={"Software": None})  # no version stamp: the bytes depend on the data only


def log_ticks(ax, axis: str = "x", label: Callable[[float], str] = fmt_short) -> None:
    """A log axis with labelled ticks whatever its span: 1-2-5 steps within a few decades, every integer
    multiple within one, and evenly spaced values when even those leave fewer than two ticks in view."""
    from matplotlib.ticker import FuncFormatter, LogLocator, MaxNLocator, NullFormatter

    target = ax.xaxis if axis == "x" else ax.yaxis
    (ax.set_xscale if axis == "x" else ax.set_yscale)("log")
    low, high = sorted(ax.get_xlim() if axis == "x" else ax.get_ylim())
    decades = math.log10(high / low) if low > 0 else math.inf
    subs = (1.0,) if decades > 2.5 else (1.0, 2.0, 5.0) if decades > 1.2 else tuple(float(i) for i in range(1, 10))
    target.set_major_locator(LogLocator(base=10, subs=subs, numticks=30))
    target.set_minor_locator(LogLocator(base=10, subs=tuple(float(i) for i in range(1, 10)), numticks=30))
    target.set_minor_formatter(NullFormatter())
    if sum(low <= t <= high for t in target.get_major_locator().tick_values(low, high)) < 2:
        target.set_major_locator(MaxNLocator(4))
    target.set_major_formatter(FuncFormatter(lambda x, _: label(x)))


def _short_axis(ax, axis: str = "x") -> None:
    """A linear parameter axis labelled 18k, 20.5k, 1.2M."""
    from matplotlib.ticker import FuncFormatter, MaxNLocator

    target = ax.xaxis if axis == "x" else ax.yaxis
    target.set_major_locator(MaxNLocator(5))
    target.set_major_formatter(FuncFormatter(lambda x, _: fmt_short(x)))


def _metric_label(g: Group) -> str:
    return f"{g.primary} ({'higher' if g.direction == 'max' else 'lower'} is better)"


# -- points ----------------------------------------------------------------------------------
def points(groups: list[Group], keep: Callable[[MethodResult], bool] = lambda m: True,
           ) -> dict[str, list[tuple[float, float, float]]]:
    """method -> [(trainable params, mean, std)] over the budgets of one (task, backbone)."""
    found: dict[str, set] = defaultdict(set)
    for g in groups:
        for m in g.methods:
            if m.summary and keep(m):
                found[m.method].add((m.spec.trainable_params or 0, m.summary.mean, m.summary.std or 0.0))
    return {k: sorted(v) for k, v in found.items()}


def pareto_front(points: list[tuple[float, float]], direction: str) -> list[tuple[float, float]]:
    """The (params, score) points no other point beats: fewer or equal params and a better or equal score."""
    sign = 1 if direction == "max" else -1

    def beats(q, p):
        return q != p and q[0] <= p[0] and sign * q[1] >= sign * p[1]

    return sorted({p for p in points if not any(beats(q, p) for q in points)})


def matched(m: MethodResult) -> bool:
    """A budget-matched method (sized by the solver to the group's budget, not ranked apart)."""
    return not is_reference(m.spec) and not is_apart(m.spec) and bool(m.spec.trainable_params)


#: points closer than this fraction of a panel's parameter span are spread sideways by it, each from the next
DODGE = 0.02


def dodge(xs: list[float]) -> list[float]:
    """``xs`` with points that would overlap (closer than DODGE of their span) spread symmetrically around their
    mean, in order: methods of one size (LoRA and QLoRA) side by side instead of on top of each other."""
    span = (max(xs) - min(xs)) if xs else 0
    step = DODGE * (span or max(xs, default=1) * 0.1)
    order = sorted(range(len(xs)), key=lambda i: xs[i])
    out, cluster = list(xs), []
    for i in [*order, None]:
        if i is not None and cluster and xs[i] - xs[cluster[-1]] < step:
            cluster.append(i)
            continue
        centre = sum(xs[j] for j in cluster) / len(cluster) if cluster else 0
        for k, j in enumerate(cluster):
            out[j] = centre + (k - (len(cluster) - 1) / 2) * step
        cluster = [i] if i is not None else []
    return out


def clustered(groups: list[Group]) -> list[Group]:
    """The budgets whose matched methods share a cluster that deserves its own panel (two or more with a value)."""
    return [g for g in groups if g.budget and sum(1 for m in g.methods if m.summary and matched(m)) >= 2]


# -- the plots -------------------------------------------------------------------------------
def pareto_plot(groups: list[Group], colors: dict, path: Path) -> None:
    """Trainable params (log) vs the primary metric, then one linear panel per crowded budget; zero-parameter
    methods as horizontal lines."""
    g0 = groups[0]
    found = points(groups)
    shapes, lines = markers(list(colors)), linestyles(list(colors))
    panels = clustered(groups)
    labels = [*found, "Pareto front"] + [f"{m} (0 params)" for m, pts in found.items() if any(p[0] == 0 for p in pts)]
    fig, axes = _figure(1 + len(panels), labels)
    ax = axes[0]
    frontier = []
    for method, pts in sorted(found.items()):
        sized = [p for p in pts if p[0] > 0]
        for p in pts:
            if p[0] == 0:  # nothing trained but the head: no place on a log axis, a line at its score
                ax.axhline(p[1], color=colors[method], linestyle="--", linewidth=1, label=f"{method} (0 params)")
        if sized:
            ax.errorbar([p[0] for p in sized], [p[1] for p in sized], yerr=[p[2] for p in sized],
                        color=colors[method], marker=shapes.get(method, "o"), linestyle=lines.get(method, "-"),
                        capsize=3, label=method)
            frontier += sized
    front = pareto_front([(p[0], p[1]) for p in frontier], g0.direction)
    if len(front) > 1:
        ax.step([p[0] for p in front], [p[1] for p in front], where="post", color="0.6", linewidth=1, zorder=0,
                label="Pareto front")
    if frontier:
        log_ticks(ax)
    ax.set_xlabel(PARAMS_AXIS)
    ax.set_ylabel(_metric_label(g0))
    ax.set_title(f"{g0.task} on {g0.backbone}: mean ± std over seeds", fontsize=10)
    ax.grid(True, which="major", alpha=0.3)
    for g, panel in zip(panels, axes[1:]):
        _budget_panel(panel, g, colors, shapes)
    _legend(fig, axes)
    _save(fig, path)


def _budget_panel(ax, g: Group, colors: dict, shapes: dict) -> None:
    """One budget's matched methods on a linear parameter axis, the target dotted, the baselines as lines."""
    shown = sorted((m for m in g.methods if m.summary and matched(m)), key=lambda m: m.method)
    for m, x in zip(shown, dodge([m.spec.trainable_params for m in shown])):
        ax.errorbar([x], [m.summary.mean], yerr=[m.summary.std or 0.0], color=colors[m.method],
                    marker=shapes.get(m.method, "o"), capsize=3, label=m.method, linestyle="none")
    for m in sorted(g.methods, key=lambda m: m.method):
        if m.summary and is_reference(m.spec):  # the baselines' level, for scale
            ax.axhline(m.summary.mean, color=colors[m.method], linestyle=":" if m.spec.trainable_params else "--",
                       linewidth=1)
    if g.target:
        ax.axvline(g.target, color="0.5", linestyle=":", linewidth=1)
    ax.margins(x=0.1)
    _short_axis(ax)
    ax.set_xlabel("trainable parameters (linear scale)")
    ax.set_ylabel(_metric_label(g))
    target = f" (target {fmt_short(g.target)}, dotted)" if g.target else ""
    ax.set_title(f"budget {g.budget}{target}", fontsize=10)
    ax.grid(True, alpha=0.3)


def relative_plot(groups: list[Group], full_mean: float, colors: dict, path: Path,
                  is_full: Callable[[MethodResult], bool]) -> None:
    """Houlsby et al. (2019) Fig. 2: metric minus full fine-tuning's mean, vs trainable params."""
    g0 = groups[0]
    found = points(groups, keep=lambda m: not is_full(m))
    shapes, lines = markers(list(colors)), linestyles(list(colors))
    fig, (ax,) = _figure(1, [*found, "full fine-tuning"])
    for method, pts in sorted(found.items()):
        sized = [p for p in pts if p[0] > 0]
        if sized:
            ax.errorbar([p[0] for p in sized], [p[1] - full_mean for p in sized], yerr=[p[2] for p in sized],
                        color=colors[method], marker=shapes.get(method, "o"), linestyle=lines.get(method, "-"),
                        capsize=3, label=method)
    ax.axhline(0, color="black", linewidth=1, label="full fine-tuning")
    log_ticks(ax)
    ax.set_xlabel(PARAMS_AXIS)
    ax.set_ylabel(f"{g0.primary} − full fine-tuning")
    ax.set_title(f"{g0.task} on {g0.backbone}: relative to full fine-tuning", fontsize=10)
    ax.grid(True, which="major", alpha=0.3)
    _legend(fig, [ax])
    _save(fig, path)


def smooth(values: list[float], weight: float = LOSS_SMOOTHING) -> list[float]:
    """Exponential moving average, bias-corrected so that the first points are not pulled towards 0."""
    out, average = [], 0.0
    for i, v in enumerate(values, start=1):
        average = weight * average + (1 - weight) * v
        out.append(average / (1 - weight ** i))
    return out


def across_seeds(series: list[list[tuple[int, float]]]) -> list[tuple[int, float, float, float]]:
    """(step, mean, min, max) over the seeds' series, each step over the seeds that reached it."""
    by_step: dict[int, list[float]] = defaultdict(list)
    for s in series:
        for step, value in s:
            by_step[step].append(value)
    return [(step, sum(v) / len(v), min(v), max(v)) for step, v in sorted(by_step.items())]


def curves_plot(g: Group, colors: dict, path: Path) -> bool:
    """Per method: smoothed training loss and the validation metric vs step, the mean over seeds with a band from
    the lowest to the highest seed, validation passes marked; False if no curves."""
    import numpy as np

    methods = [m for m in g.methods if any(result.curves for result in m.results)]
    if not methods:
        return False
    shapes, lines = markers(list(colors)), linestyles(list(colors))
    fig, (loss_ax, val_ax) = _figure(2, [m.method for m in methods])
    for m in methods:
        color, shape, line = colors[m.method], shapes.get(m.method, "o"), lines.get(m.method, "-")
        seeds = [r.result.curves for r in sorted(m.done, key=lambda r: r.spec.seed) if r.result and r.result.curves]
        losses = [[(c.step, c.loss) for c in curve if c.loss is not None] for curve in seeds]
        losses = [list(zip([s for s, _ in pts], smooth([v for _, v in pts]))) for pts in losses if pts]
        vals = across_seeds([[(c.step, c.val_metric) for c in curve if c.val_metric is not None] for curve in seeds])
        loss = across_seeds(losses)
        if loss:
            steps, mean = [p[0] for p in loss], [p[1] for p in loss]
            loss_ax.plot(steps, mean, color=color, linewidth=1.5, linestyle=line, label=m.method)
            if len(losses) > 1:
                loss_ax.fill_between(steps, [p[2] for p in loss], [p[3] for p in loss], color=color, alpha=0.15,
                                     linewidth=0)
            if vals:  # where validation ran, on the loss line
                at = [p[0] for p in vals]
                loss_ax.plot(at, np.interp(at, steps, mean), linestyle="none", marker=shape, markersize=4,
                             markerfacecolor="white", markeredgecolor=color)
        if vals:
            steps = [p[0] for p in vals]
            val_ax.plot(steps, [p[1] for p in vals], color=color, linewidth=1.5, linestyle=line, marker=shape,
                        markersize=4, label=m.method)
            if len(seeds) > 1:
                val_ax.fill_between(steps, [p[2] for p in vals], [p[3] for p in vals], color=color, alpha=0.15,
                                    linewidth=0)
    loss_ax.set(xlabel="step", ylabel="training loss (smoothed)")
    loss_ax.set_title("training loss: mean over seeds, band min–max; ○ validation passes", fontsize=10)
    val_ax.set(xlabel="step", ylabel=f"validation {g.primary}")
    val_ax.set_title(f"validation {g.primary}: mean over seeds, band min–max", fontsize=10)
    for ax in (loss_ax, val_ax):
        ax.grid(True, alpha=0.3)
    _legend(fig, [val_ax, loss_ax])
    _save(fig, path)
    return True


def sensitivity_plot(series: dict[str, list[tuple[float, float, bool]]], chosen: dict[str, tuple[float, float]],
                     colors: dict, path: Path, g: Group) -> None:
    """Validation primary metric vs learning rate (log), one line per method; the chosen points ringed.

    ``series``: method -> [(lr, validation score, pruned)]; pruned trials are hollow markers.
    ``chosen``: method -> (lr, validation score) of the values the final trials trained with.
    """
    fig, (ax,) = _figure(1, [*series, "pruned", "chosen"])
    lines = linestyles(list(colors))
    for method, pts in sorted(series.items()):
        pts = sorted(pts)
        color = colors.get(method, "0.3")
        ax.plot([p[0] for p in pts], [p[1] for p in pts], color=color, linewidth=1, linestyle=lines.get(method, "-"),
                marker="o", label=method)
        pruned = [p for p in pts if p[2]]
        if pruned:
            ax.plot([p[0] for p in pruned], [p[1] for p in pruned], linestyle="none", marker="o", markersize=8,
                    markerfacecolor="white", markeredgecolor=color, zorder=3)
    for method, (lr, score) in sorted(chosen.items()):
        ax.plot([lr], [score], linestyle="none", marker="*", markersize=16, color=colors.get(method, "0.3"),
                markeredgecolor="black", zorder=4)
    if any(p[2] for pts in series.values() for p in pts):  # legend entries in grey: they apply to every method
        ax.plot([], [], linestyle="none", marker="o", markersize=8, markerfacecolor="white", markeredgecolor="0.3",
                label="pruned")
    if chosen:
        ax.plot([], [], linestyle="none", marker="*", markersize=12, color="white", markeredgecolor="black",
                label="chosen")
    log_ticks(ax, label=lambda x: f"{x:g}")
    ax.set_xlabel("learning rate (log scale)")
    ax.set_ylabel(f"validation {_metric_label(g)}")
    ax.set_title(f"{g.task} on {g.backbone}, budget {g.budget or 'none'}: search trials", fontsize=10)
    ax.grid(True, which="major", alpha=0.3)
    _legend(fig, [ax])
    _save(fig, path)
