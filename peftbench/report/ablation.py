"""The Ablation section: where in the backbone a trained method matters, from ``ablation.json``.

``peftbench ablate`` measured each trial's validation metric with the method switched off in every
contiguous span of layers ``[i..j]`` (the plain backbone layer computes there). Per (task, backbone,
budget) this section draws one heatmap panel per method, first ablated layer down, last ablated layer
across, coloured by the drop of the primary metric averaged over seeds (as in Houlsby et al., 2019,
Fig. 6), and a table of the baseline and a few spans. Only finished trials of the store count; with
no ablation results the section is left out.
"""

from __future__ import annotations

import math
from pathlib import Path

from peftbench.report.context import ReportContext, Section
from peftbench.report.format import decimals_for, fmt_num, slug, table
from peftbench.results.ablation import by_group, mean_drops, read_ablation, span_key

CAPTION = ("Each cell: the validation {metric} with every layer on minus the {metric} with the method switched off "
           "in layers first..last (the plain backbone layer computes there, the rest as trained), averaged over "
           "seeds; positive: the layers mattered (red), negative: the model did better without them (blue). "
           "The diagonal switches one layer off; the top-right cell switches off all of them (the backbone with "
           "the trained head alone).")


def heatmap(panels: list[tuple[str, int, dict[str, float]]], metric: str, path: Path) -> None:
    """One panel per method (name, layers, span -> mean drop), one shared colour scale centred on 0."""
    import numpy as np
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.colors import TwoSlopeNorm
    from matplotlib.figure import Figure

    cols = min(len(panels), 3)
    rows = math.ceil(len(panels) / cols)
    fig = Figure(figsize=(4.2 * cols + 1.2, 3.9 * rows))
    FigureCanvasAgg(fig)
    axes = fig.subplots(rows, cols, squeeze=False).ravel()
    top = max((abs(v) for _, _, drops in panels for v in drops.values()), default=0.0) or 1e-9
    norm = TwoSlopeNorm(vmin=-top, vcenter=0.0, vmax=top)
    image = None
    for ax, (name, layers, drops) in zip(axes, panels):
        grid = np.full((layers, layers), np.nan)
        for i in range(layers):
            for j in range(i, layers):
                grid[i, j] = drops.get(span_key(i, j), np.nan)
        image = ax.imshow(grid, cmap="RdBu_r", norm=norm, origin="upper")
        for i in range(layers):
            for j in range(i, layers):
                if not np.isnan(grid[i, j]) and layers <= 12:
                    ax.text(j, i, f"{grid[i, j]:.2f}", ha="center", va="center", fontsize=7,
                            color="white" if abs(grid[i, j]) > 0.6 * top else "black")
        ax.set_title(name, fontsize=10)
        ax.set_xticks(range(layers))
        ax.set_yticks(range(layers))
        ax.set_xlabel("last ablated layer")
        ax.set_ylabel("first ablated layer")
    for ax in axes[len(panels):]:
        ax.set_visible(False)
    fig.subplots_adjust(left=0.08, right=0.86, bottom=0.12, top=0.9, wspace=0.35, hspace=0.4)
    bar = fig.colorbar(image, ax=list(axes[:len(panels)]), fraction=0.04, pad=0.03)
    bar.set_label(f"drop of validation {metric}")
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=100, metadata={"Software": None})


def _row(name: str, entries: list[dict], drops: dict[str, float], decimals: int) -> list[str]:
    layers = entries[0]["layers"]
    half = layers // 2
    singles = {i: drops[span_key(i, i)] for i in range(layers) if span_key(i, i) in drops}
    worst = max(singles, key=singles.get) if singles else None
    least = min(singles, key=singles.get) if singles else None
    baseline = sum(e["baseline"] for e in entries) / len(entries)

    def d(first: int, last: int) -> str:
        return fmt_num(drops.get(span_key(first, last)), decimals)

    return [name, str(len(entries)), fmt_num(baseline, decimals), d(0, layers - 1),
            d(0, half - 1) if half else "—", d(half, layers - 1),
            f"{fmt_num(singles[worst], decimals)} (layer {worst})" if worst is not None else "—",
            f"{fmt_num(singles[least], decimals)} (layer {least})" if least is not None else "—"]


def ablation_sections(ctx: ReportContext) -> list[Section]:
    """The Ablation heading and one subsection per (task, backbone, budget) that has ablation results."""
    source = ctx.source_dir if ctx.source_dir is not None else ctx.suite_dir
    done = {r.trial_id for r in ctx.finals if r.done}
    data = read_ablation(source)
    groups = by_group(data, done)
    if not groups:
        return []
    intro = ("Written by `peftbench ablate` (results in `ablation.json`): each finished trial's saved weights "
             "loaded, the method switched off in every contiguous span of layers through the injection's "
             "per-layer switch, the primary metric measured on the validation split the trial was selected on.")
    apart = sorted({e["display"] for tid, e in data["not_per_layer"].items() if tid in done})
    if apart:
        intro += f" Not per-layer (nothing in the layers to switch off), so not ablated: {', '.join(apart)}."
    out = [Section(intro, title="Ablation", key="ablation")]
    for (task, backbone, budget), methods in groups.items():
        first = next(iter(methods.values()))[0]
        metric = first["metric"]
        drops = {name: mean_drops(entries) for name, entries in methods.items()}
        path, link = ctx.plot(slug("ablation", task, backbone, budget or "none") + ".png")
        heatmap([(name, entries[0]["layers"], drops[name]) for name, entries in methods.items()], metric, path)
        values = [e["baseline"] for entries in methods.values() for e in entries]
        decimals = decimals_for(values)
        half = first["layers"] // 2
        rows = [_row(name, entries, drops[name], decimals) for name, entries in methods.items()]
        headers = ["Method", "Seeds", f"Validation {metric}, all on", "Drop, all off",
                   f"Drop, layers 0..{half - 1} off", f"Drop, layers {half}..{first['layers'] - 1} off",
                   "Largest one-layer drop", "Smallest one-layer drop"]
        examples = sorted({e["examples"] for entries in methods.values() for e in entries})
        text = [f"![Layer ablation, {task}, {backbone}, budget {budget or 'none'}]({link})", "",
                CAPTION.format(metric=metric), "", *table(headers, rows, {1, 2, 3, 4, 5}), "",
                f"Validation examples per evaluation: {', '.join(map(str, examples))}; drops averaged over the seeds "
                f"listed."]
        out.append(Section("\n".join(text), title=f"{task} on {backbone}, budget {budget or 'none'}", level=3,
                           key=f"ablation/{task}/{backbone}/{budget or 'none'}"))
    return out
