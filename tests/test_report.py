"""The report on a stored fixture run: golden markdown, plots, statistics, plugin sections, CLI.

Regenerate the golden file after an intended change with
``PEFTBENCH_UPDATE_GOLDEN=1 python -m pytest tests/test_report.py``.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import re
import shutil
from pathlib import Path

import pluggy
import pytest
from scipy import stats as sps

import peftbench
from peftbench import report
from peftbench.contract import hookspecs
from peftbench.contract.costs import Cost
from peftbench.report import stats
from peftbench.errors import ConfigError
from peftbench.contract.registry import Registry
from peftbench.results.records import CEILING, FLOOR, CurvePoint, TrialResult, TrialSpec
from peftbench.results.store import Store
from peftbench.tasks.entry import TaskEntry

GOLDEN = Path(__file__).parent / "golden" / "report.md"
BASE, HEAD = 22_713_216, 770
TARGET = {"1%": 227_132, "3%": 681_396}
ENV = {"versions": {"peftbench": "0.1.0", "torch": "2.13.0", "transformers": "5.23.0"},
       "hardware": "2 CPU cores", "device": "cpu", "threads": 1}
SUITE_JSON = {"suite": "fixture", "hash": "0123456789abcdef",
              "command": ["peftbench", "run", "--methods", "lora,houlsby,prefix,qlora,ptuning,prompt,full,head",
                          "--budget", "1%", "--budget", "3%", "--suite", "fixture"]}
REFERENCE = {"full": CEILING, "head": FLOOR}  # the reference roles the baselines declare

# method, budget, knob, knob value, knob step, trainable params, accuracies of seeds 0.. (str: not done)
PLAN = [
    ("full", None, None, None, None, BASE, [0.861, 0.855, 0.867]),
    ("head", "n/a", None, None, None, 0, [0.701, 0.712, 0.695]),  # a baseline stored under another text
    ("lora", "1%", "r", 25, 9_216, 230_400, [0.850, 0.846, 0.858]),
    ("lora", "3%", "r", 74, 9_216, 681_984, [0.857, 0.851, "running"]),
    ("houlsby", "1%", "m", 12, 18_456, 231_744, [0.848, 0.852, "failed"]),
    ("houlsby", "3%", "m", 36, 18_456, 674_688, [0.855, 0.860, "diverged"]),
    ("prefix", "1%", "n", 10, 4_608, 281_088, [0.802, 0.815, 0.809]),  # off budget by > 1 step
    ("qlora", "1%", "r", 25, 9_216, 230_400, [0.839, 0.844, 0.836]),
    ("ptuning", "1%", "n", 591, None, 226_944, [0.781]),  # one seed; no step recorded
    ("prompt", "3%", "n", 1_774, 384, 681_216, ["unreachable"]),
]
ERRORS = {
    "failed": "RuntimeError: boom | a pipe\nand a second line",
    "diverged": "loss became NaN at step 40",
    "unreachable": "not reachable: prompt spans 384..196,608 params (0.00169%..0.866%) with n in 1..512",
}


def make_spec(method, budget, knob, value, step, trainable, seed, **changes) -> TrialSpec:
    """One planned trial of the fixture suite (``changes`` override fields)."""
    fields = dict(
        suite="fixture", task=TaskEntry(name="movie_sentiment"), backbone="minilm", method=method,
        method_config={knob: value} if knob else {}, budget=budget, seed=seed, lr=1e-3,
        primary_metric="accuracy", direction="max", knob=knob, knob_value=value, knob_step=step,
        target_params=TARGET.get(budget), trainable_params=trainable, stored_params=trainable, head_params=HEAD,
        base_params=BASE, reference=REFERENCE.get(method),
    )
    return TrialSpec(**{**fields, **changes})


def make_result(method, seed, accuracy, **changes) -> TrialResult:
    """What a finished fixture trial returned (``changes`` override fields)."""
    fields = dict(
        metrics={"accuracy": accuracy, "macro_f1": round(accuracy - 0.004, 4)},
        val_metrics={"accuracy": round(accuracy + 0.01, 4)},
        costs={"4-bit weights": Cost(value=10_500_000, unit="bytes")} if method == "qlora" else {},
        step_time_s=0.2 + 0.01 * seed + (0.3 if method == "qlora" else 0.0),
        peak_mem_bytes=400 * 2**20 + seed * 2**20, mem_kind="rss",
        inference_overhead=1.0 if method in ("full", "head") else 1.05,
        train_time_s=95.0 + seed, steps=300 if method != "lora" else 280 + 10 * seed,
        curves=[CurvePoint(step=s, loss=round(0.7 - 0.1 * i - 0.01 * seed, 3),
                           val_metric=round(accuracy - 0.05 + 0.02 * i, 3)) for i, s in enumerate((100, 200, 300))],
        environment=ENV,
    )
    return TrialResult(**{**fields, **changes})


def fixture_trials():
    """(spec, result-or-status) pairs of the fixture run, in a fixed order."""
    out = []
    for method, budget, knob, value, step, trainable, outcomes in PLAN:
        for seed, outcome in enumerate(outcomes):
            spec = make_spec(method, budget, knob, value, step, trainable, seed)
            if isinstance(outcome, str):
                out.append((spec, outcome))
                continue
            result = make_result(method, seed, outcome, stored_bytes=4 * trainable,
                                 artifacts=f"trials/{method}-{budget}-{seed}")
            out.append((spec, result))
    return out


def write_trials(store: Store, trials) -> Store:
    """Store (spec, outcome) pairs as a run would: started, then finished, failed or left running."""
    for spec, outcome in trials:
        if outcome == "unreachable":
            store.unreachable(spec.model_copy(update={"reachable": False, "note": ERRORS["unreachable"]}))
            continue
        store.start(spec)
        if isinstance(outcome, TrialResult):
            store.finish(spec.trial_id, outcome)
        elif outcome in ("failed", "diverged"):
            store.fail(spec.trial_id, outcome, ERRORS[outcome])
        # "running": left as a kill -9 would leave it
    return store


def build_store(suite_dir: Path) -> Store:
    suite_dir.mkdir(parents=True, exist_ok=True)
    (suite_dir / "suite.json").write_text(json.dumps(SUITE_JSON))
    return write_trials(Store(suite_dir / "results.sqlite"), fixture_trials())


class SectionPlugin:
    """A third-party plugin that appends a section to every report."""

    __name__ = "section_plugin"

    @peftbench.hookimpl
    def report_sections(self, suite, store):
        n = sum(r.status == "done" for r in store.records())
        return [f"## Extra from a plugin\n\nSuite {suite} has {n} finished trials.", ""]


def bare_registry(*plugins) -> Registry:
    """A registry holding only ``plugins`` (the golden output must not depend on installed ones)."""
    pm = pluggy.PluginManager("peftbench")
    pm.add_hookspecs(hookspecs)
    for p in plugins:
        pm.register(p, name=getattr(p, "__name__", None))
    return Registry(pm=pm)


@pytest.fixture(scope="module")
def fixture_run(tmp_path_factory):
    """The fixture run's store and its report, rendered once for the module (plots take seconds)."""
    suite_dir = tmp_path_factory.mktemp("reports") / "fixture"
    store = build_store(suite_dir)
    text = report.write_report(suite_dir, store, bare_registry(SectionPlugin())).read_text(encoding="utf-8")
    yield suite_dir, store, text
    store.close()


