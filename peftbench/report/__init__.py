"""``report.md`` and its plots, rendered from the results store alone.

``peftbench report <suite>`` can run at any time (during a run, after a crash): every
number comes from ``results.sqlite`` and ``suite.json``, nothing is recomputed from models.
The output is deterministic for a given store (a golden test pins it).
"""

from __future__ import annotations

import json
import math
import re
import shlex
from collections import Counter, defaultdict
from dataclasses import dataclass, field
from pathlib import Path

from peftbench.report import stats
from peftbench.errors import ConfigError, PluginError, did_you_mean
from peftbench.results.store import Store, suite_dirs

BUDGET_DEFINITION = (
    "a method's trainable parameters during training divided by the backbone's parameters "
    "without the task head. The task head is trained by every method and is shown in its own "
    "column (Head), never counted in the budget."
)
FULL = "full"  # the method the relative plot compares against (full fine-tuning)
OFF_BUDGET = "⚠"
NOT_SOLVED = "†"


# -- number formatting -----------------------------------------------------------------------
def sig3(value: float) -> str:
    """Three significant digits, trailing zeros kept: 1.00, 0.0312, 12.5, 100."""
    if value == 0:
        return "0"
    if abs(value) >= 1000:
        return f"{value:,.0f}"
    text = f"{value:#.3g}"
    return text[:-1] if text.endswith(".") else text


def fmt_params(n: int | None) -> str:
    return "—" if n is None else f"{int(n):,}"


def fmt_short(n: float) -> str:
    """22.7M, 227k, 1M, 512 (plot labels)."""
    for unit, size in (("B", 1e9), ("M", 1e6), ("k", 1e3)):
        if abs(n) >= size:
            return f"{n / size:.3g}{unit}"
    return f"{n:.0f}"


def fmt_pct(value: float | None) -> str:
    return "—" if value is None else f"{sig3(value)}%"


