"""The report's plots (matplotlib, Agg, no pyplot state): Pareto, relative to full fine-tuning, curves,
and the search's sensitivity to the learning rate.

Each point is one method at one budget: its trainable parameters (task head excluded) and
the mean of its primary metric over seeds, with the standard deviation as an error bar.
The Pareto front keeps the points no other point beats with fewer or equal parameters and an
equal or better score. The relative plot subtracts full fine-tuning's mean (Houlsby et al.,
2019, Fig. 2), so 0 means "as good as training every weight".
"""

from __future__ import annotations

from collections import defaultdict
from pathlib import Path
from typing import Callable

from peftbench.report.format import fmt_short
from peftbench.report.groups import Group, MethodResult

PARAMS_AXIS = "trainable parameters (log scale, task head excluded)"


# -- figure plumbing -------------------------------------------------------------------------
def _figure(width=8.0, height=4.5, ncols=1):
    """A pyplot-free Agg figure with fixed margins (no layout pass) and room for a legend on the right."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(width, height))
    FigureCanvasAgg(fig)
    axes = fig.subplots(1, ncols)
    fig.subplots_adjust(left=0.8 / width, right=1 - 1.8 / width, bottom=0.13, top=0.9, wspace=0.3)
    return fig, axes


def _legend(fig, ax) -> None:
    handles, labels = ax.get_legend_handles_labels()
    if handles:
        right = fig.subplotpars.right
        fig.legend(handles, labels, loc="upper left", bbox_to_anchor=(right + 0.01, 0.9), fontsize=8, frameon=False)


def _save(fig, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=100, metadata={"Software": None})  # no version stamp: the bytes depend on the data only


def _log_params_axis(ax) -> None:
    from matplotlib.ticker import FuncFormatter

    ax.set_xscale("log")
    ax.xaxis.set_major_formatter(FuncFormatter(lambda x, _: fmt_short(x)))
    ax.xaxis.set_minor_formatter(FuncFormatter(lambda x, _: ""))


def colors(methods: list[str]) -> dict[str, tuple]:
    """One colour per method, the same in every plot of the report."""
    from matplotlib import colormaps

    cmap = colormaps["tab10" if len(methods) <= 10 else "tab20"]
    return {m: cmap(i % cmap.N) for i, m in enumerate(sorted(methods))}


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


# -- the plots -------------------------------------------------------------------------------
def pareto_plot(groups: list[Group], colors: dict, path: Path) -> None:
    """Trainable params (log) vs the primary metric; zero-parameter methods as horizontal lines."""
    g0 = groups[0]
    fig, ax = _figure()
    frontier = []
    for method, pts in sorted(points(groups).items()):
        sized = [p for p in pts if p[0] > 0]
        for p in pts:
            if p[0] == 0:  # nothing trained but the head: no place on a log axis, a line at its score
                ax.axhline(p[1], color=colors[method], linestyle="--", linewidth=1, label=f"{method} (0 params)")
        if sized:
            ax.errorbar([p[0] for p in sized], [p[1] for p in sized], yerr=[p[2] for p in sized],
                        color=colors[method], marker="o", capsize=3, label=method)
            frontier += sized
    front = pareto_front([(p[0], p[1]) for p in frontier], g0.direction)
    if len(front) > 1:
        ax.step([p[0] for p in front], [p[1] for p in front], where="post", color="0.6", linewidth=1, zorder=0,
                label="Pareto front")
    if frontier:
        _log_params_axis(ax)
    ax.set_xlabel(PARAMS_AXIS)
    ax.set_ylabel(f"{g0.primary} ({'higher' if g0.direction == 'max' else 'lower'} is better)")
    ax.set_title(f"{g0.task} on {g0.backbone}: mean ± std over seeds")
    ax.grid(True, which="both", alpha=0.3)
    _legend(fig, ax)
    _save(fig, path)


def relative_plot(groups: list[Group], full_mean: float, colors: dict, path: Path,
                  is_full: Callable[[MethodResult], bool]) -> None:
    """Houlsby et al. (2019) Fig. 2: metric minus full fine-tuning's mean, vs trainable params."""
    g0 = groups[0]
    found = points(groups, keep=lambda m: not is_full(m))
    fig, ax = _figure()
    for method, pts in sorted(found.items()):
        sized = [p for p in pts if p[0] > 0]
        if sized:
            ax.errorbar([p[0] for p in sized], [p[1] - full_mean for p in sized], yerr=[p[2] for p in sized],
                        color=colors[method], marker="o", capsize=3, label=method)
    ax.axhline(0, color="black", linewidth=1, label="full fine-tuning")
    _log_params_axis(ax)
    ax.set_xlabel(PARAMS_AXIS)
    ax.set_ylabel(f"{g0.primary} − full fine-tuning")
    ax.set_title(f"{g0.task} on {g0.backbone}: relative to full fine-tuning")
    ax.grid(True, which="both", alpha=0.3)
    _legend(fig, ax)
    _save(fig, path)


def curves_plot(g: Group, colors: dict, path: Path) -> bool:
    """Training loss and validation metric vs step, one thin line per seed; False if no curves."""
    methods = [m for m in g.methods if any(result.curves for result in m.results)]
    if not methods:
        return False
    fig, (loss_ax, val_ax) = _figure(width=11, height=4, ncols=2)
    for m in methods:
        for i, record in enumerate(sorted(m.done, key=lambda r: r.spec.seed)):
            curve = record.result.curves if record.result else []
            label = m.method if i == 0 else None  # one legend entry per method
            loss = [(c.step, c.loss) for c in curve if c.loss is not None]
            val = [(c.step, c.val_metric) for c in curve if c.val_metric is not None]
            if loss:
                loss_ax.plot(*zip(*loss), color=colors[m.method], linewidth=1, alpha=0.8, label=label)
            if val:
                val_ax.plot(*zip(*val), color=colors[m.method], linewidth=1, alpha=0.8, marker=".", label=label)
    loss_ax.set(xlabel="step", ylabel="training loss", title="training loss")
    val_ax.set(xlabel="step", ylabel=f"validation {g.primary}", title=f"validation {g.primary}")
    for ax in (loss_ax, val_ax):
        ax.grid(True, alpha=0.3)
    _legend(fig, loss_ax)
    _save(fig, path)
    return True


def sensitivity_plot(series: dict[str, list[tuple[float, float, bool]]], chosen: dict[str, tuple[float, float]],
                     colors: dict, path: Path, g: Group) -> None:
    """Validation primary metric vs learning rate (log), one line per method; the chosen points ringed.

    ``series``: method -> [(lr, validation score, pruned)]; pruned trials are hollow markers.
    ``chosen``: method -> (lr, validation score) of the values the final trials trained with.
    """
    fig, ax = _figure()
    for method, pts in sorted(series.items()):
        pts = sorted(pts)
        color = colors.get(method, "0.3")
        ax.plot([p[0] for p in pts], [p[1] for p in pts], color=color, linewidth=1, marker="o", label=method)
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
    ax.set_xscale("log")
    ax.set_xlabel("learning rate (log scale)")
    ax.set_ylabel(f"validation {g.primary} ({'higher' if g.direction == 'max' else 'lower'} is better)")
    ax.set_title(f"{g.task} on {g.backbone}, budget {g.budget or 'none'}: search trials")
    ax.grid(True, which="both", alpha=0.3)
    _legend(fig, ax)
    _save(fig, path)