def table_rows(markdown: str, heading: str) -> dict[str, dict[str, str]]:
    """The first table after ``heading`` (empty: the first table): first cell -> {header: cell}."""
    lines = (markdown.split(heading, 1)[1] if heading else markdown).splitlines()
    start = next(i for i, ln in enumerate(lines) if ln.startswith("|"))
    block = []
    for ln in lines[start:]:
        if not ln.startswith("|"):
            break
        block.append([c.strip() for c in re.split(r"(?<!\\)\|", ln)[1:-1]])
    header, _, *body = block
    return {cells[0]: dict(zip(header, cells)) for cells in body}


def results_of(markdown: str, budget: str) -> dict[str, dict]:
    return table_rows(markdown, f"### Budget {budget}")


# -- golden markdown -----------------------------------------------------------------------
def test_report_matches_golden(fixture_run):
    suite_dir, store, text = fixture_run
    if os.environ.get("PEFTBENCH_UPDATE_GOLDEN") == "1":
        GOLDEN.parent.mkdir(exist_ok=True)
        GOLDEN.write_text(text, encoding="utf-8")
    assert GOLDEN.is_file(), "no golden file: run with PEFTBENCH_UPDATE_GOLDEN=1 once and review it"
    assert text == GOLDEN.read_text(encoding="utf-8"), (
        "report.md differs from tests/golden/report.md; if intended, regenerate with PEFTBENCH_UPDATE_GOLDEN=1"
    )