def fmt_bytes(n: float | None) -> str:
    if n is None:
        return "—"
    for unit, size in (("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)):
        if n >= size:
            return f"{sig3(n / size)} {unit}"
    return f"{int(n)} B"


def fmt_seconds(s: float | None) -> str:
    if s is None:
        return "—"
    if s < 1:
        return f"{sig3(s * 1000)} ms"
    if s < 100:
        return f"{sig3(s)} s"
    if s < 6000:
        return f"{sig3(s / 60)} min"
    return f"{sig3(s / 3600)} h"


def fmt_p(p: float | None) -> str:
    if p is None:
        return ""
    return "p<0.001" if p < 0.001 else f"p={p:.3f}"


def decimals_for(values: list[float]) -> int:
    """Metric decimals for a column: 0.xxx for scores within ±10, fewer for BLEU-like scales."""
    top = max((abs(v) for v in values if v is not None and math.isfinite(v)), default=0)
    return 3 if top < 10 else 2 if top < 100 else 1


def fmt_num(value: float | None, decimals: int) -> str:
    if value is None:
        return "—"
    return f"{value:.{decimals}f}"


def slug(*parts: str) -> str:
    text = "-".join(str(p).replace("%", "pct") for p in parts)
    return re.sub(r"[^A-Za-z0-9._-]+", "_", text).strip("_")


def cell(text) -> str:
    """Markdown-safe, one-line table cell."""
    return str(text).replace("\r", " ").replace("\n", " ").replace("|", "\\|").strip()


def table(headers: list[str], rows: list[list[str]], right: set[int] = frozenset()) -> list[str]:
    """A GitHub table whose pipes line up in the source too; ``right`` = right-aligned columns."""
    cells = [[cell(c) for c in r] for r in [headers, *rows]]
    widths = [max(3, *(len(r[i]) for r in cells)) for i in range(len(headers))]

    def line(r):
        return "| " + " | ".join(c.rjust(w) if i in right else c.ljust(w) for i, (c, w) in enumerate(zip(r, widths))) + " |"

    sep = "| " + " | ".join(("-" * (w - 1) + ":") if i in right else "-" * w for i, w in enumerate(widths)) + " |"
    return [line(cells[0]), sep, *(line(r) for r in cells[1:])]


# -- grouping --------------------------------------------------------------------------------
def _budget_key(rows: list[dict], budget: str | None) -> tuple:
    targets = [r["target_params"] for r in rows if r["budget"] == budget and r.get("target_params")]
    return (min(targets) if targets else math.inf, budget or "")


def is_reference(row: dict) -> bool:
    """A baseline the budget solver did not size (full fine-tuning, the head alone)."""
    return not row.get("knob") or row.get("target_params") is None


@dataclass
class MethodResult:
    """One method (at one knob value) in one (task, backbone, budget) group."""

    method: str
    knob: str | None
    knob_value: int | None
    done: list[dict] = field(default_factory=list)
    other: list[dict] = field(default_factory=list)  # failed / diverged / running / unreachable
    summary: stats.Summary | None = None
    label: str = ""  # the method's name, with its knob when one table holds it twice

    @property
    def first(self) -> dict:
        return (self.done or self.other)[0]

    def values(self, metric: str, which: str = "metrics") -> list[float]:
        out = []
        for r in self.done:
            v = (r.get(which) or {}).get(metric)
            if isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v):
                out.append(float(v))
        return out

    def mean_of(self, column: str) -> float | None:
        vals = [r[column] for r in self.done if r.get(column) is not None]
        return stats.mean(vals) if vals else None


@dataclass
class Group:
    task: str
    backbone: str
    budget: str | None
    primary: str
    direction: str
    methods: list[MethodResult]

    @property
    def target(self) -> int | None:
        targets = [m.first.get("target_params") for m in self.methods if not is_reference(m.first)]
        return targets[0] if targets else None


def _primary(rows: list[dict]) -> tuple[str, str]:
    named = [(r["primary_metric"], r.get("direction")) for r in rows if r.get("primary_metric")]
    if not named:
        return "metric", "max"
    (metric, direction), _ = Counter(named).most_common(1)[0]
    try:
        return metric, stats.direction_of(direction)
    except ValueError as exc:
        raise ConfigError(f"task {rows[0]['task']!r}, metric {metric!r}: {exc}") from None


def build_groups(rows: list[dict]) -> list[Group]:
    """(task, backbone, budget) groups; reference baselines stored without a budget join each."""
    groups = []
    by_tb: dict[tuple, list[dict]] = defaultdict(list)
    for r in rows:
        by_tb[(r["task"], r["backbone"])].append(r)
    for (task, backbone), tb_rows in sorted(by_tb.items()):
        primary, direction = _primary(tb_rows)
        # budgets that sized some method; baselines stored under another text (None, "n/a") join every table
        budgets = sorted({r["budget"] for r in tb_rows if r.get("budget") and not is_reference(r)},
                         key=lambda b: _budget_key(tb_rows, b))
        unbudgeted = [r for r in tb_rows if r.get("budget") not in budgets]
        for budget in budgets or [None]:
            members = [r for r in tb_rows if r.get("budget") == budget] if budget else []
            members += unbudgeted
            by_method: dict[tuple, MethodResult] = {}
            for r in members:
                key = (r["method"], r.get("knob"), r.get("knob_value"))
                m = by_method.setdefault(key, MethodResult(*key))
                (m.done if r["status"] == "done" else m.other).append(r)
            methods = sorted(by_method.values(), key=lambda m: (m.method, m.knob_value or 0))
            twice = {name for name, n in Counter(m.method for m in methods).items() if n > 1}
            for m in methods:
                m.label = f"{m.method} ({m.knob}={m.knob_value})" if m.method in twice else m.method
            with_values = [m for m in methods if m.values(primary)]
            for m in with_values:
                m.summary = stats.Summary(m.method if m.knob_value is None else f"{m.method}:{m.knob_value}",
                                          m.values(primary))
            # budget-matched methods compete; baselines the budget doesn't apply to (full, head) are tested
            # against the best of them but not ranked (a table of baselines only ranks the baselines)
            matched = [m.summary for m in with_values if not is_reference(m.first)]
            refs = [m.summary for m in with_values if is_reference(m.first)]
            stats.rank(matched or refs, direction, refs if matched else [])
            groups.append(Group(task, backbone, budget, primary, direction, methods))
    return groups


# -- the markdown ----------------------------------------------------------------------------
def off_budget(m: MethodResult) -> tuple[bool, int | None, bool]:
    """(flagged, knob step, step estimated): |achieved - target| > one knob step of params."""
    r = m.first
    if is_reference(r) or r.get("trainable_params") is None:
        return False, None, False
    step, estimated = r.get("knob_step"), False
    if not step and m.knob_value:
        step, estimated = r["trainable_params"] / m.knob_value, True
    if not step:
        return False, None, False
    return abs(r["trainable_params"] - r["target_params"]) > step, step, estimated


def _achieved(r: dict) -> float | None:
    if r.get("achieved_pct") is not None:
        return r["achieved_pct"]
    if r.get("trainable_params") is not None and r.get("base_params"):
        return 100 * r["trainable_params"] / r["base_params"]
    return None


def _find(config, keys: tuple[str, ...], depth: int = 0):
    """A numeric value under one of ``keys`` in a (nested) config, or None."""
    if not isinstance(config, dict) or depth > 2:
        return None
    for k in keys:
        if isinstance(config.get(k), (int, float)) and not isinstance(config.get(k), bool):
            return config[k]
    for k in sorted(config):
        found = _find(config[k], keys, depth + 1)
        if found is not None:
            return found
    return None


def _order_key(m: MethodResult, direction: str) -> tuple:
    """Ranked methods by rank, then unranked baselines by metric (best first), then methods with no value."""
    s = m.summary
    if s is None:
        return (2, 0.0, m.method)
    if s.rank is None:
        return (1, (-1 if stats.direction_of(direction) == "max" else 1) * s.mean, m.method)
    return (0, s.rank, m.method)


def results_table(g: Group) -> tuple[list[str], list[str]]:
    """The quality table of one group and its notes."""
    done = [m for m in g.methods if m.done]
    metric_names = sorted({k for m in done for r in m.done for k in (r.get("metrics") or {})} - {g.primary})
    metric_names = [k for k in metric_names if any(m.values(k) for m in done)]  # numeric ones
    dec = {name: decimals_for([v for m in done for v in m.values(name)]) for name in [g.primary, *metric_names]}
    headers = ["Method", "Knob", "Trainable", "Achieved", "Δ target", "Head", "Seeds",
               f"{g.primary} (mean ± std)", "95% CI", *metric_names, "Rank", "vs best (Welch)"]
    rows, notes, flagged, references = [], [], [], []
    order = sorted(done, key=lambda m: _order_key(m, g.direction))
    for m in order:
        r, s = m.first, m.summary
        flag, step, estimated = off_budget(m)
        achieved = fmt_pct(_achieved(r))
        if is_reference(r):
            achieved += f" {NOT_SOLVED}"
            references.append(m.method)
            delta = "—"
        else:
            delta = fmt_pct(100 * (r["trainable_params"] - r["target_params"]) / r["target_params"])
            delta = delta if delta.startswith("-") or delta == "—" else "+" + delta
        if flag:
            achieved += f" {OFF_BUDGET}"
            flagged.append((m, step, estimated))
        d = dec[g.primary]
        if s is None:
            main, interval, rank, versus = "—", "—", "—", "—"
        else:
            main = fmt_num(s.mean, d) + (f" ± {fmt_num(s.std, d)}" if s.std is not None else "")
            interval = f"[{fmt_num(s.ci[0], d)}, {fmt_num(s.ci[1], d)}]" if s.ci else "—"
            rank = str(s.rank) if s.rank is not None else "ref"
            versus = (stats.mark(s) + " " + fmt_p(s.p_vs_best)).strip()
        others = []
        for name in metric_names:
            vals = m.values(name)
            sd = stats.std(vals) if vals else None
            others.append("—" if not vals else fmt_num(stats.mean(vals), dec[name]) +
                          (f" ± {fmt_num(sd, dec[name])}" if sd is not None else ""))
        knob = f"{m.knob}={m.knob_value}" if m.knob else "—"
        seeds = str(len(m.done)) + (f" of {len(m.done) + len(m.other)}" if m.other else "")
        rows.append([m.label, knob, fmt_params(r.get("trainable_params")), achieved, delta,
                     fmt_params(r.get("head_params")), seeds, main, interval, *others, rank, versus])
    right = set(range(2, len(headers))) - {len(headers) - 1}
    lines = table(headers, rows, right)
    for m, step, estimated in flagged:
        r = m.first
        how = ("estimated as trainable parameters / knob value: the run recorded no step" if estimated
               else f"per step of {m.knob}")
        notes.append(
            f"{OFF_BUDGET} **{m.label}** misses the budget: {r['trainable_params']:,} trainable parameters vs the "
            f"target {r['target_params']:,} (difference {r['trainable_params'] - r['target_params']:+,}), more than "
            f"one knob step ({fmt_params(round(step))} parameters, {how}). Compare it with care."
        )
    if references:
        notes.append(
            f"{NOT_SOLVED} {', '.join(sorted(set(references)))}: reference baseline(s), not budget-solved (the "
            "budget does not apply); Achieved shows what they train."
        )
    for m in g.methods:
        if m.other:
            counts = Counter(r["status"] for r in m.other)
            what = ", ".join(f"{n} {status}" for status, n in sorted(counts.items()))
            where = "not in this table" if not m.done else f"{len(m.done)} seed(s) finished"
            notes.append(f"**{m.label}**: {what} ({where}; reasons under *Failed and unfinished trials*).")
    return lines, notes


def costs_table(g: Group) -> list[str]:
    done = [m for m in g.methods if m.done]
    order = sorted(done, key=lambda m: _order_key(m, g.direction))
    quant = any(r.get("quantized_bytes") is not None for m in done for r in m.done)
    lrs = {id(m): _find(m.first.get("config"), ("lr", "learning_rate")) for m in done}
    show_lr = any(v is not None for v in lrs.values())
    headers = ["Method", "Stored params", "Stored size", *(["4-bit weights"] if quant else []), "Step time",
               "Peak memory", "Inference ×", "Train time", "Steps", *(["LR"] if show_lr else [])]
    rows = []
    for m in order:
        r = m.first
        mems = [x["peak_mem_bytes"] for x in m.done if x.get("peak_mem_bytes") is not None]
        kinds = sorted({x["mem_kind"] for x in m.done if x.get("mem_kind")})
        mem = fmt_bytes(max(mems)) + (f" ({'/'.join(k.upper() for k in kinds)})" if mems and kinds else "") if mems else "—"
        steps = sorted({x["steps"] for x in m.done if x.get("steps") is not None})
        steps_text = "—" if not steps else f"{steps[0]:,}" if len(steps) == 1 else f"{steps[0]:,}–{steps[-1]:,}"
        overhead = m.mean_of("inference_overhead")
        qb = m.mean_of("quantized_bytes")
        rows.append([m.label, fmt_params(r.get("stored_params")), fmt_bytes(m.mean_of("stored_bytes")),
                     *([fmt_bytes(qb)] if quant else []), fmt_seconds(m.mean_of("step_time_s")), mem,
                     "—" if overhead is None else f"{overhead:.2f}×", fmt_seconds(m.mean_of("train_time_s")),
                     steps_text, *([("—" if lrs[id(m)] is None else f"{lrs[id(m)]:g}")] if show_lr else [])])
    return table(headers, rows, set(range(1, len(headers))))


def _command(info: dict) -> str | None:
    cmd = info.get("command")
    if isinstance(cmd, list):
        return shlex.join(str(c) for c in cmd)
    return cmd


def _env_text(env: dict) -> str:
    parts = []
    versions = env.get("versions")
    if isinstance(versions, dict):
        parts.append(", ".join(f"{k} {v}" for k, v in sorted(versions.items())))
    for key in sorted(k for k in env if k != "versions"):
        value = env[key]
        if isinstance(value, dict):
            value = ", ".join(f"{k}: {v}" for k, v in sorted(value.items()))
        parts.append(f"{key}: {value}")
    return "; ".join(parts)


def setup_section(suite: str, rows: list[dict], groups: list[Group], info: dict) -> list[str]:
    lines = ["## Setup", ""]
    command = _command(info)
    lines += ["Command that produced these results:", "", "```sh", command or "(not recorded: suite.json missing)", "```", ""]
    tasks = sorted({(g.task, g.primary, g.direction) for g in groups})
    task_text = "; ".join(f"{t} (primary metric {p}, {'higher' if d == 'max' else 'lower'} is better)" for t, p, d in tasks)
    bases = {}
    for r in rows:
        if r.get("base_params"):
            bases.setdefault(r["backbone"], r["base_params"])
    backbone_text = "; ".join(
        f"{b} ({bases[b]:,} parameters without the task head)" if b in bases else b
        for b in sorted({r["backbone"] for r in rows})
    )
    budgets = sorted({g.budget for g in groups if g.budget}, key=lambda b: _budget_key(rows, b))
    seeds = sorted({r["seed"] for r in rows if r.get("seed") is not None})
    seeds_text = (f"{len(seeds)} ({', '.join(map(str, seeds))}) per method and budget; the Seeds column "
                  "counts those that finished") if seeds else "none recorded"
    methods = sorted({r["method"] for r in rows})
    statuses = Counter(r["status"] for r in rows)
    lines += [
        f"- **Tasks:** {task_text or '—'}",
        f"- **Backbones:** {backbone_text or '—'}",
        f"- **Methods:** {', '.join(methods) or '—'}",
        f"- **Budgets:** {', '.join(budgets) or '—'}",
        f"- **Budget definition:** {BUDGET_DEFINITION} Each budgeted method's size knob is solved so that its "
        "trainable parameters come as close to the target as the knob allows. In the tables, Achieved = trainable / "
        f"backbone parameters, Δ target = (trainable − target) / target; {OFF_BUDGET} marks a method more than one "
        f"knob step away from the target, {NOT_SOLVED} a baseline the budget does not apply to.",
        f"- **Seeds:** {seeds_text}",
        "- **Statistics:** mean ± sample standard deviation over seeds; 95% CI = mean ± t(0.975, n−1)·s/√n "
        f"(Student's t). Significance: two-sided Welch's t-test (unequal variances) of each method's seeds against "
        f"the best budget-matched method's seeds in the same table (baselines outside the budget, marked `ref` in the Rank "
        f"column, are compared with it but not ranked), level α = {stats.ALPHA}, no correction for multiple "
        "comparisons. `*` = differs from the best, `n.s.` = not significant, `—` = fewer than 2 seeds on a side.",
        f"- **Trials:** {len(rows)}" + (f" ({', '.join(f'{n} {s}' for s, n in sorted(statuses.items()))})" if rows else ""),
    ]
    if info.get("hash"):
        lines.append(f"- **Suite hash:** `{info['hash']}`")
    envs = Counter(json.dumps(r["environment"], sort_keys=True) for r in rows
                   if r["status"] == "done" and r.get("environment"))
    if len(envs) == 1:
        lines.append(f"- **Environment:** {_env_text(json.loads(next(iter(envs))))}")
    elif envs:
        lines.append(f"- **Environments:** the finished trials ran in {len(envs)} different environments:")
        for text, n in sorted(envs.items(), key=lambda x: (-x[1], x[0])):
            lines.append(f"  - {n} trial(s): {_env_text(json.loads(text))}")
    lines += ["", "Per-trial resolved configurations are in `results.sqlite` (column `config`).", ""]
    return lines


def failures_section(rows: list[dict]) -> list[str]:
    bad = [r for r in rows if r["status"] != "done"]
    lines = ["## Failed and unfinished trials", ""]
    if not bad:
        return lines + ["None: every trial finished." if rows else "No trials recorded yet.", ""]
    out = []
    for r in sorted(bad, key=lambda r: (r["task"], r["backbone"], r["method"], r.get("budget") or "", r.get("seed") or 0)):
        reason = r.get("error") or ""
        if r["status"] == "running":
            reason = "unfinished: still running, or the run was killed (rerun the same command to resume)"
        reason = reason if len(reason) <= 300 else reason[:299] + "…"
        out.append([r["task"], r["backbone"], r["method"], r.get("budget") or "—",
                    "—" if r.get("seed") is None else str(r["seed"]), r["status"], str(r.get("attempts") or 0), reason])
    lines += table(["Task", "Backbone", "Method", "Budget", "Seed", "Status", "Attempts", "Reason"], out, {4, 6})
    return lines + [""]


def plugin_sections(registry, suite: str, store: Store) -> list[str]:
    """Markdown from every ``report_sections`` hook implementation, in pluggy's call order."""
    lines = []
    for impl in reversed(registry.pm.hook.report_sections.get_hookimpls()):
        try:
            answer = impl.function(suite=suite, store=store)
        except Exception as exc:
            raise PluginError(f"plugin {impl.plugin_name!r} raised in report_sections: {type(exc).__name__}: {exc}") from exc
        for part in [answer] if isinstance(answer, str) else (answer or []):
            if part and part.strip():
                lines += [part.rstrip(), ""]
    return lines


# -- plots -------------------------------------------------------------------------------------
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
    fig.savefig(path, dpi=100, metadata={"Software": None})


def _log_params_axis(ax) -> None:
    from matplotlib.ticker import FuncFormatter

    ax.set_xscale("log")
    ax.xaxis.set_major_formatter(FuncFormatter(lambda x, _: fmt_short(x)))
    ax.xaxis.set_minor_formatter(FuncFormatter(lambda x, _: ""))


def _colors(methods: list[str]) -> dict[str, tuple]:
    from matplotlib import colormaps

    cmap = colormaps["tab10" if len(methods) <= 10 else "tab20"]
    return {m: cmap(i % cmap.N) for i, m in enumerate(sorted(methods))}


def _points(groups: list[Group]) -> dict[str, list[tuple[float, float, float]]]:
    """method -> [(trainable params, mean, std)] over the budgets of one (task, backbone)."""
    points: dict[str, set] = defaultdict(set)
    for g in groups:
        for m in g.methods:
            if m.summary:
                points[m.method].add((m.first["trainable_params"] or 0, m.summary.mean, m.summary.std or 0.0))
    return {k: sorted(v) for k, v in points.items()}


def pareto_front(points: list[tuple[float, float]], direction: str) -> list[tuple[float, float]]:
    """The (params, score) points no other point beats: fewer or equal params and a better or equal score."""
    sign = 1 if direction == "max" else -1

    def beats(q, p):
        return q != p and q[0] <= p[0] and sign * q[1] >= sign * p[1]

    return sorted({p for p in points if not any(beats(q, p) for q in points)})


def pareto_plot(groups: list[Group], colors: dict, path: Path) -> None:
    """Trainable params (log) vs the primary metric; zero-parameter methods as horizontal lines."""
    g0 = groups[0]
    points = _points(groups)
    fig, ax = _figure()
    frontier = []
    for method, pts in sorted(points.items()):
        xs = [p for p in pts if p[0] > 0]
        for p in pts:
            if p[0] == 0:
                ax.axhline(p[1], color=colors[method], linestyle="--", linewidth=1, label=f"{method} (0 params)")
        if xs:
            ax.errorbar([p[0] for p in xs], [p[1] for p in xs], yerr=[p[2] for p in xs], color=colors[method],
                        marker="o", capsize=3, label=method)
            frontier += xs
    front = pareto_front([(p[0], p[1]) for p in frontier], g0.direction)
    if len(front) > 1:
        ax.step([p[0] for p in front], [p[1] for p in front], where="post", color="0.6", linewidth=1, zorder=0,
                label="Pareto front")
    if frontier:
        _log_params_axis(ax)
    ax.set_xlabel("trainable parameters (log scale, task head excluded)")
    ax.set_ylabel(f"{g0.primary} ({'higher' if g0.direction == 'max' else 'lower'} is better)")
    ax.set_title(f"{g0.task} on {g0.backbone}: mean ± std over seeds")
    ax.grid(True, which="both", alpha=0.3)
    _legend(fig, ax)
    _save(fig, path)


def relative_plot(groups: list[Group], full_mean: float, colors: dict, path: Path) -> None:
    """Houlsby et al. (2019) Fig. 2: metric minus full fine-tuning's, vs trainable params."""
    g0 = groups[0]
    points = {k: [p for p in v if p[0] > 0] for k, v in _points(groups).items() if k != FULL}
    fig, ax = _figure()
    for method, pts in sorted(points.items()):
        if pts:
            ax.errorbar([p[0] for p in pts], [p[1] - full_mean for p in pts], yerr=[p[2] for p in pts],
                        color=colors[method], marker="o", capsize=3, label=method)
    ax.axhline(0, color="black", linewidth=1, label="full fine-tuning")
    _log_params_axis(ax)
    ax.set_xlabel("trainable parameters (log scale, task head excluded)")
    ax.set_ylabel(f"{g0.primary} − full fine-tuning")
    ax.set_title(f"{g0.task} on {g0.backbone}: relative to full fine-tuning")
    ax.grid(True, which="both", alpha=0.3)
    _legend(fig, ax)
    _save(fig, path)


def curves_plot(g: Group, colors: dict, path: Path) -> bool:
    """Training loss and validation metric vs step, one thin line per seed."""
    methods = [m for m in g.methods if any(r.get("curves") for r in m.done)]
    if not methods:
        return False
    fig, (loss_ax, val_ax) = _figure(width=11, height=4, ncols=2)
    for m in methods:
        for i, r in enumerate(sorted(m.done, key=lambda r: r.get("seed") or 0)):
            curve = r.get("curves") or []
            label = m.method if i == 0 else None
            loss = [(c["step"], c["loss"]) for c in curve if c.get("loss") is not None]
            val = [(c["step"], c["val_metric"]) for c in curve if c.get("val_metric") is not None]
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


# -- assembling ------------------------------------------------------------------------------
def read_suite_info(suite_dir: Path) -> dict:
    path = suite_dir / "suite.json"
    if not path.is_file():
        return {}
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as exc:
        raise ConfigError(f"{path} is not valid JSON: {exc}") from exc


def render(suite_dir: Path, store: Store, registry) -> str:
    """The markdown of the report; writes the plots under ``suite_dir / 'plots'``."""
    suite = suite_dir.name
    rows = store.rows()
    info = read_suite_info(suite_dir)
    groups = build_groups(rows)
    colors = _colors(sorted({r["method"] for r in rows}))  # one colour per method in every plot
    lines = [f"# peftbench report: {suite}", "",
             f"Rendered by `peftbench report {suite}` from `results.sqlite` alone; rerun it to refresh.", ""]
    lines += setup_section(suite, rows, groups, info)
    by_tb: dict[tuple, list[Group]] = defaultdict(list)
    for g in groups:
        by_tb[(g.task, g.backbone)].append(g)
    for (task, backbone), tb_groups in by_tb.items():
        lines += [f"## {task} on {backbone}", ""]
        primary = tb_groups[0].primary
        for g in tb_groups:
            if g.budget:
                target = f" (target {g.target:,} trainable parameters)" if g.target else ""
                lines += [f"### Budget {g.budget}{target}", ""]
            else:
                lines += ["### Without a budget", ""]
            if not any(m.done for m in g.methods):
                lines += ["No finished trials yet.", ""]
                continue
            quality, notes = results_table(g)
            lines += quality + [""] + [f"- {n}" for n in notes] + ([""] if notes else [])
            lines += ["Costs (means over finished seeds; peak memory is the maximum):", ""] + costs_table(g) + [""]
            name = slug("curves", task, backbone, g.budget or "none") + ".png"
            if curves_plot(g, colors, suite_dir / "plots" / name):
                lines += [f"![Learning curves, {task}, {backbone}, budget {g.budget or 'none'}](plots/{name})", ""]
        if any(m.summary for g in tb_groups for m in g.methods):
            name = slug("pareto", task, backbone) + ".png"
            pareto_plot(tb_groups, colors, suite_dir / "plots" / name)
            lines += [f"### Parameters vs {primary}", "",
                      f"![Pareto plot, {task}, {backbone}](plots/{name})", "",
                      "Error bars: standard deviation over seeds. Grey steps: the Pareto front "
                      "(no other point has fewer parameters and a better score).", ""]
        budgeted = [g for g in tb_groups if g.budget]
        if len(budgeted) > 1:
            fulls = [m.summary.mean for g in tb_groups for m in g.methods if m.method == FULL and m.summary]
            lines += [f"### Relative to full fine-tuning", ""]
            if fulls:
                name = slug("relative", task, backbone) + ".png"
                relative_plot(tb_groups, stats.mean(fulls), colors, suite_dir / "plots" / name)
                lines += [f"![{primary} relative to full fine-tuning, {task}, {backbone}](plots/{name})", "",
                          f"{primary} minus full fine-tuning's mean ({fmt_num(stats.mean(fulls), decimals_for(fulls))}) "
                          "across the budgets, as in Houlsby et al. (2019), Fig. 2.", ""]
            else:
                lines += ["Several budgets ran, but no full fine-tuning trial finished: plot omitted.", ""]
    lines += failures_section(rows)
    lines += plugin_sections(registry, suite, store)
    return "\n".join(lines).rstrip() + "\n"


def write_report(suite_dir: str | Path, store: Store, registry=None) -> Path:
    """Render ``<suite_dir>/report.md`` (and ``plots/*.png``) from the store; returns its path."""
    if registry is None:
        from peftbench.contract.registry import get_registry

        registry = get_registry()
    suite_dir = Path(suite_dir)
    text = render(suite_dir, store, registry)
    path = suite_dir / "report.md"
    tmp = path.with_suffix(".md.tmp")
    tmp.write_text(text, encoding="utf-8")
    tmp.replace(path)  # readers never see half a report
    return path


# -- command line ----------------------------------------------------------------------------
def add_report_arguments(parser) -> None:
    parser.add_argument("suite", help="suite name: the folder <out>/<suite> holding results.sqlite")
    parser.add_argument("--out", default="reports", metavar="DIR", help="folder holding the suites (default: reports)")


def main_report(args) -> int:
    from peftbench.contract.registry import get_registry

    out = Path(args.out)
    suite_dir = out / args.suite
    store_path = suite_dir / "results.sqlite"
    if not store_path.is_file():
        known = suite_dirs(out)
        where = f"{out}/" if out.is_dir() else f"{out}/ (which does not exist)"
        listing = f"suites there: {', '.join(known)}" if known else "no suites there yet (run `peftbench run` first)"
        raise ConfigError(f"no suite {args.suite!r} in {where}: {store_path} not found"
                          f"{did_you_mean(args.suite, known)}; {listing}")
    registry = get_registry(plugins_dir=getattr(args, "plugins_dir", None))
    with Store(store_path, create=False) as store:
        path = write_report(suite_dir, store, registry)
    print(f"wrote {path}")
    return 0