def test_report_is_honest_about_its_method(fixture_run):
    text = fixture_run[2]
    assert "backbone's parameters without the task head" in text and "its own column (Head)" in text
    assert "Welch's t-test" in text and "α = 0.05" in text
    assert "- **Seeds:** 3 (0, 1, 2) per method and budget" in text
    assert "peftbench run --methods lora,houlsby" in text  # the exact command, from suite.json
    assert "torch 2.13.0" in text and "device: cpu" in text
    # prefix misses its target by more than one knob step; ptuning is within its estimated step
    one = results_of(text, "1%")
    assert one["prefix"]["Achieved"].endswith(report.OFF_BUDGET)
    assert "**prefix** misses the budget: 281,088 trainable parameters vs the target 227,132" in text
    assert not any(r["Achieved"].endswith(report.OFF_BUDGET) for m, r in one.items() if m != "prefix")
    # baselines are marked as not budget-solved
    assert one["full"]["Achieved"] == f"100% {report.NOT_SOLVED}" and one["head"]["Achieved"] == f"0% {report.NOT_SOLVED}"
    assert "full, head: reference baseline(s), not budget-solved" in text
    # failed / diverged / unreachable / killed trials are listed with their reasons
    failures = text.split("## Failed and unfinished trials", 1)[1]
    for status, reason in [("failed", "RuntimeError: boom \\| a pipe and a second line"),
                           ("diverged", "loss became NaN at step 40"), ("unreachable", "not reachable: prompt spans"),
                           ("running", "unfinished: still running, or the run was killed")]:
        assert re.search(rf"\| {status}\s+\|\s+1\s+\| {re.escape(reason)}", failures), status
    assert one["houlsby"]["Seeds"] == "2 of 3"
    # tables line up: every line of a table has its pipes in the same columns
    for block in re.findall(r"(?:^\|.*\n)+", text, flags=re.M):
        widths = {len(ln) for ln in block.splitlines()}
        assert len(widths) == 1, block


def test_numbers_are_formatted():
    assert report.fmt_params(22_713_216) == "22,713,216"
    assert [report.fmt_pct(v) for v in (1.0, 0.031234, 100.0, 12.345)] == ["1.00%", "0.0312%", "100%", "12.3%"]
    assert report.fmt_short(22_713_216) == "22.7M" and report.fmt_short(227_132) == "227k" and report.fmt_short(1e6) == "1M"
    assert report.fmt_bytes(921_600) == "900 KiB" and report.fmt_bytes(10_500_000) == "10.0 MiB"
    assert report.fmt_seconds(0.2) == "200 ms" and report.fmt_seconds(95.0) == "95.0 s"
    assert report.fmt_num(0.85, report.decimals_for([0.85])) == "0.850"
    assert report.decimals_for([68.2]) == 2 and report.decimals_for([0.5, -0.2]) == 3


# -- statistics, checked against independent computations ---------------------------------
def welch_by_hand(a, b):
    """Welch's t-test written out: t, Welch-Satterthwaite df, two-sided p."""
    na, nb = len(a), len(b)
    ma, mb = sum(a) / na, sum(b) / nb
    va = sum((x - ma) ** 2 for x in a) / (na - 1)
    vb = sum((x - mb) ** 2 for x in b) / (nb - 1)
    se2 = va / na + vb / nb
    t = (ma - mb) / math.sqrt(se2)
    df = se2**2 / ((va / na) ** 2 / (na - 1) + (vb / nb) ** 2 / (nb - 1))
    return 2 * sps.t.sf(abs(t), df)


def test_statistics_against_independent_values(fixture_run):
    one = results_of(fixture_run[2], "1%")
    accs = {m: [x for x in v if isinstance(x, float)] for m, b, *_, v in PLAN if b in (None, "n/a", "1%")}
    refs = {"full", "head"}  # baselines outside the budget: tested against the best budget-matched method, not ranked
    best = max((v for k, v in accs.items() if k not in refs and len(v) > 1), key=lambda v: sum(v) / len(v))
    assert best == accs["lora"]
    for method, values in accs.items():
        n = len(values)
        if n < 2:
            continue  # checked below
        m, s = sum(values) / n, math.sqrt(sum((x - sum(values) / n) ** 2 for x in values) / (n - 1))
        lo, hi = sps.t.interval(0.95, n - 1, loc=m, scale=sps.sem(values))
        assert stats.ci(values) == pytest.approx((lo, hi), abs=1e-12)
        assert stats.std(values) == pytest.approx(s, abs=1e-15)
        row = one[method]
        assert row["accuracy (mean ± std)"] == f"{m:.3f} ± {s:.3f}"
        assert row["95% CI"] == f"[{lo:.3f}, {hi:.3f}]"
        if method == "lora":
            assert row["vs best (Welch)"] == "best" and row["Rank"] == "1"
            continue
        assert row["Rank"] == ("ref" if method in refs else row["Rank"])
        p = welch_by_hand(best, values)
        assert stats.welch(best, values) == pytest.approx(p, rel=1e-9)
        mark = "*" if p < 0.05 else "n.s."
        shown = "p<0.001" if p < 0.001 else f"p={p:.3f}"
        assert row["vs best (Welch)"] == f"{mark} {shown}", method
    # the marks the fixture was built to show
    assert one["head"]["vs best (Welch)"].startswith("*") and one["houlsby"]["vs best (Welch)"].startswith("n.s.")
    # ranks follow the means, best first; one seed: no interval, no test
    means = sorted(((sum(v) / len(v), k) for k, v in accs.items() if k not in refs), reverse=True)
    assert [one[k]["Rank"] for _, k in means] == [str(i) for i in range(1, len(means) + 1)]
    assert one["full"]["Rank"] == one["head"]["Rank"] == "ref"
    assert one["full"]["vs best (Welch)"].startswith("n.s.")  # full FT is above lora here, but not significantly
    assert one["ptuning"]["95% CI"] == "—" and one["ptuning"]["vs best (Welch)"] == "—"
    assert one["ptuning"]["accuracy (mean ± std)"] == "0.781"


def test_rank_direction_and_degenerate_cases():
    lower = [stats.Summary("a", [3.0, 3.2]), stats.Summary("b", [2.0, 2.1]), stats.Summary("c", [2.0, 2.1])]
    ordered = stats.rank(lower, "min")
    assert [s.key for s in ordered] == ["b", "c", "a"] and [s.rank for s in ordered] == [1, 1, 3]
    assert stats.rank([stats.Summary("x", [1.0]), stats.Summary("y", [2.0])], "maximize")[0].key == "y"
    assert stats.welch([1.0, 1.0], [1.0, 1.0]) == 1.0 and stats.welch([1.0, 1.0], [2.0, 2.0]) == 0.0
    assert stats.welch([1.0], [1.0, 2.0]) is None and stats.ci([1.0]) is None
    with pytest.raises(ValueError, match="direction"):
        stats.direction_of("sideways")
    assert report.pareto_front([(10, 0.8), (20, 0.7), (30, 0.9), (5, 0.5)], "max") == [(5, 0.5), (10, 0.8), (30, 0.9)]
    assert report.pareto_front([(10, 2.0), (20, 1.0), (30, 1.5)], "min") == [(10, 2.0), (20, 1.0)]


# -- plots ---------------------------------------------------------------------------------
def test_plots_exist_and_are_png(fixture_run):
    suite_dir, _, text = fixture_run
    links = re.findall(r"!\[[^\]]*\]\((plots/[^)]+)\)", text)
    names = {Path(link).name for link in links}
    assert {"pareto-movie_sentiment-minilm.png", "relative-movie_sentiment-minilm.png",
            "curves-movie_sentiment-minilm-1pct.png", "curves-movie_sentiment-minilm-3pct.png"} == names
    for link in links:
        data = (suite_dir / link).read_bytes()
        assert data[:8] == b"\x89PNG\r\n\x1a\n" and data[12:16] == b"IHDR"
        width, height = int.from_bytes(data[16:20], "big"), int.from_bytes(data[20:24], "big")
        assert width >= 300 and height >= 200 and len(data) > 5_000
    assert sorted(p.name for p in (suite_dir / "plots").iterdir()) == sorted(names)


# -- plugin sections -----------------------------------------------------------------------
def test_report_sections_hook_is_appended(fixture_run):
    text = fixture_run[2]
    assert text.index("## Extra from a plugin") > text.index("## Failed and unfinished trials")
    assert text.endswith("\n\n## Extra from a plugin\n\nSuite fixture has 22 finished trials.\n")
    assert text.count("## Extra from a plugin") == 1
    suite_dir, store, _ = fixture_run
    assert report.plugin_sections(bare_registry(), report.build_context(suite_dir, store), store) == []


def test_report_sections_through_get_registry(fixture_run):
    suite_dir, store, _ = fixture_run
    registry = peftbench.get_registry(extra=[SectionPlugin()])
    sections = report.plugin_sections(registry, report.build_context(suite_dir, store), store)
    assert "## Extra from a plugin" in "\n".join(s.markdown for s in sections)


def test_a_failing_plugin_section_names_the_plugin(fixture_run):
    class Broken:
        __name__ = "broken_plugin"

        @peftbench.hookimpl
        def report_sections(self, suite, store):
            raise KeyError("oops")

    suite_dir, store, _ = fixture_run
    with pytest.raises(peftbench.PluginError, match="broken_plugin.*report_sections.*oops"):
        report.plugin_sections(bare_registry(Broken()), report.build_context(suite_dir, store), store)


class PlacedPlugin:
    """A plugin written against the context: sections placed after, before and at the end."""

    __name__ = "placed_plugin"

    @peftbench.hookimpl
    def report_sections(self, context):
        budget_1 = report.section_key("results", "movie_sentiment", "minilm", "1%")
        return [
            context.section("Read the setup first.", title="Plugin after setup", after="setup"),
            report.Section("#### Plugin note on 1%\n\nInside the 1% budget.", after=budget_1),
            context.section("Just before the failures.", title="Plugin before failures", before="failures"),
            context.section("Second after setup.", title="Plugin after setup, second", after="Setup"),  # a title
            "## Plugin at the end\n\nPlain markdown goes last.",
        ]


def test_plugin_sections_go_where_they_ask(fixture_run, tmp_path):
    suite_dir, store, _ = fixture_run
    text = report.render(tmp_path / "fixture", store, bare_registry(SectionPlugin(), PlacedPlugin()))
    heads = [line for line in text.splitlines() if line.startswith("#")]
    assert heads.index("## Plugin after setup") == heads.index("## Setup") + 1  # right after the named section
    assert heads.index("## Plugin after setup, second") == heads.index("## Plugin after setup") + 1  # in order
    assert heads.index("## movie_sentiment on minilm") == heads.index("## Plugin after setup, second") + 1
    # after a budget: after its table, notes and costs, before the next budget's heading
    budget_1 = next(i for i, h in enumerate(heads) if h.startswith("### Budget 1%"))
    assert heads[budget_1 + 1] == "#### Plugin note on 1%" and heads[budget_1 + 2].startswith("### Budget 3%")
    assert text.index("Inside the 1% budget.") > text.index("![Learning curves, movie_sentiment, minilm, budget 1%]")
    assert heads.index("## Failed and unfinished trials") == heads.index("## Plugin before failures") + 1
    # without a place: at the end, in pluggy's call order (the last registered plugin first)
    assert heads[-2:] == ["## Plugin at the end", "## Extra from a plugin"]
    # the built-in sections are unchanged around them
    golden = GOLDEN.read_text(encoding="utf-8")
    for part in ("### Budget 1%", "### Budget 3%", "### Parameters vs accuracy", "## Failed and unfinished trials"):
        block = golden.split(part, 1)[1].split("\n#", 1)[0]
        assert part + block in text


def test_a_misplaced_plugin_section_names_the_plugin_and_the_keys(fixture_run, tmp_path):
    class Lost:
        __name__ = "lost_plugin"

        @peftbench.hookimpl
        def report_sections(self, context):
            return context.section("nowhere", title="Lost", after="results/movie_sentiment/minilm/2%")

    with pytest.raises(peftbench.PluginError, match=r"lost_plugin.*'results/movie_sentiment/minilm/2%' names no "
                                                    r"section; known: .*results/movie_sentiment/minilm/1%.*setup"):
        report.render(tmp_path / "fixture", fixture_run[1], bare_registry(Lost()))
    with pytest.raises(ValueError, match="not both"):
        report.Section("x", after="setup", before="failures")


def test_plugin_sections_get_the_context_of_the_built_in_sections(fixture_run, tmp_path, monkeypatch):
    """A plugin reads the same groups, records and formatters as the built-in sections, and can place by group."""
    from peftbench.report import sections as builtin

    seen = {}
    budget_section = builtin.budget_section

    def spy(ctx, g):
        seen.setdefault("builtin", ctx)
        return budget_section(ctx, g)

    class RankPlugin:
        __name__ = "rank_plugin"

        @peftbench.hookimpl
        def report_sections(self, context, suite, store):
            seen["plugin"], seen["suite"], seen["store"] = context, suite, store
            out = []
            for g in context.groups:
                decimals = context.fmt.decimals_for([v for m in g.finished for v in m.values(g.primary)])
                rows = [[m.label, str(m.summary.rank or "ref"), str(len(m.done)),
                         context.fmt.fmt_num(m.summary.mean, decimals)] for m in g.finished]
                table = context.fmt.table(["Method", "Rank", "Seeds", "Mean"], rows, {1, 2, 3})
                out.append(context.section("\n".join(table), title=f"Plugin ranks {g.budget}", level=4,
                                           after=report.section_key("results", g.task, g.backbone, g.budget)))
            return out

    monkeypatch.setattr(builtin, "budget_section", spy)
    store = fixture_run[1]
    text = report.render(tmp_path / "fixture", store, bare_registry(RankPlugin()))
    assert seen["plugin"] is seen["builtin"] and seen["suite"] == "fixture" and seen["store"] is store
    assert seen["plugin"].records == store.records() and len(seen["plugin"].groups) == 2
    for budget in ("1%", "3%"):
        ours, theirs = results_of(text, budget), table_rows(text, f"#### Plugin ranks {budget}")
        assert list(theirs) == list(ours)  # same methods, same order
        for method, row in theirs.items():
            assert row["Rank"] == ours[method]["Rank"]
            assert ours[method]["Seeds"].split(" of ")[0] == row["Seeds"]
            assert ours[method]["accuracy (mean ± std)"].split(" ± ")[0] == row["Mean"]


# -- columns read from the records ---------------------------------------------------------
def small_context(tmp_path, trials):
    """The report context of a few stored trials (no plots drawn)."""
    store = write_trials(Store(tmp_path / "small" / "results.sqlite"), trials)
    return report.build_context(tmp_path / "small", store), store


def test_the_lr_column_is_the_specs_learning_rate(tmp_path):
    from peftbench.report.tables import costs_table

    trials = [
        # the spec's lr is the trial's learning rate; an 'lr' inside a method's config is not read
        (make_spec("lora", "1%", "r", 25, 9_216, 230_400, 0, lr=5e-3, method_config={"r": 25, "lr": 0.5}),
         make_result("lora", 0, 0.85)),
        (make_spec("houlsby", "1%", "m", 12, 18_456, 231_744, 0, lr=3e-4), make_result("houlsby", 0, 0.84)),
        (make_spec("full", None, None, None, None, BASE, 0, lr=2e-5), make_result("full", 0, 0.86)),
    ]
    context, store = small_context(tmp_path, trials)
    with store:
        rows = table_rows("\n".join(costs_table(context.groups[0])), "")
    assert {m: r["LR"] for m, r in rows.items()} == {"lora": "0.005", "houlsby": "0.0003", "full": "2e-05"}


def test_cost_columns_come_from_the_results_costs(tmp_path):
    from peftbench.report.tables import costs_table

    def costs(seed):
        return {"4-bit weights": Cost(value=10_500_000 + seed * 2**20, unit="bytes"),
                "merge": Cost(value=0.25 * (seed + 1), unit="seconds"), "shards": Cost(value=3, unit="count"),
                "frozen": Cost(value=1_000_000 + seed, unit="params"), "speed-up": Cost(value=1.5, unit="ratio")}

    trials = [(make_spec("qlora", "1%", "r", 25, 9_216, 230_400, seed), make_result("qlora", seed, 0.84 + seed / 100,
                                                                                    costs=costs(seed)))
              for seed in (0, 1)]
    trials.append((make_spec("lora", "1%", "r", 25, 9_216, 230_400, 0), make_result("lora", 0, 0.85)))
    context, store = small_context(tmp_path, trials)
    with store:
        lines = costs_table(context.groups[0])
    header = [c.strip() for c in lines[0].strip("|").split("|")]
    # one column per label (sorted), between the stored size and the step time
    assert header[:8] == ["Method", "Stored params", "Stored size", "4-bit weights", "frozen", "merge", "shards",
                          "speed-up"] and header[8] == "Step time"
    rows = table_rows("\n".join(lines), "")
    # means over seeds, each in its unit's format; a method without the figure shows a dash
    assert [rows["qlora"][k] for k in header[3:8]] == ["10.5 MiB", "1,000,000", "375 ms", "3", "1.50×"]
    assert [rows["lora"][k] for k in header[3:8]] == ["—"] * 5
    # no figure anywhere: no such column
    plain = [(make_spec("lora", "1%", "r", 25, 9_216, 230_400, 0), make_result("lora", 0, 0.85))]
    context, store = small_context(tmp_path / "plain", plain)
    with store:
        assert costs_table(context.groups[0])[0].split("|")[4].strip() == "Step time"


def test_search_trials_stay_out_of_the_tables(tmp_path):
    from peftbench.report.setup import setup_section

    final = make_spec("lora", "1%", "r", 25, 9_216, 230_400, 0)
    search = make_spec("lora", "1%", "r", 25, 9_216, 230_400, 0, role="search", lr=1e-2)
    trials = [(final, make_result("lora", 0, 0.85)),
              (search, make_result("lora", 0, 0.80, metrics={}))]  # validation only
    context, store = small_context(tmp_path, trials)
    with store:
        assert len(context.records) == 2 and context.finals == [store.get(final.trial_id)]
        [group] = context.groups
        assert [len(m.done) for m in group.methods] == [1] and group.methods[0].spec.lr == final.lr
        setup = setup_section(context).markdown
    assert "- **Trials:** 1 (1 done)" in setup
    assert "- **Search trials:** 1 (1 done); selected on validation, not in the tables" in setup


# -- the command ---------------------------------------------------------------------------
def _args(argv):
    parser = argparse.ArgumentParser()
    report.add_report_arguments(parser)
    return parser.parse_args(argv)


def test_cli_report_writes_and_lists_suites(fixture_run, tmp_path, monkeypatch, capsys):
    import peftbench.contract.registry as plugins

    out = tmp_path / "reports"
    shutil.copytree(fixture_run[0], out / "fixture", ignore=shutil.ignore_patterns("report.md", "plots"))
    (out / "other").mkdir()  # a folder without a store is not a suite
    monkeypatch.setattr(plugins, "_DEFAULT", bare_registry(SectionPlugin()))  # what `peftbench report` uses
    assert report.main_report(_args(["fixture", "--out", str(out)])) == 0
    assert (out / "fixture" / "report.md").read_text(encoding="utf-8") == fixture_run[2]
    assert "wrote" in capsys.readouterr().out
    # a caller's registry is used as given (here without the plugin: no plugin section)
    assert report.main_report(_args(["fixture", "--out", str(out)]), registry=bare_registry()) == 0
    without = fixture_run[2].split("\n\n## Extra from a plugin")[0] + "\n"
    assert (out / "fixture" / "report.md").read_text(encoding="utf-8") == without
    with pytest.raises(ConfigError, match=r"no suite 'fixtur'.*did you mean 'fixture'.*suites there: fixture$"):
        report.main_report(_args(["fixtur", "--out", str(out)]))
    with pytest.raises(ConfigError, match=r"no suite 'other'.*suites there: fixture$"):
        report.main_report(_args(["other", "--out", str(out)]))
    with pytest.raises(ConfigError, match="no suites there yet"):
        report.main_report(_args(["fixture", "--out", str(tmp_path / "nowhere")]))
    assert not (tmp_path / "nowhere").exists() and not (out / "other" / "results.sqlite").exists()


def test_cli_entry_point_reports_errors_on_one_line(tmp_path, capsys):
    from peftbench.cli import main

    assert main(["report", "missing", "--out", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "no suite 'missing'" in err
